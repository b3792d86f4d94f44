"""Depthwise / separable 3-D conv speed: :func:`models.depthwise.depthwise_conv3d` against PyTorch's kernels.

Measured, never asserted (docs/PERFORMANCE.md explains why the depthwise backward matters). Every row is one
forward + backward (``out.backward(grad)`` with a fixed random ``grad`` in ``out``'s own memory format, input and
parameters requiring grad) at batch ``batch``; the figure is the median over ``repeats`` after one warm-up. The
implementations of one configuration are timed round-robin (one call of each per repeat), so that load from other
processes on a shared machine hits them alike.

Rows (``what`` / ``impl``):

* ``depthwise``: ``ours`` (:func:`depthwise_conv3d` on a channels_last_3d input, as inside a stack of these
  layers, whose outputs are channels_last_3d), ``ours_nc`` (same on an NCDHW-contiguous input: includes the
  layout conversions of a stack's first layer), ``torch`` (``nn.Conv3d(groups=C)``, NCDHW-contiguous input),
  ``torch_cl`` (same on a channels_last_3d input);
* ``separable``: depthwise 3x3x3 + pointwise 1x1x1 ``nn.Conv3d`` (``models.blocks.SeparableConv3d``'s structure),
  with the depthwise half ``ours`` / ``ours_nc`` / ``torch`` / ``torch_cl``;
* ``dense``: a standard 3x3x3 ``nn.Conv3d(C, C)``, ``torch`` / ``torch_cl``.

``speedup`` = the reference's time / this row's time, the reference being ``torch`` of the same ``what`` (for
``separable`` and ``dense`` rows: the faster of the two ``dense`` rows, the thing separable has to beat).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from models.depthwise import depthwise_conv3d

_CL = torch.channels_last_3d


def _fwd_bwd(module: Callable[[Tensor], Tensor], x: Tensor, params: Sequence[Tensor]) -> Callable[[], None]:
    """A closure running one forward + backward; the upstream grad is drawn once, in the output's layout."""
    with torch.no_grad():
        grad = torch.randn_like(module(x.detach()))

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        module(x).backward(grad)

    return step


def _depthwise_impls(c: int) -> dict[str, tuple[Callable[[Tensor], Tensor], list[Tensor], bool]]:
    """name -> (function of x, its parameters, wants a channels_last_3d input)."""
    ref = nn.Conv3d(c, c, 3, padding=1, groups=c, bias=False)
    w = ref.weight
    return {
        "ours": (lambda x: depthwise_conv3d(x, w), [w], True),
        "ours_nc": (lambda x: depthwise_conv3d(x, w), [w], False),
        "torch": (ref, [w], False),
        "torch_cl": (ref, [w], True),
    }


def _configs(sizes: Sequence[int], channels: Sequence[int]) -> list[tuple[int, int]]:
    if len(sizes) == len(channels):
        return list(zip(channels, sizes, strict=True))
    if len(channels) == 1:
        return [(channels[0], s) for s in sizes]
    if len(sizes) == 1:
        return [(c, sizes[0]) for c in channels]
    raise ValueError(f"sizes {list(sizes)} and channels {list(channels)}: give equal lengths (paired) or one of one")


def bench_depthwise(
    sizes: Sequence[int] = (64, 32, 16),
    channels: Sequence[int] = (32, 64, 128),
    batch: int = 2,
    repeats: int = 5,
) -> list[dict[str, Any]]:
    """Median forward+backward milliseconds of depthwise, separable and dense 3x3x3 blocks on CPU.

    Args:
        sizes: cubic volume edge lengths, paired with ``channels`` (or broadcast when one of them has one entry).
        channels: C (in = out channels of every block).
        batch: N.
        repeats: timed calls per implementation (median reported, plus min).
    Returns:
        One dict per (configuration, what, impl): ``what, impl, channels, size, batch, threads, median_ms, min_ms,
        speedup``.
    """
    rows: list[dict[str, Any]] = []
    threads = torch.get_num_threads()
    for c, size in _configs(sizes, channels):
        gen = torch.Generator().manual_seed(0)
        x0 = torch.randn(batch, c, size, size, size, generator=gen)
        x_nc = x0.clone().requires_grad_()
        x_cl = x0.contiguous(memory_format=_CL).requires_grad_()
        steps: dict[tuple[str, str], Callable[[], None]] = {}

        for name, (fn, params, cl) in _depthwise_impls(c).items():
            steps["depthwise", name] = _fwd_bwd(fn, x_cl if cl else x_nc, params)
        for name, (fn, params, cl) in _depthwise_impls(c).items():
            pw = nn.Conv3d(c, c, 1)
            steps["separable", name] = _fwd_bwd(
                lambda x, fn=fn, pw=pw: pw(fn(x)), x_cl if cl else x_nc, [*params, *pw.parameters()]
            )
        dense = nn.Conv3d(c, c, 3, padding=1)
        for name, cl in (("torch", False), ("torch_cl", True)):
            steps["dense", name] = _fwd_bwd(dense, x_cl if cl else x_nc, list(dense.parameters()))

        times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
        for step in steps.values():  # warm-up (oneDNN primitive creation, allocator)
            step()
        for _ in range(repeats):
            for key, step in steps.items():
                t = time.perf_counter()
                step()
                times[key].append((time.perf_counter() - t) * 1000)

        med = {key: statistics.median(v) for key, v in times.items()}
        dense_best = min(med["dense", "torch"], med["dense", "torch_cl"])
        for (what, impl), v in times.items():
            ref = med["depthwise", "torch"] if what == "depthwise" else dense_best
            rows.append({
                "what": what, "impl": impl, "channels": c, "size": size, "batch": batch, "threads": threads,
                "median_ms": round(med[what, impl], 2), "min_ms": round(min(v), 2),
                "speedup": round(ref / med[what, impl], 2),
            })
    return rows

