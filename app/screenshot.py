"""Drive the demo in a real headless Chromium and save a screenshot: the browser test and the README picture.

    python -m app.screenshot --out docs/screenshot.png [--checkpoint RUN_DIR]

starts the app on a free local port with the given (default: newest) run, attaches an image in the Chat tab, sets
the temperature (default 0: greedy), sends a message and any follow-ups, waits for each streamed reply and saves the
page. The browser
is Debian's chromium (scripts/install_browser.sh installs it) driven by Playwright; Playwright's own browser
downloads are never used.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
VIEWPORT = {"width": 1100, "height": 900}
# The README picture asks the embedded default (the demo recipe) what it was trained to answer about a picture,
# then a follow-up about the same picture.
DEFAULT_MESSAGES = ("What color is the shape in the picture?", "Is the shape big or small?")

# Records every text the last bot message shows, in order: a streamed reply shows growing prefixes of its answer.
WATCH_REPLY = """() => {
    window.__replyTexts = [];
    const record = () => {
        const bots = document.querySelectorAll('[data-testid="bot"]');
        if (!bots.length) return;
        const text = bots[bots.length - 1].innerText;
        const seen = window.__replyTexts;
        if (text && text !== seen[seen.length - 1]) seen.push(text);
    };
    new MutationObserver(record).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


@dataclass
class BrowserChat:
    """What the page showed: ``reply_texts`` are the successive texts of the reply (the last one is the answer);
    ``user_images`` counts the images in the user's messages."""

    reply_texts: list[str]
    user_images: int


def chat_in_browser(
    url: str,
    message: str,
    image: Path,
    screenshot: Path,
    *,
    follow_ups: Sequence[str] = (),
    temperature: float | None = None,
    timeout_s: float = 60,
) -> BrowserChat:
    """Open ``url`` in headless Chromium, attach ``image`` and send ``message`` in the Chat tab (after setting the
    temperature in the Sampling panel, if given), wait until the reply has finished streaming, then send each of
    ``follow_ups`` (text only) the same way; save a PNG of the page to ``screenshot`` and report what was shown (the
    reply texts are those of the last reply)."""
    from playwright.sync_api import sync_playwright

    timeout_ms = timeout_s * 1000
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url, timeout=timeout_ms)
            textbox = page.get_by_test_id("textbox")
            textbox.wait_for(timeout=timeout_ms)
            if temperature is not None:
                page.get_by_text("Sampling", exact=True).first.click()
                box = page.get_by_label("number input for Temperature").first
                box.fill(str(temperature))
                box.press("Enter")
            page.get_by_test_id("file-upload").set_input_files(str(image))
            page.locator(".thumbnail-image").wait_for(timeout=timeout_ms)  # the upload finished
            for n, text in enumerate([message, *follow_ups], start=1):
                page.evaluate(WATCH_REPLY)
                textbox.fill(text)
                textbox.press("Enter")
                page.get_by_test_id("bot").nth(n - 1).wait_for(timeout=timeout_ms)
                # While the reply streams the submit button is replaced by a stop button; it comes back at the end.
                page.get_by_test_id("submit-button").wait_for(timeout=timeout_ms)
            time.sleep(0.5)  # let the last update paint before the picture
            page.screenshot(path=str(screenshot))
            user_images = page.locator('[data-testid="user"] img').count()
            return BrowserChat(reply_texts=page.evaluate("window.__replyTexts"), user_images=user_images)
        finally:
            browser.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.screenshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/screenshot.png"), help="PNG to write")
    parser.add_argument("--checkpoint", type=Path, metavar="RUN_DIR", help="run directory (default: newest)")
    parser.add_argument(
        "--message",
        action="append",
        help="a message to send; repeat for a conversation, the image goes with the first "
        f"(default: {' / '.join(DEFAULT_MESSAGES)})",
    )
    parser.add_argument("--image", type=Path, default=Path(__file__).resolve().parent / "assets" / "red_circle.png")
    parser.add_argument("--temperature", type=float, default=0.0, help="set in the Sampling panel (default: greedy)")
    args = parser.parse_args(argv)
    if not CHROMIUM.exists():
        print(f"{CHROMIUM} is missing: run scripts/install_browser.sh", file=sys.stderr)
        return 2

    from app.__main__ import build_parser, load_engine
    from app.ui import build_demo, launch

    engine = load_engine(build_parser().parse_args(["--checkpoint", str(args.checkpoint)] if args.checkpoint else []))
    demo = build_demo(engine)
    _, url, _ = launch(demo, port=None, prevent_thread_lock=True, quiet=True)
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp.png")
        first, *follow_ups = args.message or DEFAULT_MESSAGES
        shown = chat_in_browser(url, first, args.image, tmp, follow_ups=follow_ups, temperature=args.temperature)
        tmp.replace(args.out)
    finally:
        demo.close()
    print(f"{args.out}: reply streamed in {len(shown.reply_texts)} steps: {shown.reply_texts[-1]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
