"""Suites as pure data (which methods x which metrics), and the driver that runs one under a parent MLflow run.

Shared stages (data, heads, prior, real feature statistics) are computed once; each method x seed is a child run;
a finished child with the same config digest is reused, an unfinished one resumes from its checkpoint; a failing
method is recorded as failed and the others go on (non-zero exit at the end, with a summary).
"""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmark.config import Config
from benchmark.evaluation import CLINICAL_METRICS, TABLE_METRICS
from benchmark.registry import SUITES


@dataclass(frozen=True)
class Suite:
    """A table of the paper: rows are methods, columns metrics."""

    name: str
    title: str
    methods: tuple[str, ...]
    metrics: tuple[str, ...]
    real_row: bool = False  # Table 4's "Real" column: the frozen heads on the test split
    prior_eval: bool = False  # evaluate the diffusion prior (paper §3.4, Fig. 5)
    utility: bool = False  # downstream classifiers and memorization per generator (issue #10)
    # Training-free rows scored by the same protocol (baselines/references.py): the floor and trivial answers.
    references: tuple[str, ...] = ()
    validity: bool = False  # real volumes under graded corruptions (benchmark/validity.py)


def _suite(name: str, title: str, methods: tuple[str, ...], metrics: tuple[str, ...], **kw: Any) -> Suite:
    suite = Suite(name, title, methods, metrics, **kw)
    SUITES.add(name, suite)
    return suite


IMAGE_REFERENCES = ("real", "train_copy", "mean_volume")
TABLE2 = _suite("table2", "Table 2: ablations of the 3D VAE-GAN (#params, FID, SSIM, LPIPS)",
                ("vae", "vaegan", "xvaegan", "xvaegan_clin", "ours"), TABLE_METRICS, references=IMAGE_REFERENCES)
TABLE3 = _suite("table3", "Table 3: baselines on identical data, splits, resolution and budget",
                ("wgan_gp", "stylegan2", "ours"), TABLE_METRICS, references=IMAGE_REFERENCES)
TABLE4 = _suite("table4", "Table 4: clinical consistency (BAC, ROI MSE x1e-5, volumetric consistency)",
                ("ours", "ours_noaux"), CLINICAL_METRICS, real_row=True, references=("train_copy", "mean_volume"))
PRIOR = _suite("prior", "Diffusion prior vs real clinical vectors (MMD, C2ST, W1, correlation; Fig. 5)", (), (),
               prior_eval=True)
UTILITY = _suite("utility", "Downstream utility (AD/CN classifier trained on real / real+synthetic / synthetic, "
                 "test BAC) and memorization (nearest-train / nearest-test distance ratio)",
                 ("wgan_gp", "stylegan2", "ours", "ours_noaux"), ("nn_ratio",), utility=True)
VALIDITY = _suite("validity", "Metric validity: held-out real volumes under graded corruptions (three levels per "
                  "family) scored against the test split", (), (), validity=True)
ALL = ("table2", "table3", "table4", "prior", "utility")
SUITES.add("all", Suite("all", "Every table: table2, table3, table4, prior and utility, sharing stages and "
                        "finished runs", (), ()))


def _child_tags(cfg: Config, suite: str) -> dict[str, str]:
    from benchmark.runner import run_digest

    return {"suite": suite, "method": cfg.method, "seed": str(cfg.train.seed), "config_digest": run_digest(cfg)}


def _finished_child(suite: str, cfg: Config) -> Any:
    """An evaluated run of this exact config in the suite's experiment (reused instead of retraining).

    A FINISHED run wins. A run left RUNNING by a kill after evaluation (its ``metrics.json`` already written, only
    the status update missing) counts too, and is closed as FINISHED here so the next query finds it directly.
    """
    import json

    from benchmark.runner import default_run_dir, run_digest
    from benchmark.tracking import MlflowTracker, find_runs

    runs = [r for r in find_runs(None, f"tags.config_digest = '{run_digest(cfg)}' and tags.method = '{cfg.method}'")
            if r.tags.get("evaluated") == "1" and "reused_from" not in r.tags]
    finished = next((r for r in runs if r.status == "FINISHED"), None)
    if finished is not None:
        return finished
    summary = default_run_dir(cfg) / "metrics.json"
    if not summary.is_file() or not json.loads(summary.read_text()).get("finished"):
        return None
    orphan = next((r for r in runs if r.status == "RUNNING"), None)
    if orphan is not None:
        tracker = MlflowTracker.attach(orphan.run_id)
        tracker.log_artifact(summary)
        tracker.finish("FINISHED")
    return orphan


def run_suite(name: str, cfg: Config, *, seeds: int = 1, progress: bool = True, fresh: bool = False) -> int:
    """Run a suite (or ``all``) and print its tables; returns the exit code."""
    names = ALL if name == "all" else (SUITES.get(name).name,)
    failures: list[str] = []
    for suite_name in names:
        failures += _run_one(SUITES.get(suite_name), cfg, seeds=seeds, progress=progress, fresh=fresh)
    if failures:
        print(f"\n{len(failures)} run(s) failed: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


def _run_one(suite: Suite, cfg: Config, *, seeds: int, progress: bool, fresh: bool) -> list[str]:
    from benchmark import report
    from benchmark.runner import default_run_dir, prepare_stages, run_method, stage_metrics
    from benchmark.tracking import MlflowTracker, TrackingSettings

    t0 = time.perf_counter()
    stages = prepare_stages(cfg, progress=progress)
    experiment = cfg.tracking.experiment or suite.name
    parent = MlflowTracker.start(experiment, f"{suite.name}-{cfg.preset}",
                                 tags={**stages.tags, "suite": suite.name, "seeds": str(seeds),
                                       "kind": "suite"})
    parent.log_params({"suite": suite.name, "preset": cfg.preset, "seeds": seeds,
                       "methods": ",".join(suite.methods)})
    parent.log_metrics(stage_metrics(stages))
    failures: list[str] = []
    timings: dict[str, float] = {}
    utility_rows: dict[str, dict[str, tuple[float, float]]] = {}
    real_arm: dict[str, float] = {}
    if suite.utility:
        real_arm = _real_utility(cfg, stages, parent, progress)
    for method in suite.references + suite.methods:
        for seed in range(seeds):
            mcfg = replace(cfg, method=method, train=replace(cfg.train, seed=cfg.train.seed + seed))
            label = f"{method}-seed{mcfg.train.seed}"
            done = None if fresh else _finished_child(experiment, mcfg)
            start = time.perf_counter()
            try:
                if done is not None:
                    child = parent.child(label, tags={**_child_tags(mcfg, suite.name), "reused_from": done.run_id})
                    child.log_params({k: v for k, v in done.params.items()})
                    child.set_tags({k: v for k, v in done.tags.items() if not k.startswith("mlflow.")})
                    child.log_metrics(done.metrics)
                    print(f"[{suite.name}] {label}: reused finished run {done.run_id}")
                else:
                    run_dir = default_run_dir(mcfg)
                    child = parent.child(label, tags=_child_tags(mcfg, suite.name))
                    what = "reference row, no training" if method in suite.references else \
                        f"training ({mcfg.train.budget_volumes} volumes)"
                    print(f"[{suite.name}] {label}: {what} in {run_dir}")
                    run_method(mcfg, stages, child, run_dir=run_dir, resume=True, progress=progress)
                if suite.utility:
                    utility_rows[label] = _generator_utility(mcfg, stages, child, done, real_arm, progress)
                child.finish("FINISHED")
            except KeyboardInterrupt:
                child.finish("KILLED")
                parent.finish("KILLED")
                raise
            except Exception as err:  # noqa: BLE001 - one failing method must not stop the suite
                child.set_tags({"error": f"{type(err).__name__}: {err}"[:4000]})
                child.log_text(traceback.format_exc(), "error.txt")
                child.finish("FAILED")
                failures.append(f"{suite.name}/{label}: {type(err).__name__}: {err}")
                print(f"[{suite.name}] {label}: FAILED ({type(err).__name__}: {err})", file=sys.stderr)
            if done is None:
                timings[label] = time.perf_counter() - start
    if utility_rows:
        from benchmark.figures import grouped_bars

        fig = grouped_bars(utility_rows, Path("runs") / "utility" / "utility_bac.png", "test balanced accuracy",
                           title="AD/CN classifier trained on real / real+synthetic / synthetic")
        parent.log_artifact(fig, "figures")
    if suite.real_row:
        from benchmark.evaluation import EvalContext, real_clinical_metrics

        ctx = EvalContext(cfg, None, stages)
        parent.log_metrics({f"real.{k}": v for k, v in real_clinical_metrics(ctx).items()})
    if suite.prior_eval:
        _evaluate_prior(cfg, stages, parent)
    if suite.validity:
        _evaluate_validity(cfg, stages, parent, progress)
    parent.log_metrics({f"time.{k}": v for k, v in timings.items()})
    parent.log_metrics({"time.total_s": time.perf_counter() - t0})
    settings = TrackingSettings.load(cfg.tracking.config_file)
    text = report.render_suite(suite.name, fmt="md", parent_run_id=parent.run_id, settings=settings,
                               experiment=experiment)
    print(text)
    for fmt in ("md", "csv", "latex"):
        parent.log_text(report.render_suite(suite.name, fmt=fmt, parent_run_id=parent.run_id, settings=settings,
                                            experiment=experiment), f"tables/{suite.name}.{report.EXT[fmt]}")
    report.log_figures(suite, parent, stages, cfg)
    _log_learning_curves(suite, cfg, parent)
    parent.finish("FAILED" if failures else "FINISHED")
    return failures


def _log_learning_curves(suite: Suite, cfg: Config, parent: Any) -> None:
    """Validation FID / L1 over volumes seen for every method of the suite (seed 0), beside the references'
    final FID as horizontal lines: one figure on the parent run."""
    import json

    from benchmark.figures import learning_curves
    from benchmark.runner import default_run_dir

    curves, refs = {}, {}
    for method in suite.references + suite.methods:
        path = default_run_dir(replace(cfg, method=method)) / "metrics.json"
        if not path.is_file():
            continue
        summary = json.loads(path.read_text())
        if method in suite.references:
            for key, value in (summary.get("validations") or [{}])[0].items():
                if key.startswith("val_"):
                    refs[f"{method}.{key}"] = value
        elif summary.get("validations"):
            curves[method] = summary["validations"]
    if curves:
        out = Path("runs") / f"learning-{suite.name}.png"
        parent.log_artifact(learning_curves(curves, out, references=refs,
                                            title=f"{suite.name}: validation metrics over training"), "figures")


def _evaluate_prior(cfg: Config, stages: Any, parent: Any) -> None:
    """Prior vs the test split's clinical vectors (paper §3.4), with KDE and PCA figures."""
    import numpy as np
    import torch

    from benchmark.data.contract import ROI_NAMES
    from metrics.prior import plot_kde, plot_pca, prior_report

    real = np.asarray(stages.bundle.normalizer.transform(stages.bundle.raw_clinical("test")))
    n = max(cfg.eval.n_prior_vectors, len(real))
    fake = np.asarray(stages.prior.sample(n, generator=torch.Generator().manual_seed(cfg.train.seed)))
    parent.log_metrics({f"prior.{k}": v for k, v in prior_report(real, fake).items()})
    out = Path("runs") / "prior"
    raw_real = np.asarray(stages.bundle.normalizer.inverse(torch.as_tensor(real)))
    raw_fake = np.asarray(stages.bundle.normalizer.inverse(torch.as_tensor(fake)))
    parent.log_artifact(plot_kde(raw_real, raw_fake, list(ROI_NAMES), out / "prior_kde.png"), "figures")
    parent.log_artifact(plot_pca(real, fake, out / "prior_pca.png"), "figures")


def _evaluate_validity(cfg: Config, stages: Any, parent: Any, progress: bool) -> None:
    """The validity table as parent metrics (the report rebuilds it), validity.csv and the figure."""
    from benchmark import validity

    rows = validity.run_validity(cfg, stages, progress=progress)
    parent.log_metrics(validity.to_metrics(rows))
    parent.log_text(validity.to_csv(rows), "validity.csv")
    parent.log_artifact(validity.plot(rows, Path("runs") / "validity" / "validity.png"), "figures")


def _real_utility(cfg: Config, stages: Any, parent: Any, progress: bool) -> dict[str, float]:
    """The generator-independent `real` arm, trained once per suite run and logged on the parent."""
    from benchmark.utility import arm_scores, summarize

    print(f"[utility] real arm: {cfg.utility.seeds} classifier(s) on the real training split")
    values = summarize(arm_scores(cfg, stages.bundle, ("real",), progress=progress))
    parent.log_metrics({f"real.{k}": v for k, v in values.items()})
    return values


def _generator_utility(cfg: Config, stages: Any, child: Any, done: Any, real_arm: dict[str, float],
                       progress: bool) -> dict[str, tuple[float, float]]:
    """Memorization (nn_ratio, with figures) and the two synthetic arms for one trained generator."""
    from benchmark.evaluation import EvalContext, evaluate
    from benchmark.runner import default_run_dir, load_method
    from benchmark.tracking import download_artifact
    from benchmark.utility import METRIC_KEYS, arm_scores, summarize, synthetic_set

    weights = default_run_dir(cfg) / "weights.pt"
    if not weights.is_file():
        if done is None:
            raise FileNotFoundError(f"{weights}: the trained generator's weights are missing")
        weights = download_artifact(done.run_id, "weights/weights.pt")
    method = load_method(cfg, stages, Path(weights))
    ctx = EvalContext(cfg, method, stages, progress=progress)
    metrics = evaluate(ctx, ["nn_ratio"])
    _log_memorization_figures(ctx, child, default_run_dir(cfg))
    synth = synthetic_set(method, stages.prior, stages.heads, cfg.utility.n_synthetic, seed=cfg.train.seed,
                          batch_size=cfg.eval.batch_size)
    print(f"[utility] {cfg.method}: {len(synth.x)} synthetic volumes ({int(synth.labels.sum())} AD), "
          f"labels: {synth.label_source}")
    metrics.update(summarize(arm_scores(cfg, stages.bundle, ("real+synthetic", "synthetic"), synth,
                                        progress=progress)))
    metrics.update({k: v for k, v in real_arm.items()})
    metrics["utility_n_synthetic"] = float(len(synth.x))
    child.log_metrics(metrics)
    child.set_tags({**ctx.notes, "utility_labels": synth.label_source})
    return {arm: (metrics[key], metrics[f"{key}_std"]) for arm, key in METRIC_KEYS.items() if key in metrics}


def _log_memorization_figures(ctx: Any, tracker: Any, run_dir: Path) -> None:
    """Histogram of the ratios beside the unseen-real reference, and the 5 closest generated/training pairs."""
    from benchmark.evaluation import memorization
    from benchmark.figures import ratio_histogram, triplanar_grid

    memo = memorization(ctx)
    hist = ratio_histogram(memo["ratios"], memo["reference"], ctx.cfg.utility.memo_threshold,
                           run_dir / "nn_ratio.png", title=f"{ctx.cfg.method}: memorization")
    tracker.log_artifact(hist, "figures")
    rows: dict[str, Any] = {}
    for rank, (g, t, d) in enumerate(memo["pairs"]):
        rows[f"#{rank + 1} generated {g}\n(d = {d:.3g})"] = memo["gen"][g]
        rows[f"#{rank + 1} train {t}"] = memo["train"][t]
    grid = triplanar_grid(rows, run_dir / "closest_pairs.png", title=f"{ctx.cfg.method}: 5 closest to training")
    tracker.log_artifact(grid, "figures")
