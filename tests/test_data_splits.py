"""Splits: subject-disjoint (several scans per subject), stratified, seeded, fingerprinted, saved atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmark.data.cohort import Cohort
from benchmark.data.contract import ROI_NAMES
from benchmark.data.errors import DataError
from benchmark.data.splits import Split, make_split


def _cohort(n_subjects: int, scans: int = 3, ad_every: int = 3) -> Cohort:
    rows = []
    for s in range(n_subjects):
        for k in range(1 + s % scans):  # 1..scans scans per subject
            diagnosis = "AD" if s % ad_every == 0 else "CN"
            rows.append(
                {
                    "subject_id": f"sub{s:03d}",
                    "image": f"sub{s:03d}_{k}.nii",
                    "diagnosis": diagnosis,
                    "label": int(diagnosis == "AD"),
                    "csv_row": len(rows) + 1,
                    **{name: 0.003 for name in ROI_NAMES},
                }
            )
    return Cohort(Path("/nonexistent"), pd.DataFrame(rows))


def test_subject_disjoint_and_covering() -> None:
    cohort = _cohort(57)
    split = make_split(cohort, seed=3)
    ids = cohort.table["subject_id"].to_numpy()
    sets = [set(ids[split.rows(name)]) for name in ("train", "val", "test")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    rows = np.concatenate([split.train, split.val, split.test])
    assert sorted(rows.tolist()) == list(range(len(cohort)))  # every scan exactly once
    assert sets[0] == set(split.train_subjects) and len(split.val_subjects) == 6 and len(split.test_subjects) == 6


def test_stratified_by_diagnosis() -> None:
    cohort = _cohort(100, scans=1, ad_every=4)  # 25 AD, 75 CN
    split = make_split(cohort, seed=0)
    for name in ("val", "test"):  # 10 subjects each: 2.5 AD expected, largest remainder gives 2 or 3
        diagnoses = cohort.table["diagnosis"].to_numpy()[split.rows(name)]
        assert len(diagnoses) == 10 and abs((diagnoses == "AD").sum() - 2.5) <= 0.5
    assert (cohort.table["diagnosis"].to_numpy()[split.train] == "AD").sum() == 20


@pytest.mark.parametrize("n", [10, 11, 14, 23])
def test_small_cohorts_have_every_split(n: int) -> None:
    split = make_split(_cohort(n), seed=1)
    assert all(len(split.rows(name)) for name in ("train", "val", "test"))


def test_seeded_deterministic_and_fingerprint(tmp_path: Path) -> None:
    cohort = _cohort(40)
    a, b, c = make_split(cohort, seed=7), make_split(cohort, seed=7), make_split(cohort, seed=8)
    assert a.fingerprint == b.fingerprint and np.array_equal(a.test, b.test)
    assert a.fingerprint != c.fingerprint and len(a.fingerprint) == 16
    # Pinned value: the fingerprint must not change across runs, machines or numpy versions.
    pinned = make_split(_cohort(12), seed=0)
    assert pinned.fingerprint == "4b112c9fcfa76bd6"
    assert (pinned.val_subjects, pinned.test_subjects) == (["sub006"], ["sub007"])
    path = a.save(tmp_path / "runs" / "split.json")
    loaded = Split.load(path)
    assert loaded.fingerprint == a.fingerprint and np.array_equal(loaded.val, a.val)
    loaded.check(cohort)
    assert not list(path.parent.glob(".*tmp"))


def test_load_rejects_tampered_file(tmp_path: Path) -> None:
    path = make_split(_cohort(20), seed=0).save(tmp_path / "split.json")
    path.write_text(path.read_text().replace('"sub000"', '"subXXX"', 1))
    with pytest.raises(DataError, match="fingerprint"):
        Split.load(path)


def test_majority_diagnosis_per_subject() -> None:
    cohort = _cohort(30, scans=3)
    table = cohort.table.copy()
    table.loc[table["subject_id"] == "sub002", "diagnosis"] = ["CN", "AD", "AD"]
    split = make_split(Cohort(cohort.root, table), seed=0)
    assert sum("sub002" in getattr(split, f"{n}_subjects") for n in ("train", "val", "test")) == 1
