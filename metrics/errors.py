"""The one exception a metric raises when it cannot be computed here (DESIGN §5, "Pretrained weights").

The harness logs ``unavailable: <reason>`` instead of a number, so the reason must be one line that says what is
missing and how to provide it (which file, which directory or config key).
"""

from __future__ import annotations


class MetricUnavailable(RuntimeError):
    """A metric needs something this machine lacks (weights, a tool, a minimum input size)."""
