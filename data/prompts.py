"""The prompt around every request: the Alpaca templates of the official code, or the base's own chat template.

Every prompt is built here from a ``Query`` (a message, optional context, earlier turns) by a ``PromptTemplate``:
the data readers for training (alpaca, scienceqa, coco, llava, the mix), the evaluations and the demo, so a model is
asked at inference exactly as it was trained. A run records which (``data.prompt_template``, and the chat template's
text in adapter.json).

- ``alpaca`` (the default): the two exact Alpaca templates of stanford_alpaca's train.py, reused verbatim by
  LLaMA-Adapter's fine-tuning code (the no-input one when the context is empty); a conversation is the Alpaca
  template with ``CHAT_INSTRUCTION`` and its turns as "User: / Assistant:" lines in the Input (``chat_prompt``, see
  data/llava.py); a ScienceQA prompt is its own layout as it is ("Question: ... Answer:", the official
  LLaMA-Adapter ScienceQA prompt). The target is the answer; the collator adds EOS.
- ``chat-template``: the conversation as {"role", "content"} messages rendered by the base's chat template
  (model/chat_template.py). The user message is the query's text, followed by its context after a blank line; a
  ScienceQA prompt is one user message. The target is what the template puts after the prompt for the answer, its
  end-of-turn tokens included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.chat_template import ChatTemplate, find_chat_template

PROMPT_TEMPLATES = ("alpaca", "chat-template")
"""The values of ``data.prompt_template``."""

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
CHAT_INSTRUCTION = "Reply to the last message of this conversation."
"""The instruction of an Alpaca chat prompt with earlier turns; the conversation is its Input."""
CHAT_MAX_TURNS = 256
"""Earlier turns a chat prompt holds at most, in training as in the demo's engine: the newest ones. Keeps the cost
of a conversation linear in its length (a 1,500-exchange record would otherwise repeat every turn 1,500 times)."""


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt: the with-input template when ``input`` is non-empty, else the no-input one."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def chat_prompt(history: Sequence[tuple[str, str]], message: str) -> str:
    """The Alpaca prompt answering ``message`` after the (user, assistant) turns of ``history``: the message alone
    is the instruction; after earlier turns the instruction is ``CHAT_INSTRUCTION`` and the Input holds the turns as
    "User: ... / Assistant: ..." lines, then "User: {message}" (an Alpaca adapter has only ever seen a single
    instruction with optional context)."""
    if not history:
        return format_prompt(message)
    lines = [f"User: {user}\nAssistant: {assistant}" for user, assistant in history]
    return format_prompt(CHAT_INSTRUCTION, "\n".join([*lines, f"User: {message}"]))


@dataclass(frozen=True)
class Query:
    """What a prompt asks: ``message`` after the (user, assistant) turns of ``history``, with ``context`` (Alpaca's
    Input). ``whole``: the message is a complete prompt in its task's own layout (ScienceQA's), used as it is by the
    Alpaca templates."""

    message: str
    context: str = ""
    history: tuple[tuple[str, str], ...] = ()
    whole: bool = False

    def messages(self) -> list[dict[str, str]]:
        """The query as chat messages: the earlier turns, then the message with its context after a blank line."""
        turns = [
            {"role": role, "content": text}
            for user, reply in self.history
            for role, text in (("user", user), ("assistant", reply))
        ]
        content = f"{self.message}\n\n{self.context}" if self.context else self.message
        return [*turns, {"role": "user", "content": content}]


@dataclass(frozen=True)
class PromptTemplate:
    """How queries become prompts: the Alpaca templates (``chat_template`` None) or a base's chat template."""

    chat_template: ChatTemplate | None = None

    @property
    def name(self) -> str:
        """``data.prompt_template``'s value for this template."""
        return "alpaca" if self.chat_template is None else "chat-template"

    def prompt(self, query: Query) -> str:
        """The text the model reads for ``query``; it continues with the answer."""
        if self.chat_template is not None:
            return self.chat_template.render(query.messages(), add_generation_prompt=True)
        if query.whole:
            return query.message
        if query.history:
            return chat_prompt(query.history, query.message)
        return format_prompt(query.message, query.context)

    def example(self, query: Query, answer: str) -> tuple[str, str]:
        """(prompt, target) of a training example answering ``query`` with ``answer``."""
        if self.chat_template is not None:
            return self.chat_template.reply(query.messages(), answer)
        return self.prompt(query), answer


ALPACA = PromptTemplate()


def template_of(model: Any) -> PromptTemplate:
    """The template a loaded model is prompted with: its run's chat template (``model.chat_template``) or Alpaca."""
    return PromptTemplate(getattr(model, "chat_template", None))


def log_fields(template: PromptTemplate) -> dict[str, str]:
    """What an evaluation's generation log records of the template: nothing for Alpaca (logs written before
    templates existed stay valid), the chat template's fingerprint otherwise."""
    return {} if template.chat_template is None else {"chat_template_sha256": template.chat_template.sha256}


def load_prompt_template(name: str, tokenizer_path: str | Path | None) -> PromptTemplate:
    """The template ``name`` (one of ``PROMPT_TEMPLATES``); "chat-template" reads the chat template beside the
    tokenizer at ``tokenizer_path`` (its file or folder), and is an error naming the folder when there is none."""
    if name not in PROMPT_TEMPLATES:
        raise ValueError(f"prompt template {name!r}: choose one of {', '.join(PROMPT_TEMPLATES)}")
    if name == "alpaca":
        return ALPACA
    if tokenizer_path is None:
        raise ValueError("prompt template 'chat-template' needs the base's tokenizer files; this run has no tokenizer")
    folder = Path(tokenizer_path)
    folder = folder if folder.is_dir() else folder.parent
    template = find_chat_template(folder)
    if template is None:
        raise ValueError(
            f"prompt template 'chat-template': {folder} holds no chat template (tokenizer_config.json's "
            '"chat_template" or chat_template.jinja). Base models and Meta-format folders have none: use a chat '
            "model's Hugging Face folder (e.g. Llama-2-7b-chat-hf) or --data.prompt_template alpaca"
        )
    return PromptTemplate(template)
