"""L_perc (paper Eq. 2, Table 1): feature distance between real and reconstructed volumes in a frozen network.

Two backbones, chosen explicitly (``cfg.model.perceptual_backbone``, logged as :attr:`PerceptualLoss.backbone_name`):

- ``efficientnet_b0`` (the paper's, Tan & Le 2019): torchvision's ImageNet EfficientNet-B0 on tri-planar 2-D
  slices. The weights come through torchvision's normal path (the torch hub cache). Offline and without the cached
  file, construction raises a one-line RuntimeError naming the file, the directory and the explicit alternative;
  there is no silent fallback (DESIGN §5).
- ``resnet3d_aux``: the frozen 3-D AD/CN classifier of the auxiliary heads on the full volumes, through
  :class:`FeatureMapsProvider`. Runs offline; a different loss, so tables show its name.

Choices the paper leaves open:

- Slices: ``slices`` per plane at the centres of equal bins along each axis, the same every step, for real and
  reconstruction alike. Deterministic so the loss is a pure function of (x, x_hat): runs reproduce and validation
  numbers stay comparable across steps.
- Intensities: z-scored volumes are mapped to [0, 1] with the *real* volume's min and max, applied to both volumes
  (mapping the reconstruction with its own range would make the loss blind to its intensity errors); no clamping,
  so out-of-range reconstructions still get gradients. Then 1 -> 3 channels and ImageNet mean/std. Slices are not
  resized (128^2 at paper size; EfficientNet is fully convolutional).
- Features: outputs of ``features[1, 2, 3, 5]`` (16, 24, 40, 112 channels at 1/2 to 1/16 resolution), from edges to
  parts as LPIPS-style metrics do; per stage the mean absolute difference, averaged over stages and planes (L1).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

BACKBONES = ("efficientnet_b0", "resnet3d_aux")
EFFICIENTNET_STAGES = (1, 2, 3, 5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@runtime_checkable
class FeatureMapsProvider(Protocol):
    """What ``resnet3d_aux`` needs from the frozen heads (``models.heads.ClinicalHeads``).

    ``feature_maps(x [N, 1, D, H, W]) -> list of [N, C_l, D_l, H_l, W_l]``: the classifier backbone's intermediate
    maps (e.g. the output of each ResNet stage), differentiable w.r.t. x, with frozen weights.
    """

    def feature_maps(self, x: Tensor) -> list[Tensor]: ...


def _weights_enum() -> object:
    from benchmark.compat import import_torchvision

    return import_torchvision().models.EfficientNet_B0_Weights.IMAGENET1K_V1


def efficientnet_b0_weights_file() -> Path:
    """Where torchvision's loader looks for the ImageNet EfficientNet-B0 weights (torch hub cache).

    The file name is the basename of the weights URL, as ``torch.hub.load_state_dict_from_url`` names it
    (``efficientnet_b0_rwightman-7f5810bc.pth`` in torchvision 0.28).
    """
    url = _weights_enum().url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


@functools.cache
def efficientnet_b0_param_counts() -> dict[str, int]:
    """Parameter counts of torchvision's EfficientNet-B0, built on the meta device (no weights, no memory).

    Returns:
        ``full`` (the whole classifier, 5,288,548: what "EfficientNet-B0, 5.3M" means and what paper Table 2's +5.1M
        counts), ``features`` (the convolutional trunk, 4,007,548) and ``used`` (the stages this loss runs).
    """
    from benchmark.compat import import_torchvision

    tv = import_torchvision()
    with torch.device("meta"):
        model = tv.models.efficientnet_b0(weights=None)

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    return {"full": count(model), "features": count(model.features),
            "used": count(model.features[: max(EFFICIENTNET_STAGES) + 1])}


def slice_indices(size: int, n: int) -> list[int]:
    """``n`` evenly spaced slice indices in ``range(size)`` (centres of n equal bins; all slices when n >= size)."""
    if n >= size:
        return list(range(size))
    return [min(size - 1, int((i + 0.5) * size / n)) for i in range(n)]


def triplanar_slices(x: Tensor, n: int) -> list[Tensor]:
    """Axial/coronal/sagittal slice stacks of a volume batch.

    Args:
        x: [N, 1, D, H, W].
        n: slices per plane.
    Returns:
        Three tensors, [N*n, 1, H, W], [N*n, 1, D, W], [N*n, 1, D, H] (slices along D, H, W).
    """
    out = []
    for axis in (2, 3, 4):
        idx = torch.tensor(slice_indices(x.shape[axis], n), device=x.device)
        s = x.index_select(axis, idx).movedim(axis, 1)  # [N, n, 1, a, b]
        out.append(s.reshape(-1, 1, *s.shape[3:]))
    return out


def _mean_l1(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return torch.stack([(fa.float() - fb.float()).abs().mean() for fa, fb in zip(a, b, strict=True)]).mean()


class PerceptualLoss(nn.Module):
    """L_perc between real volumes x and reconstructions x_hat, ``forward(x_hat, x) -> scalar``.

    Args:
        backbone: ``"efficientnet_b0"`` or ``"resnet3d_aux"``.
        slices: slices per plane for the 2-D backbone.
        heads: the frozen heads (a :class:`FeatureMapsProvider`); needed for ``resnet3d_aux``. Kept outside the
            module tree so their weights stay out of this module's state and device moves.
        progress: torchvision download progress bar (only relevant where a download can happen).

    Built under ``torch.device("meta")`` (parameter counting), it loads no weights and does not check the heads.

    Raises:
        RuntimeError: ``efficientnet_b0`` whose weights file is not in the torch hub cache.
        ValueError: unknown backbone, or ``resnet3d_aux`` without heads.
    """

    def __init__(self, backbone: str, slices: int = 8, heads: object | None = None, progress: bool = False) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown perceptual_backbone {backbone!r}; valid: {', '.join(BACKBONES)}")
        self.backbone_name = backbone
        self.slices = slices
        self.net: nn.Module | None = None
        object.__setattr__(self, "_heads", heads)
        counting = torch.empty(0).is_meta  # built under ``torch.device("meta")`` to count parameters
        if backbone == "resnet3d_aux":
            if heads is None:
                raise ValueError("perceptual_backbone=resnet3d_aux needs the frozen clinical heads (heads=None given)")
            if not counting and not isinstance(heads, FeatureMapsProvider):
                raise TypeError(f"perceptual_backbone=resnet3d_aux needs heads.feature_maps(x) -> list[Tensor]; "
                                f"{type(heads).__name__} has no feature_maps")
        else:
            self.net = self._efficientnet_architecture() if counting else self._load_efficientnet(progress)
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _efficientnet_architecture() -> nn.Module:
        """The used stages without weights (meta-device parameter counting: nothing to load, nothing to check)."""
        from benchmark.compat import import_torchvision

        return import_torchvision().models.efficientnet_b0(weights=None).features[: max(EFFICIENTNET_STAGES) + 1]

    @staticmethod
    def _load_efficientnet(progress: bool) -> nn.Module:
        path = efficientnet_b0_weights_file()
        if not path.is_file():
            url = _weights_enum().url
            raise RuntimeError(
                f"perceptual_backbone=efficientnet_b0 needs the ImageNet weights file {path.name} ({url}) in "
                f"{path.parent}, torchvision's weights cache, which has no copy: put the file there, or choose the "
                f"explicit offline alternative --set model.perceptual_backbone=resnet3d_aux"
            )
        from benchmark.compat import import_torchvision

        tv = import_torchvision()
        model = tv.models.efficientnet_b0(weights=_weights_enum(), progress=progress)
        return model.features[: max(EFFICIENTNET_STAGES) + 1]

    @property
    def paper_param_count(self) -> int:
        """The frozen perceptual network's size as paper Table 2 counts it (whole EfficientNet-B0; 0 for the heads)."""
        return efficientnet_b0_param_counts()["full"] if self.backbone_name == "efficientnet_b0" else 0

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Always eval: the backbone is frozen, and its batch norm must keep ImageNet statistics."""
        return super().train(False)

    def _efficientnet_features(self, x: Tensor) -> list[Tensor]:
        h = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        feats = []
        for i, block in enumerate(self.net):  # type: ignore[arg-type]
            h = block(h)
            if i in EFFICIENTNET_STAGES:
                feats.append(h)
        return feats

    def forward(self, x_hat: Tensor, x: Tensor, fake_maps: list[Tensor] | None = None) -> Tensor:
        """x_hat, x: [N, 1, D, H, W] (z-scored intensities). Returns the scalar L1 feature distance (float32).

        ``fake_maps``: ``heads.feature_maps(x_hat)`` computed by the caller (``resnet3d_aux`` only), shared with L_cls.
        """
        if self.backbone_name == "resnet3d_aux":
            with torch.no_grad():
                real = self._heads.feature_maps(x)
            return _mean_l1(self._heads.feature_maps(x_hat) if fake_maps is None else fake_maps, real)
        if fake_maps is not None:
            raise ValueError("fake_maps applies to perceptual_backbone=resnet3d_aux only")
        if self.mean.device != x.device:
            self.to(x.device)
        lo = x.detach().amin(dim=(1, 2, 3, 4), keepdim=True)
        scale = 1.0 / (x.detach().amax(dim=(1, 2, 3, 4), keepdim=True) - lo).clamp_min(1e-6)
        planes_real = triplanar_slices((x - lo) * scale, self.slices)
        planes_fake = triplanar_slices((x_hat - lo) * scale, self.slices)
        losses = []
        for real, fake in zip(planes_real, planes_fake, strict=True):
            with torch.no_grad():
                f_real = self._efficientnet_features(real)
            losses.append(_mean_l1(self._efficientnet_features(fake), f_real))
        return torch.stack(losses).mean()
