"""Loss terms of paper Eq. (2) and their weighted sum (weights from ``cfg.loss``, paper §2.1).

All terms are reduced to scalars in float32, whatever the autocast dtype of their inputs.

Adversarial loss: least squares (LSGAN, Mao et al. 2017) by default, as in the reference PatchGAN code of
Isola et al. (pytorch-CycleGAN-and-pix2pix, ``gan_mode="lsgan"``). Reasons: every patch score gets a gradient
proportional to its distance from the target, so the generator keeps learning when the discriminator is ahead,
which matters here because the paper trains D with a 10x larger learning rate than G (§2.5: 1e-3 vs 1e-4); and the
loss needs no sigmoid whose saturation would starve G. ``"bce"`` (non-saturating, Goodfellow et al.) and
``"hinge"`` (Miyato & Koyama 2018, the projection-discriminator paper) are kept as switches
(``cfg.model.adv_loss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmark.config import LossConfig

GAN_LOSSES = ("lsgan", "bce", "hinge")


def l1_reconstruction(x_hat: Tensor, x: Tensor) -> Tensor:
    """L_rec: mean voxel-wise |x_hat - x| over [N, 1, D, H, W] (paper Table 1)."""
    return (x_hat.float() - x.float()).abs().mean()


def kl_diag_gaussians(
    mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor | None = None, logvar_p: Tensor | None = None,
    reduction: str = "sum",
) -> Tensor:
    """L_KL = KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p))) in closed form.

    Args:
        mu_q, logvar_q: [N, k] posterior mean and log variance (log sigma^2).
        mu_p, logvar_p: [N, k] prior mean and log variance; ``None`` means N(0, I).
        reduction: over the k latent dimensions, ``"sum"`` (nats per sample) or ``"mean"`` (nats per dimension).
    Returns:
        Scalar: reduced over the k latent dimensions, averaged over the batch.
    """
    kl = kl_per_dim(mu_q, logvar_q, mu_p, logvar_p)
    if reduction == "sum":
        return kl.sum(dim=1).mean()
    if reduction == "mean":
        return kl.mean()
    raise ValueError(f"unknown KL reduction {reduction!r}; valid: sum, mean")


def kl_per_dim(
    mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor | None = None, logvar_p: Tensor | None = None
) -> Tensor:
    """[N, k] KL of each latent dimension (float32), the terms :func:`kl_diag_gaussians` sums (active units)."""
    mu_q, logvar_q = mu_q.float(), logvar_q.float()
    mu_p = torch.zeros_like(mu_q) if mu_p is None else mu_p.float()
    logvar_p = torch.zeros_like(logvar_q) if logvar_p is None else logvar_p.float()
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).square()) * torch.exp(-logvar_p) - 1.0)


def _check_kind(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise ValueError(f"unknown adversarial loss {kind!r}; valid: {', '.join(GAN_LOSSES)}")


def gan_d_loss(real_scores: Tensor, fake_scores: Tensor, kind: str = "lsgan") -> Tensor:
    """Discriminator loss on patch-score maps [N, 1, d, h, w] (any shape), averaged over patches and batch.

    lsgan: 0.5 (D(x) - 1)^2 + 0.5 D(x_hat)^2; bce: softplus(-D(x)) + softplus(D(x_hat));
    hinge: relu(1 - D(x)) + relu(1 + D(x_hat)).
    """
    _check_kind(kind)
    real, fake = real_scores.float(), fake_scores.float()
    if kind == "lsgan":
        return 0.5 * ((real - 1.0).square().mean() + fake.square().mean())
    if kind == "bce":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def gan_g_loss(fake_scores: Tensor, kind: str = "lsgan") -> Tensor:
    """Generator side of L_adv on the patch scores of generated volumes.

    lsgan: 0.5 (D(x_hat) - 1)^2; bce (non-saturating): softplus(-D(x_hat)); hinge: -D(x_hat).
    """
    _check_kind(kind)
    fake = fake_scores.float()
    if kind == "lsgan":
        return 0.5 * (fake - 1.0).square().mean()
    if kind == "bce":
        return F.softplus(-fake).mean()
    return -fake.mean()


def weighted_total(terms: dict[str, Tensor], weights: LossConfig) -> Tensor:
    """Eq. (2): sum of ``weights.<name> * terms[name]`` over the terms present (names: rec, kl, adv, perc, cls, reg).

    Raises:
        KeyError: for a term without a weight in ``LossConfig``.
    """
    total: Tensor | None = None
    for name, value in terms.items():
        if not hasattr(weights, name):
            raise KeyError(f"loss term {name!r} has no weight in LossConfig")
        part = getattr(weights, name) * value.float()
        total = part if total is None else total + part
    if total is None:
        raise ValueError("weighted_total needs at least one term")
    return total
