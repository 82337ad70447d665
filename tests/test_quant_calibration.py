"""Calibration: streaming covariance (vs numpy.cov), KLT rotations, observers, smoothing scales."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ood_fast.quant import (
    AbsMaxObserver,
    CovarianceAccumulator,
    PercentileObserver,
    klt_rotation,
    smooth_scales,
)
from ood_fast.reference.hadamard import hadamard_matrix, random_hadamard

# ---------------------------------------------------------------------------------------------
# CovarianceAccumulator
# ---------------------------------------------------------------------------------------------


def _data(n, d, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((d, d))
    return rng.standard_normal((n, d)) @ A + offset


@pytest.mark.parametrize("chunks", [1, 3, 17])
def test_covariance_matches_numpy(chunks):
    x = _data(1000, 24, seed=chunks)
    acc = CovarianceAccumulator(24)
    for part in np.array_split(x, chunks):
        acc.update(torch.from_numpy(part).float() if chunks == 3 else torch.from_numpy(part))
    x_used = (
        x
        if chunks != 3
        else np.concatenate(
            [torch.from_numpy(p).float().double().numpy() for p in np.array_split(x, 3)]
        )
    )
    assert acc.count == 1000
    np.testing.assert_allclose(acc.mean.numpy(), x_used.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(acc.covariance.numpy(), np.cov(x_used.T, bias=True), atol=1e-11)
    second = x_used.T @ x_used / len(x_used)
    np.testing.assert_allclose(acc.second_moment.numpy(), second, atol=1e-10)
    assert acc.covariance.dtype == torch.float64


def test_covariance_merge_workers_and_leading_dims():
    x = _data(900, 12, seed=5)
    whole = CovarianceAccumulator(12).update(torch.from_numpy(x))
    workers = [CovarianceAccumulator(12) for _ in range(4)]
    sizes = [1, 299, 0, 600]
    start = 0
    for w, s in zip(workers, sizes, strict=True):
        part = torch.from_numpy(x[start : start + s])
        w.update(part.reshape(1, s, 12) if s else part)  # leading dims flattened to rows
        start += s
    merged = workers[0].merge(workers[1]).merge(workers[2]).merge(workers[3])
    assert merged.count == 900
    np.testing.assert_allclose(merged.covariance.numpy(), whole.covariance.numpy(), atol=1e-11)
    np.testing.assert_allclose(merged.covariance.numpy(), np.cov(x.T, bias=True), atol=1e-11)
    # the state dict round-trips
    again = CovarianceAccumulator.from_state_dict(merged.state_dict())
    assert torch.equal(again.covariance, merged.covariance)


def test_covariance_large_mean_is_stable():
    """A mean 1e6 times the spread: the naive E[xxᵀ] − μμᵀ in float64 would lose ~all digits."""
    x = _data(4000, 6, seed=2) * 1e-3 + 1e3
    acc = CovarianceAccumulator(6)
    for part in np.array_split(x, 40):
        acc.update(torch.from_numpy(part))
    expect = np.cov(x.T, bias=True)
    np.testing.assert_allclose(acc.covariance.numpy(), expect, rtol=1e-7, atol=1e-14)


def test_covariance_bad_input():
    acc = CovarianceAccumulator(4)
    with pytest.raises(ValueError, match="no samples"):
        _ = acc.covariance
    with pytest.raises(ValueError, match=r"\[..., 4\]"):
        acc.update(torch.randn(3, 5))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(TypeError):
        acc.update(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="mismatch"):
        acc.merge(CovarianceAccumulator(5))
    with pytest.raises(ValueError):
        CovarianceAccumulator(0)


# ---------------------------------------------------------------------------------------------
# KLT rotation
# ---------------------------------------------------------------------------------------------


def spiked_cov(n, spikes=(400.0, 200.0, 100.0, 50.0), seed=0):
    """V diag(λ) Vᵀ with a few large eigenvalues, V Haar-random."""
    rng = np.random.default_rng(seed)
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.ones(n)
    lam[: len(spikes)] = spikes
    return V @ np.diag(lam) @ V.T


@pytest.mark.parametrize("n", [16, 24, 40, 64, 112])
def test_klt_orthonormal_and_equalises_variance(n):
    cov = spiked_cov(n, seed=n)
    R = klt_rotation(torch.from_numpy(cov), seed=1)
    assert R.dtype == torch.float64 and R.shape == (n, n)
    np.testing.assert_allclose((R @ R.T).numpy(), np.eye(n), atol=1e-12)
    rotated = R.numpy().T @ cov @ R.numpy()
    target = np.trace(cov) / n
    np.testing.assert_allclose(np.diag(rotated), np.full(n, target), rtol=1e-10)
    # the plain Hadamard leaves a spread on the same covariance
    H = hadamard_matrix(n).numpy() / math.sqrt(n)
    d = np.diag(H.T @ cov @ H)
    assert d.max() / d.min() > 1.5


def test_klt_structure_and_seed():
    n = 24
    cov = spiked_cov(n, seed=3)
    R = klt_rotation(torch.from_numpy(cov), seed=7).numpy()
    w, V = np.linalg.eigh(cov)
    V = V[:, ::-1]
    # R = V diag(s) H / sqrt(n): Vᵀ R has entries ±1/sqrt(n) up to each eigenvector's sign;
    # only the 4 spiked eigenvectors are unique (the rest span a degenerate eigenspace)
    M = V[:, :4].T @ R
    np.testing.assert_allclose(np.abs(M), np.full((4, n), 1 / math.sqrt(n)), atol=1e-10)
    # descending order: row i of Vᵀ R is ±(s_i H_i)/sqrt(n), i = 0 the largest eigenvalue
    s = random_hadamard(n, seed=7).signs.double().numpy()
    H = hadamard_matrix(n).numpy() / math.sqrt(n)
    for i in range(4):
        row = M[i] * np.sign(M[i, 0]) * np.sign(s[i] * H[i, 0])
        np.testing.assert_allclose(row, s[i] * H[i], atol=1e-10)
    R2 = klt_rotation(torch.from_numpy(cov), seed=8).numpy()
    assert not np.allclose(R, R2)
    with pytest.raises(ValueError, match="supported sizes"):
        klt_rotation(torch.eye(36))
    with pytest.raises(ValueError, match="square"):
        klt_rotation(torch.ones(4, 8))
    with pytest.raises(ValueError, match="NaN"):
        klt_rotation(torch.full((4, 4), float("nan")))


def test_klt_from_accumulated_data():
    n = 32
    rng = np.random.default_rng(0)
    cov = spiked_cov(n, seed=9)
    x = rng.multivariate_normal(np.zeros(n), cov, size=20000)
    acc = CovarianceAccumulator(n).update(torch.from_numpy(x))
    R = klt_rotation(acc.covariance).numpy()
    var = (x @ R).var(axis=0)
    np.testing.assert_allclose(var, np.full(n, np.trace(acc.covariance.numpy()) / n), rtol=1e-8)


# ---------------------------------------------------------------------------------------------
# Observers and smoothing
# ---------------------------------------------------------------------------------------------


def test_absmax_observer():
    obs = AbsMaxObserver(8)
    xs = [torch.randn(5, 3, 8) * (i + 1) for i in range(4)]
    for x in xs:
        obs.update(x)
    allx = torch.cat([x.reshape(-1, 8) for x in xs]).numpy()
    np.testing.assert_allclose(obs.per_channel().numpy(), np.abs(allx).max(0), rtol=1e-7)
    assert obs.per_tensor() == pytest.approx(float(np.abs(allx).max()), rel=1e-7)
    assert obs.count == 60
    with pytest.raises(ValueError, match="no data"):
        AbsMaxObserver(8).per_channel()
    inferred = AbsMaxObserver().update(xs[0])
    assert inferred.dim == 8 and torch.equal(inferred.per_channel(), xs[0].abs().amax((0, 1)))
    with pytest.raises(ValueError, match=r"\[..., 8\]"):
        inferred.update(torch.randn(2, 9))


def test_percentile_observer_exact_below_capacity():
    obs = PercentileObserver(0.99, max_rows=10000)
    xs = [torch.randn(300, 16) for _ in range(3)]
    for x in xs:
        obs.update(x)
    allx = np.abs(torch.cat(xs).numpy().astype(np.float64))
    np.testing.assert_allclose(
        obs.per_channel().numpy(), np.quantile(allx, 0.99, axis=0), rtol=1e-6
    )
    assert obs.per_tensor() == pytest.approx(float(np.quantile(allx, 0.99)), rel=1e-6)
    assert obs.count == 900
    one = PercentileObserver(1.0)
    one.update(xs[0])
    np.testing.assert_allclose(one.per_channel().numpy(), np.abs(xs[0].numpy()).max(0))
    for bad in (0, 1.5, -0.5):
        with pytest.raises(ValueError, match="q"):
            PercentileObserver(bad)


def test_percentile_observer_reservoir_estimates():
    obs = PercentileObserver(0.9, max_rows=2000, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20000, 4)).astype(np.float32)
    x[10000:] *= 3  # the later half is wider: a biased reservoir would miss it
    for part in np.array_split(x, 10):
        obs.update(torch.from_numpy(part))
    assert obs.count == 20000
    expect = np.quantile(np.abs(x), 0.9, axis=0)
    np.testing.assert_allclose(obs.per_channel().numpy(), expect, rtol=0.1)


def test_smooth_scales_formula():
    rng = np.random.default_rng(1)
    a = np.abs(rng.standard_normal(20)) * 10
    a[3] = 0.0  # a dead channel: floored at min_scale
    W = rng.standard_normal((7, 20))
    W[:, 5] = 0.0  # an all-zero column: its max |W| floored at 1e-5
    for alpha in (0.0, 0.5, 0.85, 1.0):
        s = smooth_scales(torch.from_numpy(a), torch.from_numpy(W), alpha=alpha, min_scale=1e-2)
        wmax = np.maximum(np.abs(W).max(0), 1e-5)
        expect = np.maximum(a**alpha / wmax ** (1 - alpha), 1e-2)
        assert s.dtype == torch.float32 and s.shape == (20,)
        np.testing.assert_allclose(s.numpy(), expect.astype(np.float32), rtol=1e-6)
    assert smooth_scales(torch.from_numpy(a), torch.from_numpy(W))[3] == pytest.approx(1e-2)
    with pytest.raises(ValueError, match="alpha"):
        smooth_scales(torch.ones(3), torch.ones(2, 3), alpha=1.5)
    with pytest.raises(ValueError, match="weight"):
        smooth_scales(torch.ones(3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="act_absmax"):
        smooth_scales(-torch.ones(3), torch.ones(2, 3))


def test_smoothing_preserves_the_product():
    """(x / s) @ (W · s)ᵀ = x @ Wᵀ: the scales migrate, the linear map is unchanged."""
    x = torch.randn(9, 16, dtype=torch.float64) * torch.logspace(-1, 2, 16, dtype=torch.float64)
    W = torch.randn(5, 16, dtype=torch.float64)
    s = smooth_scales(x.abs().amax(0), W).double()
    np.testing.assert_allclose(((x / s) @ (W * s).T).numpy(), (x @ W.T).numpy(), rtol=1e-12)
    # and the activation range is flattened
    ratio = lambda t: float(t.abs().amax(0).max() / t.abs().amax(0).min())  # noqa: E731
    assert ratio(x / s) < ratio(x)


@pytest.mark.gpu
def test_calibration_on_cuda():
    x = torch.from_numpy(_data(500, 16, seed=1))
    acc = CovarianceAccumulator(16).update(x[:200].cuda()).update(x[200:].cuda())
    assert acc.covariance.device.type == "cuda"
    np.testing.assert_allclose(acc.covariance.cpu().numpy(), np.cov(x.numpy().T, bias=True),
                               atol=1e-11)  # fmt: skip
    R = klt_rotation(acc.covariance)
    assert R.device.type == "cuda"
    np.testing.assert_allclose((R @ R.T).cpu().numpy(), np.eye(16), atol=1e-12)


def test_percentile_reservoir_matches_sequential_algorithm_r():
    """The vectorised reservoir equals algorithm R run row by row on the same random draws."""
    cap, seed = 50, 3
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(s, 2, generator=g) for s in (30, 45, 200, 7, 120)]
    obs = PercentileObserver(0.5, max_rows=cap, seed=seed)
    for b in batches:
        obs.update(b)
    # row-by-row algorithm R, drawing the same uniforms batch by batch
    rng = torch.Generator().manual_seed(seed)
    kept, seen = [], 0
    for b in batches:
        rows = list(b.abs())
        room = max(cap - len(kept), 0)
        kept += rows[:room]
        seen += len(rows[:room])
        rest = rows[room:]
        if rest:
            u = torch.rand(len(rest), generator=rng, dtype=torch.float64)
            for row, ui in zip(rest, u.tolist(), strict=True):
                seen += 1
                j = int(ui * seen)  # uniform in [0, seen)
                if j < cap:
                    kept[j] = row
    assert torch.equal(obs._all(), torch.stack(kept))
