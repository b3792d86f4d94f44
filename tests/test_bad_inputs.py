"""Every bad input gets one line (issue #17): exit code 2, one line on stderr, no traceback, nothing written.

One table of plausible mistakes, each run as a real `python -m benchmark` subprocess; then two `run --suite`
processes started at once on the same store and folder (each child is trained once, the other process reuses it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from benchmark.catalog import load_all
from benchmark.config import SIZE_RULES, Config, ConfigError, check_size, field_rules, flatten, resolve
from benchmark.registry import METHODS
from benchmark.runner import MetaHeads, build_method
from benchmark.train import TrainState, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = "/proc/forbidden"  # cannot be created, even by root


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", **extra}


def _benchmark(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmark", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny real and broken checkpoints (a smoke wgan_gp saved by the training loop's own save_checkpoint)."""
    d = tmp_path_factory.mktemp("bad-inputs")
    cfg = resolve("smoke", method="wgan_gp")
    method = build_method(cfg)
    method.setup()
    good = d / "good" / "checkpoint.pt"
    save_checkpoint(good, method, {}, TrainState(), cfg)
    raw = good.read_bytes()
    (d / "truncated").mkdir()
    (d / "truncated" / "checkpoint.pt").write_bytes(raw[: len(raw) // 2])
    (d / "garbage.pt").write_bytes(b"not a checkpoint at all\n")
    payload = torch.load(good, weights_only=True)
    torch.save({**payload, "config": {**payload["config"], "model.retired_option": 1}}, d / "newer.pt")
    torch.save({**payload, "config": {**payload["config"], "wgan.width": 0.25}}, d / "mismatch.pt")
    (d / "bad.json").write_text(json.dumps({"train.batch_size": 0}))
    return d


# (id, argv, extra environment, a substring of the one line); {d} = the inputs folder, {port} = a closed port.
CASES = [
    ("generate-missing", ["generate", "--checkpoint", "{d}/missing.pt", "--n", "2", "--out", "g"], {},
     "no such checkpoint"),
    ("evaluate-missing", ["evaluate", "--checkpoint", "{d}/missing"], {}, "no such checkpoint"),
    ("evaluate-truncated", ["evaluate", "--checkpoint", "{d}/truncated"], {}, "truncated or corrupt"),
    ("generate-garbage", ["generate", "--checkpoint", "{d}/garbage.pt", "--out", "g"], {}, "not a readable"),
    ("evaluate-newer-config", ["evaluate", "--checkpoint", "{d}/newer.pt"], {}, "model.retired_option"),
    ("evaluate-weights-mismatch", ["evaluate", "--checkpoint", "{d}/mismatch.pt"], {}, "shape(s) differ"),
    ("evaluate-set-incompatible", ["evaluate", "--checkpoint", "{d}/good", "--set", "wgan.z_dim=64"], {},
     "wgan.z_dim=64 (saved: 32)"),
    ("evaluate-unknown-run", ["evaluate", "--run-id", "deadbeef"], {}, "no such run"),
    ("report-unknown-run", ["report", "--suite", "table2", "--run-id", "deadbeef"], {}, "no `table2` run"),
    ("run-batch-negative", ["run", "--suite", "table2", "--preset", "smoke", "--set", "train.batch_size=-1"], {},
     "train.batch_size=-1: allowed: an integer >= 1"),
    ("run-batch-zero", ["run", "--suite", "table2", "--preset", "smoke", "--set", "train.batch_size=0"], {},
     "train.batch_size=0"),
    ("run-size-7", ["run", "--suite", "table2", "--preset", "smoke", "--set", "data.size=7"], {}, "data.size=7"),
    ("run-size-24-table3", ["run", "--suite", "table3", "--preset", "smoke", "--set", "data.size=24"], {},
     "wgan_gp needs a power of two"),
    ("train-size-12-dry-run", ["train", "--method", "ours", "--set", "data.size=12", "--dry-run"], {},
     "a multiple of 8"),
    ("train-bad-choice-dry-run", ["train", "--set", "model.adv_loss=wgan", "--dry-run"], {}, "one of 'lsgan'"),
    ("train-config-file", ["train", "--config", "{d}/bad.json", "--dry-run"], {}, "train.batch_size=0"),
    ("run-seeds-0", ["run", "--suite", "table2", "--seeds", "0"], {}, "--seeds"),
    ("tune-trials-0", ["tune", "--preset", "smoke", "--trials", "0"], {}, "--trials"),
    ("generate-n-0", ["generate", "--checkpoint", "{d}/good", "--n", "0", "--out", "g"], {}, "--n"),
    ("tune-storage-malformed", ["tune", "--preset", "smoke", "--storage", "bogus://x"], {}, "Optuna storage"),
    ("tune-storage-unreachable", ["tune", "--preset", "smoke", "--storage", f"sqlite:///{FORBIDDEN}/o.db"], {},
     "Optuna storage"),
    ("tracking-uri-malformed", ["report", "--suite", "table2"], {"MLFLOW_TRACKING_URI": "bogus://x"},
     "tracking URI"),
    ("tracking-uri-unreachable", ["report", "--suite", "table2"], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"},
     "cannot reach"),
    ("synth-out-forbidden", ["data", "synth", "--out", FORBIDDEN, "--n", "4", "--size", "16"], {}, "--out"),
    ("synth-n-0", ["data", "synth", "--out", "c", "--n", "0"], {}, "--n"),
    ("synth-size-3", ["data", "synth", "--out", "c", "--size", "3"], {}, "--size"),
    ("generate-out-forbidden", ["generate", "--checkpoint", "{d}/good", "--out", f"{FORBIDDEN}/g"], {}, "--out"),
    ("run-cache-forbidden", ["run", "--suite", "table2", "--preset", "smoke", "--set",
                             f"data.cache_dir={FORBIDDEN}/c"], {}, "data.cache_dir"),
    ("train-run-dir-forbidden", ["train", "--method", "vae", "--no-track", "--run-dir", f"{FORBIDDEN}/r"], {},
     "--run-dir"),
    ("run-launcher-unknown", ["run", "--suite", "table2", "--launcher", "mpi"], {}, "--launcher"),
    ("run-jobs-0", ["run", "--suite", "table2", "--launcher", "local", "--jobs", "0"], {}, "--jobs"),
    ("run-jobs-inline", ["run", "--suite", "table2", "--preset", "smoke", "--jobs", "4"], {},
     "add --launcher local or slurm"),
    ("run-sbatch-extra-malformed", ["run", "--suite", "table2", "--preset", "smoke", "--launcher", "slurm", "--set",
                                    "launcher.sbatch_extra=qos=a=b"], {}, "launcher.sbatch_extra='qos=a=b'"),
    *([("run-slurm-without-sbatch", ["run", "--suite", "table2", "--preset", "smoke", "--launcher", "slurm"], {},
        "no `sbatch` on this machine")] if shutil.which("sbatch") is None else []),
]


def test_every_bad_input_is_one_line(inputs: Path, mlflow_uri: str, tmp_path: Path) -> None:
    MlflowClient(tracking_uri=mlflow_uri).search_experiments(max_results=1)  # the session store exists first
    port = _closed_port()

    def one(case: tuple) -> str | None:
        name, argv, extra, needle = case
        cwd = tmp_path / name
        cwd.mkdir()
        args = [a.format(d=inputs, port=port) for a in argv]
        env = _env(**{"MLFLOW_TRACKING_URI": mlflow_uri, **{k: v.format(port=port) for k, v in extra.items()}})
        t = time.perf_counter()
        out = _benchmark(args, cwd, env)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        left = sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*"))
        problems = [f"exit {out.returncode}" if out.returncode != 2 else "",
                    f"{len(lines)} stderr lines" if len(lines) != 1 else "",
                    "traceback" if "Traceback" in out.stderr else "",
                    f"no {needle!r}" if needle not in out.stderr else "",
                    f"left {left}" if left else ""]
        problems = [p for p in problems if p]
        print(f"{name:<28} {time.perf_counter() - t:5.1f}s  {lines[-1] if lines else ''}")
        return f"{name}: {', '.join(problems)}\n{out.stderr[-1500:]}" if problems else None

    with ThreadPoolExecutor(3) as pool:
        failures = [f for f in pool.map(one, CASES) if f]
    assert not failures, "\n\n".join(failures)


def test_every_config_field_declares_what_it_accepts() -> None:
    """Every non-boolean field has a rule; every preset satisfies them; a tuning trial's override is checked too."""
    rules = field_rules()
    assert set(rules) == set(flatten(Config()))
    undeclared = [k for k, r in rules.items() if r is None and not isinstance(flatten(Config())[k], bool)]
    assert not undeclared
    for preset in ("smoke", "quick", "paper"):
        for method in SIZE_RULES:
            resolve(preset, method=method)
    with pytest.raises(ConfigError, match=r"loss\.kl=-0\.5: allowed: a number >= 0"):
        from benchmark.config import apply_overrides

        apply_overrides(Config(), {"loss.kl": -0.5})  # what tuning.objective_factory applies per trial


def test_size_rules_match_the_models() -> None:
    """SIZE_RULES is what the architectures take: every registered method is built on the meta device at each size;
    it builds exactly where the rule accepts (references have no rule and build everywhere)."""
    load_all()
    for name, factory in METHODS.items():
        built = []
        for size in range(8, 70):
            cfg = replace(resolve("smoke", method="real", overrides={"data.size": size}), method=name)
            try:
                with torch.device("meta"):
                    factory(cfg, heads=MetaHeads())
                built.append(size)
            except ValueError:
                pass
        accepted = [s for s in range(8, 70) if name not in SIZE_RULES or SIZE_RULES[name].accepts(s)]
        assert built == accepted, name
    check_size(32, list(METHODS))
    with pytest.raises(ConfigError, match="allowed: 16, 32, 64, 128"):
        check_size(24, ["ours", "wgan_gp"])


def test_two_suites_at_once_train_each_child_once(stage_cache: Path, tmp_path: Path) -> None:
    """Two `run --suite` on one store and folder, started together: the run-folder lock makes the second wait for
    each cell and reuse the first one's finished child; no child is trained (or evaluated) twice."""
    uri = f"sqlite:///{tmp_path / 'store' / 'mlruns.db'}"
    (tmp_path / "store").mkdir()
    env = _env(MLFLOW_TRACKING_URI=uri)
    args = ["run", "--suite", "table4", "--preset", "smoke", "--no-progress", "--set", f"data.cache_dir={stage_cache}",
            "--set", "train.budget_volumes=8", "--set", "eval.n_generated=4", "--set", "eval.n_draws=1",
            "--set", "eval.bootstrap=20", "--set", "eval.n_prior_vectors=8"]
    procs = [subprocess.Popen([sys.executable, "-m", "benchmark", *args], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("brainmri/table4")
    kids = [k for k in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in k.data.tags]
    done = sorted(k.data.tags["method"] for k in kids if "reused_from" not in k.data.tags)
    reused = sorted(k.data.tags["method"] for k in kids if "reused_from" in k.data.tags)
    rows = sorted(["ours", "ours_noaux", "train_copy", "mean_volume"])
    assert done == rows and reused == rows, (done, reused)
    assert all(k.info.status == "FINISHED" for k in kids)
    printed = outs[0][0] + outs[1][0]
    assert printed.count("training (8 volumes)") == 2  # ours and ours_noaux, once each
