"""Where a suite's children run: ``inline`` (one after another in the driver, as always), ``local`` (up to
``--jobs`` processes on this machine, one GPU each when there are GPUs) or ``slurm`` (one job per child), the last two
through submitit, the standard way to send Python work to SLURM, whose local executor runs on any machine.

The driver (``benchmark/suites.py``) keeps everything that happens once: it computes the shared stages and opens the
parent run before any child starts, runs the ``before``/``after`` steps and builds the tables exactly as inline.
:meth:`SubmititLauncher.run_cells` reuses in the driver a finished child that has nothing left to run; for every other
cell it opens the child run (so the table's children are the parent's) and submits a :class:`ChildJob`, which

1. moves to the driver's folder and tracking store, and loads the shared stages by digest: a stage file missing
   there (``data.cache_dir`` not shared) is a one-line error, never a second training of a shared stage;
2. runs the same :func:`benchmark.suites._run_cell` as inline, on the open child run: it takes the cell's run-folder
   lock, reuses a run that finished meanwhile (say, one a killed driver's child was still training), or trains
   (resuming from the folder's checkpoint) and evaluates, then runs the suite's ``per_cell`` steps there (the
   utility suite's classifiers run in parallel too; their results come back in ``SuiteRun.state``);
3. returns what the driver merges: failures, timings, per-cell state.

The driver waits with a progress bar over the children (pending / running / done / failed); a failed child is
reported and the others go on. Killed and rerun, the driver reuses finished children and submits the rest, whose
jobs wait on the run-folder lock for any child of the old driver still running and reuse what it finishes.
A job that SLURM preempts or times out is requeued by submitit (:meth:`ChildJob.checkpoint`) and resumes training.

``--launcher slurm`` reads ``launcher.*`` (benchmark/config.py); ``launcher.cluster=local`` or ``debug`` sends the
same submission through submitit's local (processes) or debug (in the driver) executor, without SLURM.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.config import Config, LauncherConfig
from benchmark.errors import UsageError

LAUNCHERS = ("inline", "local", "slurm")
PROJECT_ROOT = Path(__file__).resolve().parents[1]  # on every child's PYTHONPATH: the job unpickles benchmark code
LOCAL_TIME_LIMIT_MIN = 60 * 24 * 365  # submitit's local default is 2 min; a local child has no time limit
POLL_S = 1.0


def submitit_folder(suite: str) -> Path:
    """Where submitit keeps a suite's job pickles and logs (``<job id>_0_log.out/err``): under the runs folder."""
    from benchmark.runner import RUNS_DIR

    return (RUNS_DIR / ".submitit" / suite).resolve()


def sbatch_options(text: str) -> dict[str, Any]:
    """``launcher.sbatch_extra`` ("account=lab qos=high exclusive", or with commas) as submitit's
    ``slurm_additional_parameters``."""
    out: dict[str, Any] = {}
    for item in text.replace(",", " ").split():
        if item:
            key, sep, value = item.partition("=")
            out[key.strip().replace("-", "_")] = value.strip() if sep else True
    return out


def slurm_parameters(settings: LauncherConfig, name: str) -> dict[str, Any]:
    """The ``AutoExecutor.update_parameters`` of one child job: the generic keys submitit maps to ``#SBATCH`` lines
    (``--time``, ``--gpus-per-node``, ``--cpus-per-task``, ``--mem``) plus the SLURM-only ones."""
    params: dict[str, Any] = {"name": name, "timeout_min": settings.time_min, "gpus_per_node": settings.gpus_per_job,
                              "nodes": 1, "tasks_per_node": 1}
    if settings.cpus_per_job:
        params["cpus_per_task"] = settings.cpus_per_job
    if settings.mem_gb:
        params["mem_gb"] = settings.mem_gb
    if settings.partition:
        params["slurm_partition"] = settings.partition
    extra = sbatch_options(settings.sbatch_extra)
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


def visible_gpus() -> list[int]:
    """This machine's GPUs as the ids a child's ``CUDA_VISIBLE_DEVICES`` takes (the driver's own list when set)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not count:
        return []
    if listed is None:
        return list(range(count))
    ids = [s.strip() for s in listed.split(",") if s.strip()][:count]
    if not all(s.isdigit() for s in ids):
        raise UsageError(f"--launcher local: CUDA_VISIBLE_DEVICES={listed!r} names GPUs by UUID; give their indices")
    return [int(s) for s in ids]


def make_launcher(name: str, jobs: int | None, cfg: Config) -> SubmititLauncher | None:
    """The launcher ``run --launcher NAME [--jobs N]`` asks for (None = inline), checked before any work.

    ``--jobs`` is how many children run at once: by default one per GPU for ``local`` (2 without GPUs; CPU threads
    are split between them), and every child at once for ``slurm`` (the scheduler queues them).
    """
    if name not in LAUNCHERS:
        raise UsageError(f"--launcher {name!r}: valid: {', '.join(LAUNCHERS)}")
    if jobs is not None and jobs < 1:
        raise UsageError(f"--jobs {jobs}: expected an integer >= 1")
    if name == "inline":
        if jobs not in (None, 1):
            raise UsageError(f"--jobs {jobs}: children run one at a time inline; add --launcher local or slurm")
        return None
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UsageError(f"--launcher {name}: submitit is not installed (pip install -r requirements.txt)") from None
    settings = cfg.launcher
    if name == "slurm":
        if settings.cluster == "slurm" and shutil.which("sbatch") is None:
            raise UsageError("--launcher slurm: no `sbatch` on this machine (run the driver on a SLURM login node; "
                             "--set launcher.cluster=local runs the same submission path here)")
        threads = settings.cpus_per_job
        return SubmititLauncher("slurm", jobs, settings, threads=threads)
    gpus = visible_gpus()
    jobs = jobs or (len(gpus) or 2)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = cfg.train.num_threads or max(1, cores // jobs)
    return SubmititLauncher("local", jobs, settings, threads=threads, gpus=tuple(gpus))


# --- the child job ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChildTask:
    """Everything a child job needs, pickled into the job: the cell, the open child run and where the driver's
    store, folder and shared stages are."""

    suite: Any  # benchmark.suites.Suite
    suite_cfg: Config
    method: str
    cfg: Config  # the cell's config (method, seed)
    label: str
    child_run_id: str
    experiment: str
    tracking_uri: str
    cwd: str
    stage_files: tuple[str, ...]  # the cohort's clinical.csv and the shared stages' cache files (absolute paths)
    stage_tags: dict[str, str]  # their digests and the split fingerprint, as the driver loaded them
    state: dict[str, Any]  # the driver's SuiteRun.state after the `before` steps
    fresh: bool = False
    threads: int = 0  # torch threads (0 = leave the default)


@dataclass
class ChildOutcome:
    """What a child job hands back to the driver."""

    label: str
    failures: list[str] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    reused_from: str | None = None
    host: str = ""


def load_shared_stages(task: ChildTask) -> Any:
    """The driver's shared stages, found by digest in ``data.cache_dir``; a :class:`UsageError` (and no training)
    when this machine does not see them: the cache folder must be shared by the driver and every child."""
    from benchmark.runner import prepare_stages

    missing = [p for p in task.stage_files if not Path(p).is_file()]
    if missing:
        raise UsageError(f"shared stage {missing[0]} not found on {socket.gethostname()}: data.cache_dir must be a "
                         "folder the driver and every child see (a shared filesystem); a child never trains a "
                         "shared stage of its own")
    stages = prepare_stages(task.cfg, progress=False)
    got = {k: stages.tags.get(k, "") for k in task.stage_tags}
    if got != task.stage_tags:
        raise UsageError(f"shared stages on {socket.gethostname()} differ from the driver's ({got} vs "
                         f"{task.stage_tags}): not the same data.cache_dir or cohort")
    return stages


def run_child(task: ChildTask) -> ChildOutcome:
    """One cell in a child process (or, with ``launcher.cluster=debug``, in the driver): the inline cell code on
    the child run the driver opened. Failures are recorded in the outcome, as inline records them, never raised."""
    import torch

    from benchmark.suites import STEPS, Cell, SuiteRun, _run_cell
    from benchmark.tracking import MlflowTracker, TrackingSettings

    threads = torch.get_num_threads()
    cwd, uri = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(task.cwd)  # relative paths (runs/, the cache, mlflow.yaml) mean what they mean to the driver
    os.environ["MLFLOW_TRACKING_URI"] = task.tracking_uri  # every lookup here (reuse, artifacts) sees its store
    if task.threads:
        torch.set_num_threads(task.threads)
    outcome = ChildOutcome(task.label, host=socket.gethostname())
    child = MlflowTracker.attach(task.child_run_id, TrackingSettings(tracking_uri=task.tracking_uri))
    try:
        try:
            stages = load_shared_stages(task)
        except Exception as err:  # noqa: BLE001 - reported like a failing method: the child run says why
            reason = f"{type(err).__name__}: {err}"
            child.set_tags({"error": reason[:4000]})
            child.finish("FAILED")
            outcome.failures.append(f"{task.suite.name}/{task.label}: {reason}")
            return outcome
        run = SuiteRun(task.suite, task.suite_cfg, stages, None, task.experiment, progress=False,
                       state=dict(task.state))
        steps = [step for step in STEPS if step.applies(task.suite)]
        cell = Cell(task.method, task.cfg, task.label, child=child)
        _run_cell(run, cell, steps, task.fresh)
        outcome.failures, outcome.state, outcome.timings = run.failures, run.state, run.timings
        outcome.reused_from = cell.reused.run_id if cell.reused is not None else None
        return outcome
    finally:
        os.chdir(cwd)
        if uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = uri
        torch.set_num_threads(threads)


class ChildJob:
    """The callable submitit pickles into each job (module level, so the job imports it from this file).

    Having :meth:`checkpoint` makes submitit requeue a job that SLURM preempts or times out (SIGUSR2) instead of
    failing it: the requeued job runs the same task and resumes from the run folder's last checkpoint.
    """

    def __call__(self, task: ChildTask) -> ChildOutcome:
        return run_child(task)

    def checkpoint(self, task: ChildTask) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, task)


# --- the driver ---------------------------------------------------------------------------------------------------
@dataclass
class _Active:
    cell: Any
    job: Any
    gpu: int | None


class SubmititLauncher:
    """``local`` or ``slurm``: the driver side. ``jobs`` children at most at once (None = all); ``threads`` torch
    threads per child (0 = default); ``gpus`` the local GPU ids handed out one per child."""

    def __init__(self, name: str, jobs: int | None, settings: LauncherConfig, *, threads: int = 0,
                 gpus: tuple[int, ...] = ()) -> None:
        self.name, self.jobs, self.settings, self.threads, self.gpus = name, jobs, settings, threads, gpus

    def describe(self) -> str:
        at_once = f"{self.jobs} at once" if self.jobs else "all at once"
        where = (f"one GPU each of {list(self.gpus)}" if self.gpus else "no GPU") if self.name == "local" else \
            f"submitit cluster {self.settings.cluster!r}"
        threads = f"{self.threads} torch thread(s)" if self.threads else "default torch threads"
        return f"launcher {self.name}: children {at_once}, {where}, {threads} each"

    def _executor(self, suite: str) -> Any:
        import submitit

        folder = submitit_folder(suite)
        if self.name == "local":
            executor = submitit.LocalExecutor(folder=folder)
            executor.update_parameters(timeout_min=LOCAL_TIME_LIMIT_MIN)
            return executor
        return submitit.AutoExecutor(folder=folder, cluster=self.settings.cluster)

    def _submit(self, executor: Any, task: ChildTask, gpu: int | None) -> Any:
        if self.name == "local":
            executor.update_parameters(gpus_per_node=0 if gpu is None else 1,
                                       visible_gpus=() if gpu is None else (gpu,))
        else:
            executor.update_parameters(**slurm_parameters(self.settings, f"{task.suite.name}-{task.label}"))
        with _child_environment(self.threads, task.tracking_uri):
            return executor.submit(ChildJob(), task)

    def run_cells(self, run: Any, cells: list[Any], steps: list[Any], fresh: bool) -> None:
        """Run ``cells`` of the suite run ``run`` as jobs and wait for them all; failures go to ``run.failures``."""
        from benchmark.suites import _finished_child, _run_cell

        per_cell = any(step.per_cell for step in steps)
        todo = []
        for cell in cells:
            # a finished child with nothing left to run for it is copied here, as inline does, without a job
            if not fresh and not per_cell and _finished_child(run.experiment, cell.cfg) is not None:
                _run_cell(run, cell, steps, fresh)
            else:
                todo.append(cell)
        if not todo:
            return
        board = _Board(run.suite.name, [c.label for c in todo], run.progress)
        board.say(f"[{run.suite.name}] {len(todo)} child run(s) through the {self.describe()}; job logs in "
                  f"{submitit_folder(run.suite.name)}")
        executor = self._executor(run.suite.name)
        base = self._task_base(run, fresh)
        queue: deque[Any] = deque(todo)
        active: dict[str, _Active] = {}
        try:
            while queue or active:
                while queue and (self.jobs is None or len(active) < self.jobs):
                    cell = queue.popleft()
                    gpu = self._free_gpu(active)
                    slot = self._start(run, cell, executor, base, gpu, board)
                    if slot is not None:
                        active[cell.label] = slot
                for label, slot in list(active.items()):
                    if slot.job.done():
                        del active[label]
                        self._collect(run, slot, board)
                    else:
                        board.set(label, _job_state(slot.job))
                if active:
                    time.sleep(POLL_S)
        except KeyboardInterrupt:
            # Ctrl-C stops the suite: its jobs are cancelled (a local child writes its checkpoint on SIGINT) and
            # marked KILLED; a driver killed outright leaves them running, and a rerun waits for them.
            for slot in active.values():
                with contextlib.suppress(Exception):
                    slot.job.cancel(check=False)
                slot.cell.child.finish("KILLED")
            run.parent.finish("KILLED")
            raise
        finally:
            board.close()

    def _task_base(self, run: Any, fresh: bool) -> dict[str, Any]:
        from benchmark.stages import stage_path
        from benchmark.tracking import TrackingSettings

        stages = run.stages
        files = [(stages.bundle.cohort.root / "clinical.csv").resolve()]  # the cohort (synthetic: in the cache)
        files += [stage_path(run.cfg, kind, info["digest"]).resolve()
                  for kind, info in (("heads", stages.heads_info), ("prior", stages.prior_info),
                                     ("fidnet", stages.fid_info)) if info.get("digest")]
        keys = ("split_fingerprint", "heads_digest", "prior_digest", "fidnet_digest")
        return {"suite": run.suite, "suite_cfg": run.cfg, "experiment": run.experiment,
                "tracking_uri": absolute_uri(TrackingSettings.load().tracking_uri), "cwd": os.getcwd(),
                "stage_files": tuple(str(f) for f in files), "stage_tags": {k: stages.tags.get(k, "") for k in keys},
                "state": run.state, "fresh": fresh, "threads": self.threads}

    def _free_gpu(self, active: dict[str, _Active]) -> int | None:
        if self.name != "local" or not self.gpus:
            return None
        used = [slot.gpu for slot in active.values()]
        return min(self.gpus, key=used.count)  # one child per GPU; more than one only when --jobs > GPUs

    def _start(self, run: Any, cell: Any, executor: Any, base: dict[str, Any], gpu: int | None,
               board: _Board) -> _Active | None:
        """Open the cell's child run and submit its job; a submission that fails (sbatch refuses it) fails the cell."""
        from benchmark.suites import _child_tags

        name = run.suite.name
        cell.child = run.parent.child(cell.label, tags=_child_tags(cell.cfg, name))
        task = ChildTask(method=cell.method, cfg=cell.cfg, label=cell.label, child_run_id=cell.child.run_id, **base)
        try:
            job = self._submit(executor, task, gpu)
        except Exception as err:  # noqa: BLE001 - one refused submission must not stop the suite
            self._fail(run, cell, f"submission failed: {_last_line(err)}", board)
            return None
        cell.child.set_tags({"launcher": self.name, "job_id": str(job.job_id)})
        board.say(f"[{name}] {cell.label}: submitted as {self.name} job {job.job_id}"
                  + (f" on GPU {gpu}" if gpu is not None else ""))
        return _Active(cell, job, gpu)

    def _collect(self, run: Any, slot: _Active, board: _Board) -> None:
        cell = slot.cell
        try:
            outcome: ChildOutcome = slot.job.result()
        except Exception as err:  # noqa: BLE001 - the job died without an outcome (killed, out of memory, time)
            self._fail(run, cell, f"job {slot.job.job_id}: {_last_line(err)}", board)
            return
        run.failures += outcome.failures
        run.timings.update(outcome.timings)
        for key, value in outcome.state.items():  # per_cell steps keep their results in dicts keyed by cell
            if isinstance(value, dict) and isinstance(run.state.get(key), dict):
                run.state[key].update(value)
            else:
                run.state[key] = value
        if outcome.failures:
            board.set(cell.label, "failed", f"FAILED ({outcome.failures[0].split(': ', 1)[-1]})")
        elif outcome.reused_from:
            board.set(cell.label, "done", f"reused finished run {outcome.reused_from}")
        else:
            took = outcome.timings.get(cell.label)
            board.set(cell.label, "done", f"done on {outcome.host}" + (f" in {took:.0f} s" if took else ""))

    def _fail(self, run: Any, cell: Any, reason: str, board: _Board) -> None:
        cell.child.set_tags({"error": reason[:4000]})
        cell.child.finish("FAILED")
        run.failures.append(f"{run.suite.name}/{cell.label}: {reason}")
        board.set(cell.label, "failed", f"FAILED ({reason})")


def absolute_uri(uri: str) -> str:
    """A tracking URI that means the same store from any working directory (``sqlite:///rel.db``, bare paths)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    if "://" not in uri and not uri.startswith("databricks"):
        return str(Path(uri).resolve())
    return uri


@contextlib.contextmanager
def _child_environment(threads: int, tracking_uri: str) -> Iterator[None]:
    """The environment a job starts with (submitit copies the driver's at submission; sbatch exports it): the
    project importable, the driver's tracking store, and ``threads`` OpenMP threads when set."""
    keys = ("PYTHONPATH", "MLFLOW_TRACKING_URI", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in keys}
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT)] + [p for p in path if p != str(PROJECT_ROOT)])
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    if threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _job_state(job: Any) -> str:
    """submitit's state of a running job in the board's words (pending or running)."""
    try:
        state = str(job.state).upper()
    except Exception:  # noqa: BLE001 - sacct hiccups: keep polling
        return "running"
    return "pending" if state in ("PENDING", "QUEUED", "REQUEUED", "CONFIGURING", "UNKNOWN") else "running"


def _last_line(err: BaseException) -> str:
    """The gist of a job's error: the exception line of its traceback (submitit wraps it with the whole trace)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.strip().startswith("-" * 5)]
    gist = next((line for line in reversed(lines) if ("Error" in line or "Exception" in line)
                 and not line.startswith(("You can check", "File "))), lines[0] if lines else type(err).__name__)
    return gist[:500]


class _Board:
    """Each child's state (pending, running, done, failed): a progress bar over the children, and one line per
    change (through the bar, so that it stays at the bottom)."""

    def __init__(self, suite: str, labels: list[str], progress: bool) -> None:
        self.suite = suite
        self.states = dict.fromkeys(labels, "pending")
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(labels), desc=f"[{suite}] children", unit="child", dynamic_ncols=True)
            self._postfix()

    def say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def set(self, label: str, state: str, message: str = "") -> None:
        old = self.states[label]
        if old == state and not message:
            return
        self.states[label] = state
        self._postfix(refresh=False)
        if state in ("done", "failed") and old not in ("done", "failed") and self.bar is not None:
            self.bar.update(1)
        self.say(f"[{self.suite}] {label}: {message or state}")

    def _postfix(self, refresh: bool = True) -> None:
        if self.bar is not None:
            counts = {s: list(self.states.values()).count(s) for s in ("pending", "running", "done", "failed")}
            self.bar.set_postfix_str(", ".join(f"{n} {s}" for s, n in counts.items()), refresh=refresh)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
