"""Per-child peak memory: the high-water mark restarts at reset_peaks (Linux /proc), so children are not mixed up."""

from __future__ import annotations

import math
import mmap
import sys

import pytest

from benchmark.resources import peak_rss_mb, reset_peaks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux-only")
def _resident_block(mib: int) -> mmap.mmap:
    """``mib`` MiB of fresh anonymous pages, every one written: RSS grows by exactly that much. (A numpy array would
    come from malloc, which in a long test process can reuse pages already resident, leaving RSS and its peak flat.)"""
    block = mmap.mmap(-1, mib * 2**20)
    block.write(b"\x01" * (mib * 2**20))
    return block


def test_peak_rss_restarts_after_reset() -> None:
    block = _resident_block(200)
    high = peak_rss_mb()
    block.close()  # munmap: the pages leave RSS at once
    reset_peaks()
    low = peak_rss_mb()
    assert not math.isnan(high) and high - low > 150  # the freed 200 MiB no longer counts
    again = _resident_block(100)
    assert peak_rss_mb() - low > 80
    again.close()
