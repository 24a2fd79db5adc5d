"""Check the CUDA paths in one go: the CUDA tests, the app on CUDA with its default quantization, and the bench.

    python scripts/gpu_check.py [--out benchmarks/results/gpu-check] [--budget 480]

Steps, in order, each with its own time limit inside the budget (seconds of wall time for the whole run):
1. machine  - the GPU, driver, torch / CUDA / bitsandbytes versions (machine.json)
2. tests    - `pytest -m cuda`: 4-bit / 8-bit loading and generation, bf16 cached == uncached, shortcut
              statistics, a real CUDA out-of-memory in the chat engine (cuda-tests.xml, tests.log)
3. app      - `python app.py` on CUDA with its default quantization (4-bit), driven through gradio_client:
              one example on /chat and one /visualize call; the peak memory the page reports (app.json, app.log)
4. bench    - `sparsecut bench --device cuda`: the default model and the 7B-class shape in bf16, 8-bit and nf4,
              ratios against the LLaVA-style and appended variants, decode against the bandwidth bound (bench/)
5. compile  - the same in bf16 with `--compile` (static KV cache + torch.compile of the decode step)

On a machine without CUDA the steps that need it are skipped and say so (the tests still run and skip
themselves); tests/test_gpu_check.py runs this script that way. Everything goes to --out: one log per step,
summary.json and summary.md (the table of steps: passed / failed / skipped / timed out, with seconds and why).
Exit status 0 when no step failed or timed out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu-check"
STEP_LIMITS = {"tests": 150, "app": 120, "bench": 240, "compile": 150}  # seconds; cut to what the budget has left
APP_START_LIMIT = 90  # seconds for app.py to load the model and listen


@dataclass
class Step:
    name: str
    status: str  # "passed", "failed", "skipped", "timed out"
    seconds: float
    detail: str  # why skipped / what failed / what it measured, in one line


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_logged(command: list[str], log: Path, limit: float, env: dict | None = None) -> tuple[int | None, float]:
    """Run `command` in the repository with stdout+stderr to `log`; (exit code or None if it ran past `limit`,
    seconds)."""
    started = time.perf_counter()
    with log.open("w") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        try:
            code = subprocess.run(
                command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=limit, env=env
            ).returncode
        except subprocess.TimeoutExpired:
            code = None
    return code, time.perf_counter() - started


def machine(out: Path) -> Step:
    import torch

    info = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
    }
    try:
        from importlib.metadata import version

        info["bitsandbytes"] = version("bitsandbytes")
    except Exception:  # not installed: the quantized steps will say so
        info["bitsandbytes"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count()
        )
        try:
            smi = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
            info["nvidia_smi"] = subprocess.run(smi, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["nvidia_smi"] = None
    (out / "machine.json").write_text(json.dumps(info, indent=2) + "\n")
    return Step("machine", "passed", 0.0, info.get("gpu") or "no CUDA GPU: the CUDA steps are skipped")


def tests(out: Path, limit: float) -> Step:
    xml = out / "cuda-tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", f"--junitxml={xml}"]
    code, seconds = run_logged(command, out / "tests.log", limit)
    if code is None:
        return Step("tests", "timed out", seconds, f"pytest -m cuda ran past {limit:.0f} s")
    suite = ElementTree.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    ran = counts["tests"] - counts["skipped"]
    detail = f"{ran} ran, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
    if code not in (0, 5) or counts["failures"] or counts["errors"]:
        return Step("tests", "failed", seconds, detail)
    return Step("tests", "passed" if ran else "skipped", seconds, detail if ran else f"no CUDA GPU ({detail})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app(out: Path, limit: float) -> Step:
    """Serve app.py on CUDA with its defaults, ask one example through /chat, read /visualize."""
    from gradio_client import Client, handle_file

    from demo.examples import load_examples

    port, started = free_port(), time.perf_counter()
    log = (out / "app.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "app.py", "--port", str(port), "--device", "cuda"],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url, client = f"http://127.0.0.1:{port}/", None
        while client is None and time.perf_counter() - started < min(APP_START_LIMIT, limit):
            if server.poll() is not None:
                return Step("app", "failed", time.perf_counter() - started, f"app.py exited with {server.returncode}")
            try:
                client = Client(url, verbose=False)
            except Exception:  # not listening yet
                time.sleep(2)
        if client is None:
            return Step("app", "timed out", time.perf_counter() - started, "app.py did not listen in time")
        example = load_examples()[0]
        asked = time.perf_counter()
        reply = client.predict({"text": example.question, "files": [handle_file(str(example.image))]}, api_name="/chat")
        answered = time.perf_counter() - asked
        *pictures, info = client.predict(api_name="/visualize")
        cost = info.get("cost") or {}
        result = {
            "question": example.question,
            "expected": example.answer,
            "reply": reply,
            "right": example.answer.lower() in reply.lower(),
            "seconds_to_answer": round(answered, 2),
            "pictures": sum(p is not None for p in pictures),
            "quantization": cost.get("quantization"),
            "device": cost.get("device"),
            "peak_memory_mib": round(cost.get("peak_memory_bytes", 0) / 2**20, 1),
            "memory_kind": cost.get("memory_kind"),
        }
        (out / "app.json").write_text(json.dumps(result, indent=2) + "\n")
        ok = (
            not reply.startswith("⚠️")
            and result["pictures"] == len(pictures)
            and cost.get("device", "").startswith("cuda")
        )
        detail = (
            f"{result['quantization']} on {result['device']}: {reply!r} (expected {example.answer!r}); "
            f"{result['memory_kind']} {result['peak_memory_mib']} MiB"
        )
        return Step("app", "passed" if ok else "failed", time.perf_counter() - started, detail)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def bench(out: Path, limit: float, compile: bool) -> Step:
    name = "compile" if compile else "bench"
    command = [sys.executable, "-m", "sparsecut.cli", "bench", "--device", "cuda", "--out-dir", str(out / name)]
    if compile:
        command += ["--compile", "--quantization", "none"]
    code, seconds = run_logged(command, out / f"{name}.log", limit)
    if code is None:
        return Step(name, "timed out", seconds, f"ran past {limit:.0f} s")
    reports = sorted((out / name).glob("*.md"))
    detail = f"exit {code}; report: {reports[0].relative_to(out) if reports else 'none'}"
    return Step(name, "passed" if code == 0 and reports else "failed", seconds, detail)


def write_summary(out: Path, steps: list[Step], command: str) -> None:
    from sparsecut.utils import markdown_table

    (out / "summary.json").write_text(json.dumps({"command": command, "steps": [asdict(s) for s in steps]}, indent=2))
    rows = [[s.name, s.status, f"{s.seconds:.0f}", s.detail] for s in steps]
    table = markdown_table(["step", "status", "s", "detail"], rows, align="llrl")
    (out / "summary.md").write_text(f"# CUDA check\n\n`{command}`\n\n{table}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument("--budget", type=float, default=480, help="seconds of wall time for all steps")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cuda = has_cuda()
    steps = [machine(args.out)]

    def left(step: str) -> float:
        return max(1.0, min(STEP_LIMITS[step], args.budget - (time.perf_counter() - started)))

    steps.append(tests(args.out, left("tests")))
    print(f"tests: {steps[-1].status} ({steps[-1].detail})", flush=True)
    plan = [("app", lambda: app(args.out, left("app"))), ("bench", lambda: bench(args.out, left("bench"), False))]
    plan.append(("compile", lambda: bench(args.out, left("compile"), True)))
    for name, run in plan:
        if not cuda:
            steps.append(Step(name, "skipped", 0.0, "no CUDA GPU"))
        elif time.perf_counter() - started >= args.budget:
            steps.append(Step(name, "skipped", 0.0, f"the {args.budget:.0f} s budget was spent"))
        else:
            steps.append(run())
        print(f"{steps[-1].name}: {steps[-1].status} ({steps[-1].detail})", flush=True)
    command = shlex.join(["python", "scripts/gpu_check.py", *(argv if argv is not None else sys.argv[1:])])
    write_summary(args.out, steps, command)
    print((args.out / "summary.md").read_text())
    return 0 if all(s.status in ("passed", "skipped") for s in steps) else 1


if __name__ == "__main__":
    if str(ROOT) not in sys.path:  # run as a script: make the repository's `demo` and `sparsecut` importable
        sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
