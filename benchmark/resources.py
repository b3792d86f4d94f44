"""Peak memory of one child run (paper §3.5 reports resources per method; a suite runs children in one process).

Linux keeps a per-process RSS high-water mark (``VmHWM``) that writing ``5`` to ``/proc/self/clear_refs`` resets
(kernel >= 4.0), so each child's peak is its own, not the suite's maximum so far. Elsewhere the figures are NaN.
CUDA peaks come from the caching allocator's counters, reset the same way.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


def reset_peaks() -> None:
    """Start a new high-water mark for RSS and (when present) CUDA memory."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_rss_mb() -> float:
    """The process's RSS high-water mark since :func:`reset_peaks`, in MiB (NaN where /proc is not available)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return math.nan


def peaks() -> dict[str, float]:
    """``peak_rss_mb`` and, on CUDA, ``peak_cuda_mb`` (max allocated by tensors) since the last reset."""
    out = {"peak_rss_mb": peak_rss_mb()}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out
