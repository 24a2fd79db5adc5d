"""scripts/gpu_check.py runs on a machine without CUDA: the CUDA tests skip themselves, the app and bench steps
are skipped, and the summary says which and why."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_runs_without_cuda_and_says_what_it_skipped(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # as on a CPU machine, also where a GPU is present
    done = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path), "--budget", "240"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = {step["name"]: step for step in summary["steps"]}
    assert list(steps) == ["machine", "tests", "app", "bench", "compile"]
    assert steps["machine"]["status"] == "passed" and "no CUDA GPU" in steps["machine"]["detail"]
    assert steps["tests"]["status"] == "skipped" and "0 ran, 0 failed" in steps["tests"]["detail"]
    skipped_tests = int(steps["tests"]["detail"].split(", ")[-1].split()[0])
    assert skipped_tests >= 5  # the CUDA tests were collected, and each skipped itself
    for name in ("app", "bench", "compile"):
        assert steps[name] == {"name": name, "status": "skipped", "seconds": 0.0, "detail": "no CUDA GPU"}
    machine = json.loads((tmp_path / "machine.json").read_text())
    assert machine["torch"] and "gpu" not in machine
    table = (tmp_path / "summary.md").read_text()
    assert "| app | skipped | 0 | no CUDA GPU |" in table and "scripts/gpu_check.py" in table
    assert "SKIPPED" in (tmp_path / "tests.log").read_text()  # pytest -rs names each skipped test and why
