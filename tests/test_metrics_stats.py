import numpy as np
import pytest

from metrics.stats import bootstrap_ci, mean_std


def test_bootstrap_ci_contains_mean_narrows_and_is_reproducible() -> None:
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.8, 0.05, 20), rng.normal(0.8, 0.05, 500)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 2
    assert bootstrap_ci(small) == (lo_s, hi_s)
    lo_m, hi_m = bootstrap_ci(large, statistic=np.median)
    assert lo_m < np.median(large) < hi_m


def test_mean_std() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, pytest.approx(1.0))
    assert mean_std([4.2]) == (4.2, 0.0)
