import numpy as np
import torch
import torch.nn.functional as F

from metrics.memorization import closest_pairs, nn_ratio, nn_ratio_ssim, summary


def _volumes(n: int, seed: int, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, size, generator=g)
    return F.avg_pool3d(x, 3, stride=1, padding=1) * 3


def _noisy(x: torch.Tensor, seed: int, sigma: float = 0.1) -> torch.Tensor:
    return x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


def test_copying_generator_scores_lower_ratio_than_generalising_one() -> None:
    train, test = _volumes(8, seed=0), _volumes(8, seed=1)
    copier, other = _noisy(train, 2), _noisy(test, 3)  # "generates" noisy train vs noisy held-out volumes
    r_copy = nn_ratio(copier.flatten(1), train.flatten(1), test.flatten(1))
    r_other = nn_ratio(other.flatten(1), train.flatten(1), test.flatten(1))
    assert r_copy.shape == (8,)
    assert np.median(r_copy) < 0.5 < 2.0 < np.median(r_other)
    assert summary(r_copy)["frac_below"] == 1.0 and summary(r_other)["frac_below"] == 0.0

    s_copy = nn_ratio_ssim(copier[:3], train[:4], test[:4], n=4)
    s_other = nn_ratio_ssim(other[:3], train[:4], test[:4], n=4)
    assert s_copy.max() < 1.0 < s_other.min()


def test_closest_pairs_finds_exact_copies() -> None:
    train = torch.randn(10, 5, generator=torch.Generator().manual_seed(0))
    gen = torch.cat([torch.randn(4, 5, generator=torch.Generator().manual_seed(1)) + 10, train[7:8], train[2:3]])
    pairs = closest_pairs(gen, train, k=2)
    assert {(g, t) for g, t, _ in pairs} == {(4, 7), (5, 2)}
    assert all(d < 1e-9 for _, _, d in pairs)


def test_summary_keys() -> None:
    s = summary(np.array([0.1, 0.5, 1.0, 2.0]), threshold=0.6)
    assert s["median"] == 0.75 and s["frac_below"] == 0.5 and s["min"] == 0.1
