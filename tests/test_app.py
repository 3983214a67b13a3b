"""app/: the engine's prompts and context fitting, and the Gradio app served for real and driven by gradio_client."""

import json
import os
import random
import shutil
import stat
import threading
import warnings
from contextlib import closing
from itertools import islice
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
import torch
from gradio.route_utils import delete_files_created_by_app
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import model.generate as model_generate
from app.__main__ import build_parser as app_parser
from app.__main__ import choose_run, load_engine, main
from app.engine import (
    CHAT_STOP,
    HISTORY_CHARS_PER_TOKEN,
    Engine,
    Reply,
    Turn,
    chat_prompt,
    question_prompt,
    with_chosen_option,
)
from app.inputs import MAX_MESSAGE_CHARS, NoImageError, refers_to_image
from app.messages import (
    MAX_HISTORY_MESSAGES,
    MAX_PASTE_CHARS,
    accumulate,
    format_error,
    format_notes,
    is_error_reply,
    strip_notes,
    to_turns,
)
from app.ui import ASSETS, DELETE_CACHE, MODEL_QUEUE, SESSION_CAPACITY, build_demo, launch
from app.uploads import files_under
from data.prompts import format_prompt
from model.checkpoint import save_adapter
from model.config import VisualConfig, preset
from model.generate import generate
from model.llama import Transformer
from model.tokenizer import load_tokenizer
from model.visual import ImageLoadError, build_visual, load_image
from tests.conftest import train_spm

WORDS = "the cat sat on a mat while dogs ran fast over green hills and blue water what color is ball picture".split()
# Gradio's queue statistics call pandas options that pandas 3 deprecates: not ours to fix, not worth the noise.
QUIET_GRADIO = pytest.mark.filterwarnings(
    "ignore:'future.no_silent_downcasting' is deprecated", "ignore:The copy keyword is deprecated"
)
pytestmark = [QUIET_GRADIO, pytest.mark.usefixtures("one_thread")]
RED = ASSETS / "red_circle.png"
GREEN = ASSETS / "small_green_square.png"
GREEDY = (0.0, 0.75, 12)  # temperature, top_p, max_new_tokens: deterministic, so answers compare exactly


def train_tokenizer(folder: Path) -> Path:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    lines += [format_prompt(line, line) + line for line in lines[:50]]  # the template's words get pieces of their own
    return train_spm(lines, folder / "tokenizer", 512)


def make_model(tokenizer_path: Path, *, visual: bool = True, max_seq_len: int = 256) -> Transformer:
    """A tiny random model whose adapter matters: non-zero gates and a scaled-up visual projection (as if trained)."""
    tokenizer = load_tokenizer(tokenizer_path)
    torch.manual_seed(1)
    cfg = preset("tiny")
    cfg.llama.vocab_size, cfg.llama.max_seq_len = tokenizer.vocab_size, max_seq_len
    cfg.visual = VisualConfig(clip_model="tiny") if visual else None
    model = Transformer(cfg, visual=build_visual(cfg.visual, cfg.llama.dim) if visual else None).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adapter_gate"):
                p.copy_(torch.randn(p.shape, generator=g))
        if visual:
            model.visual.adapter_proj[2].weight.mul_(10)
    model.tokenizer = tokenizer
    return model


def make_engine(folder: Path, **kwargs) -> Engine:
    return Engine(make_model(train_tokenizer(folder), **kwargs), name="tiny test model")


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    return make_engine(tmp_path_factory.mktemp("tok"))


def answer(reply) -> str:
    return "".join(reply)


MIDWAY_FAILURE = "the model failed mid-answer, as a test makes it"


def fail_midway(engine: Engine, monkeypatch: pytest.MonkeyPatch, after: int = 2) -> None:
    """Make ``engine``'s replies stream ``after`` pieces, then raise a RuntimeError: a model failing as it decodes."""
    start = engine._reply

    def failing_pieces(pieces):
        with closing(pieces):  # what it wraps ends with it, as a stream that raised would
            yield from islice(pieces, after)
            raise RuntimeError(MIDWAY_FAILURE)

    def failing_reply(*args, **kwargs):
        reply = start(*args, **kwargs)
        reply.pieces = failing_pieces(reply.pieces)
        return reply

    monkeypatch.setattr(engine, "_reply", failing_reply)


def bad_files(folder: Path) -> dict[str, Path]:
    """What users upload by mistake: a text file named .png, and a PNG cut off halfway."""
    folder.mkdir(parents=True, exist_ok=True)
    not_image = folder / "notes.png"
    not_image.write_bytes(b"these are my notes, not a picture\n")
    photo = folder / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(photo)
    truncated = folder / "truncated.png"
    truncated.write_bytes(photo.read_bytes()[: photo.stat().st_size // 2])
    return {"not_image": not_image, "truncated": truncated}


# ---- engine: prompts ----------------------------------------------------------------------------------------------
def test_chat_prompt_carries_the_conversation_in_the_alpaca_input_ending_with_the_new_message():
    history = [Turn("hi there", "hello"), Turn("what is red", "a color")]
    assert chat_prompt([], "the cat") == format_prompt("the cat")
    assert chat_prompt(history, "and blue?") == format_prompt(
        "Reply to the last message of this conversation.",
        "User: hi there\nAssistant: hello\nUser: what is red\nAssistant: a color\nUser: and blue?",
    )
    assert chat_prompt(history, "and blue?").endswith("User: and blue?\n\n### Response:")


def test_question_prompt_with_choices_is_scienceqa_without_is_alpaca():
    assert question_prompt("What color is the ball?", "", ["red", "blue"]) == (
        "Question: What color is the ball?\nContext: N/A\nChoices: (A) red (B) blue\nAnswer:"
    )
    assert question_prompt("What color?", "A ball.", ["red", "blue"], "QCM-A") == (
        "Question: What color?\nContext: A ball.\nOptions: (A) red (B) blue\nAnswer:"
    )
    assert question_prompt("What color is the ball?", "A ball.") == format_prompt("What color is the ball?", "A ball.")


def test_chat_streams_what_generate_returns_and_the_image_conditions_it(engine):
    message = "what color is the ball"
    for image in (None, RED):
        reply = engine.chat([], message, image, *GREEDY)
        assert reply.prompt == format_prompt(message) and reply.notes == []
        pieces = list(reply)
        expected = generate(
            engine.model, reply.prompt, load_image(image) if image else None, temperature=0, max_new_tokens=12,
            stop=list(CHAT_STOP),
        )  # fmt: skip
        assert len(pieces) > 1 and "".join(pieces) == expected
    red, green = answer(engine.chat([], message, RED, *GREEDY)), answer(engine.chat([], message, GREEN, *GREEDY))
    assert red != green != answer(engine.chat([], message, None, *GREEDY))


def test_chat_keeps_the_conversation_image_and_drops_unanswered_turns(engine):
    message = "what color is the ball"
    history = [Turn("look at this", "a picture", image=RED), Turn("failed request", "")]
    follow_up = engine.chat(history, message, None, *GREEDY)
    assert follow_up.prompt == chat_prompt([Turn("look at this", "a picture")], message)
    assert answer(follow_up) == answer(engine.chat(history[:1], message, RED, *GREEDY))
    assert answer(follow_up) != answer(engine.chat([Turn("look at this", "a picture")], message, None, *GREEDY))
    new_image = engine.chat(history, message, GREEN, *GREEDY)  # an image on the new message wins
    assert new_image.prompt == follow_up.prompt and answer(new_image) != answer(follow_up)


def test_answer_and_caption_prompts(engine):
    reply = engine.answer("What color is the ball?", RED, "", ["red", "blue", "", " green "], *GREEDY)
    assert (
        reply.prompt == "Question: What color is the ball?\nContext: N/A\nChoices: (A) red (B) blue (C) green\nAnswer:"
    )
    generated = generate(
        engine.model, reply.prompt, load_image(RED), temperature=0, max_new_tokens=12, stop=["\nQuestion:"]
    )
    assert answer(reply) == "".join(with_chosen_option(iter([generated]), ["red", "blue", "green"]))
    caption = engine.caption(RED, *GREEDY)
    assert caption.prompt == format_prompt("Generate caption of this image")
    assert answer(caption) == generate(engine.model, caption.prompt, load_image(RED), temperature=0, max_new_tokens=12,
                                       stop=list(CHAT_STOP))  # fmt: skip


def test_an_answer_shows_the_option_it_chooses():
    def shown(*pieces: str) -> str:
        return "".join(with_chosen_option(iter(pieces), ["red", "blue", "green"]))

    assert shown("The answer ", "is (A)") == "The answer is (A) red"
    assert shown("The answer is B.") == "The answer is B. blue"
    assert shown("The answer is (C) green") == "The answer is (C) green"  # already spelled out
    assert shown("The answer is (D)") == "The answer is (D)"  # no such option: left as it is
    assert shown("I do not know") == "I do not know"


def scripted(monkeypatch: pytest.MonkeyPatch, continuation: str) -> None:
    """Make every model "decode" ``continuation`` token by token, then EOS: what a weak model writes. In the pieces
    of the shipped demo base's tokenizer, which keeps line breaks (the test tokenizer reads them as spaces)."""
    tokenizer = load_tokenizer(Path(__file__).resolve().parents[1] / "assets" / "tiny-demo-base" / "tokenizer.model")
    ids = [*tokenizer.encode(continuation, bos=False, eos=False), tokenizer.eos_id]

    def start(model, prompts, images, *args):
        return tokenizer, (torch.tensor([i]) for i in ids), [tokenizer.eos_id]

    monkeypatch.setattr(model_generate, "_start", start)


@pytest.mark.parametrize(
    "continuation, shown",
    [
        ("The shape is red.\n\n### Response: It is big", "The shape is red.\n\n"),
        ("It is big.\n\n### Input:\nUser: and then", "It is big.\n\n"),
        ("It is big.### Instruction:\nReply", "It is big."),
        ("It is big.\nUser: what else", "It is big."),
        ("No marker: # one hash, ## two hashes", "No marker: # one hash, ## two hashes"),
    ],
)
def test_a_chat_reply_stops_at_the_templates_markers(engine, monkeypatch, continuation, shown):
    """From the third turn the tiny default runs on into the Alpaca template's own headers ("### Response:"), which
    the chat would render as Markdown headings: every "###" ends the reply, as does the conversation's next line."""
    scripted(monkeypatch, continuation)
    history = [Turn("what color is the ball", "red", image=RED), Turn("is it big", "it is big")]
    assert answer(engine.chat(history, "and the size", None, *GREEDY)) == shown
    assert answer(engine.caption(RED, *GREEDY)) == shown


def test_refers_to_image_finds_definite_references_to_a_picture():
    asks = {
        "What color is the shape in the picture?": "the shape",
        "Is the shape big or small?": "the shape",
        "Describe the picture.": "the picture",
        "Please introduce this painting.": "this painting",
        "How big is the red shape?": "the red shape",
        "what is in my photo": "my photo",
        "Caption the attached image": "the attached image",
    }
    for text, words in asks.items():
        assert refers_to_image(text) == words, text
    for text in ("Tell me about alpacas.", "What is a shape?", "What is the shape of the earth?", "Draw a picture"):
        assert refers_to_image(text) is None, text


def test_a_question_about_the_picture_without_one_says_no_image_is_attached(engine, tmp_path):
    question = "What color is the shape in the picture?"
    with pytest.raises(NoImageError) as chat_error:
        engine.chat([], question, None)
    assert str(chat_error.value) == (
        "No image is attached, but the question asks about 'the shape': attach the image with your message (the "
        "button left of the textbox) and ask again (a question that does not refer to an image is answered without "
        "one)."
    )
    with pytest.raises(NoImageError, match=r"asks about 'the picture': attach the image in the Image box and ask"):
        engine.answer("Describe the picture.", None, "", ["red", "blue"])
    with pytest.raises(NoImageError, match="asks about 'the picture'"):
        engine.answer("Which color?", None, "Look at the picture.", ["red", "blue"])  # the context counts too
    # with an image, attached or earlier in the conversation, it is answered about that image
    follow_up = engine.chat([Turn("look at this", "a picture", image=RED)], question, None, *GREEDY)
    assert answer(follow_up) == answer(engine.chat([Turn("look at this", "a picture")], question, RED, *GREEDY))
    assert engine.answer(question, RED, "", ["red", "blue"]).prompt.startswith("Question: What color is the shape")
    # a question that needs no image, and any question to a text-only model, is answered as before
    assert engine.chat([], "Tell me about alpacas.", None).prompt == format_prompt("Tell me about alpacas.")
    assert engine.answer("What is a shape?", None, "", ["a form", "a cat"]).prompt.startswith("Question: What is")
    text_only = make_engine(tmp_path, visual=False)
    assert text_only.chat([], question, None).prompt == format_prompt(question)


# ---- engine: bad input --------------------------------------------------------------------------------------------
def test_engine_rejects_bad_input_with_readable_errors(engine, tmp_path):
    bad = bad_files(tmp_path)
    with pytest.raises(ValueError, match="message is empty"):
        engine.chat([], "  \n ", None)
    with pytest.raises(ImageLoadError, match="notes.png is not an image file"):
        engine.chat([], "what is this", bad["not_image"])
    with pytest.raises(ImageLoadError, match="truncated.png is truncated or corrupt"):
        engine.caption(bad["truncated"])
    with pytest.raises(FileNotFoundError, match="gone.png"):
        engine.caption(tmp_path / "gone.png")
    with pytest.raises(ValueError, match="Upload an image to caption"):
        engine.caption(None)
    with pytest.raises(ValueError, match="Give 2 to 8 choices"):
        engine.answer("which?", None, "", ["only one"])
    with pytest.raises(ValueError, match="top_p must be in"):
        engine.chat([], "hi", None, 0.1, 0.0, 8)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        engine.chat([], "hi", None, 0.1, 0.75, 0)


def test_text_only_model_refuses_images(tmp_path):
    engine = make_engine(tmp_path, visual=False)
    assert not engine.has_vision and "text only" in engine.describe()
    with pytest.raises(ValueError, match="text only"):
        engine.chat([], "what is this", RED)
    assert answer(engine.chat([], "the cat", None, *GREEDY)) == generate(
        engine.model, format_prompt("the cat"), temperature=0, max_new_tokens=12, stop=list(CHAT_STOP)
    )


def test_engine_needs_a_tokenizer_and_a_known_format(engine):
    tokenizer = engine.model.tokenizer
    with pytest.raises(ValueError, match="unknown ScienceQA prompt format 'QCM'"):
        Engine(engine.model, question_format="QCM")
    engine.model.tokenizer = None
    try:
        with pytest.raises(ValueError, match="no tokenizer"):
            Engine(engine.model)
    finally:
        engine.model.tokenizer = tokenizer


# ---- engine: fitting the context ------------------------------------------------------------------------------------
def n_tokens(engine: Engine, text: str) -> int:
    return len(engine.tokenizer.encode(text, bos=True))


def test_long_conversation_loses_its_oldest_turns_first(engine):
    long_turn = Turn(" ".join(["the cat sat on a mat"] * 8), " ".join(["dogs ran fast"] * 8))
    history = [Turn("first question", "first answer"), *[long_turn] * 5, Turn("last question", "last answer")]
    reply = engine.chat(history, "what now", None, 0.1, 0.75, 64)  # budget 256 - 64 = 192 tokens
    assert n_tokens(engine, reply.prompt) <= 192
    kept = reply.prompt.split("### Input:\n")[1]
    assert "first question" not in kept and kept.count("User: the cat") < 5 and "User: last question" in kept
    assert kept.endswith("User: what now\n\n### Response:")
    dropped = 7 - kept.count("Assistant: ")
    assert reply.notes == [f"The {dropped} oldest turns were left out to fit the model's context (256 tokens)."]


def test_long_message_is_cut_with_a_note(engine):
    message = " ".join(WORDS * 40)
    reply = engine.chat([Turn("hi", "hello")], message, None, 0.1, 0.75, 200)  # 200 > half: 128 kept for the answer
    assert n_tokens(engine, reply.prompt) <= 128
    instruction = reply.prompt.split("### Instruction:\n")[1].split("\n\n### Response:")[0]
    assert reply.prompt == format_prompt(instruction) and message.startswith(instruction)
    total = len(engine.tokenizer.encode(message, bos=False))
    assert reply.notes[0] == "The oldest turn of the conversation was left out to fit the model's context (256 tokens)."
    assert reply.notes[1].startswith("Your message was cut to its first ") and f"of {total} tokens" in reply.notes[1]
    assert len(answer(reply)) > 0


def test_megabyte_paste_is_cut_to_characters_first(engine):
    reply = engine.answer("what color", None, "red " * 300_000, ["red", "blue"], 0.1, 0.75, 8)
    assert reply.notes[0] == "Your context was cut to its first 16,000 of 1,199,999 characters."
    assert reply.notes[1].startswith("Your context was cut to its first ")
    assert n_tokens(engine, reply.prompt) <= 256 - 8


def count_encoded(engine: Engine, monkeypatch) -> list[int]:
    """The length of every text the engine's tokenizer encodes from now on, one entry per call, in order."""
    encoded: list[int] = []
    encode = engine.tokenizer.encode

    def counting(text, *args, **kwargs):
        encoded.append(len(text))
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "encode", counting)
    return encoded


MEGABYTE_TURN = Turn("the cat sat on a mat " * 50_000, "dogs ran fast over green hills " * 34_000)  # 1 MB each side


def test_megabyte_history_costs_what_an_empty_one_does(engine, monkeypatch):
    """16 turns of 1 MB from a client: nothing of them is tokenized (they took 33 s per request before)."""
    encoded = count_encoded(engine, monkeypatch)
    empty = engine.chat([], "what now", None, *GREEDY)
    empty_encoded = encoded.copy()
    encoded.clear()
    reply = engine.chat([MEGABYTE_TURN] * 16, "what now", None, *GREEDY)
    assert encoded == empty_encoded and max(encoded) < 1_000  # the same texts: templates around "what now"
    assert reply.prompt == empty.prompt == format_prompt("what now")
    assert reply.notes == ["The 16 oldest turns were left out to fit the model's context (256 tokens)."]


def test_history_is_read_from_the_newest_turn_within_its_character_allowance(engine, monkeypatch):
    encoded = count_encoded(engine, monkeypatch)
    recent = [Turn(f"question {i} " + "the cat sat on a mat " * 4, "an answer about dogs " * 4) for i in range(20)]
    short = engine.chat(recent, "what now", None, *GREEDY)
    short_encoded = encoded.copy()
    encoded.clear()
    long = engine.chat([MEGABYTE_TURN] * 16 + recent, "what now", None, *GREEDY)
    assert encoded == short_encoded and long.prompt == short.prompt  # the old megabytes cost nothing
    budget = 256 - GREEDY[2]
    assert (
        sum(encoded) - 3 * len(long.prompt) <= HISTORY_CHARS_PER_TOKEN * budget
        and n_tokens(engine, long.prompt) <= budget
    )
    kept = long.prompt.count("User: question ")
    assert 0 < kept < 20 and "User: question 19 " in long.prompt and f"User: question {19 - kept} " not in long.prompt
    assert long.notes == [f"The {36 - kept} oldest turns were left out to fit the model's context (256 tokens)."]


def test_bad_settings_and_texts_get_errors_naming_them(engine):
    """What a hostile client sends: NaN / infinite / string settings, lone surrogates (half a UTF-16 pair)."""
    cases = [
        (lambda: engine.chat([], "hi", None, float("nan"), 0.75, 8), "temperature must be a finite number, got nan"),
        (lambda: engine.chat([], "hi", None, float("-inf"), 0.75, 8), "temperature must be a finite number, got -inf"),
        (lambda: engine.chat([], "hi", None, "abc", 0.75, 8), "temperature must be a number, got str 'abc'"),
        (lambda: engine.chat([], "hi", None, -1, 0.75, 8), r"temperature must be >= 0 \(0 = greedy\), got -1.0"),
        (lambda: engine.caption(RED, 0.1, float("nan"), 8), "top_p must be a finite number, got nan"),
        (lambda: engine.answer("q", None, "", [], 0.1, 0.75, float("inf")), "max_new_tokens must be a finite number"),
        (lambda: engine.answer("q", None, "", [], 0.1, 0.75, 2.5), "max_new_tokens must be a whole number, got 2.5"),
        (lambda: engine.chat([], 5, None), "The message must be text, got int 5."),
        (lambda: engine.chat([], "hi\ud800 there", None),
         r"The message holds an invalid character at position 2: U\+D800 is half of a UTF-16 surrogate pair"),
        (lambda: engine.chat([Turn("fine", "ok\udfff")], "hi", None),
         r"The earlier answer holds an invalid character at position 2: U\+DFFF"),
        (lambda: engine.answer("what\ud800", None), "The question holds an invalid character at position 4"),
        (lambda: engine.answer("what", None, "\udc00"), "The context holds an invalid character at position 0"),
        (lambda: engine.answer("what", None, "", ["red", "bl\ud800ue"]),
         "The choice holds an invalid character at position 2"),
    ]  # fmt: skip
    for call, message in cases:
        with pytest.raises(ValueError, match=f"^{message}"):
            call()
    assert answer(engine.chat([], "the cat", None, *GREEDY)) == generate(
        engine.model, format_prompt("the cat"), temperature=0, max_new_tokens=12, stop=list(CHAT_STOP)
    )


# ---- the Gradio message format --------------------------------------------------------------------------------------
def test_to_turns_reads_both_history_shapes_and_strips_notes():
    history = [
        {"role": "user", "content": [{"path": "/tmp/a.png"}, "what is this"]},  # what gradio_client calls send
        {"role": "assistant", "content": format_notes(["cut"]) + "a red ball"},
        {"role": "user", "content": [{"type": "file", "file": {"path": "/tmp/b.png"}}]},  # the browser: file, then text
        {"role": "user", "content": [{"type": "text", "text": "and this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a blue square"}]},
        {"role": "user", "content": "unanswered"},
    ]
    assert to_turns(history) == [
        Turn("what is this", "a red ball", "/tmp/a.png"),
        Turn("and this?", "a blue square", "/tmp/b.png"),
    ]
    assert strip_notes(format_notes(["one", "two"]) + "answer *with* stars") == "answer *with* stars"


def test_to_turns_forgets_failed_submissions():
    history = [
        {"role": "user", "content": [{"path": "/tmp/corrupt.png"}]},  # rejected: not an image
        {"role": "user", "content": ["what is this"]},
        {"role": "user", "content": ["what about this"]},  # answered
        {"role": "assistant", "content": "no idea"},
        {"role": "user", "content": [{"path": "/tmp/ok.png"}]},  # an image sent alone (rejected: no text), then
        {"role": "user", "content": ["describe it"]},  # its question: the image belongs to the question
        {"role": "assistant", "content": "a square"},
    ]
    assert to_turns(history) == [
        Turn("what about this", "no idea", None),
        Turn("describe it", "a square", "/tmp/ok.png"),
    ]


def test_to_turns_forgets_exchanges_that_ended_in_an_error():
    """A reply ending with an error (the browser's chat shows it so) is no answer: neither the part streamed before
    the error nor the submission (its image included) reaches the model."""
    history = [
        {"role": "user", "content": [{"path": "/tmp/a.png"}, "what is this"]},
        {"role": "assistant", "content": "a red ball"},
        {"role": "user", "content": [{"path": "/tmp/b.png"}, "and this?"]},
        {"role": "assistant", "content": "a blue sq\n\n" + format_error("The answer failed (RuntimeError: boom).")},
        {"role": "user", "content": ["is it red"]},
        {"role": "assistant", "content": format_notes(["cut"]) + format_error("image file not found: a.png")},
        {"role": "user", "content": ["is it round"]},
        {"role": "assistant", "content": [{"type": "text", "text": format_error("The message is empty.")}]},
        {"role": "user", "content": ["what now"]},
        {"role": "assistant", "content": "an answer that mentions **Error:** in passing\nand goes on"},
    ]
    assert to_turns(history) == [
        Turn("what is this", "a red ball", "/tmp/a.png"),
        Turn("what now", "an answer that mentions **Error:** in passing\nand goes on", None),
    ]
    assert format_error("two\nlines,   spaced") == "**Error:** two lines, spaced"


def test_to_turns_reads_only_the_newest_messages():
    history = [{"role": role, "content": f"{role} {i}"} for i in range(10_000) for role in ("user", "assistant")]
    assert to_turns(history) == [
        Turn(f"user {i}", f"assistant {i}") for i in range(10_000 - MAX_HISTORY_MESSAGES // 2, 10_000)
    ]


def test_replies_stream_as_growing_text_with_notes_first():
    streamed = list(accumulate(Reply("prompt", iter(["The ans", "wer is", " (A)"]), ["cut"])))
    assert streamed == [
        "*Note: cut*\n\n",
        *(f"*Note: cut*\n\n{t}" for t in ("The ans", "The answer is", "The answer is (A)")),
    ]
    assert list(accumulate(Reply("prompt", iter([" "]), []))) == [
        " ",
        " *Note: The model gave an empty answer (it stopped at once).*\n\n",
    ]


# ---- the app, served ------------------------------------------------------------------------------------------------
class CountingEngine(Engine):
    """Counts generations running at the same time (the model must answer one request at a time)."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.lock, self.active, self.max_active, self.started = threading.Lock(), 0, 0, 0

    def _reply(self, *args, **kwargs):
        reply = super()._reply(*args, **kwargs)
        reply.pieces = self._count(reply.pieces)
        return reply

    def _count(self, pieces):
        with self.lock:
            self.active, self.started = self.active + 1, self.started + 1
            self.max_active = max(self.max_active, self.active)
        try:
            yield from pieces
        finally:
            with self.lock:
                self.active -= 1


@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    """The app launched as `python -m app` launches it (upload limit lowered to 100 KB), on a free local port."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        counting = CountingEngine(engine.model, name="tiny test model")
        demo = build_demo(counting)
        _, url, share_url = launch(demo, port=None, prevent_thread_lock=True, quiet=True, max_file_size="100kb")
        assert url.startswith("http://127.0.0.1:") and share_url is None
        yield demo, url, counting
        demo.close()


@pytest.fixture
def client(served):
    c = Client(served[1], verbose=False)
    yield c
    c.close()


def test_chat_streams_text_and_carries_the_conversation(served, client, engine):
    job = client.submit({"text": "the cat sat on a mat", "files": []}, *GREEDY, api_name="/chat")
    first = job.result(timeout=60)
    partial = job.outputs()
    assert first == answer(engine.chat([], "the cat sat on a mat", None, *GREEDY)) and partial[-1] == first
    assert len(partial) > 2 and all(b.startswith(a) for a, b in zip(partial, partial[1:]))
    second = client.predict({"text": "and the dogs", "files": []}, *GREEDY, api_name="/chat")
    assert second == answer(engine.chat([Turn("the cat sat on a mat", first)], "and the dogs", None, *GREEDY))


def test_chat_with_an_image_and_a_follow_up_about_it(client, engine):
    message = {"text": "what color is the ball", "files": [handle_file(RED)]}
    first = client.predict(message, *GREEDY, api_name="/chat")
    assert first == answer(engine.chat([], "what color is the ball", RED, *GREEDY))
    assert first != answer(engine.chat([], "what color is the ball", None, *GREEDY))
    follow_up = client.predict({"text": "is it red", "files": []}, *GREEDY, api_name="/chat")
    history = [Turn("what color is the ball", first, image=RED)]
    assert follow_up == answer(engine.chat(history, "is it red", None, *GREEDY))


def test_image_tab_caption_and_question(client, engine):
    caption = client.predict(handle_file(RED), *GREEDY, api_name="/caption")
    assert caption == answer(engine.caption(RED, *GREEDY))
    question = "What color is the ball in the picture?"
    choices = "red\ngreen\nblue\nyellow"
    job = client.submit(handle_file(RED), question, "", choices, *GREEDY, api_name="/answer")
    result = job.result(timeout=60)
    assert result == answer(engine.answer(question, RED, "", ["red", "green", "blue", "yellow"], *GREEDY))
    assert len(job.outputs()) > 1
    open_question = client.predict(None, "what is a cat", "", "", *GREEDY, api_name="/answer")
    assert open_question == answer(engine.answer("what is a cat", None, "", [], *GREEDY))


def test_bad_requests_get_readable_errors_and_the_server_keeps_serving(client, engine, tmp_path):
    bad = bad_files(tmp_path)
    with pytest.raises(AppError, match=r"^notes\.png is not an image file Pillow can read$"):
        client.predict({"text": "what is this", "files": [handle_file(bad["not_image"])]}, *GREEDY, api_name="/chat")
    with pytest.raises(AppError, match=r"^image file truncated\.png is truncated or corrupt"):
        client.predict({"text": "what is this", "files": [handle_file(bad["truncated"])]}, *GREEDY, api_name="/chat")
    with pytest.raises(AppError, match=r"^notes\.png is not an image file Pillow can read$"):
        client.predict(handle_file(bad["not_image"]), *GREEDY, api_name="/caption")
    with pytest.raises(AppError, match=r"^notes\.png is not an image file Pillow can read$"):
        client.predict(handle_file(bad["not_image"]), "what is it", "", "", *GREEDY, api_name="/answer")
    with pytest.raises(AppError, match="The message is empty"):
        client.predict({"text": "   ", "files": []}, *GREEDY, api_name="/chat")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(AppError, match=r"^notes\.txt is a text file, and the chat reads images only \(the browser"):
        client.predict({"text": "read this", "files": [handle_file(notes)]}, *GREEDY, api_name="/chat")
    with pytest.raises(AppError, match=r"^No image is attached, but the question asks about 'the picture'"):
        client.predict(None, "What is in the picture?", "", "", *GREEDY, api_name="/answer")
    with pytest.raises(AppError, match="Upload an image to caption"):
        client.predict(None, *GREEDY, api_name="/caption")
    with pytest.raises(AppError, match="Give 2 to 8 choices"):
        client.predict(None, "which one", "", "just one", *GREEDY, api_name="/answer")
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 100_000
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        client.predict({"text": "what is this", "files": [handle_file(big)]}, *GREEDY, api_name="/chat")
    # the failed turns left nothing behind: the conversation still starts from scratch
    assert client.predict({"text": "the cat", "files": []}, *GREEDY, api_name="/chat") == answer(
        engine.chat([], "the cat", None, *GREEDY)
    )


def test_the_browsers_chat_message_is_checked_before_it_is_sent(engine, tmp_path, monkeypatch):
    """The browser's submission goes through the chat's validator first (the mistake is shown under the textbox,
    which keeps the message: tests/test_app_browser.py shows it): it gives the engine's message with the upload's own
    file name. Scripts calling /chat skip it and get the same message as an AppError (above)."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    bad = bad_files(tmp_path / "bad")
    check = validator(build_demo(engine))
    assert check({"text": "  \n", "files": []}) == gr.validate(
        False, "The message is empty: type a question or an instruction."
    )
    assert check({"text": "what is this", "files": [str(bad["not_image"])]}) == gr.validate(
        False, "notes.png is not an image file Pillow can read"
    )
    assert check({"text": "what is this", "files": [str(bad["truncated"])]})["message"].startswith(
        "image file truncated.png is truncated or corrupt"
    )
    assert check({"text": "what is this", "files": [str(RED)]}) == gr.validate(True, "")
    text_only = validator(build_demo(make_engine(tmp_path, visual=False)))
    assert text_only({"text": "what is this", "files": [str(RED)]}) == gr.validate(
        False, "This model is text only (it has no visual path): send the message without an image."
    )
    assert text_only({"text": "what is this", "files": []}) == gr.validate(True, "")


def validator(demo: gr.Blocks):
    """The chat's check of the browser's submission (``check_message`` in app/handlers.py)."""
    [check] = [fn.validator for fn in demo.fns.values() if fn.validator is not None]
    return check


def chat_handler(demo: gr.Blocks):
    """The chat tab's handler as written in app/handlers.py (ChatInterface registers it wrapped)."""
    [fn] = [fn.fn for fn in demo.fns.values() if fn.api_name == "chat"]
    return fn.__wrapped__


def test_chat_errors_end_the_pages_reply_and_are_raised_to_api_calls(engine, tmp_path, monkeypatch, caplog):
    """An error found while answering (after the browser's check): a call from the page (an event its textbox
    triggered) gets the part streamed so far, then the error as the reply's last paragraph, with no exception (one
    would leave the browser's chat disabled); a call with no triggering component (the API) gets it raised."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    demo = build_demo(engine)
    chat = chat_handler(demo)
    [textbox] = [b for b in demo.blocks.values() if isinstance(b, gr.MultimodalTextbox)]
    page, api = gr.EventData(textbox, None), gr.EventData(None, None)
    message = {"text": "the cat", "files": []}

    expected = answer(engine.chat([], "the cat", None, *GREEDY))
    assert list(chat(message, [], *GREEDY, page))[-1] == list(chat(message, [], *GREEDY, api))[-1] == expected

    with pytest.MonkeyPatch.context() as mp:
        fail_midway(engine, mp, after=2)
        shown = list(chat(message, [], *GREEDY, page))
        api_call = chat(message, [], *GREEDY, api)
        assert next(api_call) and next(api_call)
        # the partial reply marked failed (a client keeps it in its conversation, never to be read), then the error
        assert is_error_reply(next(api_call))
        with pytest.raises(RuntimeError, match=MIDWAY_FAILURE):
            next(api_call)
    partial = shown[-2]
    assert len(shown) == 3 and partial and expected.startswith(partial)  # two pieces streamed, then the error
    assert shown[-1] == partial + "\n\n" + format_error(
        f"The answer failed (RuntimeError: {MIDWAY_FAILURE}); the server's log has the details."
    )
    assert "the chat's answer failed" in caplog.text and MIDWAY_FAILURE in caplog.text  # with its traceback

    # the conversation's image, deleted from the cache since (Gradio does so after an hour): how to go on
    gone = str(tmp_path / "cache" / "ball.png")
    history = [
        {"role": "user", "content": [{"path": gone}, "what color is the ball"]},
        {"role": "assistant", "content": "red"},
    ]
    gone_message = (
        "The conversation's image could not be read (image file not found: ball.png): attach it again (or another "
        "image) with your message, or clear the chat to go on without it."
    )
    assert list(chat({"text": "is it red", "files": []}, history, *GREEDY, page)) == [format_error(gone_message)]
    with pytest.raises(gr.Error) as raised:
        list(chat({"text": "is it red", "files": []}, history, *GREEDY, api))
    assert raised.value.message == gone_message
    # a setting the engine refuses (the page's sliders keep to their range; a direct call need not)
    assert list(chat(message, [], -1.0, 0.75, 8, page)) == [
        format_error("temperature must be >= 0 (0 = greedy), got -1.0")
    ]
    with pytest.raises(gr.Error, match=r"temperature must be >= 0"):
        list(chat(message, [], -1.0, 0.75, 8, api))
    # with its image attached again, the same follow-up is answered about it
    red = {"text": "is it red", "files": [str(RED)]}
    assert list(chat(red, history, *GREEDY, page))[-1] == answer(
        engine.chat([Turn("what color is the ball", "red", gone)], "is it red", RED, *GREEDY)
    )


def test_a_long_paste_or_a_question_without_its_image_gets_a_message_and_the_chat_stays_usable(
    engine, tmp_path, monkeypatch
):
    """A paste over MAX_PASTE_CHARS reaches the server as an attached text file (the browser's doing: see
    tests/test_app_browser.py): the check says so under the textbox. A question about the picture with no image is
    left to the chat handler, which sees the conversation: without an image in it, the reply says none is attached;
    with one, it is answered about it."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    demo = build_demo(engine)
    check, chat = validator(demo), chat_handler(demo)
    [textbox] = [b for b in demo.blocks.values() if isinstance(b, gr.MultimodalTextbox)]
    page, api = gr.EventData(textbox, None), gr.EventData(None, None)

    pasted = tmp_path / "pasted_text.txt"
    pasted.write_text("the cat " * (MAX_PASTE_CHARS // 8 + 1))
    too_long = (
        "pasted_text.txt is a text file, and the chat reads images only (the browser attaches a paste of more than "
        "100,000 characters as one): remove it and paste less; the model reads the first 16,000 characters of a "
        "message."
    )
    message = {"text": "", "files": [str(pasted)]}
    assert check(message) == gr.validate(False, too_long)
    assert list(chat(message, [], *GREEDY, page)) == [format_error(too_long)]
    with pytest.raises(gr.Error, match="pasted_text.txt is a text file"):
        list(chat(message, [], *GREEDY, api))

    question = {"text": "What color is the shape in the picture?", "files": []}
    assert check(question) == gr.validate(True, "")  # the conversation, which the check does not see, may hold one
    with pytest.raises(NoImageError) as no_image:
        engine.chat([], question["text"], None)
    assert list(chat(question, [], *GREEDY, page)) == [format_error(str(no_image.value))]
    with pytest.raises(gr.Error, match="No image is attached, but the question asks about 'the shape'"):
        list(chat(question, [], *GREEDY, api))
    history = [{"role": "user", "content": [{"path": str(RED)}, "look"]}, {"role": "assistant", "content": "a ball"}]
    assert list(chat(question, history, *GREEDY, page))[-1] == answer(
        engine.chat([Turn("look", "a ball", image=RED)], question["text"], None, *GREEDY)
    )


def test_api_chat_errors_found_while_answering_are_raised(served, client, engine):
    """Through gradio_client: the conversation's image deleted from the cache and a model failing mid-answer are
    errors the caller can catch (the page shows them as the reply instead), and the server keeps serving."""
    demo, _, counting = served
    first = client.predict({"text": "look at the ball", "files": [handle_file(GREEN)]}, *GREEDY, api_name="/chat")
    assert first == answer(engine.chat([], "look at the ball", GREEN, *GREEDY))
    uploads = list(Path(demo.GRADIO_CACHE).rglob("small_green_square.png"))
    assert uploads
    for upload in uploads:  # what Gradio's delete_cache does an hour later
        upload.unlink()
    gone = r"^The conversation's image could not be read \(image file not found: small_green_square\.png\): attach it"
    with pytest.raises(AppError, match=gone):
        client.predict({"text": "is it blue", "files": []}, *GREEDY, api_name="/chat")
    with pytest.MonkeyPatch.context() as mp:
        fail_midway(counting, mp)
        job = client.submit({"text": "the cat", "files": [handle_file(GREEN)]}, *GREEDY, api_name="/chat")
        with pytest.raises(AppError, match=MIDWAY_FAILURE):
            job.result(timeout=60)
    assert counting.active == 0  # the failed answer let go of the model
    history = [Turn("look at the ball", first, image=GREEN)]
    assert client.predict({"text": "is it blue", "files": [handle_file(GREEN)]}, *GREEDY, api_name="/chat") == (
        answer(engine.chat(history, "is it blue", GREEN, *GREEDY))
    )


def test_over_long_message_is_answered_with_a_note(client):
    reply = client.predict({"text": " ".join(WORDS * 60), "files": []}, 0.0, 0.75, 100, api_name="/chat")
    assert reply.startswith("*Note: Your message was cut to its first ") and "fit the model's context" in reply
    assert len(strip_notes(reply)) > 0


def call_raw(url: str, api: str, body: str) -> str:
    """The error shown for one call of endpoint ``api`` with the JSON ``body`` sent as written: any HTTP client can
    send JSON's NaN and a lone surrogate ("\\ud800"); gradio_client cannot (httpx refuses NaN, UTF-8 the other)."""
    job = httpx.post(f"{url}gradio_api/call/{api}", content=body, headers={"Content-Type": "application/json"})
    job.raise_for_status()
    lines = httpx.get(f"{url}gradio_api/call/{api}/{job.json()['event_id']}", timeout=60).text.splitlines()
    return json.loads(lines[lines.index("event: error") + 1].removeprefix("data: "))["error"]


def test_bad_settings_and_surrogates_from_any_client_get_errors_naming_them(served, client, engine):
    url, message = served[1], '{"text": "the cat", "files": []}'
    assert call_raw(url, "chat", f'{{"data": [{message}, NaN, 0.75, 8]}}') == (
        "Temperature must be a number from 0 to 2, got nan."
    )
    assert call_raw(url, "chat", f'{{"data": [{message}, 0.1, 0.75, Infinity]}}') == (
        "Max new tokens must be a number from 1 to 256, got inf."
    )
    assert call_raw(url, "chat", '{"data": [{"text": "the cat\\ud800", "files": []}, 0.1, 0.75, 8]}') == (
        "The message holds an invalid character at position 7: U+D800 is half of a UTF-16 surrogate pair, not a "
        "Unicode character. Remove it, or paste the text again."
    )
    assert call_raw(url, "caption", '{"data": [null, NaN, 0.75, 8]}') == "temperature must be a finite number, got nan"
    assert call_raw(url, "answer", '{"data": [null, "what", "\\udc00", "", 0.1, 0.75, 8]}').startswith(
        "The context holds an invalid character at position 0: U+DC00"
    )
    with pytest.raises(AppError, match=r"^Top-p must be a number from 0\.05 to 1, got 'abc'\.$"):
        client.predict({"text": "the cat", "files": []}, 0.1, "abc", 8, api_name="/chat")
    with pytest.raises(AppError, match=r"^top_p must be a number, got str 'abc'$"):
        client.predict(None, "what", "", "", 0.1, "abc", 8, api_name="/answer")
    assert client.predict({"text": "the cat", "files": []}, *GREEDY, api_name="/chat") == answer(
        engine.chat([], "the cat", None, *GREEDY)
    )


def test_concurrent_clients_are_all_answered_one_at_a_time(served, engine):
    _, url, counting = served
    requests = [
        ("/chat", ({"text": "the cat", "files": []}, *GREEDY), answer(engine.chat([], "the cat", None, *GREEDY))),
        ("/chat", ({"text": "blue water", "files": [handle_file(GREEN)]}, *GREEDY),
         answer(engine.chat([], "blue water", GREEN, *GREEDY))),
        ("/caption", (handle_file(GREEN), *GREEDY), answer(engine.caption(GREEN, *GREEDY))),
        ("/answer", (None, "which is a color", "", "red\nchair", *GREEDY),
         answer(engine.answer("which is a color", None, "", ["red", "chair"], *GREEDY))),
        ("/chat", ({"text": "green hills", "files": []}, *GREEDY),
         answer(engine.chat([], "green hills", None, *GREEDY))),
    ]  # fmt: skip
    clients = [Client(url, verbose=False) for _ in requests]
    try:
        started = counting.started
        jobs = [c.submit(*args, api_name=api) for c, (api, args, _) in zip(clients, requests)]
        assert [job.result(timeout=120) for job in jobs] == [expected for _, _, expected in requests]
        assert counting.started - started == len(requests) and counting.max_active == 1
    finally:
        for c in clients:
            c.close()
    demo = served[0]
    model_events = {fn.api_name for fn in demo.fns.values() if fn.concurrency_id == MODEL_QUEUE}
    assert {"chat", "caption", "answer"} <= model_events


def test_text_boxes_are_capped_at_the_engines_field_limit(served):
    blocks = served[0].blocks.values()
    caps = {b.label: b.max_length for b in blocks if isinstance(b, gr.Textbox) and b.interactive is not False}
    assert caps == dict.fromkeys(
        ["Question", "Context (optional)", "Choices (optional, one per line)"], MAX_MESSAGE_CHARS
    )
    [chat_box] = [b for b in blocks if isinstance(b, gr.MultimodalTextbox)]
    # it has no max_length: a paste up to MAX_PASTE_CHARS stays text (the engine reads MAX_MESSAGE_CHARS of it), a
    # longer one becomes a text file, which Gradio's type check lets through to the chat's readable refusal
    assert chat_box.max_plain_text_length == MAX_PASTE_CHARS > MAX_MESSAGE_CHARS
    assert chat_box.file_types == ["image", ".txt"]


def test_uploads_land_in_a_private_folder_that_gradio_cleans(served, client, tmp_path):
    demo = served[0]
    assert demo.delete_cache == DELETE_CACHE == (600, 3600)  # every 10 minutes, the files older than an hour
    assert demo.state_session_capacity == SESSION_CAPACITY
    cache = Path(demo.GRADIO_CACHE)
    assert cache.name.startswith("llama-adapter-demo-") and stat.S_IMODE(cache.stat().st_mode) == 0o700
    photo = tmp_path / "private_photo.png"
    shutil.copy(RED, photo)
    photo.chmod(0o644)
    client.predict(handle_file(photo), *GREEDY, api_name="/caption")
    [upload] = cache.rglob("private_photo.png")
    assert stat.S_IMODE(upload.stat().st_mode) == 0o600
    delete_files_created_by_app(demo, age=DELETE_CACHE[1])  # what Gradio runs every DELETE_CACHE[0] seconds
    assert upload.exists()  # younger than an hour
    delete_files_created_by_app(demo, age=None)  # what it runs when the server stops
    assert not upload.exists()


def post_upload(url: str, files: list[tuple[str, bytes]]) -> httpx.Response:
    """One raw POST of ``files`` to Gradio's upload route, as any HTTP client can send it."""
    return httpx.post(f"{url}gradio_api/upload", files=[("files", item) for item in files], timeout=60)


def test_the_upload_folder_keeps_the_newest_files_within_its_caps_all_private(engine, tmp_path, monkeypatch):
    """Raw posts of 1 MiB each to a demo whose folder keeps 4 MiB and 10 files: after every post the newest within
    the caps are left (the examples Gradio cached at build time always), every file 0600 and every folder 0700, and
    the demo still answers about a fresh upload."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    demo = build_demo(engine)
    _, url, _ = launch(
        demo, port=None, prevent_thread_lock=True, quiet=True, max_cache_bytes=4 << 20, max_cache_files=10
    )
    try:
        cache = Path(demo.GRADIO_CACHE)
        examples = set(files_under(cache))
        assert {p.name for p in examples} == {RED.name, GREEN.name}
        rng = np.random.default_rng(0)
        for i in range(12):
            reply = post_upload(url, [(f"post{i}.bin", rng.bytes(1 << 20))])
            assert reply.status_code == 200 and Path(reply.json()[0]).name == f"post{i}.bin"
            uploads = set(files_under(cache)) - examples
            assert sum(p.stat().st_size for p in uploads) <= 4 << 20 and examples <= set(files_under(cache))
        assert {p.name for p in uploads} == {f"post{i}.bin" for i in range(8, 12)}
        reply = post_upload(url, [(f"tiny{i}.txt", f"{i}".encode()) for i in range(30)])  # many files in one post
        assert reply.status_code == 200 and len(reply.json()) == 30
        uploads = set(files_under(cache)) - examples
        assert len(uploads) == 10 and {p.name for p in uploads} <= {f"tiny{i}.txt" for i in range(30)}  # 10 at most
        modes = {stat.S_IMODE(p.stat().st_mode) for p in cache.rglob("*") if p.is_file()}
        folders = {stat.S_IMODE(p.stat().st_mode) for p in [cache, *cache.rglob("*")] if p.is_dir()}
        assert modes == {0o600} and folders == {0o700}
        with closing(Client(url, verbose=False)) as client:
            reply = client.predict({"text": "what color is the ball", "files": [handle_file(RED)]}, *GREEDY,
                                   api_name="/chat")  # fmt: skip
        assert reply == answer(engine.chat([], "what color is the ball", RED, *GREEDY))
    finally:
        demo.close()


def test_app_is_safe_by_default():
    args = app_parser().parse_args([])
    assert (args.host, args.port, args.share, args.max_file_size) == ("127.0.0.1", 7860, False, "10mb")


# ---- python -m app -------------------------------------------------------------------------------------------------
def test_main_without_a_run_says_to_train_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("app.__main__.RUNS_DIR", tmp_path / "runs")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "no trained run found under" in err and "run `make train` first" in err and "--checkpoint RUN_DIR" in err
    assert main(["--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such run directory or adapter file" in capsys.readouterr().err


def test_without_a_checkpoint_the_newest_run_with_a_visual_path_is_served_and_said_why(tmp_path, monkeypatch, capsys):
    """After `make train` (runs/demo, multimodal) a later text-only run is not what the demo serves by default; the
    choice and its reason are printed and shown in the header."""
    from data.synthetic import synthetic_corpus
    from data.synthetic import train_tokenizer as train_512
    from model import load_model

    tokenizer = train_512(synthetic_corpus(n=1000), tmp_path / "tokenizer.model", 512)  # the tiny preset's vocabulary
    runs = tmp_path / "runs"
    for age, (name, fmt, clip) in enumerate([("demo", "alpaca", "tiny"), ("sqa", "QCM-A", "tiny"), ("text", "", None)]):
        model = load_model("tiny", clip=clip)
        save_adapter(model, runs / name, base="tiny", tokenizer=tokenizer, prompt_format=fmt or None)
        os.utime(runs / name / "adapter.json", (age + 1, age + 1))  # demo, then sqa, then text: the newest
    assert choose_run(runs) == (
        runs / "sqa",
        f"the newest with a visual path, of 3 runs under {runs}; --checkpoint RUN_DIR serves another",
    )
    assert choose_run(tmp_path / "none") is None
    monkeypatch.setattr("app.__main__.RUNS_DIR", runs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = load_engine(app_parser().parse_args(["--device", "cpu"]))
    assert engine.name == "run sqa" and engine.question_format == "QCM-A" and engine.has_vision
    assert engine.about.startswith(f"Serving `{runs / 'sqa'}`: the newest with a visual path, of 3 runs under ")
    old = load_engine(app_parser().parse_args(["--checkpoint", str(runs / "demo")]))
    assert old.question_format == "llama_adapter" and old.about == ""  # an Alpaca run asks in the V1 format
    shutil.rmtree(runs / "sqa")
    shutil.rmtree(runs / "demo")
    assert choose_run(runs) == (runs / "text", f"the only run under {runs}; --checkpoint RUN_DIR serves another")
    save_adapter(load_model("tiny"), runs / "text2", base="tiny", tokenizer=tokenizer)
    assert (
        choose_run(runs)[1].startswith("the newest, of 2 runs under ")
        and "none with a visual path" in (choose_run(runs)[1])
    )
    monkeypatch.setattr("app.ui.launch", lambda demo, **kwargs: None)  # stands in for serving until Ctrl-C
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    assert main(["--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith(f"serving {runs / 'text2'}: the newest, of 2 runs under {runs}")


def test_main_serves_with_umask_077_and_removes_its_upload_folder(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    monkeypatch.setattr("app.__main__.RUNS_DIR", tmp_path / "runs")  # none: the stand-in below serves
    monkeypatch.setattr("app.__main__.load_engine", lambda args, why: engine)
    served = {}

    def serve(demo, **kwargs):  # stands in for launch, which would block until Ctrl-C
        served["umask"] = os.umask(0o077)
        served["cache"] = Path(demo.GRADIO_CACHE)
        assert served["cache"].is_dir()

    monkeypatch.setattr("app.ui.launch", serve)
    umask = os.umask(0o022)
    try:
        assert main([]) == 0
    finally:
        os.umask(umask)
    assert served["umask"] == 0o077 and served["cache"].parent == tmp_path and not served["cache"].exists()


def test_the_header_says_what_the_loaded_run_was_trained_for(tmp_path):
    from app.__main__ import EMBEDDED_DEFAULT_NOTE, TASK_NOTES, TINY_NOTE, about_run
    from app.ui import CHAT_EXAMPLES, IMAGE_EXAMPLES

    assert about_run({"recipe": "demo", "task": "mix", "step": 2520}) == EMBEDDED_DEFAULT_NOTE
    assert about_run({"recipe": "tiny", "task": "scienceqa", "step": 600}) == TINY_NOTE
    assert about_run({"recipe": "coco", "task": "coco"}) == f"Recipe coco. {TASK_NOTES['coco']}"
    assert about_run({}) == ""  # a run saved without train.py's record: nothing claimed
    engine = make_engine(tmp_path)
    engine.about = EMBEDDED_DEFAULT_NOTE
    shown = [c["props"].get("value", "") for c in build_demo(engine).config["components"] if c["type"] == "markdown"]
    assert any(EMBEDDED_DEFAULT_NOTE in text and engine.describe() in text for text in shown)
    # building a demo leaves the examples as they were (Gradio turns the files it is given into upload records)
    assert [f for ex in CHAT_EXAMPLES for f in ex["files"]] == [str(ASSETS / n) for n in (RED.name, GREEN.name)]
    assert all(isinstance(cell, str) for row in IMAGE_EXAMPLES for cell in row)
