"""Volumetric consistency of generated volumes (paper §3.3 and Fig. 4, DESIGN §5).

Structure volumes are measured by a method that took no part in training (on real data: SynthSeg, Billot et al.
2023, when ``mri_synthseg`` is installed; on the synthetic cohort: ``benchmark.data.synthetic.measure_roi_ratios``)
and compared with the requested ratios of the clinical vectors, left + right summed per structure as in Fig. 4.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.stats

from benchmark.data.contract import N_ROI, ROI_NAMES, STRUCTURES
from metrics.errors import MetricUnavailable

SYNTHSEG = "mri_synthseg"
# SynthSeg's volume CSV column for each ROI of the contract, in ROI_NAMES order.
SYNTHSEG_COLUMNS: dict[str, str] = {
    "hippocampus_l": "left hippocampus",
    "hippocampus_r": "right hippocampus",
    "amygdala_l": "left amygdala",
    "amygdala_r": "right amygdala",
    "lateral_ventricle_l": "left lateral ventricle",
    "lateral_ventricle_r": "right lateral ventricle",
}
SYNTHSEG_TIV = "total intracranial"
SYNTHSEG_CSF = "csf"


def consistency(measured: np.ndarray, requested: np.ndarray) -> dict[str, float]:
    """Pearson r and MAE per bilateral structure between measured and requested ROI ratios ``[N, 6]``.

    Returns ``{<structure>_r, <structure>_mae}`` for each of ``STRUCTURES`` (left + right summed, paper Fig. 4)
    plus ``mean_r`` and ``mean_mae`` over structures. MAE is in ratio units (fraction of whole-brain volume).
    r is NaN when fewer than 2 samples or either side is constant (undefined, not 0).
    """
    m, q = np.asarray(measured, dtype=np.float64), np.asarray(requested, dtype=np.float64)
    if m.shape != q.shape or m.ndim != 2 or m.shape[1] != N_ROI:
        raise ValueError(f"consistency: expected measured and requested [N, {N_ROI}], got {m.shape}, {q.shape}")
    out: dict[str, float] = {}
    for name, (left, right) in STRUCTURES.items():
        a, b = m[:, left] + m[:, right], q[:, left] + q[:, right]
        if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
            r = float("nan")
        else:
            r = float(scipy.stats.pearsonr(a, b).statistic)
        out[f"{name}_r"] = r
        out[f"{name}_mae"] = float(np.mean(np.abs(a - b)))
    out["mean_r"] = float(np.mean([out[f"{s}_r"] for s in STRUCTURES]))
    out["mean_mae"] = float(np.mean([out[f"{s}_mae"] for s in STRUCTURES]))
    return out


def synthseg_available() -> bool:
    """Whether FreeSurfer's ``mri_synthseg`` is on PATH."""
    return shutil.which(SYNTHSEG) is not None


def _strip_ext(name: str) -> str:
    for ext in (".nii.gz", ".nii", ".mgz"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def read_synthseg_volumes(csv_path: str | Path, subjects: Sequence[str], denominator: str = "brain") -> np.ndarray:
    """ROI ratios ``[N, 6]`` (ROI_NAMES order) for ``subjects`` (file stems) from a SynthSeg ``--vol`` CSV.

    ``denominator='brain'``: whole-brain volume = total intracranial - CSF (every brain label, ventricles included),
    which matches the data contract's "fraction of whole-brain volume"; ``'tiv'``: total intracranial volume.
    """
    if denominator not in ("brain", "tiv"):
        raise ValueError(f"read_synthseg_volumes: denominator must be 'brain' or 'tiv', got {denominator!r}")
    rows: dict[str, dict[str, float]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            row = {k.strip().lower(): v for k, v in row.items() if k is not None}
            rows[_strip_ext(Path(row["subject"].strip()).name)] = {
                k: float(v) for k, v in row.items() if k != "subject" and v not in (None, "")
            }
    out = np.empty((len(subjects), N_ROI))
    for i, subject in enumerate(subjects):
        if subject not in rows:
            raise ValueError(f"read_synthseg_volumes: subject {subject!r} missing from {csv_path}")
        row = rows[subject]
        total = row[SYNTHSEG_TIV] - (row[SYNTHSEG_CSF] if denominator == "brain" else 0.0)
        out[i] = [row[SYNTHSEG_COLUMNS[roi]] / total for roi in ROI_NAMES]
    return out


def measure_with_synthseg(
    nifti_paths: Sequence[str | Path],
    out_dir: str | Path,
    extra_args: Sequence[str] = (),
    denominator: str = "brain",
) -> np.ndarray:
    """Segment volumes with SynthSeg and return their ROI ratios ``[N, 6]`` (ROI_NAMES order).

    Runs ``mri_synthseg --i <dir> --o <dir> --vol <out_dir>/vols.csv`` once for all volumes (the model loads once);
    inputs are linked under ``out_dir/inputs`` with indexed names so CSV rows map back to ``nifti_paths`` order.
    ``extra_args`` go to mri_synthseg as given (e.g. ``['--robust', '--threads', '2']``).

    Raises:
        MetricUnavailable: ``mri_synthseg`` is not on PATH.
    """
    exe = shutil.which(SYNTHSEG)
    if exe is None:
        raise MetricUnavailable(
            "volumetric consistency on real data needs SynthSeg: install FreeSurfer >= 7.3 (which ships "
            "mri_synthseg) or SynthSeg (github.com/BBillot/SynthSeg) and put mri_synthseg on PATH"
        )
    out_dir = Path(out_dir)
    in_dir, seg_dir = out_dir / "inputs", out_dir / "seg"
    for d in (in_dir, seg_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    subjects = []
    for i, path in enumerate(nifti_paths):
        path = Path(path).resolve()
        ext = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
        link = in_dir / f"{i:05d}{ext}"
        try:
            os.symlink(path, link)
        except OSError:
            shutil.copyfile(path, link)
        subjects.append(f"{i:05d}")
    vols = out_dir / "vols.csv"
    vols.unlink(missing_ok=True)
    cmd = [exe, "--i", str(in_dir), "--o", str(seg_dir), "--vol", str(vols), *extra_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not vols.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"mri_synthseg failed (exit {proc.returncode}): " + " | ".join(tail))
    return read_synthseg_volumes(vols, subjects, denominator)
