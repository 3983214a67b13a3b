"""The app in a real browser: Debian's headless Chromium driven by Playwright (app/screenshot.py) against a served
tiny model: attach an image, send a message, watch the reply stream in, take a screenshot; and the chat's errors
(an empty message, a corrupt image, an earlier image deleted from the cache, a model failing mid-answer) shown
readably while the chat stays usable."""

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pytest
import torch
from PIL import Image

from app.engine import Engine
from app.screenshot import CHROMIUM, CHROMIUM_ARGS, VIEWPORT, WATCH_REPLY, chat_in_browser
from app.ui import build_demo, launch
from tests.test_app import MIDWAY_FAILURE, QUIET_GRADIO, RED, bad_files, fail_midway, make_engine

pytestmark = [pytest.mark.browser, QUIET_GRADIO]

if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} is missing: scripts/install_browser.sh installs Debian's chromium (make test runs it)",
        allow_module_level=True,
    )

TIMEOUT_MS = 60_000


@dataclass
class Served:
    demo: gr.Blocks
    engine: Engine
    url: str


@pytest.fixture
def served(tmp_path, monkeypatch) -> Iterator[Served]:
    """The app serving a tiny model on a free local port."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model decodes ~10x faster on one thread when the cores are shared
    engine = make_engine(tmp_path)
    demo = build_demo(engine)
    _, local_url, _ = launch(demo, port=None, prevent_thread_lock=True, quiet=True)
    yield Served(demo, engine, local_url)
    demo.close()
    torch.set_num_threads(threads)


@pytest.fixture
def url(served: Served) -> str:
    return served.url


def assert_page_screenshot(path: Path) -> None:
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (VIEWPORT["width"], VIEWPORT["height"])


class ChatPage:
    """The Chat tab open in Chromium, and the steps the tests take in it."""

    def __init__(self, page) -> None:
        self.page = page
        self.textbox, self.bots = page.get_by_test_id("textbox"), page.get_by_test_id("bot")

    def send(self, message: str) -> None:
        from playwright.sync_api import expect

        expect(self.textbox).to_be_enabled(timeout=TIMEOUT_MS)
        self.textbox.fill(message)
        self.textbox.press("Enter")

    def paste(self, text: str) -> None:
        """Paste ``text`` into the textbox as a user does (the clipboard, then Ctrl+V): the page's own paste
        handler decides whether it stays text."""
        from playwright.sync_api import expect

        expect(self.textbox).to_be_enabled(timeout=TIMEOUT_MS)
        self.page.evaluate("(text) => navigator.clipboard.writeText(text)", text)
        self.textbox.focus()
        self.textbox.press("Control+V")

    def attach(self, image: Path) -> None:
        self.page.get_by_test_id("file-upload").set_input_files(str(image))
        self.page.locator(".thumbnail-image").wait_for(timeout=TIMEOUT_MS)  # the upload finished

    def finished_reply(self, n_replies: int) -> None:
        from playwright.sync_api import expect

        expect(self.bots).to_have_count(n_replies, timeout=TIMEOUT_MS)
        self.page.get_by_test_id("submit-button").wait_for(timeout=TIMEOUT_MS)  # the stop button is gone again

    def still_usable(self, error: str, replies: list[str], user_messages: int, screenshot: Path) -> None:
        """``error`` is shown; so is the conversation: its ``replies`` and ``user_messages`` (an attached image is a
        message of its own), with no error badge or toast; the textbox takes input. Saves a ``screenshot``."""
        from playwright.sync_api import expect

        expect(self.page.get_by_text(error)).to_be_visible(timeout=TIMEOUT_MS)
        expect(self.page.get_by_test_id("user")).to_have_count(user_messages)
        expect(self.bots).to_have_count(len(replies))
        expect(self.bots).to_have_text(replies)
        expect(self.page.get_by_text("Error", exact=True)).to_have_count(0)
        expect(self.textbox).to_be_enabled()
        self.page.screenshot(path=str(screenshot))

    def streamed_reply(self, n_replies: int) -> list[str]:
        """Wait for reply number ``n_replies`` to finish (after ``watch_reply``): the texts it showed, in order."""
        self.finished_reply(n_replies)
        return self.page.evaluate("window.__replyTexts")

    def watch_reply(self) -> None:
        """Record the texts the last reply shows from now on (``streamed_reply`` returns them)."""
        self.page.evaluate(WATCH_REPLY)


@contextmanager
def chat_page(url: str) -> Iterator[ChatPage]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS))
        try:
            context = browser.new_context(viewport=VIEWPORT)
            context.grant_permissions(["clipboard-read", "clipboard-write"])  # for ChatPage.paste
            page = context.new_page()
            page.goto(url, timeout=TIMEOUT_MS)
            yield ChatPage(page)
        finally:
            browser.close()


def assert_streamed(texts: list[str], before: list[str]) -> None:
    """The new answer grew over several updates before the final one (texts of earlier replies left out)."""
    texts = [t for t in texts if t not in before]
    assert len(texts) >= 3 and len(texts[0]) < len(texts[-1])
    assert all(texts[-1].startswith(t.rstrip()) for t in texts)


def test_chat_with_an_image_streams_the_reply_in_chromium(url, tmp_path):
    shown = chat_in_browser(url, "what color is the ball", RED, tmp_path / "chat.png")
    assert shown.user_images == 1  # the attached image is part of the user's message
    texts = shown.reply_texts
    # streamed: the page showed the answer growing over several updates before the final one
    assert len(texts) >= 3 and len(texts[0]) < len(texts[-1])
    assert all(texts[-1].startswith(t.rstrip()) for t in texts)
    assert_page_screenshot(tmp_path / "chat.png")


def test_chat_mistakes_are_shown_and_the_chat_stays_usable_in_chromium(url, tmp_path):
    """Mistakes found before sending (the chat's validator): shown under the textbox, which keeps the message."""
    from playwright.sync_api import expect

    truncated = bad_files(tmp_path / "bad")["truncated"]
    with chat_page(url) as chat:
        chat.send("the cat sat on a mat")
        chat.finished_reply(1)
        first_reply = chat.bots.inner_text()

        chat.send("   ")
        chat.still_usable(
            "The message is empty: type a question or an instruction.", [first_reply], 1, tmp_path / "empty.png"
        )

        chat.attach(truncated)
        chat.send("what is this")
        chat.still_usable(
            "image file truncated.png is truncated or corrupt", [first_reply], 1, tmp_path / "corrupt.png"
        )
        expect(chat.textbox).to_have_value("what is this")  # kept, to send again once the image is fixed

        chat.page.get_by_label("Remove file").click()
        chat.attach(RED)
        chat.watch_reply()
        chat.send("what color is the ball")
        texts = chat.streamed_reply(2)
        expect(chat.page.get_by_text("image file truncated.png is truncated or corrupt")).to_have_count(0)
        chat.page.screenshot(path=str(tmp_path / "reply.png"))
        user_images = chat.page.locator('[data-testid="user"] img').count()
    assert user_images == 1  # the corrupt upload never became part of the conversation
    assert_streamed(texts, [first_reply])
    for name in ("empty.png", "corrupt.png", "reply.png"):
        assert_page_screenshot(tmp_path / name)


def test_long_pastes_never_leave_the_chat_stuck_in_chromium(url, tmp_path):
    """Gradio's textbox attaches a paste longer than its max_plain_text_length as a text file; an image-only textbox
    then failed with a raw "Invalid file type: text/plain" and stayed an error box until a reload. Now a paste of
    20,000 characters stays text and is answered with a note that it was cut; one of over 100,000 is refused with a
    readable message under the textbox, and the chat goes on once the file is removed."""
    from playwright.sync_api import expect

    with chat_page(url) as chat:
        chat.paste("the cat " * 2_500)  # 20,000 characters
        expect(chat.textbox).to_have_value("the cat " * 2_500)
        expect(chat.page.get_by_label("Uploaded files")).to_have_count(0)
        chat.textbox.press("Enter")
        chat.finished_reply(1)
        first_reply = chat.bots.inner_text()
        assert first_reply.startswith("Note: Your message was cut to its first 16,000 of 19,999 characters.")
        expect(chat.textbox).to_be_enabled()

        chat.paste("the cat " * 12_501)  # 100,008 characters: attached as pasted_text.txt
        expect(chat.page.get_by_label("Uploaded files")).to_have_count(1)
        chat.textbox.press("Enter")
        refused = (
            "pasted_text.txt is a text file, and the chat reads images only (the browser attaches a paste of more "
            "than 100,000 characters as one): remove it and paste less; the model reads the first 16,000 characters "
            "of a message."
        )
        chat.still_usable(refused, [first_reply], 1, tmp_path / "long_paste.png")

        chat.page.locator(".validation-error").get_by_label("Clear").click()  # the message covers the file row
        chat.page.get_by_label("Remove file").click()
        chat.watch_reply()
        chat.send("the cat sat on a mat")
        texts = chat.streamed_reply(2)
        expect(chat.page.get_by_text(refused)).to_have_count(0)
    assert_streamed(texts, [first_reply])
    assert_page_screenshot(tmp_path / "long_paste.png")


def test_chat_errors_while_answering_are_shown_and_the_chat_stays_usable_in_chromium(served, tmp_path):
    """Errors found only while answering end the reply: the conversation's image deleted from Gradio's cache (as
    delete_cache does an hour after the upload) before a text-only follow-up, and the model failing mid-answer.
    Each is shown in the conversation; no error badge covers it, the textbox stays enabled, and the next message
    gets a streamed answer."""
    from playwright.sync_api import expect

    ball = tmp_path / "ball.png"
    shutil.copy(RED, ball)
    with chat_page(served.url) as chat:
        chat.attach(ball)
        chat.send("what color is the ball")
        chat.finished_reply(1)
        replies = [chat.bots.inner_text()]
        chat.page.screenshot(path=str(tmp_path / "answered.png"))

        uploads = list(Path(served.demo.GRADIO_CACHE).rglob("ball.png"))
        assert uploads
        for upload in uploads:
            upload.unlink()
        chat.send("is it red")
        gone = (
            "Error: The conversation's image could not be read (image file not found: ball.png): attach it again "
            "(or another image) with your message, or clear the chat to go on without it."
        )
        chat.still_usable(gone, [*replies, gone], 3, tmp_path / "image_gone.png")
        replies.append(gone)

        with pytest.MonkeyPatch.context() as mp:
            fail_midway(served.engine, mp, after=2)
            chat.attach(ball)
            chat.send("what color is the ball")
            failure = f"Error: The answer failed (RuntimeError: {MIDWAY_FAILURE}); the server's log has the details."
            chat.finished_reply(3)
            midway = chat.bots.nth(2).inner_text()
            chat.still_usable(failure, [*replies, midway], 5, tmp_path / "failed_midway.png")
            replies.append(midway)

        chat.attach(ball)
        chat.watch_reply()
        chat.send("what color is the ball")
        texts = chat.streamed_reply(4)
        expect(chat.textbox).to_be_enabled()
        chat.page.screenshot(path=str(tmp_path / "answered_again.png"))
        user_images = chat.page.locator('[data-testid="user"] img').count()
    assert midway.endswith(failure) and len(midway) > len(failure)  # what was streamed before the failure stays
    assert user_images == 3
    assert_streamed(texts, replies)
    for name in ("answered.png", "image_gone.png", "failed_midway.png", "answered_again.png"):
        assert_page_screenshot(tmp_path / name)


def test_the_demo_answers_with_an_official_v2_release_file_in_chromium(tmp_path, monkeypatch):
    """`python -m app --checkpoint BIAS-7B.pth --base ... --clip-weights ...`, in the browser: an image and the
    release demo's example message get the served model's greedy reply."""
    from app.__main__ import build_parser, load_engine
    from tests.test_release_v2 import picture, release_tensors, write_base, write_clip

    base, clip = write_base(tmp_path), write_clip(tmp_path / "clip.pt")
    torch.save(release_tensors("BIAS-7B"), tmp_path / "BIAS-7B.pth")
    argv = ["--checkpoint", str(tmp_path / "BIAS-7B.pth"), "--base", str(base), "--clip-weights", str(clip)]
    engine = load_engine(build_parser().parse_args([*argv, "--device", "cpu"]))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    demo = build_demo(engine)
    _, url, _ = launch(demo, port=None, prevent_thread_lock=True, quiet=True)
    try:
        image = picture(tmp_path / "painting.png", 5)
        shown = chat_in_browser(url, "Please introduce this painting.", image, tmp_path / "v2.png", temperature=0.0)
    finally:
        demo.close()
    # The same engine's own greedy reply, which tests/test_release_v2.py checks against the official decode; the page
    # renders it as Markdown, so compare the words and numbers it shows.
    reply = "".join(engine.chat([], "Please introduce this painting.", image, temperature=0.0).pieces)
    assert shown.user_images == 1 and re.sub(r"\W+", "", reply)
    assert re.sub(r"\W+", "", shown.reply_texts[-1]) == re.sub(r"\W+", "", reply)
    assert_page_screenshot(tmp_path / "v2.png")
