"""Small helpers shared by the library, the demo and the benchmarks: markdown tables, peak memory, releasing
memory."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import psutil
import torch


def markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]], align: str = "") -> str:
    """A GitHub-flavoured markdown table, one line per row. `align` has one letter per column, "l" (the default
    for columns it does not reach) or "r"; cells are written with `str`."""
    rule = "|" + "|".join("---:" if align[i : i + 1] == "r" else "---" for i in range(len(header))) + "|"
    lines = ["| " + " | ".join(str(cell) for cell in row) + " |" for row in (header, *rows)]
    return "\n".join([lines[0], rule, *lines[1:]])


class PeakMemory:
    """The peak memory of the work done since it was made, in bytes: CUDA's allocator peak on a CUDA device,
    else the process's peak RSS.

    The peak RSS is the kernel's high-water mark (Linux VmHWM, reset on creation through /proc/self/clear_refs),
    so a peak between two Python statements (inside a prefill, say) counts too; where that cannot be read, the
    RSS when asked, a lower bound. Usable as a context manager: `with PeakMemory(device) as memory: ...`.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "peak CUDA memory allocated"
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")  # "5" resets the peak RSS to the current RSS
            self.kind = "peak process RSS"

    def __enter__(self) -> PeakMemory:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        with contextlib.suppress(OSError, AttributeError):
            status = Path("/proc/self/status").read_text()
            return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024
        return psutil.Process().memory_info().rss


def release_memory() -> None:
    """Give back memory that dropped objects still hold: collect reference cycles (an exception handed over from
    another thread sits in one with that thread's frames and their tensors), return CUDA's cached blocks, and on
    Linux return the free heap that glibc would otherwise keep in the process RSS."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
