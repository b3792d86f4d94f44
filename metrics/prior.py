"""Real vs sampled clinical vectors: how well the diffusion prior matches the data (DESIGN §5, paper §3.4, Fig. 5).

All functions take ``[N, D]`` arrays or tensors in the same units (standardised ratios, label 0/1) and return
plain floats/arrays; figures are written with ``matplotlib.figure.Figure`` (no pyplot, no global backend).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.spatial.distance import cdist, pdist
from scipy.stats import gaussian_kde, wasserstein_distance
from sklearn.decomposition import PCA
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import StratifiedKFold, cross_val_score

from benchmark.data.contract import CLINICAL_DIM, ROI_NAMES

# Pairwise distances for the median heuristic come from at most this many pooled points (O(n^2) memory).
_MEDIAN_MAX_POINTS = 2000


def _as_2d(a: ArrayLike) -> NDArray[np.float64]:
    """[N, D] float64 copy of an array or (CPU) tensor."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()  # type: ignore[union-attr]
    x = np.asarray(a, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a [N, D] array, got shape {x.shape}")
    return x


def median_bandwidth(pooled: ArrayLike, seed: int = 0) -> float:
    """Median pairwise Euclidean distance of ``pooled`` [N, D] (a seeded subsample above 2000 points)."""
    z = _as_2d(pooled)
    if len(z) > _MEDIAN_MAX_POINTS:
        z = z[np.random.default_rng(seed).choice(len(z), _MEDIAN_MAX_POINTS, replace=False)]
    d = pdist(z)
    med = float(np.median(d[d > 0])) if np.any(d > 0) else 1.0
    return med


def mmd_rbf(x: ArrayLike, y: ArrayLike, bandwidth: float | None = None) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, Eq. 3) with k(a, b) = exp(-|a - b|^2 / (2 bandwidth^2)).

    Args:
        x: [N, D] sample, y: [M, D] sample (N, M >= 2).
        bandwidth: kernel width; default the median pairwise distance of the pooled sample.
    Returns:
        MMD^2 estimate; about 0 (it can be slightly negative) when x and y come from one distribution; NaN when a
        sample has fewer than two points (the unbiased estimate is undefined).
    """
    a, b = _as_2d(x), _as_2d(y)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    sigma = bandwidth if bandwidth is not None else median_bandwidth(np.concatenate([a, b]))
    gamma = 1.0 / (2.0 * sigma**2)
    kxx = np.exp(-gamma * cdist(a, a, "sqeuclidean"))
    kyy = np.exp(-gamma * cdist(b, b, "sqeuclidean"))
    kxy = np.exp(-gamma * cdist(a, b, "sqeuclidean"))
    n, m = len(a), len(b)
    # Unbiased: drop the diagonal terms k(x_i, x_i) = 1.
    return float((kxx.sum() - n) / (n * (n - 1)) + (kyy.sum() - m) / (m * (m - 1)) - 2.0 * kxy.mean())


def c2st_accuracy(real: ArrayLike, fake: ArrayLike, seed: int = 0, folds: int = 5) -> float:
    """Classifier two-sample test (Lopez-Paz & Oquab 2017): cross-validated accuracy of telling real from fake.

    The classifier is sklearn's HistGradientBoostingClassifier: non-linear (it sees joint structure such as the
    L/R correlations, not only marginals), invariant to feature scaling, and at home with the binary label
    coordinate. The larger sample is subsampled (seeded) to the smaller one's size so that chance is exactly 0.5.

    Args:
        real: [N, D], fake: [M, D].
        seed: seeds the subsampling, the stratified folds and the classifier.
        folds: stratified K-fold splits (fewer when a sample has fewer points).
    Returns:
        mean held-out accuracy: 0.5 = indistinguishable, 1.0 = fully separable; NaN below two points per sample.
    """
    a, b = _as_2d(real), _as_2d(fake)
    rng = np.random.default_rng(seed)
    n = min(len(a), len(b))
    if n < 2:
        return float("nan")
    folds = min(folds, n)
    a = a[rng.choice(len(a), n, replace=False)] if len(a) > n else a
    b = b[rng.choice(len(b), n, replace=False)] if len(b) > n else b
    features = np.concatenate([a, b])
    target = np.concatenate([np.zeros(n, dtype=int), np.ones(n, dtype=int)])
    clf = HistGradientBoostingClassifier(max_iter=100, max_leaf_nodes=15, early_stopping=False, random_state=seed)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, features, target, cv=cv, scoring="accuracy").mean())


def wasserstein_per_feature(real: ArrayLike, fake: ArrayLike) -> NDArray[np.float64]:
    """1-D Wasserstein-1 distance per coordinate ([D], input units; for a 0/1 label it is |p_real - p_fake|)."""
    a, b = _as_2d(real), _as_2d(fake)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature counts differ: {a.shape[1]} vs {b.shape[1]}")
    return np.array([wasserstein_distance(a[:, j], b[:, j]) for j in range(a.shape[1])])


def _correlation(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Pearson correlation matrix [D, D]; a constant coordinate (e.g. a fixed label) correlates 0 with the rest."""
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.corrcoef(x, rowvar=False)
    r = np.nan_to_num(r, nan=0.0)
    np.fill_diagonal(r, 1.0)
    return r


def correlation_error(real: ArrayLike, fake: ArrayLike) -> float:
    """Frobenius norm of corr(real) - corr(fake), divided by sqrt(D (D - 1)).

    The diagonal difference is always 0, so the division makes this the root-mean-square error over the D (D - 1)
    off-diagonal correlations, in correlation units (0 = same structure, at most 2), comparable across D.
    """
    a, b = _as_2d(real), _as_2d(fake)
    d = a.shape[1]
    return float(np.linalg.norm(_correlation(a) - _correlation(b)) / np.sqrt(d * (d - 1)))


def _default_names(d: int) -> list[str]:
    if d == CLINICAL_DIM:
        return [*ROI_NAMES, "label"]
    return [f"f{j}" for j in range(d)]


def prior_report(
    real: ArrayLike, fake: ArrayLike, *, names: Sequence[str] | None = None, seed: int = 0
) -> dict[str, float]:
    """Every prior metric as one flat dict (for the tracker).

    Args:
        real: [N, D] held-out real vectors, fake: [M, D] sampled ones (same units).
        names: coordinate names for the per-feature keys (default: ROI_NAMES + 'label' when D = 7).
    Returns:
        {'mmd_rbf', 'c2st_acc', 'corr_error', 'w1_mean', 'w1_<name>' per coordinate}.
    """
    a, b = _as_2d(real), _as_2d(fake)
    names = list(names) if names is not None else _default_names(a.shape[1])
    w1 = wasserstein_per_feature(a, b)
    report = {
        "mmd_rbf": mmd_rbf(a, b),
        "c2st_acc": c2st_accuracy(a, b, seed=seed),
        "corr_error": correlation_error(a, b),
        "w1_mean": float(w1.mean()),
    }
    report.update({f"w1_{name}": float(v) for name, v in zip(names, w1, strict=True)})
    return report


# --- figures (paper Fig. 5) ---------------------------------------------------------------------------------
def _save_atomic(fig: object, path: str | os.PathLike[str]) -> Path:
    """Write a Figure to PNG through a temporary file and os.replace, so readers never see half a file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    FigureCanvasAgg(fig)  # type: ignore[arg-type]  # attaches an Agg canvas; no pyplot state involved
    try:
        fig.savefig(tmp, format="png", dpi=120)  # type: ignore[attr-defined]
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def plot_kde(real: ArrayLike, fake: ArrayLike, names: Sequence[str], path: str | os.PathLike[str]) -> Path:
    """Kernel density of real vs sampled values, one subplot per named coordinate (paper Fig. 5-A).

    Args:
        real: [N, D], fake: [M, D]; coordinate j of both is drawn under ``names[j]`` (j < len(names)).
        path: PNG to write (atomically).
    """
    from matplotlib.figure import Figure

    a, b = _as_2d(real), _as_2d(fake)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(4 * cols, 3 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for j, (ax, name) in enumerate(zip(axes, names, strict=False)):
        lo = min(a[:, j].min(), b[:, j].min())
        hi = max(a[:, j].max(), b[:, j].max())
        pad = 0.1 * (hi - lo) or 1.0
        grid = np.linspace(lo - pad, hi + pad, 256)
        for values, label, color in ((a[:, j], "real", "tab:blue"), (b[:, j], "sampled", "tab:orange")):
            try:
                ax.plot(grid, gaussian_kde(values)(grid), label=label, color=color)
            except (np.linalg.LinAlgError, ValueError):  # constant column (e.g. a fixed feature): no density
                ax.axvline(values[0], label=label, color=color)
        ax.set_title(name)
        ax.set_yticks([])
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    axes[0].legend()
    return _save_atomic(fig, path)


def plot_pca(real: ArrayLike, fake: ArrayLike, path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Real and sampled vectors in the plane of the real data's first two principal components (Fig. 5-B).

    Args:
        real: [N, D], fake: [M, D]; the PCA is fitted on ``real`` only, so both share its axes.
        path: PNG to write (atomically).
    """
    from matplotlib.figure import Figure

    a, b = _as_2d(real), _as_2d(fake)
    pca = PCA(n_components=2, random_state=seed).fit(a)
    pa, pb = pca.transform(a), pca.transform(b)
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    ax.scatter(pa[:, 0], pa[:, 1], s=6, alpha=0.5, label="real", color="tab:blue")
    ax.scatter(pb[:, 0], pb[:, 1], s=6, alpha=0.5, label="sampled", color="tab:orange")
    ev = pca.explained_variance_ratio_
    ax.set_xlabel(f"PC1 ({100 * ev[0]:.0f}% of real variance)")
    ax.set_ylabel(f"PC2 ({100 * ev[1]:.0f}%)")
    ax.legend()
    return _save_atomic(fig, path)
