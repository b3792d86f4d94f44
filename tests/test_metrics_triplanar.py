import numpy as np
import pytest
import torch

from metrics.triplanar import brain_mask, slice_indices, slices


def _boxed_volume(size: int = 24) -> torch.Tensor:
    vol = torch.zeros(1, size, size, size)
    vol[0, 3:20, 5:17, 2:23] = torch.randn(17, 12, 21, generator=torch.Generator().manual_seed(0)) + 5.0
    return vol


def test_slice_indices_deterministic_evenly_spaced_inside_bbox() -> None:
    vol = _boxed_volume()
    mask = brain_mask(vol)
    idx = slice_indices(mask, n=32)
    assert all(i.dtype == torch.long and i.shape == (32,) for i in idx)
    for i, (lo, hi) in zip(idx, [(3, 19), (5, 16), (2, 22)], strict=True):
        assert i[0].item() == lo and i[-1].item() == hi
        assert bool((i >= lo).all() and (i <= hi).all())
        assert bool((i.diff() >= 0).all())
    again = slice_indices(brain_mask(vol.clone()), n=32)
    assert all(torch.equal(a, b) for a, b in zip(idx, again, strict=True))


def test_slices_shape_order_and_content() -> None:
    vol = _boxed_volume()
    idx = slice_indices(brain_mask(vol), n=32)
    s = slices(vol, n=32)
    assert s.shape == (96, 1, 24, 24)
    v = vol[0]
    assert torch.equal(s[0, 0], v[idx[0][0]])
    assert torch.equal(s[32 + 5, 0], v[:, idx[1][5], :])
    assert torch.equal(s[64 + 31, 0], v[:, :, idx[2][31]])
    # indices from another volume are honoured (pairing uses the real volume's mask)
    other = torch.randn(24, 24, 24)
    assert torch.equal(slices(other, indices=idx)[40, 0], other[:, idx[1][8], :])


def test_brain_mask_falls_back_to_whole_volume() -> None:
    assert bool(brain_mask(torch.zeros(8, 8, 8)).all())


def test_slices_require_cubes() -> None:
    with pytest.raises(ValueError, match="cubic"):
        slices(torch.randn(1, 16, 16, 20), n=4)


# --- on the project's real convention: synthetic-cohort subjects (background = z-score of intensity 0, ~ -4.6) ---

@pytest.fixture(scope="module")
def two_subjects() -> list[tuple[torch.Tensor, "np.ndarray"]]:
    import numpy as np

    from benchmark.data.synthetic import draw_subject, synthesize_subject, template_space

    space = template_space(32)
    out = []
    for i, dx in enumerate(("CN", "AD")):
        rng = np.random.default_rng(10 + i)
        image, labels = synthesize_subject(space, draw_subject(rng, dx), rng)
        out.append((torch.from_numpy(image)[None], labels))
    return out


def test_slices_lie_in_the_brain_box_of_the_label_map(two_subjects) -> None:
    """Reference: the brain box of the subject's LABEL MAP (labels > 0), spaced with numpy, not with the code under
    test. Fails when the mask treats the -4.6 background as brain (indices then run 0..31)."""
    import numpy as np

    for image, labels in two_subjects:
        assert float(image.min()) < -3.0  # the real convention: a strongly negative background
        idx = slice_indices(brain_mask(image), n=32)
        for axis in range(3):
            present = np.flatnonzero((labels > 0).any(axis=tuple(a for a in range(3) if a != axis)))
            expected = np.rint(np.linspace(present[0], present[-1], 32)).astype(int)
            assert idx[axis].tolist() == expected.tolist(), axis
        assert any(int(i[0]) > 0 or int(i[-1]) < 31 for i in idx)  # a box, not the whole cube


def test_brain_mask_equals_the_label_map(two_subjects) -> None:
    for image, labels in two_subjects:
        assert np.array_equal(brain_mask(image).numpy(), labels > 0)


def test_ssim_of_an_unrelated_subject_uses_brain_slices(two_subjects) -> None:
    """SSIM over brain-box slices is lower than over whole-cube slices (background-only slices match perfectly)."""
    from metrics.ssim import ssim_triplanar

    (a, _), (b, _) = two_subjects
    brain = float(ssim_triplanar(a[None], b[None], n=32)[0])
    data_range = float(a.max() - a.min())  # the metric's convention: the real volume's range
    whole = torch.ones(32, 32, 32, dtype=torch.bool)
    idx = slice_indices(whole, n=32)
    from skimage.metrics import structural_similarity

    ref = []
    for axis in range(3):
        for i in idx[axis].tolist():
            ra = a[0].numpy().take(i, axis=axis).astype(np.float64)
            rb = b[0].numpy().take(i, axis=axis).astype(np.float64)
            ref.append(structural_similarity(ra, rb, data_range=data_range, gaussian_weights=True,
                                             sigma=1.5, use_sample_covariance=False))
    assert brain < float(np.mean(ref)) - 0.02, (brain, float(np.mean(ref)))
