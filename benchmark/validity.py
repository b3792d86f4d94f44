"""The `validity` suite: what a difference in each metric means on this data (issue #14).

Held-out real volumes (the validation split: subjects neither trained on nor in the test split) are degraded in
graded, known ways, three levels per family, and scored by the evaluation protocol exactly as a generated set
would be (against the test split). A metric is worth reading only if it moves with the damage: FID should rise
strictly with every family's level, mode collapse should score well above the real-vs-real floor (level 0),
memorised training copies should be flagged by ``nn_ratio``. The table (also ``validity.csv`` on the suite's parent
run) and one figure (metric vs level, one panel per family) show a user what 10 FID points mean on their data.

Families: MR artefacts from torchio (blur, noise, bias field, motion, ghosting, spike, elastic deformation),
slab shuffling, intensity scaling, mode collapse (fewer distinct subjects), memorised training copies (a growing
fraction replaced by training subjects), label shift (AD subjects replaced by CN ones). Artefacts act on
physical intensity, i.e. on ``x - background`` (volumes hold the z-score of intensity 0 outside the brain), so a
bias field or a scaling leaves the background where it is.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmark.config import Config

LEVELS = (1, 2, 3)
VALIDITY_METRICS = ("fid_resnet18", "fid_resnet18anat", "fid_resnet18sep", "ssim_nn", "lpips_nn", "bac", "roi_mse",
                    "nn_ratio")


@dataclass(frozen=True)
class Corruption:
    """A family: ``apply(x [N,1,S,S,S], c [N,7], level, context) -> (x', c')`` for levels 1..3 (0 = clean)."""

    family: str
    apply: Callable[..., tuple[Tensor, Tensor]]
    levels: tuple[str, str, str]  # what each level means, for the table


def _background(x: Tensor) -> Tensor:
    """Per-volume background value [N,1,1,1,1] (the border median, as :func:`metrics.triplanar.background_value`)."""
    from metrics.triplanar import background_value

    return torch.tensor([background_value(v) for v in x], dtype=x.dtype).view(-1, 1, 1, 1, 1)


def _torchio(make: Callable[[int], Any]) -> Callable[..., tuple[Tensor, Tensor]]:
    """A torchio transform per level, applied volume by volume on physical intensity (x - background)."""
    import torchio as tio

    def apply(x: Tensor, c: Tensor, level: int, ctx: dict[str, Any]) -> tuple[Tensor, Tensor]:
        transform = make(level)
        bg = _background(x)
        out = []
        for v, b in zip(x - bg, bg, strict=True):
            image = tio.ScalarImage(tensor=v.float(), affine=np.eye(4))
            out.append(transform(image).data.float() + b[0])
        return torch.stack(out).to(x.dtype), c

    return apply


def _noise(level: int) -> Any:
    import torchio as tio

    s = (0.1, 0.25, 0.5)[level - 1]
    return tio.RandomNoise(std=(s, s))


def _slab_shuffle(x: Tensor, c: Tensor, level: int, ctx: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Cut each volume into 8 axial slabs and swap 1, 2 or 4 random pairs of neighbouring slabs."""
    k, swaps = 8, (1, 2, 4)[level - 1]
    gen = ctx["generator"]
    edges = np.linspace(0, x.shape[2], k + 1).round().astype(int)
    out = x.clone()
    for i in range(len(x)):
        order = list(range(k))
        for j in torch.randperm(k // 2, generator=gen)[:swaps].tolist():
            order[2 * j], order[2 * j + 1] = order[2 * j + 1], order[2 * j]
        out[i] = torch.cat([x[i, :, edges[j] : edges[j + 1]] for j in order], dim=1)
    return out, c


def _scale(x: Tensor, c: Tensor, level: int, ctx: dict[str, Any]) -> tuple[Tensor, Tensor]:
    s = (0.95, 0.85, 0.7)[level - 1]
    bg = _background(x)
    return (x - bg) * s + bg, c


def _mode_collapse(x: Tensor, c: Tensor, level: int, ctx: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Only n/4, n/16 or 1 distinct subjects, repeated to n."""
    n = len(x)
    distinct = max(1, (n // 4, n // 16, 1)[level - 1])
    idx = torch.arange(n) % distinct
    return x[idx].clone(), c[idx].clone()


def _memorised(x: Tensor, c: Tensor, level: int, ctx: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """A third, two thirds, or all of the set replaced by training subjects (exact copies)."""
    train_x, train_c = ctx["train"]
    n = len(x)
    k = round(n * level / 3)
    pick = torch.randperm(len(train_x), generator=ctx["generator"])[:k]
    pick = pick.repeat(-(-k // max(len(pick), 1)))[:k]
    out_x, out_c = x.clone(), c.clone()
    out_x[:k], out_c[:k] = train_x[pick], train_c[pick]
    return out_x, out_c


def _label_shift(x: Tensor, c: Tensor, level: int, ctx: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """A third, two thirds, or all of the AD subjects replaced by CN subjects of the same split (all CN at 3)."""
    ad = torch.nonzero(c[:, 6] > 0.5).flatten()
    cn = torch.nonzero(c[:, 6] <= 0.5).flatten()
    if len(ad) == 0 or len(cn) == 0:
        return x, c
    k = round(len(ad) * level / 3)
    replace = ad[:k]
    donors = cn[torch.randint(len(cn), (k,), generator=ctx["generator"])]
    out_x, out_c = x.clone(), c.clone()
    out_x[replace], out_c[replace] = x[donors], c[donors]
    return out_x, out_c


def corruptions() -> list[Corruption]:
    import torchio as tio

    def blur(level: int) -> Any:
        s = (0.5, 1.0, 2.0)[level - 1]
        return tio.RandomBlur(std=(s, s))

    def bias(level: int) -> Any:
        # order 1, every coefficient k: a linear log-field of k(1 + x + y + z) over [-1, 1]^3 (x0.67..2.2 at level 3)
        k = (0.05, 0.1, 0.2)[level - 1]
        return tio.RandomBiasField(coefficients=(k, k), order=1)

    def motion(level: int) -> Any:
        # translations stay well inside the field of view: torchio simulates motion in k-space, where a shift is
        # circular, so 8 and 16 voxels on a 32-voxel grid made level 3 *weaker* than level 1 (measured)
        d, t = ((2, 1), (4, 2), (8, 4))[level - 1]
        return tio.RandomMotion(degrees=(d, d), translation=(t, t), num_transforms=2)

    def ghosting(level: int) -> Any:
        i = (0.3, 0.6, 1.0)[level - 1]
        return tio.RandomGhosting(num_ghosts=(4, 4), intensity=(i, i))

    def spike(level: int) -> Any:
        i = (0.2, 0.5, 1.0)[level - 1]
        return tio.RandomSpike(num_spikes=(1, 1), intensity=(i, i))

    def elastic(level: int) -> Any:
        d = (1.0, 2.0, 4.0)[level - 1]
        return tio.RandomElasticDeformation(num_control_points=7, max_displacement=(d, d, d))

    return [
        Corruption("blur", _torchio(blur), ("sigma 0.5", "sigma 1", "sigma 2")),
        Corruption("noise", _torchio(_noise), ("sd 0.1", "sd 0.25", "sd 0.5")),
        Corruption("bias_field", _torchio(bias), ("coef 0.05", "coef 0.1", "coef 0.2")),
        Corruption("motion", _torchio(motion), ("2 deg/1 voxel", "4/2", "8/4")),
        Corruption("ghosting", _torchio(ghosting), ("intensity 0.3", "0.6", "1.0")),
        Corruption("spike", _torchio(spike), ("intensity 0.2", "0.5", "1.0")),
        Corruption("elastic", _torchio(elastic), ("1 mm", "2 mm", "4 mm")),
        Corruption("slab_shuffle", _slab_shuffle, ("1 of 8 slab pairs swapped", "2", "4")),
        Corruption("intensity_scale", _scale, ("x0.95", "x0.85", "x0.7")),
        Corruption("mode_collapse", _mode_collapse, ("n/4 subjects", "n/16", "1 subject")),
        Corruption("memorised", _memorised, ("1/3 train copies", "2/3", "all")),
        Corruption("label_shift", _label_shift, ("1/3 AD -> CN", "2/3", "all CN")),
    ]


class _Scorer:
    """Scores a set of volumes by the evaluation protocol against the test split, sharing features and stats."""

    def __init__(self, cfg: Config, stages: Any) -> None:
        from benchmark.evaluation import EvalContext

        self.cfg = cfg
        self.ctx = EvalContext(cfg, None, stages)
        self.test_x, _ = self.ctx.test()
        self.train_x, _ = stages.bundle.tensors("train")
        self._feats: dict[str, Tensor] = {}

    def features(self, extractor: str, x: Tensor) -> Tensor:
        from benchmark.evaluation import features

        return features(self.ctx, x, extractor)

    def _cached(self, key: str, extractor: str, x: Tensor) -> Tensor:
        if key not in self._feats:
            self._feats[key] = self.features(extractor, x)
        return self._feats[key]

    def score(self, x: Tensor, c: Tensor) -> dict[str, float]:
        from benchmark.evaluation import _head_predictions
        from metrics.clinical import balanced_accuracy, roi_mse
        from metrics.errors import MetricUnavailable
        from metrics.fid import FeatureStats, fid_from_stats
        from metrics.lpips import lpips_triplanar
        from metrics.memorization import nn_ratio
        from metrics.ssim import ssim_triplanar

        out: dict[str, float] = {}
        feats = {}
        for name in ("resnet18", "resnet18anat", "resnet18sep"):
            feats[name] = self.features(name, x)
            stats = FeatureStats().update(feats[name].numpy())
            out[f"fid_{name}"] = float(fid_from_stats(stats, self.ctx.real_stats("test", name)))
        f_test = self._cached("test", "resnet18", self.test_x)
        f_train = self._cached("train", "resnet18", self.train_x)
        nearest = torch.cdist(f_test, feats["resnet18"]).argmin(dim=1)
        paired = x[nearest].float()
        out["ssim_nn"] = float(ssim_triplanar(self.test_x, paired, n=self.cfg.eval.n_slices).mean())
        try:
            out["lpips_nn"] = float(lpips_triplanar(self.test_x, paired, net=self.cfg.eval.lpips_net,
                                                    n=self.cfg.eval.n_slices,
                                                    backbone=self.cfg.eval.lpips_backbone).mean())
        except MetricUnavailable:
            out["lpips_nn"] = float("nan")
        labels, ratios = _head_predictions(self.ctx, x)
        raw = np.asarray(self.ctx.bundle.normalizer.inverse(c))
        out["bac"] = float(balanced_accuracy(raw[:, 6].round().astype(int), labels))
        out["roi_mse"] = float(roi_mse(ratios, raw[:, :6]))
        out["nn_ratio"] = float(np.median(nn_ratio(feats["resnet18"], f_train, f_test)))
        return out


def run_validity(cfg: Config, stages: Any, progress: bool = True) -> list[dict[str, Any]]:
    """Every family x level (and the clean set as level 0): one row of metric values each."""
    from tqdm.auto import tqdm

    scorer = _Scorer(cfg, stages)
    x, c = stages.bundle.tensors("val")
    train = stages.bundle.tensors("train")
    rows: list[dict[str, Any]] = [{"family": "clean", "level": 0, "what": "validation split",
                                   **scorer.score(x, c)}]
    families = corruptions()
    bar = tqdm(total=len(families) * len(LEVELS), desc="validity", disable=not progress, leave=False)
    for family in families:
        for level in LEVELS:
            # common random numbers: every level of a family draws the same randomness (motion times, elastic
            # control points, noise field, which subjects), so levels differ only in dose, not in luck
            gen = torch.Generator().manual_seed(cfg.train.seed * 1009)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.train.seed * 1009)
                xc, cc = family.apply(x, c, level, {"generator": gen, "train": train})
            rows.append({"family": family.family, "level": level, "what": family.levels[level - 1],
                         **scorer.score(xc, cc)})
            bar.update(1)
    bar.close()
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["family", "level", "what", *VALIDITY_METRICS])
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def to_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Flat parent-run metrics ``validity.<family>.<level>.<metric>``: the report rebuilds the table from these."""
    return {f"validity.{r['family']}.{r['level']}.{m}": float(r[m]) for r in rows for m in VALIDITY_METRICS
            if m in r and np.isfinite(r[m])}


def from_metrics(metrics: dict[str, float]) -> list[dict[str, Any]]:
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for key, value in metrics.items():
        if not key.startswith("validity."):
            continue
        _, family, level, metric = key.split(".", 3)
        rows.setdefault((family, int(level)), {"family": family, "level": int(level)})[metric] = value
    order = ["clean"] + [f.family for f in corruptions()]
    return sorted(rows.values(), key=lambda r: (order.index(r["family"]) if r["family"] in order else 99,
                                                r["level"]))


def plot(rows: list[dict[str, Any]], out: Path) -> Path:
    """Metric vs level, one panel per family; lines: both FIDs (left axis, relative to the clean floor)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean = next(r for r in rows if r["family"] == "clean")
    families = [f for f in dict.fromkeys(r["family"] for r in rows) if f != "clean"]
    cols = 4
    fig, axes = plt.subplots(-(-len(families) // cols), cols, figsize=(4 * cols, 3 * -(-len(families) // cols)),
                             squeeze=False)
    for ax, family in zip(axes.flat, families, strict=False):
        pts = [clean] + [r for r in rows if r["family"] == family]
        levels = [r["level"] for r in pts]
        for metric, style, color in (("fid_resnet18", "-o", "tab:blue"), ("fid_resnet18anat", "-.D", "tab:orange"),
                                     ("fid_resnet18sep", "--s", "tab:purple")):
            ax.plot(levels, [r[metric] / max(clean[metric], 1e-9) for r in pts], style, color=color, ms=4,
                    label=metric)
        ax.set_title(family)
        ax.set_xticks(list(range(4)))
        ax.set_xlabel("level")
        ax.set_ylabel("FID / floor")
        ax.set_yscale("log")
        twin = ax.twinx()
        twin.plot(levels, [r["ssim_nn"] for r in pts], ":^", color="tab:green", label="SSIM (NN)")
        twin.plot(levels, [r["nn_ratio"] for r in pts], ":v", color="tab:red", label="nn_ratio")
        twin.set_ylim(0, max(1.5, max(r["nn_ratio"] for r in pts) * 1.1))
    for ax in list(axes.flat)[len(families):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    twin_handles, twin_labels = twin.get_legend_handles_labels()
    fig.legend(handles + twin_handles, labels + [f"{t} (right axis)" for t in twin_labels], loc="lower center",
               ncol=5, fontsize=9)
    fig.suptitle("Validity: metric vs corruption level (validation split vs test split; level 0 = clean floor); "
                 "right axis: SSIM (NN) green, nn_ratio red")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
