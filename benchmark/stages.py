"""Shared stages trained once per (data, split, preset) and found again by digest: the frozen heads, the prior,
the evaluation-only FID network.

Every method of a suite reuses the same heads (L_cls/L_reg, resnet3d_aux perceptual features, the
``resnet18sep`` FID extractor), the same diffusion prior (clinical vectors for conditional sampling) and the same
FID network (``fid_resnet18``, used by no loss), so they are keyed only by what they depend on and never retrained
per method.

Reproducibility: each stage is a pure function of its digest. The digest holds the stage's config section (with
its own ``seed``: ``heads.seed``, ``prior.seed``, ``fidnet.seed``, not ``train.seed``), the data keys and the
split fingerprint; construction (weight initialisation) and training run under :func:`seeded`, a forked global
RNG seeded with the stage's seed, so whatever ran before in the process, and which run filled the cache first,
does not matter (tests/test_stage_reproducibility.py). Stages train on the CPU, whose kernels are deterministic.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from benchmark.config import Config, section_digest
from benchmark.data.bundle import DataBundle

if TYPE_CHECKING:
    from metrics.extractors import FrozenBackboneExtractor

DATA_KEYS = ("data.path", "data.synth_n", "data.synth_seed", "data.size", "data.split_seed")


def _data_flat(cfg: Config) -> dict[str, Any]:
    from benchmark.config import flatten

    flat = flatten(cfg)
    return {k: flat[k] for k in DATA_KEYS}


def heads_digest(cfg: Config, bundle: DataBundle) -> str:
    return section_digest(cfg, ("heads",), extra={**_data_flat(cfg), "split": bundle.fingerprint})


def prior_digest(cfg: Config, bundle: DataBundle) -> str:
    return section_digest(cfg, ("prior",), extra={**_data_flat(cfg), "split": bundle.fingerprint})


def fidnet_digest(cfg: Config, bundle: DataBundle) -> str:
    return section_digest(cfg, ("fidnet",), extra={**_data_flat(cfg), "split": bundle.fingerprint})


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the CPU global RNG seeded with ``seed``, restoring the caller's RNG state afterwards.

    Only the CPU generator is forked and seeded (``torch.manual_seed`` would also queue a seed for every CUDA
    device, a side effect on the caller); stages build and train on the CPU.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_or_fit(path: Path, module: torch.nn.Module, fit: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Load a stage's weights and info from ``path``, or ``fit()`` the module (returning its info) and save both
    atomically. Called inside the stage's :func:`seeded` block, so a fit is a pure function of the digest."""
    if path.is_file():
        payload = torch.load(path, map_location="cpu", weights_only=True)
        module.load_state_dict(payload["state"])
        return dict(payload["info"])
    info = fit()
    _atomic_save({"state": module.state_dict(), "info": info}, path)
    return info


def stage_path(cfg: Config, kind: str, key: str) -> Path:
    return Path(cfg.data.cache_dir) / "stages" / f"{kind}-{key}.pt"


def build_heads(cfg: Config) -> Any:
    from models.heads import ClinicalHeads

    return ClinicalHeads(width=cfg.heads.width, stem_pool=cfg.heads.stem_pool,
                         voxel_readout=cfg.data.size if cfg.heads.voxel_readout else None)


def get_heads(cfg: Config, bundle: DataBundle, progress: bool = True, log: Any = None) -> tuple[Any, dict[str, Any]]:
    """The frozen AD/CN classifier + ROI regressor for this data/split, trained on first use."""
    from models.heads import evaluate_heads, fit_heads

    key = heads_digest(cfg, bundle)
    path = stage_path(cfg, "heads", key)
    def fit() -> dict[str, Any]:
        train = bundle.tensors("train")
        val = bundle.tensors("val")
        history = fit_heads(heads, train, val, epochs=cfg.heads.epochs, batch_size=cfg.heads.batch_size,
                            lr=cfg.heads.lr, grad_clip=cfg.heads.grad_clip, patience=cfg.heads.patience,
                            seed=cfg.heads.seed, progress=progress, schedule=cfg.heads.schedule,
                            mirror=cfg.heads.mirror, max_shift=cfg.heads.max_shift,
                            epochs_reg=cfg.heads.epochs_reg or None, voxel_c=cfg.heads.voxel_c,
                            voxel_alpha=cfg.heads.voxel_alpha)
        test_x, test_c = bundle.tensors("test")
        std = torch.as_tensor(bundle.normalizer.std, dtype=torch.float32)
        test = evaluate_heads(heads, test_x, test_c, std=std)
        return {"digest": key, "heads_test_bac": float(test["bac"]), "heads_test_mse": float(test["mse"]),
                "heads_test_roi_r2": float(test["roi_r2"]),
                "heads_val_bac": float(history.get("val_bac", float("nan"))),
                "heads_val_mse": float(history.get("val_mse", float("nan")))}

    with seeded(cfg.heads.seed):
        heads = build_heads(cfg)
        info = _load_or_fit(path, heads, fit)
    return heads.freeze(), info


def get_prior(cfg: Config, bundle: DataBundle, progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """The DDPM over standardised clinical vectors of the training split, trained on first use."""
    from models.diffusion import ClinicalDDPM, fit_prior

    key = prior_digest(cfg, bundle)
    path = stage_path(cfg, "prior", key)
    def fit() -> dict[str, Any]:
        c_train = bundle.normalizer.transform(bundle.raw_clinical("train"))
        fit_prior(ddpm, c_train, steps=cfg.prior.steps, batch_size=cfg.prior.batch_size, lr=cfg.prior.lr,
                  grad_clip=cfg.prior.grad_clip, seed=cfg.prior.seed, progress=progress)
        return {"digest": key}

    with seeded(cfg.prior.seed):
        ddpm = ClinicalDDPM(timesteps=cfg.prior.timesteps, hidden=cfg.prior.hidden)
        info = _load_or_fit(path, ddpm, fit)
    ddpm.eval()
    for p in ddpm.parameters():
        p.requires_grad_(False)
    return ddpm, info


def build_fid_network(cfg: Config) -> Any:
    from models.fid_network import FidNetwork

    return FidNetwork(width=cfg.fidnet.width, shortcut=cfg.fidnet.shortcut, n_random=cfg.fidnet.n_random)


def get_fid_network(
    cfg: Config, bundle: DataBundle, progress: bool = True
) -> tuple[FrozenBackboneExtractor, dict[str, Any]]:
    """The evaluation-only FID network for this data/split (``fid_resnet18``), trained on first use.

    A MedicalNet-layout 3-D ResNet-18 (``models.fid_network``) trained on the training split with its own seed and
    objective (``fidnet.*``); no generator loss uses it. Returns
    ``(metrics.extractors.FrozenBackboneExtractor(net, "resnet18"), info)``: the extractor maps ``[N, 1, S, S, S]``
    to block-scaled pooled features ``[N, 8 * fidnet.width * (1 + fidnet.n_random)]`` (trained block, then the
    random copies: ``models.fid_network.FidNetwork.forward``; eval mode, no gradients); ``info`` holds
    ``digest``, ``fidnet_test_bac``, ``fidnet_val_bac`` (balanced accuracy of a logistic-regression probe on the
    trained block's frozen features, fit on the training split), ``fidnet_test_roi_r2``, ``fidnet_val_roi_r2`` (mean
    R^2 over the six ratios of a ridge probe), the same on all FID features (``fidnet_all_*``: the random blocks
    carry no clinical training and dilute a linear probe), ``fidnet_feature_dim``.
    """
    from metrics.extractors import FrozenBackboneExtractor
    from models.fid_network import extract_features, fit_fid_network, linear_probe_scores

    f = cfg.fidnet
    key = fidnet_digest(cfg, bundle)
    path = stage_path(cfg, "fidnet", key)
    def fit() -> dict[str, Any]:
        train = bundle.tensors("train")
        fit_fid_network(net, train, epochs=f.epochs, batch_size=f.batch_size, lr=f.lr,
                        weight_decay=f.weight_decay, w_cls=f.w_cls, w_reg=f.w_reg, w_ssl=f.w_ssl,
                        temperature=f.temperature, seed=f.seed, progress=progress)
        parts = {part: bundle.tensors(part) for part in ("val", "test")}
        info: dict[str, Any] = {"digest": key, "fidnet_feature_dim": float(net.num_features)}
        # probes on the trained block (its clinical content) and on everything FID sees (prefix fidnet_all_); one
        # forward pass per split: the trained block is the first columns (the probes standardise, so its scale is moot)
        feats = {part: extract_features(net, x) for part, x in (("train", train[0]), *((k, v[0]) for k, v in
                                                                                       parts.items()))}
        width = net.backbone.num_features
        for prefix, cols in (("fidnet_", slice(0, width)), ("fidnet_all_", slice(None))):
            scores = linear_probe_scores(feats["train"][:, cols], train[1],
                                         {part: (feats[part][:, cols], parts[part][1]) for part in parts})
            info.update({f"{prefix}{k}": v for k, v in scores.items()})
        return info

    with seeded(f.seed):
        net = build_fid_network(cfg)
        info = _load_or_fit(path, net, fit)
    net.eval()
    return FrozenBackboneExtractor(net, "resnet18"), info
