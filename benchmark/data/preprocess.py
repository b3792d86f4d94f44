"""Real-data preprocessing (paper §2.3, DESIGN §4): NIfTI scans -> a cohort folder of S³ z-scored volumes.

Per scan: load (nibabel) -> reorient to RAS (`as_closest_canonical`) -> optional brain mask (skull-stripping itself,
e.g. SynthStrip, happens outside this project) -> crop to the brain bounding box -> pad the box to a cube in mm, so
the anatomy is never stretched -> resample the cube to S³ with a third-order B-spline (torchio/SimpleITK, with
anti-aliasing when downsampling) -> clamp to the input range (B-splines overshoot) -> z-score inside the mask.
Resampling is done in world coordinates, so the result does not depend on the input's orientation, voxel size or
obliquity beyond interpolation error.

Intensity convention (shared with the synthetic cohort): mean and SD are taken inside the brain mask and applied to
the whole cube; outside the mask the value is the z-score of intensity 0, the skull-stripped background. A plain 0
background would sit in the middle of the grey-matter range (GM z ≈ -0.3), where neither a network nor the
intensity-class volumetry could tell brain from background.

Results are cached per (sha256 of the scan [and mask], S, options) in `out/.cache/<key>.npy`, written atomically,
so a crash leaves no partial file and a rerun redoes only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from benchmark.data.cohort import read_clinical
from benchmark.data.contract import ROI_NAMES
from benchmark.data.errors import DataError

PREPROCESS_VERSION = "1"
# Both the prepared and the synthetic cubes leave this fraction of the longest brain extent as margin, so that a
# brain never touches the cube border (B-spline ringing, random deformations of the synthetic cohort).
CUBE_MARGIN = 0.08


def cube_box(lo_mm: np.ndarray, hi_mm: np.ndarray, margin: float = CUBE_MARGIN) -> tuple[np.ndarray, float]:
    """The cube (lower world corner in mm, side in mm) centred on the box [lo, hi] that holds it with a margin."""
    lo_mm, hi_mm = np.asarray(lo_mm, dtype=np.float64), np.asarray(hi_mm, dtype=np.float64)
    side = float((hi_mm - lo_mm).max() * (1.0 + margin))
    return (lo_mm + hi_mm) / 2.0 - side / 2.0, side


def cube_affine(corner_mm: np.ndarray, side_mm: float, size: int) -> np.ndarray:
    """RAS affine (4x4) of an S³ grid of isotropic voxels filling the cube whose lower corner is `corner_mm`."""
    h = side_mm / size
    affine = np.diag([h, h, h, 1.0])
    affine[:3, 3] = np.asarray(corner_mm, dtype=np.float64) + h / 2.0
    return affine


def zscore_in_mask(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """z-score [S,S,S] with the mean/SD of the voxels in `mask`; outside the mask: the z-score of intensity 0."""
    values = x[mask].astype(np.float64)
    if values.size < 2:
        raise ValueError("brain mask is empty")
    mean, sd = values.mean(), values.std()
    if not np.isfinite(sd) or sd <= 1e-12 * max(1.0, abs(mean)):
        raise ValueError("intensity is constant inside the brain mask")
    out = ((x.astype(np.float64) - mean) / sd).astype(np.float32)
    out[~mask] = np.float32(-mean / sd)
    return out


def _load_canonical(path: Path, what: str) -> nib.Nifti1Image:
    """Load a 3-D NIfTI (a trailing singleton 4th axis is dropped) in RAS orientation, or raise DataError."""
    try:
        img = nib.load(str(path))
        shape = img.shape
    except Exception as exc:  # nibabel raises many types for a bad header
        raise DataError(path, f"cannot read {what}: {type(exc).__name__}: {exc}") from exc
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
        shape = img.shape
    if len(shape) != 3:
        raise DataError(path, f"{what} must be 3-D", column="shape", value=tuple(shape))
    try:
        return nib.as_closest_canonical(img)
    except Exception as exc:
        raise DataError(path, f"cannot reorient {what}: {type(exc).__name__}: {exc}") from exc


def _read_data(img: nib.Nifti1Image, path: Path, what: str) -> np.ndarray:
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # truncated or corrupt data (zlib.error, EOFError, OSError, ValueError)
        raise DataError(path, f"cannot read {what} data: {type(exc).__name__}: {exc}") from exc
    if not np.all(np.isfinite(data)):
        raise DataError(path, f"{what} contains NaN or infinite values")
    return data


def preprocess_volume(path: Path, size: int, mask_path: Path | None = None) -> np.ndarray:
    """One scan -> [S,S,S] float32, RAS, brain cube resampled with a cubic B-spline, z-scored in the brain.

    Args:
        path: NIfTI scan (skull-stripped, or with `mask_path`).
        size: output side S.
        mask_path: brain mask on the scan's voxel grid (> 0 = brain); without it, brain = intensity > 0.

    Raises:
        DataError: unreadable, non-3-D, empty or constant image, mask on another grid.
    """
    return preprocess_with_affine(path, size, mask_path)[0]


def preprocess_with_affine(path: Path, size: int, mask_path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`preprocess_volume` plus the RAS affine (4x4) of the output cube in the scan's world coordinates."""
    import torch
    import torchio as tio  # heavy (SimpleITK); only the preprocessing path needs it

    path = Path(path)
    img = _load_canonical(path, "image")
    data = _read_data(img, path, "image")
    if mask_path is not None:
        mask_img = _load_canonical(Path(mask_path), "mask")
        if mask_img.shape != img.shape or not np.allclose(mask_img.affine, img.affine, atol=1e-3):
            raise DataError(mask_path, "mask grid differs from the image grid", column="shape", value=mask_img.shape)
        mask = _read_data(mask_img, Path(mask_path), "mask") > 0
    else:
        mask = data > 0
    if not mask.any():
        raise DataError(mask_path or path, "brain mask is empty (no voxel > 0)")
    data = np.where(mask, data, np.float32(0.0))
    low, high = float(min(data.min(), 0.0)), float(data.max())

    idx = np.argwhere(mask)
    lo_vox, hi_vox = idx.min(0) - 0.5, idx.max(0) + 0.5  # voxel edges, not centres
    corners = np.array([[(lo_vox, hi_vox)[b][i] for i, b in enumerate(bits)] for bits in np.ndindex(2, 2, 2)])
    world = nib.affines.apply_affine(img.affine, corners)  # handles oblique affines too
    corner, side = cube_box(world.min(0), world.max(0))
    target = ((size, size, size), cube_affine(corner, side, size))

    affine = np.asarray(img.affine, dtype=np.float64)
    image = tio.ScalarImage(tensor=torch.from_numpy(data[None]), affine=affine)
    brain = tio.ScalarImage(tensor=torch.from_numpy(mask[None].astype(np.float32)), affine=affine)
    resampled = tio.Resample(target, image_interpolation="bspline", antialias=True)(image).data[0].numpy()
    brain_out = tio.Resample(target, image_interpolation="linear", antialias=True)(brain).data[0].numpy() > 0.5
    if not brain_out.any():
        raise DataError(path, f"brain is smaller than one voxel at size {size}")
    resampled = np.clip(resampled, low, high)
    try:
        return zscore_in_mask(resampled, brain_out), target[1]
    except ValueError as exc:
        raise DataError(path, str(exc)) from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(path: Path, size: int, mask_path: Path | None = None) -> str:
    """Cache key of one preprocessed scan: content hashes (not paths), size and the preprocessing options."""
    options = {
        "image": _sha256(path),
        "mask": _sha256(mask_path) if mask_path is not None else None,
        "size": size,
        "version": PREPROCESS_VERSION,
        "margin": CUBE_MARGIN,
        "interpolation": "bspline3+antialias",
    }
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:32]


def _atomic_save_npy(array: np.ndarray, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_nifti_atomic(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write an uncompressed NIfTI (RAS affine as qform and sform) via a temporary file and os.replace."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.nii", dir=path.parent)
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_preprocess(
    path: Path, size: int, cache_dir: Path, mask_path: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`preprocess_with_affine` through the content-addressed cache in `cache_dir`.

    An entry is `<key>.npy` (the volume) plus `<key>.affine.npy`; the volume is written last, each file atomically,
    so the presence of `<key>.npy` means a complete entry.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        key = cache_key(path, size, mask_path)
    except OSError as exc:
        raise DataError(path, f"cannot read file: {exc}") from exc
    cached, cached_affine = cache_dir / f"{key}.npy", cache_dir / f"{key}.affine.npy"
    if cached.is_file() and cached_affine.is_file():
        try:
            return np.load(cached), np.load(cached_affine)
        except Exception:  # an unreadable cache entry is recomputed, never trusted
            cached.unlink(missing_ok=True)
    array, affine = preprocess_with_affine(path, size, mask_path)
    _atomic_save_npy(affine, cached_affine)
    _atomic_save_npy(array, cached)
    return array, affine


def _init_worker() -> None:
    """One thread per worker process: the pool already uses every core."""
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


@dataclass(frozen=True)
class PrepTask:
    """One CSV row to preprocess: what a worker process needs (picklable, no open files)."""

    position: int  # row index in the validated table (orders results and errors as in the CSV)
    row_label: str  # "<csv row> (subject <id>)", for error messages
    src: Path
    mask: Path | None
    size: int
    cache_dir: Path
    dest: Path  # output NIfTI


def _prepare_one(task: PrepTask) -> int:
    """Worker: preprocess one row (through the cache) and write its output NIfTI. Errors name the CSV row."""
    try:
        result = cached_preprocess(task.src, task.size, task.cache_dir, task.mask)
    except DataError as exc:
        if exc.reason is None:  # a message-only DataError: keep its text, add the row
            raise DataError(task.src, exc.file, row=task.row_label, column="image") from None
        raise DataError(exc.file, exc.reason, row=task.row_label, column=exc.column or "image",
                        value=exc.value) from None
    except Exception as exc:  # anything unexpected still names the file and row, on one line
        reason = f"preprocessing failed: {type(exc).__name__}: {exc}"
        raise DataError(task.src, reason, row=task.row_label, column="image") from None
    array, affine = result
    save_nifti_atomic(array, affine, task.dest)
    return task.position


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()) or "x"


def _plan_tasks(csv: Path, table: pd.DataFrame, images: Path, out: Path, size: int, mask_dir: Path | None,
                cache_dir: Path, skip_bad: bool, skipped: list[str]) -> list[PrepTask]:
    """One task per usable row, with a unique output name per (subject, scan); a missing mask is a row error."""
    names: set[str] = set()
    scan_count: dict[str, int] = {}
    tasks = []
    for position, row in enumerate(table.itertuples(index=False)):
        row_label = f"{row.csv_row} (subject {row.subject_id})"
        mask = None
        if mask_dir is not None:
            mask = Path(mask_dir) / Path(row.image).name
            if not mask.is_file():
                error = DataError(csv, f"mask not found: {mask}", row=row_label, column="image", value=row.image)
                if not skip_bad:
                    raise error
                skipped.append(str(error))
                continue
        scan = getattr(row, "scan_id", "")
        if not isinstance(scan, str) or not scan.strip():
            scan = str(scan_count.get(row.subject_id, 0))
        scan_count[row.subject_id] = scan_count.get(row.subject_id, 0) + 1
        name = f"{_safe(row.subject_id)}_{_safe(scan)}"
        if name in names:
            name = f"{name}_r{row.csv_row}"
        names.add(name)
        tasks.append(PrepTask(position, row_label, images / row.image, mask, size, cache_dir,
                              out / "images" / f"{name}.nii"))
    return tasks


def _run_tasks(tasks: list[PrepTask], workers: int, skip_bad: bool, progress: bool, desc: str
               ) -> tuple[dict[int, str], dict[int, DataError]]:
    """Run the tasks (in-process or in a pool); returns ({position: output path}, {position: row error}). Without
    ``skip_bad`` it stops at the first row error (pending tasks are cancelled)."""
    from tqdm.auto import tqdm

    done: dict[int, str] = {}
    errors: dict[int, DataError] = {}
    bar = tqdm(total=len(tasks), desc=desc, unit="scan", disable=not progress)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                try:
                    done[_prepare_one(task)] = str(task.dest)
                except DataError as exc:
                    errors[task.position] = exc
                    if not skip_bad:
                        break
                bar.update()
            return done, errors
        with ProcessPoolExecutor(workers, initializer=_init_worker) as pool:
            futures = {pool.submit(_prepare_one, task): task for task in tasks}
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in finished:
                    task = futures[future]
                    exc = future.exception()
                    if exc is None:
                        done[task.position] = str(task.dest)
                    elif isinstance(exc, DataError):
                        errors[task.position] = exc
                    else:
                        raise exc
                    bar.update()
                if errors and not skip_bad:
                    for future in pending:
                        future.cancel()
                    break
    finally:
        bar.close()
    return done, errors


def prepare_cohort(
    csv: Path,
    images: Path,
    out: Path,
    size: int,
    mask_dir: Path | None = None,
    workers: int = 2,
    skip_bad: bool = False,
    progress: bool = True,
) -> Path:
    """Preprocess a real cohort into a cohort folder (same format as the synthetic one).

    Args:
        csv: clinical CSV (DESIGN §4 columns; `image` relative to `images`; ratios or volumes + whole_brain).
        images: folder the `image` paths are relative to.
        out: output cohort folder (`clinical.csv`, `images/<subject>_<scan>.nii`, `cohort.json`, `.cache/`).
        size: output side S.
        mask_dir: optional folder of brain masks, same file names as the images.
        workers: processes.
        skip_bad: drop bad rows instead of raising; their messages go to `cohort.json` ("skipped").
        progress: show a tqdm bar.

    Returns:
        `out`.

    Raises:
        DataError: the first bad row (by CSV order) when not `skip_bad`.
    """
    csv, images, out = Path(csv), Path(images), Path(out)
    table, skipped = read_clinical(csv, images, skip_bad=skip_bad, check_images=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    cache_dir = out / ".cache"
    cache_dir.mkdir(exist_ok=True)

    tasks = _plan_tasks(csv, table, images, out, size, mask_dir, cache_dir, skip_bad, skipped)
    done, errors = _run_tasks(tasks, workers, skip_bad, progress, desc=f"prepare {size}³")
    if errors and not skip_bad:
        raise errors[min(errors)]
    skipped.extend(str(errors[k]) for k in sorted(errors))

    keep = sorted(done)
    result = table.iloc[keep].copy()
    result["image"] = [os.path.relpath(done[k], out) for k in keep]
    if result.empty:
        raise DataError(csv, "no usable rows left after preprocessing")
    _write_table(result, out / "clinical.csv")
    meta = {
        "kind": "prepared",
        "source": f"prepared:size={size},csv={csv.resolve()}",
        "size": size,
        "n": len(result),
        "version": PREPROCESS_VERSION,
        "mask_dir": str(Path(mask_dir).resolve()) if mask_dir is not None else None,
        "skipped": skipped,
    }
    _atomic_text(json.dumps(meta, indent=2) + "\n", out / "cohort.json")
    return out


def _write_table(table: pd.DataFrame, path: Path) -> None:
    columns = [c for c in table.columns if c not in ("csv_row", "label", "label_map")]
    ordered = ["subject_id", *(["scan_id"] if "scan_id" in columns else []), "image", "diagnosis", *ROI_NAMES]
    ordered += [c for c in columns if c not in ordered]
    _atomic_text(table[ordered].to_csv(index=False), path)


def _atomic_text(text: str, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
