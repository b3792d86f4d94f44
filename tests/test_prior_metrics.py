"""Prior metrics (real vs sampled clinical vectors) and the KDE/PCA figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from metrics.prior import (
    c2st_accuracy,
    correlation_error,
    mmd_rbf,
    plot_kde,
    plot_pca,
    prior_report,
    wasserstein_per_feature,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _gauss(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 7)) + shift


def test_mmd_is_about_zero_for_one_distribution_and_grows_with_a_shift() -> None:
    same = mmd_rbf(_gauss(500, 0), _gauss(500, 1))
    assert abs(same) < 0.005
    shifts = [mmd_rbf(_gauss(500, 0), _gauss(500, 1, s)) for s in (0.25, 0.5, 1.0)]
    assert same < shifts[0] < shifts[1] < shifts[2]


def test_mmd_oracle_and_tensor_input() -> None:
    # Two points each, bandwidth 1: k(x, x') = exp(-d^2 / 2); x = {0, 1}, y = {0, 2} on one axis.
    x, y = np.array([[0.0], [1.0]]), np.array([[0.0], [2.0]])
    e = np.exp
    expected = e(-0.5) + e(-2.0) - 2 * (1 + e(-2.0) + e(-0.5) + e(-0.5)) / 4
    assert mmd_rbf(x, y, bandwidth=1.0) == pytest.approx(expected, rel=1e-12)
    assert mmd_rbf(torch.tensor(x), torch.tensor(y), bandwidth=1.0) == pytest.approx(expected, rel=1e-12)
    assert np.isnan(mmd_rbf(x[:1], y))


def test_c2st_is_chance_for_one_distribution_and_one_when_separated() -> None:
    assert c2st_accuracy(_gauss(300, 0), _gauss(300, 1)) == pytest.approx(0.5, abs=0.07)
    assert c2st_accuracy(_gauss(300, 0), _gauss(300, 1, 4.0)) > 0.97
    # unequal sizes are subsampled to the smaller one: chance stays 0.5
    assert c2st_accuracy(_gauss(600, 0), _gauss(150, 1)) == pytest.approx(0.5, abs=0.1)
    assert np.isnan(c2st_accuracy(_gauss(1, 0), _gauss(10, 1)))


def test_wasserstein_and_correlation_error() -> None:
    real = _gauss(2000, 0)
    w1 = wasserstein_per_feature(real, real + np.arange(7.0))
    np.testing.assert_allclose(w1, np.arange(7.0), atol=1e-9)
    assert correlation_error(real, _gauss(2000, 1)) < 0.05
    z = np.random.default_rng(2).normal(size=(2000, 1))
    correlated = np.concatenate([z, z, _gauss(2000, 3)[:, :5]], axis=1)  # corr(0, 1) = 1 instead of 0
    assert correlation_error(real, correlated) == pytest.approx(np.sqrt(2 / 42), abs=0.03)
    fixed = real.copy()
    fixed[:, 6] = 1.0  # a constant coordinate (fixed label) counts as uncorrelated, not NaN
    assert np.isfinite(correlation_error(real, fixed))


def test_prior_report_is_flat_and_named() -> None:
    report = prior_report(_gauss(200, 0), _gauss(200, 1))
    assert {"mmd_rbf", "c2st_acc", "corr_error", "w1_mean", "w1_hippocampus_l", "w1_label"} <= set(report)
    assert len(report) == 4 + 7 and all(isinstance(v, float) for v in report.values())
    tiny = prior_report(_gauss(3, 0), _gauss(50, 1))  # a smoke-size test split
    assert np.isfinite(tiny["mmd_rbf"]) and np.isfinite(tiny["c2st_acc"])


def test_figures_are_valid_pngs(tmp_path: Path) -> None:
    real, fake = _gauss(200, 0), _gauss(150, 1, 0.3)
    fake[:, 5] = 0.7  # a fixed (constant) feature has no density: drawn as a line
    names = ["hippocampus_l", "hippocampus_r", "amygdala_l", "amygdala_r", "lateral_ventricle_l", "lateral_ventricle_r"]
    kde = plot_kde(real, fake, names, tmp_path / "figs" / "kde.png")
    pca = plot_pca(torch.tensor(real), torch.tensor(fake), tmp_path / "pca.png")
    for path in (kde, pca):
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["figs", "kde.png", "pca.png"]  # no temporary files left
