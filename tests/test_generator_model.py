"""The logged generator (benchmark/generator_model.py) of a method trained with an EMA of its generator."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from benchmark.config import resolve
from benchmark.data.bundle import load_bundle
from benchmark.data.contract import ROI_NAMES
from benchmark.generate import sample_volumes
from benchmark.generator_model import GeneratorPredictor, save_generator, standardised_vectors
from benchmark.runner import build_method


def test_a_generator_with_an_ema_is_saved_and_samples_with_the_averaged_weights(
        tmp_path: Path, smoke_overrides: dict[str, object], one_thread: None) -> None:
    cfg = resolve("smoke", method="xvaegan_clin", overrides={**smoke_overrides, "train.ema_decay": 0.5})
    bundle = load_bundle(cfg, progress=False)
    method = build_method(cfg)
    method.setup_ema(cfg.train.ema_decay)
    method.update_ema()  # AveragedModel's first update copies the weights
    with torch.no_grad():  # move the live weights away from the average, so the two generators differ
        for p in method.G.parameters():
            p.add_(0.05 * torch.randn_like(p))
    method.update_ema()
    rule = method.ema.multi_avg_fn
    save_generator(method, bundle.normalizer, 2, tmp_path)  # AveragedModel's closure used to stop pickling here
    assert method.ema.multi_avg_fn is rule  # the live method keeps its update rule

    rows = pd.DataFrame([{**dict(zip(ROI_NAMES, (0.0031, 0.0032, 0.0011, 0.0011, 0.008, 0.0075), strict=True)),
                          "diagnosis": d} for d in ("CN", "AD", "AD")])
    volumes = GeneratorPredictor(tmp_path).predict(rows, params={"seed": 4})
    c = standardised_vectors(rows, bundle.normalizer)
    expected = sample_volumes(method, 3, c, 4, 2)[:, 0].numpy()
    assert volumes.shape == (3, 16, 16, 16)
    torch.testing.assert_close(torch.from_numpy(volumes), torch.from_numpy(expected))
    ema, method.ema = method.ema, None  # the same draw from the live (non-averaged) weights is different
    live = sample_volumes(method, 3, c, 4, 2)[:, 0].numpy()
    method.ema = ema
    assert not torch.allclose(torch.from_numpy(volumes), torch.from_numpy(live), atol=1e-3)
