import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from metrics.ssim import ssim2d, ssim_triplanar
from metrics.triplanar import brain_mask, slice_indices, slices


def _skimage(a: torch.Tensor, b: torch.Tensor, data_range: float) -> float:
    return structural_similarity(
        a.numpy(), b.numpy(), gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=data_range
    )


def _blobs(size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    img = np.zeros((n, size, size))
    for i in range(n):
        for _ in range(4):
            cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(2, size / 3)
            img[i] += rng.uniform(0.5, 2) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
    return img


@pytest.mark.parametrize("size", [24, 32])
def test_ssim2d_matches_skimage(size: int) -> None:
    rng = np.random.default_rng(size)
    blobs = _blobs(size, 3, rng)
    pairs = [
        (rng.random((size, size)), rng.random((size, size))),  # unrelated noise
        (blobs[0], blobs[1]),  # unrelated smooth images
        (blobs[0], np.roll(blobs[0], 2, axis=1)),  # shifted copy
        (blobs[2], blobs[2] + rng.normal(0, 0.2, (size, size))),  # noisy copy
        (blobs[1], blobs[1]),  # identical
    ]
    a = torch.tensor(np.stack([p[0] for p in pairs]))[:, None]
    b = torch.tensor(np.stack([p[1] for p in pairs]))[:, None]
    for data_range in (1.0, 3.7):
        ours = ssim2d(a, b, data_range)
        ref = torch.tensor([_skimage(a[i, 0], b[i, 0], data_range) for i in range(len(pairs))])
        assert ours.shape == (len(pairs),)
        assert torch.allclose(ours, ref, atol=1e-4, rtol=0)
    assert ours[-1].item() == pytest.approx(1.0)


def test_ssim2d_per_slice_data_range_and_float32_input() -> None:
    rng = np.random.default_rng(1)
    a = torch.tensor(_blobs(24, 4, rng), dtype=torch.float32)[:, None]
    b = a + 0.1 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0))
    ranges = torch.tensor([0.5, 1.0, 2.0, 4.0])
    ours = ssim2d(a, b, ranges)
    ref = [_skimage(a[i, 0].double(), b[i, 0].double(), float(ranges[i])) for i in range(4)]
    assert ours.dtype == torch.float64
    assert ours.tolist() == pytest.approx(ref, abs=1e-4)


def test_ssim2d_rejects_slices_smaller_than_window() -> None:
    with pytest.raises(ValueError, match="11x11"):
        ssim2d(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), 1.0)


def test_ssim_triplanar_is_mean_of_skimage_over_real_indexed_slices() -> None:
    g = torch.Generator().manual_seed(0)
    real = torch.zeros(2, 1, 20, 20, 20)
    real[:, :, 3:17, 4:18, 2:15] = torch.randn(2, 1, 14, 14, 13, generator=g)
    fake = real + 0.3 * torch.randn(real.shape, generator=g)
    n = 4
    ours = ssim_triplanar(real, fake, n=n)
    for v in range(2):
        idx = slice_indices(brain_mask(real[v]), n)
        rs, fs = slices(real[v], indices=idx), slices(fake[v], indices=idx)
        data_range = float(real[v].max() - real[v].min())
        ref = np.mean([_skimage(rs[k, 0].double(), fs[k, 0].double(), data_range) for k in range(3 * n)])
        assert ours[v].item() == pytest.approx(ref, abs=1e-4)
    assert torch.allclose(ssim_triplanar(real, real, n=n), torch.ones(2, dtype=torch.float64))
