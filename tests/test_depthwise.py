"""models.depthwise: forward and gradients equal ``F.conv3d(groups=C)``; double backward; module wrapper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from models.depthwise import DepthwiseConv3d, depthwise_conv3d, differentiable_twice, plain_depthwise

CL = torch.channels_last_3d


def _grads(out: Tensor, inputs: list[Tensor], grad: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(out, inputs, grad)


def _assert_close(a: Tensor, b: Tensor) -> None:
    # float32 sums of up to ~10^4 products: relative to the reference's scale.
    scale = b.abs().max().clamp_min(1.0).item()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize(
    ("n", "c", "dhw", "k", "padding"),
    [
        (1, 3, (5, 5, 5), 3, 1),
        (2, 8, (5, 7, 9), 3, 1),
        (3, 16, (8, 6, 5), 3, 1),
        (2, 8, (16, 12, 10), 3, 1),
        (4, 3, (3, 6, 5), 3, 1),  # several sample boundaries in the flattened depth-plane batch
        (2, 3, (1, 5, 6), 3, 1),  # depth 1: the off-centre depth taps see only padding
        (2, 3, (6, 7, 5), 3, 0),  # padding != (k - 1) / 2: per-sample path
        (3, 8, (5, 6, 7), 3, 2),
        (2, 3, (6, 5, 7), 3, 3),  # padding > k - 1: grad_input crops grad_out
        (2, 4, (7, 8, 9), 5, 2),
        (2, 4, (4, 5, 6), 1, 0),
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_conv3d(
    n: int, c: int, dhw: tuple[int, int, int], k: int, padding: int, channels_last: bool, with_bias: bool
) -> None:
    g = torch.Generator().manual_seed(n * 100 + c + padding)
    x = torch.randn(n, c, *dhw, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    x.requires_grad_()
    w = torch.randn(c, 1, k, k, k, generator=g, requires_grad=True)
    b = torch.randn(c, generator=g, requires_grad=True) if with_bias else None
    inputs = [x, w] + ([b] if b is not None else [])

    out = depthwise_conv3d(x, w, b, padding=padding)
    ref = F.conv3d(x, w, b, padding=padding, groups=c)
    assert out.shape == ref.shape
    _assert_close(out, ref)

    grad = torch.randn(ref.shape, generator=g)
    for got, want in zip(_grads(out, inputs, grad), _grads(ref, inputs, grad), strict=True):
        _assert_close(got, want)


def test_cpu_autocast_falls_back() -> None:
    x = torch.randn(2, 4, 5, 5, 5, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = depthwise_conv3d(x, w)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and w.grad is not None


def test_default_padding_is_same_and_legacy_positional_padding() -> None:
    x = torch.randn(2, 4, 6, 5, 7)
    w = torch.randn(4, 1, 3, 3, 3)
    assert depthwise_conv3d(x, w).shape == x.shape
    # ``models.blocks`` calls ``depthwise_conv3d(x, w, padding)`` positionally: an int there is the padding.
    torch.testing.assert_close(depthwise_conv3d(x, w, 0), F.conv3d(x, w, padding=0, groups=4), rtol=1e-5, atol=1e-5)


def test_only_needed_grads() -> None:
    x = torch.randn(2, 4, 6, 6, 6)
    w = torch.randn(4, 1, 3, 3, 3, requires_grad=True)
    out = depthwise_conv3d(x, w)
    (gw,) = torch.autograd.grad(out.square().sum(), [w])
    (ref,) = torch.autograd.grad(F.conv3d(x, w, padding=1, groups=4).square().sum(), [w])
    _assert_close(gw, ref)
    assert x.grad is None

    xr = x.clone().requires_grad_()
    wd = w.detach()
    (gx,) = torch.autograd.grad(depthwise_conv3d(xr, wd).sum(), [xr])
    (ref,) = torch.autograd.grad(F.conv3d(xr, wd, padding=1, groups=4).sum(), [xr])
    _assert_close(gx, ref)


def test_output_is_channels_last_on_cpu() -> None:
    x = torch.randn(2, 8, 6, 6, 6, requires_grad=True)
    w = torch.randn(8, 1, 3, 3, 3)
    assert depthwise_conv3d(x, w).is_contiguous(memory_format=CL)
    with torch.no_grad():
        assert depthwise_conv3d(x, w).is_contiguous(memory_format=CL)


def test_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(0)
    # Tiny: gradcheck runs one backward per output element (each a handful of OpenMP-parallel ops, slow when
    # the machine is oversubscribed). Two samples and depth 3 still cover the sample-boundary correction.
    x = torch.randn(2, 2, 3, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(2, 1, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: depthwise_conv3d(x, w, b), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: depthwise_conv3d(x, w, padding=0), (x, w))
    # The fast backward switches to PyTorch's differentiable convolution_backward under create_graph=True.
    # fast_mode: the full gradgradcheck does thousands of tiny convs.
    assert torch.autograd.gradgradcheck(lambda x, w, b: depthwise_conv3d(x, w, b), (x, w, b), fast_mode=True)


def _r1_weight_grad(conv: object, x: Tensor, w: Tensor) -> Tensor:
    """d/dw of an R1-style penalty ||d out.square().sum() / dx||^2: needs double backward through the conv."""
    x = x.detach().requires_grad_()
    (gx,) = torch.autograd.grad(conv(x, w).square().sum(), [x], create_graph=True)  # type: ignore[operator]
    (gw,) = torch.autograd.grad(gx.square().sum(), [w])
    return gw


@pytest.mark.parametrize("mode", ["auto", "argument", "context"])
def test_double_backward(mode: str) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 5, 7, generator=g)
    w = torch.randn(4, 1, 3, 3, 3, generator=g, requires_grad=True)
    ref = _r1_weight_grad(lambda t, w: F.conv3d(t, w, padding=1, groups=4), x, w)
    if mode == "auto":
        got = _r1_weight_grad(lambda t, w: depthwise_conv3d(t, w), x, w)
    elif mode == "argument":
        got = _r1_weight_grad(lambda t, w: depthwise_conv3d(t, w, differentiable_twice=True), x, w)
    else:
        with differentiable_twice():
            got = _r1_weight_grad(lambda t, w: depthwise_conv3d(t, w), x, w)
            plain = depthwise_conv3d(x.requires_grad_(), w)
        fast = depthwise_conv3d(x, w)
        assert "DepthwiseConv3dFn" not in type(plain.grad_fn).__name__  # the stock F.conv3d graph
        assert "DepthwiseConv3dFn" in type(fast.grad_fn).__name__  # switch restored on exit
    _assert_close(got, ref)


def test_plain_depthwise_matches() -> None:
    x = torch.randn(1, 5, 6, 6, 6)
    w = torch.randn(5, 1, 3, 3, 3)
    b = torch.randn(5)
    _assert_close(plain_depthwise(x, w, b), F.conv3d(x, w, b, padding=1, groups=5))


def test_module_wrapper() -> None:
    m = DepthwiseConv3d(6, kernel_size=3)
    assert m.weight.shape == (6, 1, 3, 3, 3) and m.bias is not None and m.bias.shape == (6,)
    bound = (6.0 / (2 * 27)) ** 0.5  # Xavier-uniform with per-group fans k^3 / k^3
    assert m.weight.abs().max().item() <= bound and m.weight.abs().max().item() > 0.5 * bound
    assert m.bias.abs().max().item() == 0.0
    x = torch.randn(2, 6, 5, 6, 7, requires_grad=True)
    out = m(x)
    ref = F.conv3d(x, m.weight, m.bias, padding=1, groups=6)
    _assert_close(out, ref)
    out.square().sum().backward()
    assert m.weight.grad is not None and m.bias.grad is not None and x.grad is not None


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="weight"):
        depthwise_conv3d(torch.randn(1, 4, 5, 5, 5), torch.randn(4, 2, 3, 3, 3))
    with pytest.raises(ValueError, match="N, C, D, H, W"):
        depthwise_conv3d(torch.randn(4, 5, 5, 5), torch.randn(4, 1, 3, 3, 3))
