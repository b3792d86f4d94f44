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


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # a prepared cohort folder; empty = the embedded synthetic cohort (created on first use)
    synth_n: int = 24
    synth_seed: int = 0
    size: int = 16  # working resolution S (volumes are S^3)
    split_seed: int = 0
    cache_dir: str = ".cache/benchmark"
    # Conventional 3-D augmentation of training inputs (paper §2.4 (i)), probabilities per volume.
    p_blur: float = 0.0
    p_noise: float = 0.0
    p_gamma: float = 0.0
    # DiffAugment in every discriminator update (paper §2.4 (ii), Zhao et al. 2020).
    diffaug_policy: str = "color,translation"


@dataclass(frozen=True)
class ModelConfig:
    width: float = 1.0  # channel multiplier on the paper's widths (64->128->256->512)
    latent_dim: int = 256
    clinical_embed_dim: int = 64
    style_dim: int = 256
    mapping_layers: int = 2
    disc_width: float = 1.0
    disc_conditioning: str = "projection"  # "projection" or "concat"
    perceptual_backbone: str = "efficientnet_b0"  # or "resnet3d_aux" (frozen 3-D classifier features)
    perceptual_slices: int = 8  # slices per plane fed to the 2-D perceptual network each step
    grad_checkpoint: bool = False
    # 1x1x1 conv to this many channels at 1/8 resolution before the flatten (and after the decoder's linear):
    # what makes the paper's parameter counts possible (arithmetic in models/vaegan.py).
    bottleneck_channels: int = 2
    adv_loss: str = "lsgan"  # "lsgan" (PatchGAN reference code), "bce" (non-saturating) or "hinge"
    aux_on_prior: bool = False  # L_cls/L_reg also on a volume decoded from z ~ p(z|c), not only on x_hat
    # Decoder output = a per-voxel template (the running mean of the training volumes seen, a buffer) + g(z, c):
    # a conv decoder needs thousands of steps to draw even the mean brain's edges from its 1/8-resolution input.
    output_template: bool = False
    # Activation normalisation in the decoder stages: "none" (paper) or "instance" (StyleGAN1's AdaIN-style instance
    # norm after each stage conv, before the activation; DESIGN §9 "Decoder learning speed").
    decoder_norm: str = "none"
    # With output_template: x_hat = template warped by a displacement field the decoder draws (3 extra output
    # channels, in units of WARP_SCALE x the half-width of the volume) + the residual channel (DESIGN §9).
    template_warp: bool = False
    # Initial bias of the encoder's log sigma^2 head (0 = paper: posterior noise starts at the prior's, norm ~sqrt(k),
    # ~20x the posterior mean's; the decoder then learns to ignore z before the encoder can carry anything).
    encoder_logvar_init: float = 0.0
    # Shallow linear paths beside the conv stacks: encoder mu += linear(x average-pooled to 1/8 resolution), decoder
    # output += upsampled linear(z) at 1/8 resolution (DESIGN §9 "Decoder learning speed").
    coarse_path: bool = False


@dataclass(frozen=True)
class LossConfig:
    """Loss weights of paper Eq. (2) with the values of §2.1."""

    rec: float = 10.0
    kl: float = 0.1
    adv: float = 1.0
    perc: float = 20.0
    cls: float = 1.0
    reg: float = 1.0
    # lambda_KL ramps linearly from 0 to `kl` over the first this many volumes seen (0 = the paper's constant weight;
    # VAE-GAN rows only): the decoder learns to use z before the KL can collapse the posterior onto the prior.
    kl_warmup_volumes: int = 0
    # How L_KL is reduced over the k latent dimensions: "mean" (what lambda_KL = 0.1 next to a voxel-MEAN L1 can
    # mean: summed, it weighs a nat 0.1 against 10 x a voxel-mean error, a beta of ~10^3-10^4 that collapses the
    # posterior, DESIGN §9) or "sum" (the textbook ELBO term).
    kl_reduction: str = "mean"


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    budget_volumes: int = 480  # training budget in volumes seen, identical for every method of a suite
    batch_size: int = 4
    lr_g: float = 1e-4
    lr_d: float = 1e-3
    beta1: float = 0.5
    beta2: float = 0.999
    grad_clip: float = 1.0
    val_every_volumes: int = 160
    val_metric: str = "val_l1"  # the metric ReduceLROnPlateau and early stopping watch ("val_fid" in paper)
    plateau_factor: float = 0.75
    # Patience in volumes seen, the paper's unit (epochs x training-set size), whatever the validation cadence:
    # the LR drops / training stops once the watched metric has not improved for this many volumes (0 = never).
    plateau_patience_volumes: int = 20000
    early_stop_patience_volumes: int = 0
    ema_decay: float = 0.0  # EMA of the generator-side networks (0 = off)
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    device: str = "auto"
    checkpoint_every_volumes: int = 160
    num_threads: int = 0  # torch intra-op threads on CPU (0 = torch default)


@dataclass(frozen=True)
class HeadsConfig:
    width: int = 8  # ResNet-18 base width (64 in the paper)
    epochs: int = 15
    batch_size: int = 8
    lr: float = 1e-4
    grad_clip: float = 5.0
    patience: int = 10
    schedule: str = "constant"  # "constant" (paper) or "cosine" (one warm-up epoch, cosine decay to 0)
    mirror: bool = False  # mirror training volumes left-right, swapping the left/right ratio targets
    max_shift: int = 0  # integer translation augmentation of training volumes, voxels per axis
    stem_pool: bool = True  # the stem's max-pool (ResNet-18); off at quick: 32^3 inputs would end at 1^3
    epochs_reg: int = 0  # the regressor's own epoch budget (0 = `epochs`)
    seed: int = 0  # construction and training of the shared stage (in its digest; independent of train.seed)


@dataclass(frozen=True)
class PriorConfig:
    steps: int = 3000
    batch_size: int = 256
    lr: float = 5e-4
    grad_clip: float = 1.0
    timesteps: int = 500
    hidden: int = 128
    seed: int = 0  # construction and training of the shared stage (in its digest; independent of train.seed)


@dataclass(frozen=True)
class FidNetConfig:
    """The evaluation-only FID network (``fid_fidnet``): a MedicalNet-layout 3-D ResNet-18 trained once per
    (cohort, split) on the training split, never used by any training loss (models/fid_network.py)."""

    width: int = 8  # base width (MedicalNet: 64); pooled features have 8 x width dimensions
    shortcut: str = "A"  # MedicalNet resnet_18: zero-padded identity shortcuts
    epochs: int = 10
    batch_size: int = 16
    lr: float = 2e-3  # AdamW, one-cycle cosine schedule
    weight_decay: float = 1e-4
    w_cls: float = 1.0  # AD/CN cross-entropy
    w_reg: float = 1.0  # MSE on the six standardised ROI ratios
    w_ssl: float = 0.0  # NT-Xent (SimCLR) between two augmented views (measured worse: DESIGN §9 "FID network")
    temperature: float = 0.2
    seed: int = 0


@dataclass(frozen=True)
class WGANConfig:
    z_dim: int = 128
    width: float = 1.0
    gp_lambda: float = 10.0
    n_critic: int = 5
    lr: float = 1e-4
    beta1: float = 0.0
    beta2: float = 0.9


@dataclass(frozen=True)
class StyleGANConfig:
    z_dim: int = 256
    w_dim: int = 256
    fmaps: float = 1.0
    mapping_layers: int = 8
    mapping_lr_mult: float = 0.01
    r1_gamma: float = 10.0
    pl_weight: float = 2.0
    pl_decay: float = 0.01
    lazy_reg: bool = True
    lr: float = 0.002
    beta1: float = 0.0
    beta2: float = 0.99
    ema_halflife_volumes: int = 500


@dataclass(frozen=True)
class EvalConfig:
    n_generated: int = 16  # generated volumes for FID (paper: 2000)
    n_prior_vectors: int = 64  # clinical vectors for Table 4 (paper: 1000)
    n_draws: int = 5  # independent generation draws for mean +- std when --seeds 1
    n_slices: int = 32  # tri-planar slices per plane (paper: 32)
    # Default FID network (validation, pairing, nn_ratio, Optuna): "resnet18" = the evaluation-only network (no loss
    # sees it); "resnet18sep" = the frozen AD/CN classifier `ours` trains against; "medicalnet18" (medicalnet_weights).
    fid_extractor: str = "resnet18"
    medicalnet_weights: str = ""
    lpips_net: str = "alex"
    lpips_backbone: str = "pretrained"  # "random" = the offline variant, logged as lpips_triplanar_alexrand
    batch_size: int = 8
    bootstrap: int = 1000


@dataclass(frozen=True)
class UtilityConfig:
    """Downstream utility and memorization (issue #10): classifiers trained on real and/or synthetic volumes."""

    n_synthetic: int = 64  # synthetic volumes per generator (half AD, half CN for conditional generators)
    seeds: int = 3  # classifier trainings per arm (mean +- std over these)
    epochs: int = 12  # budget of every arm = epochs x (real training-set size) volumes, identical for all arms
    memo_ssim_n: int = 8  # generated volumes scored in voxel space (1 - SSIM costs N x (train + test) SSIMs)
    memo_threshold: float = 0.5  # nn_ratio below this = at least twice as close to a training subject


@dataclass(frozen=True)
class TrackingConfig:
    config_file: str = "mlflow.yaml"
    experiment: str = ""  # empty = named after the suite (or "train")


@dataclass(frozen=True)
class TuneConfig:
    lambda_low: float = 0.1  # search ranges are multiplicative around the paper's weights (log-uniform)
    lambda_high: float = 10.0
    objective: str = "fid"  # or "fid,bac" (multi-objective)
    pruner_warmup: int = 1


@dataclass(frozen=True)
class Config:
    method: str = "ours"
    preset: str = "smoke"
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


def _smoke() -> dict[str, Any]:
    """16^3, 1/8 widths, 24 synthetic subjects, tens of steps: tests, < 1 min a suite on 2 cores."""
    return {
        "data.synth_n": 24, "data.size": 16,
        "model.width": 0.125, "model.latent_dim": 32, "model.clinical_embed_dim": 16, "model.style_dim": 32,
        "model.disc_width": 0.125, "model.perceptual_backbone": "resnet3d_aux", "model.perceptual_slices": 4,
        "train.budget_volumes": 96, "train.batch_size": 4, "train.val_every_volumes": 48,
        "train.checkpoint_every_volumes": 48, "train.plateau_patience_volumes": 96,
        "train.early_stop_patience_volumes": 0,
        "heads.width": 4, "heads.epochs": 3, "prior.steps": 300, "prior.hidden": 64,
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
        # posterior noise starting small, lambda_KL 0.01 ramped over 500 volumes, lr_g 3e-4 (DESIGN §9 "Decoder
        # learning speed": `vae` reconstructions beat the mean volume with these, L1 0.312 vs 0.325, SSIM 0.735 vs
        # 0.727; at the paper's settings L1 ~0.59, SSIM ~0.37).
        "model.output_template": True, "model.template_warp": True, "model.coarse_path": True,
        "model.encoder_logvar_init": -6.0, "loss.kl": 0.01, "loss.kl_warmup_volumes": 500, "train.lr_g": 3e-4,
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
        "fidnet.width": 8, "fidnet.epochs": 10, "fidnet.batch_size": 16, "fidnet.lr": 2e-3,
        "wgan.z_dim": 64, "wgan.width": 0.25,
        "stylegan.z_dim": 128, "stylegan.w_dim": 128, "stylegan.fmaps": 0.25, "stylegan.mapping_layers": 4,
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
        "eval.n_generated": 2000, "eval.n_prior_vectors": 1000, "eval.n_slices": 32,
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
    if not isinstance(value, expected):
        raise ConfigError(f"{key}: expected {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return ``cfg`` with dotted-key overrides; unknown keys are errors that list the valid ones."""
    flat = flatten(cfg)
    for key, value in overrides.items():
        if key not in flat:
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(flat))}")
        value = _coerce(key, flat[key], value)
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
) -> Config:
    """Defaults <- preset <- config file <- ``--set`` overrides, in that order."""
    if preset not in PRESET_OVERRIDES:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESET_OVERRIDES)}")
    cfg = apply_overrides(Config(preset=preset), PRESET_OVERRIDES[preset]())
    if config_file is not None:
        file_values = load_config_file(config_file)
        file_values.pop("preset", None)
        cfg = apply_overrides(cfg, file_values)
    if method is not None:
        cfg = replace(cfg, method=method)
    return apply_overrides(cfg, overrides or {})


def to_json(cfg: Config) -> str:
    return json.dumps(flatten(cfg), indent=2, sort_keys=True)


def digest(cfg: Config | dict[str, Any], exclude: tuple[str, ...] = ()) -> str:
    """Short stable hash of a (flattened) config; ``exclude`` drops keys that do not change results."""
    flat = flatten(cfg) if not isinstance(cfg, dict) else dict(cfg)
    for key in exclude:
        flat.pop(key, None)
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:12]


def section_digest(cfg: Config, sections: tuple[str, ...], extra: dict[str, Any] | None = None) -> str:
    """Digest of a subset of sections: shared stages (heads, prior) are keyed by what they depend on only."""
    flat = {k: v for k, v in flatten(cfg).items() if k.split(".")[0] in sections}
    flat.update(extra or {})
    return digest(flat)
