"""LLaVA-format image conversations (``llava_instruct_150k.json``) and the chat prompt they train.

The file is a JSON list of {"id", "image", "conversations": [{"from": "human", "value": ...}, {"from": "gpt",
"value": ...}, ...]}; ``image`` names a file in the image folder (LLaVA's own data: COCO train2017, e.g.
"000000215677.jpg"). The first human turn carries the tag "<image>" before or after its text; the image enters the
model through the visual prompt, never as text, so the tag (and the newline joining it) is removed.

Each gpt turn is one training ``Example`` in the demo's chat prompt (a ``Query`` with the earlier turns, prompted by
the run's ``PromptTemplate``, data/prompts.py, as app/engine.py prompts it), so the model learns exactly the prompt
the demo's chat sends it. With the Alpaca templates a first turn is the plain Alpaca instruction; a later turn is the
Alpaca template with a fixed instruction (``CHAT_INSTRUCTION``) and the conversation in its Input field as
"User: ... / Assistant: ..." lines ending with the new message, so the question to answer is the last line before
the response, as in a first turn. (With the new message as the instruction and the earlier turns after it, the tiny
demo model answered the earlier question again: 12 of 24 size follow-ups after a colour answer were right, 3 of 24
colour follow-ups after a size answer.) With a base's chat template the turns are its messages.
The official LLaMA-Adapter V2 fine-tuning keeps only the first human / gpt pair of each conversation, "<image>" tag
included.

Checks: a malformed record (not an object, no image or conversations, turns not alternating human / gpt from a
human one, a non-string or blank value) raises DataError naming the file and record index, or is skipped and counted
with ``skip_invalid``; image names must stay inside the image folder, as in the other readers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from data import DataError, ImageFolder, InvalidRecords, read_json
from data.collate import Example
from data.prompts import ALPACA, CHAT_MAX_TURNS, PromptTemplate, Query

IMAGE_TAG = re.compile(r"\A\s*<image>\s*|\s*<image>\s*\Z")
"""LLaVA's placeholder for the image, at the start or the end of the first human turn."""


@dataclass
class Conversation:
    """One record: the image's path and its (user, assistant) turns; ``index`` is its position in the file."""

    image: Path
    turns: list[tuple[str, str]]
    index: int
    id: str


def load_conversations(
    file: str | Path, image_dir: str | Path | None = None, *, skip_invalid: bool = False
) -> list[Conversation]:
    """The conversations of a LLaVA instruction file; images in ``image_dir`` (default: ``images/`` beside it)."""
    file = Path(file)
    folder = ImageFolder(Path(image_dir) if image_dir is not None else file.parent / "images")
    data = read_json(file)
    if not isinstance(data, list):
        raise DataError(f"{file}: expected a JSON list of {{id, image, conversations}} objects")
    out, invalid = [], InvalidRecords(file, skip_invalid)
    for i, rec in enumerate(data):
        turns, problem = _turns(rec)
        if problem is None:
            try:
                image = folder.path(rec["image"])
            except ValueError as e:
                problem = f"field 'image': {e}"
        if problem is not None:
            invalid(f"record {i}: {problem}")
            continue
        out.append(Conversation(image, turns, i, str(rec.get("id", i))))
    invalid.warn(len(data))
    return out


def _turns(rec: object) -> tuple[list[tuple[str, str]], str | None]:
    """The (user, assistant) pairs of a record, or the reason it is malformed."""
    if not isinstance(rec, dict):
        return [], f"expected an object, got {type(rec).__name__}"
    if not isinstance(rec.get("image"), str) or not rec["image"].strip():
        return [], f"field 'image' must name an image file, got {rec.get('image')!r:.60}"
    messages = rec.get("conversations")
    if not isinstance(messages, list) or len(messages) < 2:
        return [], "field 'conversations' must be a list of at least one human and one gpt turn"
    texts = []
    for n, message in enumerate(messages):
        expected = "human" if n % 2 == 0 else "gpt"
        if not isinstance(message, dict) or message.get("from") != expected:
            found = message.get("from") if isinstance(message, dict) else type(message).__name__
            return [], f"conversations[{n}] must be a {expected!r} turn, got {found!r:.40}"
        value = message.get("value")
        if not isinstance(value, str):
            return [], f"conversations[{n}].value must be a string, got {value!r:.40}"
        texts.append((IMAGE_TAG.sub("", value) if n == 0 else value).strip())
        if not texts[-1].strip():
            return [], f"conversations[{n}].value is blank"
    if len(texts) % 2:
        texts = texts[:-1]  # a question left unanswered at the end teaches nothing
    return list(zip(texts[::2], texts[1::2])), None


def to_examples(conversation: Conversation, template: PromptTemplate = ALPACA) -> list[Example]:
    """One example per answer: the chat prompt of its question after the earlier turns (the newest
    ``CHAT_MAX_TURNS``) -> the answer."""
    turns, examples = conversation.turns, []
    for k, (user, assistant) in enumerate(turns):
        prompt, target = template.example(Query(user, history=tuple(turns[max(0, k - CHAT_MAX_TURNS) : k])), assistant)
        examples.append(Example(prompt, target, image=conversation.image, meta={"id": f"{conversation.id}#{k}"}))
    return examples


def load_examples(
    file: str | Path,
    image_dir: str | Path | None = None,
    *,
    skip_invalid: bool = False,
    template: PromptTemplate = ALPACA,
) -> list[Example]:
    """Training examples of a LLaVA instruction file (one per answered turn)."""
    conversations = load_conversations(file, image_dir, skip_invalid=skip_invalid)
    return [ex for c in conversations for ex in to_examples(c, template)]
