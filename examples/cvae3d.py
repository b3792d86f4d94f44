"""A conditional 3-D VAE as an out-of-tree method: the whole plugin (docs/METHODS.md walks through it).

    python -m benchmark run --suite table3 --plugin examples/cvae3d.py --methods +cvae3d

x [N,1,S,S,S] -> three stride-2 convs -> 1x1x1 bottleneck -> [features, c] -> (mu, log sigma^2); decoder
[z, c] -> the mirror image. Loss: lambda_rec L1 + lambda_KL KL (mean over latent dimensions) and, with the frozen
heads the harness hands over, lambda_cls L_cls + lambda_reg L_reg on the reconstruction. The weights are the
config's ``loss.*`` keys, so ``--set loss.kl=0.05`` and ``tune --method cvae3d`` act on them as on the built-in rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.config import SIZE_RULES, Config, SizeRule
from benchmark.dist import world_size
from benchmark.registry import METHODS
from models.base import GenerativeMethod

CLINICAL_DIM = 7  # six standardised ROI ratios + the AD/CN label (DESIGN §4)
SIZE_RULES["cvae3d"] = SizeRule(16, multiple=8, why="three stride-2 stages down to S/8")  # checked before data


def _conv_stack(widths: list[int], transpose: bool) -> nn.Sequential:
    conv = nn.ConvTranspose3d if transpose else nn.Conv3d
    layers: list[nn.Module] = []
    for i, (cin, cout) in enumerate(zip(widths, widths[1:], strict=False)):
        layers.append(conv(cin, cout, 4, 2, 1))
        if i < len(widths) - 2 or not transpose:  # the decoder's last layer is linear (z-scored intensities)
            layers += [nn.GroupNorm(1, cout), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    def __init__(self, size: int, ch: int, latent: int, bottleneck: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(_conv_stack([1, ch, 2 * ch, 4 * ch], transpose=False),
                                   nn.Conv3d(4 * ch, bottleneck, 1))
        self.heads = nn.Linear(bottleneck * (size // 8) ** 3 + CLINICAL_DIM, 2 * latent)

    def forward(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.heads(torch.cat([self.convs(x).flatten(1), c], 1)).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 4.0)  # exp() stays finite; sigma <= e^2 (DESIGN §9, posterior collapse)


class Decoder(nn.Module):
    def __init__(self, size: int, ch: int, latent: int, bottleneck: int) -> None:
        super().__init__()
        self.shape = (bottleneck, size // 8, size // 8, size // 8)
        self.fc = nn.Linear(latent + CLINICAL_DIM, bottleneck * (size // 8) ** 3)
        self.convs = nn.Sequential(nn.Conv3d(bottleneck, 4 * ch, 1), nn.LeakyReLU(0.2),
                                   _conv_stack([4 * ch, 2 * ch, ch, 1], transpose=True))
        # x_hat = a learned mean volume + the decoded residual: set to the first batch's mean volume on step 0
        # (volumes are z-scored inside the brain, background ~ -4.6, while a fresh decoder outputs ~0).
        self.template = nn.Parameter(torch.zeros(1, 1, size, size, size))

    def forward(self, z: Tensor, c: Tensor) -> Tensor:
        return self.template + self.convs(self.fc(torch.cat([z, c], 1)).view(-1, *self.shape))


@METHODS.register("cvae3d")
class ConditionalVAE3d(GenerativeMethod):
    """Conditional 3-D VAE (examples/cvae3d.py): L1 + KL, plus L_cls/L_reg through the frozen heads."""

    conditional = True
    has_encoder = True

    def __init__(self, cfg: Config, heads: object | None = None) -> None:
        super().__init__(cfg)
        m, size = cfg.model, cfg.data.size
        ch = max(4, round(64 * m.width))
        self.E = Encoder(size, ch, m.latent_dim, m.bottleneck_channels)
        self.G = Decoder(size, ch, m.latent_dim, m.bottleneck_channels)  # self.G: what EMA averages and samples
        object.__setattr__(self, "_heads", heads)  # frozen, shared, outside this module's state_dict

    def param_groups(self) -> dict[str, nn.Module]:
        return {"encoder": self.E, "decoder": self.G}

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        t = self.cfg.train
        params = [*self.E.parameters(), *self.G.parameters()]
        return {"G": torch.optim.Adam(params, lr=t.lr_g, betas=(t.beta1, t.beta2))}

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, float]:
        x, c = batch["x"], batch["c"]
        if step == 0:  # data-dependent init (a resumed run starts later and keeps its trained template)
            with torch.no_grad():
                mean = x.mean(0, keepdim=True)
                if world_size() > 1:
                    torch.distributed.all_reduce(mean)  # the global batch's mean volume, the same on every rank
                    mean /= world_size()
                for g in [self.G] + ([self.ema.module] if self.ema is not None else []):
                    g.template.copy_(mean)
        with self.autocast():
            mu, logvar = self.E(x, c)
            eps = self.batch_noise("posterior", x.shape[0], (mu.shape[1],), step, x.device)  # never torch.randn
            x_hat = self.G(mu + eps * (0.5 * logvar).exp(), c).float()
        w = self.cfg.loss
        terms = {"rec": F.l1_loss(x_hat, x), "kl": 0.5 * (mu.square() + logvar.exp() - 1 - logvar).float().mean()}
        heads = self._heads
        if heads is not None and (w.cls or w.reg):  # gradients flow through the frozen heads into x_hat only
            dev = next(heads.parameters()).device
            terms.update({k: v.to(x.device) for k, v in heads.losses(x_hat.to(dev), c.to(dev)).items()})
        loss = sum(getattr(w, k) * v for k, v in terms.items())
        self.optimize("G", loss, clip=self.cfg.train.grad_clip or None)  # backward, all-reduce, clip, step
        return {"loss_total": float(loss.detach()), **{f"loss_{k}": float(v.detach()) for k, v in terms.items()}}

    @torch.no_grad()
    def sample(self, n: int, c: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        if c is None or c.shape[0] != n:
            raise ValueError(f"cvae3d is conditional: pass c [{n}, {CLINICAL_DIM}]")
        device = next(self.G.parameters()).device
        z = torch.randn(n, self.cfg.model.latent_dim, generator=generator).to(device)  # the caller's generator
        return self.G_eval(z, c.to(device)).float()

    @torch.no_grad()
    def reconstruct(self, x: Tensor, c: Tensor) -> Tensor:
        return self.G_eval(self.E(x, c)[0], c).float()

    @torch.no_grad()
    def validation_losses(self, batch: dict[str, Tensor]) -> dict[str, float]:
        return {"val_l1": float(F.l1_loss(self.reconstruct(batch["x"], batch["c"]), batch["x"]))}
