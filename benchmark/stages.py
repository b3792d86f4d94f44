"""Shared stages trained once per (data, split, preset) and found again by digest: the frozen heads, the prior.

Every method of a suite reuses the same heads (L_cls/L_reg, resnet3d_aux perceptual features, the FID extractor)
and the same diffusion prior (clinical vectors for conditional sampling), so they are keyed only by what they
depend on and never retrained per method.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from benchmark.config import Config, section_digest
from benchmark.data.bundle import DataBundle

DATA_KEYS = ("data.path", "data.synth_n", "data.synth_seed", "data.size", "data.split_seed")


def _data_flat(cfg: Config) -> dict[str, Any]:
    from benchmark.config import flatten

    flat = flatten(cfg)
    return {k: flat[k] for k in DATA_KEYS}


def heads_digest(cfg: Config, bundle: DataBundle) -> str:
    return section_digest(cfg, ("heads",), extra={**_data_flat(cfg), "split": bundle.fingerprint})


def prior_digest(cfg: Config, bundle: DataBundle) -> str:
    return section_digest(cfg, ("prior",), extra={**_data_flat(cfg), "split": bundle.fingerprint})


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def stage_path(cfg: Config, kind: str, key: str) -> Path:
    return Path(cfg.data.cache_dir) / "stages" / f"{kind}-{key}.pt"


def build_heads(cfg: Config) -> Any:
    from models.heads import ClinicalHeads

    return ClinicalHeads(width=cfg.heads.width)


def get_heads(cfg: Config, bundle: DataBundle, progress: bool = True, log: Any = None) -> tuple[Any, dict[str, Any]]:
    """The frozen AD/CN classifier + ROI regressor for this data/split, trained on first use."""
    from models.heads import evaluate_heads, fit_heads

    key = heads_digest(cfg, bundle)
    path = stage_path(cfg, "heads", key)
    heads = build_heads(cfg)
    if path.is_file():
        payload = torch.load(path, map_location="cpu", weights_only=True)
        heads.load_state_dict(payload["state"])
        info = dict(payload["info"])
    else:
        train = bundle.tensors("train")
        val = bundle.tensors("val")
        history = fit_heads(heads, train, val, epochs=cfg.heads.epochs, batch_size=cfg.heads.batch_size,
                            lr=cfg.heads.lr, grad_clip=cfg.heads.grad_clip, patience=cfg.heads.patience,
                            seed=cfg.train.seed, progress=progress)
        test_x, test_c = bundle.tensors("test")
        std = torch.as_tensor(bundle.normalizer.std, dtype=torch.float32)
        test = evaluate_heads(heads, test_x, test_c, std=std)
        info = {"digest": key, "heads_test_bac": float(test["bac"]), "heads_test_mse": float(test["mse"]),
                "heads_val_bac": float(history.get("val_bac", float("nan"))),
                "heads_val_mse": float(history.get("val_mse", float("nan")))}
        _atomic_save({"state": heads.state_dict(), "info": info}, path)
    return heads.freeze(), info


def get_prior(cfg: Config, bundle: DataBundle, progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """The DDPM over standardised clinical vectors of the training split, trained on first use."""
    from models.diffusion import ClinicalDDPM, fit_prior

    key = prior_digest(cfg, bundle)
    path = stage_path(cfg, "prior", key)
    ddpm = ClinicalDDPM(timesteps=cfg.prior.timesteps, hidden=cfg.prior.hidden)
    if path.is_file():
        payload = torch.load(path, map_location="cpu", weights_only=True)
        ddpm.load_state_dict(payload["state"])
        info = dict(payload["info"])
    else:
        c_train = bundle.normalizer.transform(bundle.raw_clinical("train"))
        fit_prior(ddpm, c_train, steps=cfg.prior.steps, batch_size=cfg.prior.batch_size, lr=cfg.prior.lr,
                  grad_clip=cfg.prior.grad_clip, seed=cfg.train.seed, progress=progress)
        info = {"digest": key}
        _atomic_save({"state": ddpm.state_dict(), "info": info}, path)
    ddpm.eval()
    for p in ddpm.parameters():
        p.requires_grad_(False)
    return ddpm, info
