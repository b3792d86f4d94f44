"""3D-StyleGAN2 baseline (paper Table 3): Hong et al. (2021) 3D-StyleGAN, after Karras et al. (2020) StyleGAN2.

Recipe (StyleGAN2 config F as in NVlabs' stylegan2-ada-pytorch, in 3-D):

- Mapping: z normalised to unit second moment, ``cfg.stylegan.mapping_layers`` (8) fully connected layers,
  lrelu(0.2) x sqrt(2), learning-rate multiplier ``mapping_lr_mult`` (0.01).
- Equalised learning rate everywhere: weights stored N(0, 1) / lr_mul and scaled at run time by
  lr_mul / sqrt(fan_in); biases scaled by lr_mul.
- Synthesis: learned constant 4^3 input; per resolution [upsample -> modulated 3^3 conv] and a modulated 3^3 conv,
  each with a per-layer noise input (learned per-channel strength, initialised 0) and bias + lrelu(0.2) x sqrt(2);
  the modulation/demodulation is :func:`models.blocks.modulated_conv3d` (shared with our model). Skip architecture:
  a toRGB (modulated 1^3 conv, no demodulation) at each resolution, the running volume upsampled and summed.
- Discriminator: residual (fromRGB at S^3 only), blocks [3^3 conv, 3^3 conv down] + [1^3 conv down] skip, both
  scaled by sqrt(1/2); epilogue with the minibatch standard-deviation layer (group min(4, N), one channel),
  3^3 conv, fully connected, score.
- Loss: non-saturating logistic; R1 on reals (gamma = ``r1_gamma``, 10) every 16 D steps; path-length
  regularisation (weight 2, decay 0.01, batch N // 2) every 4 G steps; lazy terms scaled by their interval and
  Adam's lr / betas corrected by mb_ratio = interval / (interval + 1). ``lazy_reg=False`` applies both every step.
  Style mixing with probability 0.9 (config F). DiffAugment with the suite's policy on every D input; R1 is
  taken w.r.t. the real volumes before augmentation, through the differentiable DiffAugment (as Zhao et al. and
  StyleGAN2-ADA do).
- EMA generator with a half-life in volumes seen: beta = 0.5 ** (volumes / ``ema_halflife_volumes``).

Choices where 2-D StyleGAN2 does not carry over or the papers are silent:

- Resampling: upsampling is trilinear x2 (align_corners=False, which is the [1, 3, 3, 1] / 4 filter per axis, i.e.
  StyleGAN2's FIR up-filter up to border handling) before a stride-1 conv, instead of a transposed conv + FIR blur;
  downsampling is a 2^3 average pool (the [1, 1] box filter) before the conv, instead of FIR blur + stride-2 conv:
  8x fewer voxels in the conv, which matters on CPU.
- Every modulated layer (toRGB included) gets its own w index, so num_ws = 3 * blocks - 1 (2-D StyleGAN2 lets a
  toRGB share the next conv's w); style mixing cuts over that list.
- Minibatch std: when N is not a multiple of 4, the largest group size <= 4 that divides N. Groups form within a
  rank's batch (StyleGAN2-ADA's per-GPU groups), the one way a k-process run differs from a one-process run.
- Randomness from the harness (models/base.py), so k processes and resumed runs replay one process: latents, noise
  inputs and the path-length projection per sample (the large ones drawn on the device), the style-mixing coin and
  cutoff one per global batch; the path-length running mean takes every rank's lengths.
- Widths: C(r) = fmaps * min(2048 / r, 128) channels (128 up to 16^3, 64 at 32^3, 32 at 64^3, 16 at 128^3), from
  Table 3's 7M: at 128^3, fmaps 1, z = w = 256, that is G 3.56M (mapping 0.53M + synthesis 3.04M) + D 3.74M =
  7.31M parameters.
- No truncation, no w_avg tracking, no conv clamping, no fp16 (AMP follows ``self.autocast()``).
- Output scale: every toRGB's weight gain is ``TORGB_OUTPUT_SCALE`` (0.25, StyleGAN3's ``output_scale``) times
  StyleGAN2's 1 / sqrt(fan_in); the 4^3 toRGB's bias is set to the data's mean on the first step (data-dependent
  init, as for every method). With StyleGAN2's gain alone the summed skip outputs start at std ~0.7-1.5 with heavy
  tails (styles ~1 + N(0, 1) times lrelu activations): at 16^3 the first samples spanned [-7.9, 1.9] around the
  data's mean of -3.5, for data in [-5.1, 1.9] (DESIGN §9).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.config import Config
from benchmark.dist import global_mean, world_size
from benchmark.registry import METHODS
from models.base import LOSS_ADV_G, LOSS_D, GenerativeMethod, frozen
from models.blocks import modulated_conv3d
from models.template import OutputTemplate, medoid_volume, nearest_to_mean

_CHANNEL_BASE = 2048
_CHANNEL_MAX = 128
_MIN_CHANNELS = 4
_SQRT2 = math.sqrt(2.0)
# Scale of every toRGB output (not of the 4^3 toRGB's bias, which the data-dependent init sets in data units):
# StyleGAN3's ``output_scale`` (NVlabs/stylegan3, SynthesisNetwork); StyleGAN2-ADA has none (DESIGN §9).
TORGB_OUTPUT_SCALE = 0.25


def _channels(resolution: int, fmaps: float) -> int:
    return max(_MIN_CHANNELS, round(fmaps * min(_CHANNEL_BASE / resolution, _CHANNEL_MAX)))


def _act(x: Tensor, activation: str) -> Tensor:
    # lrelu(0.2) x sqrt(2): StyleGAN2's bias_act gain that keeps activations at unit variance.
    return F.leaky_relu(x, 0.2) * _SQRT2 if activation == "lrelu" else x


def _upcast(t: Tensor) -> Tensor:
    """Norms of gradients in at least float32 (bf16 under AMP loses the penalty's precision); float64 stays."""
    return t if t.dtype == torch.float64 else t.float()


class EqualizedLinear(nn.Module):
    """Fully connected layer with equalised learning rate: [N, in] -> [N, out]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
        activation: str = "linear",
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.bias_gain = lr_mul
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return _act(F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain), self.activation)


class EqualizedConv3d(nn.Module):
    """3-D conv with equalised learning rate and optional 2x down-sampling: [N, Cin, r^3] -> [N, Cout, (r/2)^3]."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, bias: bool = True, activation: str = "linear", down: bool = False
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.weight_gain = 1 / math.sqrt(in_ch * kernel**3)
        self.activation = activation
        self.down = down

    def forward(self, x: Tensor, gain: float = 1.0) -> Tensor:
        if self.down:
            x = F.avg_pool3d(x, 2)
        x = F.conv3d(x, self.weight * self.weight_gain, self.bias, padding=self.weight.shape[-1] // 2)
        return _act(x, self.activation) * gain


class ModulatedLayer(nn.Module):
    """Synthesis layer: style = affine(w), [upsample], modulated conv, noise, bias, activation.

    With ``demodulate=False``, no noise and a linear activation it is a toRGB layer.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        w_dim: int,
        kernel: int = 3,
        up: bool = False,
        demodulate: bool = True,
        noise: bool = True,
        activation: str = "lrelu",
    ) -> None:
        super().__init__()
        self.affine = EqualizedLinear(w_dim, in_ch, bias_init=1.0)  # styles start at 1 (identity modulation)
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.noise_strength = nn.Parameter(torch.zeros(out_ch)) if noise else None
        self.up = up
        self.demodulate = demodulate
        self.activation = activation
        # Demodulation normalises the weights anyway; without it (toRGB) the he-constant goes into the styles, times
        # the output scale (StyleGAN2's toRGB weight_gain is 1 / sqrt(fan_in) alone).
        self.style_gain = 1.0 if demodulate else TORGB_OUTPUT_SCALE / math.sqrt(in_ch * kernel**3)

    def modulated_conv(self, x: Tensor, w: Tensor) -> Tensor:
        """Pre-activation output: x [N, Cin, r^3], w [N, w_dim] -> [N, Cout, r'^3] (r' = 2r when ``up``)."""
        styles = self.affine(w) * self.style_gain
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
        return modulated_conv3d(x, self.weight, styles, demodulate=self.demodulate, padding=self.weight.shape[-1] // 2)

    def forward(
        self, x: Tensor, w: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> Tensor:
        """x [N, Cin, r^3], w [N, w_dim] -> [N, Cout, r'^3]; ``noise`` [N, 1, r'^3] given, else from ``generator``."""
        x = self.modulated_conv(x, w)
        if self.noise_strength is not None:
            n, _, d, h, wd = x.shape
            if noise is None:
                noise = torch.randn((n, 1, d, h, wd), generator=generator, device=x.device, dtype=x.dtype)
            x = x + noise.to(x.dtype) * self.noise_strength.view(1, -1, 1, 1, 1).to(x.dtype)
        return _act(x + self.bias.view(1, -1, 1, 1, 1).to(x.dtype), self.activation)


class MappingNetwork(nn.Module):
    """z [N, z_dim] -> w [N, w_dim] through ``layers`` equalised FC layers at learning-rate multiplier ``lr_mul``."""

    def __init__(self, z_dim: int, w_dim: int, layers: int, lr_mul: float) -> None:
        super().__init__()
        dims = [z_dim] + [w_dim] * layers
        self.fcs = nn.ModuleList(
            EqualizedLinear(a, b, lr_mul=lr_mul, activation="lrelu") for a, b in zip(dims[:-1], dims[1:], strict=True)
        )

    def forward(self, z: Tensor) -> Tensor:
        x = z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)  # normalize_2nd_moment
        for fc in self.fcs:
            x = fc(x)
        return x


class SynthesisNetwork(nn.Module):
    """Skip-architecture synthesis: ws [N, num_ws, w_dim] -> [N, 1, S, S, S]."""

    def __init__(self, w_dim: int, size: int, fmaps: float) -> None:
        super().__init__()
        if size < 4 or size & (size - 1):
            raise ValueError(f"StyleGAN2 needs a power-of-two volume size >= 4, got {size}")
        c4 = _channels(4, fmaps)
        self.const = nn.Parameter(torch.randn(c4, 4, 4, 4))
        self.convs = nn.ModuleList()  # per resolution: (conv0 up, conv1), conv0 absent at 4^3
        self.to_rgbs = nn.ModuleList()
        res, cin = 4, c4
        while res <= size:
            cout = _channels(res, fmaps)
            block = nn.ModuleList()
            if res > 4:
                block.append(ModulatedLayer(cin, cout, w_dim, up=True))
            block.append(ModulatedLayer(cout, cout, w_dim))
            self.convs.append(block)
            self.to_rgbs.append(
                ModulatedLayer(cout, 1, w_dim, kernel=1, demodulate=False, noise=False, activation="linear")
            )
            res, cin = 2 * res, cout
        self.num_ws = sum(len(b) for b in self.convs) + len(self.to_rgbs)

    def noise_shapes(self) -> list[tuple[int, int, int, int]]:
        """The per-sample shape (1, r, r, r) of each layer's noise input, in the order ``forward`` takes them."""
        return [(1, 4 * 2**i, 4 * 2**i, 4 * 2**i) for i, block in enumerate(self.convs) for _ in block]

    def forward(
        self, ws: Tensor, generator: torch.Generator | None = None, noise: list[Tensor] | None = None
    ) -> Tensor:
        """``noise``: one [N, *shape] per :meth:`noise_shapes` entry; without it drawn from ``generator``."""
        x = self.const.unsqueeze(0).expand(ws.shape[0], -1, -1, -1, -1)
        img: Tensor | None = None
        i = j = 0
        for block, to_rgb in zip(self.convs, self.to_rgbs, strict=True):
            for layer in block:
                x = layer(x, ws[:, i], generator, None if noise is None else noise[j])
                i += 1
                j += 1
            y = to_rgb(x, ws[:, i])
            i += 1
            img = y if img is None else F.interpolate(img, scale_factor=2, mode="trilinear", align_corners=False) + y
        assert img is not None
        return img


class StyleGenerator(nn.Module):
    """Mapping + synthesis: z [N, z_dim] -> [N, 1, S, S, S] (and optionally the ws [N, num_ws, w_dim] used)."""

    def __init__(self, z_dim: int, w_dim: int, size: int, fmaps: float, mapping_layers: int, lr_mul: float,
                 output_template: bool = False) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers, lr_mul)
        self.synthesis = SynthesisNetwork(w_dim, size, fmaps)
        # stylegan.output_template: the summed skip outputs are a residual on the template (their biases stay 0)
        self.template = OutputTemplate(size) if output_template else None

    def forward(
        self,
        z: Tensor,
        generator: torch.Generator | None = None,
        return_ws: bool = False,
        mix: tuple[int, Tensor] | None = None,
        noise: list[Tensor] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Volumes from z; ``mix`` = (cutoff, z2): style mixing, z2 [N, z_dim] drives the layers from ``cutoff`` on.

        The noise inputs are ``noise`` (see :meth:`SynthesisNetwork.noise_shapes`) or drawn from ``generator``.
        """
        num_ws = self.synthesis.num_ws
        ws = self.mapping(z).unsqueeze(1).expand(-1, num_ws, -1)
        if mix is not None:
            cutoff, z2 = mix
            ws2 = self.mapping(z2).unsqueeze(1).expand(-1, num_ws, -1)
            ws = torch.cat([ws[:, :cutoff], ws2[:, cutoff:]], dim=1)
        img = self.synthesis(ws, generator, noise)
        if self.template is not None:
            img = self.template(img)
        return (img, ws) if return_ws else img


def minibatch_stddev(x: Tensor, group_size: int = 4, num_channels: int = 1) -> Tensor:
    """Append the std over sample groups as extra channels: [N, C, D, H, W] -> [N, C + num_channels, D, H, W].

    Groups are of min(group_size, N) samples, or the largest size below that divides N.
    """
    n, c, d, h, w = x.shape
    g = min(group_size, n)
    while n % g:
        g -= 1
    f = num_channels
    y = x.reshape(g, -1, f, c // f, d, h, w)  # [G, n/G, F, c, D, H, W]
    y = (y - y.mean(dim=0)).square().mean(dim=0)
    y = (y + 1e-8).sqrt().mean(dim=(2, 3, 4, 5))  # [n/G, F]
    y = y.reshape(-1, f, 1, 1, 1).repeat(g, 1, d, h, w)
    return torch.cat([x, y], dim=1)


class DiscriminatorBlock(nn.Module):
    """Residual block: [N, Cin, r^3] -> [N, Cout, (r/2)^3], both branches scaled by sqrt(1/2)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv0 = EqualizedConv3d(in_ch, in_ch, 3, activation="lrelu")
        self.conv1 = EqualizedConv3d(in_ch, out_ch, 3, activation="lrelu", down=True)
        self.skip = EqualizedConv3d(in_ch, out_ch, 1, bias=False, down=True)

    def forward(self, x: Tensor) -> Tensor:
        gain = math.sqrt(0.5)
        return self.skip(x, gain=gain) + self.conv1(self.conv0(x), gain=gain)


class ResidualDiscriminator(nn.Module):
    """[N, 1, S, S, S] -> logits [N, 1]."""

    def __init__(self, size: int, fmaps: float, mbstd_group: int = 4) -> None:
        super().__init__()
        self.from_rgb = EqualizedConv3d(1, _channels(size, fmaps), 1, activation="lrelu")
        blocks = []
        res = size
        while res > 4:
            blocks.append(DiscriminatorBlock(_channels(res, fmaps), _channels(res // 2, fmaps)))
            res //= 2
        self.blocks = nn.Sequential(*blocks)
        c4 = _channels(4, fmaps)
        self.mbstd_group = mbstd_group
        self.conv = EqualizedConv3d(c4 + 1, c4, 3, activation="lrelu")
        self.fc = EqualizedLinear(c4 * 4**3, c4, activation="lrelu")
        self.out = EqualizedLinear(c4, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.from_rgb(x))
        x = self.conv(minibatch_stddev(x, self.mbstd_group))
        return self.out(self.fc(x.flatten(1)))


def r1_penalty(D: Callable[[Tensor], Tensor], real: Tensor, gamma: float = 10.0) -> Tensor:  # noqa: N803
    """R1 (Mescheder et al. 2018): gamma / 2 * ||grad_x D(x)||^2 on reals, averaged over the batch.

    Args:
        D: callable [N, C, D, H, W] -> logits [N] or [N, 1] (may include a differentiable augmentation).
        real: [N, C, D, H, W] real volumes.
        gamma: R1 weight.
    Returns:
        Scalar: mean over samples of gamma / 2 * the squared gradient norm over all of the sample's entries.
    """
    x = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
    return gamma / 2 * _upcast(grad).square().flatten(1).sum(dim=1).mean()


def path_length_penalty(
    images: Tensor,
    ws: Tensor,
    pl_mean: Tensor,
    decay: float = 0.01,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """StyleGAN2's path-length regulariser (Karras et al. 2020, Eq. 4), not yet multiplied by its weight.

    Args:
        images: [N, C, D, H, W] generated from ``ws`` (in the graph).
        ws: [N, num_ws, w_dim] the styles the images came from.
        pl_mean: scalar running mean a of the path lengths.
        decay: the running mean's update rate.
        generator: RNG for the random projection y ~ N(0, I) / sqrt(D*H*W).
        noise: the N(0, I) draws [N, C, D, H, W] given directly (the method draws them per global batch).
    Returns:
        (penalty, new_pl_mean): the scalar mean over samples of (||J_w^T y|| - a)^2, with a updated from this batch
        first, as in StyleGAN2 (the batch: every rank's samples); and the updated a, detached, for the caller to store.
    """
    if noise is None:
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    noise = noise.to(images.dtype) / math.sqrt(images[0, 0].numel())
    (grads,) = torch.autograd.grad((images * noise).sum(), ws, create_graph=True)
    lengths = _upcast(grads).square().sum(dim=2).mean(dim=1).sqrt()
    # The batch's mean length over every rank's samples, so that k processes keep the one-process running mean.
    mean = pl_mean.to(lengths.dtype).lerp(global_mean(lengths), decay)
    return (lengths - mean).square().mean(), mean.detach()


@METHODS.register("stylegan2")
class StyleGAN2(GenerativeMethod):
    """3D-StyleGAN2 (Hong et al. 2021): skip G, residual D, R1 + path-length lazy regularisation, EMA; unconditional."""

    conditional = False
    R1_INTERVAL = 16  # lazy regularisation intervals of StyleGAN2 (D steps, G steps)
    PL_INTERVAL = 4
    PL_BATCH_SHRINK = 2
    STYLE_MIXING_PROB = 0.9
    MBSTD_GROUP = 4

    def __init__(self, cfg: Config, heads: object | None = None) -> None:
        super().__init__(cfg)
        s = cfg.stylegan
        self.G = StyleGenerator(s.z_dim, s.w_dim, cfg.data.size, s.fmaps, s.mapping_layers, s.mapping_lr_mult,
                                s.output_template)
        self.D = ResidualDiscriminator(cfg.data.size, s.fmaps, self.MBSTD_GROUP)
        self.G_ema = copy.deepcopy(self.G).requires_grad_(False)
        self.register_buffer("pl_mean", torch.zeros(()))
        self.register_buffer("g_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("d_steps", torch.zeros((), dtype=torch.long))
        self._ema_volumes = 0  # volumes seen since the last EMA update (all ranks)

    @property
    def _device(self) -> torch.device:
        return self.G.synthesis.const.device

    @property
    def G_eval(self) -> nn.Module:  # noqa: N802 (GAN naming, STYLE.md)
        return self.G_ema

    def setup_ema(self, decay: float) -> None:
        """No-op: StyleGAN2's EMA is set by ``cfg.stylegan.ema_halflife_volumes``, not ``cfg.train.ema_decay``."""

    def _intervals(self) -> tuple[int, int]:
        return (self.R1_INTERVAL, self.PL_INTERVAL) if self.cfg.stylegan.lazy_reg else (1, 1)

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        s = self.cfg.stylegan
        r1_interval, pl_interval = self._intervals()
        opts = {}
        for name, module, interval in (("G", self.G, pl_interval), ("D", self.D, r1_interval)):
            # Lazy regularisation takes extra optimizer steps; StyleGAN2 shrinks lr and betas to compensate.
            ratio = interval / (interval + 1) if s.lazy_reg else 1.0
            opts[name] = torch.optim.Adam(
                module.parameters(), lr=s.lr * ratio, betas=(s.beta1**ratio, s.beta2**ratio), eps=1e-8
            )
        return opts

    def _generate(self, kind: str, n: int, step: int, device: torch.device, return_ws: bool = False
                  ) -> Tensor | tuple[Tensor, Tensor]:
        """``n`` volumes from G, this rank's share of the global batch, style mixing included; draws named ``kind_*``.

        Latents and noise inputs are per sample (``batch_noise``); the mixing coin and cutoff are one per global
        batch (``step_noise``, the same on every rank), as a one-process run takes them.
        """
        s = self.cfg.stylegan
        num_ws = self.G.synthesis.num_ws
        z = self.batch_noise(f"{kind}_z", n, (s.z_dim,), step, device)
        coin, where = self.step_noise(f"{kind}_mix", (2,), step, torch.device("cpu"), uniform=True).tolist()
        mix = None
        if num_ws > 1 and coin < self.STYLE_MIXING_PROB:
            # Style mixing regularisation: a second latent drives the layers from a cutoff ~ U{1, ..., num_ws - 1} on.
            cutoff = 1 + min(int(where * (num_ws - 1)), num_ws - 2)
            mix = (cutoff, self.batch_noise(f"{kind}_z2", n, (s.z_dim,), step, device))
        noise = [self.batch_noise(f"{kind}_noise{i}", n, shape, step, device, on_device=True)
                 for i, shape in enumerate(self.G.synthesis.noise_shapes())]
        return self.G(z, return_ws=return_ws, mix=mix, noise=noise)

    def _d(self, x: Tensor, kind: str, step: int) -> Tensor:
        """D's logits [N, 1] (float32) on x after DiffAugment with the suite's policy, as every D input gets it."""
        return self.D(self.augment(x, kind, step)).float()

    def _pl_loss(self, n: int, step: int, device: torch.device) -> Tensor:
        s = self.cfg.stylegan
        m = max(1, n // self.PL_BATCH_SHRINK)
        with self.autocast():
            images, ws = self._generate("pl", m, step, device, return_ws=True)
        y = self.batch_noise("pl_proj", m, tuple(images.shape[1:]), step, device, on_device=True)
        penalty, pl_mean = path_length_penalty(images.float(), ws, self.pl_mean, s.pl_decay, noise=y)
        self.pl_mean.copy_(pl_mean)
        return penalty * s.pl_weight

    @torch.no_grad()
    def _init_output_bias(self, real: Tensor) -> None:
        """Data-dependent init on the first step: the lowest-resolution toRGB bias := the data's mean intensity.

        The skip architecture sums every resolution's toRGB output, upsampled; the 4^3 one's bias is a constant
        offset of the whole volume. Volumes are z-scored inside the brain (mean about -3, background -4.6). The
        spread around that offset is :data:`TORGB_OUTPUT_SCALE`'s business (samples then start in the data's range).
        """
        from benchmark.dist import all_reduce_mean, broadcast_tensor

        if self.G.template is not None:  # the template holds the offset
            if not self.G.template.is_set:
                self._set_template(broadcast_tensor(nearest_to_mean(real.float())))
            return
        mean = all_reduce_mean(float(real.float().mean()), real.device)
        for G in (self.G, self.G_ema):  # noqa: N806
            G.synthesis.to_rgbs[0].bias.fill_(mean)

    @torch.no_grad()
    def init_from_data(self, train: Any) -> None:
        """``stylegan.output_template``: the template is the training subject nearest to the training mean."""
        if self.G.template is not None:
            self._set_template(medoid_volume(train))

    def _set_template(self, volume: Tensor) -> None:
        for G in (self.G, self.G_ema):  # noqa: N806
            G.template.set(volume)

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, float]:
        """G main (+ path length), then D main (+ R1) on ``batch["x"]`` [N,1,S,S,S]; one update of each network.

        ``step`` seeds every draw (with ``train.seed``); the lazy-regularisation phases come from the
        ``g_steps``/``d_steps`` buffers.
        """
        s = self.cfg.stylegan
        real = batch["x"]
        n, device = real.shape[0], real.device
        lazy = s.lazy_reg
        if int(self.d_steps) == 0 and int(self.g_steps) == 0:
            self._init_output_bias(real)
        r1_interval, pl_interval = self._intervals()
        do_pl = s.pl_weight > 0 and int(self.g_steps) % pl_interval == 0
        do_r1 = s.r1_gamma > 0 and int(self.d_steps) % r1_interval == 0
        logs: dict[str, float] = {}

        # Generator: non-saturating loss; the discriminator's parameter gradients are not needed.
        with frozen(self.D):
            with self.autocast():
                loss_g = F.softplus(-self._d(self._generate("g", n, step, device), "g_aug", step)).mean()
            logs[LOSS_ADV_G] = float(loss_g.detach())
            if do_pl and not lazy:
                pl = self._pl_loss(n, step, device)
                loss_g = loss_g + pl
                logs["pl"] = float(pl.detach())
            self.optimize("G", loss_g)
            if do_pl and lazy:
                pl = self._pl_loss(n, step, device)
                self.optimize("G", pl * pl_interval)
                logs["pl"] = float(pl.detach())
        self.g_steps += 1

        # Discriminator: logistic loss on fresh fakes and the real batch (separate calls: minibatch std mixes samples).
        with torch.no_grad(), self.autocast():
            fake = self._generate("d", n, step, device).float()
        with self.autocast():
            logits_fake, logits_real = self._d(fake, "d_aug_fake", step), self._d(real, "d_aug_real", step)
            loss_d = F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()
            logs.update({
                LOSS_D: float(loss_d.detach()),
                "score_real": float(logits_real.detach().mean()),
                "score_fake": float(logits_fake.detach().mean()),
            })
            if do_r1:
                r1 = r1_penalty(lambda x: self._d(x, "r1_aug", step), real, s.r1_gamma)
                logs["r1"] = float(r1.detach())
        if do_r1 and not lazy:
            loss_d = loss_d + r1
        self.optimize("D", loss_d)
        if do_r1 and lazy:
            self.optimize("D", r1 * r1_interval)
        self.d_steps += 1

        self._ema_volumes += n * world_size()
        return logs

    @torch.no_grad()
    def update_ema(self) -> None:
        """G_ema <- beta G_ema + (1 - beta) G, beta = 0.5 ** (volumes since last update / half-life); buffers copied."""
        if self._ema_volumes == 0:
            return
        beta = 0.5 ** (self._ema_volumes / max(self.cfg.stylegan.ema_halflife_volumes, 1e-8))
        for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters(), strict=True):
            p_ema.lerp_(p.detach(), 1 - beta)
        for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers(), strict=True):
            b_ema.copy_(b)
        self._ema_volumes = 0

    @torch.no_grad()
    def sample(self, n: int, c: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """``n`` volumes [n, 1, S, S, S] from the EMA generator (no mixing, no truncation); ``c`` is ignored.

        ``generator`` drives both z and the noise inputs, so a seeded draw is reproducible.
        """
        chunk = max(1, self.cfg.eval.batch_size)
        out = []
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            z = torch.randn(m, self.cfg.stylegan.z_dim, generator=generator, device=self._device)
            with self.autocast():
                out.append(self.G_ema(z, generator=generator).float())
        return torch.cat(out) if out else torch.empty(0, 1, *(self.cfg.data.size,) * 3, device=self._device)


def param_counts(cfg: Config, size: int = 128) -> dict[str, int]:
    """Parameters per component {"G": ..., "D": ...} at volume size ``size``, built on the meta device (no memory).

    G includes the mapping network (the EMA copy is not counted).
    """
    cfg = replace(cfg, data=replace(cfg.data, size=size))
    with torch.device("meta"):
        method = StyleGAN2(cfg)
    return {name: sum(p.numel() for p in module.parameters()) for name, module in method.param_groups().items()}
