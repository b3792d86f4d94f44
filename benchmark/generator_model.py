"""A trained generator as an MLflow ``pyfunc`` model: ``mlflow.pyfunc.load_model("runs:/<id>/generator")``.

Every finished child run logs its generator under the artifact path ``generator`` (:func:`benchmark.tracking.
log_generator_model`). The model folder holds ``generator.pt``: the trained method as a whole object (networks, EMA,
frozen modules it holds), the cohort's clinical normaliser and what sampling needs, plus a copy of a plugin's file
when the method came from one. This module is the pyfunc flavour's loader (``_load_pyfunc``); it imports no MLflow,
and loading needs this repository importable (run from its root, or on ``PYTHONPATH``).

Input: a DataFrame with one row per volume, columns as in the data contract (DESIGN §4): the six ROI ratios as
fractions of whole-brain volume and ``diagnosis`` (``CN``/``AD``); for an unconditional method, one column ``n``
(volumes to draw, summed over rows). Param ``seed`` (default 0). Output: float32 volumes [N, S, S, S] in the
cohort's preprocessed space, exactly what ``python -m benchmark generate --seed SEED`` writes for the same vectors.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from benchmark.data.contract import DIAGNOSES, LABEL_INDEX, ROI_NAMES

PAYLOAD = "generator.pt"
PLUGIN_FILE = "plugin.py"
INFO = "generator.json"


def save_generator(method: Any, normalizer: Any, batch_size: int, out: Path) -> Path:
    """Write the model folder's data (``out/generator.pt``, and the plugin's file for a file plugin's method)."""
    from benchmark.plugins import plugin_of

    out.mkdir(parents=True, exist_ok=True)
    module = type(method).__module__
    plugin = plugin_of(method.cfg.method)
    if plugin is not None and Path(plugin.source).is_file():
        shutil.copyfile(plugin.source, out / PLUGIN_FILE)
    (out / INFO).write_text(json.dumps({"method": method.cfg.method, "module": module,
                                        "plugin": plugin.source if plugin else ""}, indent=2) + "\n")
    optimizers, method.optimizers = method.optimizers, {}  # optimizer state is for resuming, not for sampling
    # An EMA (torch's AveragedModel) holds its update rule as a closure (get_ema_multi_avg_fn's local function),
    # which pickle cannot store; sampling reads only the averaged weights, so the rules stay behind.
    averaged = [m for m in method.modules() if isinstance(m, AveragedModel)]
    rules = [(m.avg_fn, m.multi_avg_fn) for m in averaged]
    for m in averaged:
        m.avg_fn = m.multi_avg_fn = None
    try:
        torch.save({"method": method, "normalizer": normalizer, "module": module, "batch_size": batch_size,
                    "conditional": bool(method.conditional), "size": int(method.cfg.data.size)}, out / PAYLOAD)
    finally:
        method.optimizers = optimizers
        for m, (avg_fn, multi_avg_fn) in zip(averaged, rules, strict=True):
            m.avg_fn, m.multi_avg_fn = avg_fn, multi_avg_fn
    return out


def signature_spec(method: Any) -> dict[str, Any]:
    """The model signature in plain terms (benchmark.tracking turns it into MLflow's): inputs, output shape, params."""
    inputs = [(name, "double") for name in ROI_NAMES] + [("diagnosis", "string")] if method.conditional \
        else [("n", "long")]
    return {"inputs": inputs, "output_shape": (-1, *(method.cfg.data.size,) * 3), "params": [("seed", "long", 0)]}


class GeneratorPredictor:
    """What ``mlflow.pyfunc.load_model`` returns inside its wrapper: ``predict(DataFrame, params) -> ndarray``."""

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        info = json.loads((folder / INFO).read_text())
        if (folder / PLUGIN_FILE).is_file():  # a file plugin's method: its classes live in the copied file
            _import_plugin_module(folder / PLUGIN_FILE, info["module"])
        # weights_only=False: the method is pickled whole (as MLflow's own pyfunc models cloudpickle theirs), so a
        # model folder is code: load only models from a tracking store you trust. Checkpoints stay weights-only.
        payload = torch.load(folder / PAYLOAD, map_location="cpu", weights_only=False)
        self.method = payload["method"].eval()
        self.normalizer = payload["normalizer"]
        self.batch_size = int(payload["batch_size"])
        self.conditional = bool(payload["conditional"])

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        from benchmark.generate import sample_volumes

        seed = int((params or {}).get("seed", 0))
        if self.conditional:
            c = standardised_vectors(model_input, self.normalizer)
            volumes = sample_volumes(self.method, len(c), c, seed, self.batch_size)
        else:
            n = int(np.asarray(model_input["n"]).sum())
            volumes = sample_volumes(self.method, n, None, seed, self.batch_size)
        return volumes[:, 0].numpy().astype(np.float32)


def standardised_vectors(frame: Any, normalizer: Any) -> torch.Tensor:
    """[N, 7] network inputs from rows of raw ratios and a diagnosis (``generate``'s manual mode, row by row)."""
    from benchmark.errors import UsageError

    missing = [c for c in (*ROI_NAMES, "diagnosis") if c not in frame]
    if missing:
        raise UsageError(f"generator input: missing column(s) {', '.join(missing)}; expected "
                         f"{', '.join(ROI_NAMES)}, diagnosis")
    diagnosis = [str(d) for d in frame["diagnosis"]]
    bad = sorted({d for d in diagnosis if d not in DIAGNOSES})
    if bad:
        raise UsageError(f"generator input: diagnosis {', '.join(bad)}: expected one of {', '.join(DIAGNOSES)}")
    raw = torch.zeros(len(diagnosis), 7)
    for i, name in enumerate(ROI_NAMES):
        raw[:, i] = torch.tensor(np.array(frame[name], dtype=np.float64), dtype=torch.float32)
    label = torch.tensor([float(DIAGNOSES[d]) for d in diagnosis])
    c = normalizer.transform(raw)
    c = torch.as_tensor(c, dtype=torch.float32).clone()
    c[:, LABEL_INDEX] = label
    return c


def _import_plugin_module(path: Path, name: str) -> None:
    """Import a file plugin's copy under the module name its classes were pickled with (unless already imported)."""
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def _load_pyfunc(data_path: str) -> GeneratorPredictor:
    """The pyfunc flavour's entry point (``loader_module`` in the MLmodel file)."""
    return GeneratorPredictor(Path(data_path))
