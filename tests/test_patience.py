"""LR plateau and early stopping count their patience in volumes seen (the paper's epochs), not validations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from benchmark.config import resolve
from benchmark.train import BatchSource, patience_in_validations, train
from models.base import GenerativeMethod


class _Constant(GenerativeMethod):
    """A one-parameter method whose validation metric never improves (constant val_l1)."""

    def __init__(self, cfg) -> None:  # noqa: ANN001
        super().__init__(cfg)
        self.G = nn.Linear(1, 1)

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"G": torch.optim.SGD(self.G.parameters(), lr=1.0)}

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, float]:
        return {}

    def validation_losses(self, batch: dict[str, Tensor]) -> dict[str, float]:
        return {"val_l1": 1.0}


def _data(n: int = 64) -> list[dict[str, Tensor]]:
    return [{"x": torch.zeros(1, 2, 2, 2), "c": torch.zeros(7)} for _ in range(n)]


def _run(tmp_path: Path, **overrides: object) -> tuple[GenerativeMethod, object]:
    cfg = resolve("smoke", overrides={"train.batch_size": 4, "train.val_every_volumes": 8,
                                      "train.checkpoint_every_volumes": 1000, "train.plateau_factor": 0.5,
                                      **overrides})
    method = _Constant(cfg)
    data = BatchSource(_data(), 4, seed=0)
    return method, train(method, cfg, data, tmp_path, val_data=BatchSource(_data(8), 4, seed=1), progress=False)


def test_patience_converts_volumes_to_validations() -> None:
    cfg = resolve("paper")
    assert cfg.train.val_every_volumes == 2051  # one epoch of the paper's ~2051 training volumes
    cadence = 2048  # 2051 volumes rounded down to whole steps of 4
    for volumes, epochs in ((cfg.train.plateau_patience_volumes, 50), (cfg.train.early_stop_patience_volumes, 500)):
        n = patience_in_validations(volumes, cfg)
        assert abs(n * cadence - volumes) <= cadence / 2 and abs(n - epochs) <= 1, (n, epochs)
    assert patience_in_validations(0, cfg) == 0


def test_lr_drops_and_training_stops_at_the_configured_volumes(tmp_path: Path) -> None:
    # validations every 8 volumes; the first sets the best value, every later one is "bad".
    method, result = _run(tmp_path / "a", **{"train.budget_volumes": 400, "train.plateau_patience_volumes": 24,
                                             "train.early_stop_patience_volumes": 64})
    state = result.state
    assert state.stopped_early
    # best at 8 volumes, then 64 volumes (8 validations) without improvement: stop at 72 volumes
    assert state.volumes_seen == 72
    # LR halves after 3 bad validations (24 volumes: at 32) and after 3 more (at 56); stopped at 72 before a third
    lr = method.optimizers["G"].param_groups[0]["lr"]
    assert lr == 1.0 * 0.5 ** 2, lr


def test_no_early_stop_when_patience_is_zero(tmp_path: Path) -> None:
    _, result = _run(tmp_path / "b", **{"train.budget_volumes": 96, "train.plateau_patience_volumes": 0,
                                        "train.early_stop_patience_volumes": 0})
    assert not result.state.stopped_early and result.state.volumes_seen == 96


class _RecordsLR(_Constant):
    """Records the LR each training step runs at."""

    def __init__(self, cfg) -> None:  # noqa: ANN001
        super().__init__(cfg)
        self.lrs: list[float] = []

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, float]:
        self.lrs.append(self.optimizers["G"].param_groups[0]["lr"])
        return {}


def test_lr_cools_down_linearly_over_the_last_volumes_on_top_of_the_plateau(tmp_path: Path) -> None:
    # 25 steps of 4 volumes; cooldown over the last 32 volumes = 8 steps; the plateau halves the LR once at 32 volumes
    cfg = resolve("smoke", overrides={"train.batch_size": 4, "train.val_every_volumes": 8,
                                      "train.checkpoint_every_volumes": 1000, "train.plateau_factor": 0.5,
                                      "train.budget_volumes": 100, "train.plateau_patience_volumes": 24,
                                      "train.early_stop_patience_volumes": 0, "train.lr_cooldown_volumes": 32})
    method = _RecordsLR(cfg)
    # the plateau would halve again at 56 and 80 volumes: only the first drop, by making validation improve later
    values = iter([1.0] + [2.0] * 3 + [0.5 - 0.01 * i for i in range(20)])
    method.validation_losses = lambda batch: {"val_l1": next(values)}  # one batch a validation
    train(method, cfg, BatchSource(_data(), 4, seed=0), tmp_path, val_data=BatchSource(_data(4), 4, seed=1),
          progress=False)
    # independent reference: step s (0-based) runs at 0.5 (after the drop at 32 volumes = step 8) times
    # min(1, (25 - s) / 8)
    expected = [(1.0 if s < 8 else 0.5) * min(1.0, (25 - s) / 8) for s in range(25)]
    assert method.lrs == pytest.approx(expected, rel=1e-9)
