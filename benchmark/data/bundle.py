"""Everything a run needs from the data, resolved once: cohort, split, normaliser and datasets (DESIGN §4)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmark.config import Config
from benchmark.data.cohort import ClinicalNormalizer, Cohort, VolumeDataset, load_cohort
from benchmark.data.splits import Split, make_split


@dataclass
class DataBundle:
    cohort: Cohort
    split: Split
    normalizer: ClinicalNormalizer
    size: int

    @property
    def source(self) -> str:
        return self.cohort.source

    @property
    def fingerprint(self) -> str:
        return self.split.fingerprint

    def dataset(self, part: str) -> VolumeDataset:
        return self._datasets[part]

    @cached_property
    def _datasets(self) -> dict[str, VolumeDataset]:
        return {part: VolumeDataset(self.cohort, getattr(self.split, part)) for part in ("train", "val", "test")}

    def tensors(self, part: str) -> tuple[Tensor, Tensor]:
        """All volumes [N,1,S,S,S] and STANDARDISED clinical vectors [N,7] of a split (small cohorts, evaluation)."""
        ds = self.dataset(part)
        items = [ds[i] for i in range(len(ds))]
        x = torch.stack([it["x"] for it in items])
        c = torch.stack([it["c"] for it in items])
        return x, self.normalizer.transform(c)

    def raw_clinical(self, part: str) -> Tensor:
        return torch.as_tensor(self.cohort.clinical()[getattr(self.split, part)], dtype=torch.float32)

    def split_table(self) -> Any:
        """One row per scan of the cohort with its split and raw clinical vector (the run's MLflow dataset input)."""
        import pandas as pd

        from benchmark.data.contract import ROI_NAMES

        part = pd.Series("", index=self.cohort.table.index)
        for name in ("train", "val", "test"):
            part.iloc[getattr(self.split, name)] = name
        table = self.cohort.table[["subject_id", "diagnosis", *ROI_NAMES]].copy()
        table.insert(1, "split", part.to_numpy())
        return table[table["split"] != ""].reset_index(drop=True)

    @property
    def is_synthetic(self) -> bool:
        return self.cohort.source.startswith("synthetic")


def cohort_root(cfg: Config, progress: bool = True) -> Path:
    """The prepared cohort folder: ``data.path`` or the embedded synthetic cohort (created once, then reused)."""
    if cfg.data.path:
        root = Path(cfg.data.path)
        if not (root / "clinical.csv").is_file():
            from benchmark.data.errors import DataError

            raise DataError(f"{root}: not a cohort folder (no clinical.csv); prepare one with `data prepare`")
        return root
    from benchmark.data.synthetic import default_synthetic_cohort

    return default_synthetic_cohort(cfg.data.synth_n, cfg.data.size, cfg.data.synth_seed,
                                    Path(cfg.data.cache_dir) / "cohorts", progress=progress)


def load_bundle(cfg: Config, progress: bool = True) -> DataBundle:
    root = cohort_root(cfg, progress)
    cohort = load_cohort(root)
    split = make_split(cohort, seed=cfg.data.split_seed)
    train_c = cohort.clinical()[split.train]
    normalizer = ClinicalNormalizer.fit(train_c)
    size = _volume_size(cohort)
    if size != cfg.data.size:
        from benchmark.data.errors import DataError

        raise DataError(f"{root}: volumes are {size}^3 but data.size={cfg.data.size}; "
                        f"set --set data.size={size} or prepare the cohort at {cfg.data.size}")
    return DataBundle(cohort=cohort, split=split, normalizer=normalizer, size=size)


def _volume_size(cohort: Cohort) -> int:
    import nibabel as nib

    first = cohort.root / cohort.table["image"].iloc[0]
    shape = nib.load(str(first)).shape
    return int(shape[0])
