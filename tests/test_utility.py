"""Issue #10: the memorization metric tells copying from generalising; utility classifiers learn and are scored
with the real test split; the synthetic set carries the labels it should."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from benchmark.config import resolve
from benchmark.data.contract import LABEL_INDEX
from benchmark.evaluation import EvalContext, evaluate, memorization
from benchmark.runner import prepare_stages
from benchmark.utility import LABELS_CLASSIFIER, LABELS_REQUESTED, balanced_accuracy_on, synthetic_set, train_classifier
from metrics.extractors import FrozenBackboneExtractor


@pytest.fixture(scope="module")
def smoke_stages(tmp_path_factory: pytest.TempPathFactory, stage_cache):  # noqa: ANN001
    cfg = resolve("smoke", overrides={"data.cache_dir": str(stage_cache)})
    return cfg, prepare_stages(cfg, progress=False)


class CopyingGenerator(torch.nn.Module):
    """An unconditional 'generator' that returns noisy copies of a fixed set of real volumes."""

    conditional = False
    has_encoder = False

    def __init__(self, source: torch.Tensor, noise: float) -> None:
        super().__init__()
        self.source = source
        self.noise = noise
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def sample(self, n: int, c: torch.Tensor | None, generator: torch.Generator | None = None) -> torch.Tensor:
        idx = torch.randint(len(self.source), (n,), generator=generator)
        return self.source[idx] + self.noise * torch.randn(self.source[idx].shape, generator=generator)


def _memorization(cfg, stages, source: torch.Tensor) -> dict[str, float]:  # noqa: ANN001
    method = CopyingGenerator(source, noise=0.02 * float(source.std()))
    ctx = EvalContext(cfg, method, stages)
    # A fixed feature map (2x-pooled voxels) instead of the smoke heads (3 epochs, width 4), whose features are
    # too weak at 16^3 to tell subjects apart reliably: this tests the metric, not those heads.
    pooled = torch.nn.Sequential(torch.nn.AvgPool3d(2), torch.nn.Flatten())
    ctx._cache[("extractor", cfg.eval.fid_extractor)] = FrozenBackboneExtractor(pooled, "pooled_voxels")
    out = evaluate(ctx, ["nn_ratio"])
    assert "note.nn_ratio" in ctx.notes and len(memorization(ctx)["pairs"]) == 5
    return out


def test_nn_ratio_flags_a_generator_that_copies_training_subjects(smoke_stages) -> None:  # noqa: ANN001
    cfg, stages = smoke_stages
    train, _ = stages.bundle.tensors("train")
    test, _ = stages.bundle.tensors("test")
    copier = _memorization(cfg, stages, train)
    honest = _memorization(cfg, stages, test)  # "new" subjects: never seen in training
    for space in ("nn_ratio", "nn_ratio_ssim"):
        assert copier[f"{space}_median"] < 0.5 < honest[f"{space}_median"], (space, copier, honest)
        assert copier[f"{space}_frac_below"] >= 0.75 and honest[f"{space}_frac_below"] == 0.0
        assert copier[f"{space}_median"] < copier[f"{space}_ref_median"]  # worse than unseen real subjects
    # the reference (validation volumes) does not depend on the generator
    assert copier["nn_ratio_ref_median"] == honest["nn_ratio_ref_median"]


def test_classifier_learns_and_bac_matches_sklearn() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 1] * 12)
    x = torch.randn(24, 1, 16, 16, 16, generator=gen) * 0.3
    x[y == 1, :, 4:12, 4:12, 4:12] += 2.0  # AD = a bright cube in the middle
    net = train_classifier(x, y, volumes=24 * 20, batch_size=8, lr=1e-3, width=4, seed=0)
    x_te = torch.randn(20, 1, 16, 16, 16, generator=gen) * 0.3
    y_te = torch.tensor([0] * 14 + [1] * 6)
    x_te[y_te == 1, :, 4:12, 4:12, 4:12] += 2.0
    bac = balanced_accuracy_on(net, x_te, y_te, batch_size=8)
    with torch.no_grad():
        pred = net(x_te).argmax(dim=1).numpy()
    assert bac == pytest.approx(balanced_accuracy_score(y_te.numpy(), pred))
    assert bac >= 0.9
    # same seed, same data: the same classifier (a run is a pure function of its config and seed)
    again = train_classifier(x, y, volumes=24 * 20, batch_size=8, lr=1e-3, width=4, seed=0)
    for a, b in zip(net.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


class _Conditional(torch.nn.Module):
    conditional = True

    def sample(self, n: int, c: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, 1, 8, 8, 8, generator=generator) + c[:, LABEL_INDEX].view(n, 1, 1, 1, 1)


class _Unconditional(torch.nn.Module):
    conditional = False

    def sample(self, n: int, c: None, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, 1, 8, 8, 8, generator=generator)


class _MeanHeads:
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3, 4))
        return torch.stack([-m, m], dim=1)


def test_synthetic_set_labels(smoke_stages) -> None:  # noqa: ANN001
    _, stages = smoke_stages
    cond = synthetic_set(_Conditional(), stages.prior, None, 7, seed=0, batch_size=3)
    assert cond.label_source == LABELS_REQUESTED and cond.x.shape == (7, 1, 8, 8, 8)
    assert cond.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]  # label-balanced, the label each volume was asked for
    unc = synthetic_set(_Unconditional(), stages.prior, _MeanHeads(), 9, seed=0, batch_size=4)
    assert unc.label_source == LABELS_CLASSIFIER
    expected = (unc.x.mean(dim=(1, 2, 3, 4)) > 0).long()
    assert torch.equal(unc.labels, expected)
    assert np.isin(unc.labels.numpy(), [0, 1]).all()
