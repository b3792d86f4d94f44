"""Subject-disjoint, diagnosis-stratified, seeded train/val/test splits (paper §2.3, DESIGN §4).

A subject's scans always land in one split (no leakage through repeated scans). The fingerprint hashes the sorted
subject ids of each split; it is logged with every run, so all methods of a suite provably share one split.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmark.data.cohort import Cohort
from benchmark.data.errors import DataError

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True, eq=False)
class Split:
    """Row indices and subject ids of each split.

    Attributes:
        train, val, test: sorted cohort row indices (int64).
        train_subjects, val_subjects, test_subjects: sorted subject ids.
        seed, fractions: how it was made.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    train_subjects: list[str]
    val_subjects: list[str]
    test_subjects: list[str]
    seed: int
    fractions: tuple[float, float, float]

    @property
    def fingerprint(self) -> str:
        """sha256 over each split's sorted subject ids (first 16 hex digits): same subjects, same fingerprint."""
        return split_fingerprint(self.train_subjects, self.val_subjects, self.test_subjects)

    def rows(self, name: str) -> np.ndarray:
        """Row indices of split `name` ("train", "val" or "test")."""
        if name not in SPLIT_NAMES:
            raise KeyError(f"unknown split {name!r}; expected one of {SPLIT_NAMES}")
        return getattr(self, name)

    def to_dict(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "seed": self.seed,
            "fractions": list(self.fractions),
            "subjects": {n: list(getattr(self, f"{n}_subjects")) for n in SPLIT_NAMES},
            "rows": {n: getattr(self, n).tolist() for n in SPLIT_NAMES},
        }

    def save(self, path: Path) -> Path:
        """Write split.json atomically (temporary file in the same folder, then os.replace)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self.to_dict(), fh, indent=1)
                fh.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: Path) -> Split:
        """Read a split.json; its stored fingerprint must match its subject lists."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            subjects = {n: [str(s) for s in data["subjects"][n]] for n in SPLIT_NAMES}
            rows = {n: np.asarray(data["rows"][n], dtype=np.int64) for n in SPLIT_NAMES}
            split = cls(
                rows["train"],
                rows["val"],
                rows["test"],
                sorted(subjects["train"]),
                sorted(subjects["val"]),
                sorted(subjects["test"]),
                int(data["seed"]),
                tuple(float(f) for f in data["fractions"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(path, f"cannot read split file: {type(exc).__name__}: {exc}") from exc
        if data.get("fingerprint") not in (None, split.fingerprint):
            raise DataError(
                path,
                "fingerprint does not match the subject lists",
                column="fingerprint",
                value=data.get("fingerprint"),
            )
        return split

    def check(self, cohort: Cohort) -> None:
        """Raise DataError unless this split's rows belong to `cohort` (same subject ids at the same rows)."""
        ids = cohort.table["subject_id"].to_numpy()
        for name in SPLIT_NAMES:
            rows = self.rows(name)
            if rows.size and (rows.min() < 0 or rows.max() >= len(ids)):
                raise DataError(
                    f"split:{self.fingerprint}", "row index outside the cohort", column=name, value=int(rows.max())
                )
            if sorted(set(ids[rows].tolist())) != list(getattr(self, f"{name}_subjects")):
                raise DataError(f"split:{self.fingerprint}", "split does not match this cohort's subjects", column=name)


def split_fingerprint(train: list[str], val: list[str], test: list[str]) -> str:
    payload = json.dumps({"train": sorted(train), "val": sorted(val), "test": sorted(test)}, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def make_split(cohort: Cohort, seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> Split:
    """Subject-disjoint split, stratified by diagnosis, deterministic for (cohort subjects, seed, fractions).

    A subject's diagnosis for stratification is the majority over its scans (ties: its last scan's). Each diagnosis
    group is shuffled with the seed and cut by largest-remainder quotas, so the val/test totals are round(f·N) and
    each split is non-empty from 3 subjects on (from 10 subjects on with the default fractions, and typically far
    earlier). Only numpy's PCG64 permutation is used, which is stable across machines and numpy versions.

    Args:
        cohort: validated cohort.
        seed: split seed.
        fractions: (train, val, test), positive, summing to 1.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    table = cohort.table
    groups = _subject_diagnoses(table["subject_id"].tolist(), table["diagnosis"].tolist())
    subjects = sorted(groups)
    n = len(subjects)
    totals = [_round_half_up(fractions[i] * n) for i in (1, 2)]
    for i in (0, 1):  # every split non-empty when there are enough subjects
        if fractions[i + 1] > 0 and totals[i] == 0 and n >= 3:
            totals[i] = 1
    if n - sum(totals) < 1 and n >= 1:
        totals[0 if totals[0] >= totals[1] else 1] -= 1
    by_class: dict[str, list[str]] = {}
    for subject in subjects:
        by_class.setdefault(groups[subject], []).append(subject)
    classes = sorted(by_class)
    sizes = np.array([len(by_class[c]) for c in classes])
    # Held-out (val + test) per class first, so train keeps the exact class proportions; then val within it.
    held_out = _largest_remainder(sum(totals), sizes, sizes)
    val_quota = _largest_remainder(totals[0], held_out, held_out)
    test_quota = held_out - val_quota

    rng = np.random.default_rng(np.random.SeedSequence(seed))
    assignment: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for c, n_val, n_test in zip(classes, val_quota, test_quota, strict=True):
        members = [by_class[c][i] for i in rng.permutation(len(by_class[c]))]
        assignment["val"] += members[:n_val]
        assignment["test"] += members[n_val : n_val + n_test]
        assignment["train"] += members[n_val + n_test :]
    where = {s: name for name, members in assignment.items() for s in members}
    ids = table["subject_id"].to_numpy()
    rows = {name: np.flatnonzero(np.array([where[s] == name for s in ids], dtype=bool)) for name in SPLIT_NAMES}
    return Split(
        rows["train"].astype(np.int64),
        rows["val"].astype(np.int64),
        rows["test"].astype(np.int64),
        sorted(assignment["train"]),
        sorted(assignment["val"]),
        sorted(assignment["test"]),
        int(seed),
        fractions,  # type: ignore[arg-type]
    )


def _subject_diagnoses(subjects: list[str], diagnoses: list[str]) -> dict[str, str]:
    """Majority diagnosis per subject over its scans; a tie goes to the subject's last scan (CSV order)."""
    votes: dict[str, Counter] = {}
    last: dict[str, str] = {}
    for subject, diagnosis in zip(subjects, diagnoses, strict=True):
        votes.setdefault(subject, Counter())[diagnosis] += 1
        last[subject] = diagnosis
    result = {}
    for subject, counter in votes.items():
        top = max(counter.values())
        leaders = [d for d, k in counter.items() if k == top]
        result[subject] = last[subject] if len(leaders) > 1 else leaders[0]
    return result


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def _largest_remainder(total: int, weights: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Split `total` across classes in proportion to `weights` (Hamilton), never beyond a class's `capacity`."""
    if weights.sum() == 0 or total <= 0:
        return np.zeros_like(weights)
    exact = total * weights / weights.sum()
    quota = np.minimum(np.floor(exact).astype(int), capacity)
    remainder = exact - np.floor(exact)
    # Ties broken by class order (sorted names): deterministic.
    for c in sorted(range(len(weights)), key=lambda i: (-remainder[i], i)):
        if quota.sum() >= total:
            break
        if quota[c] < capacity[c]:
            quota[c] += 1
    while quota.sum() < total and (quota < capacity).any():  # a class ran out: others take the rest
        quota[int(np.argmax(capacity - quota))] += 1
    return quota
