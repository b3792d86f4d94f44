"""Optuna studies over the six loss weights of paper Eq. (2), on one machine or many.

    python -m benchmark tune --method ours --trials 20 --preset quick                  # journal file, 1 worker
    python -m benchmark tune --method ours --trials 40 --workers 4                     # 4 processes, one study
    python -m benchmark tune --trials 200 --storage postgresql://user:pw@db/optuna     # run on every machine

The paper's weights are enqueued as the first trial; TPE is seeded; median pruning acts on intermediate
validation FID. Every trial is a child MLflow run of the study's parent run (tag ``mlflow.parentRunId``),
created by our own small callback logic so that it works across worker processes (``optuna_integration``'s
MLflowCallback is deprecated). Trials of a killed worker are failed by the heartbeat and retried.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmark.config import Config, LossConfig, apply_overrides, digest, flatten
from benchmark.runner import write_json_atomic

LOSS_KEYS = ("rec", "kl", "adv", "perc", "cls", "reg")
HEARTBEAT_S = 30


def default_storage() -> str:
    return "optuna-journal.log"


def open_storage(url: str) -> Any:
    """A journal file (safe for several processes on one machine) or an RDB URL (many machines); a URL that is
    malformed or unreachable, a driver that is missing or a journal that cannot be written is one line
    (:class:`benchmark.errors.StoreError`)."""
    from benchmark.errors import StoreError

    failures: tuple[type[BaseException], ...] = (OSError, ImportError, ValueError)
    try:
        from sqlalchemy.exc import SQLAlchemyError

        failures += (SQLAlchemyError,)
    except ImportError:  # pragma: no cover - sqlalchemy comes with optuna
        pass
    try:
        return _open_storage(url)
    except failures as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__).strip()
        shown = re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)  # no password in the message
        raise StoreError(f"Optuna storage {shown!r} cannot be used: {first[:300]}") from None


def _open_storage(url: str) -> Any:
    import optuna

    if "://" in url:
        # A worker that dies stops its heartbeat; after the grace period its trial is failed and queued again.
        import warnings

        from optuna.storages import RetryHeartbeatStaleTrialCallback

        with warnings.catch_warnings():  # heartbeats are "experimental" in optuna 5 yet the documented way
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = RetryHeartbeatStaleTrialCallback(max_retry=2)
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=2 * HEARTBEAT_S,
                                              heartbeat_stale_trial_callback=retry)
    from optuna.storages.journal import JournalFileBackend

    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(url)))


def suggest_weights(trial: Any, cfg: Config) -> dict[str, float]:
    """Log-uniform around the paper's weights: [w * low, w * high] for each of the six."""
    paper = LossConfig()
    return {f"loss.{k}": trial.suggest_float(k, getattr(paper, k) * cfg.tune.lambda_low,
                                             getattr(paper, k) * cfg.tune.lambda_high, log=True)
            for k in LOSS_KEYS}


def _directions(cfg: Config) -> list[str]:
    return ["minimize"] * len(cfg.tune.objective.split(","))


def create_study(cfg: Config, name: str, storage: Any, worker: int = 0) -> Any:
    """Create or load the study. Each worker seeds its TPE sampler with its own index: workers seeded alike
    propose the same parameters from the same history (measured: trials 1 and 3, 2 and 5 ... came out identical)."""
    import optuna

    multi = len(_directions(cfg)) > 1
    study = optuna.create_study(
        study_name=name, storage=storage, load_if_exists=True, directions=_directions(cfg),
        sampler=optuna.samplers.TPESampler(seed=cfg.train.seed * 1000 + worker),
        pruner=optuna.pruners.NopPruner() if multi else optuna.pruners.MedianPruner(
            n_startup_trials=2, n_warmup_steps=cfg.tune.pruner_warmup),
    )
    if not study.trials:
        paper = LossConfig()
        study.enqueue_trial({k: getattr(paper, k) for k in LOSS_KEYS})
    return study


def objective_factory(cfg: Config, parent_run_id: str | None, progress: bool) -> Any:
    """The objective: train on the trial's weights, report validation FID, return FID (and 1 - BAC)."""

    def objective(trial: Any) -> Any:
        import optuna

        from benchmark.evaluation import EvalContext, evaluate
        from benchmark.plugins import plugin_tags
        from benchmark.runner import prepare_stages, run_digest
        from benchmark.tracking import MlflowTracker, NullTracker
        from benchmark.train import train

        weights = suggest_weights(trial, cfg)
        tcfg = apply_overrides(cfg, weights)
        tcfg = replace(tcfg, train=replace(tcfg.train, val_metric="val_fid", early_stop_patience_volumes=0))
        stages = prepare_stages(tcfg, progress=False)
        tracker: Any = NullTracker()
        if parent_run_id:
            tracker = MlflowTracker.attach(parent_run_id).child(
                f"trial-{trial.number}", tags={"optuna_trial": str(trial.number), "method": tcfg.method,
                                               "config_digest": run_digest(tcfg), **stages.tags,
                                               **plugin_tags(tcfg.method)})
            tracker.log_params({**flatten(tcfg), "optuna.trial": trial.number})
        from benchmark.runner import prepare_training

        setup = prepare_training(tcfg, stages)
        method, fid_validator = setup.method, setup.validator
        multi = len(_directions(cfg)) > 1
        counter = {"n": 0}

        def validator(m: Any) -> dict[str, float]:
            out = fid_validator(m)
            step = counter["n"]
            counter["n"] += 1
            if not multi:
                trial.report(out["val_fid"], step)
                tracker.log_metrics({"optuna.intermediate": out["val_fid"]}, step=step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at validation {step} (val_fid {out['val_fid']:.3f})")
            return out

        run_dir = Path("runs") / "tune" / f"trial-{trial.study.study_name}-{trial.number}-{digest(tcfg)}"
        try:
            result = train(method, tcfg, setup.train_data, run_dir, tracker=tracker, val_data=setup.val_data,
                           extra_validator=validator, resume=False, progress=progress)
            fid = result.state.validations[-1]["val_fid"] if result.state.validations else math.inf
            values: list[float] = [fid]
            if multi:
                ctx = EvalContext(tcfg, method, stages)
                bac = evaluate(ctx, ["bac"]).get("bac", 0.5)
                values.append(1.0 - bac)
                tracker.log_metrics({"val_1_minus_bac": 1.0 - bac})
            tracker.log_metrics({"objective": fid})
            tracker.set_tags({"optuna_state": "COMPLETE"})
            tracker.finish("FINISHED")
            return tuple(values) if multi else fid
        except optuna.TrialPruned:
            tracker.set_tags({"optuna_state": "PRUNED"})
            tracker.finish("KILLED")
            raise
        except BaseException:
            tracker.set_tags({"optuna_state": "FAIL"})
            tracker.finish("FAILED")
            raise

    return objective


def _worker(cfg_flat: dict[str, Any], study_name: str, storage_url: str, trials: int, parent_run_id: str | None,
            timeout: float | None, progress: bool, worker: int = 0) -> None:
    import optuna
    from optuna.trial import TrialState

    from benchmark.catalog import load_all
    from benchmark.config import resolve

    load_all()  # a spawned worker: the built-in methods, and the plugins named in BENCHMARK_PLUGINS
    flat = dict(cfg_flat)
    cfg = resolve(flat.pop("preset"), method=flat.pop("method"), overrides=flat)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(storage_url)
    study = create_study(cfg, study_name, storage, worker)
    # catch: a trial that raises is recorded as FAIL (and in MLflow) and the worker goes on to the next one
    study.optimize(objective_factory(cfg, parent_run_id, progress), timeout=timeout, catch=(Exception,),
                   callbacks=[optuna.study.MaxTrialsCallback(trials, states=(TrialState.COMPLETE,
                                                                             TrialState.PRUNED))])


def export_best(study: Any, cfg: Config, path: Path) -> Path | None:
    """The best trial's weights as a config file that `run`/`train` accept via ``--config``."""
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not complete:
        return None
    best = study.best_trials[0] if len(_directions(cfg)) > 1 else study.best_trial
    data = {"method": cfg.method, **{f"loss.{k}": float(v) for k, v in best.params.items()}}
    write_json_atomic(path, data)
    return path


def tune_command(cfg: Config, *, trials: int, study: str | None, storage: str | None, workers: int,
                 timeout: float | None, progress: bool) -> int:
    import optuna

    from benchmark.runner import prepare_stages
    from benchmark.tracking import MlflowTracker, find_runs

    storage_url = storage or default_storage()
    name = study or f"{cfg.method}-{cfg.preset}-{digest(replace(cfg, loss=LossConfig()))}"
    open_storage(storage_url)  # a storage that cannot be used fails here, in one line, before any training
    prepare_stages(cfg, progress=progress)  # heads/prior cached once, before workers race for them
    existing = find_runs("tune", f"tags.optuna_study = '{name}' and tags.kind = 'study'")
    if existing:
        parent = MlflowTracker.attach(existing[0].run_id)
    else:
        parent = MlflowTracker.start("tune", f"study-{name}", tags={"optuna_study": name, "kind": "study",
                                                                    "method": cfg.method, "preset": cfg.preset})
        parent.log_params({"storage": storage_url if "://" not in storage_url else storage_url.split("@")[-1],
                           "trials": trials, "objective": cfg.tune.objective})
    study_obj = create_study(cfg, name, open_storage(storage_url))
    cfg_flat = flatten(cfg)
    args = (cfg_flat, name, storage_url, trials, parent.run_id, timeout, progress and workers == 1)
    if workers <= 1:
        _worker(*args)
    else:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(*args, k)) for k in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    study_obj = optuna.load_study(study_name=name, storage=open_storage(storage_url))
    states = {s: sum(t.state.name == s for t in study_obj.trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    parent.log_metrics({f"trials_{k.lower()}": float(v) for k, v in states.items()})
    best_path = export_best(study_obj, cfg, Path("runs") / "tune" / f"{name}-best.json")
    if best_path is not None:
        parent.log_artifact(best_path)
        best = json.loads(best_path.read_text())
        print(f"study {name}: {states}; best weights -> {best_path}")
        print(json.dumps(best, indent=2))
        if len(_directions(cfg)) == 1:
            parent.log_metrics({"best_val_fid": float(study_obj.best_value)})
    parent.finish("FINISHED")
    return 0 if best_path is not None else 1


