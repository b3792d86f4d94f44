import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmark.data.contract import ROI_NAMES
from metrics.errors import MetricUnavailable
from metrics.volumetry import SYNTHSEG_COLUMNS, consistency, measure_with_synthseg, read_synthseg_volumes


def test_consistency_perfectly_proportional_is_r1() -> None:
    requested = np.random.default_rng(0).uniform(1e-3, 5e-3, size=(20, 6))
    out = consistency(1.1 * requested, requested)
    for s in ("hippocampus", "amygdala", "lateral_ventricle"):
        assert out[f"{s}_r"] == pytest.approx(1.0)
    assert out["mean_r"] == pytest.approx(1.0)
    hipp = requested[:, 0] + requested[:, 1]
    assert out["hippocampus_mae"] == pytest.approx(0.1 * hipp.mean())
    assert np.isnan(consistency(requested[:1], requested[:1])["mean_r"])


def _write_synthseg_csv(path: Path, subjects: list[str], scale: list[float]) -> None:
    cols = ["subject", "total intracranial", "left cerebral cortex", "csf", *SYNTHSEG_COLUMNS.values()]
    lines = [",".join(cols)]
    for s, k in zip(subjects, scale, strict=True):
        lines.append(",".join([s, "1100000", "400000", "100000", *[str(k * (i + 1) * 1000) for i in range(6)]]))
    path.write_text("\n".join(lines) + "\n")


def test_read_synthseg_volumes(tmp_path: Path) -> None:
    csv = tmp_path / "vols.csv"
    _write_synthseg_csv(csv, ["b", "a"], [2.0, 1.0])
    ratios = read_synthseg_volumes(csv, ["a", "b"])
    assert ratios.shape == (2, len(ROI_NAMES))
    np.testing.assert_allclose(ratios[0], np.arange(1, 7) * 1000 / 1_000_000)  # brain = TIV - CSF
    np.testing.assert_allclose(ratios[1], 2 * ratios[0])
    np.testing.assert_allclose(read_synthseg_volumes(csv, ["a"], denominator="tiv")[0], np.arange(1, 7) / 1100)


def test_measure_with_synthseg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(MetricUnavailable, match="mri_synthseg"):
        measure_with_synthseg([tmp_path / "x.nii.gz"], tmp_path / "out")

    # A stand-in mri_synthseg that writes SynthSeg's CSV layout for every input in --i.
    fake = bin_dir / "mri_synthseg"
    header = ",".join(["subject", "total intracranial", "csf", *SYNTHSEG_COLUMNS.values()])
    fake.write_text(
        f"""#!{sys.executable}
import os, sys
a = sys.argv
i, vol = a[a.index("--i") + 1], a[a.index("--vol") + 1]
with open(vol, "w") as f:
    f.write("{header}\\n")
    for k, name in enumerate(sorted(os.listdir(i), reverse=True)):
        stem = name.replace(".nii.gz", "")
        f.write(",".join([stem, "1000", "0"] + [str(int(stem) + 1)] * 6) + "\\n")
"""
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    inputs = []
    for name in ("s1.nii.gz", "s2.nii.gz", "s3.nii.gz"):
        (tmp_path / name).write_bytes(b"")
        inputs.append(tmp_path / name)
    ratios = measure_with_synthseg(inputs, tmp_path / "out")
    np.testing.assert_allclose(ratios[:, 0], [0.001, 0.002, 0.003])  # rows mapped back to input order


def test_volume_consistency_dispatches_to_synthseg_on_real_cohorts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   stage_cache: Path) -> None:
    """A non-synthetic cohort: without mri_synthseg the metric says what to install; with a stand-in on PATH it is
    called once on every generated volume (NIfTI with the cohort's affine) and the metric is computed."""
    from benchmark.config import resolve
    from benchmark.data.bundle import DataBundle
    from benchmark.evaluation import EvalContext, evaluate
    from benchmark.runner import build_method, prepare_stages

    cfg = resolve("smoke", "train_copy", overrides={"data.cache_dir": str(stage_cache), "eval.n_prior_vectors": 6})
    stages = prepare_stages(cfg, progress=False)
    monkeypatch.setattr(DataBundle, "is_synthetic", property(lambda self: False))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))

    def score() -> EvalContext:
        ctx = EvalContext(cfg, build_method(cfg, stages.heads).fit(stages.bundle), stages)
        ctx.notes["values"] = str(evaluate(ctx, ["volume_consistency"]))
        return ctx

    ctx = score()
    assert "mri_synthseg" in ctx.notes["unavailable.volume_consistency"]
    header = ",".join(["subject", "total intracranial", "csf", *SYNTHSEG_COLUMNS.values()])
    calls = tmp_path / "calls.txt"
    fake = bin_dir / "mri_synthseg"
    fake.write_text(
        f"""#!{sys.executable}
import os, sys, random
a = sys.argv
i, vol = a[a.index("--i") + 1], a[a.index("--vol") + 1]
names = sorted(os.listdir(i))
open({str(calls)!r}, "a").write(str(len(names)) + "\\n")
with open(vol, "w") as f:
    f.write("{header}\\n")
    for name in names:
        f.write(",".join([name.replace(".nii.gz", ""), "1000", "0"] + [str(random.randint(1, 9)) for _ in range(6)])
                + "\\n")
"""
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    ctx = score()
    assert "unavailable.volume_consistency" not in ctx.notes
    assert calls.read_text().split() == ["6"]  # one call, every generated volume
    assert "SynthSeg" in ctx.notes["note.volume_consistency"] and "volume_hippocampus_r" in ctx.notes["values"]
