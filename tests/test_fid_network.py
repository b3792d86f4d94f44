"""The evaluation-only FID network: MedicalNet layout at any width, views, training, the stage, FID sensitivity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmark.config import resolve
from benchmark.data.augment import LR_SWAP, random_mirror, random_shift
from metrics.extractors import FrozenBackboneExtractor, MedicalNet18
from models.fid_network import FidNetwork, fit_fid_network, linear_probe_scores, nt_xent, random_view
from models.heads import roi_r2


def _volumes(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Brains (a ball on a background of -4.6) whose dark central ball is larger in AD; c[:, 4:6] = its volume."""
    g = torch.Generator().manual_seed(seed)
    label = torch.arange(n) % 2
    radius = 2.0 + 1.5 * label + 0.8 * (torch.rand(n, generator=g) - 0.5)
    grid = torch.stack(torch.meshgrid(*[torch.arange(float(size))] * 3, indexing="ij"))
    centre = (size - 1) / 2
    brain = (grid - centre).square().sum(0).sqrt() < size / 2 - 1
    d = (grid - centre).square().sum(0).sqrt()[None]
    x = torch.where(brain, 1.0 - 2.0 * (d < radius[:, None, None, None]).float(), torch.tensor(-4.6))
    x = x + 0.2 * torch.randn(x.shape, generator=g) * brain
    c = torch.randn(n, 7, generator=g)
    c[:, 4] = c[:, 5] = (radius**3 - (radius**3).mean()) / (radius**3).std()
    c[:, 6] = label.float()
    return x[:, None], c


@pytest.mark.parametrize("width", [4, 8])
def test_medicalnet18_width_multiplier(width: int) -> None:
    net = MedicalNet18(width=width).eval()
    assert net.num_features == 8 * width
    assert net(torch.randn(2, 1, 16, 16, 16)).shape == (2, 8 * width)
    assert net.layer4[0].conv1.dilation == (4, 4, 4) and net.layer2[0].conv1.stride == (2, 2, 2)
    assert MedicalNet18().num_features == 512  # width 64: Tencent's layout (checkpoint: test_metrics_extractors)


def test_random_view_is_sharp_seeded_and_keeps_the_background() -> None:
    x, _ = _volumes(3, 0)
    a = random_view(x, torch.Generator().manual_seed(1))
    b = random_view(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape
    assert torch.allclose(a.flatten(1).amin(1), x.flatten(1).amin(1))  # background value kept
    shifted = random_shift(x, 2, torch.Generator().manual_seed(2))
    # integer shifts, no interpolation: every output voxel is an input voxel of the same volume
    for i in range(3):
        assert torch.isin(shifted[i], x[i]).all()


def test_random_mirror_swaps_left_and_right_targets() -> None:
    x = torch.randn(64, 1, 4, 4, 4)
    c = torch.arange(64 * 7, dtype=torch.float32).view(64, 7)
    xm, cm = random_mirror(x, c, torch.Generator().manual_seed(0))
    flipped = (xm != x).flatten(1).any(1)
    assert 10 < int(flipped.sum()) < 54
    assert torch.equal(xm[flipped], x[flipped].flip(2)) and torch.equal(cm[~flipped], c[~flipped])
    assert torch.equal(cm[flipped][:, :6], c[flipped][:, list(LR_SWAP)]) and torch.equal(cm[:, 6], c[:, 6])


def test_nt_xent_prefers_matching_views() -> None:
    z = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    matched = nt_xent(z, z + 0.01 * torch.randn(8, 16), 0.2)
    shuffled = nt_xent(z, z[torch.randperm(8)], 0.2)
    assert matched + 1.0 < shuffled


def test_roi_r2() -> None:
    t = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    assert roi_r2(t, t) == pytest.approx([1.0] * 3)
    assert roi_r2(t.mean(0).expand_as(t), t) == pytest.approx([0.0] * 3, abs=1e-12)


@pytest.mark.parametrize("w_ssl", [0.0, 1.0])
def test_fit_fid_network_learns_and_is_deterministic(w_ssl: float) -> None:
    train, test = _volumes(32, 1), _volumes(16, 2)
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        net = FidNetwork(width=4)
        out = fit_fid_network(net, train, epochs=4, batch_size=8, lr=3e-3, w_ssl=w_ssl, seed=5, progress=False)
        states.append(net.state_dict())
    assert len(out["history"]) == 4 and not net.training
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    with torch.no_grad():
        f_tr, f_te = net.features(train[0]), net.features(test[0])
    scores = linear_probe_scores(f_tr, train[1], {"test": (f_te, test[1])})
    assert scores["test_bac"] >= 0.8 and scores["test_roi_r2"] > -1.0  # the label is a visible ball


def test_get_fid_network_stage(tmp_path: Path) -> None:
    from benchmark.data.bundle import load_bundle
    from benchmark.stages import get_fid_network, stage_path

    cfg = resolve("smoke", overrides={"data.cache_dir": str(tmp_path), "fidnet.epochs": 1})
    bundle = load_bundle(cfg, progress=False)
    extractor, info = get_fid_network(cfg, bundle, progress=False)
    assert isinstance(extractor, FrozenBackboneExtractor) and extractor.name == "resnet18"
    assert {"digest", "fidnet_test_bac", "fidnet_test_roi_r2", "fidnet_val_bac"} <= set(info)
    x, _ = bundle.tensors("test")
    feats = extractor(x)
    assert feats.shape == (len(x), 8 * cfg.fidnet.width * (1 + cfg.fidnet.n_random)) and not feats.requires_grad
    assert not any(p.requires_grad for p in extractor.module.parameters())
    assert stage_path(cfg, "fidnet", info["digest"]).is_file()
    again, info2 = get_fid_network(cfg, bundle, progress=False)  # from the cache
    assert info2 == info and torch.equal(again(x), feats)


def test_random_blocks_stay_untrained_and_weigh_the_same() -> None:
    """The random copies keep their seeded init through training; each block has unit total variance on train."""
    train = _volumes(32, 1)
    torch.manual_seed(0)
    net = FidNetwork(width=4, n_random=2)
    init = {k: v.clone() for k, v in net.random.state_dict().items() if "running" not in k and "num_batches" not in k}
    fit_fid_network(net, train, epochs=2, batch_size=8, lr=3e-3, w_ssl=0.0, seed=5, progress=False)
    after = net.random.state_dict()
    assert all(torch.equal(init[k], after[k]) for k in init)
    with torch.no_grad():
        feats = net(train[0]).double()
    assert feats.shape == (32, 3 * 8 * 4)
    for block in feats.split(8 * 4, dim=1):  # independent of calibrate_blocks: total variance from numpy
        import numpy as np

        assert np.var(block.numpy(), axis=0, ddof=1).sum() == pytest.approx(1.0, rel=1e-4)
    assert not torch.equal(feats[:, :32], feats[:, 32:64])  # the copies are different networks


@pytest.mark.slow
def test_fid_sensitivity_rises_with_corruption() -> None:
    """On toy brains: FID rises with blur and with noise, and a collapsed set is far above the floor."""
    from models.fid_network import fid_sensitivity

    train, test = _volumes(96, 1, 32), _volumes(48, 2, 32)
    torch.manual_seed(0)
    net = FidNetwork(width=4)
    fit_fid_network(net, train, epochs=4, batch_size=16, lr=3e-3, w_ssl=0.0, seed=0, progress=False)
    s = fid_sensitivity(FrozenBackboneExtractor(net.backbone, "fidnet"), test[0], train[0])
    assert s["fid_blur_0.5"] < s["fid_blur_1"] < s["fid_blur_2"]
    assert s["fid_noise_0.1"] < s["fid_noise_0.3"]
    assert s["collapse_over_floor"] >= 2.0


def test_anatomy_fid_reads_the_trained_block_alone_at_its_scale() -> None:
    """`fid_resnet18anat` sees the first block of what `fid_resnet18` sees, scaled the same, never the random copies."""
    from benchmark.evaluation import _TrainedBlock

    train = _volumes(16, 1)
    torch.manual_seed(0)
    net = FidNetwork(width=4, n_random=2)
    fit_fid_network(net, train, epochs=1, batch_size=8, lr=3e-3, w_ssl=0.0, seed=5, progress=False)
    full = FrozenBackboneExtractor(net, "resnet18")
    anat = FrozenBackboneExtractor(_TrainedBlock(net), "resnet18anat")
    x = _volumes(6, 2)[0]
    assert torch.equal(anat(x), full(x)[:, :32])
    with torch.no_grad():  # independent of the block layout: the trained backbone's own pooled features
        assert torch.allclose(anat(x), net.blocks(x)[0] * net.block_scale[0])
    assert float(net.block_scale[0]) != 1.0  # calibrated: the scale is really applied
