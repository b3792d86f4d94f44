"""The embedded synthetic cohort: files, exact label-map ratios, CN/AD direction, determinism, volumetry."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from benchmark.data.cohort import load_cohort
from benchmark.data.contract import ROI_NAMES, STRUCTURES
from benchmark.data.errors import DataError
from benchmark.data.synthetic import (
    GENERATOR_VERSION,
    LABEL_TISSUE,
    default_synthetic_cohort,
    draw_subject,
    label_ratios,
    measure_roi_ratios,
    reduce_grey_white_contrast,
    synthesize_cohort,
    synthesize_subject,
    template_space,
)


@pytest.fixture(scope="module")
def cohort40(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize_cohort(tmp_path_factory.mktemp("synth") / "c40", n=40, size=32, seed=0, progress=False)


def test_files_and_exact_ratios(cohort40: Path) -> None:
    table = pd.read_csv(cohort40 / "clinical.csv")
    assert len(table) == 40 and len(list((cohort40 / "images").glob("*.nii"))) == 40
    assert len(list((cohort40 / "labels").glob("*.nii"))) == 40
    assert sorted(table["diagnosis"].value_counts().to_dict().items()) == [("AD", 20), ("CN", 20)]
    for row in table.itertuples(index=False):
        image = nib.load(cohort40 / row.image)
        labels = nib.load(cohort40 / row.label_map)
        assert image.shape == (32, 32, 32) and image.get_data_dtype() == np.float32
        assert labels.get_data_dtype() == np.uint8 and np.allclose(image.affine, labels.affine)
        measured = label_ratios(np.asarray(labels.dataobj))
        assert np.array_equal(measured, np.array([getattr(row, name) for name in ROI_NAMES]))  # exact
    cohort = load_cohort(cohort40)
    assert cohort.source == "synthetic:n=40,size=32,seed=0" and cohort.meta["version"] == GENERATOR_VERSION
    assert cohort.label_map_path(0) is not None and cohort.label_map_path(0).is_file()


def test_ad_direction(cohort40: Path) -> None:
    table = pd.read_csv(cohort40 / "clinical.csv")
    ad, cn = table[table["diagnosis"] == "AD"], table[table["diagnosis"] == "CN"]
    for name, (left, right) in STRUCTURES.items():
        columns = [ROI_NAMES[left], ROI_NAMES[right]]
        ad_mean, cn_mean = ad[columns].sum(axis=1).mean(), cn[columns].sum(axis=1).mean()
        assert (ad_mean > cn_mean) if name == "lateral_ventricle" else (ad_mean < cn_mean), name


def test_contrast_loss_narrows_the_grey_white_gap_only() -> None:
    t = np.linspace(0.0, 1.0, 2001, dtype=np.float32)
    out = reduce_grey_white_contrast(t, 0.2)
    assert np.all(np.diff(out) > 0)  # strictly increasing: no contrast inversion
    csf, gm, wm = np.searchsorted(t, [0.28, 0.65, 0.86])
    assert out[csf] == t[csf] and abs(out[wm] - t[wm]) < 1e-6 and np.all(out[wm:] == t[wm:])
    assert out[gm] == pytest.approx(t[gm] + 0.2 * (0.86 - t[gm]), abs=1e-6)  # 20 % of the gap to WM
    assert np.array_equal(reduce_grey_white_contrast(t, 0.0), t)


def test_contrast_loss_is_drawn_larger_in_ad_and_narrows_the_imaged_gap() -> None:
    """Same subject with and without its contrast loss: grey vs deep white gap (z units) shrinks, labels stay.

    (Comparing AD and CN images of a cohort would not isolate the effect: atrophy already narrows the gap in AD.)
    """
    draws = {dx: [draw_subject(np.random.default_rng(i), dx).contrast_loss for i in range(200)] for dx in ("CN", "AD")}
    assert np.mean(draws["AD"]) > np.mean(draws["CN"]) + 0.05
    params = draw_subject(np.random.default_rng(0), "AD")
    space = template_space(32)
    gaps = []
    for loss in (0.0, 0.2):
        x, labels = synthesize_subject(space, replace(params, contrast_loss=loss), np.random.default_rng(1))
        lo, hi = np.percentile(x[labels == LABEL_TISSUE], [25, 90])  # grey-ish and white-ish tissue intensities
        gaps.append(hi - lo)
        assert np.array_equal(labels, synthesize_subject(space, params, np.random.default_rng(1))[1])
    assert gaps[1] < 0.9 * gaps[0], gaps


def test_images_reflect_label_map(cohort40: Path) -> None:
    table = pd.read_csv(cohort40 / "clinical.csv")
    x = np.asarray(nib.load(cohort40 / table["image"][0]).dataobj)
    labels = np.asarray(nib.load(cohort40 / table["label_map"][0]).dataobj)
    brain = labels > 0
    assert abs(x[brain].mean()) < 1e-3 and abs(x[brain].std() - 1) < 1e-3  # z-scored inside the brain
    assert x[~brain].max() < x[brain].min() + 1e-6  # background below every brain voxel
    ventricles = x[(labels == 5) | (labels == 6)].mean()
    hippocampus = x[(labels == 1) | (labels == 2)].mean()
    assert ventricles < -1.0 < hippocampus < 0.5  # CSF-dark ventricles, grey-matter hippocampi


def test_deterministic_and_independent_of_workers(tmp_path: Path) -> None:
    a = synthesize_cohort(tmp_path / "a", n=4, size=16, seed=3, workers=1, progress=False)
    b = synthesize_cohort(tmp_path / "b", n=4, size=16, seed=3, workers=2, progress=False)
    c = synthesize_cohort(tmp_path / "c", n=4, size=16, seed=4, workers=1, progress=False)
    assert (a / "clinical.csv").read_bytes() == (b / "clinical.csv").read_bytes()
    assert (a / "clinical.csv").read_bytes() != (c / "clinical.csv").read_bytes()
    for path in sorted((a / "images").glob("*.nii")) + sorted((a / "labels").glob("*.nii")):
        assert path.read_bytes() == (b / path.relative_to(a)).read_bytes()
    with pytest.raises(DataError, match="not empty"):
        synthesize_cohort(a, n=4, size=16, seed=3, progress=False)


def test_default_cohort_is_built_once(tmp_path: Path) -> None:
    first = default_synthetic_cohort(3, 16, 0, tmp_path / "cache", workers=1, progress=False)
    stamp = (first / "clinical.csv").stat().st_mtime_ns
    again = default_synthetic_cohort(3, 16, 0, tmp_path / "cache", workers=1, progress=False)
    assert again == first and (again / "clinical.csv").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]  # no temporary folder left


@pytest.mark.slow
def test_intensity_class_volumetry_tracks_label_ratios(tmp_path: Path) -> None:
    """measure_roi_ratios on the cohort's own 64³ images: Pearson r > 0.8 per bilateral structure (report values)."""
    root = synthesize_cohort(tmp_path / "c64", n=40, size=64, seed=0, progress=False)
    table = pd.read_csv(root / "clinical.csv")
    x = np.stack([np.asarray(nib.load(root / p).dataobj, dtype=np.float32) for p in table["image"]])
    measured = measure_roi_ratios(x[:, None], 64)
    assert measured.shape == (40, 6)
    truth = table[list(ROI_NAMES)].to_numpy()
    for name, (left, right) in STRUCTURES.items():
        r = np.corrcoef(measured[:, left] + measured[:, right], truth[:, left] + truth[:, right])[0, 1]
        assert r > 0.8, f"{name}: r = {r:.3f}"


def test_tiny_size_keeps_every_structure(tmp_path: Path) -> None:
    """At 16³ (voxels of ~12 mm) point sampling can miss an amygdala; the cohort must still load (ratios > 0)."""
    root = synthesize_cohort(tmp_path / "c16", n=24, size=16, seed=0, progress=False)
    cohort = load_cohort(root)
    assert len(cohort) == 24 and (cohort.clinical()[:, :6] > 0).all()
