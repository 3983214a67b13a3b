"""The app's message formats: Gradio's chat history as the engine's turns, uploads in any shape Gradio hands over,
and the text an answer is shown as (notes above it, an error ending it), streamed as it grows."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from app.engine import MAX_TURNS, Reply, Turn
from app.inputs import MAX_MESSAGE_CHARS

MAX_HISTORY_MESSAGES = 4 * MAX_TURNS
"""Newest chat messages read into turns (a turn is two to four messages: image and text, then the answer)."""
MAX_PASTE_CHARS = 100_000
"""Characters a paste into the chat's textbox may have and stay text (Gradio's ``max_plain_text_length``; the engine
reads the first ``MAX_MESSAGE_CHARS`` of a message and says so). A longer paste becomes an attached text file, which
the chat refuses with a message saying so (``message_parts``), the textbox usable as before."""

_NOTE = re.compile(r"\A(?:\*Note: [^\n]*\*\n\n)+")
_ERROR = re.compile(r"(?:\A|\n\n)\*\*Error:\*\* [^\n]*\Z")


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


def file_path(item: Any) -> str | None:
    """The path of one uploaded file in any of the shapes Gradio hands over (str, FileData, dict, content block)."""
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    if isinstance(item, dict):
        if item.get("type") == "file":
            return file_path(item.get("file"))
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
    path = file_path(content)
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


def message_parts(message: dict[str, Any] | None) -> tuple[str, str | None]:
    """(text, path of the attached image or None) of a multimodal chat message; the last file counts. A text file
    (what the browser makes of a paste over ``MAX_PASTE_CHARS`` characters) is a ValueError saying so."""
    files = (message or {}).get("files") or []
    path = file_path(files[-1]) if files else None
    if path is not None and Path(path).suffix.lower() == ".txt":
        raise ValueError(
            f"{Path(path).name} is a text file, and the chat reads images only (the browser attaches a paste of more "
            f"than {MAX_PASTE_CHARS:,} characters as one): remove it and paste less; the model reads the first "
            f"{MAX_MESSAGE_CHARS:,} characters of a message."
        )
    return (message or {}).get("text", ""), path


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


def parse_choices(choices: str | None) -> list[str]:
    """The image tab's choices, one per line, without blank lines and surrounding spaces."""
    return [line.strip() for line in (choices or "").splitlines() if line.strip()]
