"""Optuna studies: journal storage shared by 2 workers, MLflow parent/child runs, pruning; PostgreSQL storage."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from benchmark.cli import main
from benchmark.tracking import PARENT_TAG


def test_four_trials_two_workers_journal(mlflow_uri: str, smoke_args: list[str], tmp_path: Path,
                                         monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    journal = tmp_path / "journal.log"
    # Budget with several validations so the median pruner has intermediate values to act on; a huge KL
    # range makes some trials clearly worse.
    args = ["tune", "--method", "xvaegan_clin", "--trials", "4", "--workers", "2", "--study", "s1", "--storage",
            str(journal), *smoke_args, "--set", "train.budget_volumes=64", "--set", "train.val_every_volumes=16",
            "--set", "tune.pruner_warmup=0"]
    assert main(args) == 0
    study = optuna.load_study(study_name="s1", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) >= 4
    assert study.trials[0].params["rec"] == pytest.approx(10.0)  # the paper's weights come first
    # the two workers explore different weights (same-seeded samplers would propose the same ones)
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == len(study.trials)
    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("brainmri/tune")
    parent = client.search_runs([exp.experiment_id], filter_string="tags.optuna_study = 's1'")[0]
    kids = client.search_runs([exp.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    assert len(kids) == len(finished)
    by_number = {int(k.data.tags["optuna_trial"]): k for k in kids}
    for t in finished:
        assert by_number[t.number].data.tags["optuna_state"] == t.state.name
        assert float(by_number[t.number].data.params["loss.kl"]) == pytest.approx(t.params["kl"])
    assert (tmp_path / "runs" / "tune" / "s1-best.json").is_file()


def test_pruned_trial_is_marked_in_both(mlflow_uri: str, smoke_args: list[str], tmp_path: Path,
                                        monkeypatch) -> None:
    """A pruner that always prunes: the trial is PRUNED in Optuna and tagged PRUNED in MLflow."""
    from benchmark import tuning

    monkeypatch.chdir(tmp_path)
    real_create = tuning.create_study

    def always_prune(cfg, name, storage, worker=0):
        study = real_create(cfg, name, storage, worker)
        study.pruner = optuna.pruners.ThresholdPruner(upper=-1.0)  # every FID is above -1: prune
        return study

    monkeypatch.setattr(tuning, "create_study", always_prune)
    journal = tmp_path / "j.log"
    main(["tune", "--method", "xvaegan_clin", "--trials", "1", "--study", "s2", "--storage", str(journal),
          *smoke_args, "--set", "train.budget_volumes=32", "--set", "train.val_every_volumes=16"])
    study = optuna.load_study(study_name="s2", storage=tuning.open_storage(str(journal)))
    assert [t.state.name for t in study.trials] == ["PRUNED"]
    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("brainmri/tune")
    kid = client.search_runs([exp.experiment_id], filter_string="tags.optuna_trial = '0' and tags.optuna_state = "
                                                                 "'PRUNED'")
    assert kid and kid[0].info.status == "KILLED"


def _postgres_bin() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "postgres").is_file():
            return candidate
    return None


@pytest.fixture
def postgres_url(tmp_path: Path):
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server not installed (Debian package `postgresql`; .ci/run installs it)")
    pytest.importorskip("psycopg2")
    import pwd
    import tempfile

    user = None
    if os.geteuid() == 0:  # postgres refuses to run as root
        try:
            user = pwd.getpwnam("postgres").pw_name
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the server as")
    run_as = ["runuser", "-u", user, "--"] if user else []
    # pytest's tmp dirs are private to root; the server needs a folder it owns and can reach
    base = Path(tempfile.mkdtemp(prefix="bm-pg-"))
    base.chmod(0o755)
    data = base / "data"
    data.mkdir()
    if user:
        shutil.chown(base, user)
        shutil.chown(data, user)
    tmp_path = base
    subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "bench"], check=True,
                   capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*run_as, str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(tmp_path),
                             "-h", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"postgresql+psycopg2://bench@127.0.0.1:{port}/postgres"
    import psycopg2

    for _ in range(100):
        try:
            psycopg2.connect(url.replace("+psycopg2", "")).close()
            break
        except psycopg2.OperationalError:
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    shutil.rmtree(base, ignore_errors=True)


def test_postgres_storage_shares_a_study(postgres_url: str) -> None:
    from benchmark.tuning import open_storage

    storage = open_storage(postgres_url)
    study = optuna.create_study(study_name="pg", storage=storage, sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(lambda t: (t.suggest_float("x", -1, 1) - 0.3) ** 2, n_trials=3)
    other = optuna.load_study(study_name="pg", storage=open_storage(postgres_url))  # a second client
    assert len(other.trials) == 3 and other.best_value == pytest.approx(study.best_value)
