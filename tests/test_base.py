"""The method contract's shared machinery (models/base.py): frozen(), the harness's noise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmark.config import resolve
from models.base import GenerativeMethod, frozen

CPU = torch.device("cpu")


def test_frozen_restores_each_flag_also_on_exceptions() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    net[0].bias.requires_grad_(False)  # frozen before: must stay frozen after
    before = [p.requires_grad for p in net.parameters()]
    x = torch.randn(2, 3, requires_grad=True)
    with frozen(net) as module:
        assert module is net and not any(p.requires_grad for p in net.parameters())
        net(x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in net.parameters())  # gradients reach the input only
    assert [p.requires_grad for p in net.parameters()] == before
    with pytest.raises(RuntimeError, match="inside"), frozen(net):
        raise RuntimeError("inside")
    assert [p.requires_grad for p in net.parameters()] == before == [True, False, True, True]


def test_noise_is_a_pure_function_of_seed_step_and_kind() -> None:
    # Regression: the seed was a weighted character sum of the kind, which gave "gn3" and "dn4" one stream.
    method = GenerativeMethod(resolve("smoke", "stylegan2"))
    a = method.batch_noise("gn3", 2, (5,), 7, CPU)
    assert torch.equal(a, method.batch_noise("gn3", 2, (5,), 7, CPU))
    assert not torch.equal(a, method.batch_noise("dn4", 2, (5,), 7, CPU))
    assert not torch.equal(a, method.batch_noise("gn3", 2, (5,), 8, CPU))
    u = method.step_noise("mix", (2,), 7, CPU, uniform=True)
    assert u.shape == (2,) and torch.equal(u, method.step_noise("mix", (2,), 7, CPU, uniform=True))
    assert ((u >= 0) & (u < 1)).all()
