"""The app in a real browser: Debian's headless Chromium driven by Playwright (app/screenshot.py) against a served
tiny model: attach an image, send a message, watch the reply stream in, take a screenshot; and the chat's mistakes
(an empty message, a corrupt image) shown readably while the chat stays usable."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from app.screenshot import _WATCH_REPLY, CHROMIUM, CHROMIUM_ARGS, VIEWPORT, chat_in_browser
from app.ui import build_demo, launch
from tests.test_app import QUIET_GRADIO, RED, bad_files, make_engine

pytestmark = [pytest.mark.browser, QUIET_GRADIO]

if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} is missing: scripts/install_browser.sh installs Debian's chromium (make test runs it)",
        allow_module_level=True,
    )

TIMEOUT_MS = 60_000


@pytest.fixture
def url(tmp_path, monkeypatch):
    """The app serving a tiny model on a free local port."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model decodes ~10x faster on one thread when the cores are shared
    demo = build_demo(make_engine(tmp_path))
    _, local_url, _ = launch(demo, port=None, prevent_thread_lock=True, quiet=True)
    yield local_url
    demo.close()
    torch.set_num_threads(threads)


def assert_page_screenshot(path: Path) -> None:
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (VIEWPORT["width"], VIEWPORT["height"])


def test_chat_with_an_image_streams_the_reply_in_chromium(url, tmp_path):
    shown = chat_in_browser(url, "what color is the ball", RED, tmp_path / "chat.png")
    assert shown.user_images == 1  # the attached image is part of the user's message
    texts = shown.reply_texts
    # streamed: the page showed the answer growing over several updates before the final one
    assert len(texts) >= 3 and len(texts[0]) < len(texts[-1])
    assert all(texts[-1].startswith(t.rstrip()) for t in texts)
    assert_page_screenshot(tmp_path / "chat.png")


def test_chat_mistakes_are_shown_and_the_chat_stays_usable_in_chromium(url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    truncated = bad_files(tmp_path / "bad")["truncated"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url, timeout=TIMEOUT_MS)
            textbox, bots = page.get_by_test_id("textbox"), page.get_by_test_id("bot")

            def send(message: str) -> None:
                expect(textbox).to_be_enabled(timeout=TIMEOUT_MS)
                textbox.fill(message)
                textbox.press("Enter")

            def attach(image: Path) -> None:
                page.get_by_test_id("file-upload").set_input_files(str(image))
                page.locator(".thumbnail-image").wait_for(timeout=TIMEOUT_MS)  # the upload finished

            def finished_reply(n_replies: int) -> None:
                expect(bots).to_have_count(n_replies, timeout=TIMEOUT_MS)
                page.get_by_test_id("submit-button").wait_for(timeout=TIMEOUT_MS)  # the stop button is gone again

            def still_usable(error: str, screenshot: Path) -> None:
                """``error`` is shown; the conversation so far is too, with no error badge or toast; the textbox
                takes input."""
                expect(page.get_by_text(error)).to_be_visible(timeout=TIMEOUT_MS)
                expect(page.get_by_test_id("user")).to_have_count(1)
                expect(bots).to_have_count(1)
                expect(bots).to_have_text(first_reply)
                expect(page.get_by_text("Error", exact=True)).to_have_count(0)
                expect(textbox).to_be_enabled()
                page.screenshot(path=str(screenshot))

            send("the cat sat on a mat")
            finished_reply(1)
            first_reply = bots.inner_text()

            send("   ")
            still_usable("The message is empty: type a question or an instruction.", tmp_path / "empty.png")

            attach(truncated)
            send("what is this")
            still_usable("image file truncated.png is truncated or corrupt", tmp_path / "corrupt.png")
            expect(textbox).to_have_value("what is this")  # kept, to send again once the image is fixed

            page.get_by_label("Remove file").click()
            attach(RED)
            page.evaluate(_WATCH_REPLY)
            send("what color is the ball")
            finished_reply(2)
            expect(page.get_by_text("image file truncated.png is truncated or corrupt")).to_have_count(0)
            page.screenshot(path=str(tmp_path / "reply.png"))
            texts = [t for t in page.evaluate("window.__replyTexts") if t != first_reply]
            user_images = page.locator('[data-testid="user"] img').count()
        finally:
            browser.close()
    assert user_images == 1  # the corrupt upload never became part of the conversation
    # streamed: the new answer grew over several updates before the final one
    assert len(texts) >= 3 and len(texts[0]) < len(texts[-1])
    assert all(texts[-1].startswith(t.rstrip()) for t in texts)
    for name in ("empty.png", "corrupt.png", "reply.png"):
        assert_page_screenshot(tmp_path / name)
