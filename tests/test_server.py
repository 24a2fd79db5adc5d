"""The demo's server limits, checked with plain HTTP on loopback: only the app's own files are served, uploads
over the size limit are refused, and a full queue answers "busy" at once instead of hanging."""

import http.client
import threading
import uuid
from urllib.parse import quote, urlsplit

import httpx
import pytest
from gradio_client import Client
from gradio_client.utils import QueueError
from test_app import chat_request, serving

from demo.engine import ChatEngine
from demo.examples import EXAMPLES_DIR, load_examples

ROOT = EXAMPLES_DIR.parent.parent
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # pandas 3 deprecations in Gradio


@pytest.fixture(scope="module")
def engine() -> ChatEngine:
    return ChatEngine.load("tiny", max_new_tokens=8)


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET `path` byte for byte as written: no client-side normalisation of "..", "%2e" or "//"."""
    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_only_the_apps_own_files_are_served(engine):
    app_py, readme = (ROOT / "app.py").read_bytes(), (ROOT / "README.md").read_bytes()
    example = load_examples()[0].image
    up = "../" * (len(EXAMPLES_DIR.parts) + 2)
    with serving(engine) as url:
        port = urlsplit(url).port
        attempts = [
            "/gradio_api/file=/etc/passwd",
            "/gradio_api/file=//etc/passwd",
            f"/gradio_api/file={up}etc/passwd",
            "/gradio_api/file=../../app.py",
            "/gradio_api/file=app.py",
            "/gradio_api/file=%2e%2e/%2e%2e/app.py",
            "/gradio_api/file=..%2f..%2fapp.py",
            "/gradio_api/file=%2e%2e%2f%2e%2e%2fapp.py",
            "/gradio_api/file=%252e%252e%252fapp.py",
            f"/gradio_api/file={ROOT}/app.py",
            f"/gradio_api/file={quote(str(ROOT / 'app.py'), safe='')}",
            f"/gradio_api/file={ROOT}/README.md",
            f"/gradio_api/file={ROOT}/sparsecut/build.py",
            f"/gradio_api/file={EXAMPLES_DIR}/../../app.py",
            f"/gradio_api/file={EXAMPLES_DIR}/%2e%2e/%2e%2e/app.py",
            f"/gradio_api/file={EXAMPLES_DIR}/..%2f..%2fREADME.md",
            f"/gradio_api/file=http://127.0.0.1:{port}/config",  # no fetching from loopback for the caller
            "/file=/etc/passwd",
            "/gradio_api/static/../../../app.py",
            "/static/%2e%2e/%2e%2e/%2e%2e/app.py",
            "/assets/..%2f..%2f..%2fapp.py",
            "/favicon.ico/../../app.py",
        ]
        answers = {path: raw_get(url, path) for path in attempts}
        allowed = raw_get(url, f"/gradio_api/file={example}")
    leaked = {
        path: status
        for path, (status, body) in answers.items()
        if status not in (403, 404) or b"root:" in body or app_py[:200] in body or readme[:200] in body
    }
    assert leaked == {}
    assert allowed == (200, example.read_bytes())  # the example scenes are served: the route itself works


def test_uploads_over_the_limit_are_refused(engine):
    with serving(engine, max_upload="1mb") as url:
        small = httpx.post(f"{url}gradio_api/upload", files={"files": ("small.png", b"x" * 100_000)})
        large = httpx.post(f"{url}gradio_api/upload", files={"files": ("large.png", b"x" * 2_000_000)})
    assert small.status_code == 200 and len(small.json()) == 1
    assert large.status_code == 413 and "maximum allowed size" in large.text


def blocking_generate(started: threading.Event, release: threading.Event):
    """A stand-in for `generate` that holds the model (its one concurrency slot) until `release` is set."""

    def generate(input_ids, streamer=None, **kwargs):
        streamer.put(input_ids)
        started.set()
        release.wait(120)
        streamer.end()
        return input_ids

    return generate


def test_a_full_queue_refuses_at_once_with_a_clear_message(engine, monkeypatch):
    started, release = threading.Event(), threading.Event()
    monkeypatch.setattr(engine.model, "generate", blocking_generate(started, release))
    with serving(engine, max_queue=1) as url:  # room for one waiting request
        try:
            running = Client(url, verbose=False).submit({"text": "Hold on.", "files": []}, api_name="/chat")
            assert started.wait(60)
            waiting = httpx.post(f"{url}gradio_api/queue/join", json=chat_request(url, uuid.uuid4().hex, "And me?"))
            refused = httpx.post(f"{url}gradio_api/queue/join", json=chat_request(url, uuid.uuid4().hex, "Me too?"))
            # gradio_client raises a clear error; the page shows "This application is currently busy" for a 503.
            with pytest.raises(QueueError, match="Queue is full"):
                Client(url, verbose=False).submit({"text": "Me too?", "files": []}, api_name="/chat").result(60)
            still_running = not running.done()
        finally:
            release.set()
        reply = running.result(timeout=60)
    assert waiting.status_code == 200, waiting.text
    assert refused.status_code == 503 and "Queue is full" in refused.json()["detail"]
    assert still_running  # refused while the queue was full, not after the model came free
    assert not reply.startswith("⚠️")  # and the request holding the model still completes
