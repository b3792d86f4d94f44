"""3D-WGAN-GP baseline: the per-sample gradient penalty against finite differences, n_critic, shapes, counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from baselines.wgan_gp import WGANGP, gradient_penalty, param_counts
from benchmark.config import DataConfig, resolve
from benchmark.registry import METHODS


def _cfg(size: int = 16, **overrides: object):
    # Below the smoke width: the recipe, not the capacity, is under test (keeps the file at a few seconds).
    small = {"data.size": size, "data.diffaug_policy": "", "wgan.width": 0.0625}
    return resolve("smoke", "wgan_gp", {**small, **overrides})


def _batch(n: int = 4, size: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(n, 1, size, size, size, generator=g), "c": torch.zeros(n, 7)}


def _expected_x_hat(real: torch.Tensor, fake: torch.Tensor, seed: int) -> torch.Tensor:
    eps = torch.rand(real.shape[0], 1, 1, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=real.dtype)
    return eps * real + (1 - eps) * fake


def test_gradient_penalty_matches_central_differences() -> None:
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4**3, 1)).double()
    real, fake = torch.randn(3, 1, 4, 4, 4, dtype=torch.float64), torch.randn(3, 1, 4, 4, 4, dtype=torch.float64)
    gp = gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(7))

    x_hat = _expected_x_hat(real, fake, seed=7)
    h = 1e-6
    steps = h * torch.eye(4**3, dtype=torch.float64).view(-1, 1, 4, 4, 4)  # one perturbed voxel per row
    with torch.no_grad():
        norms = []
        for sample in x_hat:
            grad = (critic(sample + steps) - critic(sample - steps)).flatten() / (2 * h)
            norms.append(grad.norm())
    expected = ((torch.stack(norms) - 1) ** 2).mean()
    assert gp.item() == pytest.approx(expected.item(), rel=1e-6)


def test_gradient_penalty_is_per_sample_not_per_voxel() -> None:
    # Linear critic <w, x> with ||w|| = 2: per-sample penalty (2 - 1)^2 = 1; a per-voxel (|w_i| - 1)^2 would not be.
    w = torch.full((1, 4, 4, 4), 2.0 / 8.0, dtype=torch.float64)  # 64 entries of 1/4 -> norm 2

    def linear(x: torch.Tensor) -> torch.Tensor:
        return (x * w).flatten(1).sum(1)

    real, fake = torch.randn(5, 1, 4, 4, 4, dtype=torch.float64), torch.randn(5, 1, 4, 4, 4, dtype=torch.float64)
    assert gradient_penalty(linear, real, fake).item() == pytest.approx(1.0)
    per_voxel = ((w.abs() - 1) ** 2).mean().item()
    assert per_voxel == pytest.approx(0.5625)

    # A critic whose gradient differs per sample (grad = x_hat): penalty uses one eps and one norm per sample.
    def quadratic(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x.square().flatten(1).sum(1)

    gp = gradient_penalty(quadratic, real, fake, generator=torch.Generator().manual_seed(3))
    x_hat = _expected_x_hat(real, fake, seed=3)
    expected = ((x_hat.flatten(1).norm(dim=1) - 1) ** 2).mean()
    batch_norm_variant = (x_hat.norm() - 1) ** 2
    voxel_variant = ((x_hat.abs() - 1) ** 2).mean()
    assert gp.item() == pytest.approx(expected.item(), rel=1e-10)
    assert abs(gp.item() - batch_norm_variant.item()) > 1.0
    assert abs(gp.item() - voxel_variant.item()) > 1.0


@pytest.mark.parametrize("size", [16, 32])
def test_shapes(size: int) -> None:
    method = WGANGP(_cfg(size))
    z = torch.randn(2, method.cfg.wgan.z_dim)
    x = method.G(z)
    assert x.shape == (2, 1, size, size, size)
    assert method.D(x).shape == (2, 1)
    assert method.sample(3).shape == (3, 1, size, size, size)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in method.D.modules())


def test_sample_is_reproducible_and_unconditional() -> None:
    method = WGANGP(_cfg())
    assert METHODS.get("wgan_gp") is WGANGP and WGANGP.conditional is False
    a = method.sample(2, generator=torch.Generator().manual_seed(0))
    b = method.sample(2, c=torch.zeros(2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    assert method.G.training  # sample() restores the mode it found


def test_one_critic_update_per_call_and_generator_every_n_critic() -> None:
    torch.manual_seed(0)
    method = WGANGP(_cfg(**{"wgan.n_critic": 2}))
    method.setup()
    batch = _batch()
    method._init_output_bias(batch["x"])  # what the first call does before its critic update (same value again)
    g_updates, d_changes = [], []
    for step in range(4):
        g_before = [p.detach().clone() for p in method.G.parameters()]
        d_before = [p.detach().clone() for p in method.D.parameters()]
        logs = method.training_step(batch, step)
        g_changed = any(not torch.equal(a, p) for a, p in zip(g_before, method.G.parameters(), strict=True))
        d_changes.append(any(not torch.equal(a, p) for a, p in zip(d_before, method.D.parameters(), strict=True)))
        g_updates.append(g_changed)
        assert g_changed == ("loss_adv_g" in logs)
        assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert g_updates == [False, True, False, True]
    assert all(d_changes)
    assert int(method.critic_updates) == 4


def test_optimizers_follow_gulrajani() -> None:
    method = WGANGP(_cfg())
    method.setup()
    for opt in method.optimizers.values():
        assert isinstance(opt, torch.optim.Adam)
        assert opt.param_groups[0]["lr"] == 1e-4 and opt.param_groups[0]["betas"] == (0.0, 0.9)


def test_param_counts_near_table3() -> None:
    counts = param_counts(resolve("paper", "wgan_gp"), size=128)
    assert set(counts) == {"G", "D"}
    assert 0.8 * 25e6 <= sum(counts.values()) <= 1.2 * 25e6


def test_training_step_with_diffaugment() -> None:
    pytest.importorskip("benchmark.data.augment")
    method = WGANGP(_cfg(**{"wgan.n_critic": 1, "data.diffaug_policy": DataConfig.diffaug_policy}))
    method.setup()
    logs = method.training_step(_batch(), 0)
    assert {"loss_D", "gp", "loss_adv_g"} <= set(logs)
