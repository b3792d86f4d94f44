"""Resolved run configuration: frozen dataclasses, presets and ``--set`` overrides.

A run is a pure function of its :class:`Config` and seed, so everything that changes a number lives here and
is logged (flattened) as MLflow params; :func:`digest` names a configuration in caches and in the tracker.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad override or config file; the CLI prints the one-line message and exits with code 2."""


# --- what every field accepts -------------------------------------------------------------------------------------
# Each field declares its valid range or choice set next to its default (``_f(default, ge=1)``); :func:`validate`
# checks them whenever a config is resolved (``--dry-run``, ``--set``, ``--config`` files, tuning trials, saved
# checkpoints), so a bad value is one line naming the key, the value and what is allowed, before any work starts.


@dataclass(frozen=True)
class Rule:
    """Valid values of one field: bounds (``ge``/``gt``/``le``/``lt``), a choice set, a comma-separated ``subset`` of
    names, a regular-expression ``pattern``, or ``text`` (free text such as a path, described for the user)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] = ()
    subset: tuple[str, ...] = ()
    pattern: str = ""
    text: str = ""
    nonempty: bool = False

    def allowed(self) -> str:
        """What the rule accepts, in words (the second half of the error message)."""
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.subset:
            return "a comma-separated subset of " + ", ".join(self.subset) + " (or empty)"
        if self.text:
            return self.text
        bounds = [f"{op} {_num(v)}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                  if v is not None]
        return " and ".join(bounds) if bounds else "any value of this type"

    def accepts(self, value: Any) -> bool:
        import math
        import re

        if isinstance(value, bool):
            return True
        if isinstance(value, (int, float)):
            if isinstance(value, float) and not math.isfinite(value):
                return False
            return not ((self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
                        or (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt))
        if self.nonempty and not value:
            return False
        if self.choices:
            return value in self.choices
        if self.subset:
            return all(part.strip() in self.subset for part in value.split(",") if part.strip())
        return not self.pattern or re.fullmatch(self.pattern, value) is not None


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(v)


def _f(default: Any, **rule: Any) -> Any:
    """A field with its default and its :class:`Rule` (dataclass metadata)."""
    return field(default=default, metadata={"rule": Rule(**rule)})


# Validation metrics a training run can watch (methods' validation_losses + the validation FID every run logs).
VAL_METRICS = ("val_l1", "val_l1_sample", "val_kl", "val_fid")


@dataclass(frozen=True)
class SizeRule:
    """The volume sizes S one method's architecture takes (the models raise the same when built; tests/
    test_bad_inputs.py builds every registered method at S = 4..64 on the meta device and compares)."""

    min: int
    multiple: int = 1
    power_of_two: bool = False
    why: str = ""

    def accepts(self, size: int) -> bool:
        return size >= self.min and size % self.multiple == 0 and (not self.power_of_two or size & (size - 1) == 0)

    def allowed(self) -> str:
        kind = "a power of two" if self.power_of_two else f"a multiple of {self.multiple}" if self.multiple > 1 else ""
        return f"{kind} >= {self.min}".strip()


_VAEGAN_SIZE = SizeRule(16, multiple=8, why="three stride-2 stages down to S/8, at least 2^3")
SIZE_RULES: dict[str, SizeRule] = {
    **{m: _VAEGAN_SIZE for m in ("vae", "vaegan", "xvaegan", "xvaegan_clin", "ours", "ours_noaux")},
    "wgan_gp": SizeRule(8, power_of_two=True, why="the generator doubles 4^3 up to S, the critic halves S to 4^3"),
    "stylegan2": SizeRule(4, power_of_two=True, why="the synthesis network doubles a 4^3 constant up to S"),
}
MIN_SIZE = 8  # the synthetic template and the data pipeline (data.size)


@dataclass(frozen=True)
class DataConfig:
    # a prepared cohort folder; empty = the embedded synthetic cohort (created on first use)
    path: str = _f("", text="a prepared cohort folder, or empty")
    synth_n: int = _f(24, ge=3)  # from 3 subjects on, train/val/test are all non-empty
    synth_seed: int = _f(0, ge=0)
    size: int = _f(16, ge=8)  # working resolution S (volumes are S^3); each method narrows it (SIZE_RULES)
    split_seed: int = _f(0, ge=0)
    cache_dir: str = _f(".cache/benchmark", text="a folder path", nonempty=True)
    # Conventional 3-D augmentation of training inputs (paper §2.4 (i)), probabilities per volume.
    p_blur: float = _f(0.0, ge=0, le=1)
    p_noise: float = _f(0.0, ge=0, le=1)
    p_gamma: float = _f(0.0, ge=0, le=1)
    # DiffAugment in every discriminator update (paper §2.4 (ii), Zhao et al. 2020).
    diffaug_policy: str = _f("color,translation", subset=("color", "translation", "cutout"))


@dataclass(frozen=True)
class ModelConfig:
    width: float = _f(1.0, gt=0)  # channel multiplier on the paper's widths (64->128->256->512)
    latent_dim: int = _f(256, ge=1)
    clinical_embed_dim: int = _f(64, ge=1)
    style_dim: int = _f(256, ge=1)
    mapping_layers: int = _f(2, ge=1)
    disc_width: float = _f(1.0, gt=0)
    disc_conditioning: str = _f("projection", choices=("projection", "concat"))
    # "efficientnet_b0" (2-D ImageNet features on slices) or "resnet3d_aux" (frozen 3-D classifier features)
    perceptual_backbone: str = _f("efficientnet_b0", choices=("efficientnet_b0", "resnet3d_aux"))
    perceptual_slices: int = _f(8, ge=1)  # slices per plane fed to the 2-D perceptual network each step
    grad_checkpoint: bool = False
    # 1x1x1 conv to this many channels at 1/8 resolution before the flatten (and after the decoder's linear):
    # what makes the paper's parameter counts possible (arithmetic in models/vaegan.py).
    bottleneck_channels: int = _f(2, ge=1)
    # "lsgan" (PatchGAN reference code), "bce" (non-saturating) or "hinge"
    adv_loss: str = _f("lsgan", choices=("lsgan", "bce", "hinge"))
    aux_on_prior: bool = False  # L_cls/L_reg also on a volume decoded from z ~ p(z|c), not only on x_hat
    # Decoder output = a per-voxel template (the running mean of the training volumes seen, a buffer) + g(z, c):
    # a conv decoder needs thousands of steps to draw even the mean brain's edges from its 1/8-resolution input.
    output_template: bool = False
    # Which volume the template is: "mean" (the running mean of the training volumes seen: blurred, every subject's
    # edges averaged away) or "medoid" (the training subject nearest to the training mean, fixed before training:
    # a sharp real brain; DESIGN §9 "A sharp template").
    template: str = _f("mean", choices=("mean", "medoid"))
    # Activation normalisation in the decoder stages: "none" (paper) or "instance" (StyleGAN1's AdaIN-style instance
    # norm after each stage conv, before the activation; DESIGN §9 "Decoder learning speed").
    decoder_norm: str = _f("none", choices=("none", "instance"))
    # With output_template: x_hat = template warped by a displacement field the decoder draws (3 extra output
    # channels, in units of WARP_SCALE x the half-width of the volume) + the residual channel (DESIGN §9).
    template_warp: bool = False
    # Initial bias of the encoder's log sigma^2 head (0 = paper: posterior noise starts at the prior's, norm ~sqrt(k),
    # ~20x the posterior mean's; the decoder then learns to ignore z before the encoder can carry anything).
    encoder_logvar_init: float = _f(0.0, ge=-30, le=30)  # exp(+-30): beyond, the posterior over/underflows
    # Shallow linear paths beside the conv stacks: encoder mu += linear(x average-pooled to 1/8 resolution), decoder
    # output += upsampled linear(z) at 1/8 resolution (DESIGN §9 "Decoder learning speed").
    coarse_path: bool = False
    # StyleGAN2's per-voxel noise input on the decoder's last stage (learned per-channel strength, initialised 0):
    # samples can carry texture their latent does not determine; reconstructions use no noise (deterministic).
    decoder_noise: bool = False


@dataclass(frozen=True)
class LossConfig:
    """Loss weights of paper Eq. (2) with the values of §2.1."""

    rec: float = _f(10.0, ge=0)
    kl: float = _f(0.1, ge=0)
    adv: float = _f(1.0, ge=0)
    perc: float = _f(20.0, ge=0)
    cls: float = _f(1.0, ge=0)
    reg: float = _f(1.0, ge=0)
    # lambda_KL ramps linearly from 0 to `kl` over the first this many volumes seen (0 = the paper's constant weight;
    # VAE-GAN rows only): the decoder learns to use z before the KL can collapse the posterior onto the prior.
    kl_warmup_volumes: int = _f(0, ge=0)
    # How L_KL is reduced over the k latent dimensions: "mean" (what lambda_KL = 0.1 next to a voxel-MEAN L1 can
    # mean: summed, it weighs a nat 0.1 against 10 x a voxel-mean error, a beta of ~10^3-10^4 that collapses the
    # posterior, DESIGN §9) or "sum" (the textbook ELBO term).
    kl_reduction: str = _f("mean", choices=("mean", "sum"))


@dataclass(frozen=True)
class TrainConfig:
    seed: int = _f(0, ge=0)
    budget_volumes: int = _f(480, ge=1)  # training budget in volumes seen, identical for every method of a suite
    batch_size: int = _f(4, ge=1)
    lr_g: float = _f(1e-4, gt=0)
    lr_d: float = _f(1e-3, gt=0)
    beta1: float = _f(0.5, ge=0, lt=1)
    beta2: float = _f(0.999, ge=0, lt=1)
    grad_clip: float = _f(1.0, ge=0)  # 0 = no clipping
    val_every_volumes: int = _f(160, ge=1)
    # the metric ReduceLROnPlateau and early stopping watch ("val_fid" in paper)
    val_metric: str = _f("val_l1", choices=VAL_METRICS)
    plateau_factor: float = _f(0.75, gt=0, lt=1)
    # Patience in volumes seen, the paper's unit (epochs x training-set size), whatever the validation cadence:
    # the LR drops / training stops once the watched metric has not improved for this many volumes (0 = never).
    plateau_patience_volumes: int = _f(20000, ge=0)
    early_stop_patience_volumes: int = _f(0, ge=0)
    ema_decay: float = _f(0.0, ge=0, lt=1)  # EMA of the generator-side networks (0 = off)
    # Every optimizer's LR falls linearly to 1/n of its value over the budget's last n steps (0 = off, the paper's
    # plateau schedule alone): the final weights, which evaluation reads, are then not one oscillating Adam step
    # (DESIGN §9 "The last steps can undo a run").
    lr_cooldown_volumes: int = _f(0, ge=0)
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    device: str = _f("auto", pattern=r"auto|cpu|mps|cuda(:\d+)?", text="auto, cpu, mps, cuda or cuda:N")
    checkpoint_every_volumes: int = _f(160, ge=1)
    num_threads: int = _f(0, ge=0)  # torch intra-op threads on CPU (0 = torch default)


@dataclass(frozen=True)
class HeadsConfig:
    width: int = _f(8, ge=1)  # ResNet-18 base width (64 in the paper)
    epochs: int = _f(15, ge=1)
    batch_size: int = _f(8, ge=2)  # BatchNorm: the last stage is 1^3 at the small presets
    lr: float = _f(1e-4, gt=0)
    grad_clip: float = _f(5.0, gt=0)
    patience: int = _f(10, ge=1)
    # "constant" (paper) or "cosine" (one warm-up epoch, cosine decay to 0)
    schedule: str = _f("constant", choices=("constant", "cosine"))
    mirror: bool = False  # mirror training volumes left-right, swapping the left/right ratio targets
    max_shift: int = _f(0, ge=0)  # integer translation augmentation of training volumes, voxels per axis
    stem_pool: bool = True  # the stem's max-pool (ResNet-18); off at quick: 32^3 inputs would end at 1^3
    epochs_reg: int = _f(0, ge=0)  # the regressor's own epoch budget (0 = `epochs`)
    # linear readouts of the aligned voxels averaged with each CNN's output (models.heads.VoxelReadout; small
    # presets: DESIGN §9 "Heads at the quick preset (revised)"): the classifier's is an L2 logistic regression with
    # inverse strength voxel_c, the regressor's a ridge regression with penalty voxel_alpha
    voxel_readout: bool = False
    voxel_c: float = _f(1e-3, gt=0)
    voxel_alpha: float = _f(100.0, gt=0)
    seed: int = _f(0, ge=0)  # construction and training of the shared stage (in its digest; independent of train.seed)


@dataclass(frozen=True)
class PriorConfig:
    steps: int = _f(3000, ge=1)
    batch_size: int = _f(256, ge=1)
    lr: float = _f(5e-4, gt=0)
    grad_clip: float = _f(1.0, gt=0)
    timesteps: int = _f(500, ge=1)
    hidden: int = _f(128, ge=1)
    seed: int = _f(0, ge=0)  # construction and training of the shared stage (in its digest; independent of train.seed)


@dataclass(frozen=True)
class FidNetConfig:
    """The evaluation-only FID network (``fid_fidnet``): a MedicalNet-layout 3-D ResNet-18 trained once per
    (cohort, split) on the training split, never used by any training loss (models/fid_network.py)."""

    width: int = _f(8, ge=1)  # base width (MedicalNet: 64); pooled features have 8 x width dimensions
    shortcut: str = _f("A", choices=("A", "B"))  # MedicalNet resnet_18: zero-padded identity shortcuts
    epochs: int = _f(10, ge=1)
    batch_size: int = _f(16, ge=2)  # BatchNorm
    lr: float = _f(2e-3, gt=0)  # AdamW, one-cycle cosine schedule
    weight_decay: float = _f(1e-4, ge=0)
    w_cls: float = _f(1.0, ge=0)  # AD/CN cross-entropy
    w_reg: float = _f(1.0, ge=0)  # MSE on the six standardised ROI ratios
    # NT-Xent (SimCLR) between two augmented views (measured worse: DESIGN §9 "FID network")
    w_ssl: float = _f(0.0, ge=0)
    temperature: float = _f(0.2, gt=0)
    # untrained (random-init) copies whose pooled features join the trained ones: they keep FID sensitive to
    # low-level artefacts (noise, ghosting, spikes) the trained features ignore (DESIGN §9 "FID network")
    n_random: int = _f(3, ge=0)
    seed: int = _f(0, ge=0)


@dataclass(frozen=True)
class WGANConfig:
    z_dim: int = _f(128, ge=1)
    width: float = _f(1.0, gt=0)
    gp_lambda: float = _f(10.0, ge=0)
    n_critic: int = _f(5, ge=1)
    lr: float = _f(1e-4, gt=0)
    beta1: float = _f(0.0, ge=0, lt=1)
    beta2: float = _f(0.9, ge=0, lt=1)
    # G's output is a residual on the medoid training volume (models.template.OutputTemplate), the data prior the
    # quick preset gives the VAE-GAN rows (model.template); False = the paper's generator.
    output_template: bool = False


@dataclass(frozen=True)
class StyleGANConfig:
    z_dim: int = _f(256, ge=1)
    w_dim: int = _f(256, ge=1)
    fmaps: float = _f(1.0, gt=0)
    mapping_layers: int = _f(8, ge=1)
    mapping_lr_mult: float = _f(0.01, gt=0)
    r1_gamma: float = _f(10.0, ge=0)
    pl_weight: float = _f(2.0, ge=0)
    pl_decay: float = _f(0.01, gt=0, le=1)
    lazy_reg: bool = True
    lr: float = _f(0.002, gt=0)
    beta1: float = _f(0.0, ge=0, lt=1)
    beta2: float = _f(0.99, ge=0, lt=1)
    ema_halflife_volumes: int = _f(500, ge=0)
    output_template: bool = False  # as wgan.output_template


@dataclass(frozen=True)
class EvalConfig:
    n_generated: int = _f(16, ge=2)  # FID needs a covariance: generated volumes for FID (paper: 2000)
    n_prior_vectors: int = _f(64, ge=2)  # clinical vectors for Table 4 (paper: 1000)
    n_draws: int = _f(5, ge=1)  # independent generation draws for mean +- std when --seeds 1
    n_slices: int = _f(32, ge=1)  # tri-planar slices per plane (paper: 32)
    # Default FID network (validation, pairing, nn_ratio, Optuna): "resnet18" = the evaluation-only network (no loss
    # sees it); "resnet18sep" = the frozen AD/CN classifier `ours` trains against; "medicalnet18" (medicalnet_weights).
    fid_extractor: str = _f("resnet18", choices=("resnet18", "resnet18sep", "medicalnet18"))
    medicalnet_weights: str = _f("", text="a MedicalNet .pth file, or empty")
    lpips_net: str = _f("alex", choices=("alex", "vgg", "squeeze"))
    # "random" = the offline variant, logged as lpips_triplanar_alexrand
    lpips_backbone: str = _f("pretrained", choices=("pretrained", "random"))
    batch_size: int = _f(8, ge=1)
    bootstrap: int = _f(1000, ge=1)


@dataclass(frozen=True)
class UtilityConfig:
    """Downstream utility and memorization (issue #10): classifiers trained on real and/or synthetic volumes."""

    n_synthetic: int = _f(64, ge=2)  # synthetic volumes per generator (half AD, half CN for conditional generators)
    seeds: int = _f(3, ge=1)  # classifier trainings per arm (mean +- std over these)
    # budget of every arm = epochs x (real training-set size) volumes, identical for all arms
    epochs: int = _f(12, ge=1)
    memo_ssim_n: int = _f(8, ge=1)  # generated volumes scored in voxel space (1 - SSIM costs N x (train + test) SSIMs)
    memo_threshold: float = _f(0.5, gt=0)  # nn_ratio below this = at least twice as close to a training subject


@dataclass(frozen=True)
class TrackingConfig:
    config_file: str = _f("mlflow.yaml", text="a YAML file path (absent = defaults)", nonempty=True)
    experiment: str = _f("", text="an MLflow experiment name, or empty")  # empty = named after the suite (or "train")


@dataclass(frozen=True)
class LauncherConfig:
    """Where a suite's children run (``run --launcher local|slurm``, benchmark/launchers.py): never what they compute,
    so :func:`digest` leaves these keys out (a child trained under one launcher is reused under another)."""

    partition: str = _f("", text="a SLURM partition name, or empty (the cluster's default)")
    time_min: int = _f(1440, ge=1)  # SLURM --time of each child job, minutes (a time-out requeues it; it resumes)
    gpus_per_job: int = _f(1, ge=0)  # SLURM --gpus-per-node of each child job (0 on a CPU-only partition)
    cpus_per_job: int = _f(0, ge=0)  # SLURM --cpus-per-task, also the child's torch threads (0 = cluster default)
    mem_gb: float = _f(0.0, ge=0)  # SLURM --mem of each child job in GB (0 = cluster default)
    # more #SBATCH options, KEY=VALUE (or a bare flag) separated by spaces or commas: "account=lab qos=high exclusive"
    sbatch_extra: str = _f("", pattern=r"\s*([A-Za-z][\w-]*(=[^,\s=]+)?([,\s]+[A-Za-z][\w-]*(=[^,\s=]+)?)*)?[,\s]*",
                           text="sbatch options KEY=VALUE (or a bare flag) separated by spaces or commas, e.g. "
                                "'account=lab qos=high'")
    # submitit's cluster for --launcher slurm: `local` (processes) or `debug` (in the driver) run the same submission
    # path on a machine without SLURM (tests, debugging); the slurm-only options are then ignored
    cluster: str = _f("slurm", choices=("slurm", "local", "debug"))


@dataclass(frozen=True)
class TuneConfig:
    lambda_low: float = _f(0.1, gt=0)  # search ranges are multiplicative around the paper's weights (log-uniform)
    lambda_high: float = _f(10.0, gt=0)  # and > lambda_low
    objective: str = _f("fid", choices=("fid", "fid,bac"))  # or "fid,bac" (multi-objective)
    pruner_warmup: int = _f(1, ge=0)


@dataclass(frozen=True)
class Config:
    method: str = _f("ours", text="a registered method (see `list`)", nonempty=True)
    preset: str = _f("smoke", choices=("smoke", "quick", "paper"))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    fidnet: FidNetConfig = field(default_factory=FidNetConfig)
    wgan: WGANConfig = field(default_factory=WGANConfig)
    stylegan: StyleGANConfig = field(default_factory=StyleGANConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    utility: UtilityConfig = field(default_factory=UtilityConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


def _smoke() -> dict[str, Any]:
    """16^3, 1/8 widths, 24 synthetic subjects, tens of steps: tests, < 1 min a suite on 2 cores."""
    return {
        "data.synth_n": 24, "data.size": 16,
        "model.width": 0.125, "model.latent_dim": 32, "model.clinical_embed_dim": 16, "model.style_dim": 32,
        "model.disc_width": 0.125, "model.perceptual_backbone": "resnet3d_aux", "model.perceptual_slices": 4,
        # --- generator sanity (issue 15): the decoder predicts a residual from the running mean volume, as at quick:
        # drawing the shared anatomy from the constant input takes the paper's decoder hundreds of steps (DESIGN §9
        # "Decoder learning speed"); `paper` keeps the paper's decoder.
        "model.output_template": True,
        # ---
        "train.budget_volumes": 96, "train.batch_size": 4, "train.val_every_volumes": 48,
        "train.checkpoint_every_volumes": 48, "train.plateau_patience_volumes": 96,
        "train.early_stop_patience_volumes": 0,
        "heads.width": 4, "heads.epochs": 3, "heads.voxel_readout": True, "prior.steps": 300, "prior.hidden": 64,
        "fidnet.width": 4, "fidnet.epochs": 3, "fidnet.batch_size": 8,
        "wgan.z_dim": 32, "wgan.width": 0.125, "wgan.n_critic": 2,
        "stylegan.z_dim": 32, "stylegan.w_dim": 32, "stylegan.fmaps": 0.125, "stylegan.mapping_layers": 2,
        "eval.n_generated": 8, "eval.n_prior_vectors": 32, "eval.n_draws": 2, "eval.n_slices": 8,
        "eval.lpips_backbone": "random", "eval.bootstrap": 200,
        "utility.n_synthetic": 8, "utility.seeds": 2, "utility.epochs": 2, "utility.memo_ssim_n": 4,
    }


def _quick() -> dict[str, Any]:
    """32^3, 1/4 widths, 600 synthetic subjects, about a minute a method: `make run` on a CPU laptop."""
    return {
        "data.size": 32,
        "model.width": 0.25, "model.latent_dim": 128, "model.clinical_embed_dim": 32, "model.style_dim": 128,
        "model.disc_width": 0.25, "model.perceptual_backbone": "resnet3d_aux",
        # 250 steps: a template warped by a decoded displacement field, shallow linear paths beside the conv stacks,
        # posterior noise starting small, lambda_KL 0.01 ramped over 500 volumes (DESIGN §9 "Decoder learning speed":
        # with these and lr_g 3e-4 `vae` reconstructions beat the mean volume, L1 0.312 vs 0.325, SSIM 0.735 vs
        # 0.727; at the paper's settings L1 ~0.59, SSIM ~0.37).
        "model.output_template": True, "model.template_warp": True, "model.coarse_path": True,
        # the template is the medoid training subject, not the running mean: warps of the blurred mean are blurred,
        # FID 10.1-10.3 for vae/xvaegan vs the mean volume's 9.91; with the medoid 5.8-6.1 (DESIGN §9 "A sharp
        # template")
        "model.template": "medoid",
        "model.encoder_logvar_init": -6.0, "loss.kl": 0.01, "loss.kl_warmup_volumes": 500,
        # lr_g 1e-3 with the LR falling linearly to 0 over the last 250 volumes: at 3e-4 without the cooldown `vae`
        # could end on an oscillating step (reconstruction SSIM 0.651 < the mean volume's 0.732); at 1e-3 + cooldown
        # every row improves on FID (anat.) and SSIM (DESIGN §9 "The last steps can undo a run").
        "train.lr_g": 1e-3, "train.lr_cooldown_volumes": 250,
        # 1000 volumes (~4 epochs): the five Table 2 methods train in ~6 min on 2 cores (bench at 32^3, batch 4:
        # 0.32-0.56 s a step), so that `make run` stays under 15 min with stages and evaluation.
        # validation (val FID, the learning curves) every 250 volumes: 4 points per run
        "train.budget_volumes": 1000, "train.batch_size": 4, "train.val_every_volumes": 250,
        "train.checkpoint_every_volumes": 500, "train.plateau_patience_volumes": 1500,
        "train.early_stop_patience_volumes": 0,
        # Heads: lr 3e-3 with a cosine schedule, not the paper's constant 1e-4 (12 epochs at 1e-4 leave the regressor
        # worse than predicting the mean), and 600 subjects (480 training volumes): at 300 the classifier is at
        # chance (DESIGN §9 "Heads at the quick preset").
        "data.synth_n": 600,
        # stem_pool off (total stride 16: the last stage is 2^3, not 1^3), left-right mirroring, 20 epochs for the
        # classifier and 30 for the regressor (DESIGN §9 "Heads at the quick preset").
        "heads.width": 8, "heads.epochs": 20, "heads.epochs_reg": 30, "heads.lr": 3e-3, "heads.schedule": "cosine",
        "heads.stem_pool": False,
        "heads.mirror": True, "prior.steps": 3000,
        # each head averages its CNN with a linear readout of the aligned voxels: the classifier CNN alone reached test
        # BAC 0.67-0.78 over three seeds, its readout 0.85; the regressor CNN R^2 0.39-0.55, its readout 0.55
        # (DESIGN §9 "Heads at the quick preset (revised)")
        "heads.voxel_readout": True,
        "fidnet.width": 8, "fidnet.epochs": 10, "fidnet.batch_size": 16, "fidnet.lr": 2e-3,
        "wgan.z_dim": 64, "wgan.width": 0.25,
        "stylegan.z_dim": 128, "stylegan.w_dim": 128, "stylegan.fmaps": 0.25, "stylegan.mapping_layers": 4,
        # the Table 3 baselines get the VAE-GAN rows' data prior: a residual on the medoid training volume (from
        # scratch, 1000 volumes left wgan_gp at FID 49.7 and stylegan2 at 54.6, a checkerboard and a noisy blob;
        # DESIGN §9 "A sharp template")
        "wgan.output_template": True, "stylegan.output_template": True,
        "eval.n_generated": 64, "eval.n_prior_vectors": 200, "eval.n_draws": 3,
        "eval.lpips_backbone": "random",
        "utility.n_synthetic": 128, "utility.seeds": 3, "utility.epochs": 10,
    }


def _paper() -> dict[str, Any]:
    """128^3, paper widths, a prepared cohort (--data), 2000 epochs at batch 4: the paper's numbers, on GPUs."""
    # paper §2.5: 2000 epochs of 2564 scans (~80% train) at batch 4; heads 50-60 epochs; validation FID.
    return {
        "data.size": 128, "model.width": 1.0, "model.disc_width": 1.0,
        "model.perceptual_backbone": "efficientnet_b0",
        # paper §2.4 (i): blur / noise / gamma "with fixed probabilities" (values not given: 0.25 each, DESIGN §9)
        "data.p_blur": 0.25, "data.p_noise": 0.25, "data.p_gamma": 0.25,
        "train.budget_volumes": 2000 * 2051, "train.batch_size": 4, "train.val_every_volumes": 2051,
        "train.checkpoint_every_volumes": 20510, "train.val_metric": "val_fid",
        # paper §2.5: ReduceLROnPlateau patience 50-100 epochs, early stopping patience 500 epochs, validated on FID;
        # validation every epoch (2051 training volumes) so that both can act within the 2000-epoch run.
        "train.plateau_patience_volumes": 50 * 2051, "train.early_stop_patience_volumes": 500 * 2051,
        "heads.width": 64, "heads.epochs": 60, "heads.patience": 10, "prior.steps": 50000,
        # FID network at MedicalNet's width (64; 8 x 64 = 512 features, the layout resnet_18_23dataset.pth loads into)
        "fidnet.width": 64, "fidnet.epochs": 60, "fidnet.batch_size": 8, "fidnet.lr": 1e-3,
        # generation in chunks of 2: a 128^3 volume costs ~2.15 GB of float32 activations to sample, so 8 at once
        # took 17 GB (DESIGN §9 "paper at 128^3 on a CPU"); 2 fit a 16 GB GPU and lose nothing at this size
        "eval.n_generated": 2000, "eval.n_prior_vectors": 1000, "eval.n_slices": 32, "eval.batch_size": 2,
        "eval.lpips_backbone": "pretrained",
        "utility.n_synthetic": 2000, "utility.seeds": 5, "utility.epochs": 60, "utility.memo_ssim_n": 64,
    }


PRESET_OVERRIDES = {"smoke": _smoke, "quick": _quick, "paper": _paper}


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr_g": 1e-4, ...}``: the form logged as params and accepted by ``--set``."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        else:
            out[key] = value
    return out


def _coerce(key: str, default: Any, value: Any) -> Any:
    """Type-check ``value`` against the default's type; ints are accepted where floats are expected."""
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected bool, got {value!r}")
    if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
        raise ConfigError(f"{key}: expected {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def field_rules() -> dict[str, Rule | None]:
    """Dotted key -> the field's :class:`Rule` (None for a boolean: its type is the whole rule)."""
    if not _RULES:
        def walk(cls: Any, prefix: str) -> None:
            for f in fields(cls):
                if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
                    walk(f.default_factory, f"{prefix}{f.name}.")
                else:
                    _RULES[f"{prefix}{f.name}"] = f.metadata.get("rule")

        walk(Config, "")
    return _RULES


_RULES: dict[str, Rule | None] = {}


def check_value(key: str, value: Any) -> None:
    """ConfigError naming the key, the value and what is allowed, unless ``value`` satisfies the key's rule."""
    rule = field_rules().get(key)
    if rule is not None and not rule.accepts(value):
        kind = {int: "an integer ", float: "a number "}.get(type(value), "") if not rule.text else ""
        raise ConfigError(f"{key}={value!r}: allowed: {kind}{rule.allowed()}")


def check_size(size: int, methods: Any, key: str = "data.size") -> None:
    """ConfigError unless every method in ``methods`` can be built at volume size ``size`` (SIZE_RULES)."""
    rules = {m: SIZE_RULES[m] for m in dict.fromkeys(methods) if m in SIZE_RULES}
    if size < MIN_SIZE:
        raise ConfigError(f"{key}={size}: allowed: an integer >= {MIN_SIZE}")
    bad = [m for m, r in rules.items() if not r.accepts(size)]
    if not bad:
        return
    groups: dict[SizeRule, list[str]] = {}
    for m in bad:
        groups.setdefault(rules[m], []).append(m)
    why = "; ".join(f"{', '.join(ms)} need{'s' if len(ms) == 1 else ''} {r.allowed()} ({r.why})"
                    for r, ms in groups.items())
    ok = [s for s in range(MIN_SIZE, 1025) if all(r.accepts(s) for r in rules.values())][:4]
    raise ConfigError(f"{key}={size}: {why}; allowed: {', '.join(map(str, ok))}, ...")


def validate(cfg: Config, methods: Any = None) -> Config:
    """Check every field's rule, the rules between fields, and that the methods (default ``cfg.method``) can be
    built at ``data.size``; returns ``cfg`` or raises a one-line :class:`ConfigError`."""
    for key, value in flatten(cfg).items():
        check_value(key, value)
    if cfg.tune.lambda_low >= cfg.tune.lambda_high:
        raise ConfigError(f"tune.lambda_low={cfg.tune.lambda_low!r}: allowed: a number < tune.lambda_high "
                          f"({cfg.tune.lambda_high!r})")
    check_size(cfg.data.size, (cfg.method,) if methods is None else methods)
    return cfg


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return ``cfg`` with dotted-key overrides; unknown keys are errors that list the valid ones."""
    flat = flatten(cfg)
    for key, value in overrides.items():
        if key not in flat:
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(flat))}")
        value = _coerce(key, flat[key], value)
        check_value(key, value)
        parts = key.split(".")
        if len(parts) == 1:
            cfg = replace(cfg, **{key: value})
        else:
            section = getattr(cfg, parts[0])
            cfg = replace(cfg, **{parts[0]: replace(section, **{parts[1]: value})})
        flat[key] = value
    return cfg


def parse_set(items: list[str]) -> dict[str, Any]:
    """Parse ``section.key=value`` strings; values are Python literals, bare words are strings."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            if not raw or any(ch in raw for ch in "[]{}()'\",") or raw[0].isdigit():
                raise ConfigError(f"--set {key}: malformed value {raw!r}") from None
            value = raw  # a bare word such as resnet3d_aux
        out[key.strip()] = value
    return out


def load_config_file(path: Path) -> dict[str, Any]:
    """A JSON file of flat dotted keys (as written by ``tune`` for the best trial, or by :func:`to_json`)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected an object of dotted keys")
    return data


def resolve(
    preset: str = "smoke",
    method: str | None = None,
    overrides: dict[str, Any] | None = None,
    config_file: Path | None = None,
    methods: Any = None,
) -> Config:
    """Defaults <- preset <- config file <- ``--set`` overrides, in that order, then :func:`validate`d: ``methods``
    are the methods that must take ``data.size`` (default: the resolved ``method``; a suite passes its rows)."""
    if preset not in PRESET_OVERRIDES:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESET_OVERRIDES)}")
    cfg = apply_overrides(Config(preset=preset), PRESET_OVERRIDES[preset]())
    if config_file is not None:
        file_values = load_config_file(config_file)
        file_values.pop("preset", None)
        try:
            cfg = apply_overrides(cfg, file_values)
        except ConfigError as err:
            raise ConfigError(f"config file {config_file}: {err}") from None
    if method is not None:
        cfg = replace(cfg, method=method)
    return validate(apply_overrides(cfg, overrides or {}), methods)


def to_json(cfg: Config) -> str:
    return json.dumps(flatten(cfg), indent=2, sort_keys=True)


def digest(cfg: Config | dict[str, Any], exclude: tuple[str, ...] = ()) -> str:
    """Short stable hash of a (flattened) config; ``exclude`` drops keys that do not change results (``launcher.*``
    never count: a digest is the same whatever the launcher, as it was before launchers existed)."""
    flat = flatten(cfg) if not isinstance(cfg, dict) else dict(cfg)
    flat = {k: v for k, v in flat.items() if not k.startswith("launcher.")}  # where it runs, not what it computes
    for key in exclude:
        flat.pop(key, None)
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:12]


def section_digest(cfg: Config, sections: tuple[str, ...], extra: dict[str, Any] | None = None) -> str:
    """Digest of a subset of sections: shared stages (heads, prior) are keyed by what they depend on only."""
    flat = {k: v for k, v in flatten(cfg).items() if k.split(".")[0] in sections}
    flat.update(extra or {})
    return digest(flat)
