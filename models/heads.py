"""Auxiliary 3-D heads: the AD/CN classifier and the ROI-ratio regressor (paper §2.4, Fig. S1-A, §2.5, Table 4).

Two separate 3-D ResNet-18 backbones (He et al. 2016, BasicBlock, layers [2, 2, 2, 2], widths base x (1, 2, 4, 8))
whose 3x3x3 convolutions are depthwise-separable (:func:`models.blocks.conv3x3x3`: depthwise 3x3x3 + pointwise
1x1x1), then global average pooling and one linear layer: 2 logits (cross-entropy) or 6 standardised ratios (MSE).
Trained first on real images, then frozen: their losses L_cls/L_reg train the generator, the classifier's pooled
features are the ``resnet18sep`` FID extractor, and its stage outputs the ``resnet3d_aux`` perceptual features.

Choices:

- Stem: a standard 7x7x7 stride-2 conv + 3x3x3 max-pool as in ResNet-18 / MedicalNet (Chen et al. 2019). With one
  input channel a depthwise stem would be a single 7^3 filter feeding a 1x1x1 mix, i.e. a rank-1 stem: every
  output channel a scaled copy of one filtered image. It holds 1 x 64 x 343 = 21,952 weights, 0.1% of the net.
- Shortcuts that change shape: 1x1x1 strided conv + norm (ResNet "option B"), not separable (already 1x1x1).
- BatchNorm3d, as in ResNet-18 and the 3-D ResNets of Hara et al./MedicalNet. Frozen heads run in eval mode
  (:meth:`ClinicalHeads.freeze` pins it), so a volume's output never depends on its batch mates. GroupNorm was
  rejected: at the small presets the last stage is 1^3 (16^3 input / 32 stride), where a GroupNorm with few
  channels per group normalises a handful of numbers and erases the signal.
- Initialisation: Xavier uniform everywhere (paper §2.5), via :func:`models.blocks.xavier_init_`.

Parameter counts at paper width (base 64, one input channel), measured with ``count_parameters``:

==========================  =============  ============  ==========
network                     standard conv  separable     reduction
==========================  =============  ============  ==========
backbone (to pooled 512-d)  33,160,000     1,515,776     95.4%
classifier (+ Linear 512-2) 33,161,026     1,516,802     95.4%
regressor (+ Linear 512-6)  33,163,078     1,518,854     95.4%
both heads                  66,324,104     3,035,656     95.4%
==========================  =============  ============  ==========

The paper reports "≈40%" fewer parameters than a standard ResNet-18. Replacing every 3x3x3 conv of the residual
blocks by depthwise + pointwise cuts 27 x Cin x Cout weights to 27 x Cin + Cin x Cout, i.e. ~95% here; ~40% is
what making only part of the network separable would give, so the paper's figure cannot be reproduced from
its description. We keep the fully separable blocks the text describes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from torch import Tensor, nn
from tqdm.auto import tqdm

from benchmark.data.augment import random_mirror, random_shift
from benchmark.data.contract import LABEL_INDEX, N_ROI
from metrics.clinical import balanced_accuracy
from models.blocks import conv3x3x3, xavier_init_

STAGE_STRIDES = (1, 2, 2, 2)
STAGE_WIDTHS = (1, 2, 4, 8)


def _check_volume(x: Tensor) -> None:
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"expected volumes [N, 1, D, H, W], got shape {tuple(x.shape)}")


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``."""
    return sum(p.numel() for p in module.parameters())


class BasicBlock3d(nn.Module):
    """ResNet BasicBlock in 3-D: two 3x3x3 convs (separable or standard) with BatchNorm, plus the shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, separable: bool) -> None:
        super().__init__()
        self.conv1 = conv3x3x3(in_channels, out_channels, separable, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm3d(out_channels)
        self.conv2 = conv3x3x3(out_channels, out_channels, separable, bias=False)
        self.bn2 = nn.BatchNorm3d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm3d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x), inplace=True)


class ResNet18Sep3d(nn.Module):
    """3-D ResNet-18 with depthwise-separable 3x3x3 convs (paper Fig. S1-A), global average pooling, optional fc.

    Args:
        width: base width (64 in the paper; 4-16 in the small presets); stages have width x (1, 2, 4, 8) channels.
        num_outputs: size of the final linear layer; None for a feature extractor only.
        separable: False gives the standard-conv ResNet-18 (the parameter comparison).
        in_channels: image channels (1 for T1 MRI).

    ``forward(x [N, C, D, H, W]) -> [N, num_outputs]``; ``features(x) -> [N, 8 * width]``. Any D, H, W >= 1 works
    (total stride 32; 16^3 inputs end at 1^3).
    """

    def __init__(
        self, width: int = 64, num_outputs: int | None = None, *, separable: bool = True, in_channels: int = 1,
        stem_pool: bool = True,
    ) -> None:
        super().__init__()
        # stem_pool=False drops the stem's max-pool (total stride 16 instead of 32): at 32^3 the last stage is then
        # 2^3 instead of 1^3, which the small presets need to resolve structures of a few voxels.
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
            *([nn.MaxPool3d(3, stride=2, padding=1)] if stem_pool else []),
        )
        stages, cin = [], width
        for mult, stride in zip(STAGE_WIDTHS, STAGE_STRIDES, strict=True):
            cout = width * mult
            stages.append(
                nn.Sequential(BasicBlock3d(cin, cout, stride, separable), BasicBlock3d(cout, cout, 1, separable))
            )
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.num_features = cin
        self.fc = nn.Linear(cin, num_outputs) if num_outputs is not None else None
        xavier_init_(self)

    def feature_maps(self, x: Tensor) -> list[Tensor]:
        """The four stage outputs, [N, width * m, D / (4 s), ...] for m, s = (1, 2, 4, 8), (1, 2, 4, 8)."""
        h = self.stem(x)
        maps = []
        for stage in self.stages:
            h = stage(h)
            maps.append(h)
        return maps

    def features(self, x: Tensor) -> Tensor:
        """Global-average-pooled last stage: [N, 8 * width]."""
        return self.feature_maps(x)[-1].mean(dim=(2, 3, 4))

    def head(self, last_map: Tensor) -> Tensor:
        """Outputs from the last stage's map: pool, then fc (features only when there is no fc)."""
        pooled = last_map.mean(dim=(2, 3, 4))
        return pooled if self.fc is None else self.fc(pooled)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.feature_maps(x)[-1])


class VoxelReadout(nn.Module):
    """Linear outputs read straight from the aligned voxels, ``W x + b``, fitted once in closed form and frozen.

    Why (DESIGN §9 "Heads at the quick preset (revised)"): every quick-cohort subject is registered to one template,
    so the AD/CN signal (grey/white contrast, sulcal CSF) and the ROI volumes sit at fixed voxels. An L2 logistic
    regression on the standardised voxels of the 480 training volumes reads the diagnosis (test BAC 0.85) where a
    global-average-pooled CNN trained on them stays at 0.67-0.78, and a ridge regression reads the six ratios as well
    as the CNN does (mean test R^2 0.55) without its seed-to-seed swings (0.39-0.55). The weights come from
    scikit-learn (lbfgs logistic regression, ridge): tested deterministic solvers, not an SGD path on 32^3 inputs
    (which diverged at the CNN's learning rate). The standardisation is folded into ``weight`` and ``bias``, so the
    readout is one product per output and differentiable with respect to the volume: L_cls and L_reg reach the
    generator through it.
    """

    def __init__(self, size: int, outputs: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("weight", torch.zeros(outputs, size, size, size))
        self.register_buffer("bias", torch.zeros(outputs))

    def forward(self, x: Tensor) -> Tensor:
        """[N, outputs] for volumes ``x`` [N, 1, S, S, S]."""
        if tuple(x.shape[2:]) != (self.size,) * 3:
            raise ValueError(f"the voxel readout was fitted on {self.size}^3 volumes, got {tuple(x.shape[2:])}")
        return torch.einsum("nxyz,kxyz->nk", x[:, 0], self.weight.to(x.dtype)) + self.bias.to(x.dtype)

    @staticmethod
    def _standardise(x: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(standardised voxels [N, S^3], mean, std) in float64; constant voxels (the background) standardise to 0
        and so get no weight."""
        flat = x.flatten(1).double().cpu().numpy()
        mean, std = flat.mean(axis=0), flat.std(axis=0) + 1e-3
        return (flat - mean) / std, mean, std

    def _set(self, coef: ArrayLike, intercept: ArrayLike, mean: np.ndarray, std: np.ndarray) -> None:
        """Fold the standardisation into the weights: coef . (x - mean) / std + intercept."""
        w = np.asarray(coef, dtype=np.float64).reshape(self.weight.shape[0], -1) / std
        b = np.asarray(intercept, dtype=np.float64).reshape(-1) - w @ mean
        self.weight.copy_(torch.as_tensor(w, dtype=torch.float32).view_as(self.weight))
        self.bias.copy_(torch.as_tensor(b, dtype=torch.float32))

    @torch.no_grad()
    def fit_logistic(self, x: Tensor, label: Tensor, c_inverse: float) -> None:
        """AD/CN logits (two outputs, ``(-s / 2, s / 2)`` for the score s, so that softmax gives sigmoid(s)) from
        volumes ``x`` [N, 1, S, S, S] and labels [N] (0/1); L2 strength ``1 / c_inverse`` (scikit-learn's C)."""
        from sklearn.linear_model import LogisticRegression

        if self.weight.shape[0] != 2:
            raise ValueError(f"a logistic readout has 2 outputs, this one {self.weight.shape[0]}")
        z, mean, std = self._standardise(x)
        model = LogisticRegression(C=c_inverse, max_iter=5000).fit(z, label.cpu().numpy())
        self._set([-model.coef_[0] / 2, model.coef_[0] / 2], [-model.intercept_[0] / 2, model.intercept_[0] / 2],
                  mean, std)  # fmt: skip

    @torch.no_grad()
    def fit_ridge(self, x: Tensor, y: Tensor, alpha: float) -> None:
        """Targets ``y`` [N, outputs] from volumes ``x`` [N, 1, S, S, S] by ridge regression (penalty ``alpha``)."""
        from sklearn.linear_model import Ridge

        z, mean, std = self._standardise(x)
        model = Ridge(alpha=alpha).fit(z, y.double().cpu().numpy().reshape(len(z), -1))
        self._set(model.coef_, model.intercept_, mean, std)


class ClinicalHeads(nn.Module):
    """The AD/CN classifier and the ROI-ratio regressor: two separate backbones, as in the paper.

    Args:
        width: ResNet base width of both backbones (64 in the paper).
        separable: depthwise-separable 3x3x3 convs (paper) or standard ones.
        stem_pool: keep the stem's max-pool (ResNet-18 / paper); False for small volumes (see ResNet18Sep3d).
        voxel_readout: volume side S to give each head a :class:`VoxelReadout` (small presets); None (paper) keeps
            the CNNs alone. With it, each head's output is the mean of its CNN's and its readout's (a two-member
            ensemble); each CNN is trained on its own output, so the classifier's features and stage maps (FID
            ``resnet18sep``, ``resnet3d_aux`` perceptual loss) are those of the CNN alone.

    Inputs are volumes ``x [N, 1, D, H, W]`` and standardised clinical vectors ``c [N, 7]`` (ratios standardised with
    the training split's mean/std, label 0/1 at index 6).
    """

    def __init__(
        self, width: int = 64, *, separable: bool = True, stem_pool: bool = True, voxel_readout: int | None = None
    ) -> None:
        super().__init__()
        self.classifier = ResNet18Sep3d(width, 2, separable=separable, stem_pool=stem_pool)
        self.regressor = ResNet18Sep3d(width, N_ROI, separable=separable, stem_pool=stem_pool)
        self.voxel_cls = VoxelReadout(voxel_readout, 2) if voxel_readout else None
        self.voxel_reg = VoxelReadout(voxel_readout, N_ROI) if voxel_readout else None
        self.frozen = False

    @staticmethod
    def _with_readout(cnn_out: Tensor, readout: VoxelReadout | None, x: Tensor) -> Tensor:
        """A head's output from its CNN's output on ``x``: with a voxel readout, the mean of the two."""
        return cnn_out if readout is None else (cnn_out + readout(x)) / 2

    def logits(self, x: Tensor) -> Tensor:
        """AD/CN logits [N, 2] (index 1 = AD)."""
        _check_volume(x)
        return self._with_readout(self.classifier(x), self.voxel_cls, x)

    def ratios(self, x: Tensor) -> Tensor:
        """Predicted standardised ROI ratios [N, 6] (order of ``contract.ROI_NAMES``)."""
        _check_volume(x)
        return self._with_readout(self.regressor(x), self.voxel_reg, x)

    def features(self, x: Tensor) -> Tensor:
        """The classifier's pooled features [N, 8 * width]: the ``resnet18sep`` FID extractor."""
        _check_volume(x)
        return self.classifier.features(x)

    def feature_maps(self, x: Tensor) -> list[Tensor]:
        """The classifier's four stage outputs (the ``resnet3d_aux`` perceptual features)."""
        _check_volume(x)
        return self.classifier.feature_maps(x)

    def losses(self, x: Tensor, c: Tensor, classifier_maps: list[Tensor] | None = None) -> dict[str, Tensor]:
        """L_cls (cross-entropy, mean) and L_reg (MSE on standardised ratios, mean); differentiable w.r.t. x.

        Args:
            x: [N, 1, D, H, W] volumes (real or generated).
            c: [N, 7] standardised clinical vectors, label 0/1 at index 6.
            classifier_maps: ``feature_maps(x)`` when the caller already has them (the ``resnet3d_aux`` perceptual
                loss runs the same frozen classifier on the same x_hat): the logits then cost no second pass.
        Returns:
            {"cls": scalar, "reg": scalar}.
        """
        if c.ndim != 2 or c.shape[1] != N_ROI + 1 or c.shape[0] != x.shape[0]:
            raise ValueError(f"expected c [N={x.shape[0]}, {N_ROI + 1}], got shape {tuple(c.shape)}")
        label = c[:, LABEL_INDEX].round().long()
        if classifier_maps is None:
            logits = self.logits(x)
        else:
            logits = self._with_readout(self.classifier.head(classifier_maps[-1]), self.voxel_cls, x)
        return {
            "cls": F.cross_entropy(logits, label),
            "reg": F.mse_loss(self.ratios(x), c[:, :N_ROI].to(x.dtype)),
        }

    def freeze(self) -> ClinicalHeads:
        """Eval mode for good (BatchNorm keeps its running statistics) and no parameter gradients; returns self."""
        self.frozen = True
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> ClinicalHeads:
        """As nn.Module.train, except that frozen heads stay in eval mode."""
        return super().train(mode and not self.frozen)


# --- training and evaluation -------------------------------------------------------------------------------------


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def _predict(heads: ClinicalHeads, x: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """(logits [N, 2], standardised ratios [N, 6]) on CPU, in eval mode, batch by batch."""
    was_training = heads.training
    heads.eval()
    dev = _device_of(heads)
    try:
        outs = [
            (heads.logits(xb.to(dev)).float().cpu(), heads.ratios(xb.to(dev)).float().cpu())
            for xb in x.split(batch_size)
        ]
    finally:
        heads.train(was_training)
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def roi_r2(pred: Tensor, target: Tensor) -> list[float]:
    """Coefficient of determination per column of [N, K] predictions: 1 - SSE / SST, SST about the target's mean.

    Invariant to a per-column affine rescaling of both (standardised or raw units give the same R^2).
    """
    pred, target = pred.double(), target.double()
    sse = (pred - target).square().sum(0)
    sst = (target - target.mean(0)).square().sum(0).clamp_min(1e-12)
    return (1 - sse / sst).tolist()


def evaluate_heads(
    heads: ClinicalHeads, x: Tensor, c: Tensor, *, std: Tensor | None = None, batch_size: int = 16
) -> dict[str, float]:
    """Balanced accuracy of the classifier and MSE of the regressor (paper Table 4).

    Args:
        x: [N, 1, D, H, W] volumes.
        c: [N, 7] standardised clinical vectors (label 0/1 at index 6).
        std: [6] the training split's ratio standard deviations; when given, ``mse`` is in raw ratio units
            (mean(((pred - target) * std)^2)), as Table 4 reports it (x1e-5); otherwise in standardised units.
    Returns:
        {"bac", "mse", "cls_loss" (mean cross-entropy), "reg_loss" (MSE in standardised units), "roi_r2" (mean over
        the six ratios of R^2, :func:`roi_r2`), "roi_r2_<i>" per ratio}.
    """
    logits, ratios = _predict(heads, x, batch_size)
    c = c.float().cpu()
    label = c[:, LABEL_INDEX].round().long()
    err = ratios - c[:, :N_ROI]
    raw = err if std is None else err * torch.as_tensor(std, dtype=torch.float32).cpu()
    return {
        "bac": balanced_accuracy(label, logits.argmax(dim=1)),
        "mse": float(raw.square().mean()),
        "cls_loss": float(F.cross_entropy(logits, label)),
        "reg_loss": float(err.square().mean()),
        **_r2_scores(ratios, c[:, :N_ROI]),
    }


def _r2_scores(pred: Tensor, target: Tensor) -> dict[str, float]:
    r2 = roi_r2(pred, target) if len(target) > 1 else [float("nan")] * target.shape[1]
    return {"roi_r2": float(sum(r2) / len(r2)), **{f"roi_r2_{i}": float(v) for i, v in enumerate(r2)}}


@torch.no_grad()
def recalibrate_batchnorm(net: nn.Module, x: Tensor, batch_size: int) -> None:
    """Re-estimate every BatchNorm's running statistics on ``x`` [N, 1, D, H, W] with the current weights.

    "Precise BN" (Wu & Johnson 2021): the running averages (momentum 0.1) mix statistics of many past weight
    states, and with few small batches per epoch they lag the weights enough that eval-mode outputs swing from
    epoch to epoch (validation accuracy jumped between 0.5 and 0.9 on the test problem). One forward pass over the
    training set with a cumulative average (momentum None) fixes them to the weights being evaluated.
    """
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = net.training
    net.train()
    dev = _device_of(net)
    try:
        with torch.no_grad():  # statistics only: no graph to build
            for xb in x.split(batch_size):
                if len(xb) > 1:
                    net(xb.to(dev))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        net.train(was_training)


def _lr_factor(schedule: str, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step ``step`` (0-based) for ``schedule`` (see :func:`fit_heads`)."""
    if schedule == "constant":
        return lambda step: 1.0
    total = max(1, steps_per_epoch * epochs)
    warmup = min(steps_per_epoch, total // 2)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


def _step(opt: torch.optim.Optimizer, net: nn.Module, loss: Tensor, grad_clip: float) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    opt.step()


def fit_heads(
    heads: ClinicalHeads,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    *,
    epochs: int,
    batch_size: int = 8,
    lr: float = 1e-4,
    grad_clip: float = 5.0,
    patience: int = 10,
    seed: int = 0,
    progress: bool = True,
    augment: Callable[[Tensor], Tensor] | None = None,
    device: str | torch.device = "cpu",
    std: Tensor | None = None,
    schedule: str = "constant",
    weight_decay: float = 0.0,
    mirror: bool = False,
    max_shift: int = 0,
    epochs_reg: int | None = None,
    voxel_c: float = 1e-3,
    voxel_alpha: float = 100.0,
) -> dict[str, object]:
    """Train the classifier and the regressor on real volumes (paper §2.5), each with its own early stopping.

    Each backbone has its own Adam (betas (0.5, 0.999), paper §2.5) and its own gradient-norm clip, so training
    them in one loop equals training them separately. After every epoch the BatchNorm statistics are re-estimated
    on the (unaugmented) training volumes (:func:`recalibrate_batchnorm`) and both heads are scored on ``val``;
    each keeps the state of its best validation loss (cross-entropy / MSE), and training stops once neither
    improved for ``patience`` epochs. The heads end with those best states, on ``device``, in train mode.

    Args:
        train, val: (x [N, 1, S, S, S], c [N, 7] standardised, label 0/1 at index 6).
        augment: applied to each training batch of volumes [B, 1, S, S, S] (both heads see the same batch); it must
            keep ROI volumes and sides (no left-right flips), since the regressor's targets stay as given.
        seed: seeds the shuffling (a torch.Generator) and, through a forked global RNG, ``augment``.
        std: [6] ratio standard deviations, to report ``val_mse`` in raw units (see :func:`evaluate_heads`).
        schedule: "constant" (the paper's Adam at ``lr``) or "cosine": linear warm-up over the first epoch, then
            cosine decay to 0 at ``epochs`` (per step), which trains a from-scratch CNN in far fewer epochs.
        weight_decay: decoupled (AdamW-style) weight decay; 0 = the paper's plain Adam.
        mirror: mirror half the training volumes left-right and swap their left/right ratio targets
            (:func:`benchmark.data.augment.random_mirror`).
        max_shift: translate training volumes by up to this many voxels per axis
            (:func:`benchmark.data.augment.random_shift`; integer shifts, no interpolation).
        epochs_reg: the regressor's own epoch budget (and cosine length); None = ``epochs``. The classifier stops
            updating after ``epochs``; both see the same batches, so each head equals a run with its own budget.
        voxel_c, voxel_alpha: inverse L2 strength of the classifier's :class:`VoxelReadout` and ridge penalty of the
            regressor's, when the heads have them. They are fitted first, on the training volumes (and their mirror
            images with swapped targets when ``mirror``); then each CNN is trained on its own output, and its best
            epoch is chosen on the validation loss of the combined output.
    Returns:
        {"history": [per-epoch dicts], "val_bac", "val_mse", "best_epoch_cls", "best_epoch_reg", "epochs_run"};
        val_* are of the returned (best) states.
    """
    x_tr, c_tr = train
    x_val, c_val = val
    _check_volume(x_tr)
    heads.to(device)
    if heads.voxel_cls is not None and heads.voxel_reg is not None:
        x_fit, c_fit = x_tr, c_tr
        if mirror:  # the same left-right invariance the CNNs learn from their mirrored batches
            x_fit, c_fit = random_mirror(x_tr, c_tr, torch.Generator(), p=1.0)
            x_fit, c_fit = torch.cat([x_tr, x_fit]), torch.cat([c_tr, c_fit])
        heads.voxel_cls.fit_logistic(x_fit, c_fit[:, LABEL_INDEX].round().long(), voxel_c)
        heads.voxel_reg.fit_ridge(x_fit, c_fit[:, :N_ROI], voxel_alpha)
    nets = {"cls": heads.classifier, "reg": heads.regressor}
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    opts = {k: torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.5, 0.999), weight_decay=weight_decay)
            for k, net in nets.items()}
    best = {k: (math.inf, copy.deepcopy(net.state_dict()), 0) for k, net in nets.items()}
    gen = torch.Generator().manual_seed(seed)
    label = c_tr[:, LABEL_INDEX].round().long()
    history: list[dict[str, float]] = []
    n = x_tr.shape[0]
    steps_per_epoch = max(1, sum(1 for b in torch.arange(n).split(batch_size) if len(b) > 1 or n == 1))
    budget = {"cls": epochs, "reg": epochs_reg or epochs}
    scheds = {k: torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(schedule, steps_per_epoch, budget[k]))
              for k, opt in opts.items()}
    epoch = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bar = tqdm(range(1, max(budget.values()) + 1), desc="heads", disable=not progress, leave=False)
        for epoch in bar:
            heads.train()
            perm = torch.randperm(n, generator=gen)
            training = [k for k in nets if epoch <= budget[k]]
            sums = {k: (0.0 if k in training else math.nan) for k in nets}
            batches = [b for b in perm.split(batch_size) if len(b) > 1 or n == 1]  # BatchNorm needs 2 at 1^3
            for idx in batches:
                xb, cb = x_tr[idx], c_tr[idx]
                if mirror:
                    xb, cb = random_mirror(xb, cb, gen)
                xb = random_shift(xb, max_shift, gen).to(device)
                xb = augment(xb) if augment is not None else xb
                targets = {"cls": label[idx].to(device), "reg": cb[:, :N_ROI].to(device, xb.dtype)}
                for k in training:  # a head past its budget is final: no forward, no step
                    out = nets[k](xb)
                    loss = F.cross_entropy(out, targets[k]) if k == "cls" else F.mse_loss(out, targets[k])
                    _step(opts[k], nets[k], loss, grad_clip)
                    scheds[k].step()
                    sums[k] += loss.item()
            for k in training:
                recalibrate_batchnorm(nets[k], x_tr, batch_size)
            scores = evaluate_heads(heads, x_val, c_val, std=std, batch_size=batch_size)
            row = {
                "epoch": float(epoch),
                "train_cls": sums["cls"] / max(len(batches), 1),
                "train_reg": sums["reg"] / max(len(batches), 1),
                "val_cls": scores["cls_loss"],
                "val_reg": scores["reg_loss"],
                "val_bac": scores["bac"],
                "val_mse": scores["mse"],
            }
            history.append(row)
            for k, net in nets.items():
                if row[f"val_{k}"] < best[k][0]:
                    best[k] = (row[f"val_{k}"], copy.deepcopy(net.state_dict()), epoch)
            bar.set_postfix(val_bac=f"{row['val_bac']:.3f}", val_reg=f"{row['val_reg']:.3f}")
            if all(epoch - best[k][2] >= patience or epoch >= budget[k] for k in nets):
                break
    for k, net in nets.items():
        net.load_state_dict(best[k][1])
    final = evaluate_heads(heads, x_val, c_val, std=std, batch_size=batch_size)
    heads.train()
    return {
        "history": history,
        "val_bac": final["bac"],
        "val_mse": final["mse"],
        "best_epoch_cls": best["cls"][2],
        "best_epoch_reg": best["reg"][2],
        "epochs_run": epoch,
    }
