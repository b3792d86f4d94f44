import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from metrics.fid import (
    FeatureStats,
    compute_features,
    fid_from_features,
    fid_from_stats,
    fid_notes,
    frechet_distance,
)


def test_closed_form_diagonal_gaussians() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    v1, v2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-6)


def test_uses_sqrtm_of_product_not_of_mean_covariance() -> None:
    # 1-D: FID = (s1 - s2)^2 for std devs s1, s2; the (S1+S2)/2 mistake gives s1^2 + s2^2 - 2 (s1^2+s2^2)/2 = 0.
    assert frechet_distance(np.zeros(1), np.array([[4.0]]), np.zeros(1), np.array([[1.0]])) == pytest.approx(1.0)


def test_matches_direct_scipy_on_random_features() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 12)), rng.normal(0.3, 1.5, size=(150, 12)) @ rng.normal(size=(12, 12))
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert fid_from_features(a, b) == pytest.approx(direct, rel=1e-6)
    assert fid_from_features(torch.tensor(a, dtype=torch.float32), torch.tensor(b)) == pytest.approx(direct, rel=1e-5)


def test_set_against_itself_is_zero() -> None:
    a = np.random.default_rng(2).normal(size=(100, 32))
    assert abs(fid_from_features(a, a)) <= 1e-6


def test_finite_when_fewer_samples_than_dims() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(10, 64)), rng.normal(0.5, 1, size=(10, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        value = fid_from_features(a, b)
    assert np.isfinite(value) and value > 0
    assert "rank-deficient" in fid_notes(10, 64)
    assert fid_notes(1000, 64) == ""


def test_eps_retry_when_sqrt_not_finite(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_sqrtm = scipy.linalg.sqrtm

    def flaky_sqrtm(m: np.ndarray) -> np.ndarray:
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(scipy.linalg, "sqrtm", flaky_sqrtm)
    eye = np.eye(3)
    with pytest.warns(RuntimeWarning, match="retrying"):
        value = frechet_distance(np.zeros(3), eye, np.ones(3), eye, eps=1e-6)
    assert len(calls) == 2 and np.allclose(calls[1], (eye + 1e-6 * eye) @ (eye + 1e-6 * eye))
    assert value == pytest.approx(3.0, abs=1e-5)


def test_rejects_non_covariance_inputs() -> None:
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


def test_streaming_stats_equal_numpy_over_concatenation(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    batches = [rng.normal(50.0, 0.1, size=(k, 8)) for k in (1, 7, 30, 2)]  # large mean, small spread
    stats = FeatureStats()
    for i, x in enumerate(batches):
        stats.update(torch.tensor(x) if i % 2 else x)
    all_x = np.concatenate(batches)
    assert stats.n == 40
    np.testing.assert_allclose(stats.mean, all_x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(all_x, rowvar=False), rtol=1e-9, atol=1e-14)

    path = tmp_path / "cache" / "real.npz"
    stats.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["real.npz"]  # no temporary left behind
    loaded = FeatureStats.load(path)
    assert loaded.n == stats.n and loaded.dim == 8
    np.testing.assert_array_equal(loaded.cov, stats.cov)
    assert fid_from_stats(stats, loaded) == pytest.approx(0.0, abs=1e-9)


def test_stats_reject_wrong_shapes() -> None:
    stats = FeatureStats().update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="4 features"):
        stats.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="at least 2"):
        _ = FeatureStats().update(np.zeros((1, 4))).cov


class _TinyExtractor(torch.nn.Module):
    name = "tiny"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x.mean(dim=(1, 2, 3, 4)), x.std(dim=(1, 2, 3, 4)), x.amax(dim=(1, 2, 3, 4))], 1)


def test_compute_features_streams_tensor_or_iterable() -> None:
    vols = torch.randn(10, 1, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    ext = _TinyExtractor()
    direct = ext(vols).double().numpy()
    from_tensor = compute_features(ext, vols, batch_size=3)
    from_iter = compute_features(ext, (v for v in vols), batch_size=3)  # single [1, D, H, W] volumes
    from_batches = compute_features(ext, iter([vols[:7], vols[7:]]), batch_size=4)
    for s in (from_tensor, from_iter, from_batches):
        assert s.n == 10
        np.testing.assert_allclose(s.mean, direct.mean(0), rtol=1e-6)
        np.testing.assert_allclose(s.cov, np.cov(direct, rowvar=False), rtol=1e-5, atol=1e-9)


def test_symmetric_trace_form_equals_scipy_and_handles_singular_covariances() -> None:
    from metrics.fid import trace_sqrt_product_psd

    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(40, 6)), rng.normal(size=(40, 6)) * 2.0
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert trace_sqrt_product_psd(s1, s2) == pytest.approx(np.trace(scipy.linalg.sqrtm(s1 @ s2)).real, rel=1e-9)
    # 5 samples in 32 dimensions: rank-4 covariances, where FID must stay finite and non-negative
    x, y = rng.normal(size=(5, 32)), rng.normal(size=(5, 32))
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    value = np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product_psd(s1, s2)
    assert np.isfinite(value) and value >= -1e-9
    assert frechet_distance(np.zeros(32), s1, np.zeros(32), s1) == pytest.approx(0.0, abs=1e-5 * np.trace(s1))
