"""Tables (markdown, CSV, LaTeX) and figures rebuilt from the MLflow store alone.

``python -m benchmark report --suite table2`` finds the latest finished parent run of the suite and renders its
child runs; ``run`` calls the same renderer, so the printed table and the report are the same table.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.tracking import PARENT_TAG, RunRecord, TrackingSettings, find_runs

EXT = {"md": "md", "csv": "csv", "latex": "tex"}


@dataclass(frozen=True)
class Column:
    header: str
    key: str  # metric key (prefix match for lpips variants)
    scale: float = 1.0
    digits: int = 3
    lower_is_better: bool = True
    tag: bool = False  # the cell is a tag of the run (text), not a metric
    alternatives: tuple[str, ...] = ()  # other metric names of the same quantity (e.g. the offline LPIPS variant)
    metric: str = ""  # the registered metric that produces it (default: ``key``), as a suite file's `metrics` names it

    @property
    def source(self) -> str:
        return self.metric or self.key


IMAGE_COLUMNS = (
    Column("#Params (M)", "params_total", 1e-6, 1, metric="params"),
    Column("FID", "fid_resnet18", 1.0, 2),
    Column("FID (anat.)", "fid_resnet18anat", 1.0, 2),
    Column("FID (cls)", "fid_resnet18sep", 1.0, 2),
    Column("SSIM", "ssim_triplanar", 1.0, 3, lower_is_better=False),
    Column("LPIPS", "lpips_triplanar_alex", 1.0, 3, alternatives=("lpips_triplanar_alexrand",)),
    Column("SSIM (NN)", "ssim_nn_triplanar", 1.0, 3, lower_is_better=False),
    Column("LPIPS (NN)", "lpips_nn_triplanar_alex", 1.0, 3, alternatives=("lpips_nn_triplanar_alexrand",)),
)
REFERENCE_LABELS = {"real": "Real (train vs test, floor)", "train_copy": "train_copy (reference)",
                    "mean_volume": "mean_volume (reference)", "medoid": "medoid (reference)",
                    "mean_noise": "mean_noise (reference)"}
ALPHA = 0.05
CLINICAL_COLUMNS = (
    Column("BAC (%)", "bac", 100.0, 1, lower_is_better=False),
    Column("ROI MSE (x1e-5)", "roi_mse", 1e5, 2),
    Column("hippocampus r", "volume_hippocampus_r", 1.0, 2, lower_is_better=False, metric="volume_consistency"),
    Column("amygdala r", "volume_amygdala_r", 1.0, 2, lower_is_better=False, metric="volume_consistency"),
    Column("ventricle r", "volume_lateral_ventricle_r", 1.0, 2, lower_is_better=False, metric="volume_consistency"),
)
UTILITY_STEP = "utility"  # the utility step's own columns (not a registered metric): shown by every utility suite
UTILITY_COLUMNS = (
    Column("Synthetic labels", "utility_labels", tag=True, metric=UTILITY_STEP),
    Column("BAC real (%)", "utility_real_bac", 100.0, 1, lower_is_better=False, metric=UTILITY_STEP),
    Column("BAC real+syn (%)", "utility_mixed_bac", 100.0, 1, lower_is_better=False, metric=UTILITY_STEP),
    Column("BAC syn only (%)", "utility_synth_bac", 100.0, 1, lower_is_better=False, metric=UTILITY_STEP),
    Column("NN ratio (feat.)", "nn_ratio_median", 1.0, 2, lower_is_better=False, metric="nn_ratio"),
    Column("NN ratio real ref.", "nn_ratio_ref_median", 1.0, 2, lower_is_better=False, metric="nn_ratio"),
    Column("frac < 0.5", "nn_ratio_frac_below", 1.0, 2, metric="nn_ratio"),
    Column("NN ratio (SSIM)", "nn_ratio_ssim_median", 1.0, 2, lower_is_better=False, metric="nn_ratio"),
)
PRIOR_COLUMNS = ("mmd", "c2st_accuracy", "correlation_error")


def column_metrics() -> tuple[str, ...]:
    """The registered metrics that have table columns: what a suite file's ``metrics`` may list."""
    cols = (*IMAGE_COLUMNS, *CLINICAL_COLUMNS, *UTILITY_COLUMNS)
    return tuple(dict.fromkeys(c.source for c in cols if c.source != UTILITY_STEP))


def table_columns(suite: Any) -> tuple[Column, ...]:
    """The columns of a suite's table: those of its ``metrics`` (the utility step's own columns in a utility suite);
    a suite that names no metrics gets Table 4's columns with a real row, the image columns otherwise."""
    if suite.utility:
        return tuple(c for c in UTILITY_COLUMNS if c.source == UTILITY_STEP or c.source in suite.metrics)
    if not suite.metrics:
        return CLINICAL_COLUMNS if suite.real_row else IMAGE_COLUMNS
    return tuple(c for c in (*IMAGE_COLUMNS, *CLINICAL_COLUMNS) if c.source in suite.metrics)


def _resolve_key(metrics: dict[str, float], col: Column | str) -> str | None:
    keys = (col,) if isinstance(col, str) else (col.key, *col.alternatives)
    return next((k for k in keys if k in metrics), None)


def _cell(runs: list[RunRecord], col: Column) -> tuple[str, str]:
    """('mean ± std', metric name actually used) over seeds, or with the run's own spread for one seed."""
    if col.tag:
        return ", ".join(sorted({r.tags.get(col.key, "n/a") for r in runs})), ""
    key = None
    for r in runs:
        key = key or _resolve_key(r.metrics, col)
    if key is None:
        return "n/a", ""
    values = np.array([r.metrics[key] for r in runs if key in r.metrics]) * col.scale
    if len(values) > 1:
        mean, std = float(values.mean()), float(values.std(ddof=1))
    else:
        mean = float(values[0])
        std_key = f"{key}_std"
        std = runs[0].metrics.get(std_key, float("nan")) * col.scale
    if col.key == "params_total":
        return (f"{mean:.{col.digits}f}" if mean else "–", key)
    text = f"{mean:.{col.digits}f}" + ("" if math.isnan(std) else f" ± {std:.{col.digits}f}")
    return text, key


def _values(runs: list[RunRecord], col: Column) -> tuple[str | None, np.ndarray]:
    key = next((k for k in (_resolve_key(r.metrics, col) for r in runs) if k), None)
    if key is None:
        return None, np.array([])
    return key, np.array([r.metrics[key] for r in runs if key in r.metrics])


def _pvalue(a_runs: list[RunRecord], b_runs: list[RunRecord], col: Column) -> float | None:
    """Two-sided p-value for a difference between two rows of one column (see `significance_marks`)."""
    from scipy import stats

    key_a, a = _values(a_runs, col)
    key_b, b = _values(b_runs, col)
    if key_a is None or key_b is None:
        return None
    if len(a) > 1 and len(a) == len(b):
        by_seed_a = {r.tags.get("seed"): r.metrics.get(key_a) for r in a_runs}
        by_seed_b = {r.tags.get("seed"): r.metrics.get(key_b) for r in b_runs}
        seeds = sorted(set(by_seed_a) & set(by_seed_b))
        x = np.array([by_seed_a[k] for k in seeds], dtype=float)
        y = np.array([by_seed_b[k] for k in seeds], dtype=float)
        if len(seeds) < 2 or np.allclose(x - y, (x - y).mean()):
            return 0.0 if len(seeds) >= 2 and not np.isclose((x - y).mean(), 0.0) else None
        return float(stats.ttest_rel(x, y).pvalue)
    ra, rb = a_runs[0].metrics, b_runs[0].metrics
    draws_a = [v for k, v in sorted(ra.items()) if k.startswith(f"{key_a}_draw")]
    draws_b = [v for k, v in sorted(rb.items()) if k.startswith(f"{key_b}_draw")]
    if len(draws_a) > 1 and len(draws_b) > 1:
        return float(stats.ttest_ind(draws_a, draws_b, equal_var=False).pvalue)
    n_a, n_b = ra.get(f"{key_a}_n"), rb.get(f"{key_b}_n")
    sd_a, sd_b = ra.get(f"{key_a}_std"), rb.get(f"{key_b}_std")
    if None in (n_a, n_b, sd_a, sd_b) or n_a < 2 or n_b < 2 or (sd_a == 0 and sd_b == 0):
        return None
    return float(stats.ttest_ind_from_stats(ra[key_a], sd_a, n_a, rb[key_b], sd_b, n_b, equal_var=False).pvalue)


def significance_marks(methods: tuple[str, ...], runs: dict[str, list[RunRecord]], columns: tuple[Column, ...]
                       ) -> dict[tuple[str, str], str]:
    """``{(method, column header): "*"}`` where a method differs from the column's best method, Holm-corrected
    over the column's comparisons, so that a reader never reads noise as a result. Reference rows are not tested."""
    out: dict[tuple[str, str], str] = {}
    for col in columns:
        if col.tag or col.key == "params_total":
            continue
        means = {m: float(_values(runs[m], col)[1].mean()) for m in methods if runs.get(m) and
                 _values(runs[m], col)[0] is not None}
        if len(means) < 2:
            continue
        best = min(means, key=means.get) if col.lower_is_better else max(means, key=means.get)
        tests = [(m, _pvalue(runs[best], runs[m], col)) for m in means if m != best]
        tests = sorted([(m, p) for m, p in tests if p is not None and math.isfinite(p)], key=lambda t: t[1])
        for i, (m, p) in enumerate(tests):  # Holm step-down
            if p * (len(tests) - i) >= ALPHA:
                break
            out[(m, col.header)] = "*"
    return out


def kendall_tau(methods: tuple[str, ...], runs: dict[str, list[RunRecord]], key: str) -> float | None:
    """Mean Kendall tau between every pair of seeds' rankings of ``methods`` by metric ``key``."""
    from itertools import combinations

    from scipy import stats

    by_seed: dict[str, dict[str, float]] = defaultdict(dict)
    for m in methods:
        for r in runs.get(m, []):
            if key in r.metrics:
                by_seed[r.tags.get("seed", "")][m] = r.metrics[key]
    common = [m for m in methods if all(m in v for v in by_seed.values())]
    if len(by_seed) < 2 or len(common) < 3:
        return None
    taus = [stats.kendalltau([a[m] for m in common], [b[m] for m in common]).statistic
            for a, b in combinations(by_seed.values(), 2)]
    return float(np.mean(taus))


def children(parent_run_id: str, experiment: str, settings: TrackingSettings | None = None) -> list[RunRecord]:
    return [r for r in find_runs(experiment, f"tags.`{PARENT_TAG}` = '{parent_run_id}'", settings=settings)]


def latest_parent(suite: str, experiment: str | None = None, settings: TrackingSettings | None = None
                  ) -> RunRecord:
    from benchmark.errors import UsageError

    runs = find_runs(experiment or suite, f"tags.suite = '{suite}' and tags.kind = 'suite'", settings=settings)
    finished = [r for r in runs if r.status in ("FINISHED", "FAILED")]
    if not finished:
        uri = (settings or TrackingSettings.load()).tracking_uri
        raise UsageError(f"no finished `{suite}` suite run in the MLflow store {uri}; run it first")
    return finished[0]


def suite_as_run(suite: Any, parent: RunRecord | None) -> Any:
    """The suite a parent run ran: a registered suite (or a name) with the rows, columns and steps that the parent
    logged (after ``--methods``, or from a suite file); a suite that is not registered is rebuilt from them alone."""
    from benchmark.registry import SUITES
    from benchmark.suites import Suite

    params = parent.params if parent is not None else {}
    if isinstance(suite, str):
        if suite not in SUITES and "methods" not in params:
            SUITES.get(suite)  # UnknownEntry, listing the registered suites
        suite = SUITES.get(suite) if suite in SUITES else Suite(suite, params.get("title", suite), (), ())
    if "methods" not in params:  # a parent from before suites were logged with their rows
        return suite

    def names(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(n for n in params[key].split(",") if n) if key in params else default

    steps = names("steps", tuple(name for name, flag in (("real_row", "real_row"), ("prior", "prior_eval"),
                                                         ("utility", "utility"), ("validity", "validity"))
                                 if getattr(suite, flag)))
    return replace(suite, methods=names("methods", suite.methods), references=names("references", suite.references),
                   metrics=names("metrics", suite.metrics), title=params.get("title", suite.title),
                   real_row="real_row" in steps, prior_eval="prior" in steps, utility="utility" in steps,
                   validity="validity" in steps)


def table_rows(suite: Any, parent: RunRecord | None, kids: list[RunRecord]) -> tuple[list[str], list[list[str]],
                                                                                   str]:
    """Header, rows and note of a suite's table (``suite``: a Suite as run, or a name resolved from the parent)."""
    if isinstance(suite, str):
        suite = suite_as_run(suite, parent)
    if suite.prior_eval:
        header = ["Metric", "Value"]
        rows = [[k.removeprefix("prior."), f"{v:.4f}"] for k, v in sorted((parent.metrics if parent else {}).items())
                if k.startswith("prior.")]
        return header, rows, "MMD: RBF, median heuristic; C2ST: cross-validated accuracy (0.5 = indistinguishable)."
    if suite.validity:
        from benchmark.validity import VALIDITY_METRICS, from_metrics

        rows_v = from_metrics(parent.metrics if parent else {})
        header = ["Family", "Level", *VALIDITY_METRICS]
        body = [[r["family"], str(r["level"])] + [f"{r[m]:.4g}" if m in r else "n/a" for m in VALIDITY_METRICS]
                for r in rows_v]
        return header, body, ("Validation-split volumes (held-out real subjects) under each corruption, scored "
                              "against the test split; level 0 (clean) is the real-vs-real floor. ssim_nn/lpips_nn: "
                              "each test subject vs its nearest corrupted volume (resnet18 features); bac/roi_mse: "
                              "frozen heads vs the set's own labels/ratios; nn_ratio: median nearest-train / "
                              "nearest-test feature distance (below the clean value = closer to training subjects). "
                              "Levels are listed in validity.csv.")
    columns = table_columns(suite)
    by_method: dict[str, list[RunRecord]] = defaultdict(list)
    for r in kids:
        by_method[r.tags.get("method", r.name)].append(r)
    header = ["Method"] + [c.header for c in columns]
    rows = []
    used: dict[str, str] = {}
    if suite.real_row and parent is not None:
        real = RunRecord("", "Real", "", {}, {}, {k.removeprefix("real."): v for k, v in parent.metrics.items()
                                                  if k.startswith("real.")})
        rows.append(["Real (test split)"] + [_cell([real], c)[0] for c in columns])
    finished = {m: [r for r in by_method.get(m, []) if r.status == "FINISHED"]
                for m in (*suite.references, *suite.methods)}
    marks = significance_marks(suite.methods, finished, columns)
    for method in (*suite.references, *suite.methods):
        runs = finished[method]
        label = REFERENCE_LABELS.get(method, method)
        if not runs:
            failed = by_method.get(method)
            rows.append([label] + (["FAILED" if failed else "missing"] * len(columns)))
            continue
        cells = []
        for c in columns:
            text, key = _cell(runs, c)
            cells.append(text + marks.get((method, c.header), ""))
            if key:
                used[c.header] = key
        rows.append([label] + cells)
    n_seeds = max((len(v) for v in by_method.values()), default=1)
    if n_seeds > 1:
        note = f"± = standard deviation over {n_seeds} seeds (independent trainings)."
        # one tau per FID column: the default FID and FID (anat.) can rank rows differently (DESIGN §9)
        taus = [(c.header, kendall_tau(suite.methods, finished, c.key)) for c in columns if c.key.startswith("fid_")]
        taus = [(header, tau) for header, tau in taus if tau is not None]
        if taus:
            note += (" Kendall's tau between the seeds' rankings: " + ", ".join(f"{h} {t:.2f}" for h, t in taus)
                     + " (1 = identical rankings).")
    else:
        note = ("± = FID: std over independent generation draws; SSIM/LPIPS: std over test subjects "
                "(bootstrap 95% CIs in MLflow as *_ci_low/_ci_high); one training seed.")
    if marks:
        note += (" * = differs from the best method of its column (p < 0.05, Holm-corrected over the column's "
                 + ("paired t-tests over seeds" if n_seeds > 1 else
                    "Welch t-tests over generation draws (FID) or test subjects (SSIM/LPIPS)") + ").")
    if suite.references:
        meaning = {"real": "Real = random real training volumes at the same n as every generated set (the "
                           "real-vs-real floor)",
                   "train_copy": "train_copy = the training subject nearest to each requested clinical vector (a "
                                 "perfect memoriser)",
                   "mean_volume": "mean_volume = the training mean for every request",
                   "medoid": "medoid = the training subject nearest to the training mean for every request (one "
                             "sharp real brain: the template the quick preset's VAE-GAN rows warp)",
                   "mean_noise": "mean_noise = the training mean plus white noise in the brain, as textured as the "
                                 "training volumes (what texture alone scores)"}
        note += " Reference rows need no training: " + "; ".join(meaning.get(r, r) for r in suite.references) + "."
    if any(c.key == "fid_resnet18sep" for c in columns):
        note += (" FID = evaluation-only 3-D ResNet-18 trained on the training split, used by no loss, plus three "
                 "untrained copies that make it respond to noise and artefacts (they dominate it: smooth volumes "
                 "score far from textured real ones); FID (anat.) = that network's trained block alone (anatomy and "
                 "clinical content, nearly blind to i.i.d. noise); FID (cls) = "
                 "the frozen AD/CN classifier, which shares weights with `ours`' training losses (L_cls and the "
                 "resnet3d_aux perceptual loss), so it favours `ours` by construction. Pairing: SSIM/LPIPS pair each "
                 "test subject with its reconstruction (encoder methods), its conditional sample (conditional "
                 "methods) or the nearest generated sample (others); the (NN) columns use the nearest generated "
                 "sample in the FID network's feature space for every method.")
    if suite.utility:
        note = ("BAC: a fresh classifier (heads' architecture, same budget per arm) tested on the real test split; "
                "± = std over classifier seeds. Unconditional generators' volumes are labelled by the frozen "
                "classifier, conditional ones carry the label they were asked for. NN ratio: median distance to the "
                "nearest training volume / to the nearest test volume (< 1: closer to training subjects); the real "
                "reference is the same ratio for unseen validation volumes.")
    if used:
        note += " Metrics: " + ", ".join(f"{h} = {k}" for h, k in used.items()) + "."
    backbones = sorted({f"{r.tags.get('method')}: {r.tags['perceptual_backbone']}" for r in kids
                        if r.tags.get("perceptual_backbone", "none") != "none"})
    if backbones:
        note += " Perceptual loss network: " + ", ".join(backbones) + "."
    reasons = sorted({f"{c.header}: {r.tags[f'unavailable.{c.key}']}" for c in columns for r in kids
                      if f"unavailable.{c.key}" in r.tags})
    if reasons:
        note += " n/a = " + "; ".join(reasons) + "."
    if parent is not None:
        note += (f" Data: {parent.tags.get('data_source', '?')}; split {parent.tags.get('split_fingerprint', '?')};"
                 f" preset {parent.tags.get('preset', '?')}.")
    return header, rows, note


def render(header: list[str], rows: list[list[str]], note: str, fmt: str, title: str) -> str:
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(header)
        writer.writerows(rows)
        return buf.getvalue()
    if fmt == "latex":
        lines = [r"\begin{table}[t]", r"\centering", f"\\caption{{{_tex(title)}. {_tex(note)}}}",
                 r"\begin{tabular}{l" + "c" * (len(header) - 1) + "}", r"\toprule",
                 " & ".join(_tex(h) for h in header) + r" \\", r"\midrule"]
        lines += [" & ".join(_tex(c) for c in row) + r" \\" for row in rows]
        lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
        return "\n".join(lines) + "\n"
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    sep = "| " + " | ".join("-" * w for w in widths) + " |"
    body = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    return "\n".join([f"### {title}", "", line, sep, *body, "", note, ""])


def _tex(text: str) -> str:
    return (text.replace("\\", r"\textbackslash{}").replace("&", r"\&").replace("%", r"\%").replace("_", r"\_")
            .replace("#", r"\#").replace("±", r"$\pm$"))


def render_suite(suite: Any, fmt: str = "md", parent_run_id: str | None = None,
                 settings: TrackingSettings | None = None, experiment: str | None = None) -> str:
    """A suite's table from the store: ``suite`` is a name (its latest finished parent run, or ``parent_run_id``)
    or the Suite a run has just run."""
    import benchmark.suites  # noqa: F401 - registers the built-in suites
    from benchmark.registry import SUITES

    name = suite if isinstance(suite, str) else suite.name
    if isinstance(suite, str) and suite in SUITES and getattr(SUITES.get(suite), "suites", ()):  # a composite
        return "\n".join(render_suite(s, fmt, None, settings) for s in SUITES.get(suite).suites)
    experiment = experiment or name
    if parent_run_id is None:
        if isinstance(suite, str) and suite not in SUITES and not find_runs(
                experiment, f"tags.suite = '{suite}' and tags.kind = 'suite'", settings=settings):
            SUITES.get(suite)  # neither registered nor run from a suite file: UnknownEntry lists the valid ones
        parent = latest_parent(name, experiment, settings)
    else:
        parent = next((r for r in find_runs(experiment, "", settings=settings) if r.run_id == parent_run_id), None)
        if parent is None:
            from benchmark.errors import StoreError

            uri = (settings or TrackingSettings.load()).tracking_uri
            raise StoreError(f"run id {parent_run_id!r}: no `{name}` run with this id in the MLflow store {uri}")
    kids = children(parent.run_id, experiment, settings)
    suite = suite_as_run(suite, parent) if isinstance(suite, str) else suite
    header, rows, note = table_rows(suite, parent, kids)
    return render(header, rows, note, fmt, suite.title)


def report_command(suite: str, fmt: str, run_id: str | None = None) -> str:
    from benchmark.catalog import load_all

    load_all()
    return render_suite(suite, fmt, parent_run_id=run_id)


def log_figures(suite: Any, parent: Any, stages: Any, cfg: Any) -> None:
    """Paper Fig. 3: one test subject's real slices beside the mean-volume and medoid references and a sample of
    every method of the suite."""
    import nibabel as nib

    from benchmark.figures import triplanar_grid
    from benchmark.runner import default_run_dir

    if not suite.methods:
        return
    from dataclasses import replace

    x, _ = stages.bundle.tensors("test")
    rows: dict[str, Any] = {"real": x[0]}
    for method in (*[r for r in suite.references if r in ("mean_volume", "medoid")], *suite.methods):
        path = default_run_dir(replace(cfg, method=method)) / "samples" / "sample_0.nii.gz"
        if path.is_file():
            rows[method] = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    out = Path("runs") / f"fig3-{suite.name}.png"
    parent.log_artifact(triplanar_grid(rows, out, title=f"{suite.name}: real vs generated"), "figures")
