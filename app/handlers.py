"""The app's event handlers around an ``Engine``, and how their errors reach the user.

User mistakes (empty message, unreadable or non-image upload, impossible settings) become ``gr.Error`` with the
engine's message, and the server keeps serving; what was cut to fit the context is said in a note above the answer.
In the browser the chat message is checked before it is sent (``validator``): the mistake is shown under the
textbox, which keeps the message, and the conversation stays as it was. A chat error found only while answering (an
earlier image of the conversation deleted from the cache, the model failing mid-answer) ends the reply in the browser
as an error paragraph (``format_error``; the exchange is left out of what the model reads later) and the chat stays
usable; an API call of ``/chat`` gets it as an error instead. A question about "the picture" with no image to look at
is such an error too (``inputs.NoImageError``), rather than an answer about a picture nobody sent.

The image tab's events skip Gradio's preprocessing (preprocess=False): gr.Image would open every upload with Pillow
before the handler runs and report a non-image as an internal error; the handlers get the uploaded file's payload
(already checked to be in the upload folder) and load_image reports what is wrong with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from app.engine import Engine, Reply, latest_image
from app.inputs import NoImageError
from app.messages import accumulate, file_path, format_error, message_parts, parse_choices, to_turns
from model.visual import ImageLoadError

MAX_ERROR_CHARS = 500
"""Characters of an unexpected exception's message shown in the chat (the full traceback is in the server's log)."""
logger = logging.getLogger(__name__)


def _readable(error: Exception, upload: str | None) -> str:
    """The engine's message, the server-side path of an ``upload`` shown as the file's own name (the last part of
    Gradio's cache path)."""
    return str(error).replace(upload, Path(upload).name) if upload else str(error)


def _start(task: Callable[..., Reply], *args: Any, upload: str | None = None) -> Reply:
    """Call an engine task; its readable ValueError / FileNotFoundError becomes a gr.Error shown to the user."""
    try:
        return task(*args)
    except (ValueError, FileNotFoundError) as e:  # ImageLoadError and the settings checks are ValueErrors
        raise gr.Error(_readable(e, upload), print_exception=False) from e


def _start_chat(
    engine: Engine,
    message: dict[str, Any] | None,
    history: Sequence[dict[str, Any]],
    temperature: float,
    top_p: float,
    max_new_tokens: int,
) -> Reply:
    """``engine.chat`` for a Gradio chat message after its history; a readable error of the engine becomes a gr.Error.
    Without an image of its own the message is about the conversation's latest one, and when that file can no longer
    be read (Gradio deletes uploads ``DELETE_CACHE[1]`` seconds after they came, app/ui.py) the error says how to go
    on."""
    try:
        text, image = message_parts(message)
    except ValueError as e:
        raise gr.Error(str(e), print_exception=False) from e
    turns = to_turns(history)
    earlier = latest_image(turns) if image is None else None
    try:
        return engine.chat(turns, text, image, temperature, top_p, max_new_tokens)
    except (FileNotFoundError, ImageLoadError) as e:  # with no image of its own, only the earlier one is loaded
        if earlier is None:
            raise gr.Error(_readable(e, image), print_exception=False) from e
        raise gr.Error(
            f"The conversation's image could not be read ({_readable(e, str(earlier))}): attach it again (or another "
            "image) with your message, or clear the chat to go on without it.",
            print_exception=False,
        ) from e
    except ValueError as e:  # the message, the settings, the context
        raise gr.Error(_readable(e, image), print_exception=False) from e


def _error_reply(shown: str, error: Exception) -> str:
    """What the browser's chat shows when answering failed after ``shown`` had been streamed: that text, then the
    error (``format_error``): a gr.Error's own message, else the exception's type and message, logged on the server
    with its traceback."""
    if isinstance(error, gr.Error):
        message = str(error.message)
    else:
        logger.error("the chat's answer failed", exc_info=error)
        what = f"{type(error).__name__}: {str(error)[:MAX_ERROR_CHARS]}"
        message = f"The answer failed ({what}); the server's log has the details."
    return f"{shown.rstrip()}\n\n{format_error(message)}" if shown.strip() else format_error(message)


def chat_handler(engine: Engine) -> Callable[..., Iterator[str]]:
    """The Chat tab's handler (``/chat``): message, history and the sampling settings -> the growing reply."""

    def chat(
        message: dict[str, Any],
        history: list[dict[str, Any]],
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        event: gr.EventData,
    ) -> Iterator[str]:
        """The growing reply to ``message``. When the page's chat called (an event that one of its components
        triggered), an error ends the reply (``_error_reply``) and the chat stays usable: raised, it would cover the
        conversation with an error badge and leave the textbox disabled until a reload (ChatInterface re-enables it
        only after a success). An API call (no triggering component) gets the error raised, a gr.Error with the
        engine's message for a mistake. ``event`` is filled in by Gradio (from the annotation) and is no input."""
        shown = ""
        try:
            for shown in accumulate(_start_chat(engine, message, history, temperature, top_p, max_new_tokens)):
                yield shown
        except Exception as e:
            if event.target is None:
                if shown:  # a client keeps the partial reply in its conversation: mark it failed, never to be read
                    yield _error_reply(shown, e)
                raise
            yield _error_reply(shown, e)

    return chat


def message_validator(engine: Engine) -> Callable[[dict[str, Any] | None], dict[str, Any]]:
    """The Chat tab's check of the browser's submission (ChatInterface's ``validator``)."""

    def check_message(message: dict[str, Any] | None) -> dict[str, Any]:
        """The browser's submission checked before it is sent (Gradio's validator): an empty message, an unreadable
        upload or an image for a text-only model is shown under the textbox, which keeps the message to fix, and
        nothing is sent (an error of ``chat`` ends its reply instead, and the message has left the textbox). The
        check is the engine's own: a first turn with this message, whose answer is never generated. A question about
        an image with none attached passes: the conversation, which the check does not see, may hold one (``chat``
        says so otherwise). API calls skip the check and get ``chat``'s gr.Error."""
        image = None
        try:
            text, image = message_parts(message)
            engine.chat([], text, image)
        except NoImageError:
            pass
        except (ValueError, FileNotFoundError) as e:
            return gr.validate(False, _readable(e, image))
        return gr.validate(True, "")

    return check_message


def caption_handler(engine: Engine) -> Callable[..., Iterator[str]]:
    """The Image tab's Caption (``/caption``): image and the sampling settings -> the growing caption."""

    def caption(image: dict[str, Any] | None, temperature: float, top_p: float, max_new_tokens: int) -> Iterator[str]:
        path = file_path(image)
        yield from accumulate(_start(engine.caption, path, temperature, top_p, max_new_tokens, upload=path))

    return caption


def answer_handler(engine: Engine) -> Callable[..., Iterator[str]]:
    """The Image tab's Answer (``/answer``): image, question, context, choices one per line and the sampling
    settings -> the growing answer."""

    def answer(
        image: dict[str, Any] | None,
        question: str,
        context: str,
        choices: str,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
    ) -> Iterator[str]:
        choices = parse_choices(choices)
        path = file_path(image)
        reply = _start(engine.answer, question, path, context, choices, temperature, top_p, max_new_tokens, upload=path)
        yield from accumulate(reply)

    return answer
