"""Summaries reported with every number (DESIGN §5: "mean +- std" over seeds or draws, bootstrap 95% CIs)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def mean_std(values: np.ndarray | list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of ``values [N]``; std is 0.0 for a single value."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("mean_std: no values")
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return float(v.mean()), std


def bootstrap_ci(
    values: np.ndarray | list[float],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    statistic: Callable[..., np.ndarray] = np.mean,
) -> tuple[float, float]:
    """Percentile bootstrap ``(1 - alpha)`` interval of ``statistic`` over subjects ``values [N]``.

    Resamples subjects with replacement, all ``n_boot`` resamples at once; ``statistic`` must accept ``axis=1``
    (np.mean, np.median, ...). Seeded, so the interval is reproducible.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("bootstrap_ci: no values")
    rng = np.random.default_rng(seed)
    resampled = v[rng.integers(0, v.size, size=(n_boot, v.size))]
    stats = statistic(resampled, axis=1)
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)
