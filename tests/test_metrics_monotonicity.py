"""Growing noise must make every image metric worse, strictly (DESIGN §5: "every metric means something")."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metrics.extractors import FrozenBackboneExtractor
from metrics.fid import compute_features, fid_from_stats
from metrics.lpips import lpips_triplanar
from metrics.ssim import ssim_triplanar

SIZE = 32
SIGMAS = (0.1, 0.3, 1.0)


def smooth_brains(n: int, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    """Smoothed random fields inside a sphere, z-scored inside it, 0 outside: ``[n, 1, S, S, S]``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, size, generator=g)
    k = torch.exp(-0.5 * (torch.arange(-4, 5.0) / 2.0) ** 2)
    k = k / k.sum()
    for dims in ((9, 1, 1), (1, 9, 1), (1, 1, 9)):
        x = F.conv3d(x, k.view(1, 1, *dims), padding=tuple(d // 2 for d in dims))
    c = torch.arange(size) - (size - 1) / 2
    mask = (c.view(-1, 1, 1) ** 2 + c.view(1, -1, 1) ** 2 + c.view(1, 1, -1) ** 2) <= (0.42 * size) ** 2
    inside = x[:, :, mask]
    x = (x - inside.mean(dim=2).view(n, 1, 1, 1, 1)) / inside.std(dim=2).view(n, 1, 1, 1, 1)
    return x * mask


def _noisy(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    return x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


def _small_extractor() -> FrozenBackboneExtractor:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(8, 16, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool3d(1),
    )
    return FrozenBackboneExtractor(net, "tiny3d")


def test_fid_grows_with_noise() -> None:
    real = smooth_brains(40, seed=0)
    ext = _small_extractor()
    ref = compute_features(ext, real, batch_size=16)
    fids = [fid_from_stats(ref, compute_features(ext, _noisy(smooth_brains(40, seed=1), s, 7), 16)) for s in SIGMAS]
    assert np.all(np.diff(fids) > 0), fids
    assert fids[0] > 0


@pytest.mark.parametrize("metric", ["ssim", "lpips"])
def test_paired_metrics_degrade_with_noise(metric: str) -> None:
    real = smooth_brains(2, seed=2)
    values = []
    for s in SIGMAS:
        fake = _noisy(real, s, 3)
        if metric == "ssim":
            values.append(ssim_triplanar(real, fake, n=6))
        else:
            values.append(-lpips_triplanar(real, fake, n=6, backbone="random").double())
    per_volume = torch.stack(values)  # [sigma, B], higher = more similar
    assert bool((per_volume.diff(dim=0) < 0).all()), per_volume
