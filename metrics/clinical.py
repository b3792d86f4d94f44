"""Clinical-consistency scores for Table 4 (paper §3.3, DESIGN §5 "BAC / MSE").

The frozen AD/CN classifier and ROI regressor are applied elsewhere; these functions score their outputs against
the clinical vectors the volumes were generated from.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from benchmark.data.contract import N_ROI

ArrayLike = Tensor | np.ndarray


def _np(x: ArrayLike | list) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def balanced_accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (labels ``[N]``); as sklearn's
    ``balanced_accuracy_score``. Chance is 0.5 for AD/CN whatever the class balance, which plain accuracy is not.
    """
    t, p = _np(y_true).ravel(), _np(y_pred).ravel()
    if t.shape != p.shape or t.size == 0:
        raise ValueError(f"balanced_accuracy: need two non-empty label vectors of one length, got {t.shape}, {p.shape}")
    recalls = [np.mean(p[t == c] == c) for c in np.unique(t)]
    return float(np.mean(recalls))


def roi_mse(pred: ArrayLike, target: ArrayLike) -> float:
    """Mean squared error over samples and the six ROI ratios, ``pred, target [N, 6]``, in raw ratio units.

    Ratios are fractions of whole-brain volume (~1e-3), so errors are tiny: paper Table 4 shows this value x1e-5
    (e.g. 5.7 means 5.7e-5).
    """
    p, t = _np(pred).astype(np.float64), _np(target).astype(np.float64)
    if p.shape != t.shape or p.ndim != 2 or p.shape[1] != N_ROI:
        raise ValueError(f"roi_mse: expected pred and target [N, {N_ROI}], got {p.shape}, {t.shape}")
    return float(np.mean((p - t) ** 2))
