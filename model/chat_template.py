"""A base's chat template: the Jinja text in its tokenizer files that turns a conversation into the model's prompt.

Chat-tuned bases (Llama-2-chat, Llama-3-instruct, ...) ship their prompt format as a Jinja template in
``tokenizer_config.json`` (``"chat_template"``: a string, or a list of named templates of which "default" is the
one used) or, as transformers writes it since 4.50, in a ``chat_template.jinja`` file beside it. The template is
rendered here by transformers' own renderer (``render_jinja_template``: the sandboxed Jinja environment with
``trim_blocks`` / ``lstrip_blocks``, ``raise_exception``, ``tojson``, ``strftime_now``), so a conversation reads as
it does for ``tokenizer.apply_chat_template``, with ``bos_token`` / ``eos_token`` the tokenizer config's names.

Tokenization follows ``apply_chat_template(..., tokenize=True)``: the rendered text already holds every special
token it needs (Llama-2's ``<s>`` before each ``[INST]``, Llama-3's headers and ``<|eot_id|>``), so it is encoded
with special tokens read from the text and nothing added (``encode_prompt``). A training example is the whole
conversation encoded at once, split where the prompt's own encoding ends (``encode_example``): the target is the
assistant's reply with the template's end-of-turn tokens, which the model learns to emit. Generation stops at EOS and
at the special tokens that end an assistant turn in the template (``stop_ids``: Llama-3's ``<|eot_id|>``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from model.tokenizer import token_name

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
_PROBE = ("Hello.", "Hi!")
"""A user message and the reply used to find what follows an assistant turn."""


class ChatTemplateError(ValueError):
    """A chat template that cannot be read or rendered; the message names the file it came from."""


class TokenizerLike(Protocol):
    """What the encoders need from model.tokenizer.Tokenizer."""

    bos_id: int | None
    eos_id: int

    def encode(self, text: str, bos: bool = True, eos: bool = False, *, specials: bool = False) -> list[int]: ...

    def is_special(self, token_id: int) -> bool: ...


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template and the special-token names it is rendered with; ``origin`` says where it was read."""

    source: str
    bos_token: str | None
    eos_token: str | None
    origin: str

    @property
    def sha256(self) -> str:
        """Fingerprint of the template text (recorded with a run)."""
        return hashlib.sha256(self.source.encode()).hexdigest()

    def render(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool) -> str:
        """The conversation ``messages`` ({"role", "content"} dicts) as text; with ``add_generation_prompt`` it ends
        where the assistant's reply begins."""
        import jinja2
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template(
                conversations=[list(messages)],
                chat_template=self.source,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as e:  # a syntax error, or the template's own raise_exception
            raise ChatTemplateError(f"{self.origin}: the chat template failed: {e}") from None
        return rendered[0]

    def reply(self, messages: Sequence[dict[str, str]], answer: str) -> tuple[str, str]:
        """(prompt, target): the conversation up to the assistant's turn, and what the template adds for ``answer``
        (the reply with its end-of-turn text)."""
        prompt = self.render(messages, add_generation_prompt=True)
        full = self.render([*messages, {"role": "assistant", "content": answer}], add_generation_prompt=False)
        if not full.startswith(prompt):
            raise ChatTemplateError(
                f"{self.origin}: the chat template renders a conversation with its answer differently from the same "
                f"conversation awaiting it (prompt {prompt[-60:]!r}, with the answer {full[: len(prompt)][-60:]!r}); "
                "it cannot be used to train on replies"
            )
        return prompt, full[len(prompt) :]

    def stop_ids(self, tokenizer: TokenizerLike) -> list[int]:
        """EOS and the special tokens that follow an assistant's reply in this template (Llama-3: ``<|eot_id|>``)."""
        _, target = self.reply([{"role": "user", "content": _PROBE[0]}], _PROBE[1])
        after = target[target.index(_PROBE[1]) + len(_PROBE[1]) :] if _PROBE[1] in target else ""
        ends = [i for i in tokenizer.encode(after, bos=False, specials=True) if tokenizer.is_special(i)]
        return list(dict.fromkeys([tokenizer.eos_id, *ends]))

    def to_record(self) -> dict[str, Any]:
        """What a run records to prompt with this template again without the base's files (``from_record``)."""
        return {"source": self.source, "bos_token": self.bos_token, "eos_token": self.eos_token, "origin": self.origin}

    @classmethod
    def from_record(cls, record: Any, where: str) -> ChatTemplate:
        """The template of a ``to_record`` dict read from ``where`` (a file), checked field by field."""
        if not isinstance(record, dict) or not isinstance(record.get("source"), str) or not record["source"]:
            raise ChatTemplateError(f"{where}: chat_template must be an object with a non-empty 'source' string")
        for key in ("bos_token", "eos_token", "origin"):
            if record.get(key) is not None and not isinstance(record[key], str):
                raise ChatTemplateError(f"{where}: chat_template.{key} must be a string or null, got {record[key]!r}")
        return cls(record["source"], record.get("bos_token"), record.get("eos_token"), record.get("origin") or where)


def find_chat_template(folder: str | Path) -> ChatTemplate | None:
    """The chat template of the tokenizer files in ``folder`` (a base directory, or the folder of its tokenizer):
    ``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template``; None when neither has one."""
    folder = Path(folder)
    config = _read_config(folder / CONFIG_FILE)
    names = {role: token_name(config.get(f"{role}_token")) for role in ("bos", "eos")}
    if (folder / TEMPLATE_FILE).is_file():
        file = folder / TEMPLATE_FILE
        try:
            source = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ChatTemplateError(f"{file}: not UTF-8 text ({e})") from None
        return ChatTemplate(source, names["bos"], names["eos"], str(file)) if source.strip() else None
    source = _config_template(config.get("chat_template"), folder / CONFIG_FILE)
    return ChatTemplate(source, names["bos"], names["eos"], str(folder / CONFIG_FILE)) if source else None


def _read_config(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChatTemplateError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ChatTemplateError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _config_template(value: Any, file: Path) -> str | None:
    """tokenizer_config.json's ``chat_template``: a string, or a list of {"name", "template"} (the "default" one)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        listed = ", ".join(repr(n) for n in named) or "none"
        raise ChatTemplateError(f"{file}: chat_template lists templates named {listed} but none named 'default'")
    raise ChatTemplateError(f"{file}: chat_template must be a string or a list of named templates")


def encode_prompt(tokenizer: TokenizerLike, prompt: str, template: ChatTemplate | None) -> list[int]:
    """Ids of a prompt: a rendered chat prompt as it is (its special tokens read from the text), any other with BOS."""
    if template is not None:
        return tokenizer.encode(prompt, bos=False, specials=True)
    return tokenizer.encode(prompt, bos=True, eos=False)


def encode_example(
    tokenizer: TokenizerLike, prompt: str, target: str, template: ChatTemplate | None
) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids) of one training example. Without a chat template the two are encoded apart and EOS
    closes the target (data/collate.py says why); with one, the conversation is encoded whole, as transformers does,
    and cut where the prompt's encoding ends (apart, should a merge cross the boundary)."""
    if template is None:
        return tokenizer.encode(prompt, bos=True, eos=False), tokenizer.encode(target, bos=False, eos=True)
    prompt_ids = tokenizer.encode(prompt, bos=False, specials=True)
    whole = tokenizer.encode(prompt + target, bos=False, specials=True)
    if whole[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, whole[len(prompt_ids) :]
    return prompt_ids, tokenizer.encode(target, bos=False, specials=True)
