"""Separable / modulated convolution blocks: shapes, counts, exactness of the fast paths, demodulation variance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.blocks import (
    GainConv3d,
    ModulatedConv3d,
    ModulatedSeparableConv3d,
    ScaledLeakyReLU,
    SeparableConv3d,
    StyleAffine,
    _depthwise,
    conv3x3x3,
    modulated_conv3d,
    modulated_conv3x3x3,
    pointwise_conv,
    style_conv,
    with_folded_gain,
    xavier_init_,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _interior_std(y: torch.Tensor) -> float:
    """Std away from the zero-padded border, where a 3x3x3 kernel sees fewer inputs."""
    return float(y[:, :, 1:-1, 1:-1, 1:-1].std())


def test_separable_conv_shapes_params_and_reference() -> None:
    conv = SeparableConv3d(6, 10)
    x = torch.randn(2, 6, 8, 8, 8)
    y = conv(x)
    assert y.shape == (2, 10, 8, 8, 8)
    assert sum(p.numel() for p in conv.parameters()) == 6 * 27 + 6 * 10 + 10
    ref = F.conv3d(F.conv3d(x, conv.depthwise_weight, padding=1, groups=6), conv.pointwise.weight, conv.pointwise.bias)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert SeparableConv3d(6, 10, stride=2)(x).shape == (2, 10, 4, 4, 4)


def test_depthwise_matches_grouped_conv() -> None:
    x = torch.randn(2, 5, 7, 6, 5)
    w = torch.randn(5, 1, 3, 3, 3)
    torch.testing.assert_close(_depthwise(x, w, 1), F.conv3d(x, w, padding=1, groups=5), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_depthwise(x, w, 1, stride=2), F.conv3d(x, w, padding=1, stride=2, groups=5))


def test_conv_switch_builds_both_kinds() -> None:
    sep, std = conv3x3x3(4, 8, separable=True), conv3x3x3(4, 8, separable=False)
    assert isinstance(sep, SeparableConv3d) and isinstance(std, nn.Conv3d)
    x = torch.randn(1, 4, 6, 6, 6)
    assert sep(x).shape == std(x).shape == (1, 8, 6, 6, 6)
    assert isinstance(modulated_conv3x3x3(4, 8, 16, separable=True), ModulatedSeparableConv3d)
    assert isinstance(modulated_conv3x3x3(4, 8, 16, separable=False), ModulatedConv3d)


@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_separable_equals_effective_kernel_grouped_conv(demodulate: bool) -> None:
    layer = ModulatedSeparableConv3d(6, 5, style_dim=8, demodulate=demodulate)
    with torch.no_grad():
        layer.bias.normal_()
    x, w = torch.randn(3, 6, 7, 7, 7), torch.randn(3, 8)
    fast, grouped = layer(x, w), layer.forward_grouped(x, w)
    assert fast.shape == (3, 5, 7, 7, 7)
    torch.testing.assert_close(fast, grouped, atol=1e-5, rtol=1e-4)
    # The effective kernel is the composition of the two separable kernels.
    depthwise = F.conv3d(x, layer.depthwise_weight, padding=1, groups=6)
    plain = F.conv3d(depthwise, layer.pointwise_weight[..., None, None, None])
    torch.testing.assert_close(plain, F.conv3d(x, layer.effective_weight(), padding=1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 3])
def test_modulated_dense_equals_grouped_primitive(k: int) -> None:
    layer = ModulatedConv3d(6, 5, style_dim=8, kernel_size=k)
    x, w = torch.randn(2, 6, 5, 5, 5), torch.randn(2, 8)
    torch.testing.assert_close(layer(x, w), layer.forward_grouped(x, w), atol=1e-5, rtol=1e-4)
    s = layer.styles(w)
    torch.testing.assert_close(layer(x, w), modulated_conv3d(x, layer.weight, s, padding=k // 2), atol=1e-5, rtol=1e-4)


def test_style_actually_changes_the_output() -> None:
    """Regression: demodulating the depthwise kernel alone would cancel the style; ours must not."""
    layer = ModulatedSeparableConv3d(8, 8, style_dim=4)
    x = torch.randn(1, 8, 6, 6, 6)
    y1, y2 = layer(x, torch.randn(1, 4) * 3), layer(x, torch.randn(1, 4) * 3)
    assert (y1 - y2).abs().mean() > 1e-2


@pytest.mark.parametrize("layer_kind", ["separable", "sc", "dense3"])
def test_demodulation_gives_unit_output_variance(layer_kind: str) -> None:
    cin, cout, style_dim = 256, 32, 64
    if layer_kind == "separable":
        layer: nn.Module = ModulatedSeparableConv3d(cin, cout, style_dim)
    elif layer_kind == "sc":
        layer = style_conv(cin, cout, style_dim)
    else:
        layer = ModulatedConv3d(cin, cout, style_dim, kernel_size=3)
    with torch.no_grad():  # random, far-from-identity styles
        layer.affine.weight.normal_(0.0, 1.0)
        layer.affine.bias.normal_(0.0, 1.0)
        y = layer(torch.randn(4, cin, 10, 10, 10), torch.randn(4, style_dim))
    assert _interior_std(y) == pytest.approx(1.0, rel=0.1)


def test_xavier_init_fans_and_style_bias() -> None:
    layer = xavier_init_(ModulatedSeparableConv3d(64, 32, style_dim=16))
    # depthwise: fan_in = fan_out = 27 per channel filter
    assert float(layer.depthwise_weight.detach().abs().max()) <= math.sqrt(6 / 54) + 1e-6
    assert float(layer.depthwise_weight.detach().abs().max()) > 0.5 * math.sqrt(6 / 54)
    assert float(layer.pointwise_weight.detach().abs().max()) <= math.sqrt(6 / 96) + 1e-6
    assert isinstance(layer.affine, StyleAffine)
    assert torch.all(layer.affine.bias == 1.0)
    assert torch.all(layer.bias == 0.0)
    conv = xavier_init_(nn.Conv3d(4, 8, 3))
    assert float(conv.weight.detach().abs().max()) <= math.sqrt(6 / (27 * 12)) + 1e-6 and torch.all(conv.bias == 0)


def test_blocks_build_on_meta_device() -> None:
    with torch.device("meta"):
        layer = ModulatedSeparableConv3d(512, 256, 256)
    assert layer.depthwise_weight.is_meta
    assert sum(p.numel() for p in layer.parameters()) == 256 * 512 + 512 + 512 * 27 + 512 * 256 + 256


@pytest.mark.parametrize("kind", ["separable", "dense", "modulated_separable", "modulated_dense", "style_conv"])
def test_folded_gain_equals_scaled_leaky_relu_after_the_layer(kind: str) -> None:
    """with_folded_gain(layer) computes ScaledLeakyReLU(layer(x)), values and gradients, for every layer kind."""
    build = {"separable": lambda: SeparableConv3d(3, 5), "dense": lambda: conv3x3x3(3, 5, separable=False),
             "modulated_separable": lambda: ModulatedSeparableConv3d(3, 5, 4),
             "modulated_dense": lambda: ModulatedConv3d(3, 5, 4, kernel_size=3),
             "style_conv": lambda: style_conv(3, 5, 4)}
    layer = build[kind]()
    x, w = torch.randn(2, 3, 6, 6, 6, requires_grad=True), torch.randn(2, 4)
    args = (x,) if kind in ("separable", "dense") else (x, w)
    with torch.no_grad():  # non-zero biases, so their scaling is checked too
        (layer.pointwise.bias if kind == "separable" else layer.bias).uniform_(-0.5, 0.5)
    reference = ScaledLeakyReLU(0.2)(layer(*args))
    grad_ref = torch.autograd.grad(reference.square().sum(), x)[0]
    folded_layer, act = with_folded_gain(layer)
    folded = act(folded_layer(*args))
    assert folded_layer.out_gain == pytest.approx(math.sqrt(2 / 1.04)) and isinstance(act, nn.LeakyReLU)
    torch.testing.assert_close(folded, reference)
    torch.testing.assert_close(torch.autograd.grad(folded.square().sum(), x)[0], grad_ref)
    if hasattr(folded_layer, "forward_grouped"):  # the reference paths scale the same way
        torch.testing.assert_close(act(folded_layer.forward_grouped(*args)), reference, rtol=1e-4, atol=1e-5)


def test_folded_gain_needs_a_layer_that_can_scale_its_output() -> None:
    with pytest.raises(TypeError, match="Conv3d cannot fold"):
        with_folded_gain(nn.Conv3d(1, 2, 1))
    assert isinstance(conv3x3x3(1, 2, separable=False), GainConv3d)


def test_pointwise_gemm_path_matches_conv_for_one_channel_and_channels_last() -> None:
    conv = nn.Conv3d(1, 6, 1)
    one = torch.randn(2, 1, 4, 5, 3)  # a single channel is channels-last and contiguous at once: GEMM path
    torch.testing.assert_close(pointwise_conv(one, conv), conv(one))
    many = torch.randn(2, 6, 4, 5, 3).to(memory_format=torch.channels_last_3d)
    back = nn.Conv3d(6, 1, 1)
    torch.testing.assert_close(pointwise_conv(many, back), back(many))
    torch.testing.assert_close(pointwise_conv(many, back, 1.5), 1.5 * back(many))
