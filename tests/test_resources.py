"""Per-child peak memory: the high-water mark restarts at reset_peaks (Linux /proc), so children are not mixed up."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from benchmark.resources import peak_rss_mb, reset_peaks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux-only")
def test_peak_rss_restarts_after_reset() -> None:
    block = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
    high = peak_rss_mb()
    del block
    reset_peaks()
    low = peak_rss_mb()
    assert not math.isnan(high) and high - low > 150  # the freed 200 MiB no longer counts
    again = np.ones(100 * 2**20 // 8)
    assert peak_rss_mb() - low > 80
    del again
