"""The two-stage augmentation of paper §2.4: conventional 3-D transforms, then differentiable augmentation.

(i) `conventional_transform`: torchio RandomBlur / RandomNoise / RandomGamma, each with its own probability, on one
training volume [1,S,S,S] (torchio reads 4-D tensors as C,W,H,D).
(ii) `diff_augment`: DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training")
in 3-D: brightness, saturation, contrast and translation (and optional cutout), applied to real and generated
batches alike in every adversarial update. Every op is differentiable w.r.t. x, so gradients reach the generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def conventional_transform(p_blur: float, p_noise: float, p_gamma: float):  # noqa: ANN201 - a callable
    """torchio RandomBlur, RandomNoise and RandomGamma with the given probabilities (paper §2.4 (i)).

    They act on physical intensity: the volume minus its background value (the z-score of intensity 0, ~ -4.6),
    so gamma sees non-negative intensities, and only inside the brain: background voxels keep their exact value.
    Ranges suit volumes z-scored inside the brain: blur SD up to 1 voxel, noise SD up to 0.1 (a tenth of the
    brain's intensity SD), log-gamma within ±0.3. Returns a callable mapping a [1,S,S,S] tensor to a [1,S,S,S]
    tensor; torchio seeds from torch's global generator (the training loop seeds it per step).
    """
    import torchio as tio  # ~2 s import (SimpleITK); only training needs it

    from metrics.triplanar import background_value

    for name, p in (("p_blur", p_blur), ("p_noise", p_noise), ("p_gamma", p_gamma)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    compose = tio.Compose(
        [
            tio.RandomBlur(std=(0.0, 1.0), p=p_blur),
            tio.RandomNoise(std=(0.0, 0.1), p=p_noise),
            tio.RandomGamma(log_gamma=(-0.3, 0.3), p=p_gamma),
        ]
    )

    if p_blur == p_noise == p_gamma == 0.0:
        return lambda x: x

    def apply(x: torch.Tensor) -> torch.Tensor:
        bg = background_value(x)
        out = compose(x - bg)
        out = (out if isinstance(out, torch.Tensor) else torch.as_tensor(out)) + bg
        # skull-stripped data: the background stays exactly background (the brain-mask convention)
        return torch.where((x - bg).abs() > 1e-4 * max(1.0, abs(bg)), out, x)

    return apply


class _GivenDraws:
    """Per-sample U(0,1) numbers given up front, [N, K]: each per-sample draw of the ops takes the next column."""

    def __init__(self, uniforms: torch.Tensor) -> None:
        self.uniforms = uniforms
        self.taken = 0

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        n, k = self.uniforms.shape
        if shape[0] != n or math.prod(shape) != n:
            raise ValueError(f"a draw of shape {shape} is not one number per sample of {n}")
        if self.taken == k:
            raise ValueError(f"the policy takes more than the {k} draws per sample given")
        self.taken += 1
        return self.uniforms[:, self.taken - 1].reshape(shape)


Draws = torch.Generator | _GivenDraws | None


def _uniform(x: torch.Tensor, shape: tuple[int, ...], generator: Draws) -> torch.Tensor:
    """U(0,1) draws made on the CPU (so a CPU generator serves any device), moved to x's device and dtype."""
    u = generator.take(shape) if isinstance(generator, _GivenDraws) else torch.rand(shape, generator=generator)
    return u.to(device=x.device, dtype=x.dtype)


def rand_brightness(x: torch.Tensor, generator: Draws = None) -> torch.Tensor:
    """Add U(-0.5, 0.5) per sample."""
    return x + (_uniform(x, (x.shape[0],) + (1,) * (x.dim() - 1), generator) - 0.5)


def rand_saturation(x: torch.Tensor, generator: Draws = None) -> torch.Tensor:
    """Scale the deviation from the channel mean by U(0, 2) per sample (a no-op for one channel, as in Zhao)."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_uniform(x, (x.shape[0],) + (1,) * (x.dim() - 1), generator) * 2.0) + mean


def rand_contrast(x: torch.Tensor, generator: Draws = None) -> torch.Tensor:
    """Scale around the per-sample mean by U(0.5, 1.5)."""
    mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return (x - mean) * (_uniform(x, (x.shape[0],) + (1,) * (x.dim() - 1), generator) + 0.5) + mean


def rand_translation(x: torch.Tensor, ratio: float = 0.125, generator: Draws = None) -> torch.Tensor:
    """Shift each sample by up to `ratio` of each spatial size, zero padded (index gather: exact and differentiable)."""
    n = x.shape[0]
    out = x
    for axis in range(2, x.dim()):
        size = x.shape[axis]
        reach = int(size * ratio + 0.5)
        if reach == 0:
            continue
        shift = (_uniform(x, (n,), generator) * (2 * reach + 1)).floor().long().clamp(max=2 * reach) - reach
        # Output voxel i reads input voxel i - shift; out-of-range reads land on a zero pad at index 0.
        index = torch.arange(size, device=x.device)[None, :] - shift.to(x.device)[:, None] + 1  # [N, size]
        index = index.clamp(0, size + 1)
        padded = F.pad(out.movedim(axis, -1), (1, 1))  # [..., size + 2], zero at both ends
        view = [n] + [1] * (padded.dim() - 2) + [size]
        gathered = torch.gather(padded, -1, index.view(view).expand(*padded.shape[:-1], size))
        out = gathered.movedim(-1, axis)
    return out


def rand_cutout(x: torch.Tensor, ratio: float = 0.5, generator: Draws = None) -> torch.Tensor:
    """Zero one random box of `ratio` times each spatial size per sample."""
    n, spatial = x.shape[0], x.shape[2:]
    mask = torch.ones((n, 1, *spatial), device=x.device, dtype=x.dtype)
    sizes = [max(1, int(s * ratio + 0.5)) for s in spatial]
    starts = [(_uniform(x, (n,), generator) * (s + 1 - k)).floor().long() for s, k in zip(spatial, sizes, strict=True)]
    grids = torch.meshgrid(*[torch.arange(s, device=x.device) for s in spatial], indexing="ij")
    for i in range(n):
        inside = torch.ones(spatial, dtype=torch.bool, device=x.device)
        for grid, start, k in zip(grids, starts, sizes, strict=True):
            inside &= (grid >= int(start[i])) & (grid < int(start[i]) + k)
        mask[i, 0][inside] = 0
    return x * mask


AUGMENTS: dict[str, list[Callable[..., torch.Tensor]]] = {
    "color": [rand_brightness, rand_saturation, rand_contrast],
    "translation": [rand_translation],
    "cutout": [rand_cutout],
}


# Per-sample U(0,1) numbers each op takes at most (translation and cutout: one per spatial axis).
_DRAWS = {rand_brightness: 1, rand_saturation: 1, rand_contrast: 1, rand_translation: 3, rand_cutout: 3}


def _policy_ops(policy: str) -> list[Callable[..., torch.Tensor]]:
    ops = []
    for name in filter(None, (p.strip() for p in policy.split(","))):
        if name not in AUGMENTS:
            raise ValueError(f"unknown DiffAugment policy {name!r}; known: {', '.join(AUGMENTS)}")
        ops += AUGMENTS[name]
    return ops


def diff_augment_draws(policy: str) -> int:
    """The per-sample U(0,1) numbers ``diff_augment`` takes under ``policy`` at most: the K of its ``uniforms``."""
    return sum(_DRAWS[op] for op in _policy_ops(policy))


def diff_augment(
    x: torch.Tensor,
    policy: str = "color,translation",
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """DiffAugment in 3-D on [N,C,D,H,W]: same shape out, differentiable w.r.t. x.

    Args:
        x: batch [N,C,D,H,W].
        policy: comma-separated subset of "color", "translation", "cutout"; "" is the identity.
        generator: CPU torch.Generator; the same generator state gives the same draws (on any device).
        uniforms: the draws given instead, U(0,1) [N, diff_augment_draws(policy)], column j for the j-th per-sample
            draw: sample i is augmented by row i alone, so a slice of a larger batch's rows augments that slice
            exactly as the larger batch would (how methods split a global batch over ranks).
    """
    if x.dim() != 5:
        raise ValueError(f"diff_augment expects [N,C,D,H,W], got shape {tuple(x.shape)}")
    draws: Draws = generator if uniforms is None else _GivenDraws(uniforms)
    for op in _policy_ops(policy):
        x = op(x, generator=draws)
    return x.contiguous()


# --- label-preserving augmentation for the shared stages (heads, FID network) ------------------------------------

# Left/right pairs among the six ratios (contract.ROI_NAMES: hipp_l, hipp_r, amyg_l, amyg_r, vent_l, vent_r).
LR_SWAP = (1, 0, 3, 2, 5, 4)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each volume of [N, 1, D, H, W] by an integer U{-max_shift..max_shift} voxels per axis.

    No interpolation (so no blur), and the uncovered border takes the volume's background value (its minimum: the
    z-score of intensity 0), not 0, which inside a z-scored volume would be tissue. Draws from ``generator`` (CPU).
    """
    if max_shift <= 0:
        return x
    n, spatial = x.shape[0], x.shape[2:]
    bg = x.flatten(1).amin(dim=1).tolist()
    shifts = torch.randint(0, 2 * max_shift + 1, (n, 3), generator=generator).tolist()
    out = []
    for i, (a, b, c) in enumerate(shifts):
        padded = F.pad(x[i], (max_shift,) * 6, value=bg[i])
        out.append(padded[:, a : a + spatial[0], b : b + spatial[1], c : c + spatial[2]])
    return torch.stack(out)


def random_mirror(
    x: torch.Tensor, c: torch.Tensor, generator: torch.Generator, p: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror each volume left-right (first spatial axis, RAS) with probability ``p`` and swap its left/right ratios.

    ``c`` is [N, 7] (six ratios + label) or [N, 6]; the label is unchanged. Valid for the synthetic cohort (built on
    the symmetric MNI152 2009a template) and for real data in RAS orientation, where a mirrored brain is a
    plausible brain with the sides exchanged.
    """
    flip = torch.rand(x.shape[0], generator=generator) < p
    if not bool(flip.any()):
        return x, c
    x = torch.where(flip.view(-1, 1, 1, 1, 1).to(x.device), x.flip(2), x)
    swapped = c.clone()
    swapped[:, : len(LR_SWAP)] = c[:, list(LR_SWAP)]
    c = torch.where(flip.view(-1, 1).to(c.device), swapped, c)
    return x, c
