"""Convolution blocks shared by our model and the StyleGAN2 baseline.

The modulation maths (StyleGAN2, Karras et al. 2020, Eq. 1-3) lives in :func:`modulated_conv3d` and
:func:`demodulation` once; the baseline's full-kernel layers call the first, our layers the second.

Our layers (paper §2.4) are built from two kernels:

- :class:`SeparableConv3d`: Xception factorisation (Chollet 2017), a depthwise k^3 convolution per input channel
  followed by a pointwise 1x1x1 channel mix: ``Cin * k^3 + Cin * Cout`` weights instead of ``Cin * Cout * k^3``.
- :class:`ModulatedSeparableConv3d` / :class:`ModulatedConv3d`: the same kernels modulated per sample by a style
  vector and demodulated (StyleGAN2). The style conv "SC" that mixes channels after every up-sample is a
  modulated 1x1x1 convolution (:func:`style_conv`).

:func:`conv3x3x3` and :func:`modulated_conv3x3x3` are the switch between separable and standard 3x3x3 kernels, so
the Table 2 rows ``vae``/``vaegan`` (standard) and ``xvaegan``... (separable) share one block structure.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def demodulation(weight_sq: Tensor, styles: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-sample, per-output-channel demodulation coefficients.

    Args:
        weight_sq: [Cout, Cin] sum over kernel taps of the squared (unmodulated) weights.
        styles: [N, Cin] modulation scales.
    Returns:
        [N, Cout] = 1 / sqrt(sum_i weight_sq[o, i] * styles[n, i]^2 + eps).
    """
    return torch.rsqrt(styles.square() @ weight_sq.t() + eps)


def modulated_conv3d(
    x: Tensor, weight: Tensor, styles: Tensor, demodulate: bool = True, padding: int = 0, eps: float = 1e-8
) -> Tensor:
    """StyleGAN2 modulated 3-D convolution as one grouped convolution over the batch.

    Args:
        x: [N, Cin, D, H, W].
        weight: [Cout, Cin, k, k, k] shared weights.
        styles: [N, Cin] per-sample input-channel scales.
    Returns:
        [N, Cout, D', H', W'].
    """
    n, cin = styles.shape
    cout = weight.shape[0]
    w = weight.unsqueeze(0) * styles.view(n, 1, cin, 1, 1, 1)  # [N, Cout, Cin, k, k, k]
    if demodulate:
        w = w * torch.rsqrt(w.square().sum(dim=(2, 3, 4, 5), keepdim=True) + eps)
    x = x.reshape(1, n * cin, *x.shape[2:])
    out = F.conv3d(x, w.reshape(n * cout, cin, *weight.shape[2:]), padding=padding, groups=n)
    return out.reshape(n, cout, *out.shape[2:])


# --- depthwise kernel --------------------------------------------------------------------------------------------


@functools.cache
def _fast_depthwise() -> Callable[..., Tensor] | None:
    """``models.depthwise.depthwise_conv3d`` when that module is importable (looked up once, on first use)."""
    try:
        from models.depthwise import depthwise_conv3d
    except ImportError:
        return None
    return depthwise_conv3d


def _depthwise(x: Tensor, w: Tensor, padding: int, stride: int = 1) -> Tensor:
    """Depthwise 3-D convolution, ``F.conv3d(x, w, padding=padding, stride=stride, groups=C)``.

    Args:
        x: [N, C, D, H, W].
        w: [C, 1, k, k, k].
    Returns:
        [N, C, D', H', W'].

    Stride 1 goes through the fast kernel of ``models.depthwise`` when it exists (PERFORMANCE.md: PyTorch's CPU
    depthwise backward is the bottleneck of separable convs); strided calls (the discriminator only) use PyTorch.
    """
    fast = _fast_depthwise() if stride == 1 else None
    if fast is not None:
        return fast(x, w, padding=padding)
    return F.conv3d(x, w, padding=padding, stride=stride, groups=x.shape[1])


# --- initialisation ----------------------------------------------------------------------------------------------


class StyleAffine(nn.Linear):
    """Style vector w -> per-input-channel scales s (StyleGAN2 "A" blocks); the bias starts at 1 so s ~ 1."""


def _xavier_uniform_(weight: Tensor, fan_in: int, fan_out: int, gain: float) -> None:
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        weight.uniform_(-bound, bound)


def xavier_init_(module: nn.Module, gain: float = 1.0) -> nn.Module:
    """Xavier-uniform weights and zero biases for every conv/linear in ``module`` (paper §2.5); returns it.

    Grouped (depthwise) kernels count fans per group: torch's own ``xavier_uniform_`` takes fan_out of a
    [C, 1, k, k, k] depthwise kernel as C * k^3, which would shrink its init by ~sqrt(C); here it is k^3 as for one
    channel's filter. :class:`StyleAffine` biases start at 1 (StyleGAN2), so modulation starts near identity.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv3d | nn.Conv2d | nn.Conv1d):
            taps = math.prod(m.kernel_size)
            _xavier_uniform_(m.weight, m.in_channels // m.groups * taps, m.out_channels // m.groups * taps, gain)
        elif isinstance(m, nn.Linear):
            _xavier_uniform_(m.weight, m.in_features, m.out_features, gain)
        elif isinstance(m, SeparableConv3d | ModulatedSeparableConv3d):
            taps = math.prod(m.depthwise_weight.shape[2:])
            _xavier_uniform_(m.depthwise_weight, taps, taps, gain)
            if isinstance(m, ModulatedSeparableConv3d):
                cout, cin = m.pointwise_weight.shape
                _xavier_uniform_(m.pointwise_weight, cin, cout, gain)
        elif isinstance(m, ModulatedConv3d):
            taps = math.prod(m.weight.shape[2:])
            _xavier_uniform_(m.weight, m.weight.shape[1] * taps, m.weight.shape[0] * taps, gain)
        else:
            continue
        bias = getattr(m, "bias", None)
        if isinstance(bias, Tensor):
            with torch.no_grad():
                bias.fill_(1.0 if isinstance(m, StyleAffine) else 0.0)
    return module


def leaky_relu_gain(negative_slope: float) -> float:
    """sqrt(2 / (1 + slope^2)): the factor that keeps unit variance through a LeakyReLU (He et al. 2015)."""
    return math.sqrt(2.0 / (1.0 + negative_slope**2))


class ScaledLeakyReLU(nn.Module):
    """LeakyReLU(0.2) times sqrt(2 / (1 + 0.2^2)), the gain that keeps unit activation variance (He et al. 2015).

    StyleGAN2 scales its activations the same way. Xavier-initialised layers preserve variance only for linear
    maps, and every plain LeakyReLU halves it: through the ~12 layers between z and the decoder output the signal
    would start at ~1e-2 of the target's scale, and Adam at lr 1e-4 needs thousands of steps just to undo that.
    """

    def __init__(self, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.negative_slope = negative_slope
        self.gain = leaky_relu_gain(negative_slope)

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x, self.negative_slope) * self.gain


def with_folded_gain(layer: nn.Module, negative_slope: float = 0.2) -> list[nn.Module]:
    """``[layer, act]`` computing ``ScaledLeakyReLU(layer(x))`` with the gain folded into the layer's weights.

    For g > 0, g * leaky(y) = leaky(g * y), and g * y costs nothing when the layer scales its (small) weights and bias
    instead: the separate multiply over the whole activation, and its backward, disappear. At 64^3 they were a
    sixth of a training step of ``ours`` on CPU (full-resolution 64-channel tensors are memory-bound). ``layer``
    must have an ``out_gain`` attribute (:class:`GainConv3d`, the separable and modulated convs here).
    """
    if not hasattr(layer, "out_gain"):
        raise TypeError(f"{type(layer).__name__} cannot fold an output gain (no out_gain attribute)")
    layer.out_gain = leaky_relu_gain(negative_slope)
    return [layer, nn.LeakyReLU(negative_slope)]


class GainConv3d(nn.Conv3d):
    """``nn.Conv3d`` times ``out_gain``, applied to the weight and bias (same parameters and state dict keys)."""

    out_gain: float = 1.0

    def forward(self, x: Tensor) -> Tensor:
        if self.out_gain == 1.0:
            return super().forward(x)
        g = self.out_gain
        return self._conv_forward(x, self.weight * g, None if self.bias is None else self.bias * g)


# --- separable and standard kernels ------------------------------------------------------------------------------


class SeparableConv3d(nn.Module):
    """Depthwise k^3 conv per channel, then a pointwise 1x1x1 conv (Xception factorisation, paper §2.4).

    ``[N, Cin, D, H, W] -> [N, Cout, D', H', W']`` with "same" padding (D' = ceil(D / stride)). One bias, after the
    pointwise conv (a depthwise bias would only be mixed into it). Parameters: ``Cin * k^3 + Cin * Cout + Cout``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 bias: bool = True) -> None:
        super().__init__()
        self.stride = stride
        self.padding = kernel_size // 2
        self.depthwise_weight = nn.Parameter(torch.empty(in_channels, 1, *(kernel_size,) * 3))
        self.pointwise = nn.Conv3d(in_channels, out_channels, 1, bias=bias)
        self.out_gain = 1.0  # see with_folded_gain
        xavier_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        h = _depthwise(x, self.depthwise_weight, self.padding, self.stride)
        return pointwise_conv(h, self.pointwise, self.out_gain)


def pointwise_conv(h: Tensor, conv: nn.Conv3d, gain: float = 1.0) -> Tensor:
    """``gain * conv(h)`` for a 1x1x1 ``conv``, as one GEMM over all voxels when h is channels-last (NDHWC).

    The depthwise kernel works channels-last, and oneDNN's 1x1x1 convolution backward was the largest remaining
    cost of a CPU training step: the GEMM needs no layout copy. A single-channel h is both layouts at once; there
    the GEMM path also replaces oneDNN's slow 1 -> C (and C -> 1) convolutions at full resolution. The result is
    channels-last as well.
    """
    weight, bias = conv.weight, conv.bias
    if gain != 1.0:
        weight, bias = weight * gain, None if bias is None else bias * gain
    if _channels_last(h):
        return F.linear(h.permute(0, 2, 3, 4, 1), weight.flatten(1), bias).permute(0, 4, 1, 2, 3)
    return F.conv3d(h, weight, bias)


def _channels_last(h: Tensor) -> bool:
    """True for a 5-D tensor laid out channels-last (NDHWC): one that is not also NCDHW-contiguous, or has 1 channel."""
    return h.dim() == 5 and h.is_contiguous(memory_format=torch.channels_last_3d) and (
        h.shape[1] == 1 or not h.is_contiguous())


def conv3x3x3(in_channels: int, out_channels: int, separable: bool, stride: int = 1, bias: bool = True) -> nn.Module:
    """The switch between a :class:`SeparableConv3d` and a standard ``nn.Conv3d`` (3x3x3, "same" padding)."""
    if separable:
        return SeparableConv3d(in_channels, out_channels, 3, stride=stride, bias=bias)
    return xavier_init_(GainConv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias))


# --- modulated kernels -------------------------------------------------------------------------------------------


def modulated_pointwise(h: Tensor, weight: Tensor, s: Tensor, d: Tensor | None, bias: Tensor | None,
                        gain: float = 1.0) -> Tensor:
    """A 1x1x1 convolution with per-sample weights ``d[n, o] * weight[o, i] * s[n, i]`` (+ bias) as one batched GEMM.

    Folding the modulation and demodulation into the [N, Cout, Cin] weights replaces two elementwise passes over
    full-resolution activations (and their backward reductions) by work on the tiny weight tensor: measured on CPU,
    the elementwise ``x * s`` / ``h * d`` multiplies took about a third of a training step of ``ours`` at 64^3.
    ``h [N, Cin, D, H, W]``, ``weight [Cout, Cin]``, ``s [N, Cin]``, ``d [N, Cout]`` -> ``[N, Cout, D, H, W]``;
    the output is scaled by ``gain`` (through the weights, see :func:`with_folded_gain`).
    """
    n, cin = s.shape
    wn = weight.unsqueeze(0) * s.unsqueeze(1)
    if d is not None:
        wn = wn * d.unsqueeze(2)
    if gain != 1.0:
        wn, bias = wn * gain, None if bias is None else bias * gain
    spatial = h.shape[2:]
    if _channels_last(h):
        # Channels-last input (the fast depthwise kernel's output): multiply in that layout, [N, V, Cin] @
        # [N, Cin, Cout], and return channels-last too, so no NCDHW <-> NDHWC copy is made on either side.
        flat = h.permute(0, 2, 3, 4, 1).reshape(n, -1, cin)
        wt = wn.transpose(1, 2)
        out = torch.bmm(flat, wt) if bias is None else torch.baddbmm(bias.view(1, 1, -1), flat, wt)
        return out.view(n, *spatial, -1).permute(0, 4, 1, 2, 3)
    flat = h.reshape(n, cin, -1)
    out = torch.bmm(wn, flat) if bias is None else torch.baddbmm(bias.view(1, -1, 1), wn, flat)
    return out.view(n, -1, *spatial)


class ModulatedSeparableConv3d(nn.Module):
    """StyleGAN2 modulation/demodulation of a separable kernel, driven by a style vector w.

    The effective kernel is ``W[o, i, k] = P[o, i] * Dw[i, k]`` (pointwise P: [Cout, Cin], depthwise Dw:
    [Cin, k^3]). Modulating and demodulating only Dw would cancel the style (each depthwise filter would be
    renormalised by its own scale), so the modulation acts on the input channels of W and the demodulation on its
    output channels: ``W'[n, o, i, k] = d[n, o] * P[o, i] * s[n, i] * Dw[i, k]`` with
    ``d[n, o] = 1 / sqrt(sum_i P[o, i]^2 * s[n, i]^2 * ||Dw_i||^2)``.

    Computed as "depthwise -> pointwise with per-sample weights d * P * s" (:func:`modulated_pointwise`), which equals
    the grouped convolution with W' exactly (:meth:`forward_grouped`, a test checks both) because the per-sample
    factors s and d commute with the shared spatial kernels. Why this path: it keeps the separable cost
    (``Cin * k^3 + Cin * Cout`` MACs per voxel, a shared depthwise kernel, so the fast kernel applies), whereas the
    grouped path materialises N dense [Cout, Cin, k^3] kernels and runs a groups=N dense convolution
    (``Cin * Cout * k^3`` MACs per voxel, ~27x more at 256 channels).

    ``forward(x [N, Cin, D, H, W], w [N, style_dim]) -> [N, Cout, D, H, W]``.
    """

    def __init__(self, in_channels: int, out_channels: int, style_dim: int, kernel_size: int = 3,
                 demodulate: bool = True, bias: bool = True) -> None:
        super().__init__()
        self.padding = kernel_size // 2
        self.demodulate = demodulate
        self.affine = StyleAffine(style_dim, in_channels)
        self.depthwise_weight = nn.Parameter(torch.empty(in_channels, 1, *(kernel_size,) * 3))
        self.pointwise_weight = nn.Parameter(torch.empty(out_channels, in_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.out_gain = 1.0  # see with_folded_gain
        xavier_init_(self)

    def styles(self, w: Tensor) -> Tensor:
        """[N, style_dim] -> [N, Cin] modulation scales."""
        return self.affine(w)

    def weight_sq(self) -> Tensor:
        """[Cout, Cin] sum over taps of the squared effective kernel, ``P[o, i]^2 * ||Dw_i||^2``."""
        return self.pointwise_weight.square() * self.depthwise_weight.square().flatten(1).sum(1)

    def effective_weight(self) -> Tensor:
        """[Cout, Cin, k, k, k] dense kernel ``P[o, i] * Dw[i, k]`` (reference path and tests)."""
        return self.pointwise_weight[:, :, None, None, None] * self.depthwise_weight[:, 0].unsqueeze(0)

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        s = self.styles(w)
        d = demodulation(self.weight_sq(), s) if self.demodulate else None
        # s commutes with the per-channel depthwise kernel, so it joins d in the per-sample pointwise weights
        h = _depthwise(x, self.depthwise_weight, self.padding)
        return modulated_pointwise(h, self.pointwise_weight, s, d, self.bias, self.out_gain)

    def forward_grouped(self, x: Tensor, w: Tensor) -> Tensor:
        """The same map through :func:`modulated_conv3d` with the explicit effective kernel (slow; reference)."""
        out = modulated_conv3d(x, self.effective_weight(), self.styles(w), self.demodulate, self.padding)
        return self.out_gain * (out if self.bias is None else out + self.bias.view(1, -1, 1, 1, 1))


class ModulatedConv3d(nn.Module):
    """StyleGAN2 modulated/demodulated convolution with a dense k^3 kernel (k = 1 is the style conv "SC").

    Same "scale input -> conv -> scale output" evaluation as :class:`ModulatedSeparableConv3d` (exactly equal to
    the grouped path of :func:`modulated_conv3d`, :meth:`forward_grouped`), so the kernel is shared across the
    batch and cuDNN/oneDNN run one ordinary convolution.

    ``forward(x [N, Cin, D, H, W], w [N, style_dim]) -> [N, Cout, D, H, W]``.
    """

    def __init__(self, in_channels: int, out_channels: int, style_dim: int, kernel_size: int = 1,
                 demodulate: bool = True, bias: bool = True) -> None:
        super().__init__()
        self.padding = kernel_size // 2
        self.demodulate = demodulate
        self.affine = StyleAffine(style_dim, in_channels)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *(kernel_size,) * 3))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.out_gain = 1.0  # see with_folded_gain
        xavier_init_(self)

    def styles(self, w: Tensor) -> Tensor:
        """[N, style_dim] -> [N, Cin] modulation scales."""
        return self.affine(w)

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        s = self.styles(w)
        n, cin = s.shape
        d = demodulation(self.weight.square().flatten(2).sum(2), s) if self.demodulate else None
        g = self.out_gain
        if self.weight.shape[2:] == (1, 1, 1):
            return modulated_pointwise(x, self.weight.flatten(1), s, d, self.bias, g)
        h = F.conv3d(x * s.view(n, cin, 1, 1, 1), self.weight * g, padding=self.padding)
        if d is not None:
            h = h * d.view(n, -1, 1, 1, 1)
        return h if self.bias is None else h + (self.bias * g).view(1, -1, 1, 1, 1)

    def forward_grouped(self, x: Tensor, w: Tensor) -> Tensor:
        """Reference path through :func:`modulated_conv3d` (tests)."""
        out = modulated_conv3d(x, self.weight, self.styles(w), self.demodulate, self.padding)
        return self.out_gain * (out if self.bias is None else out + self.bias.view(1, -1, 1, 1, 1))


def style_conv(in_channels: int, out_channels: int, style_dim: int) -> ModulatedConv3d:
    """The decoder's "SC" channel mixer (paper §2.4): a modulated, demodulated 1x1x1 convolution."""
    return ModulatedConv3d(in_channels, out_channels, style_dim, kernel_size=1)


def modulated_conv3x3x3(in_channels: int, out_channels: int, style_dim: int, separable: bool) -> nn.Module:
    """The switch between a modulated separable (sd_c3, paper Fig. 2-B) and a modulated standard 3x3x3 conv."""
    if separable:
        return ModulatedSeparableConv3d(in_channels, out_channels, style_dim, 3)
    return ModulatedConv3d(in_channels, out_channels, style_dim, 3)
