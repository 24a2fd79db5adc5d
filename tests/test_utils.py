"""sparsecut.utils: markdown tables, peak memory, releasing memory."""

import numpy as np
import torch

from sparsecut.utils import PeakMemory, markdown_table, release_memory


def test_markdown_table_has_a_header_a_rule_with_alignment_and_one_line_per_row():
    table = markdown_table(["name", "n", "score"], [["a", 1, "0.5"], ["b", 22, ""]], align="lr")
    assert table.splitlines() == ["| name | n | score |", "|---|---:|---|", "| a | 1 | 0.5 |", "| b | 22 |  |"]


def test_peak_memory_on_the_cpu_sees_a_peak_that_is_gone_when_asked():
    with PeakMemory("cpu") as memory:
        before = memory.peak_bytes()
        block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
        del block
        release_memory()
    assert memory.kind == "peak process RSS"
    assert memory.peak_bytes() >= before + 48 * 2**20


def test_release_memory_empties_the_cuda_cache_only_when_there_is_cuda(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    release_memory()
    assert emptied == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    release_memory()
    assert emptied == [1]
