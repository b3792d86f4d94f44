"""The evaluation protocol of DESIGN §5 as registered metrics over one :class:`EvalContext`.

Generated volumes are produced in chunks and consumed on the fly (features, head predictions, ROI measurements),
so 2000 volumes at 128^3 never sit in memory together. Every metric returns numbers; notes (pairing used,
sample counts, why a metric is unavailable) become tags next to them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmark.config import Config
from benchmark.data.bundle import DataBundle
from benchmark.registry import METRICS
from metrics.errors import MetricUnavailable

MetricFn = Callable[["EvalContext"], dict[str, float]]

TABLE_METRICS = ("params", "fid_resnet18sep", "ssim_triplanar", "lpips_triplanar_alex")
CLINICAL_METRICS = ("bac", "roi_mse", "volume_consistency")


class _HeadFeatures(nn.Module):
    """The frozen classifier backbone's global-pooled features (the `resnet18sep` FID extractor)."""

    def __init__(self, heads: Any) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        return self.heads.features(x)


@dataclass
class EvalContext:
    cfg: Config
    method: Any
    bundle: DataBundle
    heads: Any
    prior: Any
    heads_key: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = False
    notes: dict[str, str] = field(default_factory=dict)
    _cache: dict[str, Any] = field(default_factory=dict)

    # --- data ---------------------------------------------------------------------------------------------
    def test(self) -> tuple[Tensor, Tensor]:
        if "test" not in self._cache:
            self._cache["test"] = self.bundle.tensors("test")
        return self._cache["test"]

    def generator(self, draw: int, purpose: str) -> torch.Generator:
        """Independent, reproducible streams per (seed, draw, purpose)."""
        salt = sum(ord(ch) * (i + 1) for i, ch in enumerate(purpose))
        return torch.Generator(device="cpu").manual_seed(self.cfg.train.seed * 7919 + draw * 104729 + salt)

    def prior_vectors(self, n: int, draw: int, fixed: dict[int, float] | None = None) -> Tensor:
        """[n,7] standardised clinical vectors drawn from the diffusion prior."""
        return self.prior.sample(n, generator=self.generator(draw, "prior"), fixed=fixed).float()

    def generate(self, n: int, draw: int, c: Tensor | None = None) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Chunks of (volumes [b,1,S,S,S] on CPU, clinical vectors or None) from the method's own prior."""
        bs = self.cfg.eval.batch_size
        gen = self.generator(draw, "sample")
        if self.method.conditional and c is None:
            c = self.prior_vectors(n, draw)
        self.method.eval()
        for start in range(0, n, bs):
            m = min(bs, n - start)
            cc = c[start : start + m].to(self.device) if c is not None else None
            x = self.method.sample(m, cc, generator=gen) if self.method.conditional else \
                self.method.sample(m, None, generator=gen)
            yield x.float().cpu(), (cc.cpu() if cc is not None else None)

    # --- features -----------------------------------------------------------------------------------------
    @property
    def extractor(self) -> Any:
        if "extractor" not in self._cache:
            from metrics.extractors import FrozenBackboneExtractor, load_medicalnet18

            if self.cfg.eval.fid_extractor == "medicalnet18":
                path = self.cfg.eval.medicalnet_weights or None
                self._cache["extractor"] = load_medicalnet18(path).to(self.device)
            else:
                self._cache["extractor"] = FrozenBackboneExtractor(_HeadFeatures(self.heads), "resnet18sep")
        return self._cache["extractor"]

    def real_stats(self, part: str) -> Any:
        """Feature statistics of a real split, cached on disk under (data, split, extractor weights)."""
        from metrics.fid import FeatureStats, compute_features

        key = f"{part}-{self.extractor.name}-{self.heads_key}-{self.cfg.eval.medicalnet_weights.replace('/', '_')}"
        if key in self._cache:
            return self._cache[key]
        path = Path(self.cfg.data.cache_dir) / "fid-stats" / f"{key}.npz"
        if path.is_file():
            stats = FeatureStats.load(path)
        else:
            x, _ = self.bundle.tensors(part) if part != "test" else self.test()
            stats = compute_features(self.extractor, x, batch_size=self.cfg.eval.batch_size, device=self.device)
            path.parent.mkdir(parents=True, exist_ok=True)
            stats.save(path)
        self._cache[key] = stats
        return stats


def _register(name: str) -> Callable[[MetricFn], MetricFn]:
    return METRICS.register(name)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@_register("params")
def params_metric(ctx: EvalContext) -> dict[str, float]:
    """Parameter counts per component (encoder, decoder, prior, discriminator, ...) and their total."""
    groups = {k: count_params(m) for k, m in ctx.method.param_groups().items()}
    out = {f"params_{k}": float(v) for k, v in groups.items()}
    out["params_total"] = float(sum(groups.values()))
    return out


def _fid(ctx: EvalContext) -> dict[str, float]:
    from metrics.fid import compute_features, fid_from_stats, fid_notes

    name = f"fid_{ctx.extractor.name}"
    real = ctx.real_stats("test")
    values = []
    n = ctx.cfg.eval.n_generated
    for draw in range(ctx.cfg.eval.n_draws):
        stats = compute_features(ctx.extractor, (x for x, _ in ctx.generate(n, draw)),
                                 batch_size=ctx.cfg.eval.batch_size, device=ctx.device)
        values.append(fid_from_stats(stats, real))
    floor = fid_from_stats(ctx.real_stats("train"), real)
    dim = int(real.mean.shape[0])
    note = fid_notes(min(n, int(real.n)), dim)
    sampling = "diffusion-prior clinical vectors" if ctx.method.conditional else "latent prior"
    ctx.notes[f"note.{name}"] = (f"{n} generated vs {int(real.n)} test volumes, {len(values)} draws; "
                                 f"sampling: {sampling}" + (f"; {note}" if note else ""))
    arr = np.asarray(values)
    return {name: float(arr.mean()), f"{name}_std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            f"{name}_floor": float(floor), f"{name}_n_generated": float(n), f"{name}_n_real": float(real.n)}


@_register("fid_resnet18sep")
def fid_resnet18sep(ctx: EvalContext) -> dict[str, float]:
    """Frechet distance on the frozen AD/CN classifier's global-pooled features, generated vs test split."""
    return _fid(ctx)


@_register("fid_medicalnet18")
def fid_medicalnet18(ctx: EvalContext) -> dict[str, float]:
    """Frechet distance on MedicalNet ResNet-18 features (weights from eval.medicalnet_weights, a local file)."""
    from dataclasses import replace

    if ctx.cfg.eval.fid_extractor != "medicalnet18":
        ctx.cfg = replace(ctx.cfg, eval=replace(ctx.cfg.eval, fid_extractor="medicalnet18"))
        ctx._cache.pop("extractor", None)
    return _fid(ctx)


def paired_volumes(ctx: EvalContext) -> tuple[Tensor, Tensor, str]:
    """Each test subject's real volume beside what the method makes for it (DESIGN §5 pairing)."""
    if "paired" in ctx._cache:
        return ctx._cache["paired"]
    x, c = ctx.test()
    bs = ctx.cfg.eval.batch_size
    ctx.method.eval()
    if ctx.method.has_encoder:
        fake = torch.cat([ctx.method.reconstruct(x[i : i + bs].to(ctx.device), c[i : i + bs].to(ctx.device)).cpu()
                          for i in range(0, len(x), bs)])
        pairing = "reconstruction"
    elif ctx.method.conditional:
        fake = torch.cat([v for v, _ in ctx.generate(len(x), 0, c=c)])
        pairing = "conditional_sample"
    else:
        pool = torch.cat([v for v, _ in ctx.generate(max(ctx.cfg.eval.n_generated, len(x)), 0)])
        feats_fake = ctx.extractor(pool.to(ctx.device)).cpu()
        feats_real = ctx.extractor(x.to(ctx.device)).cpu()
        nearest = torch.cdist(feats_real.double(), feats_fake.double()).argmin(dim=1)
        fake = pool[nearest]
        pairing = "nearest_sample_in_feature_space"
    ctx._cache["paired"] = (x, fake.float(), pairing)
    return ctx._cache["paired"]


def _with_ci(ctx: EvalContext, name: str, per_volume: np.ndarray, pairing: str) -> dict[str, float]:
    from metrics.stats import bootstrap_ci

    low, high = bootstrap_ci(per_volume, n_boot=ctx.cfg.eval.bootstrap, seed=ctx.cfg.train.seed)
    ctx.notes[f"pairing.{name}"] = pairing
    return {name: float(per_volume.mean()), f"{name}_std": float(per_volume.std(ddof=1)) if len(per_volume) > 1
            else 0.0, f"{name}_ci_low": float(low), f"{name}_ci_high": float(high)}


@_register("ssim_triplanar")
def ssim_triplanar_metric(ctx: EvalContext) -> dict[str, float]:
    """Tri-planar SSIM (32 slices per plane inside the brain box, Gaussian sigma 1.5), per-volume mean."""
    from metrics.ssim import ssim_triplanar

    real, fake, pairing = paired_volumes(ctx)
    values = ssim_triplanar(real, fake, n=ctx.cfg.eval.n_slices).double().numpy()
    return _with_ci(ctx, "ssim_triplanar", values, pairing)


@_register("lpips_triplanar_alex")
def lpips_triplanar_metric(ctx: EvalContext) -> dict[str, float]:
    """Tri-planar LPIPS (AlexNet, slices in [-1, 1]); `_alexrand` when the random-backbone variant is chosen."""
    from metrics.lpips import lpips_triplanar, metric_name

    name = metric_name(ctx.cfg.eval.lpips_net, ctx.cfg.eval.lpips_backbone)
    real, fake, pairing = paired_volumes(ctx)
    values = lpips_triplanar(real, fake, net=ctx.cfg.eval.lpips_net, n=ctx.cfg.eval.n_slices,
                             backbone=ctx.cfg.eval.lpips_backbone).double().numpy()
    return _with_ci(ctx, name, values, pairing)


def _head_predictions(ctx: EvalContext, volumes: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels [N], predicted RAW ratios [N,6]) of the frozen heads."""
    with torch.no_grad():
        v = volumes.to(ctx.device)
        labels = ctx.heads.logits(v).argmax(dim=1).cpu().numpy()
        ratios = ctx.bundle.normalizer.inverse(torch.cat([ctx.heads.ratios(v).cpu(),
                                                          torch.zeros(len(v), 1)], dim=1))[:, :6]
    return labels, np.asarray(ratios)


def clinical_predictions(ctx: EvalContext) -> dict[str, np.ndarray]:
    """Heads applied to volumes generated from `eval.n_prior_vectors` prior vectors (Table 4), in chunks."""
    if "clinical" in ctx._cache:
        return ctx._cache["clinical"]
    if not ctx.method.conditional:
        raise MetricUnavailable(f"{type(ctx.method).__name__} is unconditional: no requested clinical vector")
    n = ctx.cfg.eval.n_prior_vectors
    c = ctx.prior_vectors(n, draw=0)
    labels, ratios, measured = [], [], []
    from benchmark.data.synthetic import measure_roi_ratios

    for x, _ in ctx.generate(n, 0, c=c):
        lab, rat = _head_predictions(ctx, x)
        labels.append(lab)
        ratios.append(rat)
        if ctx.bundle.is_synthetic:
            measured.append(np.asarray(measure_roi_ratios(x)))
    raw = np.asarray(ctx.bundle.normalizer.inverse(c))
    out = {"requested_label": raw[:, 6].round().astype(int), "requested_ratios": raw[:, :6],
           "pred_label": np.concatenate(labels), "pred_ratios": np.concatenate(ratios)}
    if measured:
        out["measured_ratios"] = np.concatenate(measured)
    ctx._cache["clinical"] = out
    return out


@_register("bac")
def bac_metric(ctx: EvalContext) -> dict[str, float]:
    """Balanced accuracy of the frozen AD/CN classifier on volumes generated from prior vectors (Table 4)."""
    from metrics.clinical import balanced_accuracy

    p = clinical_predictions(ctx)
    ctx.notes["note.bac"] = f"{len(p['pred_label'])} clinical vectors from the diffusion prior"
    return {"bac": balanced_accuracy(p["requested_label"], p["pred_label"]), "bac_n": float(len(p["pred_label"]))}


@_register("roi_mse")
def roi_mse_metric(ctx: EvalContext) -> dict[str, float]:
    """MSE of the frozen ROI regressor against the requested six ratios (raw units; tables show x1e-5)."""
    from metrics.clinical import roi_mse

    p = clinical_predictions(ctx)
    return {"roi_mse": roi_mse(p["pred_ratios"], p["requested_ratios"])}


@_register("volume_consistency")
def volume_consistency_metric(ctx: EvalContext) -> dict[str, float]:
    """Pearson r / MAE of structure volumes measured outside training (tissue classes or SynthSeg) vs requested."""
    from metrics.volumetry import consistency

    p = clinical_predictions(ctx)
    if "measured_ratios" not in p:
        raise MetricUnavailable("volumetric consistency on real data needs SynthSeg (`mri_synthseg` on PATH)")
    ctx._cache["volumetry_points"] = (p["measured_ratios"], p["requested_ratios"])
    return {f"volume_{k}": float(v) for k, v in consistency(p["measured_ratios"], p["requested_ratios"]).items()}


def _features(ctx: EvalContext, x: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.cat([ctx.extractor(xb.to(ctx.device)).double().cpu() for xb in x.split(ctx.cfg.eval.batch_size)])


@_register("nn_ratio")
def nn_ratio_metric(ctx: EvalContext) -> dict[str, float]:
    """Memorization: nearest-training / nearest-test distance of generated volumes (FID features and 1 - SSIM),
    beside the same ratio for unseen real volumes (validation split) as the no-memorization reference."""
    from metrics.memorization import closest_pairs, nn_ratio, nn_ratio_ssim, summary

    cfg = ctx.cfg.utility
    gen = torch.cat([x for x, _ in ctx.generate(ctx.cfg.eval.n_generated, draw=0)])
    train, _ = ctx.bundle.tensors("train")
    test, _ = ctx.test()
    val, _ = ctx.bundle.tensors("val")
    f_gen, f_train, f_test, f_val = (_features(ctx, v) for v in (gen, train, test, val))
    ratios = nn_ratio(f_gen, f_train, f_test)
    reference = nn_ratio(f_val, f_train, f_test)
    k = min(cfg.memo_ssim_n, len(gen))
    ratios_ssim = nn_ratio_ssim(gen[:k], train, test, n=ctx.cfg.eval.n_slices)
    reference_ssim = nn_ratio_ssim(val[:k], train, test, n=ctx.cfg.eval.n_slices)
    ctx._cache["memorization"] = {"ratios": ratios, "reference": reference, "gen": gen, "train": train,
                                  "pairs": closest_pairs(f_gen, f_train, k=5)}
    ctx.notes["note.nn_ratio"] = (f"{len(gen)} generated vs {len(train)} train / {len(test)} test volumes "
                                  f"({ctx.extractor.name} features; SSIM on {k}); reference = {len(val)} "
                                  "validation volumes (unseen real subjects)")
    out: dict[str, float] = {}
    for prefix, values in (("nn_ratio", ratios), ("nn_ratio_ref", reference), ("nn_ratio_ssim", ratios_ssim),
                           ("nn_ratio_ssim_ref", reference_ssim)):
        stats = summary(values, cfg.memo_threshold)
        out.update({f"{prefix}_{name}": v for name, v in stats.items() if name != "threshold"})
    out["nn_ratio"] = out["nn_ratio_median"]
    return out


def real_clinical_metrics(ctx: EvalContext) -> dict[str, float]:
    """Table 4's `Real` column: the frozen heads on the test split."""
    from metrics.clinical import balanced_accuracy, roi_mse

    x, c = ctx.test()
    labels, ratios = _head_predictions(ctx, x)
    raw = np.asarray(ctx.bundle.normalizer.inverse(c))
    return {"bac": balanced_accuracy(raw[:, 6].round().astype(int), labels), "roi_mse": roi_mse(ratios, raw[:, :6]),
            "bac_n": float(len(labels))}


def method_metrics(method: Any) -> list[str]:
    """Every metric that applies: the image-quality columns, plus Table 4's for conditional methods."""
    return list(TABLE_METRICS) + (list(CLINICAL_METRICS) if method.conditional else [])


def evaluate(ctx: EvalContext, names: tuple[str, ...] | list[str]) -> dict[str, float]:
    """Run the named metrics; an unavailable metric is noted with its reason instead of failing the run."""
    out: dict[str, float] = {}
    for name in names:
        fn = METRICS.get(name)
        try:
            values = fn(ctx)
        except MetricUnavailable as err:
            ctx.notes[f"unavailable.{name}"] = str(err)
            continue
        out.update({k: v for k, v in values.items() if v is not None and not (isinstance(v, float) and math.isnan(v)
                                                                              and k.endswith("_std"))})
    return out
