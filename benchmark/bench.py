"""``python -m benchmark bench``: speed and memory figures, measured (never asserted in unit tests).

Median milliseconds over repeats after warm-up, and peak memory (CUDA allocator peak, or the process's peak RSS
on CPU). Inputs are random tensors of the right shape: speed does not depend on what the volumes show.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from benchmark.config import Config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], Any], repeats: int, device: torch.device, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append((time.perf_counter() - t) * 1000)
    return out


def _peak_memory_mb(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_cuda_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_mb": rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20}


def random_batch(n: int, size: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, size, generator=g)
    c = torch.randn(n, 7, generator=g)
    c[:, 6] = (c[:, 6] > 0).float()
    return {"x": x.to(device), "c": c.to(device)}


def bench_method(cfg: Config, what: str, size: int, batch: int, repeats: int) -> dict[str, Any]:
    from benchmark.runner import build_method
    from benchmark.stages import build_heads
    from benchmark.train import resolve_device

    device = resolve_device(cfg.train.device)
    cfg = replace(cfg, data=replace(cfg.data, size=size), train=replace(cfg.train, batch_size=batch))
    heads = build_heads(cfg).to(device).freeze()
    method = build_method(cfg, heads).to(device)
    method.amp_dtype = torch.bfloat16 if (cfg.train.amp and device.type == "cuda") else None
    method.setup()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    data = random_batch(batch, size, device)
    result: dict[str, Any] = {"method": cfg.method, "what": what, "size": size, "batch": batch,
                              "device": str(device), "threads": torch.get_num_threads(),
                              "amp": str(method.amp_dtype)}
    if what == "train":
        method.train()
        step = iter(range(10**9))
        times = _time(lambda: method.training_step(data, next(step)), repeats, device)
        result["ms_per_step"] = statistics.median(times)
    else:
        method.eval()
        c = data["c"] if method.conditional else None
        with torch.no_grad():
            times = _time(lambda: method.sample(batch, c), repeats, device)
        result["ms_per_volume"] = statistics.median(times) / batch
    result["times_ms"] = [round(t, 2) for t in times]
    result.update(_peak_memory_mb(device))
    return result


def bench_prior(cfg: Config, n: int, repeats: int) -> dict[str, Any]:
    from models.diffusion import ClinicalDDPM

    ddpm = ClinicalDDPM(timesteps=cfg.prior.timesteps, hidden=cfg.prior.hidden).eval()
    times = _time(lambda: ddpm.sample(n, generator=torch.Generator().manual_seed(0)), repeats, torch.device("cpu"),
                  warmup=1)
    return {"what": "prior", "vectors": n, "steps": cfg.prior.timesteps, "ms_all_vectors": statistics.median(times),
            "threads": torch.get_num_threads(), "times_ms": [round(t, 1) for t in times]}


def bench_metrics(cfg: Config, size: int, repeats: int) -> dict[str, Any]:
    """Volumes per second of tri-planar SSIM, LPIPS (random backbone) and FID features at ``size``."""
    from metrics.lpips import lpips_triplanar
    from metrics.ssim import ssim_triplanar
    from models.heads import ClinicalHeads

    device = torch.device("cpu")
    n = 4
    real = random_batch(n, size, device)["x"]
    fake = real + 0.3 * torch.randn_like(real)
    heads = ClinicalHeads(width=cfg.heads.width, stem_pool=cfg.heads.stem_pool).freeze()
    out: dict[str, Any] = {"what": "metrics", "size": size, "volumes": n, "threads": torch.get_num_threads()}
    for name, fn in (("ssim_triplanar", lambda: ssim_triplanar(real, fake, n=cfg.eval.n_slices)),
                     ("lpips_triplanar_alexrand", lambda: lpips_triplanar(real, fake, n=cfg.eval.n_slices,
                                                                          backbone="random")),
                     (f"fid_features_resnet18sep_w{cfg.heads.width}", lambda: heads.features(real))):
        with torch.no_grad():
            ms = statistics.median(_time(fn, repeats, device, warmup=1))
        out[f"{name}_volumes_per_s"] = n / (ms / 1000)
    return out


def bench_command(cfg: Config, what: str, size: int | None, batch: int | None, repeats: int) -> dict[str, Any]:
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    size = size or cfg.data.size
    if what in ("train", "generate"):
        return bench_method(cfg, what, size, batch or cfg.train.batch_size, repeats)
    if what == "prior":
        return bench_prior(cfg, batch or 1000, repeats)
    if what == "metrics":
        return bench_metrics(cfg, size, repeats)
    if what == "depthwise":
        from benchmark.bench_depthwise import bench_depthwise

        return {"what": "depthwise", "rows": bench_depthwise(repeats=repeats)}
    if what == "synth":
        import tempfile
        from pathlib import Path

        from benchmark.data.synthetic import synthesize_cohort

        n = batch or 400
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            synthesize_cohort(Path(tmp) / "cohort", n=n, size=size, seed=0, workers=2, progress=False)
            return {"what": "synth", "subjects": n, "size": size, "seconds": time.perf_counter() - t}
    raise ValueError(f"unknown bench target {what!r}")


def format_result(result: dict[str, Any]) -> str:
    return "\n".join(f"{k:>28}: {v}" for k, v in result.items())
