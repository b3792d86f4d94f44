"""Frechet distance between feature distributions (paper §3.1, DESIGN §5 "FID").

The extractor is injected (see ``metrics.extractors``); this module only sees features ``[N, F]``.
Everything is float64: the trace of a matrix square root of a product of two covariance matrices loses digits
quickly in float32, and FID values of ~30 are compared to one decimal.

Statistics are streamed (``FeatureStats``) so that 2000 volumes at 128^3 never sit in memory together, and
real-data statistics can be cached on disk and re-used.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray


def _as_f64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


_TINY = 1e-300


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 @ sigma2))`` with ``scipy.linalg.sqrtm`` of the product
    (not of the mean covariance), as in Heusel et al. 2017 and pytorch-fid, in float64.
    When the square root is not finite (singular product, e.g. fewer samples than feature dimensions)
    it is retried with ``eps * I`` added to both covariances, which keeps FID finite.

    Args:
        mu1, mu2: means ``[F]``.
        sigma1, sigma2: covariances ``[F, F]``.
        eps: diagonal offset for the retry.

    Raises:
        ValueError: shapes disagree. A non-negligible imaginary part of the square root (|imag| > 1e-3, from
            singular covariances) switches to :func:`trace_sqrt_product_psd` with a warning.
    """
    mu1, mu2 = np.atleast_1d(_as_f64(mu1)), np.atleast_1d(_as_f64(mu2))
    sigma1, sigma2 = np.atleast_2d(_as_f64(sigma1)), np.atleast_2d(_as_f64(sigma2))
    dim = mu1.shape[0]
    if mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"frechet_distance: shapes disagree: mu1 {mu1.shape}, mu2 {mu2.shape}, "
            f"sigma1 {sigma1.shape}, sigma2 {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"frechet_distance: sqrtm(sigma1 @ sigma2) is not finite; retrying with {eps:g} * I added to both "
            "covariances",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(dim) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError("frechet_distance: sqrtm(sigma1 @ sigma2) is not finite even after the eps retry")
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            worst = np.max(np.abs(np.diagonal(covmean).imag))
            for sigma in (sigma1, sigma2):
                eig = np.linalg.eigvalsh((sigma + sigma.T) / 2.0)
                if eig.min() < -1e-6 * max(abs(eig).max(), _TINY):
                    raise ValueError(f"frechet_distance: sqrtm has a non-negligible imaginary component ({worst:.3g})"
                                     " and an input is not positive semi-definite (not a covariance matrix)")
            warnings.warn(f"frechet_distance: sqrtm(sigma1 @ sigma2) has an imaginary component ({worst:.3g}), "
                          "typical of rank-deficient covariances (fewer samples than features); using the "
                          "symmetric form tr sqrt(S1^1/2 S2 S1^1/2)", RuntimeWarning, stacklevel=2)
            return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
                         - 2.0 * trace_sqrt_product_psd(sigma1, sigma2))
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def trace_sqrt_product_psd(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrtm(S1 S2) for symmetric PSD S1, S2, as tr sqrt(S1^1/2 S2 S1^1/2): that matrix is symmetric PSD, so its
    eigenvalues are real (round-off negatives clipped to 0), where the general sqrtm of the non-symmetric product
    can drift into complex values when the covariances are singular."""
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root @ sigma2 @ root
    eig = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


class FeatureStats:
    """Streaming mean and covariance of features ``[B, F]``, in float64.

    Keeps ``n``, the sum and the sum of outer products of ``x - shift``, where ``shift`` is the first batch's
    mean: the sums stay plain (mergeable, savable) while the covariance does not suffer the cancellation of
    ``E[xx^T] - mu mu^T`` when features have a large mean relative to their spread (ReLU-pooled features do).
    """

    def __init__(self, dim: int | None = None) -> None:
        self.dim = dim
        self.n = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._sum_outer: np.ndarray | None = None

    def update(self, feats: ArrayLike) -> FeatureStats:
        """Add a batch of features ``[B, F]``; returns ``self``."""
        x = _as_f64(feats)
        if x.ndim != 2:
            raise ValueError(f"FeatureStats.update: expected features [B, F], got shape {x.shape}")
        if self.dim is None:
            self.dim = x.shape[1]
        if x.shape[1] != self.dim:
            raise ValueError(f"FeatureStats.update: expected {self.dim} features, got {x.shape[1]}")
        if x.shape[0] == 0:
            return self
        if self._shift is None:
            self._shift = x.mean(axis=0)
            self._sum = np.zeros(self.dim)
            self._sum_outer = np.zeros((self.dim, self.dim))
        xc = x - self._shift
        self.n += x.shape[0]
        self._sum += xc.sum(axis=0)
        self._sum_outer += xc.T @ xc
        return self

    def _require(self, n_min: int) -> None:
        if self.n < n_min:
            raise ValueError(f"FeatureStats: needs at least {n_min} samples, has {self.n}")

    @property
    def mean(self) -> np.ndarray:
        """Mean ``[F]``."""
        self._require(1)
        return self._shift + self._sum / self.n

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance ``[F, F]`` (divides by n - 1, as np.cov)."""
        self._require(2)
        m = self._sum / self.n
        cov = (self._sum_outer - self.n * np.outer(m, m)) / (self.n - 1)
        return (cov + cov.T) / 2.0

    def state_dict(self) -> dict[str, Any]:
        """Plain numpy/int state, enough to rebuild the statistics exactly."""
        dim = -1 if self.dim is None else self.dim
        empty = self._shift is None
        return {
            "n": self.n,
            "dim": dim,
            "shift": np.zeros(0) if empty else self._shift.copy(),
            "sum": np.zeros(0) if empty else self._sum.copy(),
            "sum_outer": np.zeros((0, 0)) if empty else self._sum_outer.copy(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> FeatureStats:
        dim = int(state["dim"])
        stats = cls(None if dim < 0 else dim)
        stats.n = int(state["n"])
        if stats.n > 0:
            stats._shift = np.asarray(state["shift"], dtype=np.float64)
            stats._sum = np.asarray(state["sum"], dtype=np.float64)
            stats._sum_outer = np.asarray(state["sum_outer"], dtype=np.float64)
        return stats

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write an ``.npz`` atomically (temporary file in the same folder, then ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **self.state_dict())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureStats:
        with np.load(Path(path), allow_pickle=False) as data:
            return cls.from_state_dict({k: data[k] for k in data.files})

    def __repr__(self) -> str:
        return f"FeatureStats(n={self.n}, dim={self.dim})"


def fid_from_stats(s1: FeatureStats, s2: FeatureStats) -> float:
    """FID between two streamed feature sets (each needs >= 2 samples)."""
    return frechet_distance(s1.mean, s1.cov, s2.mean, s2.cov)


def fid_from_features(a: ArrayLike, b: ArrayLike) -> float:
    """FID between two feature matrices ``a [N, F]`` and ``b [M, F]``."""
    return fid_from_stats(FeatureStats().update(a), FeatureStats().update(b))


def fid_notes(n_samples: int, dim: int) -> str:
    """A warning line for the log when FID is computed from fewer samples than feature dimensions, else ''.

    With n <= dim the covariance has rank <= n - 1: FID stays finite here, but it is biased (upward, more so
    with fewer samples), so only values with the same n and extractor are comparable.
    """
    if n_samples <= dim:
        return (
            f"FID from {n_samples} samples < {dim + 1} (feature dim {dim} + 1): covariance is rank-deficient "
            f"(rank <= {max(n_samples - 1, 0)}); value is finite but biased and comparable only at equal n"
        )
    return ""


def compute_features(
    extractor: Callable[[Tensor], Tensor],
    volumes: Tensor | Iterable[Tensor],
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> FeatureStats:
    """Stream volumes through an extractor into ``FeatureStats``.

    Args:
        extractor: ``(x [N, 1, D, H, W]) -> [N, F]`` (see ``metrics.extractors``); put in eval mode if it has one.
        volumes: one tensor ``[N, 1, D, H, W]``, or an iterable of such batches (or of single ``[1, D, H, W]``
            volumes), e.g. a generator that samples on the fly so that the whole set is never in memory.
        batch_size: volumes per extractor call; larger batches from the iterable are split.
        device: where to run; default: where each batch already is.
    """
    if isinstance(extractor, torch.nn.Module):
        extractor.eval()
    batches: Iterable[Tensor] = (volumes,) if isinstance(volumes, Tensor) else volumes
    stats = FeatureStats()
    with torch.no_grad():
        for batch in batches:
            if batch.dim() == 4:
                batch = batch.unsqueeze(0)
            if batch.dim() != 5:
                raise ValueError(f"compute_features: expected volumes [N, 1, D, H, W], got {tuple(batch.shape)}")
            for chunk in batch.split(batch_size):
                if device is not None:
                    chunk = chunk.to(device)
                stats.update(extractor(chunk))
    return stats
