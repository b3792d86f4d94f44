"""Convolution blocks shared by our model and the StyleGAN2 baseline.

The modulation maths (StyleGAN2, Karras et al. 2020, Eq. 1-3) lives in :func:`modulated_conv3d` once; the
separable variant and the baseline's full-kernel variant both call it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
