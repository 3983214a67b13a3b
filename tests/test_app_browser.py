"""The app in a real browser: Debian's headless Chromium driven by Playwright (app/screenshot.py) against a served
tiny model: attach an image, send a message, watch the reply stream in, take a screenshot."""

import pytest
import torch
from PIL import Image

from app.screenshot import CHROMIUM, VIEWPORT, chat_in_browser
from app.ui import build_demo, launch
from tests.test_app import QUIET_GRADIO, RED, make_engine

pytestmark = [pytest.mark.browser, QUIET_GRADIO]

if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} is missing: scripts/install_browser.sh installs Debian's chromium (make test runs it)",
        allow_module_level=True,
    )


def test_chat_with_an_image_streams_the_reply_in_chromium(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model decodes ~10x faster on one thread when the cores are shared
    demo = build_demo(make_engine(tmp_path))
    _, url, _ = launch(demo, port=None, prevent_thread_lock=True, quiet=True)
    try:
        shown = chat_in_browser(url, "what color is the ball", RED, tmp_path / "chat.png")
    finally:
        demo.close()
        torch.set_num_threads(threads)
    assert shown.user_images == 1  # the attached image is part of the user's message
    texts = shown.reply_texts
    # streamed: the page showed the answer growing over several updates before the final one
    assert len(texts) >= 3 and len(texts[0]) < len(texts[-1])
    assert all(texts[-1].startswith(t.rstrip()) for t in texts)
    with Image.open(tmp_path / "chat.png") as png:
        assert png.size == (VIEWPORT["width"], VIEWPORT["height"])
