"""`generate`: NIfTI with the right shape and affine, CSV matching the requested vector, input errors."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from benchmark.cli import main
from benchmark.runner import load_trained

MANUAL = {"--hippocampus-l": 0.0030, "--hippocampus-r": 0.0031, "--amygdala-l": 0.0011, "--amygdala-r": 0.0012,
          "--lateral-ventricle-l": 0.010, "--lateral-ventricle-r": 0.0095}


@pytest.fixture(scope="module")
def trained_ours(tmp_path_factory: pytest.TempPathFactory, stage_cache: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("gen") / "ours"
    code = main(["train", "--method", "ours", "--preset", "smoke", "--set", f"data.cache_dir={stage_cache}",
                 "--no-progress", "--no-track", "--run-dir", str(run_dir), "--set", "train.budget_volumes=16"])
    assert code == 0
    return run_dir


def _manual_args() -> list[str]:
    out = []
    for k, v in MANUAL.items():
        out += [k, str(v)]
    return out


def test_manual_mode_writes_nifti_png_and_csv(trained_ours: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["generate", "--checkpoint", str(trained_ours), "--n", "3", "--label", "AD", *_manual_args(),
                 "--out", str(out), "--allow-extrapolation"]) == 0
    rows = list(csv.DictReader((out / "clinical.csv").open()))
    assert len(rows) == 3 and all(r["mode"] == "manual" and r["diagnosis"] == "AD" for r in rows)
    for r in rows:
        for flag, value in MANUAL.items():
            assert float(r[flag[2:].replace("-", "_")]) == pytest.approx(value, rel=1e-5)
        img = nib.load(str(out / r["image"]))
        assert img.shape == (16, 16, 16) and img.get_data_dtype() == np.float32
        assert (out / r["image"].replace(".nii.gz", ".png")).is_file()
    _, _, stages = load_trained(trained_ours)
    first = stages.bundle.cohort.root / stages.bundle.cohort.table["image"].iloc[0]
    expected = nib.load(str(first)).affine
    np.testing.assert_allclose(nib.load(str(out / rows[0]["image"])).affine, expected)


def test_partial_mode_keeps_label(trained_ours: Path, tmp_path: Path) -> None:
    out = tmp_path / "partial"
    assert main(["generate", "--checkpoint", str(trained_ours), "--n", "4", "--label", "CN", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "clinical.csv").open()))
    assert {r["diagnosis"] for r in rows} == {"CN"} and {r["mode"] for r in rows} == {"partial"}


@pytest.mark.parametrize("extra, needle", [(["--label", "MCI"], "--label 'MCI'"),
                                           (["--hippocampus-l", "-0.001"], "must be positive"),
                                           (["--hippocampus-l", "0.5"], "--allow-extrapolation")])
def test_bad_requests_exit_2(trained_ours: Path, tmp_path: Path, extra, needle, capsys) -> None:
    code = main(["generate", "--checkpoint", str(trained_ours), "--n", "1", *extra, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
