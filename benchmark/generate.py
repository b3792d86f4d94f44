"""``python -m benchmark generate``: synthetic T1 volumes for clinical vectors of the user's choice (Algorithm 3).

Manual mode (all seven values given), partial mode (the rest drawn from the diffusion prior conditioned on the
given ones, by inpainting) and stochastic mode (all drawn). Writes NIfTI volumes in the preprocessed RAS space,
a tri-planar PNG preview per volume and a CSV of the clinical vectors used.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmark.data.contract import DIAGNOSES, LABEL_INDEX, ROI_NAMES

if TYPE_CHECKING:
    from torch import Tensor
# torch is imported where it is used: the CLI builds its parser from this module, and `--help`, `--dry-run` and
# one-line input errors should not wait for torch to load.

EXTRAPOLATION_STDS = 4.0  # a requested ratio further than this from the training mean needs --allow-extrapolation


def add_arguments(p: argparse.ArgumentParser) -> None:
    from benchmark.cli import int_at_least

    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", type=Path, help="a run folder, weights.pt or checkpoint.pt")
    g.add_argument("--run-id", help="an MLflow run id (its weights artifact)")
    p.add_argument("--n", type=int_at_least(1), default=8)
    p.add_argument("--label", default=None, help="CN or AD (default: drawn from the prior)")
    for name in ROI_NAMES:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=float, default=None,
                       help=f"{name} as a fraction of whole-brain volume")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"], help="diffusion prior sampler")
    p.add_argument("--allow-extrapolation", action="store_true",
                   help=f"accept ratios more than {EXTRAPOLATION_STDS:g} training SDs from the training mean")


def write_nifti(volume: Tensor | np.ndarray, path: Path, affine: np.ndarray | None = None) -> Path:
    """float32 NIfTI, written atomically; ``affine`` defaults to 1 mm RAS voxels centred on the volume."""
    import nibabel as nib
    import torch

    arr = np.asarray(volume.detach().cpu() if isinstance(volume, torch.Tensor) else volume, dtype=np.float32)
    arr = arr.reshape(arr.shape[-3:])
    if affine is None:
        affine = np.eye(4)
        affine[:3, 3] = -np.asarray(arr.shape) / 2.0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    nib.save(nib.Nifti1Image(arr, affine), str(tmp))
    os.replace(tmp, path)
    return path


def requested_values(args: argparse.Namespace, train_raw: np.ndarray, allow_extrapolation: bool) -> dict[int, float]:
    """{coordinate: RAW value} of what the user fixed, validated against the training range."""
    from benchmark.errors import UsageError

    fixed: dict[int, float] = {}
    if args.label is not None:
        if args.label not in DIAGNOSES:
            raise UsageError(f"--label {args.label!r}: expected one of {', '.join(DIAGNOSES)}")
        fixed[LABEL_INDEX] = float(DIAGNOSES[args.label])
    mean, std = train_raw[:, :6].mean(axis=0), train_raw[:, :6].std(axis=0)
    for i, name in enumerate(ROI_NAMES):
        value = getattr(args, name)
        if value is None:
            continue
        if not np.isfinite(value) or value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} {value}: a ratio must be positive")
        z = (value - mean[i]) / std[i]
        if abs(z) > EXTRAPOLATION_STDS and not allow_extrapolation:
            raise UsageError(f"--{name.replace('_', '-')} {value}: {z:+.1f} SD from the training mean "
                             f"{mean[i]:.5f} (range {train_raw[:, i].min():.5f}-{train_raw[:, i].max():.5f}); "
                             "pass --allow-extrapolation to accept it")
        fixed[i] = float(value)
    return fixed


def clinical_vectors(n: int, fixed_raw: dict[int, float], normalizer: Any, prior: Any, seed: int,
                     sampler: str = "ddpm") -> tuple[Tensor, str]:
    """[n,7] standardised vectors and the mode used (manual / partial / stochastic)."""
    import torch

    raw = torch.zeros(1, 7)
    for i, v in fixed_raw.items():
        raw[0, i] = v
    std = normalizer.transform(raw)[0]
    fixed_std = {i: float(std[i]) if i != LABEL_INDEX else float(fixed_raw[i]) for i in fixed_raw}
    if len(fixed_raw) == 7:
        return torch.tensor([fixed_std[i] for i in range(7)]).repeat(n, 1), "manual"
    gen = torch.Generator().manual_seed(seed)
    c = prior.sample(n, fixed=fixed_std or None, generator=gen, sampler=sampler).float()
    return c, "partial" if fixed_raw else "stochastic"


def sample_volumes(method: Any, n: int, c: Tensor | None, seed: int, batch_size: int) -> Tensor:
    """``n`` volumes [n,1,S,S,S] on the CPU, drawn in chunks of ``batch_size`` from one generator seeded ``seed + 1``
    (``seed`` itself draws the prior's vectors); ``c`` [n,7] standardised for conditional methods. The logged pyfunc
    model (benchmark/generator_model.py) samples through this too, so both give the same volumes."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    chunks = list(c.split(batch_size)) if c is not None else [None] * len(sizes)
    return torch.cat([method.sample(k, chunk, generator=gen).cpu() for k, chunk in zip(sizes, chunks, strict=True)])


def generate_command(args: argparse.Namespace) -> int:
    from benchmark.errors import UsageError, check_writable_dir
    from benchmark.figures import triplanar_grid
    from benchmark.runner import load_trained

    if args.n < 1:
        raise UsageError("--n must be at least 1")
    check_writable_dir(args.out, "--out")  # before the (slow) model and stages are loaded
    checkpoint = args.checkpoint
    if args.run_id:
        from benchmark.tracking import check_store, download_artifact

        check_store()
        checkpoint = download_artifact(args.run_id, "weights/weights.pt")
    cfg, method, stages = load_trained(checkpoint)
    if not method.conditional and (args.label or any(getattr(args, n) is not None for n in ROI_NAMES)):
        raise UsageError(f"{cfg.method} is unconditional: it takes no clinical vector")
    train_raw = np.asarray(stages.bundle.raw_clinical("train"))
    fixed = requested_values(args, train_raw, args.allow_extrapolation)
    c, mode = clinical_vectors(args.n, fixed, stages.bundle.normalizer, stages.prior, args.seed, args.sampler)
    volumes = sample_volumes(method, len(c), c if method.conditional else None, args.seed, cfg.eval.batch_size)
    affine = _preprocessed_affine(stages.bundle)
    raw = np.asarray(stages.bundle.normalizer.inverse(c))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, vol in enumerate(volumes):
        name = f"gen_{i:04d}"
        write_nifti(vol, out / f"{name}.nii.gz", affine)
        triplanar_grid({name: vol}, out / f"{name}.png")
        label = int(round(raw[i, LABEL_INDEX]))
        rows.append([name, f"{name}.nii.gz", "AD" if label == 1 else "CN", *[f"{v:.8g}" for v in raw[i, :6]], mode])
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["subject_id", "image", "diagnosis", *ROI_NAMES, "mode"])
    writer.writerows(rows)
    tmp = out / f".clinical.csv.{os.getpid()}.tmp"
    tmp.write_text(buf.getvalue())
    os.replace(tmp, out / "clinical.csv")
    print(f"wrote {len(rows)} volumes ({mode} mode) to {out}")
    return 0


def _preprocessed_affine(bundle: Any) -> np.ndarray:
    import nibabel as nib

    first = bundle.cohort.root / bundle.cohort.table["image"].iloc[0]
    return np.asarray(nib.load(str(first)).affine)
