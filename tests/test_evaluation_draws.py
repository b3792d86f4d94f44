"""Generated draws within one evaluation, and when training validates (the near-duplicate final point)."""

from __future__ import annotations

import torch

from benchmark import evaluation
from benchmark.config import resolve
from benchmark.evaluation import EvalContext
from benchmark.train import _validates_at


class _CountingSampler:
    """An unconditional method whose samples depend only on its generator; counts the volumes it draws."""

    conditional = False

    def __init__(self) -> None:
        self.drawn = 0

    def eval(self) -> _CountingSampler:
        return self

    def sample(self, n: int, c: object = None, generator: torch.Generator | None = None) -> torch.Tensor:
        self.drawn += n
        return torch.rand((n, 1, 16, 16, 16), generator=generator) - 4.6


def test_a_draw_is_generated_once_per_evaluation_and_reads_the_same_every_time() -> None:
    cfg = resolve("smoke", method="vae")
    method = _CountingSampler()
    ctx = EvalContext(cfg, method, stages=None)
    first = torch.cat([x for x, _ in ctx.generate(10, 0)])
    again = torch.cat([x for x, _ in ctx.generate(10, 0)])
    other = torch.cat([x for x, _ in ctx.generate(10, 1)])
    assert method.drawn == 20  # draws 0 and 1 once each
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    # a fresh context (a new evaluation, or the next validation) draws the same volumes from the same streams
    fresh = torch.cat([x for x, _ in EvalContext(cfg, method, stages=None).generate(10, 0)])
    torch.testing.assert_close(first, fresh, rtol=0, atol=0)


def test_sets_too_large_to_keep_are_generated_again(monkeypatch) -> None:
    monkeypatch.setattr(evaluation, "GENERATED_CACHE_BYTES", 10 * 16**3 * 4 - 1)
    method = _CountingSampler()
    ctx = EvalContext(resolve("smoke", method="vae"), method, stages=None)
    for _ in range(2):
        list(ctx.generate(10, 0))
    assert method.drawn == 20


def test_validation_cadence_skips_a_point_just_before_the_final_one() -> None:
    # quick: 1000 volumes at batch 4 = 250 steps, every 250 volumes = 62 steps; 248 was 2 steps before the end
    steps = [s for s in range(1, 251) if _validates_at(s, 62, 250)]
    assert steps == [62, 124, 186, 250]
    # a cadence step half a period or more before the end stays; the end always validates
    assert [s for s in range(1, 101) if _validates_at(s, 40, 100)] == [40, 80, 100]
    assert [s for s in range(1, 11) if _validates_at(s, 1, 10)] == list(range(1, 11))
