"""Loss terms of Eq. (2): closed-form KL against torch.distributions, GAN losses, weighting."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from benchmark.config import LossConfig
from models.losses import gan_d_loss, gan_g_loss, kl_diag_gaussians, l1_reconstruction, weighted_total


def test_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    mu_q, lv_q, mu_p, lv_p = (torch.randn(5, 12, generator=g) for _ in range(4))
    ref = kl_divergence(Normal(mu_q, (0.5 * lv_q).exp()), Normal(mu_p, (0.5 * lv_p).exp())).sum(1).mean()
    assert float(kl_diag_gaussians(mu_q, lv_q, mu_p, lv_p)) == pytest.approx(float(ref), rel=1e-5)


def test_kl_default_prior_is_standard_normal_and_zero_at_equality() -> None:
    mu, lv = torch.randn(3, 4), torch.randn(3, 4)
    ref = kl_divergence(Normal(mu, (0.5 * lv).exp()), Normal(0.0, 1.0)).sum(1).mean()
    assert float(kl_diag_gaussians(mu, lv)) == pytest.approx(float(ref), rel=1e-5)
    assert float(kl_diag_gaussians(mu, lv, mu, lv)) == pytest.approx(0.0, abs=1e-6)


def test_kl_is_float32_under_bfloat16_inputs() -> None:
    mu = torch.randn(2, 3).bfloat16()
    assert kl_diag_gaussians(mu, mu).dtype == torch.float32


def test_l1() -> None:
    assert float(l1_reconstruction(torch.ones(2, 1, 2, 2, 2), torch.zeros(2, 1, 2, 2, 2))) == 1.0


@pytest.mark.parametrize("kind", ["lsgan", "bce", "hinge"])
def test_gan_losses_prefer_correct_scores(kind: str) -> None:
    hi, lo = torch.full((2, 1, 2, 2, 2), 3.0), torch.full((2, 1, 2, 2, 2), -3.0)
    assert gan_d_loss(hi, lo, kind) < gan_d_loss(lo, hi, kind)
    assert gan_g_loss(hi, kind) < gan_g_loss(lo, kind)


def test_lsgan_values() -> None:
    ones, zeros = torch.ones(4), torch.zeros(4)
    assert float(gan_d_loss(ones, zeros, "lsgan")) == 0.0
    assert float(gan_d_loss(zeros, ones, "lsgan")) == 1.0
    assert float(gan_g_loss(zeros, "lsgan")) == 0.5


def test_unknown_gan_loss() -> None:
    with pytest.raises(ValueError, match="lsgan"):
        gan_g_loss(torch.zeros(1), "wasserstein")


def test_weighted_total_uses_paper_weights() -> None:
    w = LossConfig()
    terms = {"rec": torch.tensor(1.0), "kl": torch.tensor(2.0), "adv": torch.tensor(3.0), "perc": torch.tensor(0.5),
             "cls": torch.tensor(0.25), "reg": torch.tensor(4.0)}
    assert float(weighted_total(terms, w)) == pytest.approx(10 * 1 + 0.1 * 2 + 1 * 3 + 20 * 0.5 + 0.25 + 4.0)
    with pytest.raises(KeyError, match="nope"):
        weighted_total({"nope": torch.tensor(1.0)}, w)
