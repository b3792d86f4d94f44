"""Real-data preprocessing: orientation/spacing independence, cube output, atomic cache, errors naming the row."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from benchmark.data.cohort import load_cohort
from benchmark.data.contract import ROI_NAMES
from benchmark.data.errors import DataError
from benchmark.data.preprocess import prepare_cohort, preprocess_volume

SHAPE = (40, 48, 40)


def _brain(seed: int = 0) -> nib.Nifti1Image:
    """A skull-stripped ellipsoidal 'brain' with smooth texture, 1 mm RAS, background 0."""
    rng = np.random.default_rng(seed)
    grid = np.indices(SHAPE).astype(np.float32)
    centre = np.array(SHAPE, dtype=np.float32)[:, None, None, None] / 2
    radius = np.sqrt((((grid - centre) / np.array([15, 19, 15])[:, None, None, None]) ** 2).sum(0))
    texture = ndimage.gaussian_filter(rng.random(SHAPE).astype(np.float32), 3)
    data = np.where(radius < 1, 100 + 400 * texture + 100 * grid[0] / SHAPE[0], 0).astype(np.float32)
    affine = np.eye(4)
    affine[:3, 3] = [-20.0, -24.0, -20.0]
    return nib.Nifti1Image(data, affine)


def _reoriented(img: nib.Nifti1Image, codes: str) -> nib.Nifti1Image:
    ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(codes))
    return img.as_reoriented(ornt)


def test_orientation_does_not_matter(tmp_path: Path) -> None:
    ras = _brain()
    outputs = {}
    for codes in ("RAS", "LPS", "PIL"):
        img = _reoriented(ras, codes)
        assert "".join(nib.aff2axcodes(img.affine)) == codes
        nib.save(img, tmp_path / f"{codes}.nii.gz")
        outputs[codes] = preprocess_volume(tmp_path / f"{codes}.nii.gz", 16)
    assert outputs["RAS"].shape == (16, 16, 16) and outputs["RAS"].dtype == np.float32
    np.testing.assert_allclose(outputs["LPS"], outputs["RAS"], atol=1e-5)
    np.testing.assert_allclose(outputs["PIL"], outputs["RAS"], atol=1e-5)


def test_anisotropic_spacing_matches_isotropic(tmp_path: Path) -> None:
    ras = _brain()
    coarse = nib.Nifti1Image(np.asarray(ras.dataobj)[:, :, ::2].copy(), ras.affine @ np.diag([1.0, 1.0, 2.0, 1.0]))
    nib.save(ras, tmp_path / "iso.nii.gz")
    nib.save(coarse, tmp_path / "aniso.nii.gz")
    iso = preprocess_volume(tmp_path / "iso.nii.gz", 16)
    aniso = preprocess_volume(tmp_path / "aniso.nii.gz", 16)
    assert aniso.shape == (16, 16, 16)
    # Away from the brain edge (where 2 mm slices sample the boundary differently), only interpolation differs.
    inside = ndimage.binary_erosion((iso != iso[0, 0, 0]) & (aniso != aniso[0, 0, 0]))
    assert inside.sum() > 0.1 * iso.size
    assert np.corrcoef(iso[inside], aniso[inside])[0, 1] > 0.95
    assert np.median(np.abs(iso[inside] - aniso[inside])) < 0.15


def test_zscore_inside_mask_and_mask_dir(tmp_path: Path) -> None:
    img = _brain()
    nib.save(img, tmp_path / "a.nii.gz")
    out = preprocess_volume(tmp_path / "a.nii.gz", 16)
    background = out[0, 0, 0]
    inside = out[out != background]
    assert abs(inside.mean()) < 0.1 and abs(inside.std() - 1) < 0.1 and background < inside.min()
    # With a mask, voxels outside it are removed before cropping: a half mask gives a different cube.
    mask = (np.asarray(img.dataobj) > 0) & (np.indices(SHAPE)[0] < 20)
    (tmp_path / "masks").mkdir()
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), img.affine), tmp_path / "masks" / "a.nii.gz")
    half = preprocess_volume(tmp_path / "a.nii.gz", 16, tmp_path / "masks" / "a.nii.gz")
    assert half.shape == (16, 16, 16) and not np.allclose(half, out)


def _source(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "raw"
    images.mkdir()
    rows = []
    for i, codes in enumerate(("RAS", "LPS", "PIL", "RAS")):
        img = _reoriented(_brain(seed=i), codes)
        if i == 3:  # anisotropic
            img = nib.Nifti1Image(np.asarray(img.dataobj)[:, ::2].copy(), img.affine @ np.diag([1.0, 2.0, 1.0, 1.0]))
        nib.save(img, images / f"s{i}.nii.gz")
        volumes = [3600.0, 3700.0, 1500.0, 1580.0, 17500.0, 16000.0]
        rows.append(
            {
                "subject_id": f"s{i // 2}",
                "scan_id": f"m{i % 2}",
                "image": f"s{i}.nii.gz",
                "diagnosis": "CN" if i < 2 else "AD",
                **dict(zip(ROI_NAMES, volumes, strict=True)),
                "whole_brain": 1.0e6 + i,
            }
        )
    csv = tmp_path / "source.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv, images


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_writes_a_cohort_and_reuses_cache(tmp_path: Path, workers: int) -> None:
    csv, images = _source(tmp_path)
    out = prepare_cohort(csv, images, tmp_path / "out", size=16, workers=workers, progress=False)
    cohort = load_cohort(out)
    assert cohort.table["image"].tolist() == [f"images/s{i // 2}_m{i % 2}.nii" for i in range(4)]
    for i in range(4):
        img = nib.load(cohort.image_path(i))
        assert img.shape == (16, 16, 16) and img.get_data_dtype() == np.float32
        assert "".join(nib.aff2axcodes(img.affine)) == "RAS"
        np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), img.header.get_zooms()[0])
    np.testing.assert_allclose(cohort.table["hippocampus_l"].to_numpy(), 3600.0 / (1.0e6 + np.arange(4)))
    cached = sorted((out / ".cache").glob("*.npy"))
    assert len(cached) == 8  # volume + affine per scan
    stamps = [p.stat().st_mtime_ns for p in cached]
    prepare_cohort(csv, images, out, size=16, workers=workers, progress=False)
    assert [p.stat().st_mtime_ns for p in sorted((out / ".cache").glob("*.npy"))] == stamps
    assert not [p for p in (out / ".cache").iterdir() if p.suffix != ".npy"]


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_corrupt_file_names_row_and_leaves_no_partial_cache(tmp_path: Path, workers: int) -> None:
    csv, images = _source(tmp_path)
    data = (images / "s2.nii.gz").read_bytes()
    (images / "s2.nii.gz").write_bytes(data[: len(data) // 3])  # header readable, data truncated
    with pytest.raises(DataError, match=r"s2\.nii\.gz, row 3 \(subject s1\), column 'image'"):
        prepare_cohort(csv, images, tmp_path / "out", size=16, workers=workers, progress=False)
    assert not [p for p in (tmp_path / "out" / ".cache").iterdir() if not p.name.endswith(".npy")]
    out = prepare_cohort(csv, images, tmp_path / "out", size=16, workers=workers, skip_bad=True, progress=False)
    cohort = load_cohort(out)
    assert len(cohort) == 3 and "s2.nii.gz" in " ".join(cohort.meta["skipped"])


def test_prepare_rejects_bad_rows(tmp_path: Path) -> None:
    csv, images = _source(tmp_path)
    table = pd.read_csv(csv)
    table.loc[1, "diagnosis"] = "MCI"
    table.to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"source\.csv, row 2 \(subject s0\), column 'diagnosis', value 'MCI'"):
        prepare_cohort(csv, images, tmp_path / "out", size=16, progress=False)
    table.loc[1, "diagnosis"] = "CN"
    table.loc[2, "amygdala_l"] = -3.0
    table.to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"row 3 \(subject s1\), column 'amygdala_l'"):
        prepare_cohort(csv, images, tmp_path / "out", size=16, progress=False)
    table.loc[2, "amygdala_l"] = 1500.0
    table.to_csv(csv, index=False)
    (images / "s0.nii.gz").write_bytes(gzip.compress(b"not nifti"))
    with pytest.raises(DataError, match=r"row 1 \(subject s0\), column 'image'"):
        prepare_cohort(csv, images, tmp_path / "out", size=16, progress=False)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), images / "s0.nii.gz")
    with pytest.raises(DataError, match="4-D"):
        prepare_cohort(csv, images, tmp_path / "out", size=16, progress=False)
