"""Load test of the demo on loopback: concurrent gradio_client sessions, each with its own image and follow-ups.

    python benchmarks/load_test.py [--sessions 8] [--turns 3] [--model PATH] [--out PATH.json]
                                   # default out: benchmarks/results/load-<machine>.json and .md

The demo (`demo.ui.build_demo` + `launch`, with the limits app.py serves it with) runs in this process on a free
127.0.0.1 port, on the tiny random model unless --model is given. Each session is a `gradio_client.Client` with
its own ShapesWorld scene: its first question uploads the scene, the next `turns - 1` are follow-ups about it,
and after every answer the session reads /visualize. All sessions start together.

Checked per session:
- every request completes, or is refused cleanly (a full queue: gradio_client's QueueError), within --timeout s;
  anything else (an error, a timeout) is a failure;
- isolation: each reply equals the reply the same conversation gets when run alone through the library before
  the server starts (greedy decoding, so a reply is a function of the session's own image and history only),
  and /visualize's numbers (the mean shortcut ratios at the image tokens, the prompt's input tokens) are that
  conversation's. The scenes are checked to give different numbers, so a session that saw another's image or
  history would show.

Writes <out>.json and <out>.md: p50 / p95 latency per request (from submit to the complete answer, waiting in
the queue included) for /chat and /visualize, the counts, the machine and the command. tests/test_load.py runs
the same code with fewer sessions and asserts isolation and clean completion, not timings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the repository's `demo` and `sparsecut` importable
    sys.path.insert(0, str(ROOT))

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.utils import QueueError  # noqa: E402

from demo.engine import ChatEngine, ChatSession, GenerationSettings  # noqa: E402
from demo.ui import build_demo, launch  # noqa: E402
from sparsecut.data import shapesworld  # noqa: E402
from sparsecut.inspection import render_visuals  # noqa: E402
from sparsecut.utils import markdown_table  # noqa: E402

MAX_SESSIONS, MAX_TURNS = 64, 10  # bounds on what one run may ask of the machine
IMAGE_SIZE = 128
REL_TOLERANCE = 1e-4  # shortcut means travel through float32 and JSON


@dataclass
class Conversation:
    image: Path
    questions: list[str]


@dataclass
class Observed:
    """What one turn of a conversation gave: the reply and the numbers that identify its image and history."""

    reply: str
    input_tokens: int | None
    shortcut_means: list[float | None]


@dataclass
class SessionResult:
    turns: list[Observed] = field(default_factory=list)
    chat_latencies: list[float] = field(default_factory=list)  # seconds, submit -> complete
    visualize_latencies: list[float] = field(default_factory=list)
    outcome: str = "completed"  # "completed", "refused" (queue full), "failed"
    error: str | None = None


# --- conversations and what they should give ----------------------------------------------------------------
def make_conversations(sessions: int, turns: int, directory: Path, seed: int = 0) -> list[Conversation]:
    """One ShapesWorld scene per session, written to `directory`, with `turns` different questions about it."""
    directory.mkdir(parents=True, exist_ok=True)
    conversations = []
    for index in range(sessions):
        rng = shapesworld.scene_rng(seed, "load-test", index)
        scene = shapesworld.sample_scene(rng, min_objects=2)
        image = directory / f"session-{index}.png"
        shapesworld.render(scene, IMAGE_SIZE).save(image)
        questions = [q.text for q in shapesworld.make_questions(scene, turns, rng)]
        questions += [f"Tell me more ({k})." for k in range(turns - len(questions))]  # if the scene offers fewer
        conversations.append(Conversation(image, questions))
    return conversations


def observe(reply: str, summary: dict) -> Observed:
    cost = summary.get("cost") or {}
    means = [shortcut["mean_ratio"] for shortcut in summary.get("shortcuts", [])]
    return Observed(reply, cost.get("input_tokens"), means)


def expected_turns(engine: ChatEngine, conversation: Conversation, settings: GenerationSettings) -> list[Observed]:
    """The conversation run alone, through the library, as the server runs each request."""
    session, observed = ChatSession(), []
    for index, question in enumerate(conversation.questions):
        image = str(conversation.image) if index == 0 else None
        *_, turn = session.ask(engine, question, image, settings)
        observed.append(observe(turn.reply(), render_visuals(session.last_answer).summary))
    return observed


def same(expected: Observed, observed: Observed) -> bool:
    if expected.reply != observed.reply or expected.input_tokens != observed.input_tokens:
        return False
    if len(expected.shortcut_means) != len(observed.shortcut_means):
        return False
    for a, b in zip(expected.shortcut_means, observed.shortcut_means):
        if (a is None) != (b is None) or (a is not None and not math.isclose(a, b, rel_tol=REL_TOLERANCE)):
            return False
    return True


def isolation(expected: list[list[Observed]], results: list[SessionResult]) -> dict:
    """Sessions whose turns differ from their own conversation run alone, and whether the conversations can be
    told apart at all by the first turn's numbers (else a mix-up could go unseen)."""
    foreign = [i for i, (want, got) in enumerate(zip(expected, results)) if not all(map(same, want, got.turns))]
    firsts = [turns[0] for turns in expected]
    distinguishable = all(not same(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1 :])
    return {"sessions_not_matching_their_own_conversation": foreign, "conversations_distinguishable": distinguishable}


# --- the sessions -----------------------------------------------------------------------------------------------
def run_session(
    url: str, conversation: Conversation, max_new_tokens: int, timeout: float, start: threading.Barrier
) -> SessionResult:
    result = SessionResult()
    client = Client(url, verbose=False)  # its own session: its own conversation state on the server
    try:
        start.wait(timeout)
        for index, question in enumerate(conversation.questions):
            files = [handle_file(str(conversation.image))] if index == 0 else []
            began = time.perf_counter()
            job = client.submit({"text": question, "files": files}, max_new_tokens, 0, 1, api_name="/chat")
            reply = job.result(timeout=timeout)
            result.chat_latencies.append(time.perf_counter() - began)
            began = time.perf_counter()
            *_, info = client.submit(api_name="/visualize").result(timeout=timeout)
            result.visualize_latencies.append(time.perf_counter() - began)
            result.turns.append(observe(reply, info))
    except QueueError as error:
        result.outcome, result.error = "refused", str(error)
    except (FutureTimeout, TimeoutError):
        result.outcome, result.error = "failed", f"no answer within {timeout} s"
    except Exception as error:  # anything else is a failure of the server or of the test
        result.outcome, result.error = "failed", f"{type(error).__name__}: {error}"
    finally:
        client.close()
    return result


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def latency_stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    seconds = np.asarray(values)
    return {
        "n": len(values),
        "p50_s": round(float(np.percentile(seconds, 50)), 4),
        "p95_s": round(float(np.percentile(seconds, 95)), 4),
        "mean_s": round(float(seconds.mean()), 4),
        "max_s": round(float(seconds.max()), 4),
    }


def run_load_test(
    engine: ChatEngine, sessions: int, turns: int, directory: Path, max_new_tokens: int = 24, timeout: float = 300
) -> dict:
    """Serve the demo for `engine` on loopback, run `sessions` concurrent conversations of `turns` questions,
    and report outcomes, isolation and latencies (see the module docstring)."""
    if not (1 <= sessions <= MAX_SESSIONS and 1 <= turns <= MAX_TURNS):
        raise ValueError(f"sessions must be 1..{MAX_SESSIONS} and turns 1..{MAX_TURNS}; got {sessions}, {turns}.")
    conversations = make_conversations(sessions, turns, directory)
    settings = GenerationSettings(max_new_tokens, 0.0, 1.0)  # what /chat gets below: greedy
    expected = [expected_turns(engine, conversation, settings) for conversation in conversations]

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo = build_demo(engine)
    _, url, _ = launch(demo, host="127.0.0.1", port=free_port(), prevent_thread_lock=True, quiet=True)
    start = threading.Barrier(sessions)
    began = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=sessions) as pool:
            futures = [pool.submit(run_session, url, c, max_new_tokens, timeout, start) for c in conversations]
            results = [future.result() for future in futures]
    finally:
        demo.close()
    wall = time.perf_counter() - began

    outcomes = [result.outcome for result in results]
    return {
        "sessions": sessions,
        "turns": turns,
        "max_new_tokens": max_new_tokens,
        "timeout_s": timeout,
        "model": engine.describe(),
        "counts": {
            "sessions_completed": outcomes.count("completed"),
            "sessions_refused": outcomes.count("refused"),
            "sessions_failed": outcomes.count("failed"),
            "chat_requests_completed": sum(len(r.chat_latencies) for r in results),
            "visualize_requests_completed": sum(len(r.visualize_latencies) for r in results),
        },
        "errors": [r.error for r in results if r.error],
        "isolation": isolation(expected, results),
        "latency": {
            "chat": latency_stats([s for r in results for s in r.chat_latencies]),
            "visualize": latency_stats([s for r in results for s in r.visualize_latencies]),
        },
        "wall_s": round(wall, 2),
        "per_session": [asdict(result) for result in results],
    }


# --- the report -------------------------------------------------------------------------------------------------
def machine() -> dict:
    import platform

    import psutil
    import torch

    from benchmarks.bench import cpu_model, load_average, version

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "cpu_model": cpu_model(),
        "cpu_logical_cores": psutil.cpu_count(logical=True),
        "torch_threads": torch.get_num_threads(),
        "niceness": os.nice(0),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        "load_average": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "gradio": version("gradio"),
        "gradio_client": version("gradio_client"),
    }


def markdown(report: dict) -> str:
    counts, latency, isolated = report["counts"], report["latency"], report["isolation"]
    info = report["machine"]
    quantiles = ("p50_s", "p95_s", "max_s")
    latency_table = markdown_table(
        ["endpoint", "requests", "p50", "p95", "max"],
        [[f"/{name}", stats["n"], *(stats.get(key, "-") for key in quantiles)] for name, stats in latency.items()],
    )
    count_keys = ("sessions_completed", "sessions_refused", "sessions_failed", "chat_requests_completed")
    counts_table = markdown_table(
        ["sessions completed", "refused (queue full)", "failed", "/chat completed", "/visualize completed"],
        [[*(counts[key] for key in count_keys), counts["visualize_requests_completed"]]],
    )
    foreign = isolated["sessions_not_matching_their_own_conversation"]
    return "\n".join(
        [
            "# Demo load test on loopback",
            "",
            f"- command: `{report['command']}`",
            f"- {report['note']}",
            f"- model: {report['model']}",
            f"- machine: {info['cpu_model']}, {info['cpu_logical_cores']} logical cores, torch threads "
            f"{info['torch_threads']}, niceness {info['niceness']}, GPU: {info['gpu'] or 'none'}; load average at "
            f"the end {info['load_average']}",
            f"- versions: python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
            f"gradio {info['gradio']}, gradio_client {info['gradio_client']}",
            f"- {report['sessions']} concurrent sessions x {report['turns']} turns (a /chat request of at most "
            f"{report['max_new_tokens']} new tokens, greedy, then /visualize), each session with its own "
            f"ShapesWorld scene; {report['wall_s']} s in all",
            "",
            counts_table,
            "",
            "Latency per request, from submit to the complete answer (queueing included), seconds:",
            "",
            latency_table,
            "",
            f"Isolation: sessions whose replies or /visualize numbers differ from their own conversation run alone: "
            f"{foreign or 'none'}; conversations distinguishable by their numbers: "
            f"{isolated['conversations_distinguishable']}.",
            *(["", "Errors:", *[f"- {error}" for error in report["errors"]]] if report["errors"] else []),
            "",
        ]
    )


def default_out() -> Path:
    import torch

    from benchmarks.bench import cpu_model, slug

    device = f"cuda-{slug(torch.cuda.get_device_name())}" if torch.cuda.is_available() else f"cpu-{slug(cpu_model())}"
    return ROOT / "benchmarks" / "results" / f"load-{device}.json"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=8, help=f"concurrent sessions (1..{MAX_SESSIONS})")
    parser.add_argument("--turns", type=int, default=3, help=f"questions per session (1..{MAX_TURNS})")
    parser.add_argument("--model", default="tiny", help="checkpoint path, or 'tiny' for the tiny random model")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--timeout", type=float, default=300, help="seconds one request may take")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/load-<machine>)")
    args = parser.parse_args(argv)

    import tempfile

    engine = ChatEngine.load(args.model, None, args.device, max_new_tokens=args.max_new_tokens)
    print(f"Load test: {args.sessions} sessions x {args.turns} turns on {engine.describe()}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        report = run_load_test(engine, args.sessions, args.turns, Path(scratch), args.max_new_tokens, args.timeout)
    report["command"] = shlex.join(["python", "benchmarks/load_test.py", *(argv if argv is not None else sys.argv[1:])])
    report["note"] = (
        "CPU loopback run: the server, the model and the client sessions share one process and this machine's "
        "cores (with other jobs running), so the latencies are those of this machine under this load, not of a "
        "deployment."
        if engine.device.type == "cpu"
        else "GPU loopback run: the server, the model and the client sessions share one process."
    )
    report["machine"] = machine()
    out = args.out or default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"written: {out} and {out.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    report = main()
    counts = report["counts"]
    clean = counts["sessions_failed"] == 0 and not report["isolation"]["sessions_not_matching_their_own_conversation"]
    raise SystemExit(0 if clean else 1)
