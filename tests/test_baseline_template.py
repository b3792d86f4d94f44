"""`wgan.output_template` / `stylegan.output_template`: the baselines' output as a residual on the medoid training
volume, the data prior the quick preset gives every Table 3 row (DESIGN §9 "A sharp template")."""

from __future__ import annotations

import pytest
import torch

import baselines.stylegan2  # noqa: F401 (registers the method)
import baselines.wgan_gp  # noqa: F401
from benchmark.config import resolve
from benchmark.registry import METHODS
from tests.test_vaegan import _brains, _medoid_reference

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [("wgan_gp", "wgan"), ("stylegan2", "stylegan")]


def _build(method: str, section: str, template: bool):  # noqa: ANN202
    cfg = resolve("smoke", method=method, overrides={f"{section}.output_template": template})
    torch.manual_seed(0)
    m = METHODS.get(method)(cfg)
    m.setup()
    return m


def _sample_l1_to(m, volume: torch.Tensor) -> float:  # noqa: ANN001
    m.eval()
    s = m.sample(4, None, generator=torch.Generator().manual_seed(0))
    m.train()
    return float((s - volume).abs().mean())


@pytest.mark.parametrize(("method", "section"), ROWS)
def test_baseline_samples_start_as_small_residuals_on_the_medoid(method: str, section: str) -> None:
    x = _brains(7, 16, seed=3)
    want = _medoid_reference(x)
    m = _build(method, section, template=True)
    m.init_from_data([{"x": v, "c": torch.zeros(7)} for v in x])
    assert m.G.template is not None
    torch.testing.assert_close(m.G.template.template, want)
    m.training_step({"x": _brains(4, 16, seed=11), "c": torch.randn(4, 7)}, 0)  # the first step keeps it
    torch.testing.assert_close(m.G_eval.template.template, want)
    near = _sample_l1_to(m, want)
    between_subjects = float(torch.stack([(a - b).abs().mean() for i, a in enumerate(x) for b in x[i + 1:]]).mean())
    assert 0 < near < between_subjects, (near, between_subjects)  # closer to the template than subjects are apart
    plain = _build(method, section, template=False)
    plain.training_step({"x": _brains(4, 16, seed=11), "c": torch.randn(4, 7)}, 0)
    assert _sample_l1_to(plain, want) > 3 * near  # the paper's generator starts far from any brain


@pytest.mark.parametrize(("method", "section"), ROWS)
def test_baseline_template_without_init_is_the_first_batch_volume_nearest_its_mean(method: str, section: str) -> None:
    m = _build(method, section, template=True)
    first = _brains(4, 16, seed=5)
    m.training_step({"x": first, "c": torch.randn(4, 7)}, 0)
    m.training_step({"x": _brains(4, 16, seed=6), "c": torch.randn(4, 7)}, 1)
    torch.testing.assert_close(m.G_eval.template.template, _medoid_reference(first))
    assert "G.template.template" in m.state_dict()  # checkpoints carry it
