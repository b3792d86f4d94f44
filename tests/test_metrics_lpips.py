from pathlib import Path

import pytest
import torch

import metrics.lpips as mlpips
from metrics.errors import MetricUnavailable
from metrics.triplanar import brain_mask, slice_indices, slices


def _pair(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    real = torch.zeros(2, 1, size, size, size)
    real[:, :, 4:28, 6:26, 3:29] = torch.randn(2, 1, 24, 20, 26, generator=g)
    return real, real + 0.5 * torch.randn(real.shape, generator=g)


def test_equals_lpips_slice_by_slice() -> None:
    real, fake = _pair()
    n = 3
    ours = mlpips.lpips_triplanar(real, fake, net="alex", n=n, backbone="random")
    model = mlpips.get_lpips_model("alex", "random")
    for v in range(2):
        r = real[v]
        idx = slice_indices(brain_mask(r), n)
        lo, hi = r.min(), r.max()
        rs = 2 * (slices(r, indices=idx) - lo) / (hi - lo) - 1
        fs = (2 * (slices(fake[v], indices=idx) - lo) / (hi - lo) - 1).clamp(-1, 1)
        with torch.no_grad():
            per_slice = [
                model(rs[k : k + 1].repeat(1, 3, 1, 1), fs[k : k + 1].repeat(1, 3, 1, 1)).item() for k in range(3 * n)
            ]
        assert ours[v].item() == pytest.approx(sum(per_slice) / len(per_slice), rel=1e-5)
    assert torch.allclose(mlpips.lpips_triplanar(real, real, n=n, backbone="random"), torch.zeros(2), atol=1e-6)


def test_random_backbone_is_the_same_network_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    real, fake = _pair()
    first = mlpips.lpips_triplanar(real, fake, n=2, backbone="random")
    monkeypatch.setattr(mlpips, "_MODELS", {})
    torch.manual_seed(12345)  # the caller's RNG state must not matter
    assert torch.equal(mlpips.lpips_triplanar(real, fake, n=2, backbone="random"), first)


def test_pretrained_weights_missing_raise_before_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    monkeypatch.setattr(mlpips, "_MODELS", {})
    real, fake = _pair()
    with pytest.raises(MetricUnavailable, match=r"alexnet-owt-7be5be79\.pth") as err:
        mlpips.lpips_triplanar(real, fake, net="alex", backbone="pretrained")
    assert str(tmp_path / "checkpoints") in str(err.value)
    with pytest.raises(MetricUnavailable, match=r"vgg16-397923af\.pth"):
        mlpips.get_lpips_model("vgg", "pretrained")


def test_names_and_size_guard() -> None:
    assert mlpips.metric_name("alex", "pretrained") == "lpips_triplanar_alex"
    assert mlpips.metric_name("alex", "random") == "lpips_triplanar_alexrand"
    small = torch.randn(1, 1, 24, 24, 24)
    with pytest.raises(MetricUnavailable, match="at least 31 px"):
        mlpips.lpips_triplanar(small, small, net="alex", backbone="random")
