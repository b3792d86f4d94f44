"""The protocol every generative method implements (DESIGN §3), and the harness it must use.

A method owns its networks (generator side under ``self.G``, discriminator/critic under ``self.D``) and its
optimizers, and does its own G/D updates in :meth:`GenerativeMethod.training_step`; the one training loop in
``benchmark/train.py`` owns the budget, validation, LR schedules, checkpoints and EMA.

The contract of ``training_step`` (what makes a k-process run and a resumed run replay a one-process run):

- Every random draw comes from :meth:`~GenerativeMethod.batch_noise` (per sample: latents, posterior noise,
  penalty weights, noise inputs), :meth:`~GenerativeMethod.step_noise` (one draw shared by every rank, e.g. a
  batch-wide decision) or :meth:`~GenerativeMethod.augment` (DiffAugment), each under its own ``kind`` and the
  ``step`` it was given; never the global RNG, whose state differs between ranks (and a resumed run restores only
  rank 0's). ``sample(n, c, generator)`` draws from its explicit ``generator`` instead.
- Every update goes through :meth:`~GenerativeMethod.optimize` (backward, all-reduce over ranks, clip, step).
- Phase counters that outlive a step (n_critic, lazy regularisation) live in registered buffers, so checkpoints
  carry them.
- The generator step runs under ``with frozen(self.D):``: only the generator's gradients are computed.
- Losses are logged under the shared names :data:`LOSS_D` (the discriminator/critic loss of its update) and
  :data:`LOSS_ADV_G` (the generator's adversarial term); other terms as ``loss_<term>`` or by their own name.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from benchmark.config import Config
from benchmark.dist import all_reduce_gradients, rank, world_size

LOSS_D = "loss_D"
LOSS_ADV_G = "loss_adv_g"


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Switch off ``requires_grad`` on ``module``'s parameters for the block; each gets its own flag back after it.

    For a generator step through the discriminator: gradients still flow through ``module`` to its inputs, but
    none are computed for its parameters. Parameters frozen before stay frozen; flags come back on exceptions too.
    """
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


class GenerativeMethod(nn.Module):
    """Base class: subclasses set ``conditional``/``has_encoder``, build ``self.G`` (and ``self.D``) and implement
    the methods below, ``training_step`` under the module's contract (harness noise, ``optimize``, ``frozen``, shared
    log names)."""

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
        """One update of every network on ``batch`` (x: [N,1,S,S,S], c: [N,7] standardised); returns losses.

        Every draw is seeded by ``step`` through :meth:`batch_noise`, :meth:`step_noise` or :meth:`augment`.
        """
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

    def init_from_data(self, train: Any) -> None:
        """Data-dependent initialisation from the training split ``train`` (a dataset of ``{"x": [1,S,S,S],
        "c": [7]}`` items), called once before training; a resumed run then loads its checkpoint over it, so keep
        what it sets in buffers. Default: nothing."""

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
                    uniform: bool = False, on_device: bool = False) -> Tensor:
        """Noise [local_n, *shape] for this rank's share of the GLOBAL batch, a pure function of (seed, step, kind).

        Drawing the whole global batch's noise and slicing it makes a k-process run take exactly the same
        random numbers as a one-process run with the same global batch (so their weights agree), and makes
        resumed runs replay the same noise without restoring RNG state. N(0, 1), or U(0, 1) when ``uniform``.
        The numbers are drawn on the CPU (the same on any device) unless ``on_device``: then on ``device`` itself,
        for large noise such as per-voxel noise inputs, where the CPU would spend ~6 ns a number plus the copy;
        those numbers depend on the device type (on CUDA, possibly on the GPU model), still not on the rank count.
        """
        source = device if on_device else torch.device("cpu")
        full_shape = (local_n * world_size(), *shape)
        full = self._draw(kind, step, full_shape, source, uniform)
        return full[rank() * local_n : (rank() + 1) * local_n].to(device)

    def step_noise(self, kind: str, shape: tuple[int, ...], step: int, device: torch.device,
                   uniform: bool = False) -> Tensor:
        """Noise [*shape] that every rank draws whole, a pure function of (seed, step, kind), drawn on the CPU.

        For one decision about the whole global batch (StyleGAN2's style-mixing coin and cutoff): a one-process run
        takes one per step, so every rank of a k-process run must take that same one, not a slice of a batch.
        """
        return self._draw(kind, step, shape, torch.device("cpu"), uniform).to(device)

    def augment(self, x: Tensor, kind: str, step: int) -> Tensor:
        """DiffAugment (Zhao et al. 2020) of x [N, C, D, H, W] with the suite's policy, as every D input gets it.

        Its per-sample draws are this rank's share of the global batch's (:meth:`batch_noise` under ``kind``), so
        k processes and resumed runs augment exactly like one process. Identity for an empty policy.
        """
        policy = self.cfg.data.diffaug_policy
        if not policy:
            return x
        from benchmark.data.augment import diff_augment, diff_augment_draws  # lazy: owned by the data package

        u = self.batch_noise(kind, x.shape[0], (diff_augment_draws(policy),), step, torch.device("cpu"), uniform=True)
        return diff_augment(x, policy, uniforms=u)

    def _draw(self, kind: str, step: int, shape: tuple[int, ...], device: torch.device, uniform: bool) -> Tensor:
        # A hash, not a weighted sum of the characters: with StyleGAN2's dozens of kinds a sum collides (it gave "gn3"
        # and "dn4" one seed), and distinct kinds must never share a stream.
        key = hashlib.blake2b(f"{self.cfg.train.seed}/{step}/{kind}".encode(), digest_size=8).digest()
        g = torch.Generator(device=device).manual_seed(int.from_bytes(key, "little") >> 1)
        return (torch.rand if uniform else torch.randn)(shape, generator=g, device=device)

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
