"""The clinical-vector contract shared by data, models and metrics (DESIGN §4).

c = [hippocampus_l, hippocampus_r, amygdala_l, amygdala_r, lateral_ventricle_l, lateral_ventricle_r, label],
ratios are fractions of whole-brain volume, label 0 = CN, 1 = AD.
"""

from __future__ import annotations

ROI_NAMES: tuple[str, ...] = (
    "hippocampus_l",
    "hippocampus_r",
    "amygdala_l",
    "amygdala_r",
    "lateral_ventricle_l",
    "lateral_ventricle_r",
)
N_ROI = len(ROI_NAMES)
CLINICAL_DIM = N_ROI + 1
LABEL_INDEX = N_ROI
DIAGNOSES: dict[str, int] = {"CN": 0, "AD": 1}
# Bilateral structures as in paper Fig. 4 (left + right summed).
STRUCTURES: dict[str, tuple[int, int]] = {"hippocampus": (0, 1), "amygdala": (2, 3), "lateral_ventricle": (4, 5)}
