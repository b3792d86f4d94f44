"""Imports every module that registers methods, metrics, suites and presets (explicit, not at package import), then
the plugins (installed ``brainmri.methods`` entry points and ``BENCHMARK_PLUGINS``; benchmark/plugins.py)."""

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
    from benchmark.plugins import load_plugins

    for name in REGISTERING_MODULES:
        importlib.import_module(name)
    load_plugins()
