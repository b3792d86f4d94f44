"""Suites as data files (which methods x which metrics), and the driver that runs one under a parent MLflow run.

Every built-in suite is a TOML file in ``benchmark/suite_files/`` (``table3.toml`` explains every key), loaded by
:func:`load_suite_file` as ``run --suite-file my.toml`` loads a user's; ``run --methods +mine,-vae`` edits the rows
(:func:`edit_rows`). Shared stages (data, heads, prior, real feature statistics) are computed once; each method x
seed is a child run; a finished child with the same config digest is reused, an unfinished one resumes from its
checkpoint; a failing method is recorded as failed and the others go on (non-zero exit at the end, with a summary).
Cells run one after another in this process, or through a launcher (benchmark/launchers.py: local processes or SLURM
jobs) that runs the same :func:`_run_cell` in each child; the parent, the ``before``/``after`` steps and the tables
stay here either way.
"""

from __future__ import annotations

import sys
import time
import tomllib
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from benchmark.config import Config, flatten
from benchmark.errors import UsageError
from benchmark.registry import SUITES


@dataclass(frozen=True)
class Suite:
    """A table of the paper: rows are methods, columns metrics (one TOML file; see suite_files/table3.toml)."""

    name: str
    title: str
    methods: tuple[str, ...]
    metrics: tuple[str, ...]  # the columns shown; every row is evaluated on every metric that applies to it
    real_row: bool = False  # Table 4's "Real" column: the frozen heads on the test split
    prior_eval: bool = False  # evaluate the diffusion prior (paper §3.4, Fig. 5)
    utility: bool = False  # downstream classifiers and memorization per generator (issue #10)
    # Training-free rows scored by the same protocol (baselines/references.py): the floor and trivial answers.
    references: tuple[str, ...] = ()
    validity: bool = False  # real volumes under graded corruptions (benchmark/validity.py)
    description: str = ""
    seeds: int | None = None  # independent trainings per method when --seeds is not given
    config: tuple[tuple[str, Any], ...] = ()  # dotted-key overrides for every row (--set wins)
    suites: tuple[str, ...] = ()  # a composite (`all`): the suites it runs in turn
    source: str = field(default="", compare=False)  # the file it was read from

    @property
    def steps(self) -> tuple[str, ...]:
        """The extra steps, by their names in a suite file (``STEPS``)."""
        return tuple(name for name, flag in _STEP_FLAGS.items() if getattr(self, flag))


# A suite file's `steps` entries and the Suite field each one sets.
_STEP_FLAGS = {"utility": "utility", "real_row": "real_row", "prior": "prior_eval", "validity": "validity"}
_FILE_KEYS = ("name", "title", "description", "references", "methods", "metrics", "steps", "seeds", "suites",
              "config")
BUILTIN_DIR = "suite_files"
BUILTIN = ("table2", "table3", "table4", "prior", "utility", "validity", "all")


def parse_suite(text: str, name: str, source: str = "") -> Suite:
    """A :class:`Suite` from the text of a suite file; bad content is a one-line :class:`UsageError`.

    Names of methods and metrics are checked against the registries later (:func:`check_suite`), when every
    module and plugin has registered its own.
    """
    where = f"suite file {source or name}"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"{where}: invalid TOML ({err})") from None
    unknown = sorted(set(data) - set(_FILE_KEYS))
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: "
                         f"{', '.join(_FILE_KEYS)}")

    def names(key: str) -> tuple[str, ...]:
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise UsageError(f"{where}: {key!r} must be a list of names, got {value!r}")
        return tuple(value)

    title = data.get("title")
    if not isinstance(title, str) or not title.strip():
        raise UsageError(f"{where}: 'title' must be a non-empty string (the table's caption)")
    seeds = data.get("seeds")
    if seeds is not None and (not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1):
        raise UsageError(f"{where}: 'seeds' must be an integer >= 1, got {seeds!r}")
    steps = names("steps")
    bad = [s for s in steps if s not in _STEP_FLAGS]
    if bad:
        raise UsageError(f"{where}: unknown step(s) {', '.join(map(repr, bad))}; valid: {', '.join(_STEP_FLAGS)}")
    config = data.get("config", {})
    if not isinstance(config, dict):
        raise UsageError(f"{where}: 'config' must be a table of dotted keys, as --set takes them")
    config = _flatten_table(config)
    known = set(flatten(Config())) - {"method", "preset"}
    bad = sorted(set(config) - known)
    if bad:
        raise UsageError(f"{where}: [config] has unknown key(s) {', '.join(map(repr, bad))} (method and preset are "
                         "not set here: rows are the methods, --preset picks the preset); valid keys: "
                         f"{', '.join(sorted(known))}")
    name = data.get("name", name)
    if not isinstance(name, str) or not name:
        raise UsageError(f"{where}: 'name' must be a non-empty string")
    return Suite(name=name, title=title.strip(), methods=names("methods"), metrics=names("metrics"),
                 references=names("references"), description=str(data.get("description", "")).strip(), seeds=seeds,
                 config=tuple(config.items()), suites=names("suites"), source=source,
                 **{_STEP_FLAGS[s]: True for s in steps})


def load_suite_file(path: str | Path) -> Suite:
    """``run --suite-file PATH``: the suite a TOML file defines (named after the file unless it sets ``name``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"suite file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"suite file {path}: cannot be read ({err})") from None
    return parse_suite(text, path.stem, str(path))


def _flatten_table(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten_table(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def suite_to_toml(suite: Suite) -> str:
    """The suite file that defines ``suite`` (without the comments): logged with every suite run as ``suite.toml``,
    and what :func:`parse_suite` reads back to an equal suite."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    lines = [f"name = {value(suite.name)}", f"title = {value(suite.title)}"]
    if suite.description:
        lines.append(f"description = {value(suite.description)}")
    if suite.suites:
        lines.append(f"suites = {value(suite.suites)}")
    else:
        lines += [f"references = {value(suite.references)}", f"methods = {value(suite.methods)}",
                  f"metrics = {value(suite.metrics)}", f"steps = {value(suite.steps)}"]
    if suite.seeds is not None:
        lines.append(f"seeds = {suite.seeds}")
    if suite.config:
        lines += ["", "[config]"] + [f"{value(k)} = {value(v)}" for k, v in suite.config]
    return "\n".join(lines) + "\n"


def _load_builtin() -> None:
    folder = resources.files("benchmark") / BUILTIN_DIR
    for name in BUILTIN:
        file = folder / f"{name}.toml"
        SUITES.add(name, parse_suite(file.read_text(), name, f"benchmark/{BUILTIN_DIR}/{name}.toml"))


_load_builtin()
ALL = SUITES.get("all").suites


def _reference_method(name: str) -> bool:
    from benchmark.registry import METHODS

    return not getattr(METHODS.get(name), "needs_training", True)


def edit_rows(suite: Suite, spec: str, strict: bool = True) -> Suite:
    """``--methods``: ``+a,-b`` adds and removes rows; bare names ``a,b`` replace the trained rows (reference rows
    stay; ``-real`` removes one). Training-free methods go among the references. Unknown names, a mix of bare and
    signed names and (when ``strict``) a removal of a row the suite does not have are one-line :class:`UsageError` s.
    """
    from benchmark.registry import METHODS

    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise UsageError(f"--methods {spec!r}: expected names, +NAME or -NAME, comma-separated")
    signed = [s for s in items if s[0] in "+-"]
    if signed and len(signed) != len(items):
        raise UsageError(f"--methods {spec!r}: either bare names (the rows) or +NAME/-NAME edits, not both")
    for name in (s.lstrip("+-") for s in items):
        METHODS.get(name)  # UnknownEntry: "unknown method ...; valid: ..."
    methods, references = list(suite.methods), list(suite.references)
    if not signed:
        methods = [n for n in dict.fromkeys(items) if not _reference_method(n)]
        references += [n for n in dict.fromkeys(items) if _reference_method(n) and n not in references]
        return replace(suite, methods=tuple(methods), references=tuple(references))
    for item in items:
        name = item[1:]
        rows = references if _reference_method(name) else methods
        if item[0] == "+" and name not in rows:
            rows.append(name)
        elif item[0] == "-" and (strict or name in methods + references):
            if name not in methods + references:
                raise UsageError(f"--methods -{name}: not a row of suite {suite.name!r} (rows: "
                                 f"{', '.join(suite.references + suite.methods) or 'none'})")
            (methods if name in methods else references).remove(name)
    return replace(suite, methods=tuple(methods), references=tuple(references))


def members(top: Suite) -> list[Suite]:
    """The suites ``top`` runs: itself, or a composite's members (each with the composite's seeds and config)."""
    if not top.suites:
        return [top]
    return [replace(m, seeds=top.seeds or m.seeds, config=m.config + top.config)
            for m in (SUITES.get(name) for name in top.suites)]


def select_suites(top: str | Suite, methods: str | None = None) -> list[Suite]:
    """The suites a ``run`` command runs: a registered suite (by name) or a loaded suite file, a composite expanded
    into its members, rows edited by ``--methods`` (in every member with rows; a removal must hit at least one).
    Methods and metrics are checked against the registries: call after :func:`benchmark.catalog.load_all`."""
    top = SUITES.get(top) if isinstance(top, str) else top
    suites = members(top)
    if methods:
        if not any(m.methods or m.references for m in suites):
            raise UsageError(f"--methods: suite {top.name!r} has no rows to edit")
        rows = {r for m in suites for r in m.references + m.methods}
        gone = [s.strip()[1:] for s in methods.split(",") if s.strip().startswith("-")]
        missing = [name for name in gone if name not in rows]
        if missing:
            raise UsageError(f"--methods -{missing[0]}: not a row of suite {top.name!r} (rows: "
                             f"{', '.join(sorted(rows))})")
        suites = [edit_rows(m, methods, strict=False) if m.methods or m.references else m for m in suites]
    for suite in suites:
        check_suite(suite)
    return suites


def check_suite(suite: Suite) -> None:
    """Every row a registered method and every column a metric some table shows (after plugins are loaded)."""
    from benchmark.registry import METHODS, METRICS
    from benchmark.report import column_metrics

    for method in suite.references + suite.methods:
        METHODS.get(method)
    shown = column_metrics()
    for metric in suite.metrics:
        METRICS.get(metric)
        if metric not in shown:
            raise UsageError(f"suite {suite.name!r}: metric {metric!r} has no table column; columns exist for "
                             f"{', '.join(shown)}")
    for member in suite.suites:
        SUITES.get(member)


def suite_methods(suites: str | Sequence[Suite]) -> tuple[str, ...]:
    """Every row (references and methods) of the suites (or of a registered suite's members, by name): the methods
    ``data.size`` must suit (an unknown suite name is an :class:`UnknownEntry` listing the valid ones)."""
    if isinstance(suites, str):
        top = SUITES.get(suites)
        suites = [SUITES.get(m) for m in top.suites] if top.suites else [top]
    return tuple(dict.fromkeys(m for s in suites for m in s.references + s.methods))


def suite_overrides(suites: Sequence[Suite]) -> dict[str, Any]:
    """The suites' ``[config]`` values as ``--set`` overrides (a key set twice to different values is an error)."""
    out: dict[str, Any] = {}
    for suite in suites:
        for key, value in suite.config:
            if key in out and out[key] != value:
                raise UsageError(f"suites set {key} to both {out[key]!r} and {value!r}")
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def run_suite(name: str | Sequence[Suite], cfg: Config, *, seeds: int | None = None, progress: bool = True,
              fresh: bool = False, launcher: Any = None) -> int:
    """Run a suite (a registered name, ``all``, or the suites :func:`select_suites` gave) and print its tables;
    returns the exit code. ``seeds`` defaults to each suite's own (1 when it sets none). ``launcher`` (a
    :class:`benchmark.launchers.SubmititLauncher`) runs the cells as separate jobs; None runs them here, in turn."""
    from benchmark.config import check_size

    if seeds is not None and seeds < 1:
        raise UsageError(f"--seeds {seeds}: expected an integer >= 1")
    suites = select_suites(name) if isinstance(name, str) else list(name)
    check_size(cfg.data.size, suite_methods(suites))  # before any data is synthesised or stage trained
    failures: list[str] = []
    for suite in suites:
        failures += _run_one(suite, cfg, seeds=seeds or suite.seeds or 1, progress=progress, fresh=fresh,
                             launcher=launcher)
    if failures:
        print(f"\n{len(failures)} run(s) failed: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


def _child_tags(cfg: Config, suite: str) -> dict[str, str]:
    from benchmark.plugins import plugin_tags
    from benchmark.runner import run_digest

    return {"suite": suite, "method": cfg.method, "seed": str(cfg.train.seed), "config_digest": run_digest(cfg),
            **plugin_tags(cfg.method)}


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


@dataclass
class SuiteRun:
    """One invocation of a suite: its parent run, the shared stages, and what its steps accumulate."""

    suite: Suite
    cfg: Config
    stages: Any
    parent: Any
    experiment: str
    progress: bool
    failures: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)  # per-step results (e.g. the utility suite's real arm)


@dataclass
class Cell:
    """One table cell row: a method x seed, its child run (opened here, or beforehand by a launcher's driver), and
    the finished run it reuses (if any)."""

    method: str
    cfg: Config
    label: str
    child: Any = None
    reused: Any = None


@dataclass(frozen=True)
class SuiteStep:
    """A suite's extra work beside training and scoring its rows: ``before`` the rows, ``per_cell`` after each
    row's child run is evaluated (inside its failure handling), ``after`` the rows. ``applies`` picks the suites."""

    name: str
    applies: Callable[[Suite], bool]
    before: Callable[[SuiteRun], None] | None = None
    per_cell: Callable[[SuiteRun, Cell], None] | None = None
    after: Callable[[SuiteRun], None] | None = None


def _cells(suite: Suite, cfg: Config, seeds: int) -> list[Cell]:
    """Reference rows first, then the methods; one cell per seed."""
    out = []
    for method in suite.references + suite.methods:
        for seed in range(seeds):
            mcfg = replace(cfg, method=method, train=replace(cfg.train, seed=cfg.train.seed + seed))
            out.append(Cell(method, mcfg, f"{method}-seed{mcfg.train.seed}"))
    return out


def _run_one(suite: Suite, cfg: Config, *, seeds: int, progress: bool, fresh: bool, launcher: Any = None
             ) -> list[str]:
    from benchmark.runner import prepare_stages, stage_metrics
    from benchmark.tracking import MlflowTracker

    t0 = time.perf_counter()
    stages = prepare_stages(cfg, progress=progress)
    experiment = cfg.tracking.experiment or suite.name
    parent = MlflowTracker.start(experiment, f"{suite.name}-{cfg.preset}",
                                 tags={**stages.tags, "suite": suite.name, "seeds": str(seeds), "kind": "suite",
                                       "suite_source": suite.source or "command line"})
    # The rows and columns as run (after --methods): `report` rebuilds this table from them, not from the file.
    parent.log_params({"suite": suite.name, "preset": cfg.preset, "seeds": seeds,
                       "methods": ",".join(suite.methods), "references": ",".join(suite.references),
                       "metrics": ",".join(suite.metrics), "steps": ",".join(suite.steps), "title": suite.title})
    parent.log_text(suite_to_toml(suite), "suite.toml")
    parent.log_metrics(stage_metrics(stages))
    run = SuiteRun(suite, cfg, stages, parent, experiment, progress)
    steps = [step for step in STEPS if step.applies(suite)]
    for step in steps:
        if step.before:
            step.before(run)
    if launcher is None:
        for cell in _cells(suite, cfg, seeds):
            _run_cell(run, cell, steps, fresh)
    else:
        launcher.run_cells(run, _cells(suite, cfg, seeds), steps, fresh)
    for step in steps:
        if step.after:
            step.after(run)
    parent.log_metrics({f"time.{k}": v for k, v in run.timings.items()})
    parent.log_metrics({"time.total_s": time.perf_counter() - t0})
    _render(run)
    parent.finish("FAILED" if run.failures else "FINISHED")
    return run.failures


def _run_cell(run: SuiteRun, cell: Cell, steps: list[SuiteStep], fresh: bool) -> None:
    """Reuse a finished run of the same config, or train and evaluate; a failure is recorded, never raised.

    The cell's run folder is locked from the reuse check until its child run is closed: a second suite process on
    the same store and folder waits, then reuses what the first one trained (it never trains the same child twice).
    A launcher's child job (benchmark/launchers.py) calls this too, with ``cell.child`` already open and no parent.
    """
    from benchmark.runner import default_run_dir, folder_lock

    with folder_lock(default_run_dir(cell.cfg), f"[{run.suite.name}] {cell.label}"):
        _run_cell_locked(run, cell, steps, fresh)


def _open_child(run: SuiteRun, cell: Cell, tags: dict[str, str]) -> None:
    """The cell's child run under the parent, or, when a launcher's driver opened it already, that run tagged."""
    if cell.child is None:
        cell.child = run.parent.child(cell.label, tags=tags)
    else:
        cell.child.set_tags(tags)


def _run_cell_locked(run: SuiteRun, cell: Cell, steps: list[SuiteStep], fresh: bool) -> None:
    from benchmark.runner import default_run_dir, run_method

    name = run.suite.name
    cell.reused = None if fresh else _finished_child(run.experiment, cell.cfg)
    start = time.perf_counter()
    try:
        if cell.reused is not None:
            done = cell.reused
            _open_child(run, cell, {**_child_tags(cell.cfg, name), "reused_from": done.run_id})
            cell.child.log_params(dict(done.params))
            cell.child.set_tags({k: v for k, v in done.tags.items() if not k.startswith("mlflow.")})
            cell.child.log_metrics(done.metrics)
            print(f"[{name}] {cell.label}: reused finished run {done.run_id}")
        else:
            run_dir = default_run_dir(cell.cfg)
            _open_child(run, cell, _child_tags(cell.cfg, name))
            what = "reference row, no training" if cell.method in run.suite.references else \
                f"training ({cell.cfg.train.budget_volumes} volumes)"
            print(f"[{name}] {cell.label}: {what} in {run_dir}")
            run_method(cell.cfg, run.stages, cell.child, run_dir=run_dir, resume=True, progress=run.progress)
        for step in steps:
            if step.per_cell:
                step.per_cell(run, cell)
        cell.child.finish("FINISHED")
    except KeyboardInterrupt:
        if cell.child is not None:
            cell.child.finish("KILLED")
        if run.parent is not None:
            run.parent.finish("KILLED")
        raise
    except Exception as err:  # noqa: BLE001 - one failing method must not stop the suite
        if cell.child is not None:
            cell.child.set_tags({"error": f"{type(err).__name__}: {err}"[:4000]})
            cell.child.log_text(traceback.format_exc(), "error.txt")
            cell.child.finish("FAILED")
        run.failures.append(f"{name}/{cell.label}: {type(err).__name__}: {err}")
        print(f"[{name}] {cell.label}: FAILED ({type(err).__name__}: {err})", file=sys.stderr)
    if cell.reused is None:
        run.timings[cell.label] = time.perf_counter() - start


def _render(run: SuiteRun) -> None:
    """Print the table, store it as md/csv/LaTeX on the parent run, and log the suite's figures."""
    from benchmark import report
    from benchmark.tracking import TrackingSettings

    settings = TrackingSettings.load(run.cfg.tracking.config_file)
    name = run.suite.name

    def table(fmt: str) -> str:
        return report.render_suite(run.suite, fmt=fmt, parent_run_id=run.parent.run_id, settings=settings,
                                   experiment=run.experiment)

    print(table("md"))
    for fmt in ("md", "csv", "latex"):
        run.parent.log_text(table(fmt), f"tables/{name}.{report.EXT[fmt]}")
    report.log_figures(run.suite, run.parent, run.stages, run.cfg)
    _log_learning_curves(run.suite, run.cfg, run.parent)


# --- per-suite steps --------------------------------------------------------------------------------------------
def _utility_before(run: SuiteRun) -> None:
    run.state["real_arm"] = _real_utility(run.cfg, run.stages, run.parent, run.progress)
    run.state["utility_rows"] = {}


def _utility_cell(run: SuiteRun, cell: Cell) -> None:
    run.state["utility_rows"][cell.label] = _generator_utility(cell.cfg, run.stages, cell.child, cell.reused,
                                                               run.state["real_arm"], run.progress)


def _utility_after(run: SuiteRun) -> None:
    from benchmark.figures import grouped_bars

    if run.state["utility_rows"]:
        fig = grouped_bars(run.state["utility_rows"], Path("runs") / "utility" / "utility_bac.png",
                           "test balanced accuracy",
                           title="AD/CN classifier trained on real / real+synthetic / synthetic")
        run.parent.log_artifact(fig, "figures")


def _real_row(run: SuiteRun) -> None:
    """Table 4's Real column: the frozen heads on the test split."""
    from benchmark.evaluation import EvalContext, real_clinical_metrics

    ctx = EvalContext(run.cfg, None, run.stages)
    run.parent.log_metrics({f"real.{k}": v for k, v in real_clinical_metrics(ctx).items()})


STEPS = (
    SuiteStep("utility", lambda s: s.utility, before=_utility_before, per_cell=_utility_cell, after=_utility_after),
    SuiteStep("real_row", lambda s: s.real_row, after=_real_row),
    SuiteStep("prior", lambda s: s.prior_eval, after=lambda run: _evaluate_prior(run.cfg, run.stages, run.parent)),
    SuiteStep("validity", lambda s: s.validity,
              after=lambda run: _evaluate_validity(run.cfg, run.stages, run.parent, run.progress)),
)


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
