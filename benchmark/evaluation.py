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

TABLE_METRICS = ("params", "fid_resnet18", "fid_resnet18anat", "fid_resnet18sep", "ssim_triplanar",
                 "lpips_triplanar_alex", "ssim_nn_triplanar", "lpips_nn_triplanar_alex")
CLINICAL_METRICS = ("bac", "roi_mse", "volume_consistency")


class _HeadFeatures(nn.Module):
    """The frozen classifier backbone's global-pooled features (the `resnet18sep` FID extractor)."""

    def __init__(self, heads: Any) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        return self.heads.features(x)


class _TrainedBlock(nn.Module):
    """The FID network's trained block alone (the `resnet18anat` extractor), at the scale it has inside `resnet18`.

    Why a second FID on the same network: its three random blocks make `fid_resnet18` respond to noise, ghosting
    and spikes, but they also dominate it. At quick they carry ~80% of the real features' variance and nearly all
    of the gap between smooth generated volumes and textured real ones: the mean volume plus white noise (SD 0.4)
    scores FID 3.6 against the mean volume's 9.9 and every trained generator's 9-10, while on the trained block
    alone it stays at the mean volume's level (0.75 vs 0.86) and a `vae`'s prior samples score 0.59
    (DESIGN §9 "What the FID network's blocks measure").
    """

    def __init__(self, fid_net: nn.Module) -> None:
        super().__init__()
        self.net = fid_net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.features(x) * self.net.block_scale[0]  # the trained backbone only: no random copy runs


GENERATED_CACHE_BYTES = 512 * 2**20  # generated draws kept for one evaluation (see EvalContext.generate)


@dataclass
class EvalContext:
    """What the metrics of one evaluation share: the method, the shared stages, and products computed once.

    Products (generated pools, paired volumes, feature statistics) are cached under keys that name everything they
    depend on, the feature extractor included, so the order of a metric list never changes a value; no metric
    changes the configuration.
    """

    cfg: Config
    method: Any
    stages: Any  # benchmark.runner.SharedStages
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = False
    notes: dict[str, str] = field(default_factory=dict)
    _cache: dict[Any, Any] = field(default_factory=dict)

    @property
    def bundle(self) -> DataBundle:
        return self.stages.bundle

    @property
    def heads(self) -> Any:
        return self.stages.heads

    @property
    def prior(self) -> Any:
        return self.stages.prior

    def cached(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` once per key (a tuple naming every input of the product)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # --- data ---------------------------------------------------------------------------------------------
    def test(self) -> tuple[Tensor, Tensor]:
        return self.cached(("split", "test"), lambda: self.bundle.tensors("test"))

    def generator(self, draw: int, purpose: str) -> torch.Generator:
        """Independent, reproducible streams per (seed, draw, purpose)."""
        salt = sum(ord(ch) * (i + 1) for i, ch in enumerate(purpose))
        return torch.Generator(device="cpu").manual_seed(self.cfg.train.seed * 7919 + draw * 104729 + salt)

    def prior_vectors(self, n: int, draw: int, fixed: dict[int, float] | None = None) -> Tensor:
        """[n,7] standardised clinical vectors drawn from the diffusion prior."""
        return self.prior.sample(n, generator=self.generator(draw, "prior"), fixed=fixed).float()

    def generate(self, n: int, draw: int, c: Tensor | None = None) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Chunks of (volumes [b,1,S,S,S] on CPU, clinical vectors or None) from the method's own prior.

        A draw is a pure function of (n, draw): both FIDs, the nearest-sample pairing and the memorisation check
        read draw 0, so a set that fits in :data:`GENERATED_CACHE_BYTES` is generated once per evaluation (at
        `quick`, 3 draws instead of 8 generations of 64 volumes; at `paper`, 2000 volumes of 128^3 are 16 GB a draw
        and are generated again where needed).
        """
        if c is None and n * self.cfg.data.size ** 3 * 4 <= GENERATED_CACHE_BYTES:
            yield from self.cached(("generated", n, draw), lambda: list(self._generate(n, draw, None)))
            return
        yield from self._generate(n, draw, c)

    def _generate(self, n: int, draw: int, c: Tensor | None) -> Iterator[tuple[Tensor, Tensor | None]]:
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
    def extractor_for(self, name: str) -> Any:
        """The FID feature extractor ``name``: ``resnet18`` (the evaluation-only network, trained on the training
        split and used by no loss), ``resnet18sep`` (the frozen AD/CN classifier, which `ours` is trained against),
        ``medicalnet18`` (MedicalNet weights from ``eval.medicalnet_weights``)."""
        return self.cached(("extractor", name), lambda: _make_extractor(self, name))

    @property
    def extractor(self) -> Any:
        """The default extractor (``eval.fid_extractor``): validation FID, nearest-sample pairing, nn_ratio."""
        return self.extractor_for(self.cfg.eval.fid_extractor)

    def real_stats(self, part: str, extractor: str | None = None) -> Any:
        """Feature statistics of a real split, cached on disk under (data, split, extractor weights)."""
        from metrics.fid import FeatureStats, compute_features

        ext = self.extractor_for(extractor or self.cfg.eval.fid_extractor)

        def make() -> Any:
            name = extractor or self.cfg.eval.fid_extractor
            path = Path(self.cfg.data.cache_dir) / "fid-stats" / f"{part}-{name}-{_extractor_key(self, name)}.npz"
            if path.is_file():
                return FeatureStats.load(path)
            x, _ = self.bundle.tensors(part) if part != "test" else self.test()
            stats = compute_features(ext, x, batch_size=self.cfg.eval.batch_size, device=self.device)
            path.parent.mkdir(parents=True, exist_ok=True)
            stats.save(path)
            return stats

        return self.cached(("real_stats", part, extractor or self.cfg.eval.fid_extractor), make)


def _extractor_key(ctx: EvalContext, name: str) -> str:
    """What an extractor's weights depend on: the stage digest, or the weights file."""
    if name == "resnet18sep":
        return ctx.stages.heads_key
    if name == "medicalnet18":
        return ctx.cfg.eval.medicalnet_weights.replace("/", "_")
    return str(ctx.stages.fid_info.get("digest", ""))


def _make_extractor(ctx: EvalContext, name: str) -> Any:
    from metrics.extractors import FrozenBackboneExtractor, load_medicalnet18

    if name == "medicalnet18":
        return load_medicalnet18(ctx.cfg.eval.medicalnet_weights or None).to(ctx.device)
    if name == "resnet18sep":
        return FrozenBackboneExtractor(_HeadFeatures(ctx.heads), "resnet18sep")
    if name in ("resnet18", "resnet18anat"):
        if ctx.stages.fid_net is None:
            raise MetricUnavailable("the evaluation-only FID network was not prepared with the shared stages")
        net = ctx.stages.fid_net.to(ctx.device)
        return net if name == "resnet18" else FrozenBackboneExtractor(_TrainedBlock(net.module), "resnet18anat")
    raise MetricUnavailable(
        f"unknown FID extractor {name!r}; valid: resnet18, resnet18anat, resnet18sep, medicalnet18")


def _register(name: str) -> Callable[[MetricFn], MetricFn]:
    return METRICS.register(name)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def paper_counts(method: Any) -> dict[str, int]:
    """Parameters per component, and ``total`` counted as paper Tables 2-3 do: the trained generator and
    discriminator plus the frozen perceptual network (``frozen_perceptual``: EfficientNet-B0's 5.3M for `ours`;
    DESIGN §6); ``trained`` is the total without it."""
    groups = {k: count_params(m) for k, m in method.param_groups().items()}
    frozen = {f"frozen_{k}": v for k, v in getattr(method, "frozen_param_counts", lambda: {})().items()}
    trained = sum(groups.values())
    return {**groups, **frozen, "trained": trained, "total": trained + sum(frozen.values())}


@_register("params")
def params_metric(ctx: EvalContext) -> dict[str, float]:
    """Parameter counts per component (encoder, decoder, prior, discriminator, frozen perceptual network) and the
    total in the paper's sense (trained G + D + frozen perceptual network)."""
    return {f"params_{k}": float(v) for k, v in paper_counts(ctx.method).items()}


def _fid(ctx: EvalContext, extractor: str) -> dict[str, float]:
    """FID of ``eval.n_draws`` generated sets of ``eval.n_generated`` volumes against the test split."""
    from metrics.fid import compute_features, fid_from_stats, fid_notes

    ext = ctx.extractor_for(extractor)
    name = f"fid_{extractor}"
    real = ctx.real_stats("test", extractor)
    values = []
    n = ctx.cfg.eval.n_generated
    for draw in range(ctx.cfg.eval.n_draws):
        stats = compute_features(ext, (x for x, _ in ctx.generate(n, draw)),
                                 batch_size=ctx.cfg.eval.batch_size, device=ctx.device)
        values.append(fid_from_stats(stats, real))
    dim = int(real.mean.shape[0])
    note = fid_notes(min(n, int(real.n)), dim)
    sampling = "diffusion-prior clinical vectors" if ctx.method.conditional else "latent prior"
    shared = "; shares weights with the training losses of `ours` (L_cls, resnet3d_aux L_perc)" \
        if extractor == "resnet18sep" else ""
    ctx.notes[f"note.{name}"] = (f"{n} generated vs {int(real.n)} test volumes, {len(values)} draws; "
                                 f"sampling: {sampling}" + (f"; {note}" if note else "") + shared)
    arr = np.asarray(values)
    out = {name: float(arr.mean()), f"{name}_std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
           f"{name}_n_generated": float(n), f"{name}_n_real": float(real.n)}
    out.update({f"{name}_draw{i}": float(v) for i, v in enumerate(values)})  # for significance tests over draws
    return out


@_register("fid_resnet18")
def fid_resnet18(ctx: EvalContext) -> dict[str, float]:
    """Frechet distance on the evaluation-only 3-D ResNet-18 (trained on the training split, used by no loss)."""
    return _fid(ctx, "resnet18")


@_register("fid_resnet18anat")
def fid_resnet18anat(ctx: EvalContext) -> dict[str, float]:
    """Frechet distance on the evaluation-only network's trained block alone: anatomy and clinical content without
    the random blocks' response to texture (see :class:`_TrainedBlock`)."""
    return _fid(ctx, "resnet18anat")


@_register("fid_resnet18sep")
def fid_resnet18sep(ctx: EvalContext) -> dict[str, float]:
    """Frechet distance on the frozen AD/CN classifier's features: `ours` is trained against this network."""
    return _fid(ctx, "resnet18sep")


@_register("fid_medicalnet18")
def fid_medicalnet18(ctx: EvalContext) -> dict[str, float]:
    """Frechet distance on MedicalNet ResNet-18 features (weights from eval.medicalnet_weights, a local file)."""
    return _fid(ctx, "medicalnet18")


def nearest_samples(ctx: EvalContext, extractor: str | None = None) -> Tensor:
    """For each test subject, the nearest of ``eval.n_generated`` samples (draw 0) in ``extractor``'s feature space.

    Streams the generated chunks and keeps only the best candidate per subject, so memory holds n_test volumes
    whatever ``n_generated`` is (2000 at 128^3 in ``paper``).
    """
    name = extractor or ctx.cfg.eval.fid_extractor

    def make() -> Tensor:
        ext = ctx.extractor_for(name)
        x, _ = ctx.test()
        feats_real = features(ctx, x, name)
        best_d = torch.full((len(x),), math.inf, dtype=torch.float64)
        best = torch.empty_like(x)
        n = max(ctx.cfg.eval.n_generated, len(x))
        for chunk, _ in ctx.generate(n, 0):
            d = torch.cdist(feats_real, ext(chunk.to(ctx.device)).double().cpu())
            d_min, arg = d.min(dim=1)
            better = d_min < best_d
            best_d = torch.where(better, d_min, best_d)
            best[better] = chunk[arg[better]].float()
        return best

    return ctx.cached(("nearest_samples", name), make)


def paired_volumes(ctx: EvalContext) -> tuple[Tensor, Tensor, str]:
    """Each test subject's real volume beside what the method makes for it (DESIGN §5 pairing): the
    reconstruction (encoder methods), the sample for its own clinical vector (conditional), else the nearest
    generated sample in feature space."""

    def make() -> tuple[Tensor, Tensor, str]:
        x, c = ctx.test()
        bs = ctx.cfg.eval.batch_size
        ctx.method.eval()
        if ctx.method.has_encoder:
            fake = torch.cat([ctx.method.reconstruct(x[i : i + bs].to(ctx.device), c[i : i + bs].to(ctx.device))
                              .cpu() for i in range(0, len(x), bs)])
            return x, fake.float(), "reconstruction"
        if ctx.method.conditional:
            return x, torch.cat([v for v, _ in ctx.generate(len(x), 0, c=c)]).float(), "conditional_sample"
        return x, nearest_samples(ctx), f"nearest_sample_in_feature_space ({ctx.cfg.eval.fid_extractor})"

    return ctx.cached(("paired", ctx.cfg.eval.fid_extractor), make)


def nearest_pairs(ctx: EvalContext) -> tuple[Tensor, Tensor, str]:
    """The pairing every method can take (Table 3 like-for-like): each test subject beside the nearest of the
    method's unconditional/prior samples in the default FID extractor's feature space."""
    x, _ = ctx.test()
    return x, nearest_samples(ctx), f"nearest_sample_in_feature_space ({ctx.cfg.eval.fid_extractor})"


def _with_ci(ctx: EvalContext, name: str, per_volume: np.ndarray, pairing: str) -> dict[str, float]:
    from metrics.stats import bootstrap_ci

    low, high = bootstrap_ci(per_volume, n_boot=ctx.cfg.eval.bootstrap, seed=ctx.cfg.train.seed)
    ctx.notes[f"pairing.{name}"] = pairing
    return {name: float(per_volume.mean()), f"{name}_std": float(per_volume.std(ddof=1)) if len(per_volume) > 1
            else 0.0, f"{name}_ci_low": float(low), f"{name}_ci_high": float(high), f"{name}_n": float(len(per_volume))}


def _ssim(ctx: EvalContext, name: str, pairs: tuple[Tensor, Tensor, str]) -> dict[str, float]:
    from metrics.ssim import ssim_triplanar

    real, fake, pairing = pairs
    return _with_ci(ctx, name, ssim_triplanar(real, fake, n=ctx.cfg.eval.n_slices).double().numpy(), pairing)


def _lpips(ctx: EvalContext, infix: str, pairs: tuple[Tensor, Tensor, str]) -> dict[str, float]:
    from metrics.lpips import lpips_triplanar, metric_name

    name = metric_name(ctx.cfg.eval.lpips_net, ctx.cfg.eval.lpips_backbone).replace("lpips_", f"lpips_{infix}", 1)
    real, fake, pairing = pairs
    values = lpips_triplanar(real, fake, net=ctx.cfg.eval.lpips_net, n=ctx.cfg.eval.n_slices,
                             backbone=ctx.cfg.eval.lpips_backbone).double().numpy()
    return _with_ci(ctx, name, values, pairing)


@_register("ssim_triplanar")
def ssim_triplanar_metric(ctx: EvalContext) -> dict[str, float]:
    """Tri-planar SSIM (32 slices per plane inside the brain box, Gaussian sigma 1.5), per-volume mean."""
    return _ssim(ctx, "ssim_triplanar", paired_volumes(ctx))


@_register("lpips_triplanar_alex")
def lpips_triplanar_metric(ctx: EvalContext) -> dict[str, float]:
    """Tri-planar LPIPS (AlexNet, slices in [-1, 1]); `_alexrand` when the random-backbone variant is chosen."""
    return _lpips(ctx, "", paired_volumes(ctx))


@_register("ssim_nn_triplanar")
def ssim_nn_triplanar_metric(ctx: EvalContext) -> dict[str, float]:
    """Tri-planar SSIM with one pairing for every method: each test subject vs its nearest generated sample."""
    return _ssim(ctx, "ssim_nn_triplanar", nearest_pairs(ctx))


@_register("lpips_nn_triplanar_alex")
def lpips_nn_triplanar_metric(ctx: EvalContext) -> dict[str, float]:
    """Tri-planar LPIPS with one pairing for every method: each test subject vs its nearest generated sample."""
    return _lpips(ctx, "nn_", nearest_pairs(ctx))


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
    if not ctx.method.conditional:
        raise MetricUnavailable(f"{type(ctx.method).__name__} is unconditional: no requested clinical vector")
    return ctx.cached(("clinical",), lambda: _clinical_predictions(ctx))


def _clinical_predictions(ctx: EvalContext) -> dict[str, np.ndarray]:
    import tempfile

    from benchmark.data.synthetic import measure_roi_ratios
    from metrics.volumetry import measure_with_synthseg, synthseg_available

    n = ctx.cfg.eval.n_prior_vectors
    c = ctx.prior_vectors(n, draw=0)
    labels, ratios, measured = [], [], []
    # Volumetry outside training (DESIGN §5): the synthetic cohort's known intensity classes, or SynthSeg on real
    # cohorts when `mri_synthseg` is on PATH (generated volumes are written with the cohort's affine).
    synthseg = not ctx.bundle.is_synthetic and synthseg_available()
    tmp = tempfile.TemporaryDirectory(prefix="synthseg-") if synthseg else None
    paths: list[Path] = []
    affine = _cohort_affine(ctx) if synthseg else None
    for x, _ in ctx.generate(n, 0, c=c):
        lab, rat = _head_predictions(ctx, x)
        labels.append(lab)
        ratios.append(rat)
        if ctx.bundle.is_synthetic:
            measured.append(np.asarray(measure_roi_ratios(x)))
        elif tmp is not None:
            from benchmark.generate import write_nifti

            for v in x:
                paths.append(write_nifti(v, Path(tmp.name) / "in" / f"gen_{len(paths):05d}.nii.gz", affine))
    raw = np.asarray(ctx.bundle.normalizer.inverse(c))
    out = {"requested_label": raw[:, 6].round().astype(int), "requested_ratios": raw[:, :6],
           "pred_label": np.concatenate(labels), "pred_ratios": np.concatenate(ratios)}
    if measured:
        out["measured_ratios"] = np.concatenate(measured)
        ctx.notes["note.volume_consistency"] = "measured by the synthetic cohort's intensity classes"
    elif tmp is not None:
        with tmp:
            out["measured_ratios"] = measure_with_synthseg(paths, Path(tmp.name) / "synthseg")
        ctx.notes["note.volume_consistency"] = "measured by SynthSeg (mri_synthseg)"
    return out


def _cohort_affine(ctx: EvalContext) -> np.ndarray:
    """The voxel-to-world affine of the cohort's first image (every prepared volume shares the cube's spacing)."""
    import nibabel as nib

    cohort = ctx.bundle.cohort
    return nib.load(str(cohort.root / cohort.table["image"].iloc[0])).affine


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
        raise MetricUnavailable("volumetric consistency on real data needs SynthSeg: install FreeSurfer >= 7.3 (which "
                                "ships mri_synthseg) or SynthSeg and put `mri_synthseg` on PATH")
    return {f"volume_{k}": float(v) for k, v in consistency(p["measured_ratios"], p["requested_ratios"]).items()}


def features(ctx: EvalContext, x: Tensor, extractor: str | None = None) -> Tensor:
    """Features [N, F] (float64, CPU) of volumes ``x`` under ``extractor`` (default ``eval.fid_extractor``)."""
    ext = ctx.extractor_for(extractor or ctx.cfg.eval.fid_extractor)
    with torch.no_grad():
        return torch.cat([ext(xb.to(ctx.device)).double().cpu() for xb in x.split(ctx.cfg.eval.batch_size)])


def memorization(ctx: EvalContext) -> dict[str, Any]:
    """Nearest-train / nearest-test distances of ``eval.n_generated`` samples (draw 0) and of the validation split
    (the unseen-real reference), in the default extractor's features and in 1 - SSIM; plus the closest pairs."""
    from metrics.memorization import closest_pairs, nn_ratio, nn_ratio_ssim

    def make() -> dict[str, Any]:
        gen = torch.cat([x for x, _ in ctx.generate(ctx.cfg.eval.n_generated, draw=0)])
        train, _ = ctx.bundle.tensors("train")
        test, _ = ctx.test()
        val, _ = ctx.bundle.tensors("val")
        f_gen, f_train, f_test, f_val = (features(ctx, v) for v in (gen, train, test, val))
        k = min(ctx.cfg.utility.memo_ssim_n, len(gen))
        return {"ratios": nn_ratio(f_gen, f_train, f_test), "reference": nn_ratio(f_val, f_train, f_test),
                "ratios_ssim": nn_ratio_ssim(gen[:k], train, test, n=ctx.cfg.eval.n_slices),
                "reference_ssim": nn_ratio_ssim(val[:k], train, test, n=ctx.cfg.eval.n_slices),
                "gen": gen, "train": train, "pairs": closest_pairs(f_gen, f_train, k=5),
                "note": (f"{len(gen)} generated vs {len(train)} train / {len(test)} test volumes "
                         f"({ctx.extractor.name} features; SSIM on {k}); reference = {len(val)} "
                         "validation volumes (unseen real subjects)")}

    return ctx.cached(("memorization", ctx.cfg.eval.fid_extractor), make)


@_register("nn_ratio")
def nn_ratio_metric(ctx: EvalContext) -> dict[str, float]:
    """Memorization: nearest-training / nearest-test distance of generated volumes (FID features and 1 - SSIM),
    beside the same ratio for unseen real volumes (validation split) as the no-memorization reference."""
    from metrics.memorization import summary

    memo = memorization(ctx)
    ctx.notes["note.nn_ratio"] = memo["note"]
    out: dict[str, float] = {}
    for prefix, key in (("nn_ratio", "ratios"), ("nn_ratio_ref", "reference"), ("nn_ratio_ssim", "ratios_ssim"),
                        ("nn_ratio_ssim_ref", "reference_ssim")):
        stats = summary(memo[key], ctx.cfg.utility.memo_threshold)
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
