"""3D-WGAN-GP baseline (paper Table 3): Gulrajani et al. (2017), "Improved Training of Wasserstein GANs", in 3-D.

The recipe follows the original paper, where public 3-D ports drift from it:

- Gradient penalty per sample (Gulrajani Alg. 1): one eps ~ U(0, 1) per sample, x_hat = eps x + (1 - eps) x~, the
  gradient norm taken over all non-batch dimensions of that sample, penalty (||grad||_2 - 1)^2 averaged over the
  batch, lambda = ``cfg.wgan.gp_lambda`` (10). Not per voxel.
- n_critic = ``cfg.wgan.n_critic`` (5) critic updates per generator update, not the reverse. Each critic update
  consumes a real batch, so one ``training_step`` call is ONE critic update on its batch, and every n_critic-th call
  also makes one generator update: the volumes-seen budget counts the critic's real data, as for every method.
- Critic without batch normalisation (it would make each sample's score depend on the batch and invalidate the
  per-sample penalty): layer norm, as the paper recommends, implemented as ``GroupNorm(1, C)`` (normalises over
  C, D, H, W of each sample; per-channel affine), none on the first layer (as in DCGAN).
- Adam(lr = 1e-4, betas = (0.0, 0.9)) for both networks; no gradient clipping, no EMA (the paper has neither).
- DiffAugment (the suite's policy) on the real and the fake batch of every critic and generator update; the
  penalty interpolates between the augmented real and fake volumes, the inputs the critic actually sees.
- BatchNorm in G runs in train mode while training (batch statistics) and in eval mode in ``sample``.

Architecture (DCGAN-style, Gulrajani's "DCGAN" generator with batch norm):
- G: z [N, z_dim] -> linear -> 4^3 x C(4) -> BN, ReLU -> [ConvTranspose3d(k4, s2) -> BN -> ReLU] per stage ->
  a last ConvTranspose3d to one channel at S^3. The output is linear, not tanh: volumes are z-scored intensities
  (unbounded, 0 outside the brain), not images in [-1, 1].
- D: Conv3d(k4, s2) stages S^3 -> 4^3, LeakyReLU(0.2), layer norm from the second stage on, then linear -> score.
- Widths: C(r) = width * 2048 / r channels at resolution r (512 at 4^3, 32 at 64^3 for width 1), the DCGAN halving
  per stage. At 128^3 and width 1 that is G 15.3M + D 11.2M = 26.5M parameters (paper Table 3: 25M).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.config import Config
from benchmark.dist import SyncBatchNorm3d
from benchmark.registry import METHODS
from models.base import LOSS_ADV_G, LOSS_D, GenerativeMethod, frozen
from models.template import OutputTemplate, medoid_volume, nearest_to_mean

# C(r) = width * _CHANNEL_BASE / r: 512 channels at 4^3 for width 1 (DCGAN's 4x4 stage width).
_CHANNEL_BASE = 2048
_MIN_CHANNELS = 4
# wgan.output_template: the last layer's weights x this, so that the residual starts small on the template.
RESIDUAL_SCALE = 0.1


def _channels(resolution: int, width: float) -> int:
    return max(_MIN_CHANNELS, round(width * _CHANNEL_BASE / resolution))


def _check_size(size: int) -> None:
    if size < 8 or size & (size - 1):
        raise ValueError(f"WGAN-GP needs a power-of-two volume size >= 8, got {size}")


def _upcast(t: Tensor) -> Tensor:
    """Norms of gradients in at least float32 (bf16 under AMP loses the penalty's precision); float64 stays."""
    return t if t.dtype == torch.float64 else t.float()


def gradient_penalty(
    critic: nn.Module | object,
    real: Tensor,
    fake: Tensor,
    generator: torch.Generator | None = None,
    eps: Tensor | None = None,
) -> Tensor:
    """Gulrajani et al.'s penalty E[(||grad_x critic(x_hat)||_2 - 1)^2], per sample, without lambda.

    Args:
        critic: callable [N, C, D, H, W] -> [N] or [N, 1] scores.
        real: [N, C, D, H, W] real volumes.
        fake: [N, C, D, H, W] generated volumes (detached here: the penalty trains the critic only).
        generator: RNG for eps (one U(0, 1) draw per sample, shape [N, 1, 1, 1, 1]).
        eps: the interpolation weights [N] given directly (the method draws them per global batch).
    Returns:
        Scalar: the mean over samples of (||grad||_2 - 1)^2, the norm taken over all of a sample's C*D*H*W entries.
    """
    if real.shape != fake.shape:
        raise ValueError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} differ")
    n = real.shape[0]
    if eps is None:
        eps = torch.rand((n,), generator=generator, device=real.device, dtype=real.dtype)
    eps = eps.to(real.dtype).view((n,) + (1,) * (real.dim() - 1))
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    scores = critic(x_hat)
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    norms = _upcast(grad).flatten(1).norm(dim=1)
    return (norms - 1).square().mean()


class WGANGenerator(nn.Module):
    """DCGAN-style 3-D generator: z [N, z_dim] -> [N, 1, S, S, S]."""

    def __init__(self, z_dim: int, size: int, width: float, output_template: bool = False) -> None:
        super().__init__()
        _check_size(size)
        self.z_dim = z_dim
        c4 = _channels(4, width)
        self.c4 = c4
        # No bias before batch norm: BN's shift makes it redundant.
        self.project = nn.Linear(z_dim, c4 * 4**3, bias=False)
        self.project_norm = SyncBatchNorm3d(c4)
        stages: list[nn.Module] = []
        res = 4
        while res < size // 2:
            cin, cout = _channels(res, width), _channels(2 * res, width)
            stages += [nn.ConvTranspose3d(cin, cout, 4, 2, 1, bias=False), SyncBatchNorm3d(cout), nn.ReLU(inplace=True)]
            res *= 2
        self.stages = nn.Sequential(*stages)
        self.to_volume = nn.ConvTranspose3d(_channels(res, width), 1, 4, 2, 1)
        self.template = OutputTemplate(size) if output_template else None
        if self.template is not None:  # a residual starts small, on a zero bias (the template holds the offset)
            with torch.no_grad():
                self.to_volume.weight.mul_(RESIDUAL_SCALE)
                self.to_volume.bias.zero_()

    def forward(self, z: Tensor) -> Tensor:
        x = self.project(z).view(z.shape[0], self.c4, 4, 4, 4)
        x = F.relu(self.project_norm(x), inplace=True)
        out = self.to_volume(self.stages(x))
        return out if self.template is None else self.template(out)


class WGANCritic(nn.Module):
    """Critic without batch norm: [N, 1, S, S, S] -> scores [N, 1]."""

    def __init__(self, size: int, width: float) -> None:
        super().__init__()
        _check_size(size)
        layers: list[nn.Module] = [nn.Conv3d(1, _channels(size // 2, width), 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        res = size // 2
        while res > 4:
            cin, cout = _channels(res, width), _channels(res // 2, width)
            layers += [nn.Conv3d(cin, cout, 4, 2, 1), nn.GroupNorm(1, cout), nn.LeakyReLU(0.2, inplace=True)]
            res //= 2
        self.features = nn.Sequential(*layers)
        self.score = nn.Linear(_channels(4, width) * 4**3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.score(self.features(x).flatten(1))


@METHODS.register("wgan_gp")
class WGANGP(GenerativeMethod):
    """3D-WGAN-GP (Gulrajani et al. 2017): per-sample gradient penalty, 5 critic updates per G update, unconditional."""

    conditional = False

    def __init__(self, cfg: Config, heads: object | None = None) -> None:
        super().__init__(cfg)
        w = cfg.wgan
        self.G = WGANGenerator(w.z_dim, cfg.data.size, w.width, w.output_template)
        self.D = WGANCritic(cfg.data.size, w.width)
        # Critic updates so far, in the state dict so that a resumed run keeps the n_critic phase.
        self.register_buffer("critic_updates", torch.zeros((), dtype=torch.long))

    @property
    def _device(self) -> torch.device:
        return self.D.score.weight.device

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        w = self.cfg.wgan
        return {
            "G": torch.optim.Adam(self.G.parameters(), lr=w.lr, betas=(w.beta1, w.beta2)),
            "D": torch.optim.Adam(self.D.parameters(), lr=w.lr, betas=(w.beta1, w.beta2)),
        }

    @torch.no_grad()
    def init_from_data(self, train: Any) -> None:
        """``wgan.output_template``: the template is the training subject nearest to the training mean."""
        if self.G.template is not None:
            self.G.template.set(medoid_volume(train))

    @torch.no_grad()
    def _init_output_bias(self, real: Tensor) -> None:
        """Data-dependent init of the last layer's bias to the data's mean intensity (all ranks), on the first call.

        Volumes are z-scored inside the brain (mean about -3, background -4.6) while G starts around 0; Adam moves
        a bias by about lr a step, so the offset would otherwise take most of a short budget to learn. With the
        output template the template holds the offset (the first batch's volume nearest its mean when
        :meth:`init_from_data` was not called).
        """
        from benchmark.dist import all_reduce_mean, broadcast_tensor

        if self.G.template is not None:
            if not self.G.template.is_set:
                self.G.template.set(broadcast_tensor(nearest_to_mean(real.float())))
            return
        self.G.to_volume.bias.fill_(all_reduce_mean(float(real.float().mean()), real.device))

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, float]:
        """One critic update on ``batch["x"]`` [N,1,S,S,S]; a generator update on every n_critic-th call.

        ``step`` is not used: the n_critic phase comes from the ``critic_updates`` buffer, which survives resume.
        """
        real = batch["x"]
        n = real.shape[0]
        w = self.cfg.wgan
        call = int(self.critic_updates)
        if call == 0:
            self._init_output_bias(real)
        z = self.batch_noise("z_critic", n, (w.z_dim,), call, real.device)
        with torch.no_grad(), self.autocast():
            fake = self.G(z)
        with self.autocast():
            real_aug, fake_aug = self.augment(real, "aug_real", call), self.augment(fake.float(), "aug_fake", call)
            # One forward for both: the critic has no batch statistics, so this equals two separate calls.
            scores = self.D(torch.cat([real_aug, fake_aug])).float()
            score_real, score_fake = scores[:n].mean(), scores[n:].mean()
            eps = self.batch_noise("gp_eps", n, (), call, real.device, uniform=True)
            gp = gradient_penalty(self.D, real_aug, fake_aug, eps=eps)
        loss_d = score_fake - score_real + w.gp_lambda * gp
        self.optimize("D", loss_d)
        self.critic_updates += 1
        logs = {
            LOSS_D: float(loss_d.detach()),
            "wasserstein": float((score_real - score_fake).detach()),
            "gp": float(gp.detach()),
        }
        if int(self.critic_updates) % w.n_critic == 0:
            with frozen(self.D):  # only the generator's gradients are needed here
                z = self.batch_noise("z_generator", n, (w.z_dim,), call, real.device)
                with self.autocast():
                    loss_g = -self.D(self.augment(self.G(z), "aug_g", call)).float().mean()
                self.optimize("G", loss_g)
            logs[LOSS_ADV_G] = float(loss_g.detach())
        return logs

    @torch.no_grad()
    def sample(self, n: int, c: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """``n`` volumes [n, 1, S, S, S] from z ~ N(0, I); ``c`` is ignored (unconditional).

        Batch norm runs in eval mode (running statistics), so a volume does not depend on the others drawn with it.
        """
        G = self.G_eval  # noqa: N806 (GAN naming, STYLE.md)
        was_training = G.training
        G.eval()
        try:
            chunk = max(1, self.cfg.eval.batch_size)
            out = []
            for start in range(0, n, chunk):
                m = min(chunk, n - start)
                z = torch.randn(m, self.cfg.wgan.z_dim, generator=generator, device=self._device)
                with self.autocast():
                    out.append(G(z).float())
        finally:
            G.train(was_training)
        return torch.cat(out) if out else torch.empty(0, 1, *(self.cfg.data.size,) * 3, device=self._device)


def param_counts(cfg: Config, size: int = 128) -> dict[str, int]:
    """Parameters per component {"G": ..., "D": ...} at volume size ``size``, built on the meta device (no memory)."""
    cfg = replace(cfg, data=replace(cfg.data, size=size))
    with torch.device("meta"):
        method = WGANGP(cfg)
    return {name: sum(p.numel() for p in module.parameters()) for name, module in method.param_groups().items()}
