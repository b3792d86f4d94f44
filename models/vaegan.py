"""Our method (paper §2) and its Table 2/4 ablations: one 3-D VAE-GAN with switches, registered per row.

Rows (:data:`VARIANTS`), all from :class:`VAEGANMethod`:

======================  =========  ===========  ========  ==========  ===  =================================
key                     separable  adversarial  clinical  perceptual  aux  paper
======================  =========  ===========  ========  ==========  ===  =================================
``vae``                 -          -            -         -           -    Table 2 "3D VAE"
``vaegan``              -          x            -         -           -    Table 2 "3D VAE-GAN"
``xvaegan``             x          x            -         -           -    Table 2 "3D Xception-based VAE-GAN"
``xvaegan_clin``        x          x            x         -           -    Table 2 "+ Clinical conditions"
``ours``                x          x            x         x           x    Table 2 "+ Perceptual loss" (full)
``ours_noaux``          x          x            x         x           -    Table 4 "w/o Cls/Reg loss"
======================  =========  ===========  ========  ==========  ===  =================================

Architecture (paper §2.4, channels at ``cfg.model.width`` = 1, volume S^3, b = S / 8):

- Encoder: four Xception stages of two 3x3x3 convs (separable, or standard for ``vae``/``vaegan``), each followed by
  LeakyReLU(0.2) with its variance-preserving gain (:class:`models.blocks.ScaledLeakyReLU`, used everywhere here),
  64 -> 128 -> 256 -> 512 channels, 3-D max-pooling after the first three (S -> S/8 = b). A 1x1x1 conv then reduces
  512 channels to ``cfg.model.bottleneck_channels`` (r = 2) before the flatten (r b^3), the MLP embedding of c is
  concatenated (clinical rows), and two linear heads give mu_e and log sigma_e^2 (log variances throughout).
  Weights: Xavier uniform (paper §2.5), biases 0, style-affine biases 1.
- Clinical prior p(z|c): an MLP c -> embedding -> (mu_p, log sigma_p^2); N(0, I) for non-clinical rows.
- Decoder: z -> linear -> r x b^3 -> 1x1x1 conv to 512 channels; three stages of upsample x2 (trilinear) ->
  SC (style conv: modulated 1x1x1 channel mixer) -> modulated separable 3x3x3 (sd_c3, mod/demod by w), each followed
  by the scaled LeakyReLU; a final 1x1x1 conv to one channel (linear output: intensities are z-scores). The style w
  comes from a mapping MLP on c (``style_dim``, ``mapping_layers``). Non-clinical rows use plain 1x1x1 and plain 3x3x3
  (separable or standard) convs instead.
- Discriminator: 3-D PatchGAN (Isola et al. 2017): C(64)-C(128)-C(256)-C(512)-C(1), strides 2, 2, 2, 1, 1, LeakyReLU
  0.2, instance norm from the second layer (a batch of 4 volumes is too small for batch statistics, and the real and
  fake halves of one call must not share them); standard 4x4x4 kernels for ``vaegan`` (11.05M at paper width),
  separable 3x3x3 for the Xception rows ("same" padding for the stride-1 layers so 16^3 inputs keep a 2^3 map).
  Clinical rows condition it on c by projection (Miyato & Koyama 2018; ``cfg.model.disc_conditioning``): the patch
  score adds <embed(c), h> / sqrt(C) at every patch, h the last hidden map; ``"concat"`` appends c as 7 constant
  input channels instead. Output: [N, 1, S/8, S/8, S/8] patch scores.

Why the bottleneck (parameter arithmetic at width 1, 128^3, latent k = 256; the paper says "flatten" but its counts
rule out a flatten of the 512 x 16^3 map: 2 heads x 2,097,152 x 256 = 1.07B parameters). With r channels the linear
layers hold 2 (r 4096 + 1) k (encoder heads) + (k + 1) r 4096 (decoder) = 3.15M r; r = 2 gives 6.29M, which with
the convolutions reproduces every Table 2 row within 8% (see :func:`paper_param_counts` and tests/test_vaegan.py):

- ``vae``: encoder 14.05M (standard convs) + 4.19M (heads) + decoder 2.50M + 2.11M (fc) = 22.85M (paper 24.6M, -7%).
- ``vaegan``: + standard PatchGAN 11.05M = 33.90M (paper 35.7M, -5%).
- ``xvaegan``: encoder 0.56M + 4.19M, decoder 0.27M + 2.11M, separable PatchGAN 0.20M = 7.33M (paper 7.9M, -7%).
- ``xvaegan_clin``: + style affines 0.35M, mapping 0.07M, prior 0.04M, encoder c-embedding and wider heads 0.04M,
  projection 4k = 7.83M (paper 8.1M, -3.4%; the paper's +0.2M increment is ours +0.49M).
- ``ours``: + EfficientNet-B0 5.29M (frozen, counted as the paper does) = 13.12M (paper 13.2M, -0.6%).

Training (paper §2.5, Algorithm 1) in :meth:`VAEGANMethod.training_step`: (1) encoder + decoder + prior + mapping
take one Adam step (lr ``lr_g``) on Eq. (2): lambda_rec L1 + lambda_KL KL(q(z|x,c) || p(z|c)) + lambda_adv L_adv(G)
+ lambda_perc L_perc + lambda_cls L_cls + lambda_reg L_reg, where L_cls/L_reg are the frozen heads' losses on the
reconstruction x_hat (and, with ``cfg.model.aux_on_prior``, also on a volume decoded from z ~ p(z|c)); (2) the
discriminator takes one Adam step (lr ``lr_d``) on real x vs x_hat.detach(). DiffAugment (``cfg.data.diffaug_policy``)
transforms every volume D sees, in both steps, as Zhao et al. prescribe (D never sees un-augmented volumes).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from benchmark.config import Config, LossConfig
from benchmark.data.contract import CLINICAL_DIM
from benchmark.registry import METHODS
from models.base import LOSS_ADV_G, LOSS_D, GenerativeMethod, frozen
from models.blocks import (
    GainConv3d,
    ScaledLeakyReLU,
    SeparableConv3d,
    conv3x3x3,
    modulated_conv3x3x3,
    pointwise_conv,
    style_conv,
    with_folded_gain,
    xavier_init_,
)
from models.losses import (
    gan_d_loss,
    gan_g_loss,
    kl_diag_gaussians,
    kl_per_dim,
    l1_reconstruction,
    weighted_total,
)
from models.perceptual import PerceptualLoss, efficientnet_b0_param_counts
from models.template import medoid_volume, nearest_to_mean

STAGE_CHANNELS = (64, 128, 256, 512)  # paper §2.4, at width 1
DISC_CHANNELS = (64, 128, 256, 512)  # PatchGAN ndf = 64 (Isola et al.)
ACTIVE_UNIT_NATS = 0.01  # a latent dimension is "active" when its batch-mean KL(q || p) exceeds this
RESIDUAL_OUT_GAIN = 0.1  # output_template, coarse_path: Xavier gain of a residual's last layer (small, not 0)
WARP_SCALE = 0.1  # template_warp: a unit displacement output moves the template by 0.1 x the half-width
LOGVAR_RANGE = (-30.0, 4.0)  # float32-safe; the cap stops the log-variance head random-walking (DESIGN §9)


@dataclass(frozen=True)
class Variant:
    """The ablation switches of Table 2/4 (see the module docstring for the rows)."""

    separable: bool = True  # Xception separable convs (else standard 3x3x3)
    adversarial: bool = True  # PatchGAN discriminator and L_adv
    clinical: bool = True  # encoder gets c, learned prior p(z|c), style modulation by c, conditional D
    perceptual: bool = True  # L_perc
    aux: bool = True  # L_cls + L_reg through the frozen heads

    def __post_init__(self) -> None:
        if self.aux and not self.clinical:
            raise ValueError("aux (L_cls/L_reg against c) needs a clinical variant")


VARIANTS: dict[str, Variant] = {
    "vae": Variant(separable=False, adversarial=False, clinical=False, perceptual=False, aux=False),
    "vaegan": Variant(separable=False, adversarial=True, clinical=False, perceptual=False, aux=False),
    "xvaegan": Variant(separable=True, adversarial=True, clinical=False, perceptual=False, aux=False),
    "xvaegan_clin": Variant(separable=True, adversarial=True, clinical=True, perceptual=False, aux=False),
    "ours": Variant(separable=True, adversarial=True, clinical=True, perceptual=True, aux=True),
    "ours_noaux": Variant(separable=True, adversarial=True, clinical=True, perceptual=True, aux=False),
}


class ClinicalLossProvider(Protocol):
    """What L_cls/L_reg need from the frozen heads (``models.heads.ClinicalHeads``).

    ``losses(x [N, 1, D, H, W], c [N, 7] standardised, label at index 6) -> {"cls": scalar, "reg": scalar}``,
    differentiable w.r.t. x; ``classifier_maps`` (the classifier's ``feature_maps(x)``, when the resnet3d_aux
    perceptual loss already computed them) spares the classifier's second pass.
    """

    def losses(self, x: Tensor, c: Tensor, classifier_maps: list[Tensor] | None = None) -> dict[str, Tensor]: ...


def _ch(base: int, width: float) -> int:
    return max(1, round(base * width))


def _act() -> nn.Module:
    return ScaledLeakyReLU(0.2)


def _expanding_gain(fan_in: int, fan_out: int) -> float:
    """Xavier gain that gives weight variance 1 / fan_in (signal-preserving) to a layer that widens the signal."""
    return math.sqrt((fan_in + fan_out) / (2.0 * fan_in))


def _check_size(size: int) -> None:
    if size < 16 or size % 8:
        raise ValueError(f"the VAE-GAN needs a volume size that is a multiple of 8 and >= 16, got {size}")


def _run(module: nn.Module, use_checkpoint: bool, *args: Tensor) -> Tensor:
    """``module(*args)``, recomputed in backward instead of stored when gradient checkpointing is on."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class ClinicalEmbedding(nn.Sequential):
    """MLP c [N, 7] -> [N, dim] (two linear layers, LeakyReLU), the "embedded c" of paper Fig. 1-A."""

    def __init__(self, dim: int, clinical_dim: int = CLINICAL_DIM) -> None:
        super().__init__(nn.Linear(clinical_dim, dim), _act(), nn.Linear(dim, dim), _act())
        xavier_init_(self)


class Encoder(nn.Module):
    """q(z | x, c): ``forward(x [N, 1, S, S, S], c [N, 7] | None) -> (mu [N, k], logvar [N, k])``.

    ``embed_dim`` = 0 builds the unconditional encoder (c is ignored).
    """

    def __init__(self, size: int, width: float, latent_dim: int, separable: bool, bottleneck_channels: int,
                 embed_dim: int = 0, grad_checkpoint: bool = False, logvar_init: float = 0.0,
                 coarse_path: bool = False) -> None:
        super().__init__()
        _check_size(size)
        self.grad_checkpoint = grad_checkpoint
        chans = [_ch(c, width) for c in STAGE_CHANNELS]
        stages = []
        cin = 1
        for i, c in enumerate(chans):
            layers = [*with_folded_gain(conv3x3x3(cin, c, separable)), *with_folded_gain(conv3x3x3(c, c, separable))]
            if i < len(chans) - 1:
                layers.append(nn.MaxPool3d(2))
            stages.append(nn.Sequential(*layers))
            cin = c
        self.stages = nn.ModuleList(stages)
        self.bottleneck = nn.Sequential(nn.Conv3d(cin, bottleneck_channels, 1), _act())
        flat = bottleneck_channels * (size // 8) ** 3
        self.embed = ClinicalEmbedding(embed_dim) if embed_dim else None
        self.mu = nn.Linear(flat + embed_dim, latent_dim)
        self.logvar = nn.Linear(flat + embed_dim, latent_dim)
        xavier_init_(self.bottleneck)
        xavier_init_(self.mu)
        xavier_init_(self.logvar)
        with torch.no_grad():
            self.logvar.bias.fill_(logvar_init)
        # coarse_path: mu also reads the volume average-pooled to 1/8 resolution through one linear layer (DESIGN §9)
        self.base = size // 8
        self.coarse = nn.Linear(self.base**3, latent_dim) if coarse_path else None
        if self.coarse is not None:
            xavier_init_(self.coarse)

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = x
        for stage in self.stages:
            h = _run(stage, self.grad_checkpoint and self.training, h)
        h = self.bottleneck(h).flatten(1)
        if self.embed is not None:
            if c is None:
                raise ValueError("this encoder is conditional: pass c [N, 7]")
            h = torch.cat([h, self.embed(c.to(h.dtype))], dim=1)
        mu = self.mu(h)
        if self.coarse is not None:
            mu = mu + self.coarse(F.adaptive_avg_pool3d(x, self.base).flatten(1).to(mu.dtype))
        return mu, self.logvar(h).clamp(*LOGVAR_RANGE)


class ClinicalPrior(nn.Module):
    """Learned prior p(z | c) = N(mu_p(c), exp(logvar_p(c))) (paper §2.4, blocks Prior_mu / Prior_sigma).

    ``forward(c [N, 7]) -> (mu [N, k], logvar [N, k])``: a small MLP reading an embedding of c.
    """

    def __init__(self, latent_dim: int, embed_dim: int, clinical_dim: int = CLINICAL_DIM) -> None:
        super().__init__()
        self.embed = ClinicalEmbedding(embed_dim, clinical_dim)
        self.mu = nn.Linear(embed_dim, latent_dim)
        self.logvar = nn.Linear(embed_dim, latent_dim)
        xavier_init_(self.mu)
        xavier_init_(self.logvar)

    def forward(self, c: Tensor) -> tuple[Tensor, Tensor]:
        e = self.embed(c)
        return self.mu(e), self.logvar(e).clamp(*LOGVAR_RANGE)


class MappingNetwork(nn.Sequential):
    """c [N, 7] -> style w [N, style_dim]: ``layers`` linear layers with LeakyReLU (StyleGAN's mapping, on c)."""

    def __init__(self, style_dim: int, layers: int, clinical_dim: int = CLINICAL_DIM) -> None:
        mods: list[nn.Module] = []
        for i in range(max(1, layers)):
            mods += [nn.Linear(clinical_dim if i == 0 else style_dim, style_dim), _act()]
        super().__init__(*mods)
        xavier_init_(self)


class DecoderStage(nn.Module):
    """upsample x2 -> SC -> sd_c3 (paper §2.4): ``forward(x [N, Cin, s, s, s], w [N, style] | None)`` -> [N, Cout, 2s..]

    With ``style_dim`` None both convs are plain (non-clinical rows).
    """

    def __init__(self, cin: int, cout: int, separable: bool, style_dim: int | None, norm: str = "none") -> None:
        super().__init__()
        if norm not in ("none", "instance"):
            raise ValueError(f"unknown decoder_norm {norm!r}; valid: none, instance")
        self.norm = norm
        self.modulated = style_dim is not None
        if style_dim is not None:
            self.mix: nn.Module = style_conv(cin, cout, style_dim)
            self.conv: nn.Module = modulated_conv3x3x3(cout, cout, style_dim, separable)
        else:
            self.mix = xavier_init_(GainConv3d(cin, cout, 1))
            self.conv = conv3x3x3(cout, cout, separable)
        # ScaledLeakyReLU after both convs, its gain folded into their weights (with_folded_gain)
        with_folded_gain(self.mix)
        self.act = with_folded_gain(self.conv)[1]

    def forward(self, x: Tensor, w: Tensor | None = None) -> Tensor:
        # mix(upsample(x)) == upsample(mix(x)): the 1x1x1 mix (with its per-sample modulation and bias) acts per
        # voxel across channels and trilinear upsampling per channel across voxels with weights summing to 1, so
        # they commute. Mixing first runs the channel mix on 8x fewer voxels and upsamples Cout instead of Cin
        # channels (the paper's order is kept in `forward_reference`; a test checks both agree).
        h = self._norm(self.mix(x, w) if self.modulated else self.mix(x))
        h = F.interpolate(h, scale_factor=2, mode="trilinear", align_corners=False)
        return self.act(self._norm(self.conv(self.act(h), w) if self.modulated else self.conv(self.act(h))))

    def _norm(self, h: Tensor) -> Tensor:
        """Instance normalisation over each channel's voxels (``decoder_norm="instance"``), identity otherwise.

        Mixing first then normalising equals normalising after the upsample up to the upsample's edge effects.
        """
        if self.norm == "none":
            return h
        return F.instance_norm(h)

    def forward_reference(self, x: Tensor, w: Tensor | None = None) -> Tensor:
        """Paper order: upsample x2 -> SC -> sd_c3."""
        h = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
        if self.modulated:
            return self.act(self._norm(self.conv(self.act(self._norm(self.mix(h, w))), w)))
        return self.act(self._norm(self.conv(self.act(self._norm(self.mix(h))))))


class Decoder(nn.Module):
    """g(z, c): ``forward(z [N, k], c [N, 7] | None) -> x_hat [N, 1, S, S, S]``; holds the mapping network c -> w.

    ``style_dim`` None builds the unconditional decoder (c is ignored).
    """

    def __init__(self, size: int, width: float, latent_dim: int, separable: bool, bottleneck_channels: int,
                 style_dim: int | None = None, mapping_layers: int = 2, grad_checkpoint: bool = False,
                 output_template: bool = False, norm: str = "none", template_warp: bool = False,
                 coarse_path: bool = False, noise_input: bool = False) -> None:
        super().__init__()
        _check_size(size)
        self.grad_checkpoint = grad_checkpoint
        self.base = size // 8
        self.bottleneck_channels = bottleneck_channels
        chans = [_ch(c, width) for c in STAGE_CHANNELS]
        self.mapping = MappingNetwork(style_dim, mapping_layers) if style_dim is not None else None
        self.fc = nn.Linear(latent_dim, bottleneck_channels * self.base**3)
        self.expand = nn.Sequential(nn.Conv3d(bottleneck_channels, chans[-1], 1), _act())
        self.stages = nn.ModuleList(
            DecoderStage(chans[i], chans[i - 1], separable, style_dim, norm) for i in range(len(chans) - 1, 0, -1)
        )
        if template_warp and not output_template:
            raise ValueError("model.template_warp needs model.output_template")
        self.warp = template_warp
        self.out = nn.Conv3d(chans[0], 4 if template_warp else 1, 1)
        # noise_input: StyleGAN2's per-voxel noise input (one N(0, 1) map per sample, a learned strength per channel,
        # initialised 0) on the last stage's features, so that the decoder can draw texture z does not determine
        self.noise_strength = nn.Parameter(torch.zeros(chans[0])) if noise_input else None
        # coarse_path: a shallow path z -> 1/8-resolution output channels (residual, and displacement with
        # template_warp), linear in z, added to the conv decoder's output; it learns within tens of steps where the
        # deep path needs thousands (DESIGN §9)
        self.coarse = nn.Linear(latent_dim, self.out.out_channels * self.base**3) if coarse_path else None
        if self.coarse is not None:
            xavier_init_(self.coarse, gain=RESIDUAL_OUT_GAIN)
        # fc (k -> r b^3) and expand (r -> 512) have fan_out >> fan_in, where plain Xavier shrinks the signal by
        # sqrt(2 fan_in / (fan_in + fan_out)) (x0.09 at paper size): their gain makes the variance 1 / fan_in.
        # The fc bias is the decoder's learned constant input (StyleGAN's "const"), initialised N(0, 1/2) with the
        # z path scaled to variance 1/2 too: a zero bias made the decoder positively homogeneous in z (every bias 0,
        # LeakyReLU), so all of its output energy, the mean brain included, had to come from |z|; it then decoded
        # a posterior mean near 0 to a blank volume and the prior's z's (norm ~sqrt(k)) to the mean brain.
        xavier_init_(self.fc, gain=_expanding_gain(latent_dim, self.fc.out_features) * math.sqrt(0.5))
        with torch.no_grad():
            self.fc.bias.normal_(0.0, math.sqrt(0.5))
        xavier_init_(self.expand, gain=_expanding_gain(bottleneck_channels, chans[-1]))
        xavier_init_(self.out)
        # Optional per-voxel output template (cfg.model.output_template): x_hat = template + g(z, c), a buffer set by
        # VAEGANMethod. model.template="mean": the running mean of the training volumes seen so far (like batch
        # norm's running statistics; a per-voxel parameter initialised to the first batch's mean stayed a 4-subject
        # mean, whose SSIM to test volumes is below the population mean's); "medoid": the training subject nearest
        # to the training mean, fixed (sharp, where the mean is blurred: DESIGN §9 "A sharp template").
        self.register_buffer("template", torch.zeros(1, 1, size, size, size) if output_template else None)
        if output_template:
            self.register_buffer("template_count", torch.zeros(()))
        if template_warp:
            eye = torch.eye(3, 4).unsqueeze(0)
            self.register_buffer("grid", F.affine_grid(eye, [1, 1, size, size, size], align_corners=False),
                                 persistent=False)
        if output_template:
            # The residual starts small: a full-size random residual on top of the template would first be unlearned
            # by shrinking the output weights, which cuts z out of the decoder (posterior collapse); a zero output
            # layer passes no gradient upstream, so the features never learn to depend on z (with the warp, the
            # output weights stayed at ~1e-3 for 250 steps) and every sample equals the template at first. A small
            # random one (Xavier x 0.1) starts the residual near 0 and the warp near identity.
            xavier_init_(self.out, gain=RESIDUAL_OUT_GAIN)

    def forward(self, z: Tensor, c: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
        """``noise`` [N, 1, S, S, S]: the noise input's draw (``model.decoder_noise``); None = no noise (the
        deterministic reconstruction)."""
        w = None
        if self.mapping is not None:
            if c is None:
                raise ValueError("this decoder is conditional: pass c [N, 7]")
            w = self.mapping(c.to(z.dtype))
        h = self.fc(z).view(z.shape[0], self.bottleneck_channels, self.base, self.base, self.base)
        h = self.expand(h)
        for stage in self.stages:
            use = self.grad_checkpoint and self.training
            h = _run(stage, use, h, w) if w is not None else _run(stage, use, h)
        if self.noise_strength is not None and noise is not None:
            h = h + noise.to(h.dtype) * self.noise_strength.view(1, -1, 1, 1, 1).to(h.dtype)
        out = pointwise_conv(h, self.out)
        if self.coarse is not None:
            coarse = self.coarse(z).view(z.shape[0], -1, self.base, self.base, self.base)
            out = out + F.interpolate(coarse, size=out.shape[2:], mode="trilinear", align_corners=False)
        if self.template is None:
            return out
        template = self.template.to(out.dtype)
        if not self.warp:
            return out + template
        # Deformable template: smooth warps of a sharp template keep its edges (ventricles, grey/white boundary),
        # where a decoder that learns for a few hundred steps draws only smooth blobs (DESIGN §9).
        disp = out[:, 1:].permute(0, 2, 3, 4, 1).flip(-1) * WARP_SCALE  # (x, y, z) = (W, H, D) order
        warped = F.grid_sample(template.expand(out.shape[0], -1, -1, -1, -1), self.grid.to(out.dtype) + disp,
                               mode="bilinear", padding_mode="border", align_corners=False)
        return out[:, :1] + warped


class PatchDiscriminator(nn.Module):
    """3-D PatchGAN (Isola et al. 2017): ``forward(x [N, 1, S, S, S], c [N, 7] | None) -> [N, 1, S/8, S/8, S/8]``.

    ``clinical_dim`` = 0 builds the unconditional discriminator; otherwise ``conditioning`` is ``"projection"``
    (Miyato & Koyama 2018) or ``"concat"`` (c as constant input channels).
    """

    def __init__(self, separable: bool, width: float = 1.0, clinical_dim: int = 0,
                 conditioning: str = "projection") -> None:
        super().__init__()
        if conditioning not in ("projection", "concat"):
            raise ValueError(f"unknown disc_conditioning {conditioning!r}; valid: projection, concat")
        self.clinical_dim = clinical_dim
        self.conditioning = conditioning if clinical_dim else "none"
        c0, c1, c2, c3 = (_ch(c, width) for c in DISC_CHANNELS)
        cin = 1 + (clinical_dim if self.conditioning == "concat" else 0)

        def conv(a: int, b: int, stride: int, bias: bool) -> nn.Module:
            if separable:
                return SeparableConv3d(a, b, 3, stride=stride, bias=bias)
            # 4x4x4 as in pix2pix; padding 1 halves even sizes at stride 2; at stride 1 an explicit (1, 2) pad keeps
            # the size ("same"), so 16^3 inputs still give a 2^3 map (pix2pix's padding 1 would shrink it to 0).
            if stride == 2:
                return xavier_init_(GainConv3d(a, b, 4, stride=2, padding=1, bias=bias))
            return nn.Sequential(nn.ConstantPad3d((1, 2) * 3, 0.0), xavier_init_(nn.Conv3d(a, b, 4, bias=bias)))

        self.body = nn.Sequential(
            *with_folded_gain(conv(cin, c0, 2, True)),  # the largest activation; the others follow a norm
            conv(c0, c1, 2, False), nn.InstanceNorm3d(c1, affine=True), _act(),
            conv(c1, c2, 2, False), nn.InstanceNorm3d(c2, affine=True), _act(),
            conv(c2, c3, 1, False), nn.InstanceNorm3d(c3, affine=True), _act(),
        )
        self.head = conv(c3, 1, 1, True)
        self.embed = nn.Linear(clinical_dim, c3, bias=False) if self.conditioning == "projection" else None
        if self.embed is not None:
            xavier_init_(self.embed)

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        if self.conditioning != "none" and c is None:
            raise ValueError("this discriminator is conditional: pass c [N, 7]")
        if self.conditioning == "concat":
            x = torch.cat([x, c.to(x.dtype)[:, :, None, None, None].expand(-1, -1, *x.shape[2:])], dim=1)
        h = self.body(x)
        out = self.head(h)
        if self.embed is not None:
            e = self.embed(c.to(h.dtype))[:, :, None, None, None]
            out = out + (e * h).sum(dim=1, keepdim=True) / math.sqrt(h.shape[1])
        return out


class VAEGenerator(nn.Module):
    """Everything trained with the generator's optimizer: encoder, decoder (with its mapping), prior (or None)."""

    def __init__(self, encoder: Encoder, decoder: Decoder, prior: ClinicalPrior | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.prior = prior

    def prior_params(self, c: Tensor | None, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(mu_p, logvar_p) [n, k]: p(z|c) for clinical rows, N(0, I) (zeros) otherwise."""
        if self.prior is not None:
            if c is None:
                raise ValueError("the clinical prior needs c [N, 7]")
            return self.prior(c.to(like.dtype))
        zeros = like.new_zeros(n, self.decoder.fc.in_features)
        return zeros, zeros


def build_generator(cfg: Config, variant: Variant) -> VAEGenerator:
    """Encoder, decoder and prior of ``variant`` at ``cfg.data.size`` and ``cfg.model`` widths."""
    m, size = cfg.model, cfg.data.size
    embed = m.clinical_embed_dim if variant.clinical else 0
    encoder = Encoder(size, m.width, m.latent_dim, variant.separable, m.bottleneck_channels, embed,
                      m.grad_checkpoint, m.encoder_logvar_init, m.coarse_path)
    decoder = Decoder(size, m.width, m.latent_dim, variant.separable, m.bottleneck_channels,
                      m.style_dim if variant.clinical else None, m.mapping_layers, m.grad_checkpoint,
                      m.output_template, m.decoder_norm, m.template_warp, m.coarse_path, m.decoder_noise)
    prior = ClinicalPrior(m.latent_dim, m.clinical_embed_dim) if variant.clinical else None
    return VAEGenerator(encoder, decoder, prior)


def build_discriminator(cfg: Config, variant: Variant) -> PatchDiscriminator:
    return PatchDiscriminator(variant.separable, cfg.model.disc_width, CLINICAL_DIM if variant.clinical else 0,
                              cfg.model.disc_conditioning)


class VAEGANMethod(GenerativeMethod):
    """The clinically conditioned 3-D VAE-GAN; subclasses pick a :class:`Variant` (one per Table 2/4 row).

    Args:
        cfg: resolved configuration (``model``, ``loss``, ``train`` sections; ``data.size``).
        heads: frozen clinical heads, needed for ``aux`` (L_cls/L_reg, :class:`ClinicalLossProvider`) and for
            ``perceptual_backbone="resnet3d_aux"`` (:class:`models.perceptual.FeatureMapsProvider`). Not
            registered as a submodule: they stay out of this method's state_dict, optimizers and ``.to()``.
    """

    variant: ClassVar[Variant] = VARIANTS["ours"]
    conditional = True
    has_encoder = True

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.conditional = cls.variant.clinical

    def __init__(self, cfg: Config, heads: object | None = None) -> None:
        super().__init__(cfg)
        v = self.variant
        name = cfg.method if cfg.method in VARIANTS else type(self).__name__
        if v.aux and heads is None:
            raise ValueError(f"{name} needs the frozen clinical heads for L_cls/L_reg (heads=None given)")
        if v.perceptual and cfg.model.perceptual_backbone == "resnet3d_aux" and heads is None:
            raise ValueError(f"{name} with perceptual_backbone=resnet3d_aux needs the frozen clinical heads "
                             f"(heads=None given)")
        object.__setattr__(self, "_heads", heads)
        # Initial weights are a pure function of (config, seed), whatever the caller's RNG went through before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            self.G = build_generator(cfg, v)
            if v.adversarial:
                self.D = build_discriminator(cfg, v)
        perceptual = None
        if v.perceptual:
            perceptual = PerceptualLoss(cfg.model.perceptual_backbone, cfg.model.perceptual_slices, heads)
        object.__setattr__(self, "_perceptual", perceptual)  # frozen: outside the module tree, like the heads

    # --- protocol ---------------------------------------------------------------------------------------------
    @property
    def perceptual(self) -> PerceptualLoss | None:
        """The L_perc module (its ``backbone_name`` is what the harness logs), or None for rows without it."""
        return self._perceptual

    @property
    def _device(self) -> torch.device:
        return next(self.G.parameters()).device

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """``G``: encoder, decoder, mapping and prior at ``lr_g``; ``D`` at ``lr_d``; Adam(beta1, beta2) (§2.5)."""
        t = self.cfg.train
        opts = {"G": torch.optim.Adam(self.G.parameters(), lr=t.lr_g, betas=(t.beta1, t.beta2))}
        if self.variant.adversarial:
            opts["D"] = torch.optim.Adam(self.D.parameters(), lr=t.lr_d, betas=(t.beta1, t.beta2))
        return opts

    def param_groups(self) -> dict[str, nn.Module]:
        """encoder, decoder (with the mapping network), prior, discriminator: the same four keys for every row.

        A row without a prior (N(0, I)) or without a discriminator gets an empty module there (0 parameters), so the
        Table 2 rows share their columns. The frozen perceptual network is not a trained component:
        :meth:`frozen_param_counts` and :func:`paper_param_counts` add it the way the paper's Table 2 does.
        """
        return {"encoder": self.G.encoder, "decoder": self.G.decoder,
                "prior": self.G.prior if self.G.prior is not None else nn.Module(),
                "discriminator": self.D if self.variant.adversarial else nn.Module()}

    def frozen_param_counts(self) -> dict[str, int]:
        """Frozen networks that paper Table 2 counts in "#Parameters": ``{"perceptual": 5288548}`` for EfficientNet-B0.

        The whole classifier, as in "EfficientNet-B0, 5.3M" (its +5.1M step from row 4 to row 5); empty for rows
        without L_perc and for ``resnet3d_aux`` (that network is the heads', which the paper does not count).
        """
        p = self._perceptual
        return {"perceptual": p.paper_param_count} if p is not None and p.paper_param_count else {}

    def frozen_modules(self) -> Iterator[nn.Module]:
        """The frozen heads and perceptual network (not trained here, not in this method's state_dict)."""
        mods = [m for m in (self._heads, self._perceptual) if isinstance(m, nn.Module)]
        return iter(mods)

    def _cond(self, c: Tensor | None, n: int) -> Tensor | None:
        if not self.variant.clinical:
            return None
        if c is None or c.shape[0] != n:
            raise ValueError(f"{type(self).__name__} is conditional: pass c [{n}, {CLINICAL_DIM}]")
        return c.to(self._device)

    @torch.no_grad()
    def _init_output_bias(self, x: Tensor) -> None:
        """Data-dependent init: the decoder's output bias := the mean intensity of the first batch (all ranks).

        Volumes are z-scored inside the brain, so their mean is far from 0 (about -3: the background holds -4.6)
        while a freshly initialised decoder outputs values around 0. Adam moves a bias by at most ~lr per step, so
        the offset cannot come from the biases within a short budget; the network then builds it from the energy
        of z (it is positively homogeneous in z when the biases are 0), and decodes z = 0, the mean of a collapsed
        posterior, to about 0: the collapsed ``vae`` reconstructed from the posterior mean to values in [-0.9, -0.1]
        for data in [-4.6, 2.3]. Starting at the data's mean removes that need (the "init the last bias to the
        data mean" recipe). A resumed run (step > 0) never re-initialises.
        """
        from benchmark.dist import all_reduce_mean

        decoders = [self.G.decoder] + ([self.ema.module.decoder] if self.ema is not None else [])
        if decoders[0].template is not None:
            return  # the template is the running mean of the training volumes (_update_template)
        mean = all_reduce_mean(float(x.float().mean()), x.device)
        for d in decoders:
            d.out.bias.fill_(mean)

    @torch.no_grad()
    def init_from_data(self, train: Any) -> None:
        """``model.template = "medoid"``: the template is the training subject nearest to the training mean."""
        if self.G.decoder.template is not None and self.cfg.model.template == "medoid":
            self._set_template(medoid_volume(train).to(self.G.decoder.template))

    def _set_template(self, volume: Tensor) -> None:
        for d in [self.G.decoder] + ([self.ema.module.decoder] if self.ema is not None else []):
            d.template.copy_(volume)
            d.template_count.fill_(1)

    @torch.no_grad()
    def _update_template(self, x: Tensor) -> None:
        """``model.output_template``: fold the (global) batch into the running mean volume of the decoders; with
        ``model.template = "medoid"`` the template is fixed (by :meth:`init_from_data`, or, when that was not
        called, the first batch's volume nearest to its mean)."""
        from benchmark.dist import broadcast_tensor, world_size

        if self.cfg.model.template == "medoid":
            if float(self.G.decoder.template_count) == 0:
                self._set_template(broadcast_tensor(nearest_to_mean(x.float())))
            return
        volume = x.float().sum(0, keepdim=True)
        n = torch.tensor(float(x.shape[0]), device=x.device)
        if world_size() > 1:
            torch.distributed.all_reduce(volume)
            torch.distributed.all_reduce(n)
        decoders = [self.G.decoder] + ([self.ema.module.decoder] if self.ema is not None else [])
        for d in decoders:
            d.template_count += n
            d.template += (volume / n - d.template) * (n / d.template_count)

    def _loss_weights(self, step: int) -> LossConfig:
        """``cfg.loss`` with lambda_KL ramped linearly over ``loss.kl_warmup_volumes`` (volumes seen so far)."""
        w = self.cfg.loss
        if w.kl_warmup_volumes <= 0:
            return w
        seen = step * self.cfg.train.batch_size
        return replace(w, kl=w.kl * min(1.0, seen / w.kl_warmup_volumes))

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, float]:
        """Algorithm 1 on ``batch`` (x [N,1,S,S,S], c [N,7]): one G step on Eq. (2), then one D step.

        ``step`` seeds the reparameterisation noise (with ``train.seed``), so resumed runs replay it.

        Returns float losses: loss_rec, loss_kl, loss_g_total always; loss_adv_g and loss_D (adversarial rows),
        loss_perc (perceptual rows), loss_cls and loss_reg (aux rows) where they apply.
        """
        x = batch["x"]
        n = x.shape[0]
        c = self._cond(batch.get("c"), n)
        v, m = self.variant, self.cfg.model
        if step == 0:
            self._init_output_bias(x)
        if self.G.decoder.template is not None:
            self._update_template(x)
        weights = self._loss_weights(step)
        # The G step needs gradients w.r.t. x_hat only.
        with frozen(self.D) if v.adversarial else contextlib.nullcontext(), self.autocast():
            mu_q, logvar_q = self.G.encoder(x, c)
            # Noise as a slice of the global batch's (base.batch_noise): k ranks reproduce one process exactly.
            k = mu_q.shape[1]
            eps = self.batch_noise("posterior", n, (k,), step, x.device).to(mu_q.dtype)
            z = mu_q + torch.exp(0.5 * logvar_q) * eps
            x_hat = self.G.decoder(z, c, self._decoder_noise("decoder_noise", n, step, x.device))
            mu_p, logvar_p = self.G.prior_params(c, n, mu_q)
            terms = {"rec": l1_reconstruction(x_hat, x),
                     "kl": kl_diag_gaussians(mu_q, logvar_q, mu_p, logvar_p, self.cfg.loss.kl_reduction)}
            if v.adversarial:
                terms["adv"] = gan_g_loss(self.D(self.augment(x_hat, "aug_g", step), c), m.adv_loss)
            # resnet3d_aux runs the frozen classifier on x_hat, as L_cls does: one pass serves both (exact).
            shared = (v.perceptual and v.aux and not m.aux_on_prior
                      and self._perceptual.backbone_name == "resnet3d_aux")
            fake_maps = self._heads.feature_maps(x_hat) if shared else None
            if v.perceptual:
                terms["perc"] = self._perceptual(x_hat, x, fake_maps=fake_maps)
            if v.aux:
                aux_x, aux_c = x_hat, c
                if m.aux_on_prior:
                    eps_p = self.batch_noise("prior", n, (k,), step, x.device).to(mu_p.dtype)
                    z_p = mu_p + torch.exp(0.5 * logvar_p) * eps_p
                    z_noise = self._decoder_noise("decoder_noise_prior", n, step, x.device)
                    aux_x, aux_c = torch.cat([x_hat, self.G.decoder(z_p, c, z_noise)]), torch.cat([c, c])
                aux = self._heads.losses(aux_x, aux_c, classifier_maps=fake_maps)
                terms["cls"], terms["reg"] = aux["cls"], aux["reg"]
            total = weighted_total(terms, weights)
        self.optimize("G", total, self.cfg.train.grad_clip)
        logs = {(LOSS_ADV_G if k == "adv" else "loss_" + k): float(t.detach()) for k, t in terms.items()}
        logs["loss_g_total"] = float(total.detach())
        if v.adversarial:
            with self.autocast():
                # One call for real and fake: instance norm has no batch statistics, so this equals two calls.
                both = torch.cat([self.augment(x, "aug_real", step), self.augment(x_hat.detach(), "aug_fake", step)])
                scores = self.D(both, None if c is None else torch.cat([c, c]))
                loss_d = gan_d_loss(scores[:n], scores[n:], m.adv_loss)
            self.optimize("D", loss_d, self.cfg.train.grad_clip)
            logs[LOSS_D] = float(loss_d.detach())
        return logs

    def _decoder_noise(self, kind: str, n: int, step: int, device: torch.device) -> Tensor | None:
        """The decoder's noise input for this step (``model.decoder_noise``), a slice of the global batch's draw."""
        if not self.cfg.model.decoder_noise:
            return None
        return self.batch_noise(kind, n, (1, *(self.cfg.data.size,) * 3), step, device, on_device=True)

    @torch.no_grad()
    def sample(self, n: int, c: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Algorithm 3: z ~ p(z|c) = N(mu_p(c), sigma_p(c)^2) (N(0, I) for non-clinical rows), x = g(z, c).

        Args:
            n: number of volumes.
            c: [n, 7] standardised clinical vectors (clinical rows; ignored otherwise).
            generator: RNG for z (on its own device; z is moved to the model's).
        Returns:
            [n, 1, S, S, S] float32, from ``G_eval`` (the EMA copy when there is one).
        """
        G = self.G_eval  # noqa: N806 (GAN naming, STYLE.md)
        c = self._cond(c, n)
        device = self._device
        chunk = max(1, self.cfg.eval.batch_size)
        out = []
        for start in range(0, n, chunk):
            cc = None if c is None else c[start : start + chunk]
            m = min(chunk, n - start)
            eps = torch.randn(m, self.cfg.model.latent_dim, generator=generator,
                              device=generator.device if generator is not None else device).to(device)
            with self.autocast():
                mu_p, logvar_p = G.prior_params(cc, m, eps)
                z = mu_p + torch.exp(0.5 * logvar_p) * eps
                noise = None
                if self.cfg.model.decoder_noise:
                    size = (m, 1, *(self.cfg.data.size,) * 3)
                    noise = torch.randn(size, generator=generator,
                                        device=generator.device if generator is not None else device).to(device)
                out.append(G.decoder(z, cc, noise).float())
        return torch.cat(out) if out else torch.empty(0, 1, *(self.cfg.data.size,) * 3, device=device)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        """x [N,1,S,S,S], c [N,7] -> g(mu_e(x, c), c) [N,1,S,S,S]: the posterior mean, so it is deterministic."""
        G = self.G_eval  # noqa: N806
        c = self._cond(c, x.shape[0])
        with self.autocast():
            mu, _ = G.encoder(x, c)
            return G.decoder(mu, c).float()

    @torch.no_grad()
    def validation_losses(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """Posterior health on a held-out batch.

        ``val_l1``: L1 of the posterior-MEAN reconstruction (what evaluation pairs); ``val_l1_sample``: L1 of the
        reconstruction from one posterior sample (far below ``val_l1`` means the decoder only works on z's of the
        prior's norm: posterior collapse); ``val_kl``: KL(q || p) summed over latent dimensions; ``active_units``:
        latent dimensions whose KL, averaged over the batch, exceeds :data:`ACTIVE_UNIT_NATS` (0 = collapse).
        """
        x = batch["x"]
        G = self.G_eval  # noqa: N806
        c = self._cond(batch.get("c"), x.shape[0])
        with self.autocast():
            mu_q, logvar_q = G.encoder(x, c)
            x_hat = G.decoder(mu_q, c)
            eps = torch.randn(mu_q.shape, generator=torch.Generator().manual_seed(0)).to(mu_q)
            x_sample = G.decoder(mu_q + torch.exp(0.5 * logvar_q) * eps, c)
            mu_p, logvar_p = G.prior_params(c, x.shape[0], mu_q)
        per_dim = kl_per_dim(mu_q, logvar_q, mu_p, logvar_p).mean(0)
        return {"val_l1": float(l1_reconstruction(x_hat, x)),
                "val_l1_sample": float(l1_reconstruction(x_sample, x)),
                "val_kl": float(per_dim.sum()),
                "active_units": float((per_dim > ACTIVE_UNIT_NATS).sum())}


@METHODS.register("vae")
class VAE3D(VAEGANMethod):
    """3D VAE: standard 3x3x3 convs, KL to N(0, I), L1 + KL only (paper Table 2 row 1)."""

    variant = VARIANTS["vae"]


@METHODS.register("vaegan")
class VAEGAN3D(VAEGANMethod):
    """3D VAE-GAN: standard convs + standard 4x4x4 PatchGAN (paper Table 2 row 2)."""

    variant = VARIANTS["vaegan"]


@METHODS.register("xvaegan")
class XceptionVAEGAN(VAEGANMethod):
    """3D Xception-based VAE-GAN: separable convs + separable PatchGAN (paper Table 2 row 3)."""

    variant = VARIANTS["xvaegan"]


@METHODS.register("xvaegan_clin")
class XceptionVAEGANClinical(VAEGANMethod):
    """+ clinical conditions: encoder sees c, learned prior p(z|c), style modulation by c, conditional D (row 4)."""

    variant = VARIANTS["xvaegan_clin"]


@METHODS.register("ours")
class ClinicalVAEGAN(VAEGANMethod):
    """Ours (full): + perceptual loss + frozen-head L_cls/L_reg (paper Table 2 row 5)."""

    variant = VARIANTS["ours"]


@METHODS.register("ours_noaux")
class ClinicalVAEGANNoAux(VAEGANMethod):
    """Ours without L_cls/L_reg (paper Table 4, "w/o Cls/Reg loss")."""

    variant = VARIANTS["ours_noaux"]


def paper_param_counts(cfg: Config, size: int = 128, method: str | None = None) -> dict[str, int]:
    """Parameters per component, counted as paper Table 2 does, built on the meta device (no memory, no weights).

    Args:
        cfg: configuration (widths from ``cfg.model``; pass the ``paper`` preset or width 1 for the paper's numbers).
        size: volume size S.
        method: a key of :data:`VARIANTS` (default ``cfg.method``).
    Returns:
        ``encoder``, ``decoder`` (with mapping), ``prior``, ``discriminator``, ``perceptual`` (the frozen
        EfficientNet-B0 as a whole, 0 for ``resnet3d_aux`` whose network is the heads'), ``generator`` (encoder +
        decoder + prior) and ``total`` = generator + discriminator + perceptual (the paper's sense).
    """
    name = method or cfg.method
    if name not in VARIANTS:
        raise KeyError(f"unknown VAE-GAN variant {name!r}; valid: {', '.join(VARIANTS)}")
    variant = VARIANTS[name]
    cfg = replace(cfg, data=replace(cfg.data, size=size))

    def count(module: nn.Module | None) -> int:
        return 0 if module is None else sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        G = build_generator(cfg, variant)  # noqa: N806
        D = build_discriminator(cfg, variant) if variant.adversarial else None  # noqa: N806
    perceptual = 0
    if variant.perceptual and cfg.model.perceptual_backbone == "efficientnet_b0":
        perceptual = efficientnet_b0_param_counts()["full"]
    out = {"encoder": count(G.encoder), "decoder": count(G.decoder), "prior": count(G.prior),
           "discriminator": count(D), "perceptual": perceptual}
    out["generator"] = out["encoder"] + out["decoder"] + out["prior"]
    out["total"] = out["generator"] + out["discriminator"] + out["perceptual"]
    return out
