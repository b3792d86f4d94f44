"""run(cfg, tracker) -> result: the only place that trains a method and then evaluates it.

A method's run folder (``runs/<method>-<digest>``) holds its checkpoint, resolved config, split and final
metrics JSON; the MLflow run id is stored there too, so ``--resume`` continues the same MLflow run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmark import dist
from benchmark.config import Config, digest, flatten, to_json
from benchmark.data.bundle import DataBundle, load_bundle
from benchmark.registry import METHODS
from benchmark.tracking import Tracker

RUNS_DIR = Path("runs")
# Keys that change neither training nor results (where files go, progress, evaluation sizes for train-only digests).
NON_RESULT_KEYS = ("tracking.config_file", "tracking.experiment", "train.device", "train.num_threads",
                   # the utility suite's settings act after a generator is trained: they never retrain it
                   "utility.n_synthetic", "utility.seeds", "utility.epochs", "utility.memo_ssim_n",
                   "utility.memo_threshold")


@dataclass
class SharedStages:
    """What every method of a suite shares: data, frozen heads, diffusion prior."""

    bundle: DataBundle
    heads: Any
    heads_info: dict[str, Any]
    prior: Any
    prior_info: dict[str, Any]
    heads_key: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    fid_net: Any = None  # the evaluation-only FID extractor (`fid_resnet18`); no training loss sees it
    fid_info: dict[str, Any] = field(default_factory=dict)


def perceptual_backbone(cfg: Config, method: Any) -> str:
    """The perceptual network a row trained with (`model.perceptual_backbone`), or "none" without L_perc."""
    return cfg.model.perceptual_backbone if getattr(method, "perceptual", None) is not None else "none"


def stage_metrics(stages: SharedStages) -> dict[str, float]:
    """The shared stages' own test figures (heads BAC/R^2, FID network probe BAC/R^2), logged beside every FID."""
    info = {**stages.heads_info, **stages.fid_info}
    return {f"stage.{k}": float(v) for k, v in info.items() if isinstance(v, (int, float)) and k != "digest"}


def run_digest(cfg: Config) -> str:
    return digest(cfg, exclude=NON_RESULT_KEYS)


def default_run_dir(cfg: Config) -> Path:
    return RUNS_DIR / f"{cfg.method}-{run_digest(cfg)}"


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")
    os.replace(tmp, path)


def prepare_stages(cfg: Config, progress: bool = True) -> SharedStages:
    from benchmark.stages import get_fid_network, get_heads, get_prior, heads_digest

    bundle = load_bundle(cfg, progress=progress)
    heads, heads_info = get_heads(cfg, bundle, progress=progress)
    prior, prior_info = get_prior(cfg, bundle, progress=progress)
    fid_net, fid_info = get_fid_network(cfg, bundle, progress=progress)
    tags = {"data_source": bundle.source, "split_fingerprint": bundle.fingerprint, "preset": cfg.preset,
            "heads_digest": heads_info.get("digest", ""), "prior_digest": prior_info.get("digest", ""),
            "fidnet_digest": fid_info.get("digest", "")}
    return SharedStages(bundle, heads, heads_info, prior, prior_info, heads_digest(cfg, bundle), tags, fid_net,
                        fid_info)


def build_method(cfg: Config, heads: Any = None) -> Any:
    from benchmark.catalog import load_all

    load_all()
    return METHODS.get(cfg.method)(cfg, heads=heads)


@dataclass
class TrainingSetup:
    """Everything a training run needs besides the loop: the method and its data streams and validator."""

    method: Any
    train_data: Any  # benchmark.train.BatchSource
    val_data: Any
    validator: Any  # method -> {"val_fid": ...}


def prepare_training(cfg: Config, stages: SharedStages) -> TrainingSetup:
    """The one way to set up training (runner, suites and tuning all use it): the method on the shared stages, the
    seeded training batches (with the conventional augmentation when configured), fixed validation batches, and
    the validation FID on the evaluation-only network."""
    return TrainingSetup(build_method(cfg, stages.heads), *_batch_sources(cfg, stages.bundle),
                         _val_fid_validator(cfg, stages))


def _batch_sources(cfg: Config, bundle: DataBundle) -> tuple[Any, Any]:
    from benchmark.train import BatchSource

    transform = None
    if cfg.data.p_blur or cfg.data.p_noise or cfg.data.p_gamma:
        from benchmark.data.augment import conventional_transform

        transform = conventional_transform(cfg.data.p_blur, cfg.data.p_noise, cfg.data.p_gamma)
    train_src = BatchSource(bundle.dataset("train"), cfg.train.batch_size, cfg.train.seed, transform=transform,
                            normalize=bundle.normalizer.transform)
    val_src = BatchSource(bundle.dataset("val"), min(cfg.train.batch_size, len(bundle.dataset("val"))), seed=12345,
                          normalize=bundle.normalizer.transform)
    return train_src, val_src


def _val_fid_validator(cfg: Config, stages: SharedStages) -> Any:
    """Validation FID against the validation split (paper §2.5 schedules LR and early stopping on it)."""
    from dataclasses import replace

    from benchmark.evaluation import EvalContext
    from metrics.fid import compute_features, fid_from_stats

    def validator(method: Any) -> dict[str, float]:
        small = replace(cfg, eval=replace(cfg.eval, n_draws=1))
        ctx = EvalContext(small, method, stages, device=next(method.parameters(), torch.empty(0)).device)
        n = max(len(stages.bundle.dataset("val")), 16)
        stats = compute_features(ctx.extractor, (x for x, _ in ctx.generate(n, 0)), batch_size=cfg.eval.batch_size)
        return {"val_fid": fid_from_stats(stats, ctx.real_stats("val"))}

    return validator


def run_method(
    cfg: Config,
    stages: SharedStages,
    tracker: Tracker,
    *,
    run_dir: Path | None = None,
    resume: bool = True,
    progress: bool = True,
    metric_names: Sequence[str] | None = None,
    stop_after_volumes: int | None = None,
) -> dict[str, Any]:
    """Train one method x seed on the shared stages, evaluate it, log everything; returns the final metrics."""
    from benchmark.evaluation import EvalContext, evaluate, method_metrics
    from benchmark.train import train

    run_dir = run_dir or default_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup = prepare_training(cfg, stages)
    method = setup.method
    tags = {**stages.tags, "method": cfg.method, "config_digest": run_digest(cfg), "seed": str(cfg.train.seed),
            "perceptual_backbone": perceptual_backbone(cfg, method)}
    if dist.is_main():
        tracker.log_params(flatten(cfg))
        tracker.set_tags(tags)
        tracker.log_metrics(stage_metrics(stages))
        (run_dir / "config.json").write_text(to_json(cfg) + "\n")
        stages.bundle.split.save(run_dir / "split.json")
    if not getattr(method, "needs_training", True):
        # A reference row (baselines/references.py): no training, the same evaluation as every method.
        method.fit(stages.bundle)
        validations = [{"volumes_seen": 0.0, **_val_fid_validator(cfg, stages)(method)}]
        summary: dict[str, Any] = {"method": cfg.method, "volumes_seen": 0, "steps": 0, "stopped_early": False,
                                   "validations": validations}
        elapsed, device = 0.0, torch.device("cpu")
        if not dist.is_main():
            return {**summary, "finished": False}
    else:
        # Validation FID on the evaluation-only network at every validation, whatever the schedules watch: the
        # learning curve every method shares (encoder methods add val_l1).
        result = train(method, cfg, setup.train_data, run_dir, tracker=tracker, val_data=setup.val_data,
                       extra_validator=setup.validator, resume=resume, progress=progress,
                       stop_after_volumes=stop_after_volumes)
        if result.interrupted:
            raise KeyboardInterrupt
        summary = {"method": cfg.method, "volumes_seen": result.state.volumes_seen, "steps": result.state.step,
                   "stopped_early": result.state.stopped_early, "validations": result.state.validations}
        budget_done = result.state.volumes_seen >= cfg.train.budget_volumes or result.state.stopped_early
        if not budget_done or not dist.is_main():
            return {**summary, "finished": False}
        elapsed, device = result.state.elapsed_s, next(method.parameters()).device
    ctx = EvalContext(cfg, method, stages, device=device, progress=progress)
    metrics = evaluate(ctx, list(metric_names or method_metrics(method)))
    # Timings go to the tracker only: metrics.json stays a pure function of config and seed.
    tracker.log_metrics({"time_train_s": elapsed, "time_per_volume_ms": _inference_ms(ctx)})
    tracker.log_metrics(metrics)
    tracker.set_tags({**ctx.notes, "evaluated": "1"})
    _log_artifacts(ctx, tracker, run_dir, cfg)
    final = {**summary, "finished": True, "metrics": metrics, "notes": ctx.notes}
    write_json_atomic(run_dir / "metrics.json", final)
    tracker.log_artifact(run_dir / "metrics.json")
    return final


def _inference_ms(ctx: Any) -> float:
    """Median wall time to generate one volume at batch 1 (paper §3.5 / Table S1), after one warm-up."""
    import time

    c = ctx.prior_vectors(1, draw=0).to(ctx.device) if ctx.method.conditional else None
    times = []
    for _ in range(4):
        t = time.perf_counter()
        ctx.method.sample(1, c, generator=torch.Generator().manual_seed(0))
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return float(sorted(times[1:])[1] * 1000)


def _log_artifacts(ctx: Any, tracker: Tracker, run_dir: Path, cfg: Config) -> None:
    """Slice grid (real vs output), a few generated NIfTI volumes, the resolved config, split and final weights."""
    from benchmark.evaluation import clinical_predictions
    from benchmark.figures import triplanar_grid, volume_scatter
    from benchmark.generate import write_nifti

    x, c = ctx.test()
    rows: dict[str, Any] = {"real": x[0]}
    if ctx.method.has_encoder:
        rows["reconstruction"] = ctx.method.reconstruct(x[:1].to(ctx.device), c[:1].to(ctx.device))[0].cpu()
    sample, _ = next(ctx.generate(min(2, cfg.eval.batch_size), draw=99, c=c[:2] if ctx.method.conditional else None))
    rows["sample"] = sample[0]
    grid = triplanar_grid(rows, run_dir / "slices.png", title=cfg.method)
    tracker.log_artifact(grid, "figures")
    for i, vol in enumerate(sample[:2]):
        path = write_nifti(vol, run_dir / "samples" / f"sample_{i}.nii.gz")
        tracker.log_artifact(path, "samples")
    points = clinical_predictions(ctx) if ctx.method.conditional else {}
    if "measured_ratios" in points:
        from benchmark.data.contract import STRUCTURES
        from metrics.volumetry import consistency

        measured, requested = points["measured_ratios"], points["requested_ratios"]
        fig = volume_scatter(measured, requested, STRUCTURES, consistency(measured, requested),
                             run_dir / "volumes.png")
        tracker.log_artifact(fig, "figures")
    tracker.log_artifact(run_dir / "config.json")
    tracker.log_artifact(run_dir / "split.json")
    weights = run_dir / "weights.pt"
    tmp = weights.with_name(".weights.pt.tmp")
    torch.save({"method": ctx.method.state_dict(), "config": flatten(cfg),
                "normalizer": ctx.bundle.normalizer.state_dict(), "heads_digest": ctx.stages.heads_key,
                "prior": ctx.prior.state_dict()}, tmp)
    os.replace(tmp, weights)
    tracker.log_artifact(weights, "weights")


def load_trained(checkpoint: Path, overrides: dict[str, Any] | None = None) -> tuple[Config, Any, SharedStages]:
    """Rebuild a trained method (and its shared stages) from a run folder's weights.pt or checkpoint.pt."""
    from benchmark.config import apply_overrides, resolve

    path = Path(checkpoint)
    if path.is_dir():
        path = path / "weights.pt" if (path / "weights.pt").is_file() else path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    flat = dict(payload["config"])
    cfg = resolve(flat.pop("preset"), method=flat.pop("method"))
    cfg = apply_overrides(cfg, {**flat, **(overrides or {})})
    stages = prepare_stages(cfg, progress=False)
    return cfg, load_method(cfg, stages, payload["method"]), stages


def load_method(cfg: Config, stages: SharedStages, state: dict[str, Any] | Path) -> Any:
    """The method of ``cfg`` on the shared stages with trained weights (a state dict or a weights.pt file)."""
    if not isinstance(state, dict):
        state = torch.load(state, map_location="cpu", weights_only=True)["method"]
    method = build_method(cfg, stages.heads)
    if not getattr(method, "needs_training", True):
        return method.fit(stages.bundle).eval()
    method.setup_ema(cfg.train.ema_decay)
    method.load_state_dict(state)
    return method.eval()


