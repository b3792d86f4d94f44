"""Augmentation: DiffAugment 3-D is differentiable, shape-preserving, reproducible; torchio transforms run."""

from __future__ import annotations

import pytest
import torch

from benchmark.data.augment import conventional_transform, diff_augment, diff_augment_draws, rand_translation


def _batch() -> torch.Tensor:
    return torch.randn(3, 1, 8, 10, 12, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("policy", ["color", "translation", "color,translation", "color,translation,cutout"])
def test_shape_and_gradient(policy: str) -> None:
    x = _batch().requires_grad_()
    y = diff_augment(x, policy, generator=torch.Generator().manual_seed(1))
    assert y.shape == x.shape
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_empty_policy_is_identity() -> None:
    x = _batch()
    assert torch.equal(diff_augment(x, ""), x)


def test_same_generator_state_same_draw() -> None:
    x = _batch()
    a = diff_augment(x, generator=torch.Generator().manual_seed(5))
    b = diff_augment(x, generator=torch.Generator().manual_seed(5))
    c = diff_augment(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("policy", ["color,translation", "color,translation,cutout"])
def test_given_draws_augment_each_sample_by_its_row(policy: str) -> None:
    # How methods split a global batch over ranks: rows 1: of the draws augment samples 1: as in the whole batch.
    x = _batch()
    u = torch.rand(3, diff_augment_draws(policy), generator=torch.Generator().manual_seed(2))
    whole = diff_augment(x, policy, uniforms=u)
    assert not torch.equal(whole, x)
    torch.testing.assert_close(diff_augment(x[1:], policy, uniforms=u[1:]), whole[1:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="more than"):
        diff_augment(x, policy, uniforms=u[:, :2])


def test_translation_shifts_with_zero_padding() -> None:
    x = torch.arange(16.0).view(1, 1, 16, 1, 1).repeat(1, 1, 1, 2, 2) + 1.0
    y = rand_translation(x, ratio=0.125, generator=torch.Generator().manual_seed(0))
    column = y[0, 0, :, 0, 0]
    nonzero = column[column != 0]
    shift = int(column.nonzero()[0]) - int(nonzero[0] - 1)  # where value 1+k lands
    assert -2 <= shift <= 2 and torch.equal(nonzero, torch.arange(nonzero[0], nonzero[0] + len(nonzero)))
    assert (column == 0).sum() == abs(shift)


def test_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown"):
        diff_augment(_batch(), "color,flip")


def test_conventional_transform_runs_on_4d_tensor() -> None:
    torch.manual_seed(0)
    transform = conventional_transform(1.0, 1.0, 1.0)
    x = torch.randn(1, 12, 12, 12)
    y = transform(x)
    assert y.shape == x.shape and not torch.equal(x, y)
    assert torch.equal(conventional_transform(0.0, 0.0, 0.0)(x), x)


def test_paper_preset_augments_training_batches_inside_the_brain(stage_cache) -> None:  # noqa: ANN001
    """`paper` turns blur/noise/gamma on (§2.4 (i)); batches differ from the raw volumes inside the brain only."""
    from benchmark.config import resolve
    from benchmark.data.bundle import load_bundle
    from benchmark.runner import _batch_sources

    paper = resolve("paper")
    assert min(paper.data.p_blur, paper.data.p_noise, paper.data.p_gamma) > 0
    cfg = resolve("smoke", overrides={"data.cache_dir": str(stage_cache), "data.p_blur": 1.0, "data.p_noise": 1.0,
                                      "data.p_gamma": 1.0})
    bundle = load_bundle(cfg, progress=False)
    augmented, _ = _batch_sources(cfg, bundle)
    plain, _ = _batch_sources(resolve("smoke", overrides={"data.cache_dir": str(stage_cache)}), bundle)
    a, p = augmented.batch(0)["x"], plain.batch(0)["x"]
    background = (p - p.amin(dim=(1, 2, 3, 4), keepdim=True)).abs() < 1e-4
    assert background.any() and not torch.equal(a, p)
    assert torch.equal(a[background], p[background])
    assert (a - p)[~background].abs().mean() > 1e-3
