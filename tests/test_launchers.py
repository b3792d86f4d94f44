"""Suites through a launcher (benchmark/launchers.py): the same table as inline, each child trained once, the shared
stages never recomputed by a child, the SLURM path end to end through submitit's debug executor, and a driver killed
while two children run, rerun without training any child twice.

"Trained once" is read from the store: per method, one evaluated run that is not a reuse, and no training step
(a loss logged at a given number of volumes seen) logged twice across all of the method's runs.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

import benchmark.suites  # noqa: F401 - registers the built-in suites
from benchmark.cli import main
from benchmark.config import resolve
from benchmark.errors import UsageError
from benchmark.launchers import ChildTask, SubmititLauncher, load_shared_stages, slurm_parameters
from benchmark.registry import SUITES
from benchmark.tracking import PARENT_TAG

ROOT = Path(__file__).resolve().parents[1]
ROWS = "--methods=-vaegan,-xvaegan,-xvaegan_clin,-train_copy,-mean_volume,-medoid"  # real, vae, ours
# One thread in every process (inline and children): CPU kernels give the same bits for the same thread count.
SMALL = ["--set", "train.budget_volumes=16", "--set", "eval.n_generated=4", "--set", "eval.n_draws=1",
         "--set", "eval.bootstrap=20", "--set", "eval.n_prior_vectors=8", "--set", "train.num_threads=1"]
VARIES = ("time", "peak_")  # wall times and memory peaks: the only metrics that may differ between two runs


def _suite(args: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
           rows: str = ROWS) -> str:
    """``run --suite table2`` in this process, in ``cwd`` with its own MLflow store; returns what it printed."""
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _uri(cwd))
    capsys.readouterr()
    assert main(["run", "--suite", "table2", "--preset", "smoke", "--no-progress", rows, *args, *SMALL]) == 0
    return capsys.readouterr().out


def _uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlruns.db'}"


def _table(printed: str) -> list[str]:
    return [line for line in printed.splitlines() if line.startswith("|")]


def _children(uri: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("brainmri/table2")
    parent = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'suite'")[0]  # the latest
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")


def _metrics(uri: str) -> dict[str, dict[str, float]]:
    """method -> the metrics of its child run in the latest parent, less wall times and memory peaks."""
    return {k.data.tags["method"]: {m: v for m, v in k.data.metrics.items() if not m.startswith(VARIES)}
            for k in _children(uri)}


def _trainings(uri: str) -> tuple[Counter, dict[str, list[float]]]:
    """Per method: how many evaluated runs are not reuses, and every training step logged by any of its runs."""
    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    evaluated: Counter = Counter()
    steps: dict[str, list[float]] = {}
    for run in client.search_runs(ids, filter_string="tags.method != ''"):
        if "reused_from" in run.data.tags or run.data.tags.get("kind") == "suite":
            continue
        method = run.data.tags["method"]
        evaluated[method] += run.data.tags.get("evaluated") == "1"
        losses = sorted(k for k in run.data.metrics if k.startswith("loss"))
        if losses:
            steps.setdefault(method, []).extend(m.step for m in client.get_metric_history(run.info.run_id, losses[0]))
    return evaluated, steps


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def inline(tmp_path_factory: pytest.TempPathFactory, stage_cache: Path) -> tuple[str, str]:
    """The inline run every launcher is compared with: (what it printed, its store's URI)."""
    import torch

    cwd = tmp_path_factory.mktemp("inline")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every child: train.num_threads acts in training only, the reference rows need it too
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setenv("MLFLOW_TRACKING_URI", _uri(cwd))
        from io import StringIO

        out = StringIO()
        mp.setattr(sys, "stdout", out)
        assert main(["run", "--suite", "table2", "--preset", "smoke", "--no-progress", ROWS,
                     "--set", f"data.cache_dir={stage_cache}", *SMALL]) == 0
    torch.set_num_threads(threads)
    return out.getvalue(), _uri(cwd)


def test_local_jobs_give_the_inline_table_training_each_child_once(inline, stage_cache: Path, tmp_path: Path,
                                                                   monkeypatch, capsys, one_thread) -> None:
    printed, inline_uri = inline
    before = _snapshot(stage_cache)  # the inline run has filled the cache: children must only read it
    out = _suite(["--set", f"data.cache_dir={stage_cache}", "--launcher", "local", "--jobs", "2"], tmp_path,
                 monkeypatch, capsys)
    assert "submitted as local job" in out
    assert _table(out) == _table(printed) and _table(out)
    assert _metrics(_uri(tmp_path)) == _metrics(inline_uri)
    kids = _children(_uri(tmp_path))
    assert sorted(k.data.tags["method"] for k in kids) == ["ours", "real", "vae"]
    assert all(k.info.status == "FINISHED" and k.data.tags["launcher"] == "local" for k in kids)
    evaluated, steps = _trainings(_uri(tmp_path))
    assert evaluated == Counter({"real": 1, "vae": 1, "ours": 1})
    assert steps.keys() == {"vae", "ours"} and all(sorted(s) == [4, 8, 12, 16] for s in steps.values()), steps
    assert _snapshot(stage_cache) == before  # no stage (nor the cohort) written again by a child
    assert list((tmp_path / "runs" / ".submitit" / "table2").glob("*_0_log.out"))  # job logs under runs/


def test_slurm_path_through_submitit_debug_executor(inline, stage_cache: Path, tmp_path: Path, monkeypatch, capsys,
                                                    one_thread) -> None:
    """``--launcher slurm`` with every SLURM option set, sent through submitit's in-process debug executor."""
    _, inline_uri = inline
    out = _suite(["--set", f"data.cache_dir={stage_cache}", "--launcher", "slurm",
                  "--set", "launcher.cluster=debug", "--set", "launcher.partition=gpu", "--set", "launcher.time_min=30",
                  "--set", "launcher.gpus_per_job=0", "--set", "launcher.cpus_per_job=1", "--set", "launcher.mem_gb=4",
                  "--set", "launcher.sbatch_extra=account=lab qos=high"], tmp_path, monkeypatch, capsys,
                 rows=ROWS + ",-ours")
    assert "submitted as slurm job DEBUG_" in out
    kids = _children(_uri(tmp_path))
    assert sorted(k.data.tags["method"] for k in kids) == ["real", "vae"]
    assert all(k.info.status == "FINISHED" and k.data.tags["job_id"].startswith("DEBUG_") for k in kids)
    expected = _metrics(inline_uri)
    assert _metrics(_uri(tmp_path)) == {m: expected[m] for m in ("real", "vae")}
    assert (tmp_path / "runs" / ".submitit" / "table2").is_dir()


def test_slurm_submission_maps_the_launcher_keys_to_sbatch(tmp_path: Path, monkeypatch) -> None:
    """The real SlurmExecutor against stand-in `srun`/`sbatch`: the #SBATCH lines and the job's environment."""
    import submitit

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", "exit 0"), ("sbatch", f'cp "$1" {tmp_path}/job.sh; env > {tmp_path}/job.env\n'
                                                       'echo "Submitted batch job 4242"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    cfg = resolve("smoke", method="vae", overrides={
        "launcher.partition": "gpu", "launcher.time_min": 90, "launcher.gpus_per_job": 2, "launcher.cpus_per_job": 8,
        "launcher.mem_gb": 32.0, "launcher.sbatch_extra": "account=lab,qos=high,exclusive"})
    assert slurm_parameters(cfg.launcher, "x")["slurm_additional_parameters"] == {"account": "lab", "qos": "high",
                                                                                   "exclusive": True}
    launcher = SubmititLauncher("slurm", None, cfg.launcher, threads=cfg.launcher.cpus_per_job)
    task = ChildTask(suite=SUITES.get("table2"), suite_cfg=cfg, method="vae", cfg=cfg, label="vae-seed0",
                     child_run_id="0" * 32, experiment="table2", tracking_uri="sqlite:////store/mlruns.db",
                     cwd=str(tmp_path), stage_files=(), stage_tags={}, state={})
    job = launcher._submit(submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm"), task, None)
    assert isinstance(job, submitit.SlurmJob) and job.job_id == "4242"
    script = (tmp_path / "job.sh").read_text().splitlines()
    for line in ("--partition=gpu", "--time=90", "--gpus-per-node=2", "--cpus-per-task=8", "--mem=32GB",
                 "--account=lab", "--qos=high", "--exclusive", "--job-name=table2-vae-seed0", "--nodes=1"):
        assert f"#SBATCH {line}" in script, line
    env = dict(line.split("=", 1) for line in (tmp_path / "job.env").read_text().splitlines() if "=" in line)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)  # the job can import the benchmark
    assert env["MLFLOW_TRACKING_URI"] == "sqlite:////store/mlruns.db" and env["OMP_NUM_THREADS"] == "8"
    assert os.environ.get("OMP_NUM_THREADS") != "8"  # the driver's own environment is left as it was


def test_a_child_refuses_to_train_a_missing_shared_stage(tmp_path: Path) -> None:
    cfg = resolve("smoke", method="vae", overrides={"data.cache_dir": str(tmp_path / "elsewhere")})
    task = ChildTask(suite=SUITES.get("table2"), suite_cfg=cfg, method="vae", cfg=cfg, label="vae-seed0",
                     child_run_id="0" * 32, experiment="table2", tracking_uri="", cwd=str(tmp_path),
                     stage_files=(str(tmp_path / "elsewhere" / "stages" / "heads-0123.pt"),), stage_tags={},
                     state={})
    with pytest.raises(UsageError, match="data.cache_dir must be a folder the driver and every child see"):
        load_shared_stages(task)
    assert not (tmp_path / "elsewhere").exists()  # nothing synthesised, nothing trained


def test_killed_driver_rerun_trains_no_child_twice(stage_cache: Path, tmp_path: Path) -> None:
    """SIGKILL the driver while its two local children train (they go on: submitit starts them to outlive it),
    rerun: the new jobs wait on the run-folder locks, then reuse what the old children finish."""
    uri = _uri(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1",
           "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "benchmark", "run", "--suite", "table2", "--preset", "smoke", "--no-progress",
           "--methods=-vaegan,-xvaegan,-xvaegan_clin,-real,-train_copy,-mean_volume,-medoid", "--launcher", "local",
           "--jobs", "2", "--set", f"data.cache_dir={stage_cache}", *SMALL, "--set", "train.budget_volumes=200",
           "--set", "train.checkpoint_every_volumes=8", "--set", "train.val_every_volumes=200"]
    driver = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = tmp_path / "runs"
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None and not (
            list(runs.glob("vae-*/checkpoint.pt")) and list(runs.glob("ours-*/checkpoint.pt"))):
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    jobs = runs / ".submitit" / "table2"
    orphans = [int(p.name.split("_")[0]) for p in jobs.glob("*_submitted.pkl")]
    try:
        assert len(orphans) == 2 and not list(runs.glob("*/metrics.json")), "the kill missed two running children"
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        kids = _children(uri)
        assert sorted(k.data.tags["method"] for k in kids) == ["ours", "vae"]
        assert all(k.info.status == "FINISHED" and k.data.tags.get("reused_from") for k in kids)
        evaluated, steps = _trainings(uri)
        assert evaluated == Counter({"vae": 1, "ours": 1})
        for method, logged in steps.items():
            assert sorted(logged) == list(range(4, 201, 4)), (method, Counter(logged).most_common(3))
        logs = "".join(p.read_text() for p in jobs.glob("*_0_log.err") if int(p.name.split("_")[0]) not in orphans)
        # the rerun did meet an old child still running (not only the stage cache's lock, taken by every child)
        assert re.search(r"\[table2\] \w+-seed0: waiting for another process working in runs/", logs), logs[-3000:]
    finally:
        _reap(orphans)


def _reap(pids: list[int], wait_s: float = 60) -> None:
    """The killed driver's job controllers (and their task processes) end on their own; any still running after
    ``wait_s`` (a failed assertion above) is killed, tasks first."""
    deadline = time.time() + wait_s
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        for task in [p for p in _processes() if _parent(p) == pid] + [pid]:
            if _alive(task):
                os.kill(task, signal.SIGKILL)


def _processes() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] not in "ZX"
    except (OSError, IndexError):
        return False
