"""Imports every module that registers methods, metrics, suites and presets (explicit, not at package import)."""

from __future__ import annotations

import importlib

REGISTERING_MODULES = (
    "models.vaegan",
    "baselines.wgan_gp",
    "baselines.stylegan2",
    "baselines.references",
    "benchmark.evaluation",
    "benchmark.suites",
    "benchmark.presets",
)


def load_all() -> None:
    for name in REGISTERING_MODULES:
        importlib.import_module(name)
