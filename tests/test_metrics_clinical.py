import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from metrics.clinical import balanced_accuracy, roi_mse


@pytest.mark.parametrize("p_ad", [0.5, 0.1, 0.95])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_accuracy_matches_sklearn(p_ad: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    y_true = (rng.random(200) < p_ad).astype(int)
    y_pred = np.where(rng.random(200) < 0.7, y_true, 1 - y_true)
    assert balanced_accuracy(y_true, y_pred) == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert balanced_accuracy(torch.tensor(y_true), torch.tensor(y_pred)) == pytest.approx(
        balanced_accuracy_score(y_true, y_pred)
    )


def test_balanced_accuracy_edge_cases_match_sklearn() -> None:
    y_true = np.array([0, 0, 0, 2, 2, 1])
    y_pred = np.array([0, 1, 0, 2, 0, 1])  # three classes
    assert balanced_accuracy(y_true, y_pred) == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert balanced_accuracy([0, 0, 1, 1], [1, 1, 1, 1]) == 0.5  # constant predictor = chance


def test_roi_mse_raw_units() -> None:
    target = np.full((4, 6), 3e-3)
    pred = target + 1e-3
    assert roi_mse(pred, target) == pytest.approx(1e-6)
    with pytest.raises(ValueError, match=r"\[N, 6\]"):
        roi_mse(np.zeros((4, 7)), np.zeros((4, 7)))
