"""The demo in a real browser (Playwright + Debian's Chromium, headless): upload an image, ask, watch the answer
stream in and the plots appear. Saves a screenshot to test-artifacts/. Skips without Chromium or Playwright."""

import threading
import uuid
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from test_app import chat_request, free_port, scripted_generate, serving, wait_for
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
ANSWER = "the star is red"
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # pandas 3 deprecations in Gradio


def test_upload_ask_and_see_the_answer_and_plots():
    example = load_examples()[0]
    engine = ChatEngine.load("tiny", max_new_tokens=24)
    engine.model.generate = scripted_generate(engine, ANSWER, delay=0.1)  # a real prefill, then ANSWER slowly
    with serving(engine) as url, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
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
            page.locator("#chart img").wait_for()
            page.locator("#shortcut-map img").wait_for()
            answer = chat.locator("[data-testid='bot']").last.inner_text()
            shown = [text.strip() for text in page.evaluate("window.answerTexts")]
            assert answer.strip() == ANSWER and {"the", "the star", "the star is"} <= set(shown)  # it grew

            # Clicking the patch map chooses the low-res patch under the pointer (bottom right here).
            page.get_by_role("tab", name="Multi-grained attention").click()
            patch_map = page.locator("#query-map img")
            patch_map.wait_for(state="visible")
            box = patch_map.bounding_box()
            patch_map.click(position={"x": box["width"] * 0.95, "y": box["height"] * 0.95})
            last = str(engine.config.patches_per_side - 1)
            for slider in ("#patch-row", "#patch-col"):
                # 30 s, like the other waits: the click's round trip to the server is slow on a loaded 2-core CI.
                sync_api.expect(page.locator(f"{slider} input[type='number']")).to_have_value(last, timeout=30_000)

            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
        finally:
            browser.close()


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
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
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
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.set_default_timeout(TIMEOUT_MS)
                page.goto(url)
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
                browser.close()
    finally:
        demo.close()
