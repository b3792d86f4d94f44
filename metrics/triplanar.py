"""Tri-planar slices for the 2-D metrics (paper §3.1: 32 slices per plane, 96 per volume; DESIGN §5).

Slice positions are a pure function of the REAL volume's brain mask (evenly spaced inside its bounding box), and
the same positions are taken from the generated volume, so numbers are reproducible and real/fake slices pair up.
"""

from __future__ import annotations

import torch
from torch import Tensor

N_SLICES = 32


def _as_3d(volume: Tensor) -> Tensor:
    if volume.dim() == 4 and volume.shape[0] == 1:
        volume = volume[0]
    if volume.dim() != 3:
        raise ValueError(f"expected a volume [1, D, H, W] or [D, H, W], got {tuple(volume.shape)}")
    return volume


def background_value(volume: Tensor) -> float:
    """The volume's background intensity: the median of its outer shell of voxels.

    Volumes hold the z-score of intensity 0 outside the brain (about -4.6, one constant per volume, DESIGN §9), and
    the brain never touches the cube border (``benchmark.data.preprocess.CUBE_MARGIN``), so the border is background.
    """
    v = _as_3d(volume)
    shell = torch.cat([v[[0, -1]].flatten(), v[:, [0, -1]].flatten(), v[:, :, [0, -1]].flatten()])
    return float(shell.median())


def brain_mask(volume: Tensor, background: float | None = None) -> Tensor:
    """Brain voxels ``[D, H, W]`` bool of a REAL volume ``[1, D, H, W]`` or ``[D, H, W]``.

    Brain = every voxel whose value differs from the background value (``background``, default
    :func:`background_value`); a volume that is all background falls back to the whole volume.
    """
    v = _as_3d(volume)
    bg = background_value(v) if background is None else float(background)
    mask = (v - bg).abs() > 1e-4 * max(1.0, abs(bg))
    return mask if bool(mask.any()) else torch.ones_like(mask)


def slice_indices(mask: Tensor, n: int = N_SLICES) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` evenly spaced slice indices per axis inside the mask's bounding box: three LongTensors ``[n]``.

    ``linspace(first, last, n)`` rounded, computed in float64 on the CPU so the choice is identical on any device
    (indices repeat when the box is thinner than ``n``). Returned on the mask's device.
    """
    mask = _as_3d(mask).bool()
    if not bool(mask.any()):
        mask = torch.ones_like(mask)
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = mask.any(dim=other).nonzero().flatten().cpu()
        lo, hi = float(present[0]), float(present[-1])
        idx = torch.linspace(lo, hi, n, dtype=torch.float64).round().long()
        out.append(idx.to(mask.device))
    return out[0], out[1], out[2]


def slices(volume: Tensor, n: int = N_SLICES, indices: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """Tri-planar slices ``[3n, 1, S, S]`` of a cubic volume ``[1, S, S, S]`` or ``[S, S, S]``.

    Order: ``n`` slices across axis 0 (``v[i, :, :]``), then axis 1 (``v[:, i, :]``), then axis 2 (``v[:, :, i]``).
    ``indices`` default to ``slice_indices(brain_mask(volume), n)``; pass the REAL volume's indices when slicing
    a generated one. Cubes only: the three planes of a non-cube have different shapes and could not be batched.
    """
    v = _as_3d(volume)
    if not v.shape[0] == v.shape[1] == v.shape[2]:
        raise ValueError(f"tri-planar slices need cubic volumes (S, S, S); got {tuple(v.shape)}: resample first")
    if indices is None:
        indices = slice_indices(brain_mask(v), n)
    i0, i1, i2 = (i.to(v.device) for i in indices)
    planes = (v.index_select(0, i0), v.index_select(1, i1).transpose(0, 1), v.index_select(2, i2).permute(2, 0, 1))
    return torch.cat(planes).unsqueeze(1)
