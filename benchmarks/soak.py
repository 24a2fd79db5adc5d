"""Soak test of the demo server: N /chat requests over loopback, each with a new image in a new client session.

    python benchmarks/soak.py [--requests 1000] [--warm-up 100] [--out PATH.json]
                              # default out: benchmarks/results/soak-<machine>.json and .md

It starts `python app.py --model tiny` (a separate process, so its RSS is the server's alone) with an upload
folder of its own, and sends requests one after another the way Gradio's page and gradio_client do: upload the
image (POST /gradio_api/upload), join the queue with a new session hash (a new client session), read the event
stream to the end. Among every 20 requests (by index modulo 20):

- 0: a thin 20000x10 PNG; 5: a 100000x1 PNG (both refused: aspect ratio);
- 10: a 9000x9000 PNG (refused: decode size); 15: a 6000x4000 JPEG (served, decoded at a reduced scale);
- 3, 13: a 2800x2800 PNG (7.8 megapixels of noise, served: the largest kind of PNG within the limits);
- 7, 17: abandoned: the client uploads, joins and leaves as soon as its request starts;
- the rest: a new 640x480 PNG (ShapesWorld shapes on noise).

Reported: the server's RSS after start, after `--warm-up` requests, every 100 requests and at the end; the
largest rise of RSS above its value before a request, while that request ran (sampled every 20 ms), per kind;
the files in the upload folder at each checkpoint and after `--file-max-age` + a sweep at the end; and what the
client saw (served, refused with the image's message, left). `check_bounds` says which targets were missed.
tests/test_soak.py runs a short version and asserts the bounds.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import shlex
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the repository's `demo` and `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from demo.uploads import count_files  # noqa: E402

MAX_REQUESTS = 5000
BOUNDS = {  # the targets (issue: bounded memory under any upload and any number of requests)
    "single_request_peak_mb": 50,
    "growth_after_warm_up_mb": 100,
    "growth_over_last_half_mb": 10,  # "no growth": allocator noise only
}
KINDS = {0: "thin 20000x10", 5: "thin 100000x1", 10: "huge PNG 9000x9000", 15: "JPEG 6000x4000"}
KINDS.update({3: "PNG 2800x2800", 13: "PNG 2800x2800", 7: "abandoned", 17: "abandoned"})


def kind_of(index: int) -> str:
    return KINDS.get(index % 20, "new 640x480")


# --- images -----------------------------------------------------------------------------------------------------
def png_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def unique_png(data: bytes, index: int) -> bytes:
    """The PNG with a tEXt chunk naming the request before IEND: new bytes (a new upload) for the same pixels."""
    text = b"Comment\x00request %d" % index
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
    return data[:-12] + chunk + data[-12:]


@functools.cache
def base_image(kind: str) -> bytes:
    """The large kinds are drawn once (drawing a 9000x9000 image takes seconds); each request makes them new."""
    if kind == "thin 20000x10":
        return png_bytes(Image.new("RGB", (20000, 10), (30, 120, 200)))
    if kind == "thin 100000x1":
        return png_bytes(Image.new("RGB", (100000, 1), (200, 120, 30)))
    if kind == "huge PNG 9000x9000":
        return png_bytes(Image.new("RGB", (9000, 9000), (40, 160, 90)))
    if kind == "PNG 2800x2800":  # 7.8 megapixels: just within the decode limit for RGB PNG
        image = Image.new("RGB", (2800, 2800), (240, 240, 230))
        ImageDraw.Draw(image).ellipse((600, 600, 2200, 2200), fill=(30, 60, 200))
        return png_bytes(image)
    image = Image.new("RGB", (6000, 4000), (220, 220, 210))  # JPEG 6000x4000
    ImageDraw.Draw(image).ellipse((1000, 1000, 3000, 3000), fill=(200, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def make_image(kind: str, index: int) -> tuple[str, bytes]:
    """A new image of `kind` (a file name and its bytes): every request sends different bytes."""
    if kind == "JPEG 6000x4000":
        return "photo.jpg", base_image(kind) + b"request %d" % index  # bytes after the end marker are ignored
    if kind != "new 640x480" and kind != "abandoned":
        return f"{kind.split()[0].lower()}.png", unique_png(base_image(kind), index)
    rng = np.random.default_rng(index)
    image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.integers(0, 560), rng.integers(0, 400)
        draw.rectangle((x, y, x + 80, y + 80), fill=tuple(rng.integers(0, 255, 3).tolist()))
    return "scene.png", png_bytes(image)


# --- the server -------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    uploads: Path
    log: Path

    @property
    def rss_mb(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / 2**20


def start_server(scratch: Path, max_new_tokens: int, file_max_age: float, timeout: float = 300) -> Server:
    port = free_port()
    uploads = scratch / "uploads"
    log = scratch / "server.log"
    env = {**os.environ, "GRADIO_TEMP_DIR": str(uploads), "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "app.py", "--model", "tiny", "--device", "cpu", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--max-new-tokens", str(max_new_tokens), "--file-max-age", str(file_max_age)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}config", timeout=5).status_code == 200:
                return Server(process, url, uploads, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"app.py did not start within {timeout} s")


class PeakSampler:
    """Samples the server's RSS every `every` s; `peak()` is the largest sample since the last `reset()`."""

    def __init__(self, server: Server, every: float = 0.02):
        self.process = psutil.Process(server.process.pid)
        self.every = every
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self._peak = max(self._peak, self.process.memory_info().rss)
            except psutil.Error:
                return

    def reset(self) -> None:
        self._peak = self.process.memory_info().rss

    def peak_mb(self) -> float:
        return max(self._peak, self.process.memory_info().rss) / 2**20

    def stop(self) -> None:
        self._stop.set()


# --- one request ------------------------------------------------------------------------------------------------
def chat_fn_index(url: str) -> int:
    config = httpx.get(f"{url}config", timeout=30).json()
    return next(d["id"] for d in config["dependencies"] if d.get("api_name") == "chat")


def request(url: str, fn_index: int, name: str, data: bytes, leave: bool, timeout: float) -> tuple[str, str]:
    """Upload `data`, ask about it in a new client session; -> (outcome, reply). outcome: served, refused (a ⚠️ reply),
    left (the client left), failed (anything else)."""
    session = uuid.uuid4().hex
    with httpx.Client(timeout=timeout) as http:
        uploaded = http.post(f"{url}gradio_api/upload", files={"files": (name, data)})
        if uploaded.status_code != 200:
            return "refused", f"HTTP {uploaded.status_code}: {uploaded.text[:200]}"
        path = uploaded.json()[0]
        file = {"path": path, "orig_name": name, "size": len(data), "meta": {"_type": "gradio.FileData"}}
        body = {"data": [{"text": "What is in the picture?", "files": [file]}, None, 8, 0, 1]}
        joined = http.post(f"{url}gradio_api/queue/join", json={**body, "fn_index": fn_index, "session_hash": session})
        if joined.status_code != 200:
            return "failed", f"join: HTTP {joined.status_code}: {joined.text[:200]}"
        with http.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session}) as events:
            for line in events.iter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if leave and message.get("msg") in ("process_starts", "process_generating"):
                    return "left", ""
                if message.get("msg") == "process_completed":
                    output = message.get("output") or {}
                    if not message.get("success", False):
                        return "failed", str(output.get("error"))[:200]
                    reply = output["data"][0]
                    return ("refused" if reply.startswith("⚠️") else "served"), reply
    return "failed", "the event stream ended without an answer"


# --- the run ----------------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    requests: int
    rss_mb: float
    files: dict[str, int]


@dataclass
class Soak:
    checkpoints: list[Checkpoint] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)  # (kind, outcome) -> count
    peaks_mb: dict[str, float] = field(default_factory=dict)  # kind -> largest rise above the RSS before it
    replies: dict[str, str] = field(default_factory=dict)  # kind -> a reply it got (the first)
    failures: list[str] = field(default_factory=list)


def run_soak(
    requests: int,
    warm_up: int,
    scratch: Path,
    max_new_tokens: int = 8,
    file_max_age: float = 30,
    every: int = 100,
    timeout: float = 120,
) -> dict:
    if not (1 <= requests <= MAX_REQUESTS and 0 <= warm_up < requests):
        raise ValueError(f"requests must be 1..{MAX_REQUESTS} and warm_up 0..requests-1; got {requests}, {warm_up}")
    server = start_server(scratch, max_new_tokens, file_max_age)
    soak = Soak()
    began = time.perf_counter()
    try:
        fn_index = chat_fn_index(server.url)
        sampler = PeakSampler(server)
        soak.checkpoints.append(Checkpoint(0, round(server.rss_mb, 1), count_files(server.uploads)))
        for index in range(requests):
            kind = kind_of(index)
            name, data = make_image(kind, index)
            sampler.reset()
            before = server.rss_mb
            outcome, reply = request(server.url, fn_index, name, data, kind == "abandoned", timeout)
            time.sleep(0.05 if kind != "abandoned" else 0.3)  # let the request's step finish on the server
            soak.peaks_mb[kind] = round(max(soak.peaks_mb.get(kind, 0.0), sampler.peak_mb() - before), 1)
            soak.outcomes[(kind, outcome)] += 1
            soak.replies.setdefault(f"{kind}: {outcome}", reply[:300])
            if outcome == "failed":
                soak.failures.append(f"request {index} ({kind}): {reply}")
            done = index + 1
            if done == warm_up or done % every == 0 or done == requests:
                soak.checkpoints.append(Checkpoint(done, round(server.rss_mb, 1), count_files(server.uploads)))
        sampler.stop()
        time.sleep(file_max_age + max(1.0, min(30, file_max_age / 2)) + 2)  # one sweep after the files age
        after_sweep = {"rss_mb": round(server.rss_mb, 1), "files": count_files(server.uploads)}
        alive = server.process.poll() is None
    finally:
        server.process.terminate()
        try:
            server.process.wait(30)
        except subprocess.TimeoutExpired:
            server.process.kill()
    return summarise(soak, requests, warm_up, max_new_tokens, file_max_age, after_sweep, alive, began)


def summarise(soak: Soak, requests, warm_up, max_new_tokens, file_max_age, after_sweep, alive, began) -> dict:
    by_count = {c.requests: c for c in soak.checkpoints}
    warm = by_count.get(warm_up, soak.checkpoints[0])
    end = soak.checkpoints[-1]
    half = min(soak.checkpoints, key=lambda c: abs(c.requests - requests // 2))
    last_half = [c for c in soak.checkpoints if c.requests >= half.requests]
    slope = trend_mb(last_half) * (end.requests - half.requests) if len(last_half) >= 3 else None
    outcomes: dict[str, dict[str, int]] = {}
    for (kind, outcome), n in sorted(soak.outcomes.items()):
        outcomes.setdefault(kind, {})[outcome] = n
    report = {
        "requests": requests,
        "warm_up": warm_up,
        "max_new_tokens": max_new_tokens,
        "file_max_age_s": file_max_age,
        "server_alive_at_end": alive,
        "checkpoints": [c.__dict__ for c in soak.checkpoints],
        "rss_after_warm_up_mb": warm.rss_mb,
        "rss_end_mb": end.rss_mb,
        "growth_after_warm_up_mb": round(end.rss_mb - warm.rss_mb, 1),
        "growth_over_last_half_mb": round(end.rss_mb - half.rss_mb, 1),
        # The least-squares line through the checkpoints of the last half, over the last half: RSS moves by tens of
        # MB between two checkpoints (a 31 MB decode buffer that the heap keeps or returns), the line much less.
        "trend_over_last_half_mb": None if slope is None else round(slope, 1),
        "last_half_from": half.requests,
        "single_request_peak_mb": soak.peaks_mb,
        "after_sweep": after_sweep,
        "outcomes": outcomes,
        "replies": soak.replies,
        "failures": soak.failures[:20],
        "wall_s": round(time.perf_counter() - began, 1),
    }
    report["missed"] = check_bounds(report)
    return report


def trend_mb(checkpoints: list[Checkpoint]) -> float:
    """The slope, in MB per request, of the least-squares line through the checkpoints' RSS."""
    x = np.asarray([c.requests for c in checkpoints], dtype=float)
    y = np.asarray([c.rss_mb for c in checkpoints], dtype=float)
    return float(np.polyfit(x, y, 1)[0])


def check_bounds(report: dict) -> list[str]:
    """The targets the run missed (an empty list: all met)."""
    missed = []
    worst = max(report["single_request_peak_mb"].values(), default=0.0)
    if worst > BOUNDS["single_request_peak_mb"]:
        missed.append(
            f"a single request raised RSS by {worst} MB at its peak (bound {BOUNDS['single_request_peak_mb']})"
        )
    if report["growth_after_warm_up_mb"] > BOUNDS["growth_after_warm_up_mb"]:
        missed.append(f"growth_after_warm_up_mb = {report['growth_after_warm_up_mb']} (bound 100)")
    trend = report["trend_over_last_half_mb"]
    if trend is not None and trend > BOUNDS["growth_over_last_half_mb"]:
        missed.append(f"trend_over_last_half_mb = {trend} (bound {BOUNDS['growth_over_last_half_mb']})")
    at_start = report["checkpoints"][0]["files"]["other"]  # the example scenes' copies, made at start
    if report["after_sweep"]["files"]["other"] > at_start:
        missed.append(f"files left in the upload folder after a sweep: {report['after_sweep']['files']}")
    if report["failures"]:
        missed.append(f"{len(report['failures'])} request(s) failed")
    if not report["server_alive_at_end"]:
        missed.append("the server died")
    return missed


# --- the report -------------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    from sparsecut.utils import markdown_table

    info = report["machine"]
    checkpoints = markdown_table(
        ["after requests", "server RSS (MB)", "preview files", "other files in the upload folder"],
        [[c["requests"], c["rss_mb"], c["files"]["previews"], c["files"]["other"]] for c in report["checkpoints"]],
        align="rrrr",
    )
    outcome_rows = [
        [kind, ", ".join(f"{k} {n}" for k, n in counts.items()), report["single_request_peak_mb"].get(kind, "-")]
        for kind, counts in report["outcomes"].items()
    ]
    outcomes = markdown_table(["request kind", "outcomes", "largest RSS rise during one (MB)"], outcome_rows)
    replies = [f"- {kind}: `{reply}`" for kind, reply in report["replies"].items() if reply]
    sweep = report["after_sweep"]
    trend = report["trend_over_last_half_mb"]
    trend = "-" if trend is None else f"{trend:+}"
    return "\n".join(
        [
            "# Demo soak test on loopback",
            "",
            f"- command: `{report['command']}`",
            f"- machine: {info['cpu_model']}, {info['cpu_logical_cores']} logical cores, niceness {info['niceness']}, "
            f"GPU: {info['gpu'] or 'none'}; load average at the end {info['load_average']}",
            f"- versions: python {info['python']}, torch {info['torch']}, gradio {info['gradio']}",
            f"- server: `python app.py --model tiny --max-new-tokens {report['max_new_tokens']} --file-max-age "
            f"{report['file_max_age_s']:g}` in its own process; {report['requests']} /chat requests one after "
            f"another, each a new client session with a new image; {report['wall_s']} s in all",
            "",
            f"RSS after the {report['warm_up']}-request warm-up: {report['rss_after_warm_up_mb']} MB; at the end: "
            f"{report['rss_end_mb']} MB: **{report['growth_after_warm_up_mb']:+} MB** after warm-up (bound "
            f"{BOUNDS['growth_after_warm_up_mb']}); over the requests after {report['last_half_from']}: "
            f"{report['growth_over_last_half_mb']:+} MB from checkpoint to checkpoint, **{trend}** MB along the "
            f"least-squares line through the checkpoints (bound {BOUNDS['growth_over_last_half_mb']}).",
            "",
            checkpoints,
            "",
            f"After the last request, {report['file_max_age_s']:g} s and a sweep: RSS {sweep['rss_mb']} MB, "
            f"{sweep['files']['previews']} preview file(s), {sweep['files']['other']} other file(s) in the upload "
            f"folder (at the start: {report['checkpoints'][0]['files']['other']}, Gradio's copies of the example "
            "scenes).",
            "",
            outcomes,
            "",
            "Replies (the first of each kind and outcome):",
            "",
            *replies,
            "",
            f"Targets missed: {'; '.join(report['missed']) or 'none'}.",
            "",
        ]
    )


def default_out() -> Path:
    from benchmarks.bench import cpu_model, slug

    return ROOT / "benchmarks" / "results" / f"soak-cpu-{slug(cpu_model())}.json"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help=f"requests in all (1..{MAX_REQUESTS})")
    parser.add_argument("--warm-up", type=int, default=100, help="requests before the RSS baseline")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--file-max-age", type=float, default=30, help="the server's --file-max-age, seconds")
    parser.add_argument("--every", type=int, default=100, help="report RSS and files every this many requests")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/soak-<machine>)")
    args = parser.parse_args(argv)

    from benchmarks.load_test import machine

    with tempfile.TemporaryDirectory() as scratch:
        report = run_soak(
            args.requests, args.warm_up, Path(scratch), args.max_new_tokens, args.file_max_age, args.every
        )
    report["command"] = shlex.join(["python", "benchmarks/soak.py", *(argv if argv is not None else sys.argv[1:])])
    report["machine"] = machine()
    out = args.out or default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"written: {out} and {out.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    raise SystemExit(1 if main()["missed"] else 0)
