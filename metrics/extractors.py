"""Feature extractors for FID (DESIGN §5 "FID"): injected, named callables ``(x [N,1,D,H,W]) -> [N, F]``.

The metric name carries the extractor's name (``fid_<name>``), so numbers from different backbones are never
mixed up. Two sources:
- ``FrozenBackboneExtractor``: wraps any module returning global-average-pooled features, e.g. the frozen
  AD/CN classifier trained on the real training split (``resnet18sep``, the default).
- ``load_medicalnet18``: the MedicalNet 3-D ResNet-18 (Chen et al. 2019, Tencent/MedicalNet) from a local
  ``resnet_18_23dataset.pth``; it cannot be downloaded by code here.
- ``models.fid_network``: the same MedicalNet layout at a smaller width, trained once per (cohort, split) for
  evaluation only (``fidnet``): no generator loss ever sees it, unlike ``resnet18sep``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metrics.errors import MetricUnavailable

MEDICALNET18_FILE = "resnet_18_23dataset.pth"
MEDICALNET_CONFIG_KEY = "eval.medicalnet_weights"


class FrozenBackboneExtractor:
    """A frozen module as a feature extractor: eval mode, no gradients, output flattened to ``[N, F]``.

    Args:
        module: maps ``[N, 1, D, H, W]`` to pooled features ``[N, F]`` (or ``[N, F, 1, 1, 1]``).
        name: goes into the metric name, ``fid_<name>``.
    """

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = module.eval().requires_grad_(False)
        self.name = name

    def to(self, device: torch.device | str) -> FrozenBackboneExtractor:
        self.module.to(device)
        return self

    def eval(self) -> FrozenBackboneExtractor:
        self.module.eval()
        return self

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(f"{self.name}: expected volumes [N, 1, D, H, W], got {tuple(x.shape)}")
        # eval() again: the wrapped module may be shared with code that switched it to train mode.
        self.module.eval()
        param = next(self.module.parameters(), None)
        if param is not None:
            x = x.to(dtype=param.dtype)
        with torch.no_grad():
            return self.module(x).flatten(1)

    def __repr__(self) -> str:
        return f"FrozenBackboneExtractor(name={self.name!r}, module={type(self.module).__name__})"


def _conv3x3x3(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class _ZeroPadShortcut(nn.Module):
    """MedicalNet shortcut type 'A': strided identity, extra channels zero (no parameters)."""

    def __init__(self, c_out: int, stride: int) -> None:
        super().__init__()
        self.c_out, self.stride = c_out, stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, 0, 0, self.c_out - x.shape[1]))


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, dilation: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = _conv3x3x3(c_in, c_out, stride, dilation)
        self.bn1 = nn.BatchNorm3d(c_out)
        self.conv2 = _conv3x3x3(c_out, c_out, 1, dilation)
        self.bn2 = nn.BatchNorm3d(c_out)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class MedicalNet18(nn.Module):
    """3-D ResNet-18 in the MedicalNet layout, up to global average pooling: ``[N,1,D,H,W] -> [N, 8 * width]``.

    Same parameter names as Tencent/MedicalNet ``models/resnet.py`` (``conv1``, ``bn1``, ``layer1.0.conv1``...)
    so its checkpoints load directly: conv 7^3 stride 2, max-pool 3^3 stride 2, BasicBlock layers [2, 2, 2, 2]
    with 64/128/256/512 channels, stride 2 in layer2, and layer3/layer4 at stride 1 with dilation 2/4 (MedicalNet
    keeps resolution for segmentation). ``shortcut='A'`` (zero-padded identity) is what ``resnet_18_23dataset``
    was trained with; 'B' (1x1x1 conv + BN) exists for other checkpoints. The segmentation head is dropped.

    Args:
        shortcut: 'A' or 'B' (see above).
        width: base width; stages have width x (1, 2, 4, 8) channels. 64 is MedicalNet's (and the only width its
            checkpoints load into); the small presets train narrower copies from scratch (``models.fid_network``).
    """

    def __init__(self, shortcut: str = "A", width: int = 64) -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"MedicalNet18: shortcut must be 'A' or 'B', got {shortcut!r}")
        if width < 1:
            raise ValueError(f"MedicalNet18: width must be >= 1, got {width}")
        self.shortcut = shortcut
        self.width = width
        self.conv1 = nn.Conv3d(1, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        self._c = width
        self.layer1 = self._make_layer(width, stride=1, dilation=1)
        self.layer2 = self._make_layer(2 * width, stride=2, dilation=1)
        self.layer3 = self._make_layer(4 * width, stride=1, dilation=2)
        self.layer4 = self._make_layer(8 * width, stride=1, dilation=4)
        del self._c
        self.num_features = 8 * width

    def _make_layer(self, c_out: int, stride: int, dilation: int) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self._c != c_out:
            if self.shortcut == "A":
                downsample = _ZeroPadShortcut(c_out, stride)
            else:
                downsample = nn.Sequential(
                    nn.Conv3d(self._c, c_out, 1, stride=stride, bias=False), nn.BatchNorm3d(c_out)
                )
        blocks = [
            _BasicBlock(self._c, c_out, stride, dilation, downsample),
            _BasicBlock(c_out, c_out, 1, dilation, None),
        ]
        self._c = c_out
        return nn.Sequential(*blocks)

    def feature_map(self, x: Tensor) -> Tensor:
        """The last stage's map ``[N, 8 * width, D / 8, H / 8, W / 8]`` (before pooling)."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.feature_map(x).mean(dim=(2, 3, 4))


def load_medicalnet18(path: str | Path | None) -> FrozenBackboneExtractor:
    """The MedicalNet ResNet-18 extractor named ``medicalnet18``, from a local checkpoint.

    Args:
        path: ``resnet_18_23dataset.pth`` from Tencent/MedicalNet (state dict under ``'state_dict'``, keys
            prefixed ``'module.'``); config key ``eval.medicalnet_weights``. The shortcut type is read from the
            checkpoint (parameters under ``downsample`` mean type 'B').

    Note:
        MedicalNet z-scored the non-zero region and filled the background with noise during pretraining; we feed
        our volumes as they are (z-scored brain, 0 outside) so that the features stay deterministic.

    Raises:
        MetricUnavailable: no path, or the file does not exist.
    """
    if path is None or not Path(path).is_file():
        where = "no path given" if path is None else f"not found at {path}"
        raise MetricUnavailable(
            f"MedicalNet weights {MEDICALNET18_FILE} {where}: download it from Tencent/MedicalNet "
            f"(pretrain/{MEDICALNET18_FILE}) and set {MEDICALNET_CONFIG_KEY}=<path>"
        )
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    state = {
        k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("conv_seg")
    }
    shortcut = "B" if any(".downsample." in k for k in state) else "A"
    # Width from the stem (64 for Tencent's checkpoints; narrower files are our own, e.g. in tests).
    width = int(state["conv1.weight"].shape[0]) if "conv1.weight" in state else 64
    model = MedicalNet18(shortcut=shortcut, width=width)
    model.load_state_dict(state, strict=True)
    return FrozenBackboneExtractor(model, "medicalnet18")
