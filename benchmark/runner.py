"""run(cfg, tracker) -> result: the only place that trains a method and then evaluates it.

A method's run folder (``runs/<method>-<digest>``) holds its checkpoint, resolved config, split and final
metrics JSON; the MLflow run id is stored there too, so ``--resume`` continues the same MLflow run.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmark import dist
from benchmark.config import Config, digest, flatten, to_json
from benchmark.data.bundle import DataBundle, load_bundle
from benchmark.plugins import plugin_tags
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


@contextlib.contextmanager
def folder_lock(folder: Path, what: str = "") -> Iterator[None]:
    """Hold ``<folder>/.lock`` (an OS file lock, released when the process ends however it ends) for the block.

    Two processes that would write the same run folder (two ``run --suite`` on one store and folder) take turns:
    the second waits, then finds the first one's finished run and reuses it instead of training it again.
    """
    from filelock import FileLock, Timeout

    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"{what or folder}: waiting for another process working in {folder}", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def prepare_stages(cfg: Config, progress: bool = True) -> SharedStages:
    from benchmark.stages import get_fid_network, get_heads, get_prior, heads_digest

    # One process at a time per stage cache: a second one waits and loads what the first has just trained.
    with folder_lock(Path(cfg.data.cache_dir), "shared stages"):
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
    method = build_method(cfg, stages.heads)
    init = getattr(method, "init_from_data", None)  # plugins need not subclass GenerativeMethod
    if init is not None and getattr(method, "needs_training", True):
        init(stages.bundle.dataset("train"))  # a resumed run then restores its own state
    return TrainingSetup(method, *_batch_sources(cfg, stages.bundle), _val_fid_validator(cfg, stages))


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
    from benchmark.resources import peaks, reset_peaks
    from benchmark.train import train

    run_dir = run_dir or default_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    reset_peaks()  # this child's own peak memory, not the suite's so far
    setup = prepare_training(cfg, stages)
    method = setup.method
    tags = {**stages.tags, "method": cfg.method, "config_digest": run_digest(cfg), "seed": str(cfg.train.seed),
            "perceptual_backbone": perceptual_backbone(cfg, method), **plugin_tags(cfg.method)}
    if dist.is_main():
        tracker.log_params(flatten(cfg))
        tracker.set_tags(tags)
        tracker.log_metrics(stage_metrics(stages))
        (run_dir / "config.json").write_text(to_json(cfg) + "\n")
        stages.bundle.split.save(run_dir / "split.json")
        bundle = stages.bundle  # the runs table's Dataset column: which cohort and split this run saw
        tracker.log_dataset(bundle.split_table(), name=bundle.source, source=str(bundle.cohort.root.resolve()),
                            digest=bundle.fingerprint)
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
    tracker.log_metrics({"time_train_s": elapsed, "time_per_volume_ms": _inference_ms(ctx), **peaks()})
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
    if getattr(ctx.method, "needs_training", True):  # reference rows are the training data, not a model
        _log_generator_model(ctx, tracker, cfg)


def _log_generator_model(ctx: Any, tracker: Tracker, cfg: Config) -> None:
    """The generator as an MLflow pyfunc model (``runs:/<id>/generator``; benchmark/generator_model.py). A method
    that cannot be saved whole (e.g. a plugin holding an unpicklable object) keeps its run: the reason is a tag."""
    import tempfile

    from benchmark.generator_model import save_generator, signature_spec
    from benchmark.tracking import log_generator_model

    try:
        with tempfile.TemporaryDirectory(prefix="bm-generator-") as tmp:
            data = save_generator(ctx.method, ctx.bundle.normalizer, cfg.eval.batch_size, Path(tmp) / "data")
            log_generator_model(tracker, data, signature_spec(ctx.method))
    except Exception as err:  # noqa: BLE001 - the weights artifact above still serves generate/evaluate
        reason = f"{type(err).__name__}: {err}".replace("\n", " ")[:500]
        tracker.set_tags({"generator_model_error": reason})
        print(f"{cfg.method}: the generator was not logged as an MLflow model ({reason})", file=sys.stderr)


def load_trained(checkpoint: Path, overrides: dict[str, Any] | None = None) -> tuple[Config, Any, SharedStages]:
    """Rebuild a trained method (and its shared stages) from a run folder's weights.pt or checkpoint.pt.

    A missing, unreadable or incompatible checkpoint (config keys this code does not know, weights that do not fit
    the method its config builds) is a one-line :class:`CheckpointError`, found before any data or stage is built.
    """
    from benchmark.config import ConfigError, apply_overrides, resolve, validate
    from benchmark.errors import CheckpointError
    from benchmark.train import load_checkpoint

    path = Path(checkpoint)
    if path.is_dir():
        path = path / "weights.pt" if (path / "weights.pt").is_file() else path / "checkpoint.pt"
    payload = load_checkpoint(path)
    flat = dict(payload["config"])
    unknown = sorted(set(flat) - set(flatten(Config())))
    if unknown:
        raise CheckpointError(f"{path}: saved with config keys this code does not have: {_some(unknown)} "
                              "(written by another version of the benchmark?)")
    try:
        cfg = resolve(str(flat.pop("preset", "smoke")), method=str(flat.pop("method", "")), overrides=flat)
    except ConfigError as err:
        raise CheckpointError(f"{path}: its saved config is invalid here: {err}") from None
    saved = flatten(cfg)
    cfg = validate(apply_overrides(cfg, overrides or {}))
    changed = {k: (saved[k], v) for k, v in flatten(cfg).items() if saved[k] != v}
    mismatch = state_mismatch(_meta_state_shapes(cfg), payload["method"])
    if mismatch:
        why = "; ".join(f"{k}={new!r} (saved: {old!r})" for k, (old, new) in changed.items())
        raise CheckpointError(f"{path}: weights do not fit {cfg.method} as configured"
                              + (f" with {why}" if why else "") + f": {mismatch}")
    stages = prepare_stages(cfg, progress=False)
    return cfg, load_method(cfg, stages, payload["method"]), stages


class MetaHeads:
    """Stands in for the frozen heads where a method is only built to count or compare its parameters (on the meta
    device: nothing allocated); the heads are not part of any generator's state_dict."""

    def losses(self, x: Any, c: Any, classifier_maps: Any = None) -> dict[str, Any]:  # pragma: no cover - counting
        raise RuntimeError("meta heads are for parameter counting only")

    def features(self, x: Any) -> Any:  # pragma: no cover
        raise RuntimeError("meta heads are for parameter counting only")


def _meta_state_shapes(cfg: Config) -> dict[str, tuple[int, ...]] | None:
    """{key: shape} of the state_dict a trained ``cfg.method`` has (built on the meta device, with its EMA); None
    for a reference row, which has no trained weights."""
    from benchmark.catalog import load_all

    load_all()
    with torch.device("meta"):
        method = METHODS.get(cfg.method)(cfg, heads=MetaHeads())
        if not getattr(method, "needs_training", True):
            return None
        method.setup_ema(cfg.train.ema_decay)
    return {k: tuple(v.shape) for k, v in method.state_dict().items()}


def state_mismatch(expected: dict[str, tuple[int, ...]] | None, state: dict[str, Any]) -> str:
    """What differs between the state_dict a method expects (key -> shape) and a saved one, in one line ("" when
    they fit): missing keys, unexpected keys, and shapes that differ."""
    if expected is None:
        return ""
    got = {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k} {list(got[k])} saved vs {list(expected[k])}" for k in expected
              if k in got and got[k] != expected[k]]
    parts = [f"{len(shapes)} shape(s) differ: {_some(shapes, 3)}" if shapes else "",
             f"{len(missing)} key(s) missing: {_some(missing)}" if missing else "",
             f"{len(unexpected)} unexpected key(s): {_some(unexpected)}" if unexpected else ""]
    return "; ".join(p for p in parts if p)


def _some(items: Sequence[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def load_method(cfg: Config, stages: SharedStages, state: dict[str, Any] | Path) -> Any:
    """The method of ``cfg`` on the shared stages with trained weights (a state dict or a weights.pt file)."""
    from benchmark.errors import CheckpointError
    from benchmark.train import load_checkpoint

    where = "weights"
    if not isinstance(state, dict):
        where, state = str(state), load_checkpoint(state)["method"]
    method = build_method(cfg, stages.heads)
    if not getattr(method, "needs_training", True):
        return method.fit(stages.bundle).eval()
    method.setup_ema(cfg.train.ema_decay)
    mismatch = state_mismatch({k: tuple(v.shape) for k, v in method.state_dict().items()}, state)
    if mismatch:
        raise CheckpointError(f"{where}: do not fit {cfg.method} as configured: {mismatch}")
    method.load_state_dict(state)
    return method.eval()


