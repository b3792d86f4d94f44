"""Cohort CSV contract: validation errors name file, row and column; volumes form; normaliser; dataset."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from benchmark.data.cohort import ClinicalNormalizer, VolumeDataset, load_all, load_cohort
from benchmark.data.contract import CLINICAL_DIM, ROI_NAMES
from benchmark.data.errors import DataError

RATIOS = [0.0035, 0.0036, 0.0015, 0.0015, 0.017, 0.016]


def _write_nifti(path: Path, shape: tuple[int, ...] = (8, 9, 10), value: float | None = None) -> None:
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    data = rng.random(shape, dtype=np.float32) if value is None else np.full(shape, value, np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)


def _cohort(tmp_path: Path, n: int = 4, **columns: list) -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        image = f"img/s{i}.nii.gz"
        _write_nifti(tmp_path / image)
        rows.append(
            {
                "subject_id": f"s{i}",
                "image": image,
                "diagnosis": "AD" if i % 2 else "CN",
                **dict(zip(ROI_NAMES, RATIOS, strict=True)),
            }
        )
    table = pd.DataFrame(rows)
    for name, values in columns.items():
        table[name] = values
    table.to_csv(tmp_path / "clinical.csv", index=False)
    return tmp_path


def _edit(root: Path, row: int, column: str, value: object) -> None:
    table = pd.read_csv(root / "clinical.csv", dtype=str, keep_default_na=False)
    table.loc[row, column] = value
    table.to_csv(root / "clinical.csv", index=False)


def test_load_valid_cohort(tmp_path: Path) -> None:
    cohort = load_cohort(_cohort(tmp_path))
    assert len(cohort) == 4 and cohort.skipped == []
    c = cohort.clinical()
    assert c.shape == (4, CLINICAL_DIM) and c.dtype == np.float32
    np.testing.assert_allclose(c[0, :6], RATIOS, rtol=1e-6)
    assert c[:, 6].tolist() == [0, 1, 0, 1]
    assert cohort.source == f"folder:{tmp_path.resolve()}"


@pytest.mark.parametrize(
    ("row", "column", "value", "needle"),
    [
        (1, "hippocampus_l", "", "missing value"),
        (1, "hippocampus_l", "nan", "NaN"),
        (2, "amygdala_r", "-0.001", "> 0"),
        (2, "amygdala_r", "0", "> 0"),
        (0, "diagnosis", "MCI", "CN"),
        (3, "image", "img/nope.nii.gz", "not found"),
        (2, "image", "img/s0.nii.gz", "duplicate"),
        (1, "lateral_ventricle_l", "abc", "not a number"),
    ],
)
def test_bad_rows_raise_one_line_naming_file_row_column(
    tmp_path: Path, row: int, column: str, value: str, needle: str
) -> None:
    root = _cohort(tmp_path)
    _edit(root, row, column, value)
    with pytest.raises(DataError) as info:
        load_cohort(root)
    message = str(info.value)
    assert "clinical.csv" in message and f"row {row + 1}" in message and repr(column) in message
    assert needle in message and "\n" not in message
    # skip_bad drops exactly that row and reports it.
    cohort = load_cohort(root, skip_bad=True)
    assert len(cohort) == 3 and len(cohort.skipped) == 1 and needle in cohort.skipped[0]


def test_missing_column(tmp_path: Path) -> None:
    root = _cohort(tmp_path)
    pd.read_csv(root / "clinical.csv").drop(columns=["amygdala_l"]).to_csv(root / "clinical.csv", index=False)
    with pytest.raises(DataError, match=r"clinical\.csv, row header, column 'amygdala_l'"):
        load_cohort(root, skip_bad=True)  # a whole-file problem is never skipped


def test_four_d_and_corrupt_images(tmp_path: Path) -> None:
    root = _cohort(tmp_path)
    _write_nifti(root / "img/s1.nii.gz", shape=(6, 6, 6, 3))
    (root / "img/s2.nii.gz").write_bytes(gzip.compress(b"this is not a nifti header at all" * 3))
    (root / "img/s3.nii.gz").write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match=r"row 2 \(subject s1\), column 'image'.*4-D"):
        load_cohort(root)
    cohort = load_cohort(root, skip_bad=True)
    assert cohort.table["subject_id"].tolist() == ["s0"]
    assert any("row 3" in m and "s2.nii.gz" in m for m in cohort.skipped)
    assert any("row 4" in m and "s3.nii.gz" in m for m in cohort.skipped)


def test_truncated_uncompressed_image(tmp_path: Path) -> None:
    root = _cohort(tmp_path)
    _write_nifti(root / "img/x.nii")
    data = (root / "img/x.nii").read_bytes()
    (root / "img/x.nii").write_bytes(data[: len(data) - 100])
    _edit(root, 0, "image", "img/x.nii")
    with pytest.raises(DataError, match="truncated"):
        load_cohort(root)


def test_volumes_form_converts_to_ratios(tmp_path: Path) -> None:
    volumes = [3600.0, 3700.0, 1500.0, 1580.0, 17500.0, 16000.0]
    root = _cohort(tmp_path, n=2)
    table = pd.read_csv(root / "clinical.csv")
    for name, v in zip(ROI_NAMES, volumes, strict=True):
        table[name] = v
    table["whole_brain"] = [1.0e6, 2.0e6]
    table.to_csv(root / "clinical.csv", index=False)
    cohort = load_cohort(root)
    np.testing.assert_allclose(cohort.table[list(ROI_NAMES)].to_numpy()[0], np.array(volumes) / 1.0e6)
    np.testing.assert_allclose(cohort.clinical()[1, :6], np.array(volumes) / 2.0e6, rtol=1e-6)
    _edit(root, 1, "whole_brain", "-5")
    with pytest.raises(DataError, match=r"row 2 \(subject s1\), column 'whole_brain'"):
        load_cohort(root)


def test_ratio_form_rejects_volumes_without_whole_brain(tmp_path: Path) -> None:
    root = _cohort(tmp_path)
    _edit(root, 0, "hippocampus_l", "3600")
    with pytest.raises(DataError, match="whole_brain"):
        load_cohort(root)


def test_normalizer_round_trip_numpy_and_torch(tmp_path: Path) -> None:
    c = np.random.default_rng(0).random((20, 7)).astype(np.float32)
    c[:, 6] = np.arange(20) % 2
    norm = ClinicalNormalizer.fit(c)
    z = norm.transform(c)
    np.testing.assert_allclose(z[:, :6].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, :6].std(0), 1, atol=1e-4)
    assert np.array_equal(z[:, 6], c[:, 6])
    np.testing.assert_allclose(norm.inverse(z), c, atol=1e-6)
    t = torch.from_numpy(c).requires_grad_()
    zt = norm.transform(t)
    zt.sum().backward()
    assert t.grad is not None and torch.allclose(zt, torch.from_numpy(z), atol=1e-5)
    restored = ClinicalNormalizer.from_state_dict(norm.state_dict())
    assert restored == norm and all(isinstance(v, float) for v in norm.state_dict()["mean"])


def test_volume_dataset_and_load_all(tmp_path: Path) -> None:
    cohort = load_cohort(_cohort(tmp_path))
    dataset = VolumeDataset(cohort, [1, 3])
    item = dataset[1]
    assert item["index"] == 3 and item["x"].shape == (1, 8, 9, 10) and item["x"].dtype == torch.float32
    assert item["c"].shape == (7,) and item["c"][6] == 1
    assert dataset[1]["x"] is item["x"]  # cached: the second epoch does not re-read the file
    x, c = load_all(cohort, [0, 2])
    assert x.shape == (2, 1, 8, 9, 10) and c.shape == (2, 7)
    expected = np.asarray(nib.load(cohort.image_path(2)).dataobj, dtype=np.float32)
    assert torch.equal(x[1, 0], torch.from_numpy(expected))


def test_truncated_gzip_fails_at_load_with_row(tmp_path: Path) -> None:
    cohort = load_cohort(_cohort(tmp_path))
    path = cohort.image_path(1)
    path.write_bytes(path.read_bytes()[:400])  # header intact, data cut off
    with pytest.raises(DataError, match=r"s1\.nii\.gz, row 2 \(subject s1\), column 'image'"):
        VolumeDataset(cohort)[1]


def test_data_error_forms_are_one_line_and_picklable() -> None:
    import pickle

    structured = DataError("c.csv", "bad\nvalue", row=3, column="diagnosis", value="MCI")
    assert str(structured) == "c.csv, row 3, column 'diagnosis', value 'MCI': bad value"
    plain = DataError("/data: not a cohort folder")
    for error in (structured, plain):
        assert str(pickle.loads(pickle.dumps(error))) == str(error) and isinstance(error, ValueError)
