"""CLI: user errors print one line on stderr (no traceback) and exit with code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmark.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--set", "train.nope=1", "--dry-run"], "unknown config key 'train.nope'"),
        (["train", "--set", "train.batch_size=abc(", "--dry-run"], "malformed"),
        (["train", "--set", "train.batch_size=1.5", "--dry-run"], "expected int"),
        (["train", "--method", "nope", "--no-track", "--no-progress"], "unknown method 'nope'"),
        (["train", "--data", "/nonexistent/cohort", "--no-track", "--no-progress"], "/nonexistent/cohort"),
        (["run", "--suite", "table9", "--no-progress"], "unknown suite 'table9'"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, needle, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_dry_run_prints_config_and_digest(capsys) -> None:
    assert main(["train", "--preset", "quick", "--set", "loss.kl=0.2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert '"loss.kl": 0.2' in out and "digest: " in out


def test_module_entry_point_lists_registries() -> None:
    out = subprocess.run([sys.executable, "-m", "benchmark", "list"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("ours", "vae", "wgan_gp", "stylegan2", "fid_resnet18sep", "table2", "smoke"):
        assert f"  {name} " in out.stdout


def test_bad_set_in_subprocess_has_no_traceback() -> None:
    out = subprocess.run([sys.executable, "-m", "benchmark", "train", "--set", "x.y=1", "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr and out.stderr.startswith("error: unknown")


def test_train_heads_and_prior_are_cached_stages(mlflow_uri: str, smoke_args: list[str], capsys, tmp_path,
                                                 monkeypatch) -> None:
    import json

    monkeypatch.chdir(tmp_path)
    for stage in ("heads", "prior"):
        assert main(["train", "--method", stage, *smoke_args]) == 0
        first = json.loads(capsys.readouterr().out)
        assert Path(first["path"]).is_file() and first["method"] == stage
        if stage == "heads":
            assert 0.0 <= first["heads_test_bac"] <= 1.0 and first["heads_test_mse"] >= 0.0
        assert main(["train", "--method", stage, *smoke_args]) == 0  # found again by digest, not retrained
        again = json.loads(capsys.readouterr().out)
        assert again["digest"] == first["digest"] and again["run_id"] != first["run_id"]
