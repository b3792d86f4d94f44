from pathlib import Path

import pytest
import torch

from metrics.errors import MetricUnavailable
from metrics.extractors import FrozenBackboneExtractor, MedicalNet18, load_medicalnet18


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
    return model.eval()


def _save_medicalnet_style(model: MedicalNet18, path: Path) -> None:
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(512, 32, 2, 2, 2)  # segmentation head: ignored
    torch.save({"state_dict": state}, path)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_load_medicalnet18_reproduces_saved_model(tmp_path: Path, shortcut: str) -> None:
    torch.manual_seed(0)
    source = _randomised(MedicalNet18(shortcut=shortcut), seed=1)
    path = tmp_path / "resnet_18_23dataset.pth"
    _save_medicalnet_style(source, path)
    extractor = load_medicalnet18(path)
    assert extractor.name == "medicalnet18"
    assert extractor.module.shortcut == shortcut
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    feats = extractor(x)
    assert feats.shape == (2, 512) and not feats.requires_grad
    with torch.no_grad():
        assert torch.allclose(feats, source(x), atol=1e-5)


def test_medicalnet18_layout() -> None:
    model = MedicalNet18()
    # Tencent/MedicalNet README lists 3D-ResNet18 at 32.99M parameters.
    assert sum(p.numel() for p in model.parameters()) == 32_986_176
    assert model.layer4[0].conv1.dilation == (4, 4, 4) and model.layer2[0].conv1.stride == (2, 2, 2)


@pytest.mark.parametrize("path", [None, "missing/resnet_18_23dataset.pth"])
def test_missing_medicalnet_weights_name_file_and_config_key(path: str | None) -> None:
    with pytest.raises(MetricUnavailable, match=r"resnet_18_23dataset\.pth.*eval\.medicalnet_weights"):
        load_medicalnet18(path)


def test_frozen_backbone_extractor_is_frozen_and_checks_shape() -> None:
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.Dropout(0.5), torch.nn.AdaptiveAvgPool3d(1))
    net.train()
    ext = FrozenBackboneExtractor(net, "tiny")
    x = torch.randn(3, 1, 8, 8, 8)
    a, b = ext(x), ext(x)
    assert a.shape == (3, 4) and torch.equal(a, b)  # eval mode: dropout off
    assert not any(p.requires_grad for p in net.parameters())
    with pytest.raises(ValueError, match=r"\[N, 1, D, H, W\]"):
        ext(torch.randn(3, 8, 8, 8))
