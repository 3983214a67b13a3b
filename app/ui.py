"""The Gradio 6 app: a multimodal chat tab and an image tab (caption / question), built around an ``Engine``.

``build_demo(engine)`` builds the Blocks without loading anything, so tests pass a tiny model; ``launch`` applies the
safe serving settings (127.0.0.1, no share link, upload size limit, one queue of concurrency 1 on the model, a bounded
number of sessions kept, readable errors). Endpoints for scripts (gradio_client): ``/chat`` (message {"text",
"files"}, temperature, top_p, max_new_tokens), ``/caption`` (image, temperature, top_p, max_new_tokens) and
``/answer`` (image, question, context, choices one per line, temperature, top_p, max_new_tokens). Every one streams
the answer as it decodes.

User mistakes (empty message, unreadable or non-image upload, impossible settings) become ``gr.Error`` with the
engine's message, and the server keeps serving; what was cut to fit the context is said in a note above the answer.
In the browser the chat message is checked before it is sent (``validator``): the mistake is shown under the
textbox, which keeps the message, and the conversation stays as it was. A chat error found only while answering (an
earlier image of the conversation deleted from the cache, the model failing mid-answer) ends the reply in the browser
as an error paragraph (``format_error``; the exchange is left out of what the model reads later) and the chat stays
usable; an API call of ``/chat`` gets it as an error instead. A question about "the picture" with no image to look at
is such an error too (``engine.NoImageError``), rather than an answer about a picture nobody sent.

Uploads and the files Gradio caches live in a folder of their own per app, made by ``build_demo`` with mode 0700
under Gradio's temp folder (``GRADIO_TEMP_DIR``, default <tmp>/gradio): other users of the machine cannot read them.
Gradio deletes them ``DELETE_CACHE[1]`` seconds after they were written (checking every ``DELETE_CACHE[0]``
seconds) and all of them when the server stops; meanwhile ``launch`` keeps the folder within a size and a number of
files, its files 0600 (app/uploads.py), so what clients upload does not pile up.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from app.engine import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    MAX_MESSAGE_CHARS,
    MAX_TURNS,
    Engine,
    NoImageError,
    Reply,
    Turn,
    is_finite_number,
    latest_image,
)
from app.uploads import MAX_CACHE_BYTES, MAX_CACHE_FILES, UploadFolderGuard, files_under, private_cache_dir, secure
from model.visual import ImageLoadError

TITLE = "LLaMA-Adapter: multimodal chat"
ASSETS = Path(__file__).resolve().parent / "assets"
MODEL_QUEUE = "model"
"""Concurrency group of every event that runs the model: one model in memory answers one request at a time."""
MAX_FILE_SIZE = "10mb"
QUEUE_SIZE = 32
"""Requests waiting for the model beyond this are refused at once (rather than piling up without bound)."""
SESSION_CAPACITY = 1000
"""Sessions whose state (a chat's conversation) the server keeps; beyond this the oldest is forgotten."""
DELETE_CACHE = (600, 3600)
"""Gradio's ``delete_cache`` (frequency_s, age_s): every 10 minutes, delete the uploaded and cached files older than an
hour."""
MAX_HISTORY_MESSAGES = 4 * MAX_TURNS
"""Newest chat messages read into turns (a turn is two to four messages: image and text, then the answer)."""
MAX_PASTE_CHARS = 100_000
"""Characters a paste into the chat's textbox may have and stay text (Gradio's ``max_plain_text_length``; the engine
reads the first ``MAX_MESSAGE_CHARS`` of a message and says so). A longer paste becomes an attached text file, which
the chat refuses with a message saying so (``_message_parts``), the textbox usable as before."""

COLOR_QUESTION = "What color is the ball in the picture?"
SIZE_QUESTION = "Is the block in the picture big or small?"
COLORS = ("red", "green", "blue", "yellow")


CHAT_EXAMPLES = [  # what the embedded default (the demo recipe) was trained to answer
    {"text": "What color is the shape in the picture?", "files": [str(ASSETS / "red_circle.png")]},
    {"text": "Is the shape big or small?", "files": [str(ASSETS / "small_green_square.png")]},
    {"text": "Tell me about alpacas.", "files": []},
]
TEXT_CHAT_EXAMPLES = [{"text": "Give three tips for staying healthy."}]
"""The chat example of a text-only model (an Alpaca-trained run)."""
IMAGE_EXAMPLES = [  # image, question, context, choices: problems in the style of the synthetic ScienceQA set
    [str(ASSETS / "red_circle.png"), COLOR_QUESTION, "", "\n".join(COLORS)],
    [str(ASSETS / "small_green_square.png"), SIZE_QUESTION, "", "big\nsmall"],
]

_NOTE = re.compile(r"\A(?:\*Note: [^\n]*\*\n\n)+")
_ERROR = re.compile(r"(?:\A|\n\n)\*\*Error:\*\* [^\n]*\Z")
MAX_ERROR_CHARS = 500
"""Characters of an unexpected exception's message shown in the chat (the full traceback is in the server's log)."""
logger = logging.getLogger(__name__)


# ---- message formats ----------------------------------------------------------------------------------------------
def format_notes(notes: Sequence[str]) -> str:
    """Notes shown above an answer, one italic paragraph each (``strip_notes`` removes them again)."""
    return "".join(f"*Note: {note}*\n\n" for note in notes)


def strip_notes(text: str) -> str:
    """An answer without the notes ``format_notes`` put before it."""
    return _NOTE.sub("", text)


def format_error(message: str) -> str:
    """An error ending a reply in the browser's chat: one paragraph of one line, which ``to_turns`` recognizes so
    that the failed exchange never reaches the model (``is_error_reply``)."""
    return f"**Error:** {' '.join(message.split())}"


def is_error_reply(text: str) -> bool:
    """Whether a chat reply ends with an error (``format_error``): its answer, if it had begun, was cut off."""
    return bool(_ERROR.search(text))


def _file_path(item: Any) -> str | None:
    """The path of one uploaded file in any of the shapes Gradio hands over (str, FileData, dict, content block)."""
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    if isinstance(item, dict):
        if item.get("type") == "file":
            return _file_path(item.get("file"))
        return item.get("path")
    return getattr(item, "path", None)


def _split_content(content: Any) -> tuple[list[str], list[str]]:
    """(texts, file paths) of one chat message's content: a string, a file, or a list of text / file blocks."""
    if content is None:
        return [], []
    if isinstance(content, str):
        return [content], []
    if isinstance(content, (list, tuple)):
        texts: list[str] = []
        files: list[str] = []
        for block in content:
            t, f = _split_content(block)
            texts += t
            files += f
        return texts, files
    if isinstance(content, dict) and content.get("type") == "text":
        return [content.get("text") or ""], []
    path = _file_path(content)
    return ([], [path]) if path else ([], [])


def to_turns(history: Sequence[dict[str, Any]]) -> list[Turn]:
    """Gradio's chat history (messages with role and content) as answered ``Turn``s.

    One submission is its text with the files attached before it (the browser shows an attached image and its text
    as two user messages; gradio_client sends one). When several submissions precede an answer, the earlier ones
    failed (their error was shown and they got no answer): only the last one counts, so a rejected upload never
    comes back to haunt the turns after it. Submissions after the last answer are left out for the same reason, and
    so is a submission whose reply ends with an error (``format_error``), with what was answered before the error.
    Only the newest ``MAX_HISTORY_MESSAGES`` messages are read (the engine keeps at most ``MAX_TURNS`` turns).
    """
    turns: list[Turn] = []
    text, files = "", []  # the current submission
    for message in history[-MAX_HISTORY_MESSAGES:]:
        role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
        content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
        msg_texts, msg_files = _split_content(content)
        msg_text = "\n".join(t for t in msg_texts if t.strip())
        if role == "user":
            if text:  # the previous submission got no answer: start over
                text, files = "", []
            text, files = msg_text, files + msg_files
        elif role == "assistant":
            answer = strip_notes("".join(msg_texts)).strip()
            if is_error_reply(answer):  # a failed submission: forgotten like one that got no answer
                answer = ""
            if text and answer:
                turns.append(Turn(user=text, assistant=answer, image=files[-1] if files else None))
            elif turns and answer:  # a second assistant message continues the previous answer
                turns[-1].assistant += "\n" + answer
            text, files = "", []
    return turns


# ---- event handlers -------------------------------------------------------------------------------------------
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


def _message_parts(message: dict[str, Any] | None) -> tuple[str, str | None]:
    """(text, path of the attached image or None) of a multimodal chat message; the last file counts. A text file
    (what the browser makes of a paste over ``MAX_PASTE_CHARS`` characters) is a ValueError saying so."""
    files = (message or {}).get("files") or []
    path = _file_path(files[-1]) if files else None
    if path is not None and Path(path).suffix.lower() == ".txt":
        raise ValueError(
            f"{Path(path).name} is a text file, and the chat reads images only (the browser attaches a paste of more "
            f"than {MAX_PASTE_CHARS:,} characters as one): remove it and paste less; the model reads the first "
            f"{MAX_MESSAGE_CHARS:,} characters of a message."
        )
    return (message or {}).get("text", ""), path


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
    be read (Gradio deletes uploads ``DELETE_CACHE[1]`` seconds after they came) the error says how to go on."""
    try:
        text, image = _message_parts(message)
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


def accumulate(reply: Reply) -> Iterator[str]:
    """The growing answer (notes first), one yield per streamed piece; Gradio sends only the difference."""
    text = format_notes(reply.notes)
    if text:
        yield text
    answered = False
    for piece in reply:
        text += piece
        answered = answered or bool(piece.strip())
        yield text
    if not answered:
        yield text + format_notes(["The model gave an empty answer (it stopped at once)."])


def _parse_choices(choices: str | None) -> list[str]:
    return [line.strip() for line in (choices or "").splitlines() if line.strip()]


def _checked(slider: gr.Slider) -> gr.Slider:
    """``slider`` refusing a value sent through the API that is no number in its range, with a message naming the
    setting: Gradio's own check names none, fails on a string with an internal TypeError and lets NaN through to the
    sampler. The instance's ``preprocess`` is wrapped because subclassing a component makes Gradio write a .pyi stub
    beside the subclass's module."""
    preprocess = slider.preprocess

    def checked(payload: Any) -> float:
        if not (is_finite_number(payload) and slider.minimum <= payload <= slider.maximum):
            raise gr.Error(
                f"{slider.label} must be a number from {slider.minimum:g} to {slider.maximum:g}, got {payload!r:.40}.",
                print_exception=False,
            )
        return preprocess(payload)

    slider.preprocess = checked
    return slider


def _sampling_sliders(max_seq_len: int, render: bool = True) -> list[gr.Slider]:
    """Temperature, top-p and max new tokens, at the paper's defaults; no answer outgrows the model's context. The
    image tab's events skip preprocessing: there the engine checks the values, naming them as well."""
    max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, max_seq_len)
    sliders = [
        gr.Slider(0.0, 2.0, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature", info="0: greedy", render=render),
        gr.Slider(0.05, 1.0, value=DEFAULT_TOP_P, step=0.05, label="Top-p", render=render),
        gr.Slider(1, max_seq_len, value=max_new_tokens, step=1, label="Max new tokens", render=render),
    ]
    return [_checked(slider) for slider in sliders]


def _share_model_queue(demo: gr.Blocks, before: set[int]) -> None:
    """Put the events added since ``before`` that run the model (those given concurrency_limit=1) into the model's
    concurrency group. ChatInterface has no concurrency_id argument and registers its UI and API submissions as
    separate events, each otherwise with its own queue, so the chat could run twice at once beside the image tab."""
    for fn_id in set(demo.fns) - before:
        if demo.fns[fn_id].concurrency_limit == 1:
            demo.fns[fn_id].concurrency_id = MODEL_QUEUE


# ---- the app --------------------------------------------------------------------------------------------------
def build_demo(engine: Engine) -> gr.Blocks:
    """The Gradio app around ``engine``: Chat tab (``/chat``) and Image tab (``/caption``, ``/answer``). Its uploads
    and cached files go to a new private folder (``private_cache_dir``), deleted on the ``DELETE_CACHE`` schedule."""

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

    def check_message(message: dict[str, Any] | None) -> dict[str, Any]:
        """The browser's submission checked before it is sent (Gradio's validator): an empty message, an unreadable
        upload or an image for a text-only model is shown under the textbox, which keeps the message to fix, and
        nothing is sent (an error of ``chat`` ends its reply instead, and the message has left the textbox). The
        check is the engine's own: a first turn with this message, whose answer is never generated. A question about
        an image with none attached passes: the conversation, which the check does not see, may hold one (``chat``
        says so otherwise). API calls skip the check and get ``chat``'s gr.Error."""
        image = None
        try:
            text, image = _message_parts(message)
            engine.chat([], text, image)
        except NoImageError:
            pass
        except (ValueError, FileNotFoundError) as e:
            return gr.validate(False, _readable(e, image))
        return gr.validate(True, "")

    # The image tab's events skip Gradio's preprocessing (preprocess=False): gr.Image would open every upload with
    # Pillow before the handler runs and report a non-image as an internal error; the handlers get the uploaded
    # file's payload (already checked to be in the upload folder) and load_image reports what is wrong with it.
    def caption(image: dict[str, Any] | None, temperature: float, top_p: float, max_new_tokens: int) -> Iterator[str]:
        path = _file_path(image)
        yield from accumulate(_start(engine.caption, path, temperature, top_p, max_new_tokens, upload=path))

    def answer(
        image: dict[str, Any] | None,
        question: str,
        context: str,
        choices: str,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
    ) -> Iterator[str]:
        choices = _parse_choices(choices)
        path = _file_path(image)
        reply = _start(engine.answer, question, path, context, choices, temperature, top_p, max_new_tokens, upload=path)
        yield from accumulate(reply)

    private_cache_dir()  # before any component: each one records the cache folder when it is made
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(f"## {TITLE}\n{engine.describe()}" + (f"\n\n{engine.about}" if engine.about else ""))
        with gr.Tab("Chat"):
            before = set(demo.fns)
            gr.ChatInterface(
                chat,
                multimodal=True,
                textbox=gr.MultimodalTextbox(
                    # .txt: a paste over MAX_PASTE_CHARS arrives as a text file, which Gradio's own type check would
                    # refuse with an error that leaves the textbox stuck; _message_parts refuses it readably
                    file_types=["image", ".txt"],
                    file_count="single",
                    sources=["upload"],
                    placeholder="Ask anything; attach an image to talk about it",
                    max_plain_text_length=MAX_PASTE_CHARS,  # it has no max_length: the engine cuts what it reads
                ),
                additional_inputs=_sampling_sliders(engine.max_seq_len, render=False),  # ChatInterface places them
                additional_inputs_accordion=gr.Accordion("Sampling", open=False, render=False),
                # one-element rows: shown as buttons in the empty chat, the sliders keep their values
                # copies: Gradio turns an example's files into upload records in place
                examples=[[copy.deepcopy(ex)] for ex in (CHAT_EXAMPLES if engine.has_vision else TEXT_CHAT_EXAMPLES)],
                api_name="chat",
                validator=check_message,
                concurrency_limit=1,
                analytics_enabled=False,
                fill_height=False,
            )
            _share_model_queue(demo, before)

        with gr.Tab("Image"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="filepath", sources=["upload"], label="Image")
                with gr.Column():
                    question = gr.Textbox(
                        label="Question", placeholder="What is in the picture?", max_length=MAX_MESSAGE_CHARS
                    )
                    context = gr.Textbox(label="Context (optional)", max_length=MAX_MESSAGE_CHARS)
                    choices = gr.Textbox(
                        label="Choices (optional, one per line)", lines=3, max_length=MAX_MESSAGE_CHARS
                    )
                    with gr.Row():
                        caption_btn = gr.Button("Caption")
                        answer_btn = gr.Button("Answer", variant="primary")
                        stop_btn = gr.Button("Stop", variant="stop")
                    output = gr.Textbox(label="Answer", lines=4, interactive=False)
            with gr.Accordion("Sampling", open=False):
                sliders = _sampling_sliders(engine.max_seq_len)
            gr.Examples(copy.deepcopy(IMAGE_EXAMPLES), [image, question, context, choices])
            caption_event = caption_btn.click(
                caption,
                [image, *sliders],
                output,
                api_name="caption",
                preprocess=False,
                concurrency_limit=1,
                concurrency_id=MODEL_QUEUE,
            )
            answer_event = gr.on(
                [answer_btn.click, question.submit],
                answer,
                [image, question, context, choices, *sliders],
                output,
                api_name="answer",
                preprocess=False,
                concurrency_limit=1,
                concurrency_id=MODEL_QUEUE,
            )
            stop_btn.click(None, cancels=[caption_event, answer_event])
    return demo


def launch(
    demo: gr.Blocks,
    *,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    share: bool = False,
    max_file_size: str | int = MAX_FILE_SIZE,
    max_cache_bytes: int = MAX_CACHE_BYTES,
    max_cache_files: int = MAX_CACHE_FILES,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
) -> tuple[Any, str, str]:
    """Serve ``demo`` with the safe settings: local address, no public link unless ``share``, uploads capped at
    ``max_file_size`` each and stored in the demo's private folder, which keeps at most ``max_cache_bytes`` and
    ``max_cache_files`` of them, the newest, with modes 0600 / 0700 (app/uploads.py), a bounded queue and number of
    sessions kept, errors shown to the user. Returns Gradio's (app, local_url, share_url)."""
    from starlette.middleware import Middleware

    os.environ["GRADIO_TEMP_DIR"] = demo.GRADIO_CACHE  # uploads go where the demo's components cache (its own)
    folder = Path(demo.GRADIO_CACHE)
    secure(folder)  # the examples Gradio copied while building, with their source's mode
    guard = Middleware(
        UploadFolderGuard, folder=folder, keep=files_under(folder), max_bytes=max_cache_bytes, max_files=max_cache_files
    )
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    return demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=max_file_size,
        show_error=True,
        prevent_thread_lock=prevent_thread_lock,
        quiet=quiet,
        footer_links=["api"],
        state_session_capacity=SESSION_CAPACITY,
        app_kwargs={"middleware": [guard]},  # FastAPI's own: Gradio adds its CORS and compression around it
    )
