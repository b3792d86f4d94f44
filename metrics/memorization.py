"""Memorization check: are generated volumes closer to training volumes than to unseen test volumes?

For each generated item, ratio = distance to its nearest training item / distance to its nearest test item.
A generator that copies its training set scores ratios well below 1. Nearest-neighbour distances shrink as a set
grows, so with a training set larger than the test set even a generator that never saw a training subject scores
somewhat below 1: read the ratios beside a reference, the same ratio for unseen real volumes (the validation
split), which is what a generator that draws new subjects from the data distribution would score. The full
training set is searched (a subset would miss the very subjects a copying generator reproduces).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from metrics.ssim import ssim_triplanar
from metrics.triplanar import N_SLICES

ArrayLike = Tensor | np.ndarray
_TINY = 1e-12


def _t64(x: ArrayLike, device: torch.device | None = None) -> Tensor:
    t = torch.as_tensor(x)
    return t.to(device=device or t.device, dtype=torch.float64).flatten(1)


def _nn_dist(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    # Direct differences, not the matmul expansion: near-copies must come out near 0, not sqrt(round-off).
    d = torch.cdist(a, b.to(a.device), compute_mode="donot_use_mm_for_euclid_dist")
    return d.min(dim=1)


def nn_ratio(gen_feats: ArrayLike, train_feats: ArrayLike, test_feats: ArrayLike) -> np.ndarray:
    """Nearest-train / nearest-test Euclidean distance per generated item; returns ``[N]``.

    Args:
        gen_feats: ``[N, F]`` features (or any ``[N, ...]``, flattened) of generated items.
        train_feats, test_feats: ``[M, F]`` and ``[K, F]`` for the training and held-out test items.
    """
    g = _t64(gen_feats)
    d_train, _ = _nn_dist(g, _t64(train_feats, g.device))
    d_test, _ = _nn_dist(g, _t64(test_feats, g.device))
    return (d_train / d_test.clamp_min(_TINY)).cpu().numpy()


def _ssim_nn_dist(gen: Tensor, ref: Tensor, n: int) -> Tensor:
    # 1 - SSIM with the reference (train/test) volume as "real": its mask picks the slices, its range the scale.
    dists = torch.empty(gen.shape[0], ref.shape[0], dtype=torch.float64)
    for j in range(ref.shape[0]):
        r = ref[j : j + 1].expand_as(gen)
        dists[:, j] = 1.0 - ssim_triplanar(r, gen, n=n).cpu()
    return dists.min(dim=1).values


def nn_ratio_ssim(gen: Tensor, train: Tensor, test: Tensor, n: int = N_SLICES) -> np.ndarray:
    """``nn_ratio`` in voxel space with ``1 - SSIM`` (tri-planar) as the distance; returns ``[N]``.

    ``gen [N,1,S,S,S]``, ``train [M,1,S,S,S]``, ``test [K,1,S,S,S]``. Costs N x (M + K) tri-planar SSIMs: small N only.
    """
    d_train = _ssim_nn_dist(gen, train, n)
    d_test = _ssim_nn_dist(gen, test, n)
    return (d_train / d_test.clamp_min(_TINY)).numpy()


def summary(ratios: ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """Median, quartiles, 5th percentile, min, and the fraction of ratios below ``threshold``.

    The default flags items at least twice as close to a training item as to any test item (our convention).
    """
    r = np.asarray(torch.as_tensor(ratios).cpu(), dtype=np.float64).ravel()
    q05, q25, q50, q75 = np.quantile(r, [0.05, 0.25, 0.5, 0.75])
    return {
        "median": float(q50),
        "q05": float(q05),
        "q25": float(q25),
        "q75": float(q75),
        "min": float(r.min()),
        "frac_below": float(np.mean(r < threshold)),
        "threshold": float(threshold),
    }


def closest_pairs(gen_feats: ArrayLike, train_feats: ArrayLike, k: int = 5) -> list[tuple[int, int, float]]:
    """The ``k`` generated items closest to any training item: ``(gen_index, train_index, distance)``, nearest
    first, to show side by side when looking for copies."""
    d, idx = _nn_dist(_t64(gen_feats), _t64(train_feats))
    order = torch.argsort(d)[:k].tolist()
    return [(i, int(idx[i]), float(d[i])) for i in order]
