"""Retake the README's screenshot of the running demo (assets/screenshot.png) with a headless Chromium.

python -m demo.screenshot                       # the default model in weights/, the "pattern" example
python -m demo.screenshot --model tiny --example colour --out /tmp/shot.png

Serves the demo on loopback, clicks an example (its scene and question), sends it, waits for the streamed answer
and the "Where the answer came from" maps, and saves a screenshot of the page. Needs Playwright for Python and
Debian's chromium.
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

from demo.engine import ChatEngine
from demo.examples import load_examples
from demo.ui import build_demo, launch

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def take(model: str | None, example_family: str, out: Path, timeout_s: float = 300) -> str:
    """Serve, ask, screenshot; returns the answer the page showed."""
    from playwright.sync_api import expect, sync_playwright

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    example = next(e for e in load_examples() if e.family == example_family)
    engine = ChatEngine.load(model, max_new_tokens=48)
    demo = build_demo(engine, load_examples())
    _, url, _ = launch(demo, host="127.0.0.1", port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(timeout_s * 1000)
            page.goto(url)
            page.get_by_text(f"{example.question} (expected: {example.answer})").click()
            question = page.get_by_placeholder("Attach an image")
            expect(question).to_have_value(example.question)
            question.press("Enter")
            expect(question).to_be_editable(timeout=timeout_s * 1000)  # the answer has finished streaming
            page.locator("#relevance img").wait_for()
            page.get_by_text("How to read this").wait_for()
            answer = page.locator("#chat [data-testid='bot']").last.inner_text()
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            browser.close()
    finally:
        demo.close()
    return answer.strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint path, or tiny (default: weights/)")
    parser.add_argument("--example", default="pattern", help="family of the example scene to ask about")
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "screenshot.png")
    args = parser.parse_args(argv)
    answer = take(args.model, args.example, args.out)
    print(f"answer shown: {answer!r}\nscreenshot: {args.out}")


if __name__ == "__main__":
    main()
