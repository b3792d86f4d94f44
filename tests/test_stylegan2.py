"""3D-StyleGAN2 baseline: R1 and path length against analytic values, demodulation, EMA, shapes, training, counts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from baselines.stylegan2 import (
    MappingNetwork,
    ModulatedLayer,
    StyleGAN2,
    minibatch_stddev,
    param_counts,
    path_length_penalty,
    r1_penalty,
)
from benchmark.config import DataConfig, resolve
from benchmark.registry import METHODS


def _cfg(size: int = 16, **overrides: object):
    # Below the smoke width: the recipe, not the capacity, is under test (keeps the file at a few seconds).
    small = {"data.size": size, "data.diffaug_policy": "", "stylegan.fmaps": 0.0625}
    return resolve("smoke", "stylegan2", {**small, **overrides})


def _batch(n: int = 4, size: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(n, 1, size, size, size, generator=g), "c": torch.zeros(n, 7)}


def test_r1_equals_analytic_value_for_linear_discriminator() -> None:
    w = torch.randn(1, 4, 4, 4, dtype=torch.float64)

    def linear(x: torch.Tensor) -> torch.Tensor:
        return (x * w).flatten(1).sum(1, keepdim=True) + 0.3

    real = torch.randn(3, 1, 4, 4, 4, dtype=torch.float64)
    assert r1_penalty(linear, real, gamma=10.0).item() == pytest.approx(5.0 * w.square().sum().item(), rel=1e-10)


def test_path_length_penalty_for_linear_synthesis() -> None:
    # images = ws . A: J^T y = A y, so the lengths are known in closed form.
    n, num_ws, w_dim, voxels = 3, 2, 5, 8
    a = torch.randn(num_ws, w_dim, voxels, dtype=torch.float64)
    ws = torch.randn(n, num_ws, w_dim, dtype=torch.float64, requires_grad=True)
    images = torch.einsum("nlw,lwv->nv", ws, a).view(n, 1, 2, 2, 2)
    pl_mean = torch.tensor(0.5, dtype=torch.float64)
    penalty, new_mean = path_length_penalty(images, ws, pl_mean, decay=0.01, generator=torch.Generator().manual_seed(4))
    y = torch.randn(images.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64) / math.sqrt(8)
    grads = torch.einsum("lwv,nv->nlw", a, y.view(n, voxels))
    lengths = grads.square().sum(2).mean(1).sqrt()
    mean = 0.5 + 0.01 * (lengths.mean() - 0.5)
    assert new_mean.item() == pytest.approx(mean.item(), rel=1e-6)
    assert penalty.item() == pytest.approx(((lengths - mean) ** 2).mean().item(), rel=1e-6)


def test_demodulation_gives_unit_output_variance() -> None:
    torch.manual_seed(0)
    layer = ModulatedLayer(32, 16, w_dim=8)
    with torch.no_grad():
        layer.affine.weight.mul_(3.0)  # styles far from 1 so that demodulation has work to do
        w = torch.randn(2, 8)
        x = torch.randn(2, 32, 14, 14, 14)
        out = layer.modulated_conv(x, w)[:, :, 1:-1, 1:-1, 1:-1]  # interior: no zero padding in the receptive field
        assert out.var().item() == pytest.approx(1.0, abs=0.05)
        per_channel = out.var(dim=(2, 3, 4))
        assert per_channel.min().item() > 0.8 and per_channel.max().item() < 1.2
        layer.demodulate = False
        assert abs(layer.modulated_conv(x, w).var().item() - 1.0) > 0.5


def test_mapping_uses_equalised_lr_with_multiplier() -> None:
    torch.manual_seed(0)
    mapping = MappingNetwork(64, 64, layers=2, lr_mul=0.01)
    fc = mapping.fcs[0]
    assert fc.weight.std().item() == pytest.approx(100.0, rel=0.05)  # stored N(0, 1) / lr_mul
    assert fc.weight_gain * fc.weight.std().item() == pytest.approx(1 / 8, rel=0.05)  # runtime he-constant


def test_minibatch_stddev_groups() -> None:
    x = torch.randn(6, 3, 4, 4, 4)
    y = minibatch_stddev(x, group_size=4)  # 6 is not a multiple of 4: groups of 3
    assert y.shape == (6, 4, 4, 4, 4)
    expected = x.view(3, 2, 3, 4, 4, 4).std(dim=0, unbiased=False).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(y[:2, 3, 0, 0, 0], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y[2:4, 3, 0, 0, 0], expected, rtol=1e-4, atol=1e-5)
    assert minibatch_stddev(torch.randn(1, 3, 4, 4, 4)).shape == (1, 4, 4, 4, 4)


@pytest.mark.parametrize("size", [16, 32])
def test_shapes(size: int) -> None:
    method = StyleGAN2(_cfg(size))
    z = torch.randn(2, method.cfg.stylegan.z_dim)
    x, ws = method.G(z, return_ws=True, mix=(2, torch.randn_like(z)))
    blocks = int(math.log2(size)) - 1
    assert ws.shape == (2, 3 * blocks - 1, method.cfg.stylegan.w_dim)
    assert x.shape == (2, 1, size, size, size)
    assert method.D(x).shape == (2, 1)
    assert method.sample(3).shape == (3, 1, size, size, size)
    assert METHODS.get("stylegan2") is StyleGAN2 and StyleGAN2.conditional is False


def test_ema_update_is_beta_interpolation() -> None:
    torch.manual_seed(0)
    method = StyleGAN2(_cfg(**{"stylegan.ema_halflife_volumes": 10}))
    method.setup()
    method.training_step(_batch(n=4), 0)
    ema_before = [p.detach().clone() for p in method.G_ema.parameters()]
    params = [p.detach().clone() for p in method.G.parameters()]
    method.update_ema()
    beta = 0.5 ** (4 / 10)
    for old, p, new in zip(ema_before, params, method.G_ema.parameters(), strict=True):
        torch.testing.assert_close(new, beta * old + (1 - beta) * p)
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, method.G_ema.parameters(), strict=True))


@pytest.mark.parametrize("lazy", [True, False])
def test_smoke_training_changes_weights(lazy: bool) -> None:
    torch.manual_seed(0)
    method = StyleGAN2(_cfg(**{"stylegan.lazy_reg": lazy}))
    method.setup()
    ratio = 4 / 5 if lazy else 1.0
    assert method.optimizers["G"].param_groups[0]["lr"] == pytest.approx(0.002 * ratio)
    assert method.optimizers["G"].param_groups[0]["betas"][1] == pytest.approx(0.99**ratio)
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in (("G", method.G), ("D", method.D))}
    seen = []
    for step in range(2):
        logs = method.training_step(_batch(), step)
        method.update_ema()
        seen.append(set(logs))
        assert all(math.isfinite(v) for v in logs.values())
    assert {"r1", "pl"} <= seen[0]  # regularisers run on the first step
    assert ("r1" in seen[1]) == (not lazy) and ("pl" in seen[1]) == (not lazy)
    assert method.pl_mean.item() > 0
    for key, module in (("G", method.G), ("D", method.D)):
        assert any(not torch.equal(a, p) for a, p in zip(before[key], module.parameters(), strict=True))


def test_param_counts_near_table3() -> None:
    counts = param_counts(resolve("paper", "stylegan2"), size=128)
    assert set(counts) == {"G", "D"}
    assert 0.8 * 7e6 <= sum(counts.values()) <= 1.2 * 7e6


def test_training_step_with_diffaugment() -> None:
    pytest.importorskip("benchmark.data.augment")
    method = StyleGAN2(_cfg(**{"data.diffaug_policy": DataConfig.diffaug_policy}))
    method.setup()
    logs = method.training_step(_batch(), 0)
    assert {"loss_adv_g", "loss_D", "r1", "pl"} <= set(logs)


def test_resume_with_another_global_rng_state_replays_the_uninterrupted_run(tmp_path: Path, monkeypatch) -> None:
    # Regression: z, style mixing and the noise inputs came from the global RNG, so a resumed run whose RNG state is
    # not the saved one (every rank but 0: the checkpoint holds rank 0's) drew other numbers than the uninterrupted run.
    import benchmark.train as loop

    cfg = resolve("smoke", "stylegan2", {"train.budget_volumes": 24, "train.device": "cpu"})  # 6 steps, DiffAugment on
    g = torch.Generator().manual_seed(2)
    data = [{"x": torch.randn(1, 16, 16, 16, generator=g), "c": torch.zeros(7)} for _ in range(8)]

    def run(run_dir: Path, **kwargs: object) -> dict:
        torch.manual_seed(0)  # same initial weights
        source = loop.BatchSource(data, cfg.train.batch_size, cfg.train.seed)
        loop.train(StyleGAN2(cfg), cfg, source, run_dir, progress=False, **kwargs)
        return loop.load_checkpoint(run_dir / loop.CHECKPOINT)

    straight = run(tmp_path / "straight")
    assert run(tmp_path / "resumed", stop_after_volumes=12)["state"]["step"] == 3  # before the lazy path-length step 4
    monkeypatch.setattr(loop, "_set_rng_state", lambda state: torch.manual_seed(999))
    resumed = run(tmp_path / "resumed", resume=True)
    assert straight["state"]["step"] == resumed["state"]["step"] == 6
    assert straight["method"].keys() == resumed["method"].keys()
    for key, value in straight["method"].items():
        assert torch.equal(value, resumed["method"][key]), key
