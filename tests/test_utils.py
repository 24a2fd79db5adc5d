"""sparsecut.utils: markdown tables, peak memory, releasing memory."""

import subprocess
import sys
from pathlib import Path

import torch

from sparsecut.utils import markdown_table, release_memory

ROOT = Path(__file__).resolve().parent.parent


def test_markdown_table_has_a_header_a_rule_with_alignment_and_one_line_per_row():
    table = markdown_table(["name", "n", "score"], [["a", 1, "0.5"], ["b", 22, ""]], align="lr")
    assert table.splitlines() == ["| name | n | score |", "|---|---:|---|", "| a | 1 | 0.5 |", "| b | 22 |  |"]


def test_peak_memory_on_the_cpu_sees_a_peak_that_is_gone_when_asked():
    # In a fresh process: a long-lived one (the test session) may serve the block from memory it already holds.
    code = (
        "import numpy as np\n"
        "from sparsecut.utils import PeakMemory\n"
        "with PeakMemory('cpu') as memory:\n"
        "    before = memory.peak_bytes()\n"
        "    block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched\n"
        "    del block\n"
        "print(memory.kind, memory.peak_bytes() - before)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    kind, growth = result.stdout.strip().rsplit(" ", 1)
    assert kind == "peak process RSS" and int(growth) >= 48 * 2**20


def test_release_memory_empties_the_cuda_cache_only_when_there_is_cuda(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    release_memory()
    assert emptied == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    release_memory()
    assert emptied == [1]
