"""L_perc: offline error message, EfficientNet path with a locally cached (random) weights file, resnet3d_aux path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from benchmark.compat import import_torchvision
from models.perceptual import (
    PerceptualLoss,
    efficientnet_b0_param_counts,
    efficientnet_b0_weights_file,
    slice_indices,
    triplanar_slices,
)

WEIGHTS_NAME = "efficientnet_b0_rwightman-7f5810bc.pth"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def hub_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    return tmp_path


class FeatureStub(nn.Module):
    """Two frozen 3-D conv stages standing in for the classifier backbone."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv3d(1, 3, 3, padding=1)
        self.b = nn.Conv3d(3, 4, 3, stride=2, padding=1)
        self.requires_grad_(False)

    def feature_maps(self, x: Tensor) -> list[Tensor]:
        h = torch.relu(self.a(x))
        return [h, torch.relu(self.b(h))]


def test_weights_file_name_is_torchvisions(hub_dir: Path) -> None:
    assert efficientnet_b0_weights_file() == hub_dir / "checkpoints" / WEIGHTS_NAME


def test_missing_weights_raise_one_actionable_line(hub_dir: Path) -> None:
    with pytest.raises(RuntimeError) as err:
        PerceptualLoss("efficientnet_b0")
    msg = str(err.value)
    assert "\n" not in msg
    assert WEIGHTS_NAME in msg and str(hub_dir / "checkpoints") in msg
    assert "--set model.perceptual_backbone=resnet3d_aux" in msg


def test_efficientnet_loss_with_cached_weights(hub_dir: Path) -> None:
    tv = import_torchvision()
    (hub_dir / "checkpoints").mkdir()
    torch.save(tv.models.efficientnet_b0(weights=None).state_dict(), hub_dir / "checkpoints" / WEIGHTS_NAME)
    loss = PerceptualLoss("efficientnet_b0", slices=2)
    assert loss.backbone_name == "efficientnet_b0"
    assert not any(p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.net.training  # batch norm keeps ImageNet statistics
    x = torch.randn(2, 1, 16, 16, 16)
    x_hat = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    assert float(loss(x.clone(), x)) == pytest.approx(0.0, abs=1e-6)
    value = loss(x_hat, x)
    value.backward()
    assert value > 0 and x_hat.grad is not None and x_hat.grad.abs().sum() > 0


def test_efficientnet_param_counts_without_weights() -> None:
    counts = efficientnet_b0_param_counts()
    assert counts["full"] == 5_288_548
    assert counts["features"] == 4_007_548
    assert 0 < counts["used"] < counts["features"]


def test_resnet3d_aux_backbone() -> None:
    heads = FeatureStub()
    loss = PerceptualLoss("resnet3d_aux", heads=heads)
    assert loss.backbone_name == "resnet3d_aux" and loss.paper_param_count == 0
    assert "heads" not in dict(loss.named_modules()) and len(list(loss.parameters())) == 0
    x = torch.randn(2, 1, 8, 8, 8)
    x_hat = torch.randn_like(x, requires_grad=True)
    loss(x_hat, x).backward()
    assert x_hat.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="heads"):
        PerceptualLoss("resnet3d_aux")
    with pytest.raises(TypeError, match="feature_maps"):
        PerceptualLoss("resnet3d_aux", heads=object())
    with pytest.raises(ValueError, match="valid"):
        PerceptualLoss("vgg16")


def test_slices_are_evenly_spaced_and_triplanar() -> None:
    assert slice_indices(16, 4) == [2, 6, 10, 14]
    assert slice_indices(4, 8) == [0, 1, 2, 3]
    x = torch.arange(2 * 6 * 7 * 8, dtype=torch.float32).view(2, 1, 6, 7, 8)
    axial, coronal, sagittal = triplanar_slices(x, 3)
    assert axial.shape == (6, 1, 7, 8) and coronal.shape == (6, 1, 6, 8) and sagittal.shape == (6, 1, 6, 7)
    torch.testing.assert_close(axial[1, 0], x[0, 0, slice_indices(6, 3)[1]])
    torch.testing.assert_close(sagittal[3, 0], x[1, 0, :, :, slice_indices(8, 3)[0]])
