"""Reference rows, the validity suite's corruption directions, and the tables' significance marks / Kendall tau.

References are checked against values computed here from the data bundle (not through the code under test); the
validity directions on smoke stages (background -4.6, real cohort convention); the statistics against scipy on
hand-made run records.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from benchmark.config import resolve
from benchmark.runner import build_method, prepare_stages
from benchmark.tracking import RunRecord


@pytest.fixture(scope="module")
def smoke(stage_cache):  # noqa: ANN001
    cfg = resolve("smoke", overrides={"data.cache_dir": str(stage_cache)})
    return cfg, prepare_stages(cfg, progress=False)


def test_mean_volume_and_train_copy_are_what_they_say(smoke) -> None:  # noqa: ANN001
    cfg, stages = smoke
    x, c = stages.bundle.tensors("train")
    mean = build_method(resolve("smoke", "mean_volume"), stages.heads).fit(stages.bundle)
    out = mean.sample(3, c[:3])
    assert torch.allclose(out, x.mean(dim=0, keepdim=True).expand(3, -1, -1, -1, -1))
    copier = build_method(resolve("smoke", "train_copy"), stages.heads).fit(stages.bundle)
    # asking for a training subject's own vector returns that subject (exact memoriser)
    got = copier.sample(4, c[[5, 0, 7, 2]])
    for row, i in enumerate([5, 0, 7, 2]):
        assert torch.equal(got[row], x[i])
    real = build_method(resolve("smoke", "real"), stages.heads).fit(stages.bundle)
    drawn = real.sample(len(x), None, generator=torch.Generator().manual_seed(0))
    # without replacement while they last: every training volume exactly once
    flat = {tuple(v.flatten()[:64].tolist()) for v in drawn}
    assert len(flat) == len(x)
    assert not real.needs_training and real.param_groups() == {}


def test_medoid_is_the_training_subject_nearest_the_training_mean_for_every_request(smoke) -> None:  # noqa: ANN001
    cfg, stages = smoke
    x, c = stages.bundle.tensors("train")
    flat = x.double().numpy().reshape(len(x), -1)
    want = x[int(np.abs(flat - flat.mean(0)).mean(1).argmin())]  # reference computed here, in numpy
    row = build_method(resolve("smoke", "medoid"), stages.heads).fit(stages.bundle)
    out = row.sample(5, c[:5], generator=torch.Generator().manual_seed(0))
    assert out.shape == (5, *x.shape[1:])
    for v in out:
        assert torch.equal(v, want)
    assert not torch.equal(want, x.mean(0))  # a real subject, not the mean


def test_mean_noise_is_the_mean_volume_plus_brain_noise_as_textured_as_the_training_volumes(smoke) -> None:  # noqa: ANN001
    cfg, stages = smoke
    x, c = stages.bundle.tensors("train")
    row = build_method(resolve("smoke", "mean_noise"), stages.heads).fit(stages.bundle)
    out = row.sample(6, c[:6], generator=torch.Generator().manual_seed(0))
    mean = x.mean(dim=0, keepdim=True)
    background = x.amin(dim=(1, 2, 3, 4), keepdim=True)  # each volume's own (the z-score of intensity 0)
    outside = (x == background).all(dim=0, keepdim=True).expand_as(out)  # background in every training volume
    assert outside.any() and torch.equal(out[outside], mean.expand_as(out)[outside])  # no noise outside the brain
    assert (out - mean)[~outside].abs().max() > 0

    # reference: high-frequency energy (residual of a 3^3 mean, numpy) inside the brain, computed here
    def hp_var(v: torch.Tensor) -> float:
        from scipy.ndimage import uniform_filter

        a = v[0].double().numpy()
        ones = uniform_filter(np.ones_like(a), 3, mode="constant")  # divide out the zero padding at the border
        local = uniform_filter(a, 3, mode="constant") / ones
        return float((a - local)[~outside[0, 0].numpy()].var(ddof=1))

    target = np.mean([hp_var(v) for v in x])
    got = np.mean([hp_var(v) for v in row.sample(32, c[:32].repeat(2, 1)[:32], torch.Generator().manual_seed(1))])
    assert got == pytest.approx(target, rel=0.1)  # as textured as the training volumes
    assert hp_var(mean[0]) < 0.8 * target  # while the mean alone is smoother


def test_validity_directions_noise_and_mode_collapse(smoke) -> None:  # noqa: ANN001
    """Independent FID of the smoke training split rises under strong noise and under mode collapse."""
    from benchmark.validity import _mode_collapse, _Scorer, _torchio

    cfg, stages = smoke
    scorer = _Scorer(cfg, stages)
    x, c = stages.bundle.tensors("train")
    assert float(x.min()) < -3.0  # the project's background convention
    clean = scorer.score(x, c)
    ctx = {"generator": torch.Generator().manual_seed(0), "train": (x, c)}

    import torchio as tio

    torch.manual_seed(0)
    noisy, _ = _torchio(lambda level: tio.RandomNoise(std=(1.0, 1.0)))(x, c, 3, ctx)
    collapsed, cc = _mode_collapse(x, c, 3, ctx)
    assert len({tuple(v.flatten()[:32].tolist()) for v in collapsed}) == 1
    assert scorer.score(noisy, c)["fid_resnet18"] > clean["fid_resnet18"]
    assert scorer.score(collapsed, cc)["fid_resnet18"] > 1.2 * clean["fid_resnet18"]  # 2x and more at quick


def test_memorised_copies_lower_nn_ratio(smoke) -> None:  # noqa: ANN001
    from benchmark.validity import _memorised, _Scorer

    cfg, stages = smoke
    scorer = _Scorer(cfg, stages)
    x, c = stages.bundle.tensors("val")
    train = stages.bundle.tensors("train")
    copies, cc = _memorised(x, c, 3, {"generator": torch.Generator().manual_seed(0), "train": train})
    assert scorer.score(copies, cc)["nn_ratio"] == 0.0  # exact copies: nearest training distance 0
    assert scorer.score(x, c)["nn_ratio"] > 0.0


def _run(method: str, seed: int, **metrics: float) -> RunRecord:
    return RunRecord(f"{method}{seed}", method, "FINISHED", {"method": method, "seed": str(seed)}, {}, metrics)


def test_significance_marks_match_scipy_and_holm() -> None:
    from benchmark.report import IMAGE_COLUMNS, significance_marks

    fid = next(col for col in IMAGE_COLUMNS if col.key == "fid_resnet18")
    rng = np.random.default_rng(0)
    base = rng.normal(100, 1, size=3)
    values = {"a": base, "b": base + np.array([0.1, -0.2, 0.15]), "c": base + np.array([20.0, 21.0, 19.5])}
    runs = {m: [_run(m, s, fid_resnet18=float(v[s])) for s in range(3)] for m, v in values.items()}
    marks = significance_marks(("a", "b", "c"), runs, (fid,))
    p_c = stats.ttest_rel(values["a"], values["c"]).pvalue
    p_b = stats.ttest_rel(values["a"], values["b"]).pvalue
    assert p_c * 2 < 0.05 and p_b > 0.05  # Holm: smallest p times the number of comparisons
    assert marks == {("c", "FID"): "*"}


def test_kendall_tau_between_seed_rankings() -> None:
    from benchmark.report import kendall_tau

    same = {m: [_run(m, s, fid_resnet18=v + s) for s in range(2)] for m, v in (("a", 1.0), ("b", 5.0), ("c", 9.0))}
    assert kendall_tau(("a", "b", "c"), same, "fid_resnet18") == pytest.approx(1.0)
    flipped = {"a": [_run("a", 0, fid_resnet18=1.0), _run("a", 1, fid_resnet18=9.0)],
               "b": [_run("b", 0, fid_resnet18=5.0), _run("b", 1, fid_resnet18=5.0)],
               "c": [_run("c", 0, fid_resnet18=9.0), _run("c", 1, fid_resnet18=1.0)]}
    assert kendall_tau(("a", "b", "c"), flipped, "fid_resnet18") == pytest.approx(-1.0)


def test_seed_note_gives_kendall_tau_per_fid_column() -> None:
    """The default FID and FID (anat.) can rank rows differently; the note gives each its own tau."""
    from dataclasses import replace

    from benchmark.catalog import load_all
    from benchmark.registry import SUITES
    from benchmark.report import table_rows

    load_all()
    suite = replace(SUITES.get("table2"), methods=("a", "b", "c"), references=())
    order = {"a": 1.0, "b": 5.0, "c": 9.0}
    kids = [_run(m, seed, fid_resnet18=v, fid_resnet18anat=(v if seed == 0 else 10.0 - v))
            for m, v in order.items() for seed in range(2)]
    _, _, note = table_rows(suite, None, kids)
    assert "Kendall's tau between the seeds' rankings: FID 1.00, FID (anat.) -1.00 (1 = identical rankings)." in note


def test_metric_order_never_changes_a_value(smoke, tmp_path) -> None:  # noqa: ANN001
    """The same metric list in two orders, with fid_medicalnet18 (weights from a small file made here) in the
    middle, gives identical values: no metric changes the context or what later metrics use."""
    from dataclasses import replace

    from benchmark.evaluation import EvalContext, evaluate
    from metrics.extractors import MedicalNet18

    cfg, stages = smoke
    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in MedicalNet18(shortcut="B", width=2).state_dict().items()}
    weights = tmp_path / "resnet_18_23dataset.pth"
    torch.save({"state_dict": state}, weights)
    cfg = replace(cfg, method="real", eval=replace(cfg.eval, medicalnet_weights=str(weights), n_draws=2))
    names = ["fid_resnet18", "ssim_triplanar", "fid_medicalnet18", "ssim_nn_triplanar", "nn_ratio"]
    results = []
    for order in (names, names[::-1], names[2:] + names[:2]):
        method = build_method(cfg, stages.heads).fit(stages.bundle)
        ctx = EvalContext(cfg, method, stages)
        results.append(evaluate(ctx, order))
        assert "unavailable.fid_medicalnet18" not in ctx.notes, ctx.notes
    assert "fid_medicalnet18" in results[0] and "ssim_triplanar" in results[0]
    assert results[0] == results[1] == results[2]
