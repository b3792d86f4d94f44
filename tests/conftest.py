"""Shared fixtures: one temporary MLflow store and one stage cache per test session (creating an MLflow SQLite
database costs several seconds; the synthetic cohort, heads and prior are built once and found again by digest)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@pytest.fixture(scope="session")
def stage_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stage-cache")


@pytest.fixture
def smoke_args(stage_cache: Path) -> list[str]:
    """CLI arguments for a smoke-size run sharing the session's cohort/heads/prior cache."""
    return ["--preset", "smoke", "--set", f"data.cache_dir={stage_cache}", "--no-progress"]


@pytest.fixture
def smoke_overrides(stage_cache: Path) -> dict[str, object]:
    return {"data.cache_dir": str(stage_cache)}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from a second intra-op thread, and on a shared 2-core machine OpenMP barriers
    make oneDNN up to 10x slower with 2 threads (measured: EfficientNet on 16^2 slices 0.05 s vs 0.5 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
