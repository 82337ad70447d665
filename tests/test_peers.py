"""Each peer (ood_fast.peers) against a float64 numpy Mahalanobis on a small problem.

Tests that run pytorch-ood are marked ``pytorch_ood`` and skip, with pytorch-ood's import error
as the reason, where it cannot import (e.g. no torchvision next to this torch); .ci/peers_env.sh
runs them in an environment where it does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ood_fast import peers

pytest.importorskip("sklearn")


def require_pytorch_ood():
    ok = peers.pytorch_ood_available()
    if ok is not True:
        pytest.skip(ok)


def problem(n=240, m=50, d=7, c=3, seed=0, offset=3.0):
    """Class-conditional Gaussians with a correlated covariance and a common offset."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    means = rng.normal(scale=1.5, size=(c, d)) + offset
    y = np.arange(n) % c
    rng.shuffle(y)
    x = means[y] + rng.normal(size=(n, d)) @ A.T
    t = np.concatenate(
        [
            means[rng.integers(0, c, m)] + rng.normal(size=(m, d)) @ A.T,
            rng.normal(scale=3.0, size=(m // 2, d)) + offset,
        ]
    )
    return x, y, t


def reference(x, y, t, covariance="tied"):
    """float64 numpy: [M, C] squared distances under the MLE covariance(s)."""
    C = int(y.max()) + 1
    means = np.stack([x[y == k].mean(0) for k in range(C)])
    xc = x - means[y]
    d2 = np.empty((t.shape[0], C))
    for k in range(C):
        if covariance == "tied":
            cov = xc.T @ xc / x.shape[0]
        elif covariance == "per_class":
            xs = xc[y == k]
            cov = xs.T @ xs / xs.shape[0]
        else:
            xs = xc[y == k]
            cov = np.diag((xs * xs).mean(0))
        diff = t - means[k]
        d2[:, k] = np.einsum("nd,nd->n", diff, np.linalg.solve(cov, diff.T).T)
    return d2


def background_d2(x, t):
    mu = x.mean(0)
    cov = (x - mu).T @ (x - mu) / x.shape[0]
    diff = t - mu
    return np.einsum("nd,nd->n", diff, np.linalg.solve(cov, diff.T).T)


def close(got, want, rtol):
    got = np.asarray(torch.as_tensor(got).detach().cpu().double())
    assert got.shape == want.shape
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= rtol, err


def test_openood_matches_reference():
    x, y, t = problem()
    want = -reference(x, y, t).min(1)
    f = peers.openood_fit(torch.tensor(x, dtype=torch.float32), torch.tensor(y))
    assert f.class_mean.dtype == torch.float32 and f.precision.dtype == torch.float32
    close(peers.openood_score(f, torch.tensor(t, dtype=torch.float32)), want, 1e-5)
    # batch size does not change the result; numpy inputs work
    close(peers.openood_mahalanobis_score(x, y, t, batch=7), want, 1e-5)


@pytest.mark.parametrize("covariance", ["tied", "per_class", "diagonal"])
def test_torch_expression_matches_reference(covariance):
    x, y, t = problem(n=300)
    want = -reference(x, y, t, covariance).min(1)
    got64 = peers.torch_expression(torch.tensor(x), torch.tensor(y), torch.tensor(t), covariance)
    assert got64.dtype == torch.float64
    close(got64, want, 1e-10)
    got32 = peers.torch_expression_score(
        peers.torch_expression_fit(x.astype(np.float32), y, covariance=covariance),
        t.astype(np.float32),
        chunk=16,
    )
    assert got32.dtype == torch.float32
    close(got32, want, 1e-4)


def test_torch_expression_singular_covariance():
    """A constant feature (a dead ReLU unit): the eigh fallback ignores the null direction."""
    x, y, t = problem()
    x = np.concatenate([x, np.zeros((x.shape[0], 1))], 1)
    t = np.concatenate([t, np.zeros((t.shape[0], 1))], 1)
    want = -reference(x[:, :-1], y, t[:, :-1]).min(1)
    close(peers.torch_expression(x, y, t), want, 1e-8)


def test_sklearn_matches_reference():
    x, y, t = problem()
    want = -reference(x, y, t).min(1)
    got = peers.sklearn_per_class(x, y, t)
    close(got, want, 1e-10)
    f = peers.sklearn_fit(torch.tensor(x), torch.tensor(y))
    loc = f.estimator.location_.copy()
    peers.sklearn_score(f, t)
    np.testing.assert_array_equal(f.estimator.location_, loc)  # restored


def test_bad_labels():
    x, y, t = problem()
    with pytest.raises(ValueError, match="contiguous"):
        peers.torch_expression_fit(x, np.where(y == 1, 2, y) + 1)
    with pytest.raises(TypeError, match="integers"):
        peers.openood_fit(x, y.astype(float))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        peers.sklearn_fit(x[:, 0], y)
    with pytest.raises(ValueError, match="covariance"):
        peers.torch_expression_fit(x, y, covariance="full")


def test_pytorch_ood_unavailable_is_none_with_reason():
    ok = peers.pytorch_ood_available()
    if ok is True:
        pytest.skip("pytorch-ood imports here")
    assert isinstance(ok, str) and "pytorch-ood cannot import" in ok
    x, y, t = problem()
    assert peers.pytorch_ood_mahalanobis(x, y, t) is None
    assert peers.pytorch_ood_rmd(x, y, t) is None
    assert peers.pytorch_ood_fit(x, y) is None


@pytest.mark.pytorch_ood
def test_pytorch_ood_mahalanobis_matches_reference():
    require_pytorch_ood()
    x, y, t = problem()
    want = -reference(x, y, t).min(1)
    close(peers.pytorch_ood_mahalanobis(x, y, t), want, 1e-4)
    # native: ½ min d² on the summed-covariance scale, higher = OOD
    f = peers.pytorch_ood_fit(torch.tensor(x, dtype=torch.float32), torch.tensor(y))
    native = f.detector.predict_features(torch.tensor(t, dtype=torch.float32))
    close(native, -want / (2 * x.shape[0]), 1e-4)


@pytest.mark.pytorch_ood
def test_pytorch_ood_rmd_matches_reference():
    require_pytorch_ood()
    x, y, t = problem()
    want = -(reference(x, y, t) - background_d2(x, t)[:, None]).min(1)
    close(peers.pytorch_ood_rmd(x, y, t), want, 1e-4)


def test_integration_import_error_without_pytorch_ood():
    ok = peers.pytorch_ood_available()
    if ok is True:
        pytest.skip("pytorch-ood imports here (the integration tests cover the module)")
    import importlib

    with pytest.raises(ImportError, match="needs pytorch-ood"):
        importlib.import_module("ood_fast.integrations.pytorch_ood")


# ---------------------------------------------------------------------------------------------
# KNN peers: every one returns OpenOOD's −‖q̂ − b̂_(k)‖², checked against float64 numpy
# ---------------------------------------------------------------------------------------------


def knn_problem(m=700, n=90, d=24, seed=1):
    rng = np.random.default_rng(seed)
    bank = rng.normal(size=(m, d)) + 0.5
    q = np.concatenate([rng.normal(size=(n, d)) + 0.5, rng.normal(scale=2.0, size=(n // 3, d))])
    q[0] = 0.0  # a zero query: both normalizers keep it at zero
    return bank.astype(np.float32), q.astype(np.float32)


def knn_reference(bank, q, ks):
    """float64: OpenOOD's normalizer, squared L2, k-th smallest, negated: [n, len(ks)]."""
    b = bank.astype(np.float64)
    b = b / (np.linalg.norm(b, axis=1, keepdims=True) + 1e-10)
    x = q.astype(np.float64)
    x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)
    d2 = ((x[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    d2.sort(axis=1)
    return -d2[:, [k - 1 for k in ks]]


def close_abs(got, want, atol):
    got = np.asarray(torch.as_tensor(got).detach().cpu().double())
    assert got.shape == want.shape
    err = np.abs(got - want).max()
    assert err <= atol, err


@pytest.mark.parametrize("k", [1, 17, 700])
def test_knn_peers_match_reference(k):
    bank, q = knn_problem()
    want = knn_reference(bank, q, [k])[:, 0]
    got = peers.torch_knn_score(peers.torch_knn_fit(bank), q, k, chunk=32)  # several chunks
    assert got.dtype == torch.float32 and got.shape == (q.shape[0],)
    close_abs(got, want, 2e-6)
    close_abs(peers.sklearn_knn_score(peers.sklearn_knn_fit(torch.tensor(bank)), q, k), want, 2e-6)


@pytest.mark.parametrize("k", [1, 17, 700])
def test_faiss_peers_match_reference(k):
    pytest.importorskip("faiss")
    assert peers.faiss_available() is True
    bank, q = knn_problem()
    want = knn_reference(bank, q, [k])[:, 0]
    l2 = peers.faiss_l2_fit(bank)
    assert l2.ntotal == bank.shape[0]
    close_abs(peers.faiss_l2_score(l2, q, k), want, 2e-6)
    close_abs(peers.faiss_l2_score(l2, torch.tensor(q), k, threads=1), want, 2e-6)
    close_abs(peers.faiss_ip_score(peers.faiss_ip_fit(bank), q, k), want, 2e-6)


def test_faiss_sweep_and_ours_agree():
    pytest.importorskip("faiss")
    import ood_fast

    bank, q = knn_problem()
    ks = [1, 5, 50, 700]
    want = knn_reference(bank, q, ks)
    sweep = peers.faiss_l2_sweep(peers.faiss_l2_fit(bank), q, ks)
    assert sweep.shape == (q.shape[0], len(ks))
    close_abs(sweep, want, 2e-6)
    ours = ood_fast.KNN(k=5, backend="torch").fit(bank)
    close_abs(ours.score_sweep(q, ks), want, 2e-6)
    close_abs(ours.score(q), want[:, 1], 2e-6)


def test_knn_peers_bad_input():
    bank, q = knn_problem()
    f = peers.torch_knn_fit(bank)
    with pytest.raises(ValueError, match="out of range"):
        peers.torch_knn_score(f, q, bank.shape[0] + 1)
    with pytest.raises(ValueError, match="out of range"):
        peers.sklearn_knn_score(peers.sklearn_knn_fit(bank), q, 0)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        peers.torch_knn_fit(bank[:, 0])
    with pytest.raises(ValueError, match="empty"):
        peers.torch_knn_fit(bank[:0])
    assert peers.sklearn_knn_score(peers.sklearn_knn_fit(bank), q[:0], 3).shape == (0,)


@pytest.mark.pytorch_ood
def test_pytorch_ood_knn_matches_reference():
    require_pytorch_ood()
    bank, q = knn_problem()
    for k in (1, 50):
        close_abs(peers.pytorch_ood_knn(bank, q, k), knn_reference(bank, q, [k])[:, 0], 2e-6)
