"""Command line: one verb per job (DESIGN §1). Errors in the user's input print one line and exit with code 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from benchmark.config import PRESET_OVERRIDES, Config, ConfigError, digest, parse_set, resolve, to_json
from benchmark.errors import UsageError, check_writable_dir
from benchmark.launchers import LAUNCHERS

__all__ = ["UsageError", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's convention for user errors: one line on stderr, exit code 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _config_args(p: argparse.ArgumentParser, method: bool = True) -> None:
    _plugin_arg(p)
    p.add_argument("--preset", default=None, choices=list(PRESET_OVERRIDES),
                   help="size/budget preset (default smoke for train, quick for run)")
    if method:
        p.add_argument("--method", default="ours",
                       help="registered method (see `list`); `train` also takes `heads` and `prior`, the shared stages")
    p.add_argument("--data", default=None, help="a prepared cohort folder (default: the embedded synthetic cohort)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.budget_volumes=200")
    p.add_argument("--config", type=Path, default=None, help="JSON file of dotted keys (e.g. the best tuning trial)")
    p.add_argument("--seed", type=int_at_least(0), default=None, help="shorthand for --set train.seed=N")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and its digest, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _plugin_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="import a module or .py file that registers methods (repeatable; also BENCHMARK_PLUGINS, "
                        "and installed `brainmri.methods` entry points); see docs/METHODS.md")


def load_methods(method: str | None = None) -> None:
    """Register every built-in method and every plugin's (``--plugin`` is in ``BENCHMARK_PLUGINS`` by now); a plugin
    that fails to import or clashes, or an unknown ``method``, is a one-line error before any work."""
    from benchmark.catalog import load_all
    from benchmark.registry import METHODS

    load_all()
    if method is not None:
        METHODS.get(method)


def config_from_args(args: argparse.Namespace, default_preset: str = "smoke",
                     methods: Sequence[str] | None = None, suite_overrides: dict[str, Any] | None = None) -> Config:
    """The resolved, validated config; ``methods`` must all take ``data.size`` (default: the config's method).
    ``suite_overrides`` (a suite file's [config]) act after ``--config`` and before ``--set``."""
    overrides = {**(suite_overrides or {}), **parse_set(args.overrides)}
    if getattr(args, "data", None):
        overrides["data.path"] = str(Path(args.data).resolve())
    if getattr(args, "seed", None) is not None:
        overrides["train.seed"] = args.seed
    method = getattr(args, "method", None)
    return resolve(args.preset or default_preset, method=method, overrides=overrides, config_file=args.config,
                   methods=methods)


def _check_outputs(cfg: Config, *folders: tuple[str, Path]) -> None:
    """Before any work: the stage cache and the command's output folders can be written (one line if not)."""
    check_writable_dir(Path(cfg.data.cache_dir), "data.cache_dir")
    for what, folder in folders:
        check_writable_dir(folder, what)


def _check_store(track: bool = True) -> None:
    if track:
        from benchmark.tracking import check_store

        check_store()


def _dry_run(cfg: Config) -> int:
    print(to_json(cfg))
    print(f"digest: {digest(cfg)}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from benchmark.plugins import plugin_of
    from benchmark.registry import METHODS, METRICS, PRESETS, SUITES

    load_methods()
    for registry in (METHODS, METRICS, SUITES, PRESETS):
        print(f"{registry.kind}s:")
        for name, doc in registry.summary():
            plugin = plugin_of(name) if registry is METHODS else None
            print(f"  {name:<22} {doc}" + (f" [plugin {plugin.source}]" if plugin else ""))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.dry_run:
        return _dry_run(cfg)
    from benchmark import commands
    from benchmark.runner import default_run_dir

    _check_outputs(cfg, ("--run-dir", args.run_dir or default_run_dir(cfg)))
    _check_store(not args.no_track)

    result = commands.train_command(cfg, resume=args.resume, progress=not args.no_progress, track=not args.no_track,
                                  run_dir=args.run_dir, stop_after_volumes=args.stop_after_volumes)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from benchmark import suites
    from benchmark.config import check_size
    from benchmark.registry import SUITES

    top = suites.load_suite_file(args.suite_file) if args.suite_file else SUITES.get(args.suite)
    # field errors first, before heavy imports; the suite's [config] sits between --config and --set
    cfg = config_from_args(args, default_preset="quick", methods=(),
                           suite_overrides=suites.suite_overrides(suites.members(top)))
    load_methods()  # plugins register their methods before the rows are checked
    selected = suites.select_suites(top, methods=args.methods)
    check_size(cfg.data.size, suites.suite_methods(selected))  # every row of the suite must take data.size
    from benchmark.launchers import make_launcher

    launcher = make_launcher(args.launcher, args.jobs, cfg)  # a bad --launcher/--jobs before any work
    if args.dry_run:
        for suite in selected:
            print(f"# suite {suite.name}: references {', '.join(suite.references) or '-'}; methods "
                  f"{', '.join(suite.methods) or '-'}")
        print(f"# {launcher.describe() if launcher else 'launcher inline: children one after another here'}")
        return _dry_run(cfg)
    from benchmark.runner import RUNS_DIR

    _check_outputs(cfg, ("runs folder", RUNS_DIR))
    _check_store()
    return suites.run_suite(selected, cfg, seeds=args.seeds, progress=not args.no_progress, fresh=args.fresh,
                            launcher=launcher)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from benchmark import commands

    metrics = [m for m in args.metrics.split(",") if m] if args.metrics else None
    _check_store(args.run_id is not None)
    result = commands.evaluate_command(run_id=args.run_id, checkpoint=args.checkpoint, metrics=metrics,
                                     overrides=parse_set(args.overrides), progress=not args.no_progress)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from benchmark import generate

    return generate.generate_command(args)


def cmd_report(args: argparse.Namespace) -> int:
    from benchmark import report

    _check_store()

    print(report.report_command(args.suite, args.format, run_id=args.run_id))
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, methods=())  # every method is counted: param_table checks the size for each
    from benchmark import commands

    table = commands.param_table(cfg, size=args.size)
    if args.json:
        print(json.dumps(table, indent=2))
    else:
        for method, groups in table.items():
            parts = ", ".join(f"{k}={v / 1e6:.2f}M" for k, v in groups.items())
            print(f"{method:<14} {parts}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmark.config import check_size

    cfg = config_from_args(args)
    load_methods()
    if args.size is not None:
        check_size(args.size, (cfg.method,), key="--size")
    from benchmark import bench

    result = bench.bench_command(cfg, what=args.what, size=args.size, batch=args.batch, repeats=args.repeats)
    print(json.dumps(result, indent=2) if args.json else bench.format_result(result))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.dry_run:
        return _dry_run(cfg)
    load_methods(cfg.method)  # not inside a trial, where Optuna would record it as a failed trial
    from benchmark import tuning
    from benchmark.runner import RUNS_DIR

    _check_outputs(cfg, ("runs folder", RUNS_DIR))
    tuning.open_storage(args.storage or tuning.default_storage())
    _check_store()

    return tuning.tune_command(cfg, trials=args.trials, study=args.study, storage=args.storage, workers=args.workers,
                               timeout=args.timeout, progress=not args.no_progress)


def cmd_data(args: argparse.Namespace) -> int:
    check_writable_dir(Path(args.out), "--out")
    if args.data_cmd == "synth":
        from benchmark.data.synthetic import synthesize_cohort

        out = synthesize_cohort(Path(args.out), n=args.n, size=args.size, seed=args.seed, workers=args.workers,
                                progress=not args.no_progress)
        print(out)
    elif args.data_cmd == "prepare":
        from benchmark.data.preprocess import prepare_cohort

        out = prepare_cohort(Path(args.csv), Path(args.images), Path(args.out), size=args.size,
                             mask_dir=Path(args.mask_dir) if args.mask_dir else None, workers=args.workers,
                             skip_bad=args.skip_bad, progress=not args.no_progress)
        print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m benchmark", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="registered methods, metrics, suites and presets")
    _plugin_arg(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("train", help="train one method, one seed (resumable)")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--run-dir", type=Path, default=None, help="where checkpoints go (default runs/<method>-<digest>)")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument("--stop-after-volumes", type=int_at_least(1), default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="run a suite (train + evaluate every method, log to MLflow, print tables)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--suite", help="a registered suite (see `list`)")
    g.add_argument("--suite-file", type=Path, metavar="FILE.toml",
                   help="a suite defined in a TOML file (benchmark/suite_files/table3.toml explains the keys)")
    p.add_argument("--methods", default=None, metavar="[+|-]NAME,...",
                   help="edit the suite's rows: +NAME adds, -NAME removes; bare names replace the trained rows")
    _config_args(p, method=False)
    p.add_argument("--seeds", type=int_at_least(1), default=None,
                   help="independent trainings per method (default: the suite's `seeds`, else 1)")
    p.add_argument("--fresh", action="store_true", help="retrain even when finished child runs exist")
    p.add_argument("--launcher", default="inline", choices=LAUNCHERS,
                   help="where the children (method x seed) run: inline = one after another in this process; local "
                        "= --jobs processes on this machine, one GPU each; slurm = one SLURM job each, launcher.* "
                        "keys (README 'Running suites in parallel')")
    p.add_argument("--jobs", type=int_at_least(1), default=None,
                   help="children at once (local: default one per GPU, else 2; slurm: default all)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("evaluate", help="score a trained run or checkpoint")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--run-id")
    g.add_argument("--checkpoint", type=Path)
    p.add_argument("--metrics", default=None, help="comma-separated metric names (default: all for the method)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    _plugin_arg(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("generate", help="synthesise T1 volumes for clinical vectors (paper Algorithm 3)")
    from benchmark.generate import add_arguments

    add_arguments(p)
    _plugin_arg(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("report", help="rebuild a suite's tables from the MLflow store alone")
    p.add_argument("--suite", required=True)
    p.add_argument("--format", default="md", choices=["md", "csv", "latex"])
    p.add_argument("--run-id", default=None, help="a specific parent run (default: the latest finished one)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("params", help="parameter counts per component of every method")
    _config_args(p, method=False)
    p.add_argument("--size", type=int_at_least(8), default=None, help="volume size (default: the preset's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("bench", help="speed and memory: ms per training step / generated volume, peak memory")
    _config_args(p)
    p.add_argument("--what", default="train", choices=["train", "generate", "prior", "metrics", "depthwise",
                                                       "synth"])
    p.add_argument("--size", type=int_at_least(8), default=None)
    p.add_argument("--batch", type=int_at_least(1), default=None)
    p.add_argument("--repeats", type=int_at_least(1), default=5)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("tune", help="Optuna study over the loss weights")
    _config_args(p)
    p.add_argument("--trials", type=int_at_least(1), default=20)
    p.add_argument("--study", default=None)
    p.add_argument("--storage", default=None, help="journal file path or an RDB URL (postgresql://...)")
    p.add_argument("--workers", type=int_at_least(1), default=1)
    p.add_argument("--timeout", type=_positive_float, default=None, help="seconds")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("data", help="the synthetic cohort, or preparation of a real one")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    q = dsub.add_parser("synth", help="write the embedded synthetic cohort")
    q.add_argument("--out", required=True)
    q.add_argument("--n", type=int_at_least(1), default=400)
    q.add_argument("--size", type=int_at_least(8), default=64)  # the synthetic template's smallest size
    q.add_argument("--seed", type=int_at_least(0), default=0)
    q.add_argument("--workers", type=int_at_least(1), default=2)
    q.add_argument("--no-progress", action="store_true")
    q = dsub.add_parser("prepare", help="preprocess an ADNI-style cohort (RAS, crop, B-spline resample, z-score)")
    q.add_argument("--csv", required=True)
    q.add_argument("--images", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--size", type=int_at_least(8), default=128)
    q.add_argument("--mask-dir", default=None)
    q.add_argument("--workers", type=int_at_least(1), default=2)
    q.add_argument("--skip-bad", action="store_true", help="drop and report bad rows instead of stopping")
    q.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_data)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """The anticipated failures (benchmark/errors.py); anything else is a bug and keeps its traceback."""
    from benchmark.registry import UnknownEntry

    errors: list[type[BaseException]] = [ConfigError, UsageError, UnknownEntry]
    try:
        from benchmark.data.errors import DataError

        errors.append(DataError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: Sequence[str] | None = None, *, handler: Callable[[argparse.Namespace], int] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_signed_values(list(sys.argv[1:] if argv is None else argv)))
    if getattr(args, "plugin", None):
        from benchmark.plugins import add_to_env

        add_to_env(args.plugin)  # loaded with the built-in methods, here and in every process the command starts
    try:
        return (handler or args.func)(args)
    except _user_errors() as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: a resumable checkpoint was written (rerun with --resume)", file=sys.stderr)
        return 130


def _join_signed_values(argv: list[str]) -> list[str]:
    """``--methods -vae`` as ``--methods=-vae``: argparse would take a value that starts with "-" for an option."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--methods" and arg.startswith("-"):
            out[-1] = f"--methods={arg}"
        else:
            out.append(arg)
    return out


def _one_line(err: Any) -> str:
    text = str(err).strip().replace("\n", " ")
    return text if len(text) < 2000 else text[:2000] + "..."
