"""Fast depthwise 3-D convolution (stride 1) for CPU training of separable-conv networks.

Why this exists (docs/PERFORMANCE.md, "Depthwise-separable 3-D convolutions on CPU"): PyTorch's CPU kernel for
``F.conv3d(..., groups=C)`` is slow in the contiguous layout and, worse, its backward is slow in every layout —
oneDNN's 3-D depthwise *weight* gradient takes 80-170 ms at C=64, 32^3, batch 2 and 0.5-1.3 s at C=32, 64^3, i.e.
hundreds of times the memory-bound limit. That made separable blocks no faster than dense 3x3x3 convs at high
resolution, where most of an encoder's compute sits. :func:`depthwise_conv3d` is a drop-in replacement built
from PyTorch/oneDNN primitives that are fast:

* forward: oneDNN's channels_last_3d depthwise kernel (vectorised over channels), 4-8x the contiguous path;
* grad_input: a depthwise conv of grad_output with the spatially flipped kernel (stride 1: the transposed conv
  *is* a conv), again the fast channels_last_3d forward kernel;
* grad_weight: the 3-D weight gradient is a sum over the k depth offsets of **2-D** depthwise weight gradients,
  and oneDNN's 2-D (NHWC) depthwise weight-gradient kernel is fast where its 3-D one is not. In channels_last_3d
  memory ``[N, D, H, W, C]`` every depth plane is an NHWC image, so for depth offset ``a`` the pairs
  (x plane ``q + a - p``, grad_out plane ``q``) are two *views* of one batch of N*D planes, with no copy
  (:func:`_grad_weight_channels_last`). Alternatives measured (C=64, 32^3 / C=32, 64^3, batch 2, 2 threads):
  oneDNN 3-D weight grad 80-170 / 480-1300 ms; the grouped-conv trick with batch moved to channels (x as
  [1, C*N, ...] input, grad_out as a [C, N, D, H, W] kernel, groups=C) 150 ms / much worse, 2.2 s in
  channels_last; 27 shifted products 450 ms; per-row GEMMs + diagonal sums 100 / 850 ms; blocked depthwise conv
  with grad_out blocks as kernels 140+ ms; the 2-D decomposition 14-30 / 90-130 ms (k = 3 oneDNN calls, each
  reading x and grad_out once; a fused one-pass C++ kernel could reach ~3x less, at the price of a compiler).

Measured result (``benchmark/bench_depthwise.py``, batch 2, 2 threads, forward + backward medians): the depthwise
layer is 6-10x faster than ``nn.Conv3d(groups=C)`` and a separable block (this + a 1x1x1 conv) 6-10x faster than
a dense 3x3x3 conv at C=32/64^3, C=64/32^3 and C=128/16^3 (it was 0.8-6x before).

Double backward (gradient penalties: R1, WGAN-GP) works: when the backward runs with ``create_graph=True`` it
switches to ``torch.ops.aten.convolution_backward``, whose own derivative PyTorch defines. Pass
``differentiable_twice=True`` (or use :func:`plain_depthwise`) to skip the custom Function altogether.

Only CPU tensors take the custom path; on CUDA (cuDNN) and other devices :func:`depthwise_conv3d` is exactly
``F.conv3d(x, weight, bias, padding=padding, groups=C)``.

The output is returned in channels_last_3d memory format (values identical; ``.contiguous()`` if a caller needs
NCDHW strides): a 1x1x1 pointwise conv after it — the other half of a separable block — is 2-3x faster on a
channels_last_3d input, and its output stays channels_last_3d, so a whole separable stack runs without layout
conversions. A contiguous input costs one NCDHW -> NDHWC transpose copy (a stack's first layer only).

Environment, not code (for whoever times this on a shared CPU box): large tensors (> 32 MB, e.g. 64^3 volumes)
are mmap-ed afresh by glibc on every allocation, and the page faults can cost more than the convolution
(``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` raise that limit); with more runnable threads than cores,
OpenMP's spin-waiting makes barrier-heavy kernels (this weight gradient included) up to 10x slower
(``OMP_WAIT_POLICY=PASSIVE``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DepthwiseConv3d",
    "depthwise_conv3d",
    "differentiable_twice",
    "plain_depthwise",
]

_CL = torch.channels_last_3d

# Module-level default for ``differentiable_twice`` (see :func:`differentiable_twice`).
_DIFFERENTIABLE_TWICE = False


@contextlib.contextmanager
def differentiable_twice(enabled: bool = True) -> Iterator[None]:
    """Context manager: inside it, :func:`depthwise_conv3d` calls without an explicit ``differentiable_twice``
    use the plain ``F.conv3d`` path (autograd of any order, slower CPU backward).

    Not needed for correctness — the custom backward already supports ``create_graph=True`` — but it makes the
    double-backward graph the stock PyTorch one, e.g. around a discriminator's R1 / WGAN-GP penalty.
    Not thread-safe (a module global), like ``torch.backends`` flags.
    """
    global _DIFFERENTIABLE_TWICE
    previous = _DIFFERENTIABLE_TWICE
    _DIFFERENTIABLE_TWICE = enabled
    try:
        yield
    finally:
        _DIFFERENTIABLE_TWICE = previous


def plain_depthwise(x: Tensor, weight: Tensor, bias: Tensor | None = None, padding: int | None = None) -> Tensor:
    """Reference path: ``F.conv3d(x, weight, bias, padding=padding, groups=C)``, run in channels_last_3d on CPU.

    The layout change alone gives the fast oneDNN forward; the backward is PyTorch's own (slow on CPU, but
    differentiable to any order).
    """
    k = weight.shape[-1]
    padding = k // 2 if padding is None else padding
    if x.device.type == "cpu":
        x = x.contiguous(memory_format=_CL)
    return F.conv3d(x, weight, bias, padding=padding, groups=x.shape[1])


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int) -> None:
    if x.dim() != 5:
        raise ValueError(f"depthwise_conv3d expects x of shape [N, C, D, H, W], got {tuple(x.shape)}")
    c = x.shape[1]
    if weight.dim() != 5 or weight.shape[0] != c or weight.shape[1] != 1:
        raise ValueError(f"depthwise_conv3d expects weight of shape [{c}, 1, k, k, k], got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (c,):
        raise ValueError(f"depthwise_conv3d expects bias of shape [{c}], got {tuple(bias.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")


def depthwise_conv3d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    padding: int | None = None,
    *,
    differentiable_twice: bool | None = None,
) -> Tensor:
    """Depthwise 3-D convolution, stride 1: ``F.conv3d(x, weight, bias, padding=padding, groups=C)``.

    Args:
        x: [N, C, D, H, W], any memory format.
        weight: [C, 1, kd, kh, kw] (usually k x k x k).
        bias: [C] or None.
        padding: zero padding on every spatial side; default ``k // 2`` ("same" for odd k).
        differentiable_twice: True -> plain ``F.conv3d`` (:func:`plain_depthwise`); None -> the module default
            set by :func:`differentiable_twice` (False). The fast path also supports ``create_graph=True``.
    Returns:
        [N, C, D', H', W'] with D' = D + 2 * padding - kd + 1 (etc.), in channels_last_3d memory format on CPU.

    For compatibility with callers written as ``depthwise_conv3d(x, w, padding)``, an ``int`` in the ``bias``
    position is taken as ``padding``.
    """
    if isinstance(bias, int) and not isinstance(bias, bool):  # legacy positional call (x, w, padding)
        if padding is not None:
            raise TypeError("depthwise_conv3d: got an int bias and a padding; pass padding by keyword")
        bias, padding = None, bias
    padding = weight.shape[-1] // 2 if padding is None else int(padding)
    _check(x, weight, bias, padding)
    twice = _DIFFERENTIABLE_TWICE if differentiable_twice is None else differentiable_twice
    if x.device.type != "cpu":  # cuDNN / other backends: the stock op.
        return F.conv3d(x, weight, bias, padding=padding, groups=x.shape[1])
    if twice or torch.is_autocast_enabled("cpu"):  # CPU autocast: leave dtype handling to the stock op
        return plain_depthwise(x, weight, bias, padding)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if not needs_grad:  # inference: skip the Function's bookkeeping.
        return F.conv3d(x.contiguous(memory_format=_CL), weight, bias, padding=padding, groups=x.shape[1])
    return _DepthwiseConv3dFn.apply(x, weight, bias, padding)


class _DepthwiseConv3dFn(torch.autograd.Function):
    """Autograd Function: channels_last_3d forward, flipped-kernel grad_input, 2-D-decomposed grad_weight."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, padding: int) -> Tensor:  # type: ignore[override]
        x_cl = x.contiguous(memory_format=_CL)
        # Both x and its channels_last_3d copy are saved: the copy spares the backward a second NCDHW -> NDHWC
        # transpose (20-30 ms at C=64, 32^3, batch 2 — as much as the whole fast backward), x itself lets a
        # create_graph backward differentiate with respect to the real input. When x already is channels_last_3d
        # (any layer after the first in a stack of these) they are the same tensor and nothing extra is kept.
        ctx.save_for_backward(x, x_cl, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return F.conv3d(x_cl, weight, bias, padding=padding, groups=x.shape[1])

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, x_cl, weight = ctx.saved_tensors
        p: int = ctx.padding
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        c = x.shape[1]
        if torch.is_grad_enabled():
            # create_graph=True (double backward): use PyTorch's differentiable convolution_backward.
            gx, gw, gb = torch.ops.aten.convolution_backward(
                grad_out, x, weight, [c] if ctx.has_bias else None,
                [1, 1, 1], [p, p, p], [1, 1, 1], False, [0, 0, 0], c, [need_x, need_w, need_b],
            )
            return (gx if need_x else None), (gw if need_w else None), (gb if need_b else None), None

        g = grad_out.contiguous(memory_format=_CL)
        grad_x = _grad_input_channels_last(g, weight, p) if need_x else None
        grad_w = _grad_weight_channels_last(x_cl, g, weight.shape, p) if need_w else None
        grad_b = g.permute(0, 2, 3, 4, 1).reshape(-1, c).sum(0) if need_b else None
        return grad_x, grad_w, grad_b, None


def _grad_input_channels_last(g: Tensor, weight: Tensor, p: int) -> Tensor:
    """dL/dx for stride 1: correlation of grad_out with the spatially flipped kernel ("full" conv).

    The transposed conv of a stride-1 conv with padding p is a conv with padding k - 1 - p; a negative value is
    applied as a crop of grad_out. Runs the fast channels_last_3d forward kernel instead of oneDNN's slow 3-D
    depthwise backward-data.
    """
    wf = weight.flip(2, 3, 4)
    pads = [k - 1 - p for k in weight.shape[2:]]
    if min(pads) < 0:
        crop = [max(0, -q) for q in pads]
        g = g[:, :, crop[0]: g.shape[2] - crop[0], crop[1]: g.shape[3] - crop[1], crop[2]: g.shape[4] - crop[2]]
        pads = [max(0, q) for q in pads]
    return F.conv3d(g, wf, padding=pads, groups=g.shape[1])


def _weight_grad_2d(g2: Tensor, x2: Tensor, kh: int, kw: int, p: int) -> Tensor:
    """oneDNN's 2-D depthwise weight gradient ([B, C, H, W] NHWC views in, [C, 1, kh, kw] out)."""
    c = x2.shape[1]
    w2 = x2.new_empty(c, 1, kh, kw)  # only its shape is read
    return torch.ops.aten.convolution_backward(
        g2, x2, w2, None, [1, 1], [p, p], [1, 1], False, [0, 0], c, [False, True, False]
    )[1]


def _grad_weight_channels_last(x: Tensor, g: Tensor, wshape: torch.Size, p: int) -> Tensor:
    """dL/dweight as a sum over depth offsets of 2-D depthwise weight gradients (see the module docstring).

    grad_w[c, a, b, e] = sum_{n, o, h, w} x_pad[n, c, o + a, h + b, w + e] * g[n, c, o, h, w]. For a fixed depth
    tap ``a`` this is the 2-D weight gradient over a batch of (x plane o + a - p, g plane o) pairs. With x and g in
    channels_last_3d, ``[N, D, H, W, C]`` memory, all depth planes of all samples form one NHWC batch of N*D
    images; the pairs for tap ``a`` are then the two contiguous slices ``x[s:]`` / ``g[:-s]`` (s = a - p) of that
    batch, except at sample boundaries, where the few planes that paired across samples are subtracted again with
    a second, small call. Cost: k calls reading x and g once each, no copies of the volume.
    """
    n, c, d, h, w = x.shape
    kd, kh, kw = wshape[2:]
    od = g.shape[2]
    xl = x.permute(0, 2, 3, 4, 1)  # [N, D, H, W, C], contiguous
    gl = g.permute(0, 2, 3, 4, 1)  # [N, Od, Ho, Wo, C]
    out = x.new_zeros(c, 1, kd, kh, kw)
    if od != d:  # padding != (k - 1) / 2: planes of x and g do not line up across samples; one call per sample.
        for a in range(kd):
            s = a - p
            lo, hi = max(0, -s), min(od, d - s)
            if hi <= lo:
                continue
            for i in range(n):
                xa = xl[i, lo + s: hi + s].permute(0, 3, 1, 2)
                ga = gl[i, lo:hi].permute(0, 3, 1, 2)
                out[:, :, a] += _weight_grad_2d(ga, xa, kh, kw, p)
        return out

    xf = xl.reshape(n * d, h, w, c)  # views (x, g are channels_last_3d)
    gf = gl.reshape(n * d, *gl.shape[2:])
    for a in range(kd):
        s = a - p  # x plane index = g plane index + s
        if abs(s) >= d:
            continue
        xa = xf[s:] if s >= 0 else xf[: n * d + s]
        ga = gf[: n * d - s] if s >= 0 else gf[-s:]
        gw = _weight_grad_2d(ga.permute(0, 3, 1, 2), xa.permute(0, 3, 1, 2), kh, kw, p)
        if n > 1 and s != 0:
            # g planes whose partner x plane lies in the neighbouring sample (zero padding in truth).
            edge = range(d - s, d) if s > 0 else range(0, -s)
            qs = [i * d + j for i in range(n) for j in edge if 0 <= i * d + j + s < n * d]
            qi = torch.tensor(qs, device=x.device)
            gw = gw - _weight_grad_2d(
                gf.index_select(0, qi).permute(0, 3, 1, 2), xf.index_select(0, qi + s).permute(0, 3, 1, 2), kh, kw, p
            )
        out[:, :, a] = gw
    return out


class DepthwiseConv3d(nn.Module):
    """Depthwise 3-D conv layer (stride 1) on :func:`depthwise_conv3d`; weight [C, 1, k, k, k], optional bias.

    Init: Xavier-uniform with fans counted per group (fan_in = fan_out = k^3: each channel's filter maps one
    channel to one channel; torch's ``xavier_uniform_`` would take fan_out = C * k^3 and shrink it by ~sqrt(C)),
    zero bias.
    """

    def __init__(
        self, channels: int, kernel_size: int = 3, bias: bool = True, padding: int | None = None,
        differentiable_twice: bool | None = None,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.kernel_size = kernel_size
        self.padding = kernel_size // 2 if padding is None else padding
        self.differentiable_twice = differentiable_twice
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        taps = self.kernel_size**3
        bound = math.sqrt(6.0 / (taps + taps))
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return depthwise_conv3d(x, self.weight, self.bias, self.padding, differentiable_twice=self.differentiable_twice)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, padding={self.padding}, bias={self.bias is not None}"
