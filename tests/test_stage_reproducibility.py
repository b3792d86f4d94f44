"""Shared stages (heads, prior, FID network) are pure functions of their digest.

Two clean runs in separate cache folders, in separate Python processes, must train bit-identical stages; so must a
build after the process consumed its global RNG. (Before stages had their own seed and a seeded construction, the
heads' initial weights came from whatever the global RNG held, so two runs trained different heads.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmark.config import resolve

ROOT = Path(__file__).resolve().parents[1]
# Tiny smoke stages: 24 subjects at 16^3, a couple of epochs/steps each.
OVERRIDES = {"heads.epochs": 2, "prior.steps": 60, "fidnet.epochs": 2}
STAGES = ("heads", "prior", "fidnet")

_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from benchmark.config import resolve
from benchmark.data.bundle import load_bundle
from benchmark.stages import get_fid_network, get_heads, get_prior
overrides = dict(eval(sys.argv[2]), **{"data.cache_dir": sys.argv[1]})
cfg = resolve("smoke", overrides=overrides)
bundle = load_bundle(cfg, progress=False)
torch.rand(int(sys.argv[3]))  # whatever ran before in the process must not matter
get_heads(cfg, bundle, progress=False)
get_prior(cfg, bundle, progress=False)
get_fid_network(cfg, bundle, progress=False)
"""


def _build_in_subprocess(cache: Path, consume: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", _SCRIPT, str(cache), repr(OVERRIDES), str(consume)], cwd=ROOT, env=env,
                   check=True, timeout=300)


def _stage_files(cache: Path) -> dict[str, Path]:
    files = {kind: sorted((cache / "stages").glob(f"{kind}-*.pt")) for kind in STAGES}
    assert all(len(v) == 1 for v in files.values()), files
    return {kind: v[0] for kind, v in files.items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Stages built in two cache folders by two processes (the second shares only the synthetic cohort)."""
    a, b = tmp_path_factory.mktemp("cache_a"), tmp_path_factory.mktemp("cache_b")
    _build_in_subprocess(a, consume=0)
    (b / "cohorts").symlink_to(a / "cohorts")  # the same cohort files; stages are trained afresh
    _build_in_subprocess(b, consume=12345)
    return a, b


def test_stages_identical_across_processes_and_cache_folders(two_runs: tuple[Path, Path]) -> None:
    a, b = (_stage_files(c) for c in two_runs)
    for kind in STAGES:
        assert a[kind].name == b[kind].name  # same digest
        pa, pb = (torch.load(p[kind], map_location="cpu", weights_only=True) for p in (a, b))
        _assert_same_state(pa["state"], pb["state"], kind)
        assert pa["info"] == pb["info"]


def test_stages_ignore_the_callers_rng_and_leave_it_untouched(
    two_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    from benchmark.data.bundle import load_bundle
    from benchmark.stages import get_fid_network, get_heads, get_prior

    (tmp_path / "cohorts").symlink_to(two_runs[0] / "cohorts")
    cfg = resolve("smoke", overrides={**OVERRIDES, "data.cache_dir": str(tmp_path)})
    bundle = load_bundle(cfg, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(987)
        torch.randn(1000)
        before = torch.get_rng_state()
        heads, _ = get_heads(cfg, bundle, progress=False)
        prior, _ = get_prior(cfg, bundle, progress=False)
        fidnet, info = get_fid_network(cfg, bundle, progress=False)
        assert torch.equal(torch.get_rng_state(), before)  # the stages forked the global RNG
    finally:
        torch.set_num_threads(threads)
    reference = _stage_files(two_runs[0])
    built = {"heads": heads.state_dict(), "prior": prior.state_dict()}
    for kind, state in built.items():
        _assert_same_state(torch.load(reference[kind], weights_only=True)["state"], state, kind)
    ref_fid = torch.load(reference["fidnet"], weights_only=True)["state"]
    _assert_same_state(ref_fid, fidnet.module.state_dict(), "fidnet")
    assert _stage_files(tmp_path)["fidnet"].name == reference["fidnet"].name


def test_stage_seed_is_in_the_digest(two_runs: tuple[Path, Path]) -> None:
    from benchmark.data.bundle import load_bundle
    from benchmark.stages import fidnet_digest, heads_digest, prior_digest

    cfg = resolve("smoke", overrides={**OVERRIDES, "data.cache_dir": str(two_runs[0])})
    bundle = load_bundle(cfg, progress=False)
    for section, fn in (("heads", heads_digest), ("prior", prior_digest), ("fidnet", fidnet_digest)):
        other = resolve("smoke", overrides={**OVERRIDES, "data.cache_dir": str(two_runs[0]), f"{section}.seed": 1})
        assert fn(other, bundle) != fn(cfg, bundle)
        # the generator's seed is not a stage's business: every training seed shares the stages
        shared = resolve("smoke", overrides={**OVERRIDES, "data.cache_dir": str(two_runs[0]), "train.seed": 7})
        assert fn(shared, bundle) == fn(cfg, bundle)
