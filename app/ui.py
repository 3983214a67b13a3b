"""The Gradio 6 app: a multimodal chat tab and an image tab (caption / question), built around an ``Engine``.

``build_demo(engine)`` builds the Blocks without loading anything, so tests pass a tiny model; ``launch`` applies the
safe serving settings (127.0.0.1, no share link, upload size limit, one queue of concurrency 1 on the model, a bounded
number of sessions kept, readable errors). Endpoints for scripts (gradio_client): ``/chat`` (message {"text",
"files"}, temperature, top_p, max_new_tokens), ``/caption`` (image, temperature, top_p, max_new_tokens) and
``/answer`` (image, question, context, choices one per line, temperature, top_p, max_new_tokens). Every one streams
the answer as it decodes. The handlers, and how their errors reach the user, are app/handlers.py; the message
formats (chat history as turns, notes, errors) app/messages.py.

Uploads and the files Gradio caches live in a folder of their own per app, made by ``build_demo`` with mode 0700
under Gradio's temp folder (``GRADIO_TEMP_DIR``, default <tmp>/gradio): other users of the machine cannot read them.
Gradio deletes them ``DELETE_CACHE[1]`` seconds after they were written (checking every ``DELETE_CACHE[0]``
seconds) and all of them when the server stops; meanwhile ``launch`` keeps the folder within a size and a number of
files, its files 0600 (app/uploads.py), so what clients upload does not pile up.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import gradio as gr

from app.engine import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    Engine,
)
from app.handlers import answer_handler, caption_handler, chat_handler, message_validator
from app.inputs import MAX_MESSAGE_CHARS, is_finite_number
from app.messages import MAX_PASTE_CHARS
from app.uploads import MAX_CACHE_BYTES, MAX_CACHE_FILES, UploadFolderGuard, files_under, private_cache_dir, secure

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
    private_cache_dir()  # before any component: each one records the cache folder when it is made
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(f"## {TITLE}\n{engine.describe()}" + (f"\n\n{engine.about}" if engine.about else ""))
        with gr.Tab("Chat"):
            _chat_tab(demo, engine)
        with gr.Tab("Image"):
            _image_tab(engine)
    return demo


def _chat_tab(demo: gr.Blocks, engine: Engine) -> None:
    """The Chat tab (``/chat``): a multimodal ChatInterface whose events share the model's queue."""
    before = set(demo.fns)
    gr.ChatInterface(
        chat_handler(engine),
        multimodal=True,
        textbox=gr.MultimodalTextbox(
            # .txt: a paste over MAX_PASTE_CHARS arrives as a text file, which Gradio's own type check would
            # refuse with an error that leaves the textbox stuck; messages.message_parts refuses it readably
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
        validator=message_validator(engine),
        concurrency_limit=1,
        analytics_enabled=False,
        fill_height=False,
    )
    _share_model_queue(demo, before)


def _image_tab(engine: Engine) -> None:
    """The Image tab: an image with Caption (``/caption``) or a question with optional context and choices
    (``/answer``), the examples, Stop, and its own sampling settings."""
    with gr.Row():
        with gr.Column():
            image = gr.Image(type="filepath", sources=["upload"], label="Image")
        with gr.Column():
            question = gr.Textbox(label="Question", placeholder="What is in the picture?", max_length=MAX_MESSAGE_CHARS)
            context = gr.Textbox(label="Context (optional)", max_length=MAX_MESSAGE_CHARS)
            choices = gr.Textbox(label="Choices (optional, one per line)", lines=3, max_length=MAX_MESSAGE_CHARS)
            with gr.Row():
                caption_btn = gr.Button("Caption")
                answer_btn = gr.Button("Answer", variant="primary")
                stop_btn = gr.Button("Stop", variant="stop")
            output = gr.Textbox(label="Answer", lines=4, interactive=False)
    with gr.Accordion("Sampling", open=False):
        sliders = _sampling_sliders(engine.max_seq_len)
    gr.Examples(copy.deepcopy(IMAGE_EXAMPLES), [image, question, context, choices])
    caption_event = caption_btn.click(
        caption_handler(engine),
        [image, *sliders],
        output,
        api_name="caption",
        preprocess=False,
        concurrency_limit=1,
        concurrency_id=MODEL_QUEUE,
    )
    answer_event = gr.on(
        [answer_btn.click, question.submit],
        answer_handler(engine),
        [image, question, context, choices, *sliders],
        output,
        api_name="answer",
        preprocess=False,
        concurrency_limit=1,
        concurrency_id=MODEL_QUEUE,
    )
    stop_btn.click(None, cancels=[caption_event, answer_event])


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
