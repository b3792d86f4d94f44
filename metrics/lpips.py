"""Tri-planar LPIPS with the ``lpips`` package (paper §3.1, Zhang et al. 2018; DESIGN §5).

The published metric uses the ImageNet-pretrained AlexNet backbone, which torchvision loads from its download
cache; code cannot download it here, so it is checked for before ``lpips`` tries. The random-backbone variant
(``backbone='random'``, reported as ``lpips_triplanar_alexrand``) is an explicitly named offline alternative for
plumbing and tests, never a silent substitute. Its backbone is initialised under a fixed seed so it is the same
network in every process.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from metrics.errors import MetricUnavailable
from metrics.triplanar import N_SLICES, brain_mask, slice_indices, slices

# torchvision's cache file names for the backbones lpips builds (weights URL basenames).
BACKBONE_WEIGHTS: dict[str, str] = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
# Smallest square slice each backbone accepts (measured: smaller inputs pool to zero size).
MIN_SLICE_SIZE: dict[str, int] = {"alex": 31, "vgg": 16, "squeeze": 17}
BACKBONES = ("pretrained", "random")
RANDOM_BACKBONE_SEED = 0

_MODELS: dict[tuple[str, str], nn.Module] = {}


def metric_name(net: str = "alex", backbone: str = "pretrained") -> str:
    """``lpips_triplanar_alex`` for the published metric, ``lpips_triplanar_alexrand`` for a random backbone."""
    return f"lpips_triplanar_{net}" + ("rand" if backbone == "random" else "")


def _check_args(net: str, backbone: str) -> None:
    if net not in BACKBONE_WEIGHTS:
        raise ValueError(f"lpips: net must be one of {sorted(BACKBONE_WEIGHTS)}, got {net!r}")
    if backbone not in BACKBONES:
        raise ValueError(f"lpips: backbone must be one of {BACKBONES}, got {backbone!r}")


def check_weights(net: str = "alex") -> Path:
    """Path of the cached torchvision weights for ``net``; ``MetricUnavailable`` naming file and folder if absent."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / BACKBONE_WEIGHTS[net]
    if not path.is_file():
        raise MetricUnavailable(
            f"{metric_name(net)} needs torchvision's ImageNet weights {BACKBONE_WEIGHTS[net]} in {folder} "
            f"(copy it there from a connected machine, or set TORCH_HOME); offline alternative: "
            f"{metric_name(net, 'random')}"
        )
    return path


def get_lpips_model(net: str = "alex", backbone: str = "pretrained") -> nn.Module:
    """The ``lpips.LPIPS`` model for ``(net, backbone)``, built once per process (lazily) and cached."""
    _check_args(net, backbone)
    key = (net, backbone)
    if key not in _MODELS:
        if backbone == "pretrained":
            check_weights(net)
        from benchmark.compat import import_torchvision

        import_torchvision()
        import lpips

        # The random backbone draws from torch's global RNG: fork it so the network is always the same one
        # and callers' random streams are left untouched.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # lpips 0.1.4 still passes torchvision's deprecated `pretrained=` argument.
            warnings.filterwarnings("ignore", message=".*(pretrained|weights).*deprecated", category=UserWarning)
            torch.manual_seed(RANDOM_BACKBONE_SEED)
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=(backbone == "random"), verbose=False)
        _MODELS[key] = model.eval().requires_grad_(False)
    return _MODELS[key]


def lpips_triplanar(
    real: Tensor, fake: Tensor, net: str = "alex", n: int = N_SLICES, backbone: str = "pretrained"
) -> Tensor:
    """Mean LPIPS over ``3n`` tri-planar slices per volume pair; returns ``[B]`` (float32, on the inputs' device).

    Args:
        real, fake: ``[B, 1, S, S, S]`` paired volumes. Slice positions come from the real volume's brain box;
            both volumes are mapped to [-1, 1] by the same affine map taken from the REAL volume's min/max
            (LPIPS expects [-1, 1]; the fake is clamped), then repeated to 3 channels.
        net: ``'alex'`` (paper), ``'vgg'`` or ``'squeeze'``.
        n: slices per plane (paper: 32).
        backbone: ``'pretrained'`` (the published metric) or ``'random'`` (offline, named ``..rand``).

    Raises:
        MetricUnavailable: pretrained weights not cached, or slices smaller than the backbone accepts.
    """
    _check_args(net, backbone)
    if real.shape != fake.shape or real.dim() != 5 or real.shape[1] != 1:
        raise ValueError(
            f"lpips_triplanar: expected real and fake [B, 1, S, S, S] of one shape, got {tuple(real.shape)}, "
            f"{tuple(fake.shape)}"
        )
    if min(real.shape[-3:]) < MIN_SLICE_SIZE[net]:
        raise MetricUnavailable(
            f"{metric_name(net, backbone)} needs slices of at least {MIN_SLICE_SIZE[net]} px for net={net}; "
            f"volumes are {tuple(real.shape[-3:])}"
        )
    model = get_lpips_model(net, backbone).to(real.device)
    out = []
    with torch.no_grad():
        for r, f in zip(real, fake, strict=True):
            r, f = r.float(), f.to(r.device).float()
            idx = slice_indices(brain_mask(r), n)
            lo, hi = r.min(), r.max()
            scale = 2.0 / (hi - lo).clamp_min(torch.finfo(torch.float32).eps)
            rs = ((slices(r, indices=idx) - lo) * scale - 1.0).clamp(-1.0, 1.0)
            fs = ((slices(f, indices=idx) - lo) * scale - 1.0).clamp(-1.0, 1.0)
            d = model(rs.expand(-1, 3, -1, -1), fs.expand(-1, 3, -1, -1))
            out.append(d.mean())
    return torch.stack(out)
