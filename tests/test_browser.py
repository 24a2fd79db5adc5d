"""The demo in a real browser (Playwright + Debian's Chromium, headless): upload an image, ask, watch the answer
stream in and the plots appear. Saves a screenshot to test-artifacts/. Skips without Chromium or Playwright."""

import io
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio_client import Client
from PIL import Image
from test_app import chat_request, endless_generate, free_port, scripted_generate, serving, wait_for
from test_server import blocking_generate

from demo.engine import ChatEngine, ChatSession
from demo.examples import load_examples
from demo.ui import build_demo, launch

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 60_000
VIEWPORT = {"width": 1400, "height": 1000}
ANSWER = "the star is red"
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # pandas 3 deprecations in Gradio


@contextmanager
def chromium_page(url: str, **page_options) -> Iterator:
    """A page of a headless Chromium at `url`; the browser closes on leaving."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(**page_options)
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            yield page
        finally:
            browser.close()


def test_upload_ask_and_see_the_answer_and_plots():
    example = load_examples()[0]
    engine = ChatEngine.load("tiny", max_new_tokens=24)
    engine.model.generate = scripted_generate(engine, ANSWER, delay=0.1)  # a real prefill, then ANSWER slowly
    with serving(engine) as url, chromium_page(url, viewport=VIEWPORT) as page:
        # Record every text the answer bubble shows, to see it grow token by token.
        page.evaluate(
            """() => {
                window.answerTexts = [];
                new MutationObserver(() => {
                    const bots = document.querySelectorAll("#chat [data-testid='bot']");
                    const text = bots.length ? bots[bots.length - 1].innerText : "";
                    if (text !== window.answerTexts.at(-1)) window.answerTexts.push(text);
                }).observe(document.body, {subtree: true, childList: true, characterData: true});
            }"""
        )
        page.locator("input[data-testid='file-upload']").set_input_files(str(example.image))
        question = page.get_by_placeholder("Attach an image")
        question.fill(example.question)
        question.press("Enter")

        chat = page.locator("#chat")
        chat.get_by_text(example.question).wait_for()
        chat.locator("img").first.wait_for()  # the uploaded image shows in the user's message
        page.locator("#relevance img").wait_for()  # the first tab: where the answer came from
        page.get_by_role("tab", name="Shortcuts").click()
        page.locator("#chart img").wait_for()
        page.locator("#shortcut-map img").wait_for()
        answer = chat.locator("[data-testid='bot']").last.inner_text()
        shown = [text.strip() for text in page.evaluate("window.answerTexts")]
        assert answer.strip() == ANSWER and {"the", "the star", "the star is"} <= set(shown)  # it grew

        # Clicking the patch map chooses the low-res patch under the pointer (bottom right here).
        page.get_by_role("tab", name="Fusion: attention").click()
        patch_map = page.locator("#patch-picker img")
        patch_map.wait_for(state="visible")
        box = patch_map.bounding_box()
        # The map's colour bar runs below it: the bottom-right patch is just above the bar.
        patch_map.click(position={"x": box["width"] * 0.95, "y": box["height"] * 0.85})
        last = str(engine.config.patches_per_side - 1)
        for slider in ("#patch-row", "#patch-col"):
            # 30 s, like the other waits: the click's round trip to the server is slow on a loaded 2-core CI.
            sync_api.expect(page.locator(f"{slider} input[type='number']")).to_have_value(last, timeout=30_000)

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)


def test_a_full_queue_says_busy_on_the_page_and_the_textbox_comes_back():
    engine = ChatEngine.load("tiny", max_new_tokens=8)
    started, release = threading.Event(), threading.Event()
    engine.model.generate = blocking_generate(started, release)  # holds the model until released
    with serving(engine, max_queue=1) as url, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            Client(url, verbose=False).submit({"text": "Hold on.", "files": []}, api_name="/chat")
            assert started.wait(60)
            waiting = httpx.post(f"{url}gradio_api/queue/join", json=chat_request(url, uuid.uuid4().hex, "Me?"))
            assert waiting.status_code == 200  # the queue's one place is taken
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            question = page.get_by_placeholder("Attach an image")
            question.fill("Anyone there?")
            question.press("Enter")
            page.get_by_text("This application is currently busy").first.wait_for()
            # Not left disabled, waiting for an answer that never comes: the question is back, ready to resend.
            sync_api.expect(question).to_be_editable()
            sync_api.expect(question).to_have_value("Anyone there?")
            sync_api.expect(page.locator("#chat [data-testid='user']")).to_have_count(0)
        finally:
            release.set()
            browser.close()


def pixel_stats(locator) -> tuple[float, float]:
    """Mean and spread of an element's grey levels, from a screenshot of it: enough to tell an empty panel
    from one with pictures, without comparing images by eye."""
    grey = np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("L"), dtype=np.float64)
    return float(grey.mean()), float(grey.std())


def test_an_example_the_relevance_panel_stop_and_clear_leave_the_page_in_clear_states():
    example = load_examples()[0]
    engine = ChatEngine.load("tiny", max_new_tokens=24)
    engine.model.generate = scripted_generate(engine, ANSWER, delay=0.3)
    with serving(engine) as url, chromium_page(url, viewport=VIEWPORT) as page:
        panel = page.locator("#relevance-panel")
        start = pixel_stats(panel)
        question = page.get_by_placeholder("Attach an image")

        # An example shows its question and expected answer, says to press Enter, and fills the textbox.
        page.get_by_text("then press Enter").first.wait_for()
        page.get_by_text(f"{example.question} (expected: {example.answer})").click()
        sync_api.expect(question).to_have_value(example.question)
        question.press("Enter")
        # While the answer streams, the user's bubble shows its image.
        page.locator("#chat [data-testid='user'] img").first.wait_for()
        assert not question.is_editable()  # still answering

        # The new panel: relevance maps (with colour bars) over the picture, and how to read them.
        page.locator("#relevance img").wait_for()
        page.get_by_text("How to read this").wait_for()
        sync_api.expect(question).to_be_editable()
        answered = pixel_stats(panel)
        assert answered[1] > start[1] + 5  # pictures, where the start state has none
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "relevance.png"), full_page=True)

        # One answer token instead of the whole answer: the maps are worked out again and change.
        whole = page.locator("#relevance img").get_attribute("src")
        page.get_by_label("For which part of the answer").click()
        page.get_by_role("option", name="token 1: 't'").click()
        sync_api.expect(page.locator("#relevance img")).not_to_have_attribute("src", whole)

        # Stop: the stopped turn stays in the chat, the textbox is empty, the panels say it was stopped.
        ran: dict = {}
        engine.model.generate = endless_generate(engine, ran, delay=0.05)
        question.fill("And what else is there?")
        question.press("Enter")
        assert ran["started"].wait(60)
        page.locator(".stop-button").click()
        page.get_by_text("stopped before it finished").first.wait_for()
        sync_api.expect(question).to_be_editable()
        sync_api.expect(question).to_have_value("")
        sync_api.expect(page.locator("#relevance img")).to_have_count(0)
        page.get_by_role("tab", name="Cost").click()
        sync_api.expect(page.locator("#cost")).not_to_contain_text("Answering")
        page.get_by_role("tab", name="Where the answer came from").click()

        # Clear: the chat empties and the panels are back in their start state, pixel for pixel (nearly).
        page.locator("#chat").get_by_label("Clear").click()
        sync_api.expect(page.locator("#chat [data-testid='user']")).to_have_count(0)
        page.get_by_text("Ask a question about an image").first.wait_for()
        cleared = pixel_stats(panel)
        assert abs(cleared[0] - start[0]) < 2 and abs(cleared[1] - start[1]) < 2


def test_closing_the_page_ends_its_chat_and_deletes_its_previews():
    example = load_examples()[0]
    engine = ChatEngine.load("tiny", max_new_tokens=4)
    engine.model.generate = scripted_generate(engine, ANSWER, delay=0)
    demo = build_demo(engine)
    _, url, _ = launch(demo, host="127.0.0.1", port=free_port(), prevent_thread_lock=True, quiet=True)

    def chats() -> list[ChatSession]:
        sessions = list(demo.state_holder.session_data.values())
        return [value for s in sessions for value in s.state_data.values() if isinstance(value, ChatSession)]

    try:
        with chromium_page(url) as page:
            page.locator("input[data-testid='file-upload']").set_input_files(str(example.image))
            question = page.get_by_placeholder("Attach an image")
            question.fill(example.question)
            question.press("Enter")
            page.locator("#chat [data-testid='bot']").get_by_text(ANSWER).wait_for()
            [chat] = [c for c in chats() if c.turns]
            [preview] = chat.files  # the image the chat shows
            assert Path(preview).is_file()
            page.close()
            assert wait_for(lambda: not any(c.turns for c in chats()), timeout=30)
            assert not Path(preview).exists()
    finally:
        demo.close()
