"""The one training loop: MLflow logging, exact resume after SIGKILL, determinism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from mlflow import MlflowClient

from benchmark.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_vae_smoke_run_is_tracked(mlflow_uri: str, smoke_args: list[str], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--method", "vae", *smoke_args]) == 0
    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("brainmri/train")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.method = 'vae'")
    assert runs, "no run logged"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr_g"] == "0.0001" and run.data.params["method"] == "vae"
    for tag in ("git_commit", "config_digest", "preset", "data_source", "split_fingerprint", "version.torch"):
        assert run.data.tags.get(tag), tag
    assert run.data.tags["preset"] == "smoke"
    history = client.get_metric_history(run.info.run_id, "loss_rec")
    assert len(history) >= 3 and len({m.step for m in history}) == len(history)
    assert "fid_resnet18sep" in run.data.metrics and "ssim_triplanar" in run.data.metrics
    figures = [a.path for a in client.list_artifacts(run.info.run_id, "figures")]
    assert "figures/slices.png" in figures
    # the cohort and its split as an MLflow dataset input (the runs table's Dataset column)
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == run.data.tags["split_fingerprint"]
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"
    assert '"split"' in inp.dataset.schema and '"subject_id"' in inp.dataset.schema


def _train_cmd(run_dir: Path, cache: Path, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "benchmark", "train", "--method", "vae", "--preset", "smoke", "--no-track",
           "--no-progress", "--run-dir", str(run_dir), "--set", f"data.cache_dir={cache}",
           "--set", "train.budget_volumes=480", "--set", "train.checkpoint_every_volumes=40",
           "--set", "train.val_every_volumes=80", "--set", "train.lr_cooldown_volumes=480"]  # killed mid-cooldown
    return cmd + (["--resume"] if resume else [])


def test_sigkill_then_resume_equals_uninterrupted(stage_cache: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_train_cmd(reference, stage_cache), cwd=tmp_path, env=env, check=True, timeout=600,
                   capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed, stage_cache), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    state = torch.load(killed / "checkpoint.pt", weights_only=True)["state"]
    assert 0 < state["volumes_seen"] < 480
    subprocess.run(_train_cmd(killed, stage_cache, resume=True), cwd=tmp_path, env=env, check=True, timeout=600,
                   capture_output=True)
    a = torch.load(reference / "checkpoint.pt", weights_only=True)
    b = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert a["state"]["volumes_seen"] == b["state"]["volumes_seen"] == 480
    assert a["method"].keys() == b["method"].keys()
    for key in a["method"]:
        assert torch.equal(a["method"][key], b["method"][key]), key
    ref_metrics = json.loads((reference / "metrics.json").read_text())["metrics"]
    res_metrics = json.loads((killed / "metrics.json").read_text())["metrics"]
    assert ref_metrics == res_metrics


def test_same_config_and_seed_give_identical_metrics(smoke_args: list[str], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    outs = []
    for name in ("a", "b"):
        assert main(["train", "--method", "xvaegan_clin", "--no-track", "--run-dir", str(tmp_path / name),
                     *smoke_args]) == 0
        outs.append((tmp_path / name / "metrics.json").read_text())
    assert outs[0] == outs[1]
    assert json.loads(outs[0])["metrics"]["fid_resnet18sep"] > 0
