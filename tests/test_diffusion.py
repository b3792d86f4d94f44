"""The DDPM prior over clinical vectors: fit on a CN/AD-like table, joint and conditional sampling, samplers."""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
import torch

from metrics.prior import c2st_accuracy, mmd_rbf
from models.diffusion import ClinicalDDPM, fit_prior

# Log-ratio means/SDs per group and the within-group correlation (docs ROI-STATISTICS §2-3): AD has smaller
# hippocampi and amygdalae and larger, right-skewed ventricles; left/right pairs correlate 0.75-0.9.
MU = {0: [-5.663, -5.637, -6.541, -6.494, -4.202, -4.300], 1: [-5.850, -5.796, -6.745, -6.688, -3.782, -3.875]}
SD = {0: [0.125, 0.125, 0.150, 0.149, 0.504, 0.519], 1: [0.167, 0.164, 0.198, 0.195, 0.444, 0.460]}
R = np.array([
    [1.00, 0.85, 0.65, 0.60, -0.35, -0.30],
    [0.85, 1.00, 0.60, 0.65, -0.30, -0.35],
    [0.65, 0.60, 1.00, 0.75, -0.30, -0.25],
    [0.60, 0.65, 0.75, 1.00, -0.25, -0.30],
    [-0.35, -0.30, -0.30, -0.25, 1.00, 0.90],
    [-0.30, -0.35, -0.25, -0.30, 0.90, 1.00],
])  # fmt: skip


def clinical_table(n: int, seed: int) -> np.ndarray:
    """[n, 7] raw ratios (two correlated Gaussians on the log scale, one per diagnosis) + label, 50/50 CN/AD."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n)
    out = np.empty((n, 7))
    for k in (0, 1):
        sd = np.array(SD[k])
        rows = label == k
        out[rows, :6] = np.exp(rng.multivariate_normal(MU[k], sd[:, None] * R * sd[None], rows.sum()))
    out[:, 6] = label
    return out


@pytest.fixture(scope="module")
def trained() -> tuple[ClinicalDDPM, torch.Tensor, torch.Tensor]:
    """(a DDPM fitted for 3000 steps, train [2000, 7], test [1000, 7]), ratios standardised with train stats."""
    train, test = clinical_table(2000, 0), clinical_table(1000, 1)
    mean, std = train[:, :6].mean(0), train[:, :6].std(0)
    train[:, :6] = (train[:, :6] - mean) / std
    test[:, :6] = (test[:, :6] - mean) / std
    c_train, c_test = torch.tensor(train, dtype=torch.float32), torch.tensor(test, dtype=torch.float32)
    torch.manual_seed(0)
    ddpm = ClinicalDDPM()
    history = fit_prior(ddpm, c_train, steps=3000, batch_size=256, seed=0, progress=False)
    assert history["loss"][-1] < history["loss"][0]
    return ddpm, c_train, c_test


def test_joint_samples_match_the_data(trained: tuple[ClinicalDDPM, torch.Tensor, torch.Tensor]) -> None:
    ddpm, _, test = trained
    fake = ddpm.sample(1000, generator=torch.Generator().manual_seed(1))
    assert fake.shape == (1000, 7) and fake.dtype == torch.float32 and torch.isfinite(fake).all()
    assert set(fake[:, 6].unique().tolist()) <= {0.0, 1.0}
    assert 0.4 < fake[:, 6].mean() < 0.6
    cn, ad = test[test[:, 6] == 0], test[test[:, 6] == 1]
    assert c2st_accuracy(test, fake, seed=0) <= 0.6  # measured 0.52
    assert mmd_rbf(test, fake) < mmd_rbf(cn, ad)  # measured 0.0004 vs 0.28


def test_ddim_sampler(trained: tuple[ClinicalDDPM, torch.Tensor, torch.Tensor]) -> None:
    ddpm, _, test = trained
    fake = ddpm.sample(1000, generator=torch.Generator().manual_seed(2), sampler="ddim", steps=50)
    assert fake.shape == (1000, 7) and torch.isfinite(fake).all()
    assert c2st_accuracy(test, fake, seed=0) <= 0.6


def test_fixed_label(trained: tuple[ClinicalDDPM, torch.Tensor, torch.Tensor]) -> None:
    ddpm, _, _ = trained
    cn = ddpm.sample(500, fixed={6: 0.0}, generator=torch.Generator().manual_seed(3))
    ad = ddpm.sample(500, fixed={6: 1.0}, generator=torch.Generator().manual_seed(3))
    assert torch.all(cn[:, 6] == 0) and torch.all(ad[:, 6] == 1)
    assert torch.all(ad[:, 4:6].mean(0) > cn[:, 4:6].mean(0) + 0.2)  # larger ventricles in AD
    assert torch.all(ad[:, 0:4].mean(0) < cn[:, 0:4].mean(0) - 0.2)  # smaller hippocampi and amygdalae


def test_fixed_features_stay_exact(trained: tuple[ClinicalDDPM, torch.Tensor, torch.Tensor]) -> None:
    ddpm, _, _ = trained
    out = ddpm.sample(64, fixed={0: 1.234, 4: -0.5}, generator=torch.Generator().manual_seed(4))
    assert torch.all(out[:, 0] == 1.234) and torch.all(out[:, 4] == -0.5)
    assert out[:, 1].std() > 0.05 and out[:, 1].mean() > 0.3  # hipp_r follows hipp_l (L/R correlation)
    # per-row mask + values: each row its own fixed set
    mask = torch.zeros(4, 7, dtype=torch.bool)
    mask[0, 6] = mask[1, 5] = mask[2, :6] = True
    values = torch.zeros(4, 7)
    values[0, 6], values[1, 5], values[2, :6] = 1.0, 2.0, torch.arange(6.0)
    out = ddpm.sample(4, fixed=(mask, values), generator=torch.Generator().manual_seed(5), sampler="ddim", steps=20)
    assert torch.equal(out[mask], values[mask])


def test_sampling_is_reproducible_and_survives_state_dict(
    trained: tuple[ClinicalDDPM, torch.Tensor, torch.Tensor],
) -> None:
    ddpm, _, _ = trained
    copy = ClinicalDDPM()
    copy.load_state_dict(ddpm.state_dict())  # x0_bound travels with the weights
    a = ddpm.sample(16, generator=torch.Generator().manual_seed(6), steps=100)
    b = copy.sample(16, generator=torch.Generator().manual_seed(6), steps=100)
    assert torch.equal(a, b)


def test_loss_and_argument_checks() -> None:
    ddpm = ClinicalDDPM(timesteps=50)
    c = torch.randn(8, 7)
    c[:, 6] = torch.arange(8) % 2
    loss = ddpm.loss(c, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and loss.item() > 0
    loss.backward()
    assert all(p.grad is not None for p in ddpm.parameters())
    with pytest.raises(ValueError, match="label"):
        ddpm.sample(2, fixed={6: 0.5})
    with pytest.raises(ValueError, match="steps"):
        ddpm.sample(2, steps=51)
    with pytest.raises(ValueError, match="sampler"):
        ddpm.sample(2, sampler="euler")
    with pytest.raises(ValueError, match="schedule"):
        ClinicalDDPM(schedule="quadratic")
    assert ddpm.sample(0).shape == (0, 7)


def test_fit_prior_is_deterministic_for_a_seed() -> None:
    c = torch.tensor(clinical_table(200, 2), dtype=torch.float32)
    c[:, :6] = (c[:, :6] - c[:, :6].mean(0)) / c[:, :6].std(0)
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        ddpm = ClinicalDDPM(timesteps=50, hidden=32)
        fit_prior(ddpm, c, steps=20, batch_size=32, seed=1, progress=False)
        states.append(ddpm.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.slow
def test_sampling_speed_1000_vectors_500_steps() -> None:
    """Brief: 1000 vectors x 500 DDPM steps in <= 0.5 s on 2 CPU cores (median of 5; a shared box can be slower)."""
    torch.set_num_threads(2)
    ddpm = ClinicalDDPM().eval()
    ddpm.sample(1000)  # warm-up
    times = []
    for seed in range(5):
        start = time.perf_counter()
        ddpm.sample(1000, generator=torch.Generator().manual_seed(seed))
        times.append(time.perf_counter() - start)
    assert statistics.median(times) <= 0.5
