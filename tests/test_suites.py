"""Suites end to end at smoke size: parent/child structure in MLflow, report from the store, reuse after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

from benchmark.cli import main
from benchmark.tracking import PARENT_TAG

ROOT = Path(__file__).resolve().parents[1]


def _children(client: MlflowClient, parent_id: str, exp_id: str) -> list:
    return client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'")


def test_suite_all_smoke_and_report(mlflow_uri: str, smoke_args: list[str], tmp_path: Path, monkeypatch,
                                    capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--suite", "all", *smoke_args]) == 0
    printed = capsys.readouterr().out
    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("brainmri/table2")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'suite'")
    assert len(parents) == 1
    kids = _children(client, parents[0].info.run_id, exp.experiment_id)
    assert sorted(k.data.tags["method"] for k in kids) == sorted(["vae", "vaegan", "xvaegan", "xvaegan_clin", "ours",
                                                                  "real", "train_copy", "mean_volume", "medoid"])
    # per-method keys: training logs, clinical metrics (conditional rows), parameter groups (architecture)
    training_only = ("time", "stage.", "loss", "val_", "bac", "roi_", "active_units", "volume_", "params_")
    keys = [{k for k in kid.data.metrics if not k.startswith(training_only)} for kid in kids]
    assert all(k == keys[0] for k in keys), keys
    assert {"fid_resnet18", "fid_resnet18sep", "ssim_triplanar", "ssim_nn_triplanar"} <= keys[0]
    assert all("params_total" in kid.data.metrics for kid in kids)
    # AlexNet needs slices of at least 31 px: at 16^3 LPIPS is reported unavailable, with the reason, never faked
    assert all("lpips_triplanar_alexrand" in k or kid.data.tags.get("unavailable.lpips_triplanar_alex")
               for k, kid in zip(keys, kids, strict=True))
    artifacts = [a.path for a in client.list_artifacts(parents[0].info.run_id, "tables")]
    assert "tables/table2.md" in artifacts and "tables/table2.tex" in artifacts
    # `ours` trained once for table2 is reused by table3 and table4
    exp3 = client.get_experiment_by_name("brainmri/table3")
    ours3 = client.search_runs([exp3.experiment_id], filter_string="tags.method = 'ours'")
    assert ours3 and ours3[0].data.tags.get("reused_from")
    # utility reuses the four trained generators, adds memorization and the three classifier arms
    exp_u = client.get_experiment_by_name("brainmri/utility")
    parent_u = client.search_runs([exp_u.experiment_id], filter_string="tags.kind = 'suite'")[0]
    kids_u = _children(client, parent_u.info.run_id, exp_u.experiment_id)
    assert sorted(k.data.tags["method"] for k in kids_u) == sorted(["wgan_gp", "stylegan2", "ours", "ours_noaux"])
    for kid in kids_u:
        assert kid.data.tags.get("reused_from") and kid.info.status == "FINISHED"
        m = kid.data.metrics
        assert all(0.0 <= m[k] <= 1.0 for k in ("utility_real_bac", "utility_mixed_bac", "utility_synth_bac"))
        assert m["nn_ratio_median"] > 0 and 0.0 <= m["nn_ratio_frac_below"] <= 1.0
        labels = "frozen classifier" if kid.data.tags["method"] in ("wgan_gp", "stylegan2") else "requested"
        assert kid.data.tags["utility_labels"].startswith(labels)
        figs = [a.path for a in client.list_artifacts(kid.info.run_id, "figures")]
        assert "figures/nn_ratio.png" in figs and "figures/closest_pairs.png" in figs
    assert len({k.data.metrics["utility_real_bac"] for k in kids_u}) == 1  # the real arm is trained once
    assert "figures/utility_bac.png" in [a.path for a in client.list_artifacts(parent_u.info.run_id, "figures")]
    # on its own, the utility suite finds the trained generators again and recomputes only its own numbers
    assert main(["run", "--suite", "utility", *smoke_args]) == 0
    assert "BAC syn only" in capsys.readouterr().out
    assert len(client.search_runs([exp_u.experiment_id], filter_string="tags.kind = 'suite'")) == 2
    # report rebuilds the same table from the store alone
    for suite in ("table2", "table3", "table4", "prior", "utility"):
        assert main(["report", "--suite", suite]) == 0
        table = capsys.readouterr().out.strip()
        assert table and table in printed, suite
    assert "Real (test split)" in printed and "mmd" in printed
    assert "Real (train vs test, floor)" in printed and "mean_volume (reference)" in printed


def test_killed_suite_does_not_retrain_finished_methods(stage_cache: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'kill.db'}"}
    cmd = [sys.executable, "-m", "benchmark", "run", "--suite", "table3", "--preset", "smoke", "--no-progress",
           "--set", f"data.cache_dir={stage_cache}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    done = lambda: list((tmp_path / "runs").glob("wgan_gp-*/metrics.json"))  # noqa: E731
    while not done() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done(), "wgan_gp never finished"
    time.sleep(0.5)
    # Whether or not the kill landed between metrics.json and the status update, force that window's state:
    # the evaluated run is left RUNNING, and the rerun must still reuse it (and close it).
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    ids = [e.experiment_id for e in client.search_experiments()]
    evaluated = client.search_runs(ids, filter_string="tags.method = 'wgan_gp' and tags.evaluated = '1'")
    assert len(evaluated) == 1
    client.update_run(evaluated[0].info.run_id, status="RUNNING")
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "wgan_gp-seed0: reused finished run" in out.stdout
    assert "stylegan2-seed0: training" in out.stdout or "stylegan2-seed0: reused" in out.stdout
    assert client.get_run(evaluated[0].info.run_id).info.status == "FINISHED"
