"""The one training loop for every generative method.

Budget in volumes seen (identical across a suite's methods), periodic validation, ReduceLROnPlateau on a
validation metric, early stopping, EMA, bf16 autocast on CUDA, atomic checkpoints and exact resume, a progress
bar on rank 0. Batches are a pure function of (seed, step), so a resumed run replays exactly what an
uninterrupted one would have seen, and ``torchrun`` ranks split one global batch between them.

    python -m benchmark train --method ours --preset smoke
    torchrun --standalone --nproc_per_node=2 -m benchmark train --method ours --preset smoke
"""

from __future__ import annotations

import math
import os
import pickle
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmark import dist
from benchmark.config import Config, flatten
from benchmark.tracking import NullTracker, Tracker
from models.base import GenerativeMethod

CHECKPOINT = "checkpoint.pt"

Validator = Callable[[GenerativeMethod], dict[str, float]]


class BatchSource:
    """Global batches of a map-style dataset as a pure function of the step.

    Epoch ``e`` visits a permutation drawn from ``seed + e``; a batch is the next ``batch_size`` indices, of which
    this rank takes its contiguous share. ``transform`` (conventional augmentation) runs under an RNG seeded by
    (seed, step), so augmentation is reproducible too.
    """

    def __init__(self, dataset: Any, batch_size: int, seed: int, transform: Callable[[Tensor], Tensor] | None = None,
                 normalize: Callable[[Tensor], Tensor] | None = None) -> None:
        self.dataset = dataset
        self.n = len(dataset)
        if self.n == 0:
            raise ValueError("the training split is empty")
        self.batch_size = batch_size
        self.seed = seed
        self.transform = transform
        self.normalize = normalize
        self._perm_cache: dict[int, Tensor] = {}
        ws = dist.world_size()
        if batch_size % ws:
            raise ValueError(f"batch size {batch_size} is not divisible by the {ws} processes")

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed
                                                                                                        + epoch))}
        return self._perm_cache[epoch]

    def indices(self, step: int) -> list[int]:
        start = step * self.batch_size
        out = []
        for pos in range(start, start + self.batch_size):
            out.append(int(self._perm(pos // self.n)[pos % self.n]))
        share = self.batch_size // dist.world_size()
        return out[dist.rank() * share : (dist.rank() + 1) * share]

    def batch(self, step: int) -> dict[str, Tensor]:
        items = [self.dataset[i] for i in self.indices(step)]
        x = torch.stack([it["x"] for it in items])
        c = torch.stack([it["c"] for it in items])
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 1_000_003 + step)
                x = torch.stack([self.transform(v) for v in x])
        if self.normalize is not None:
            c = self.normalize(c)
        return {"x": x, "c": c}


@dataclass
class TrainState:
    step: int = 0
    volumes_seen: int = 0
    best_metric: float = math.inf
    bad_validations: int = 0
    validations: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    elapsed_s: float = 0.0


@dataclass
class TrainResult:
    state: TrainState
    checkpoint: Path
    interrupted: bool = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": list(random.getstate()[1]),
        "python_version": int(random.getstate()[0]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((state["python_version"], tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, method: GenerativeMethod, schedulers: dict[str, Any], state: TrainState,
                    cfg: Config, extra: dict[str, Any] | None = None) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    payload = {
        "method": method.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in method.optimizers.items()},
        "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
        "state": {k: v for k, v in state.__dict__.items()},
        "rng": _rng_state(),
        "config": flatten(cfg),
        "extra": extra or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint.pt / weights.pt payload (tensors and plain containers only: ``weights_only=True``), or a
    one-line :class:`benchmark.errors.CheckpointError` for a file that is missing, truncated or not a checkpoint."""
    from benchmark.errors import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - only torch.load runs here: whatever the unpickler trips on in bytes
        # that are not a whole checkpoint (RuntimeError for a truncated zip, EOFError, KeyError, UnpicklingError...)
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        # the unpickler's own advice (weights_only=False) does not apply: a checkpoint holds tensors only
        reason = type(err).__name__ if isinstance(err, pickle.UnpicklingError) or not first else first.split(". ")[0]
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({reason[:160]})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("method"), dict) \
            or not isinstance(payload.get("config"), dict):
        raise CheckpointError(f"{path}: not a checkpoint of this benchmark (no 'method' weights and 'config')")
    return payload


def patience_in_validations(patience_volumes: int, cfg: Config) -> int:
    """Validations that span ``patience_volumes`` volumes at the configured cadence (0 stays 0 = never)."""
    if patience_volumes <= 0:
        return 0
    every = max(1, cfg.train.val_every_volumes // cfg.train.batch_size) * cfg.train.batch_size
    return max(1, round(patience_volumes / every))  # the cadence is rounded to whole steps too


def _make_schedulers(method: GenerativeMethod, cfg: Config) -> dict[str, Any]:
    """ReduceLROnPlateau per optimizer; its patience (counted in validations by torch) from volumes seen."""
    patience = patience_in_validations(cfg.train.plateau_patience_volumes, cfg)
    if patience == 0:
        return {}
    # torch drops the LR when num_bad_epochs > patience: patience - 1 validations without improvement + the one
    # that reaches the configured span.
    return {name: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.train.plateau_factor,
                                                             patience=patience - 1)
            for name, opt in method.optimizers.items()}


def validate(method: GenerativeMethod, val: BatchSource | None, n_batches: int, extra: Validator | None,
             device: torch.device) -> dict[str, float]:
    """Mean of the method's validation losses over fixed validation batches, plus ``extra`` (e.g. val FID)."""
    method.eval()
    sums: dict[str, float] = {}
    if val is not None:
        for i in range(n_batches):
            batch = {k: v.to(device) for k, v in val.batch(i).items()}
            for k, v in method.validation_losses(batch).items():
                sums[k] = sums.get(k, 0.0) + v / n_batches
    out = {k: dist.all_reduce_mean(v, device) for k, v in sums.items()}
    if extra is not None:
        out.update(extra(method))
    method.train()
    return out


def train(
    method: GenerativeMethod,
    cfg: Config,
    train_data: BatchSource,
    run_dir: Path,
    *,
    tracker: Tracker | None = None,
    val_data: BatchSource | None = None,
    extra_validator: Validator | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after_volumes: int | None = None,
) -> TrainResult:
    """Train ``method`` until the budget (volumes seen) is spent or validation stops improving.

    ``stop_after_volumes`` ends the call early (leaving a resumable checkpoint), for tests and for Optuna pruning.
    """
    # --- Set up: device, threads, seeds, optimizers, EMA and LR schedules -----------------------------------
    tracker = tracker or NullTracker()
    device = resolve_device(cfg.train.device)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.train.seed + dist.rank())
    method.to(device)
    method.amp_dtype = torch.bfloat16 if (cfg.train.amp and device.type == "cuda") else None
    method.setup()
    method.setup_ema(cfg.train.ema_decay)
    schedulers = _make_schedulers(method, cfg)
    # --- Resume: weights, optimizer/scheduler state, loop counters and RNG state from the last checkpoint ----
    state = TrainState()
    ckpt_path = run_dir / CHECKPOINT
    if resume and ckpt_path.is_file():
        payload = load_checkpoint(ckpt_path, device)
        method.load_state_dict(payload["method"])
        for k, o in method.optimizers.items():
            o.load_state_dict(payload["optimizers"][k])
        for k, s in schedulers.items():
            s.load_state_dict(payload["schedulers"][k])
        state = TrainState(**payload["state"])
        _set_rng_state(payload["rng"])

    # --- Schedule: the budget in volumes seen, as steps; validation, checkpoint and logging cadences ---------
    batch = cfg.train.batch_size
    total_steps = math.ceil(cfg.train.budget_volumes / batch)
    val_every = max(1, cfg.train.val_every_volumes // batch)
    ckpt_every = max(1, cfg.train.checkpoint_every_volumes // batch)
    log_every = max(1, total_steps // 200)
    cooldown_steps = min(total_steps, math.ceil(cfg.train.lr_cooldown_volumes / batch))
    n_val_batches = max(1, min(4, (val_data.n // val_data.batch_size) if val_data else 1))
    limit_steps = total_steps if stop_after_volumes is None else min(total_steps, math.ceil(stop_after_volumes / batch))

    bar = None
    if progress and dist.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps * batch, initial=state.volumes_seen, unit="vol", desc=cfg.method,
                   dynamic_ncols=True, leave=False)
    method.train()
    t0 = time.perf_counter() - state.elapsed_s
    interrupted = False

    def checkpoint() -> None:
        state.elapsed_s = time.perf_counter() - t0
        if dist.is_main():
            save_checkpoint(ckpt_path, method, schedulers, state, cfg)

    # --- Train: one method step per batch; log, validate (LR plateau, early stop) and checkpoint on cadence --
    try:
        while state.step < limit_steps and not state.stopped_early:
            data = {k: v.to(device, non_blocking=True) for k, v in train_data.batch(state.step).items()}
            _cool_down(method.optimizers, state.step, total_steps, cooldown_steps)
            losses = method.training_step(data, state.step)
            method.update_ema()
            state.step += 1
            state.volumes_seen += batch
            if bar is not None:
                bar.update(batch)
                bar.set_postfix({k.removeprefix("loss_"): f"{v:.3g}" for k, v in list(losses.items())[:4]})
            if dist.is_main() and (state.step % log_every == 0 or state.step == total_steps):
                tracker.log_metrics(losses, step=state.volumes_seen)
            if _validates_at(state.step, val_every, total_steps):
                metrics = validate(method, val_data, n_val_batches, extra_validator, device)
                state.validations.append({"volumes_seen": float(state.volumes_seen), **metrics})
                if dist.is_main():
                    tracker.log_metrics(metrics, step=state.volumes_seen)
                _after_validation(metrics, cfg, schedulers, state)
            if state.step % ckpt_every == 0:
                checkpoint()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if bar is not None:
            bar.close()
    checkpoint()
    return TrainResult(state=state, checkpoint=ckpt_path, interrupted=interrupted)


def cooldown_factor(step: int, total_steps: int, cooldown_steps: int) -> float:
    """LR multiplier for 0-based ``step``: 1 before the last ``cooldown_steps`` steps, then (steps left) / n, so the
    cooldown's first step runs at the full LR and the last at 1/n of it."""
    left = total_steps - step
    return 1.0 if cooldown_steps <= 0 or left > cooldown_steps else left / cooldown_steps


def _cool_down(optimizers: dict[str, torch.optim.Optimizer], step: int, total_steps: int, cooldown_steps: int) -> None:
    """Scale every param group's LR by this step's cooldown factor over the previous step's.

    Multiplicative, so that it composes with ReduceLROnPlateau (which also rescales ``lr`` in place) and survives a
    resume: the optimizer's saved ``lr`` already holds the factors applied so far.
    """
    ratio = cooldown_factor(step, total_steps, cooldown_steps) / cooldown_factor(step - 1, total_steps, cooldown_steps)
    if ratio != 1.0:
        for opt in optimizers.values():
            for group in opt.param_groups:
                group["lr"] *= ratio


def _validates_at(step: int, val_every: int, total_steps: int) -> bool:
    """Validate every ``val_every`` steps and at the end, but not on a cadence step less than half a period before
    the end: that validation would repeat the final one a few steps later (quick: 992 and 1000 volumes), costing a
    validation per run (3-8 s at quick) and a near-duplicate point on every learning curve."""
    if step == total_steps:
        return True
    return step % val_every == 0 and total_steps - step >= max(1, val_every // 2)


def _after_validation(metrics: dict[str, float], cfg: Config, schedulers: dict[str, Any], state: TrainState) -> None:
    key = cfg.train.val_metric
    if key not in metrics or not math.isfinite(metrics[key]):
        return
    value = metrics[key]
    for s in schedulers.values():
        s.step(value)
    if value < state.best_metric:
        state.best_metric = value
        state.bad_validations = 0
    else:
        state.bad_validations += 1
        stop_after = patience_in_validations(cfg.train.early_stop_patience_volumes, cfg)
        if stop_after and state.bad_validations >= stop_after:
            state.stopped_early = True
