"""The demo's model engine: prompts for chat, captioning and ScienceQA-style questions, fitted to the context.

The engine knows nothing about Gradio: it takes plain text, images (paths or PIL images) and a conversation as a
list of ``Turn``, and returns a ``Reply`` whose iteration streams text pieces from ``model.generate.stream``. The
Gradio app (app/ui.py, its handlers app/handlers.py) only converts its message format, accumulates the pieces and
shows errors.

Prompts:

Every prompt is built by the run's ``PromptTemplate`` (data/prompts.py): the Alpaca templates below, or, for a run
trained with ``--data.prompt_template chat-template``, its base's chat template with the conversation as messages
(the reply then ends at the template's end-of-turn token, not at the Alpaca markers).

- Chat: one Alpaca prompt per answer (``data.prompts.format_prompt``, the template the instruction-tuned adapter was
  trained on). A first message is the instruction; after earlier turns the instruction asks for a reply to the
  conversation, which rides in the template's "Input" field as "User: ... / Assistant: ..." lines ending with the new
  message, since an Alpaca adapter has only ever seen a single instruction with optional context (``data.llava``
  trains image conversations in exactly this prompt). The image that conditions the answer is the one attached to
  the message, else the latest image of the conversation (the talk is usually about it).
- Caption: the COCO captioning prompt (``data.coco.caption_prompt``, LLaMA-Adapter V2's instruction).
- Question with choices: a ScienceQA problem in the run's prompt format (``data.scienceqa.build_prompt``, by default
  LLaMA-Adapter V1's "Question / Context / Choices / Answer:"). Without choices the question is an open instruction
  (Alpaca template, the context as input).

A reply ends at the template's markers (``CHAT_STOP``: any "###", the conversation's next "User:"). A model with a
visual path asked about "the picture" (``refers_to_image``) with no image to look at gets no prompt at all: a
``NoImageError`` says that no image is attached, rather than an answer about a picture nobody sent.

Context fitting: a prompt may use ``max_seq_len`` minus the tokens kept for the answer (``max_new_tokens``, at most
half the context). A chat first leaves out its oldest turns, then cuts the message itself; a question cuts its
context. Every cut is reported in ``Reply.notes`` so the user sees it; nothing is dropped silently.

Bounded work: whatever a client sends, a request tokenizes a bounded number of characters. Each text field is cut to
``MAX_MESSAGE_CHARS`` before it is tokenized; a conversation is read from its newest turn back, at most ``MAX_TURNS``
of them, and only while the turns kept stay within ``HISTORY_CHARS_PER_TOKEN`` characters per token of the prompt's
budget: an older turn that would pass that allowance is left out without being tokenized, so a megabyte of history
costs what an empty one does. Settings and texts are checked first (finite numbers, no lone surrogates) so a bad
value gets a message naming it, not an error from torch or the tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from app.inputs import NoImageError, cap_chars, checked_sampling, checked_text, has_text, refers_to_image
from data.coco import caption_prompt
from data.prompts import ALPACA, CHAT_INSTRUCTION, CHAT_MAX_TURNS, PromptTemplate, Query, format_prompt, template_of
from data.scienceqa import FORMATS, Problem, build_prompt
from model.chat_template import encode_prompt
from model.generate import stream
from model.visual import load_image

# Paper defaults (LLaMA-Adapter V1 and its example.py): temperature 0.1, top-p 0.75, 128 new tokens.
DEFAULT_TEMPERATURE = 0.1
DEFAULT_TOP_P = 0.75
DEFAULT_MAX_NEW_TOKENS = 128

MAX_CHOICES = 8
MAX_TURNS = CHAT_MAX_TURNS
"""Newest turns of a conversation considered for its prompt; older ones are left out (and said to be)."""
HISTORY_CHARS_PER_TOKEN = 8
"""Characters of earlier turns tokenized per token of the prompt's budget (English runs about 4 per token): a turn
beyond that allowance could hardly fit, so it is left out unread and the tokenizer's work stays bounded."""

# Where a reply would start a new section or turn of the template; an instruction-tuned model ends with EOS first, a
# weaker one runs on into a "### Response:" / "### Input:" / "### Instruction:" header of the Alpaca template (shown
# as a Markdown heading in the chat) or the conversation's next "User:" line, neither of which may reach the user.
CHAT_STOP = ("###", "\nUser:")
QUESTION_STOP = ("\nQuestion:",)

ImageInput = Image.Image | str | os.PathLike | None


@dataclass
class Turn:
    """One answered exchange of a conversation; ``image`` is the image attached to the user's message, if any."""

    user: str
    assistant: str
    image: str | os.PathLike | Image.Image | None = None


@dataclass
class Reply:
    """A streamed answer: iterate it for the text pieces (their concatenation is the answer).

    ``prompt`` is exactly what the model reads; ``notes`` say what was cut to make it fit (empty when nothing).
    """

    prompt: str
    pieces: Iterator[str]
    notes: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[str]:
        return self.pieces


def chat_prompt(history: Sequence[Turn], message: str, template: PromptTemplate = ALPACA) -> str:
    """The prompt answering ``message`` after the turns of ``history``: the prompt LLaVA-format conversations train
    (``data.llava``); with the Alpaca templates the turns ride in the Input field before the message."""
    return template.prompt(Query(message, history=tuple((turn.user, turn.assistant) for turn in history)))


def question_prompt(
    question: str,
    context: str = "",
    choices: Sequence[str] = (),
    fmt: str = "llama_adapter",
    template: PromptTemplate = ALPACA,
) -> str:
    """A ScienceQA problem prompt in format ``fmt`` when there are choices, else an open instruction (Alpaca: the
    context as its input)."""
    if not choices:
        return template.prompt(Query(question, context))
    problem = Problem(  # only the fields build_prompt reads matter; the rest describe a dataset record
        pid="demo", question=question, choices=list(choices), answer=0, hint=context, image_path=None, task="",
        grade="", subject="", topic="", category="", skill="", lecture="", solution="", split="demo",
    )  # fmt: skip
    return template.prompt(Query(build_prompt(problem, fmt), whole=True))


def with_chosen_option(pieces: Iterator[str], choices: Sequence[str]) -> Iterator[str]:
    """The streamed pieces, then the text of the option the answer names ("The answer is (A)" -> " red"), unless
    the answer already spells it out or names no valid option (parsed as eval.scienceqa scores it)."""
    from eval.scienceqa import parse_answer

    text = ""
    for piece in pieces:
        text += piece
        yield piece
    index = parse_answer(text, len(choices)).index
    if index >= 0 and choices[index] not in text:
        yield f" {choices[index]}"


def latest_image(history: Sequence[Turn]) -> str | os.PathLike | Image.Image | None:
    """The image of the most recent turn that has one."""
    return next((turn.image for turn in reversed(history) if turn.image is not None), None)


class Engine:
    """A loaded model (with ``model.tokenizer``) behind the three things the demo does: chat, caption, answer.

    question_format: the ScienceQA prompt format for questions with choices (a run trained on ScienceQA records its
    own in adapter.json). name: what the model is, shown in the app's header. about: what it was trained for and can
    do, shown under the header. compile: decode with the torch.compile'd step (model.generate; the first reply of
    each batch shape compiles).
    """

    def __init__(
        self,
        model: Any,
        *,
        question_format: str = "llama_adapter",
        name: str = "",
        about: str = "",
        compile: bool = False,
    ) -> None:
        if getattr(model, "tokenizer", None) is None:
            raise ValueError("the model has no tokenizer (model.tokenizer is None); load it with load_run / load_model")
        if question_format not in FORMATS:
            raise ValueError(f"unknown ScienceQA prompt format {question_format!r}; choose one of {', '.join(FORMATS)}")
        self.model = model
        self.tokenizer = model.tokenizer
        self.template = template_of(model)
        chat = self.template.chat_template is not None  # a chat template's turns end at its end-of-turn token
        self.chat_stop, self.question_stop = ((), ()) if chat else (CHAT_STOP, QUESTION_STOP)
        self.question_format = question_format
        self.name = name
        self.about = about
        self.compile = compile
        self.max_seq_len: int = model.max_tokens  # max_seq_len less what the method's soft tokens take

    @property
    def has_vision(self) -> bool:
        """Whether the model has a visual path (images condition its answers)."""
        return getattr(self.model, "visual", None) is not None

    def describe(self) -> str:
        """One line about the model for the app's header."""
        llama = self.model.config.llama
        visual = self.model.config.visual
        vision = f"CLIP {visual.clip_model} visual prompt" if visual is not None and self.has_vision else "text only"
        source = f"{self.name}: " if self.name else ""
        return (
            f"{source}LLaMA {llama.n_layers} layers, dim {llama.dim}, context {llama.max_seq_len} tokens; "
            f"{self.model.method.describe()}; {vision}"
        )

    # ---- the three tasks --------------------------------------------------------------------------------------
    def chat(
        self,
        history: Sequence[Turn],
        message: str,
        image: ImageInput = None,
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> Reply:
        """Answer ``message`` after the answered turns of ``history``; ``image`` (else the conversation's latest
        image) conditions the answer. Raises ValueError (readable) for an empty message, a bad image or bad
        settings, and ``NoImageError`` when a model with a visual path is asked about "the picture"
        (``refers_to_image``) with no image in the message or the conversation; an over-long conversation loses its
        oldest turns, then the message is cut (see ``Reply.notes``)."""
        temperature, top_p, max_new_tokens = checked_sampling(temperature, top_p, max_new_tokens)
        message = checked_text(message, "message").strip()
        if not message:
            raise ValueError("The message is empty: type a question or an instruction.")
        notes: list[str] = []
        message = cap_chars(message, "message", notes)
        recent = history[-MAX_TURNS:]
        turns = [turn for turn in recent if has_text(turn.user) and has_text(turn.assistant)]
        if image is None:
            image = latest_image(turns)
        if image is None:
            self._check_image_needed(message, "with your message (the button left of the textbox)")
        budget = self._prompt_budget(max_new_tokens)
        kept = self._fit_history(turns, message, budget)
        dropped = len(history) - len(recent) + len(turns) - len(kept)
        if dropped:
            left_out = "oldest turn of the conversation was" if dropped == 1 else f"{dropped} oldest turns were"
            notes.append(f"The {left_out} left out to fit the model's context ({self.max_seq_len} tokens).")
        message = self._fit(lambda m: chat_prompt(kept, m, self.template), message, budget, "message", notes)
        prompt = chat_prompt(kept, message, self.template)
        return self._reply(prompt, image, notes, self.chat_stop, temperature, top_p, max_new_tokens)

    def caption(
        self,
        image: ImageInput,
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> Reply:
        """Describe ``image`` (the COCO captioning prompt)."""
        temperature, top_p, max_new_tokens = checked_sampling(temperature, top_p, max_new_tokens)
        if image is None:
            raise ValueError("Upload an image to caption.")
        prompt = caption_prompt(self.template)
        return self._reply(prompt, image, [], self.chat_stop, temperature, top_p, max_new_tokens)

    def answer(
        self,
        question: str,
        image: ImageInput = None,
        context: str = "",
        choices: Sequence[str] = (),
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> Reply:
        """Answer ``question`` about ``image`` (optional), with an optional textual context and multiple-choice
        options (2 to MAX_CHOICES, ScienceQA style: the answer names a letter). An over-long context is cut. A
        question (or context) about "the picture" needs an image when the model has a visual path (``NoImageError``)."""
        temperature, top_p, max_new_tokens = checked_sampling(temperature, top_p, max_new_tokens)
        question = checked_text(question, "question").strip()
        if not question:
            raise ValueError("The question is empty: type what you want to know about the image.")
        choices = [c.strip() for c in (checked_text(c, "choice") for c in choices) if c.strip()]
        if len(choices) == 1 or len(choices) > MAX_CHOICES:
            raise ValueError(f"Give 2 to {MAX_CHOICES} choices (one per line), or none; got {len(choices)}.")
        notes: list[str] = []
        question = cap_chars(question, "question", notes)
        context = cap_chars(checked_text(context, "context").strip(), "context", notes)
        if image is None:
            self._check_image_needed(f"{question}\n{context}", "in the Image box")
        choices = [cap_chars(c, f"choice {letter}", notes) for letter, c in zip("ABCDEFGH", choices)]
        stop = self.question_stop if choices else self.chat_stop
        budget = self._prompt_budget(max_new_tokens)

        def build(ctx: str) -> str:
            return question_prompt(question, ctx, choices, self.question_format, self.template)

        context = self._fit(build, context, budget, "context", notes)
        reply = self._reply(build(context), image, notes, stop, temperature, top_p, max_new_tokens)
        if choices:
            reply.pieces = with_chosen_option(reply.pieces, choices)
        return reply

    # ---- helpers ------------------------------------------------------------------------------------------------
    def _check_image_needed(self, text: str, where: str) -> None:
        """``NoImageError`` when a model with a visual path gets ``text`` about an image but no image (a text-only
        model's answer never depends on one, so it is not asked for)."""
        reference = refers_to_image(text) if self.has_vision else None
        if reference is not None:
            raise NoImageError(
                f"No image is attached, but the question asks about {reference!r}: attach the image {where} and ask "
                "again (a question that does not refer to an image is answered without one)."
            )

    def _n_tokens(self, prompt: str) -> int:
        return len(encode_prompt(self.tokenizer, prompt, self.template.chat_template))

    def _prompt_budget(self, max_new_tokens: int) -> int:
        """Tokens a prompt may use: the context minus room for the answer (at most half, so that a large
        ``max_new_tokens`` still leaves room to ask)."""
        return self.max_seq_len - min(max(max_new_tokens, 1), self.max_seq_len // 2)

    def _fit_history(self, turns: Sequence[Turn], message: str, budget: int) -> list[Turn]:
        """The newest ``turns`` that fit ``budget`` tokens in the chat prompt with ``message`` (none when the message
        alone fills it). Read from the newest back, stopping at the first turn that does not fit, so what is kept
        is the end of the conversation. A turn is tokenized only when it stays within the history's character
        allowance (``HISTORY_CHARS_PER_TOKEN`` per token of ``budget``): the work does not grow with the turns."""
        chars_left = HISTORY_CHARS_PER_TOKEN * budget
        alone = (  # the prompt without turns (Alpaca: in the form it takes once there are some)
            format_prompt(CHAT_INSTRUCTION, f"User: {message}")
            if self.template.chat_template is None
            else chat_prompt([], message, self.template)
        )
        tokens_left = budget - self._n_tokens(alone)
        kept: list[Turn] = []
        for turn in reversed(turns):
            n_chars = len("User: \nAssistant: \n") + len(turn.user) + len(turn.assistant)
            if tokens_left <= 0 or n_chars > chars_left:
                break
            user, assistant = checked_text(turn.user, "earlier message"), checked_text(turn.assistant, "earlier answer")
            n_tokens = len(self.tokenizer.encode(f"User: {user}\nAssistant: {assistant}\n", bos=False))
            if n_tokens > tokens_left:
                break
            kept.append(turn)
            chars_left, tokens_left = chars_left - n_chars, tokens_left - n_tokens
        kept.reverse()
        while kept and self._n_tokens(chat_prompt(kept, message)) > budget:  # tokens can merge across the joins
            kept = kept[1:]
        return kept

    def _fit(self, build: Callable[[str], str], text: str, budget: int, what: str, notes: list[str]) -> str:
        """``text`` cut at a token boundary so that ``build(text)`` fits ``budget`` tokens (a note says so)."""
        if self._n_tokens(build(text)) <= budget:
            return text
        ids = self.tokenizer.encode(text, bos=False, eos=False)
        keep = budget - self._n_tokens(build(""))
        while keep > 0:
            cut = self.tokenizer.decode(ids[:keep])
            excess = self._n_tokens(build(cut)) - budget
            if excess <= 0:
                notes.append(
                    f"Your {what} was cut to its first {keep} of {len(ids)} tokens to fit the model's context "
                    f"({self.max_seq_len} tokens, {self.max_seq_len - budget} of them kept for the answer)."
                )
                return cut
            keep -= excess  # tokens can merge across the cut, so re-check rather than trust the arithmetic
        raise ValueError(
            f"The prompt does not fit the model's context of {self.max_seq_len} tokens even without the {what}; "
            "lower 'max new tokens' or shorten the other fields."
        )

    def _load(self, image: ImageInput) -> Image.Image | None:
        if image is None:
            return None
        if not self.has_vision:
            raise ValueError("This model is text only (it has no visual path): send the message without an image.")
        if isinstance(image, Image.Image):
            return image
        return load_image(Path(image))

    def _reply(
        self,
        prompt: str,
        image: ImageInput,
        notes: list[str],
        stop: Sequence[str],
        temperature: float,
        top_p: float,
        max_new_tokens: int,
    ) -> Reply:
        pieces = stream(
            self.model,
            prompt,
            self._load(image),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=list(stop),
            compile=self.compile,
        )
        return Reply(prompt=prompt, pieces=pieces, notes=notes)
