"""The evaluation-only FID network (``fid_fidnet``): a standard 3-D ResNet-18 that no generator is trained against.

Why. The default FID extractor ``resnet18sep`` is the frozen AD/CN classifier whose losses (L_cls, and with
``perceptual_backbone=resnet3d_aux`` the perceptual loss) train ``ours``: a generator can lower that FID by matching
the very features it is optimised against, so the metric favours it by construction. This network is trained once
per (cohort, split) on the training split, with its own seed, and is used only to measure.

Architecture. :class:`metrics.extractors.MedicalNet18` (Tencent/MedicalNet's ResNet-18 layout: standard 3x3x3
convs, 7^3 stride-2 stem, max-pool, layers [2, 2, 2, 2], layer3/layer4 dilated at stride 1, shortcut 'A') at a base
width ``fidnet.width`` (64 = MedicalNet; 8 at the small presets). BatchNorm statistics are re-estimated on the
clean training volumes after training ("precise BN"), and the network is evaluated in eval mode, so a volume's
features never depend on its batch mates.

Features (what FID sees, :meth:`FidNetwork.forward`): the global-average-pooled last stage of the trained network,
concatenated with the pooled last stage of ``fidnet.n_random`` untrained copies of the same architecture (seeded
init, precise BN on the training split), each block divided by the square root of its total variance on the
training split so that every block weighs the same in the Fréchet distance. Why: the trained features see anatomy
(AD/CN, ROI sizes, blur, bias, collapse) but are blind to low-level artefacts: on the quick cohort their FID *falls*
under noise, ghosting and spikes. Random-init convolutional features respond to image statistics (Naeem et al.
2020, "Reliable fidelity and diversity metrics": random embeddings are competitive outside ImageNet), and an
ensemble of three makes the result independent of one lucky draw (measured: DESIGN §9 "FID network").

Objective (weights in ``fidnet.*``; chosen by measuring feature quality, see DESIGN §9 "FID network"):

- ``w_cls`` x AD/CN cross-entropy (linear head on the pooled features);
- ``w_reg`` x MSE on the six standardised ROI ratios (linear head);
- ``w_ssl`` x NT-Xent (SimCLR, Chen et al. 2020) between two augmented views of each volume, through a 2-layer
  projection head (the features are taken before it, as in SimCLR).

The views use only label-preserving, sharpness-preserving transforms: integer translations (no interpolation,
padding with the background value) and a brightness/contrast jitter of the brain's intensities. Blur and noise are
deliberately NOT among them: invariance to exactly the degradations FID must detect would blind the metric.

Training: AdamW, one linear warm-up epoch then cosine decay, a fixed number of epochs, final weights (no model
selection, so the stage is a pure function of its inputs and seed). All randomness comes from one
``torch.Generator`` seeded with ``fidnet.seed``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from benchmark.data.augment import random_shift
from benchmark.data.contract import LABEL_INDEX, N_ROI
from metrics.extractors import MedicalNet18


class FidNetwork(nn.Module):
    """MedicalNet-layout ResNet-18 backbone plus the training-only heads (classifier, regressor, projection).

    Args:
        width: base width (64 = MedicalNet).
        shortcut: 'A' (zero-padded identity, MedicalNet resnet_18) or 'B' (1x1x1 conv + BN).
        proj_dim: output size of the SimCLR projection head.
    """

    def __init__(self, width: int = 8, shortcut: str = "A", proj_dim: int = 64, n_random: int = 0) -> None:
        super().__init__()
        self.backbone = MedicalNet18(shortcut=shortcut, width=width)
        f = self.backbone.num_features
        self.cls = nn.Linear(f, 2)
        self.reg = nn.Linear(f, N_ROI)
        self.proj = nn.Sequential(nn.Linear(f, f), nn.ReLU(inplace=True), nn.Linear(f, min(proj_dim, f)))
        self.random = nn.ModuleList(MedicalNet18(shortcut=shortcut, width=width) for _ in range(n_random))
        # 1 / sqrt(total training-split variance) of each feature block (trained first); set by calibrate_blocks
        self.register_buffer("block_scale", torch.ones(1 + n_random))
        _resnet_init_(self)

    @property
    def num_features(self) -> int:
        return self.backbone.num_features * (1 + len(self.random))

    def features(self, x: Tensor) -> Tensor:
        """Pooled features of the trained backbone [N, 8 * width] (what the training heads see)."""
        return self.backbone(x)

    def blocks(self, x: Tensor) -> list[Tensor]:
        """Unscaled pooled features of the trained backbone, then of each random copy."""
        return [self.backbone(x), *(net(x) for net in self.random)]

    def forward(self, x: Tensor) -> Tensor:
        """What FID sees: every block times its scale, concatenated, [N, 8 * width * (1 + n_random)]."""
        return torch.cat([b * s for b, s in zip(self.blocks(x), self.block_scale, strict=True)], dim=1)

    def trained_parameters(self) -> list[nn.Parameter]:
        """Parameters the objective trains (the random copies stay at their seeded initialisation)."""
        return [p for name, p in self.named_parameters() if not name.startswith("random.")]


@torch.no_grad()
def calibrate_blocks(net: FidNetwork, x_train: Tensor, batch_size: int) -> None:
    """Precise BN for the random copies on ``x_train``, then each block's scale = 1 / sqrt(its total variance)."""
    from models.heads import recalibrate_batchnorm

    for copy in net.random:
        recalibrate_batchnorm(copy, x_train, batch_size)
    net.eval()
    dev = net.block_scale.device
    parts = [net.blocks(xb.to(dev)) for xb in x_train.split(batch_size)]
    for i in range(len(net.block_scale)):
        total_var = torch.cat([p[i] for p in parts]).double().var(dim=0).sum()
        net.block_scale[i] = float(total_var.clamp_min(1e-12).rsqrt())


def _resnet_init_(module: nn.Module) -> None:
    """He et al. / torchvision ResNet initialisation: Kaiming-normal convs (fan_out), BN weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --- augmented views ---------------------------------------------------------------------------------------------


def random_view(x: Tensor, generator: torch.Generator, max_shift: int = 2, jitter: float = 0.1) -> Tensor:
    """A label- and sharpness-preserving random view of volumes [N, 1, S, S, S].

    Integer translation by up to ``max_shift`` voxels per axis (:func:`benchmark.data.augment.random_shift`:
    background padding, no interpolation), then brain intensities (voxels above the background) scaled by
    U(1 - jitter, 1 + jitter) and shifted by U(-jitter, jitter). Draws come from ``generator`` (CPU).
    """
    n = x.shape[0]
    bg = x.flatten(1).amin(dim=1).view(-1, 1, 1, 1, 1)
    out = random_shift(x, max_shift, generator)
    if jitter > 0:
        scale = 1 + jitter * (2 * torch.rand(n, generator=generator) - 1)
        offset = jitter * (2 * torch.rand(n, generator=generator) - 1)
        scale, offset = (t.view(-1, 1, 1, 1, 1).to(x) for t in (scale, offset))
        out = torch.where(out > bg + 1e-3, out * scale + offset, out)
    return out


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's normalised-temperature cross-entropy over 2N views (each view's positive is its pair)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / temperature
    n = z1.shape[0]
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


# --- training ----------------------------------------------------------------------------------------------------


def fit_fid_network(
    net: FidNetwork,
    train: tuple[Tensor, Tensor],
    *,
    epochs: int,
    batch_size: int = 16,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    w_cls: float = 1.0,
    w_reg: float = 1.0,
    w_ssl: float = 1.0,
    temperature: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``net`` on (x [N, 1, S, S, S], c [N, 7] standardised) with the weighted objective; CPU or net's device.

    Returns ``{"history": [per-epoch mean losses]}``. Ends in eval mode with BatchNorm statistics re-estimated on
    the clean training volumes.
    """
    from models.heads import recalibrate_batchnorm

    if w_cls < 0 or w_reg < 0 or w_ssl < 0 or w_cls + w_reg + w_ssl <= 0:
        raise ValueError(f"fidnet weights must be >= 0 and not all 0, got cls={w_cls} reg={w_reg} ssl={w_ssl}")
    x_tr, c_tr = train
    dev = next(net.parameters()).device
    n = x_tr.shape[0]
    label = c_tr[:, LABEL_INDEX].round().long()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.trained_parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, sum(1 for b in torch.arange(n).split(batch_size) if len(b) > 1))
    total = max(1, epochs * steps_per_epoch)
    warmup = min(steps_per_epoch, total // 2)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    history: list[dict[str, float]] = []
    bar = tqdm(range(1, epochs + 1), desc="fid network", disable=not progress, leave=False)
    for epoch in bar:
        net.train()
        perm = torch.randperm(n, generator=gen)
        sums = {"cls": 0.0, "reg": 0.0, "ssl": 0.0}
        batches = [b for b in perm.split(batch_size) if len(b) > 1]
        for idx in batches:
            xb = x_tr[idx]
            v1 = random_view(xb, gen).to(dev)
            losses = {}
            if w_ssl > 0:
                v2 = random_view(xb, gen).to(dev)
                f = net.features(torch.cat([v1, v2]))
                f1, f2 = f.chunk(2)
                losses["ssl"] = nt_xent(net.proj(f1), net.proj(f2), temperature)
            else:
                f1 = net.features(v1)
            if w_cls > 0:
                losses["cls"] = F.cross_entropy(net.cls(f1), label[idx].to(dev))
            if w_reg > 0:
                losses["reg"] = F.mse_loss(net.reg(f1), c_tr[idx, :N_ROI].to(dev, f1.dtype))
            weights = {"cls": w_cls, "reg": w_reg, "ssl": w_ssl}
            loss = sum(weights[k] * v for k, v in losses.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.trained_parameters(), 5.0)
            opt.step()
            sched.step()
            for k, v in losses.items():
                sums[k] += float(v.detach())
        row = {"epoch": float(epoch), **{k: v / max(1, len(batches)) for k, v in sums.items()}}
        history.append(row)
        bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k != "epoch"})
    recalibrate_batchnorm(net.backbone, x_tr, batch_size)
    calibrate_blocks(net, x_tr, batch_size)
    net.eval()
    return {"history": history}


# --- evaluation: linear probes on frozen features -----------------------------------------------------------------


@torch.no_grad()
def extract_features(module: nn.Module, x: Tensor, batch_size: int = 32) -> Tensor:
    """Features [N, F] of ``module`` (eval mode) on CPU, batch by batch."""
    was = module.training
    module.eval()
    dev = next(module.parameters()).device
    try:
        return torch.cat([module(xb.to(dev)).flatten(1).float().cpu() for xb in x.split(batch_size)])
    finally:
        module.train(was)


def linear_probe_scores(
    f_train: Tensor, c_train: Tensor, parts: dict[str, tuple[Tensor, Tensor]]
) -> dict[str, float]:
    """Balanced accuracy (logistic regression) and mean R^2 over the six ratios (ridge) of linear probes.

    Probes are fit on standardised training features (sklearn, deterministic solvers) and scored on each part:
    ``{f"{part}_bac", f"{part}_roi_r2", f"{part}_roi_r2_<i>"}``.
    """
    import numpy as np
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.preprocessing import StandardScaler

    from models.heads import roi_r2

    scaler = StandardScaler().fit(f_train.double().numpy())
    ftr = scaler.transform(f_train.double().numpy())
    y_tr = c_train[:, LABEL_INDEX].round().long().numpy()
    clf = LogisticRegression(C=0.1, max_iter=5000, class_weight="balanced").fit(ftr, y_tr)
    reg = Ridge(alpha=10.0).fit(ftr, c_train[:, :N_ROI].double().numpy())
    out: dict[str, float] = {}
    for part, (f, c) in parts.items():
        fz = scaler.transform(f.double().numpy())
        y = c[:, LABEL_INDEX].round().long().numpy()
        out[f"{part}_bac"] = float(balanced_accuracy_score(y, clf.predict(fz)))
        r2 = roi_r2(torch.as_tensor(reg.predict(fz)), c[:, :N_ROI].double())
        out[f"{part}_roi_r2"] = float(np.mean(r2))
        out.update({f"{part}_roi_r2_{i}": float(v) for i, v in enumerate(r2)})
    return out


# --- FID sensitivity: does the extractor see what FID must see? -------------------------------------------------

BLUR_STDS = (0.5, 1.0, 2.0)  # voxels (torchio RandomBlur with a fixed std)
NOISE_STDS = (0.1, 0.3)  # z-score units (torchio RandomNoise with a fixed std)


def corrupt(x: Tensor, kind: str, level: float, seed: int = 0) -> Tensor:
    """Volumes [N, 1, S, S, S] under torchio ``RandomBlur(std=level)`` or ``RandomNoise(std=level)``, seeded."""
    import torchio as tio

    transform = tio.RandomBlur(std=(level, level)) if kind == "blur" else tio.RandomNoise(std=(level, level))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([transform(v) for v in x])


def fid_sensitivity(
    extractor: Any, reference: Tensor, train: Tensor, *, batch_size: int = 16, seed: int = 0
) -> dict[str, float]:
    """FID of the ``reference`` (test) volumes against: the training split (the floor), the reference under blur
    (``BLUR_STDS``) and noise (``NOISE_STDS``), and a mode-collapsed set (its first volume repeated).

    A useful extractor gives ``fid_blur_*`` and ``fid_noise_*`` rising with the level and ``fid_collapse`` well above
    ``fid_floor``. Returns ``{"fid_floor", "fid_blur_<s>", "fid_noise_<s>", "fid_collapse", "collapse_over_floor"}``.
    """
    from metrics.fid import compute_features, fid_from_stats

    def stats(x: Tensor) -> Any:
        return compute_features(extractor, x, batch_size=batch_size)

    ref = stats(reference)
    out = {"fid_floor": fid_from_stats(stats(train), ref)}
    for s in BLUR_STDS:
        out[f"fid_blur_{s:g}"] = fid_from_stats(stats(corrupt(reference, "blur", s, seed)), ref)
    for s in NOISE_STDS:
        out[f"fid_noise_{s:g}"] = fid_from_stats(stats(corrupt(reference, "noise", s, seed)), ref)
    out["fid_collapse"] = fid_from_stats(stats(reference[:1].expand(len(reference), -1, -1, -1, -1)), ref)
    out["collapse_over_floor"] = out["fid_collapse"] / max(out["fid_floor"], 1e-12)
    return out
