"""torchrun environment, rank-0 logic and gradient all-reduce.

Gradients are all-reduced by hand after every backward (as StyleGAN3 does) instead of wrapping networks in
DistributedDataParallel: gradient penalties (WGAN-GP, R1) differentiate through ``autograd.grad`` with
``create_graph=True``, which DDP's bucketed hooks do not see, and methods run several optimizers per step.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as torch_dist


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_available() and torch_dist.is_initialized() else 1


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_available() and torch_dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(device: torch.device) -> None:
    """Join the process group that torchrun describes in the environment (gloo on CPU, nccl on CUDA)."""
    if not launched_by_torchrun() or torch_dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch_dist.init_process_group(backend=backend)


def shutdown() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_reduce_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average gradients over ranks in one flat buffer (one collective per optimizer step)."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch_dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Mean of a scalar over ranks (validation metrics)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return float(t.item() / world_size())


def broadcast_tensor(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``x`` on every rank (a data-dependent init that must be the same everywhere); ``x`` alone."""
    if world_size() == 1:
        return x
    x = x.contiguous()
    torch_dist.broadcast(x, src)
    return x


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of the entries of every rank's ``x``, differentiable (the autograd-aware all-reduce); ``x.mean()`` alone."""
    if world_size() == 1:
        return x.mean()
    from torch.distributed.nn.functional import all_reduce

    total = all_reduce(torch.stack([x.sum(), torch.tensor(float(x.numel()), dtype=x.dtype, device=x.device)]))
    return total[0] / total[1]


class SyncBatchNorm3d(torch.nn.BatchNorm3d):
    """BatchNorm3d whose training statistics span every rank's share of the global batch.

    ``torch.nn.SyncBatchNorm`` is CUDA-only; this one all-reduces (count, sum, sum of squares) with the
    autograd-aware collective, so it also runs on gloo/CPU, and a k-process step normalises exactly like a
    one-process step over the same global batch. Without a process group it is a plain BatchNorm3d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0, 2, 3, 4]
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = torch.cat([count, x.sum(dims), x.square().sum(dims)])
        stats = all_reduce(stats)
        n = stats[0]
        mean = stats[1 : 1 + x.shape[1]] / n
        var = stats[1 + x.shape[1] :] / n - mean.square()
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        shape = (1, -1, 1, 1, 1)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y
