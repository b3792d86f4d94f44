"""The protocol every generative method implements (DESIGN §3), and the shared optimiser step.

A method owns its networks (generator side under ``self.G``, discriminator/critic under ``self.D``) and its
optimizers, and does its own G/D updates in :meth:`training_step`; the one training loop in
``benchmark/train.py`` owns the budget, validation, LR schedules, checkpoints and EMA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from benchmark.config import Config
from benchmark.dist import all_reduce_gradients, rank, world_size


class GenerativeMethod(nn.Module):
    """Base class: subclasses set ``conditional``/``has_encoder`` and build ``self.G`` (and ``self.D``)."""

    conditional: bool = False
    has_encoder: bool = False

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.ema: AveragedModel | None = None
        self.amp_dtype: torch.dtype | None = None  # set by the training loop (bf16 on CUDA)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    # --- to implement -------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Create the optimizers once; keys name them in checkpoints and LR schedules (e.g. ``G``, ``D``)."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, float]:
        """One update of every network on ``batch`` (x: [N,1,S,S,S], c: [N,7] standardised); returns losses."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int, c: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """``n`` volumes [n,1,S,S,S]; conditional methods need ``c`` [n,7] (standardised ratios, 0/1 label)."""
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, x: Tensor, c: Tensor) -> Tensor:
        """Encode-decode (methods with an encoder only)."""
        raise NotImplementedError(f"{type(self).__name__} has no encoder")

    @torch.no_grad()
    def validation_losses(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """Cheap validation numbers on a held-out batch, e.g. ``val_l1`` of reconstructions."""
        return {}

    def param_groups(self) -> dict[str, nn.Module]:
        """Components whose parameters are counted (paper Tables 2-3), e.g. encoder, decoder, prior, D."""
        return {"G": self.G, "D": self.D} if hasattr(self, "D") else {"G": self.G}

    # --- shared machinery ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Called by the loop after ``.to(device)``."""
        self.optimizers = self.configure_optimizers()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def optimize(self, name: str, loss: Tensor, clip: float | None = None) -> None:
        """backward -> all-reduce over ranks -> clip -> step for optimizer ``name``."""
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in opt.param_groups for p in group["params"]]
        all_reduce_gradients(params)
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()

    def batch_noise(self, kind: str, local_n: int, shape: tuple[int, ...], step: int, device: torch.device,
                    uniform: bool = False) -> Tensor:
        """Noise for this rank's share of the GLOBAL batch, a pure function of (seed, step, kind).

        Drawing the whole global batch's noise and slicing it makes a k-process run take exactly the same
        random numbers as a one-process run with the same global batch (so their weights agree), and makes
        resumed runs replay the same noise without restoring RNG state.
        """
        salt = sum((i + 1) * ord(ch) for i, ch in enumerate(kind))
        g = torch.Generator(device="cpu").manual_seed((self.cfg.train.seed * 1_000_003 + step) * 7919 + salt)
        full_shape = (local_n * world_size(), *shape)
        full = torch.rand(full_shape, generator=g) if uniform else torch.randn(full_shape, generator=g)
        return full[rank() * local_n : (rank() + 1) * local_n].to(device)

    def setup_ema(self, decay: float) -> None:
        if decay > 0:
            self.ema = AveragedModel(self.G, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    def update_ema(self) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.G)

    @property
    def G_eval(self) -> nn.Module:  # noqa: N802 (GAN naming, STYLE.md)
        """The generator used for sampling: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.G

    def frozen_modules(self) -> Iterator[nn.Module]:
        """Modules not trained here (frozen heads); excluded from checkpoints by the loop."""
        return iter(())
