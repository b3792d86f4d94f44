"""Figures people would rather look at than read: tri-planar slice grids (paper Fig. 3), volume scatter (Fig. 4).

Matplotlib's object API (no pyplot state); PNGs are written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from torch import Tensor


def _save(fig: object, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]
    os.replace(tmp, path)
    return path


def central_slices(volume: Tensor | np.ndarray) -> list[np.ndarray]:
    """Axial, coronal, sagittal central slices of a [1,S,S,S] or [S,S,S] RAS volume, oriented for display."""
    v = np.asarray(volume.detach().cpu() if isinstance(volume, Tensor) else volume, dtype=np.float32)
    v = v.reshape(v.shape[-3:])
    i, j, k = (s // 2 for s in v.shape)
    return [np.rot90(v[:, :, k]), np.rot90(v[:, j, :]), np.rot90(v[i, :, :])]


def triplanar_grid(rows: Mapping[str, Tensor | np.ndarray], path: Path, title: str = "") -> Path:
    """One row per named volume, columns axial / coronal / sagittal; a shared grey scale per row."""
    from matplotlib.figure import Figure

    n = len(rows)
    fig = Figure(figsize=(6.0, 2.1 * n))
    axes = fig.subplots(n, 3, squeeze=False)
    for r, (name, vol) in enumerate(rows.items()):
        planes = central_slices(vol)
        lo, hi = np.percentile(np.concatenate([p.ravel() for p in planes]), [1, 99])
        for col, (plane, label) in enumerate(zip(planes, ("axial", "coronal", "sagittal"), strict=True)):
            ax = axes[r][col]
            ax.imshow(plane, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=9)
            if col == 0:
                ax.set_ylabel(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def volume_scatter(measured: np.ndarray, requested: np.ndarray, structures: Mapping[str, tuple[int, int]],
                   stats: Mapping[str, float], path: Path) -> Path:
    """Measured vs requested bilateral volume ratio per structure, with Pearson r (paper Fig. 4)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.0 * len(structures), 3.6))
    axes = fig.subplots(1, len(structures), squeeze=False)[0]
    for ax, (name, (left, right)) in zip(axes, structures.items(), strict=True):
        req = requested[:, left] + requested[:, right]
        mea = measured[:, left] + measured[:, right]
        ax.scatter(req, mea, s=8, alpha=0.6)
        lo, hi = float(min(req.min(), mea.min())), float(max(req.max(), mea.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        r = stats.get(f"{name}_r", float("nan"))
        ax.set_title(f"{name} (r = {r:.2f})", fontsize=10)
        ax.set_xlabel("requested ratio")
        ax.set_ylabel("measured ratio")
    return _save(fig, path)


def ratio_histogram(ratios: np.ndarray, reference: np.ndarray, threshold: float, path: Path, title: str = "") -> Path:
    """Memorization: nearest-train / nearest-test distance ratios of generated vs unseen real volumes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 3.4))
    ax = fig.subplots()
    values = np.concatenate([ratios, reference])
    bins = np.linspace(min(0.0, float(values.min())), max(2.0, float(values.max())), 30)
    ax.hist(reference, bins=bins, alpha=0.5, density=True, label="unseen real (validation)")
    ax.hist(ratios, bins=bins, alpha=0.5, density=True, label="generated")
    ax.axvline(threshold, color="k", ls="--", lw=0.8, label=f"threshold {threshold:g}")
    ax.set_xlabel("d(nearest train) / d(nearest test)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def grouped_bars(groups: Mapping[str, Mapping[str, tuple[float, float]]], path: Path, ylabel: str,
                 title: str = "") -> Path:
    """One group of bars per key of ``groups`` (e.g. a generator), one bar per arm: (mean, std) with error bars."""
    from matplotlib.figure import Figure

    arms = list(dict.fromkeys(a for g in groups.values() for a in g))
    fig = Figure(figsize=(1.2 + 1.4 * len(groups), 3.6))
    ax = fig.subplots()
    width = 0.8 / max(len(arms), 1)
    x = np.arange(len(groups))
    for i, arm in enumerate(arms):
        means = [g.get(arm, (np.nan, np.nan))[0] for g in groups.values()]
        stds = [g.get(arm, (np.nan, np.nan))[1] for g in groups.values()]
        ax.bar(x + (i - (len(arms) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=arm)
    ax.set_xticks(x, list(groups), fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def learning_curves(curves: Mapping[str, list[dict[str, float]]], path: Path, metrics: tuple[str, ...] = ("val_fid",
                    "val_l1"), references: Mapping[str, float] | None = None, title: str = "") -> Path:
    """Validation metrics over volumes seen, one panel per metric and one line per method; dashed horizontal lines
    mark training-free references (e.g. the mean volume's FID), so "learning" means crossing them."""
    from matplotlib.figure import Figure

    present = [m for m in metrics if any(m in v for pts in curves.values() for v in pts)]
    fig = Figure(figsize=(4.5 * max(len(present), 1), 3.6))
    axes = fig.subplots(1, max(len(present), 1), squeeze=False)[0]
    for ax, metric in zip(axes, present, strict=False):
        for method, pts in curves.items():
            xs = [p["volumes_seen"] for p in pts if metric in p]
            if xs:
                ax.plot(xs, [p[metric] for p in pts if metric in p], "-o", ms=3, label=method)
        for name, value in (references or {}).items():
            if name.endswith(metric):
                ax.axhline(value, ls="--", lw=1, color="grey")
                ax.annotate(name.removesuffix(f".{metric}"), (ax.get_xlim()[0], value), fontsize=7, color="grey")
        ax.set_xlabel("volumes seen")
        ax.set_ylabel(metric)
        if metric in ("val_fid", "val_l1"):  # log: one diverging step (val_l1 10 vs 0.3) flattens every other line
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
