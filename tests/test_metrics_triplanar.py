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
