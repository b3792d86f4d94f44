"""Command bodies of the CLI (`train`, `evaluate`, `params`): argument-level glue over :mod:`benchmark.runner`.

``runner`` owns training and evaluating one method; these functions add what a command needs around it (tracker
selection, resume bookkeeping, stage-only training, re-scoring saved runs, parameter tables).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from benchmark import dist
from benchmark.config import Config, flatten
from benchmark.data.bundle import load_bundle
from benchmark.registry import METHODS
from benchmark.runner import MetaHeads, default_run_dir, folder_lock, load_trained, prepare_stages, run_method
from benchmark.tracking import MlflowTracker, NullTracker, Tracker


def open_tracker(cfg: Config, experiment: str, run_name: str, run_dir: Path | None, track: bool) -> Tracker:
    """A new MLflow run, or the one recorded in ``run_dir`` (resume); a NullTracker when tracking is off."""
    if not track or not dist.is_main():
        return NullTracker(run_name)
    id_file = run_dir / "mlflow_run_id" if run_dir else None
    if id_file is not None and id_file.is_file():
        try:
            return MlflowTracker.attach(id_file.read_text().strip())
        except Exception:  # noqa: BLE001 - store was deleted or moved: start a fresh run
            pass
    tracker = MlflowTracker.start(cfg.tracking.experiment or experiment, run_name)
    if id_file is not None:
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(str(tracker.run_id))
    return tracker


STAGE_METHODS = ("heads", "prior")  # shared stages that `train --method` also accepts


def train_stage_command(cfg: Config, *, progress: bool, track: bool) -> dict[str, Any]:
    """``train --method heads|prior``: the shared stage for this data/split, trained once and found again by digest
    (a second call reports the cached one); its test figures are logged to the ``train`` experiment."""
    from benchmark.stages import get_heads, get_prior, stage_path

    bundle = load_bundle(cfg, progress=progress)
    _, info = (get_heads if cfg.method == "heads" else get_prior)(cfg, bundle, progress=progress)
    path = stage_path(cfg, cfg.method, info["digest"])
    tracker = open_tracker(cfg, "train", f"{cfg.method}-seed{cfg.train.seed}", None, track)
    sections = (cfg.method, "data", "train.seed")
    tracker.log_params({k: v for k, v in flatten(cfg).items() if k.startswith(sections)})
    tracker.set_tags({"method": cfg.method, "data_source": bundle.source, "split_fingerprint": bundle.fingerprint,
                      "preset": cfg.preset, "stage_digest": info["digest"], "kind": "stage"})
    tracker.log_metrics({k: v for k, v in info.items() if isinstance(v, float)})
    tracker.finish("FINISHED")
    return {"method": cfg.method, "path": str(path), **info, "run_id": tracker.run_id}


def train_command(cfg: Config, *, resume: bool, progress: bool, track: bool, run_dir: Path | None,
                  stop_after_volumes: int | None = None) -> dict[str, Any]:
    """``python -m benchmark train``: one method, one seed, tracked in the ``train`` experiment."""
    from benchmark.catalog import load_all
    from benchmark.train import resolve_device

    if cfg.method in STAGE_METHODS:
        return train_stage_command(cfg, progress=progress, track=track)
    load_all()
    METHODS.get(cfg.method)  # an unknown method fails before any data is touched
    dist.init_from_env(resolve_device(cfg.train.device))
    run_dir = run_dir or default_run_dir(cfg)
    # The run folder is locked on rank 0 (other ranks write nothing there): a second process on the same folder
    # waits instead of interleaving its checkpoints with this one's.
    lock = folder_lock(run_dir, f"{cfg.method}-seed{cfg.train.seed}") if dist.is_main() else contextlib.nullcontext()
    with lock:
        if not resume and (run_dir / "checkpoint.pt").exists() and dist.is_main():
            (run_dir / "checkpoint.pt").unlink()
            (run_dir / "mlflow_run_id").unlink(missing_ok=True)
        stages = prepare_stages(cfg, progress=progress and dist.is_main())
        tracker = open_tracker(cfg, "train", f"{cfg.method}-seed{cfg.train.seed}", run_dir, track)
        try:
            result = run_method(cfg, stages, tracker, run_dir=run_dir, resume=resume, progress=progress,
                                stop_after_volumes=stop_after_volumes)
        except BaseException:
            tracker.finish("KILLED")
            raise
        finally:
            dist.shutdown()
    tracker.finish("FINISHED" if result.get("finished") else "RUNNING")
    return {**result, "run_dir": str(run_dir), "run_id": tracker.run_id}


def evaluate_command(run_id: str | None, checkpoint: Path | None, metrics: list[str] | None,
                     overrides: dict[str, Any], progress: bool) -> dict[str, Any]:
    """``python -m benchmark evaluate``: re-score any saved run or checkpoint."""
    from benchmark.evaluation import EvalContext, evaluate, method_metrics

    if run_id is not None:
        from benchmark.tracking import download_artifact

        checkpoint = download_artifact(run_id, "weights/weights.pt")
    cfg, method, stages = load_trained(checkpoint, overrides)
    ctx = EvalContext(cfg, method, stages, progress=progress)
    values = evaluate(ctx, metrics or method_metrics(method))
    return {"method": cfg.method, "metrics": values, "notes": ctx.notes}


def param_table(cfg: Config, size: int | None = None) -> dict[str, dict[str, int]]:
    """Parameter counts per component of every registered method at ``size`` (meta device: nothing allocated)."""
    from dataclasses import replace

    from benchmark.catalog import load_all
    from benchmark.config import check_size
    from benchmark.evaluation import paper_counts

    load_all()
    cfg = replace(cfg, data=replace(cfg.data, size=size or cfg.data.size))
    check_size(cfg.data.size, list(METHODS), key="--size" if size else "data.size")
    table: dict[str, dict[str, int]] = {}
    for name, factory in METHODS.items():
        with torch.device("meta"):
            method = factory(replace(cfg, method=name), heads=MetaHeads())
        table[name] = paper_counts(method)
    return table

