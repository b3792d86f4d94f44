"""Presets as registry entries, so `list` documents them (their values live in benchmark/config.py)."""

from __future__ import annotations

from benchmark.config import PRESET_OVERRIDES
from benchmark.registry import PRESETS

for _name, _overrides in PRESET_OVERRIDES.items():
    PRESETS.add(_name, _overrides)
