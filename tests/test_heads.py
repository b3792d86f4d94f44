"""The auxiliary heads: shapes, frozen gradients, parameter counts, and learning a real volumetric signal."""

from __future__ import annotations

import pytest
import torch

from models.heads import ClinicalHeads, ResNet18Sep3d, count_parameters, evaluate_heads, fit_heads


def _clinical(n: int, generator: torch.Generator) -> torch.Tensor:
    c = torch.randn(n, 7, generator=generator)
    c[:, 6] = torch.arange(n) % 2
    return c


@pytest.mark.parametrize("size", [16, 32])
def test_shapes(size: int) -> None:
    heads = ClinicalHeads(width=8).eval()
    x = torch.randn(2, 1, size, size, size)
    assert heads.logits(x).shape == (2, 2)
    assert heads.ratios(x).shape == (2, 6)
    assert heads.features(x).shape == (2, 64)
    maps = heads.feature_maps(x)
    assert [m.shape[1] for m in maps] == [8, 16, 32, 64]
    assert maps[0].shape[2:] == (size // 4,) * 3
    losses = heads.losses(x, _clinical(2, torch.Generator().manual_seed(0)))
    assert set(losses) == {"cls", "reg"} and all(v.ndim == 0 for v in losses.values())


def test_rejects_bad_shapes() -> None:
    heads = ClinicalHeads(width=4)
    with pytest.raises(ValueError, match="volumes"):
        heads.logits(torch.randn(2, 16, 16, 16))
    with pytest.raises(ValueError, match="expected c"):
        heads.losses(torch.randn(2, 1, 16, 16, 16), torch.randn(2, 6))


def test_frozen_heads_pass_gradients_to_the_input_only() -> None:
    heads = ClinicalHeads(width=4).freeze()
    heads.train()  # a parent's .train() must not put frozen BatchNorm back into batch statistics
    assert not heads.training and not any(m.training for m in heads.modules())
    x = torch.randn(2, 1, 16, 16, 16, requires_grad=True)
    losses = heads.losses(x, _clinical(2, torch.Generator().manual_seed(0)))
    (losses["cls"] + losses["reg"]).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in heads.parameters())


def test_separable_has_far_fewer_parameters_at_paper_width() -> None:
    with torch.device("meta"):  # count only: no memory, no forward at paper width
        standard = ResNet18Sep3d(64, 2, separable=False)
        separable = ResNet18Sep3d(64, 2, separable=True)
    n_std, n_sep = count_parameters(standard), count_parameters(separable)
    assert n_std == 33_161_026  # the 3-D ResNet-18 of MedicalNet/Hara et al. (33.2M) plus a 512x2 fc
    assert n_sep == 1_516_802
    assert n_sep <= 0.65 * n_std


def _ventricle_volumes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16^3 'brains' whose dark central sphere (a ventricle) is larger in AD: (x [n,1,16,16,16], c [n,7]).

    Radii 2.0 (CN) vs 3.5 (AD) voxels, each +-0.4 at random, centres jittered by +-1.5 voxels, noise sd 0.3: the
    classes differ only in the volume of a structure that moves, as in the real task. The regression target is the
    (standardised) ventricle volume in both ventricle columns, noise in the others.
    """
    g = torch.Generator().manual_seed(seed)
    label = torch.arange(n) % 2
    radius = 2.0 + 1.5 * label + 0.8 * (torch.rand(n, generator=g) - 0.5)
    centre = 7.5 + 3.0 * (torch.rand(n, 3, generator=g) - 0.5)
    grid = torch.stack(torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij"))  # [3, 16, 16, 16]
    d_brain = (grid - 7.5).square().sum(0).sqrt()
    d_vent = (grid[None] - centre[:, :, None, None, None]).square().sum(1).sqrt()  # [n, 16, 16, 16]
    x = (d_brain < 7).float() * (1 - (d_vent < radius[:, None, None, None]).float())
    x = x + 0.3 * torch.randn(x.shape, generator=g)
    volume = radius**3
    c = torch.randn(n, 7, generator=g)
    c[:, 4] = c[:, 5] = (volume - volume.mean()) / volume.std()
    c[:, 6] = label.float()
    return x[:, None], c


def test_classifier_learns_a_volumetric_signal() -> None:
    torch.manual_seed(0)
    train, val, test = _ventricle_volumes(48, 1), _ventricle_volumes(32, 2), _ventricle_volumes(32, 3)
    heads = ClinicalHeads(width=8)
    # lr above the paper's 1e-4 so that 8 epochs of 6 batches suffice (measured test BAC 0.88-1.0 over 4 seeds)
    out = fit_heads(heads, train, val, epochs=8, batch_size=8, lr=3e-3, patience=8, seed=0, progress=False)
    assert len(out["history"]) == out["epochs_run"] and out["val_bac"] >= 0.8
    scores = evaluate_heads(heads, *test, std=torch.full((6,), 2.0))
    assert scores["bac"] >= 0.8
    assert scores["mse"] == pytest.approx(4 * scores["reg_loss"], rel=1e-5)  # raw units: (error * std)^2


def test_fit_heads_is_deterministic_for_a_seed() -> None:
    train, val = _ventricle_volumes(12, 1), _ventricle_volumes(6, 2)
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        heads = ClinicalHeads(width=4)
        fit_heads(heads, train, val, epochs=2, batch_size=4, patience=2, seed=3, progress=False,
                  augment=lambda x: x + 0.05 * torch.randn_like(x))  # fmt: skip
        states.append(heads.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def _contrast_volumes(n: int, seed: int, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned 'brains' with the project's background (-4.6 outside a ball) where AD subjects' left-and-right 'grey
    matter' slabs are brighter by 0.5 under unit noise: a fixed-voxel signal that no pooled statistic isolates.
    """
    g = torch.Generator().manual_seed(seed)
    label = torch.arange(n) % 2
    grid = torch.stack(torch.meshgrid(*[torch.arange(float(size))] * 3, indexing="ij"))
    brain = (grid - (size - 1) / 2).square().sum(0).sqrt() < size / 2 - 1
    gm = brain & ((grid[0] - (size - 1) / 2).abs() > size / 4)  # two lateral slabs, mirror-symmetric
    x = torch.randn(n, size, size, size, generator=g) + 0.5 * label[:, None, None, None] * gm
    x = torch.where(brain, x, torch.tensor(-4.6))
    c = torch.randn(n, 7, generator=g)
    c[:, 6] = label.float()
    return x[:, None], c


def test_voxel_readouts_equal_the_reference_regressions() -> None:
    from sklearn.linear_model import LogisticRegression, Ridge

    from models.heads import VoxelReadout

    x, c = _contrast_volumes(40, 0)
    x_new, c_new = _contrast_volumes(30, 1)
    # references: the same regressions on explicitly standardised voxels, predicted by scikit-learn itself
    flat, flat_new = x.flatten(1).double().numpy(), x_new.flatten(1).double().numpy()
    mean, std = flat.mean(0), flat.std(0) + 1e-3
    z, z_new = (flat - mean) / std, (flat_new - mean) / std

    readout = VoxelReadout(12, 2)
    readout.fit_logistic(x, c[:, 6].long(), c_inverse=0.01)
    p_ref = LogisticRegression(C=0.01, max_iter=5000).fit(z, c[:, 6].numpy()).predict_proba(z_new)[:, 1]
    p = readout(x_new).softmax(dim=1)[:, 1].double().numpy()
    assert abs(p - p_ref).max() < 1e-4
    assert ((p > 0.5) == c_new[:, 6].numpy().astype(bool)).mean() >= 0.8  # it reads the signal on new subjects
    assert readout.weight[:, x[0, 0] == -4.6].abs().max() == 0  # constant background voxels carry no weight

    ridge = VoxelReadout(12, 6)
    ridge.fit_ridge(x, c[:, :6], alpha=10.0)
    y_ref = Ridge(alpha=10.0).fit(z, c[:, :6].double().numpy()).predict(z_new)
    assert abs(ridge(x_new).double().numpy() - y_ref).max() < 1e-4
    with pytest.raises(ValueError, match="12\\^3"):
        readout(torch.zeros(2, 1, 16, 16, 16))


def test_heads_with_voxel_readouts_average_them_with_the_cnns_and_pass_their_gradient() -> None:
    train, val = _contrast_volumes(32, 2), _contrast_volumes(16, 3)
    torch.manual_seed(0)
    heads = ClinicalHeads(width=4, voxel_readout=12)
    fit_heads(heads, train, val, epochs=2, batch_size=8, lr=3e-3, patience=2, seed=0, progress=False, mirror=True,
              voxel_c=0.01, voxel_alpha=10.0)  # fmt: skip
    w = heads.voxel_cls.weight
    assert w.abs().sum() > 0 and heads.voxel_reg.weight.abs().sum() > 0
    # fitted on the training volumes and their mirror images: the diagnosis readout is left-right symmetric, and the
    # regressor's left and right outputs (columns 0/1, 2/3, 4/5) are each other's mirror image
    assert torch.allclose(w, w.flip(1), atol=1e-3 * float(w.abs().max()))
    wr = heads.voxel_reg.weight
    assert torch.allclose(wr[[1, 0, 3, 2, 5, 4]], wr.flip(1), atol=1e-3 * float(wr.abs().max()))
    heads.freeze()
    x = val[0].clone().requires_grad_(True)
    logits = (heads.classifier(x) + heads.voxel_cls(x)) / 2
    ratios = (heads.regressor(x) + heads.voxel_reg(x)) / 2
    assert torch.allclose(heads.logits(x), logits) and torch.allclose(heads.ratios(x), ratios)
    ce = torch.nn.functional.cross_entropy(logits, val[1][:, 6].long())
    losses = heads.losses(x, val[1])
    assert torch.allclose(losses["cls"], ce)
    assert torch.allclose(losses["reg"], torch.nn.functional.mse_loss(ratios, val[1][:, :6]))
    assert torch.allclose(heads.losses(x, val[1], classifier_maps=heads.feature_maps(x))["cls"], ce)
    # the CNN's features are the CNN's own (FID resnet18sep, perceptual maps), untouched by the readout
    assert torch.equal(heads.features(x), heads.classifier.features(x))
