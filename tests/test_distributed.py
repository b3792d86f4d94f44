"""Two gloo processes on CPU take the same optimisation path as one process with the same global batch.

DiffAugment stays on (the smoke policy): its draws, like every other, come from the harness (models/base.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from benchmark.config import resolve

STEPS = 3
GLOBAL_BATCH = 4


def _global_batches(size: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    out = []
    for _ in range(STEPS):
        c = torch.randn(GLOBAL_BATCH, 7, generator=g)
        c[:, 6] = (c[:, 6] > 0).float()
        out.append({"x": torch.randn(GLOBAL_BATCH, 1, size, size, size, generator=g), "c": c})
    return out


def _train(method_name: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    from benchmark.runner import build_method
    from benchmark.stages import build_heads

    cfg = resolve("smoke", method=method_name, overrides={"train.batch_size": GLOBAL_BATCH})
    torch.manual_seed(0)
    heads = build_heads(cfg).freeze() if method_name == "ours" else None
    torch.manual_seed(1)
    method = build_method(cfg, heads)
    if method_name == "stylegan2":
        # Minibatch-std groups form within a rank's batch (as StyleGAN2-ADA's per-GPU groups): by design not the
        # one-process groups. Groups of one make D per-sample, so that everything else must agree.
        method.D.mbstd_group = 1
    method.setup()
    share = GLOBAL_BATCH // world
    for step, batch in enumerate(_global_batches(cfg.data.size)):
        local = {k: v[rank * share : (rank + 1) * share] for k, v in batch.items()}
        method.training_step(local, step)
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


def _worker(rank: int, world: int, method_name: str, store: str, out: str) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        state = _train(method_name, rank, world)
        if rank == 0:
            torch.save(state, out)
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.parametrize("method_name", ["ours", "wgan_gp", "stylegan2"])
def test_two_processes_match_one(method_name: str, tmp_path: Path) -> None:
    reference = _train(method_name, 0, 1)
    out = tmp_path / "state.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_worker, args=(2, method_name, str(tmp_path / "store"), str(out)), nprocs=2, join=True,
                       start_method="spawn")
    distributed = torch.load(out, weights_only=True)
    changed = 0
    for key, ref in reference.items():
        if not torch.is_floating_point(ref):
            continue
        torch.testing.assert_close(distributed[key], ref, atol=1e-5, rtol=1e-4, msg=key)
        changed += 1
    assert changed > 0
