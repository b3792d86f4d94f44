"""Downstream utility of a generator (issue #10): do its volumes help, or replace, real data for AD/CN?

The paper motivates conditional generation by augmentation and privacy-safe sharing but never measures either.
Three arms, each a fresh classifier of the heads' architecture (separable 3-D ResNet-18 at ``heads.width``) trained
from scratch with the same budget: ``utility.epochs`` x (real training-set size) volumes, the heads' batch size,
optimizer and learning rate, class-weighted cross-entropy. Balanced accuracy on the real test split, mean ± std over
``utility.seeds`` classifier seeds:

- ``real``: the real training split (independent of the generator: trained once per suite run);
- ``real+synthetic``: the real training split plus ``utility.n_synthetic`` generated volumes;
- ``synthetic``: the generated volumes only.

Labels of generated volumes: a conditional generator is asked for half CN, half AD, with the other six coordinates
drawn from the diffusion prior given that label (label-balanced prior vectors), and the requested label is used;
an unconditional generator's volumes are labelled by the frozen classifier. No model selection on real data:
every arm trains for exactly its budget, so the synthetic-only arm never sees a real volume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from benchmark.config import Config
from benchmark.data.contract import LABEL_INDEX
from metrics.clinical import balanced_accuracy

ARMS = ("real", "real+synthetic", "synthetic")
METRIC_KEYS = {"real": "utility_real_bac", "real+synthetic": "utility_mixed_bac", "synthetic": "utility_synth_bac"}
LABELS_REQUESTED = "requested (label-balanced prior vectors)"
LABELS_CLASSIFIER = "frozen classifier"


@dataclass
class SyntheticSet:
    x: Tensor  # [N, 1, S, S, S] on CPU
    labels: Tensor  # [N] long, 0 = CN, 1 = AD
    label_source: str


@torch.no_grad()
def synthetic_set(method: Any, prior: Any, heads: Any, n: int, *, seed: int, batch_size: int,
                  device: torch.device | str = "cpu") -> SyntheticSet:
    """``n`` generated volumes with labels (see the module docstring for where the labels come from)."""
    gen = torch.Generator().manual_seed(seed)
    method.eval()
    chunks = []
    if method.conditional:
        n_ad = n // 2
        c = torch.cat([prior.sample(n - n_ad, fixed={LABEL_INDEX: 0.0}, generator=gen),
                       prior.sample(n_ad, fixed={LABEL_INDEX: 1.0}, generator=gen)]).float()
        for cb in c.split(batch_size):
            chunks.append(method.sample(len(cb), cb.to(device), generator=gen).float().cpu())
        return SyntheticSet(torch.cat(chunks), c[:, LABEL_INDEX].round().long(), LABELS_REQUESTED)
    labels = []
    for start in range(0, n, batch_size):
        x = method.sample(min(batch_size, n - start), None, generator=gen).float()
        labels.append(heads.logits(x.to(device)).argmax(dim=1).cpu())
        chunks.append(x.cpu())
    return SyntheticSet(torch.cat(chunks), torch.cat(labels), LABELS_CLASSIFIER)


def train_classifier(x: Tensor, y: Tensor, *, volumes: int, batch_size: int, lr: float, width: int, seed: int,
                     grad_clip: float = 5.0, device: torch.device | str = "cpu", progress: bool = False) -> Any:
    """A fresh separable ResNet-18 classifier trained for exactly ``volumes`` volumes; returned in eval mode.

    Class-weighted cross-entropy (weights inverse to class frequency), so an arm whose synthetic labels are
    unbalanced is not judged on its class prior; BatchNorm statistics re-estimated on ``x`` at the end.
    """
    from models.heads import ResNet18Sep3d, recalibrate_batchnorm

    if batch_size < 2:
        raise ValueError("utility classifiers need batch_size >= 2 (BatchNorm at the 1^3 last stage)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ResNet18Sep3d(width, 2).to(device)
    counts = torch.bincount(y, minlength=2).double()
    weight = (len(y) / (2 * counts.clamp_min(1))).float().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.5, 0.999))
    gen = torch.Generator().manual_seed(seed)
    steps = math.ceil(volumes / batch_size)
    order = torch.cat([torch.randperm(len(x), generator=gen)
                       for _ in range(math.ceil(steps * batch_size / len(x)))])
    net.train()
    for step in tqdm(range(steps), desc="utility classifier", disable=not progress, leave=False):
        idx = order[step * batch_size : (step + 1) * batch_size]
        loss = F.cross_entropy(net(x[idx].to(device)), y[idx].to(device), weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        opt.step()
    recalibrate_batchnorm(net, x, batch_size)
    return net.eval()


@torch.no_grad()
def balanced_accuracy_on(net: Any, x: Tensor, y: Tensor, batch_size: int) -> float:
    device = next(net.parameters()).device
    pred = torch.cat([net(xb.to(device)).argmax(dim=1).cpu() for xb in x.split(batch_size)])
    return balanced_accuracy(y.numpy(), pred.numpy())


def _labels(c: Tensor) -> Tensor:
    return c[:, LABEL_INDEX].round().long()


def arm_scores(cfg: Config, bundle: Any, arms: tuple[str, ...], synth: SyntheticSet | None = None,
               device: torch.device | str = "cpu", progress: bool = False) -> dict[str, list[float]]:
    """Test balanced accuracy per arm and classifier seed (seeds cfg.train.seed * 1000 + 0, 1, ...)."""
    x_tr, c_tr = bundle.tensors("train")
    x_te, c_te = bundle.tensors("test")
    y_tr, y_te = _labels(c_tr), _labels(c_te)
    budget = cfg.utility.epochs * len(x_tr)
    data = {"real": (x_tr, y_tr)}
    if synth is not None:
        data["synthetic"] = (synth.x, synth.labels)
        data["real+synthetic"] = (torch.cat([x_tr, synth.x]), torch.cat([y_tr, synth.labels]))
    out: dict[str, list[float]] = {arm: [] for arm in arms}
    for arm in arms:
        x, y = data[arm]
        for s in range(cfg.utility.seeds):
            net = train_classifier(x, y, volumes=budget, batch_size=cfg.heads.batch_size, lr=cfg.heads.lr,
                                   width=cfg.heads.width, grad_clip=cfg.heads.grad_clip,
                                   seed=cfg.train.seed * 1000 + s, device=device, progress=progress)
            out[arm].append(balanced_accuracy_on(net, x_te, y_te, cfg.eval.batch_size))
    return out


def summarize(scores: dict[str, list[float]]) -> dict[str, float]:
    """``utility_<arm>_bac`` (mean) and ``..._std`` (over classifier seeds; 0 for one seed)."""
    out: dict[str, float] = {}
    for arm, values in scores.items():
        arr = np.asarray(values, dtype=np.float64)
        out[METRIC_KEYS[arm]] = float(arr.mean())
        out[f"{METRIC_KEYS[arm]}_std"] = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return out
