"""A cohort folder: `clinical.csv` + NIfTI volumes, validated once at the door (DESIGN §4).

Every later stage (splits, datasets, metrics) trusts `Cohort.table`, so every check that can fail on real data is
made here and reported as one `DataError` line naming the file, the row, the column and the value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from benchmark.data.contract import CLINICAL_DIM, DIAGNOSES, LABEL_INDEX, N_ROI, ROI_NAMES
from benchmark.data.errors import DataError

REQUIRED = ("subject_id", "image", "diagnosis")
OPTIONAL = ("scan_id", "age", "sex", "label_map")
WHOLE_BRAIN = "whole_brain"


@dataclass(frozen=True, eq=False)
class Cohort:
    """A validated cohort.

    Attributes:
        root: the cohort folder (image paths are relative to it).
        table: one row per scan, index 0..N-1: subject_id (str), image (str), diagnosis ("CN"/"AD"), label (0/1),
            the six `ROI_NAMES` ratios (float64), `csv_row` (1-based data row in clinical.csv), and the optional
            columns present in the CSV (scan_id, age, sex, label_map, others).
        skipped: messages of the rows dropped by `skip_bad=True`.
    """

    root: Path
    table: pd.DataFrame
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.table)

    def clinical(self) -> np.ndarray:
        """[N, 7] float32: raw ratios + label (0 = CN, 1 = AD), the contract's clinical vector."""
        c = np.empty((len(self.table), CLINICAL_DIM), dtype=np.float32)
        c[:, :N_ROI] = self.table[list(ROI_NAMES)].to_numpy(dtype=np.float64)
        c[:, LABEL_INDEX] = self.table["label"].to_numpy()
        return c

    def image_path(self, index: int) -> Path:
        return self.root / self.table["image"].iat[index]

    def label_map_path(self, index: int) -> Path | None:
        """The label map of row `index` (synthetic cohorts), or None."""
        if "label_map" not in self.table.columns:
            return None
        value = self.table["label_map"].iat[index]
        return self.root / value if isinstance(value, str) and value else None

    @property
    def meta(self) -> dict:
        """The `cohort.json` sidecar ({} when absent)."""
        path = self.root / "cohort.json"
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(path, f"cannot read cohort sidecar: {exc}") from exc

    @property
    def source(self) -> str:
        """What to log as the data source, e.g. "synthetic:n=300,size=32,seed=0" or "folder:/abs/path"."""
        return str(self.meta.get("source") or f"folder:{self.root.resolve()}")


def load_cohort(root: Path, skip_bad: bool = False, check_images: bool = True) -> Cohort:
    """Read and validate `root/clinical.csv` (DESIGN §4 columns; ratios or volumes + whole_brain form).

    Args:
        root: cohort folder.
        skip_bad: drop bad rows and list their messages in `Cohort.skipped` instead of raising.
        check_images: open every image header (nibabel) to check it is readable and 3-D.

    Raises:
        DataError: the first problem (missing file or columns, or a bad row unless `skip_bad`).
    """
    root = Path(root)
    table, skipped = read_clinical(root / "clinical.csv", root, skip_bad=skip_bad, check_images=check_images)
    return Cohort(root, table, skipped)


def read_clinical(
    csv: Path, image_root: Path, skip_bad: bool = False, check_images: bool = True
) -> tuple[pd.DataFrame, list[str]]:
    """Validate a clinical CSV whose `image` paths are relative to `image_root`; returns (table, skipped messages).

    Volumes form (a `whole_brain` column is present): the six ROI columns are mm³ and become ratios
    volume / whole_brain; the volumes are kept as `<name>_mm3` columns.
    """
    csv = Path(csv)
    if not csv.is_file():
        raise DataError(csv, "clinical CSV not found")
    try:
        raw = pd.read_csv(csv, dtype=str, keep_default_na=False, na_filter=False, skipinitialspace=True)
    except Exception as exc:  # pandas raises ParserError, UnicodeDecodeError, EmptyDataError ...
        raise DataError(csv, f"cannot parse CSV: {type(exc).__name__}: {exc}") from exc
    raw.columns = [str(c).strip() for c in raw.columns]
    volumes_form = WHOLE_BRAIN in raw.columns
    needed = [*REQUIRED, *ROI_NAMES, *([WHOLE_BRAIN] if volumes_form else [])]
    missing = [c for c in needed if c not in raw.columns]
    if missing:
        raise DataError(csv, f"missing column(s) {', '.join(missing)}", row="header", column=missing[0])
    duplicated = raw.columns[raw.columns.duplicated()].tolist()
    if duplicated:
        raise DataError(csv, "duplicated column", row="header", column=duplicated[0])

    rows: list[dict] = []
    skipped: list[str] = []
    seen_images: dict[Path, int] = {}
    for position, record in enumerate(raw.to_dict("records")):
        number = position + 1
        try:
            row = _validate_row(record, number, csv, image_root, volumes_form, check_images, seen_images)
        except DataError as exc:
            if not skip_bad:
                raise
            skipped.append(str(exc))
            continue
        rows.append(row)
    if not rows:
        raise DataError(csv, "no valid rows" + (f" ({len(skipped)} skipped)" if skipped else ""))
    table = pd.DataFrame(rows)
    table["label"] = table["label"].astype(np.int64)
    for name in ROI_NAMES:
        table[name] = table[name].astype(np.float64)
    return table.reset_index(drop=True), skipped


def _validate_row(
    record: dict[str, str],
    number: int,
    csv: Path,
    image_root: Path,
    volumes_form: bool,
    check_images: bool,
    seen_images: dict[Path, int],
) -> dict:
    """One CSV row -> a table row, or DataError naming the row (1-based, with subject id) and column."""
    subject = record["subject_id"].strip()
    row_label = f"{number} (subject {subject})" if subject else number

    def fail(column: str, value: object, reason: str) -> DataError:
        return DataError(csv, reason, row=row_label, column=column, value=value)

    if not subject:
        raise fail("subject_id", record["subject_id"], "subject_id is empty")
    diagnosis = record["diagnosis"].strip().upper()
    if diagnosis not in DIAGNOSES:
        raise fail("diagnosis", record["diagnosis"], f"diagnosis must be one of {', '.join(DIAGNOSES)}")

    numbers = {name: _positive(record, name, fail) for name in (*ROI_NAMES, *([WHOLE_BRAIN] if volumes_form else []))}
    row: dict = {k: v.strip() for k, v in record.items() if k not in (*ROI_NAMES, WHOLE_BRAIN)}
    if volumes_form:
        whole = numbers[WHOLE_BRAIN]
        for name in ROI_NAMES:
            if numbers[name] >= whole:
                raise fail(name, record[name], f"volume must be smaller than whole_brain ({record[WHOLE_BRAIN]})")
            row[name] = numbers[name] / whole
            row[f"{name}_mm3"] = numbers[name]
        row[f"{WHOLE_BRAIN}_mm3"] = whole
    else:
        for name in ROI_NAMES:
            if numbers[name] >= 1.0:
                raise fail(name, record[name], "ratio must be < 1 (volumes in mm³ need a whole_brain column)")
            row[name] = numbers[name]

    image = record["image"].strip()
    if not image:
        raise fail("image", record["image"], "image path is empty")
    path = image_root / image
    if not path.is_file():
        raise fail("image", image, f"image file not found: {path}")
    key = path.resolve()
    if key in seen_images:
        raise fail("image", image, f"duplicate image (also in row {seen_images[key]})")
    seen_images[key] = number
    if check_images:
        problem = _header_problem(path)
        if problem:
            raise fail("image", image, problem)
    label_map = record.get("label_map", "").strip()
    if label_map:
        label_path = image_root / label_map
        if not label_path.is_file():
            raise fail("label_map", label_map, f"label map not found: {label_path}")
        if check_images:
            problem = _header_problem(label_path)
            if problem:
                raise fail("label_map", label_map, problem)
    row.update(subject_id=subject, image=image, diagnosis=diagnosis, label=DIAGNOSES[diagnosis], csv_row=number)
    return row


def _positive(record: dict[str, str], name: str, fail: Callable[[str, object, str], DataError]) -> float:
    text = record[name].strip()
    try:
        value = float(text)
    except ValueError:
        raise fail(name, text, "missing value" if text == "" else "not a number") from None
    if math.isnan(value):
        raise fail(name, text, "missing value (NaN)")
    if not math.isfinite(value):
        raise fail(name, text, "value is not finite")
    if value <= 0.0:
        raise fail(name, text, "value must be > 0")
    return value


def _header_problem(path: Path) -> str | None:
    """Why the NIfTI at `path` is unusable judging by its header (and file size for .nii), or None."""
    try:
        img = nib.load(str(path))
        shape = img.shape
    except Exception as exc:  # nibabel raises ImageFileError, OSError, EOFError, zlib.error, ValueError ...
        return f"cannot read NIfTI header of {path.name}: {type(exc).__name__}: {exc}"
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        return f"image is {len(shape)}-D with shape {tuple(shape)}, expected 3-D"
    if path.suffix == ".nii":  # uncompressed: a truncated file is visible from its size alone
        offset = int(getattr(img.dataobj, "offset", 0) or img.header.get_data_offset())
        needed = offset + int(np.prod(img.shape)) * img.header.get_data_dtype().itemsize
        if path.stat().st_size < needed:
            return f"file is truncated ({path.stat().st_size} of {needed} bytes)"
    return None


def read_volume(path: Path, row: int | str | None = None) -> np.ndarray:
    """A 3-D volume as float32 (nibabel), or DataError naming the file (a trailing singleton axis is dropped)."""
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # truncated .nii.gz data shows only here
        raise DataError(path, f"cannot read image: {type(exc).__name__}: {exc}", row=row, column="image") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(path, "image must be 3-D", row=row, column="image", value=data.shape)
    return data


class ClinicalNormalizer:
    """Standardises the six ratios with the training split's mean/SD; the label stays 0/1 (DESIGN §4).

    Fitted once on the training split and stored with every checkpoint (`state_dict`), so generation and evaluation
    see exactly the scaling the networks were trained with. Works on numpy arrays and torch tensors [..., 7] (or
    [..., 6] ratios only), keeping the type, dtype and device.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != N_ROI or len(std) != N_ROI:
            raise ValueError(f"mean and std need {N_ROI} values, got {len(mean)} and {len(std)}")
        if any(not s > 0 for s in std):
            raise ValueError(f"std must be > 0, got {list(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    @classmethod
    def fit(cls, c: np.ndarray | torch.Tensor) -> ClinicalNormalizer:
        """Fit on clinical vectors [N, 7] (or ratios [N, 6]) of the training split."""
        array = c.detach().cpu().numpy() if isinstance(c, torch.Tensor) else np.asarray(c)
        ratios = array[:, :N_ROI].astype(np.float64)
        if ratios.shape[0] < 1:
            raise ValueError("cannot fit a normaliser on zero rows")
        std = ratios.std(axis=0)
        std = np.where(std > 0, std, 1.0)  # a constant ratio (a one-subject split) is centred, not scaled
        return cls(ratios.mean(axis=0).tolist(), std.tolist())

    def _apply(self, c: np.ndarray | torch.Tensor, inverse: bool) -> np.ndarray | torch.Tensor:
        if c.shape[-1] not in (N_ROI, CLINICAL_DIM):
            raise ValueError(f"expected [..., {CLINICAL_DIM}] or [..., {N_ROI}], got shape {tuple(c.shape)}")
        if isinstance(c, torch.Tensor):
            mean = torch.tensor(self.mean, dtype=c.dtype, device=c.device)
            std = torch.tensor(self.std, dtype=c.dtype, device=c.device)
            ratios = c[..., :N_ROI] * std + mean if inverse else (c[..., :N_ROI] - mean) / std
            return torch.cat([ratios, c[..., N_ROI:]], dim=-1)  # out of place: keeps autograd intact
        array = np.asarray(c)
        dtype = array.dtype if np.issubdtype(array.dtype, np.floating) else np.float64
        mean, std = np.asarray(self.mean, dtype=dtype), np.asarray(self.std, dtype=dtype)
        ratios = array[..., :N_ROI] * std + mean if inverse else (array[..., :N_ROI] - mean) / std
        return np.concatenate([ratios.astype(dtype), array[..., N_ROI:].astype(dtype)], axis=-1)

    def transform(self, c: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Raw ratios (+ label) -> standardised ratios (+ label)."""
        return self._apply(c, inverse=False)

    def inverse(self, c: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Standardised ratios (+ label) -> raw ratios (+ label)."""
        return self._apply(c, inverse=True)

    def state_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Sequence[float]]) -> ClinicalNormalizer:
        return cls(state["mean"], state["std"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClinicalNormalizer) and (self.mean, self.std) == (other.mean, other.std)

    def __repr__(self) -> str:
        return f"ClinicalNormalizer(mean={list(self.mean)}, std={list(self.std)})"


class VolumeDataset(Dataset):
    """Rows of a cohort as dict(x=[1,S,S,S] float32, c=[7] raw ratios + label, index=row).

    Args:
        cohort: the cohort.
        indices: row indices (e.g. `Split.train`); all rows when None.
        cache: keep loaded volumes in memory, so later epochs skip NIfTI decoding (per DataLoader worker).
        transform: applied to x on every access after the cache (augmentation differs per epoch).
    """

    def __init__(
        self,
        cohort: Cohort,
        indices: Sequence[int] | np.ndarray | None = None,
        cache: bool = True,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.cohort = cohort
        self.indices = np.arange(len(cohort)) if indices is None else np.asarray(indices, dtype=np.int64)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= len(cohort)):
            bad = f"{self.indices.min()}..{self.indices.max()}"
            raise IndexError(f"row indices must be in [0, {len(cohort)}), got {bad}")
        self.cache = cache
        self.transform = transform
        self._clinical = torch.from_numpy(cohort.clinical())
        self._volumes: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def volume(self, row: int) -> torch.Tensor:
        """[1,S,S,S] float32 of cohort row `row` (cached when enabled)."""
        x = self._volumes.get(row)
        if x is None:
            table = self.cohort.table
            label = f"{table['csv_row'].iat[row]} (subject {table['subject_id'].iat[row]})"
            x = torch.from_numpy(read_volume(self.cohort.image_path(row), row=label))[None]
            if self.cache:
                self._volumes[row] = x
        return x

    def __getitem__(self, item: int) -> dict[str, torch.Tensor | int]:
        row = int(self.indices[item])
        x = self.volume(row)
        if self.transform is not None:
            x = self.transform(x)
        return {"x": x, "c": self._clinical[row].clone(), "index": row}


def load_all(cohort: Cohort, indices: Sequence[int] | np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All volumes and clinical vectors of `indices` at once: (x [N,1,S,S,S], c [N,7]); for small cohorts."""
    dataset = VolumeDataset(cohort, indices, cache=False)
    if len(dataset) == 0:
        raise ValueError("no rows to load")
    volumes = []
    for item in range(len(dataset)):
        x = dataset.volume(int(dataset.indices[item]))
        if volumes and x.shape != volumes[0].shape:
            row = int(dataset.indices[item])
            raise DataError(
                cohort.image_path(row),
                f"shape differs from the first volume's {tuple(volumes[0].shape[1:])}",
                row=int(cohort.table["csv_row"].iat[row]),
                column="image",
                value=tuple(x.shape[1:]),
            )
        volumes.append(x)
    c = dataset._clinical[torch.as_tensor(dataset.indices)]
    return torch.stack(volumes), c
