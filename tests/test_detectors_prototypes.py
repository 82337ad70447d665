"""The Prototypes estimator against numpy float64 references: class means, seeded k-means
mixtures (deterministic, converged to the means of their clusters), every reduction and metric,
persistence and bad input."""

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

import ood_fast
from ood_fast.detectors.mahalanobis import NotFittedError
from ood_fast.detectors.prototypes import Prototypes, kmeans

LABELS = np.array([-3, 5, 7])


def _data(N=600, D=12, seed=0, sub=3):
    """Each of 3 classes is a mixture of `sub` well-separated blobs; labels -3, 5, 7."""
    rng = np.random.default_rng(seed)
    blobs = rng.standard_normal((3, sub, D)) * 6
    y = rng.integers(0, 3, N)
    b = rng.integers(0, sub, N)
    X = blobs[y, b] + rng.standard_normal((N, D)) * 0.3
    return X.astype(np.float32), LABELS[y]


def _cos(X, P):
    X = np.asarray(X, np.float64)
    P = np.asarray(P, np.float64)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    Pn = P / np.linalg.norm(P, axis=-1, keepdims=True)
    return np.einsum("nd,cmd->ncm", Xn, Pn)


def test_class_means_cosine_vs_numpy():
    X, y = _data(seed=1)
    Q = X[:50] + np.random.default_rng(2).standard_normal((50, X.shape[1])).astype(np.float32)
    est = Prototypes().fit(X, y)
    means = np.stack([X[y == c].astype(np.float64).mean(0) for c in LABELS])  # [C, D]
    sims = _cos(Q, means[:, None, :])[:, :, 0]  # [N, C]
    np.testing.assert_allclose(est.class_scores(Q).numpy(), sims, atol=1e-6)
    np.testing.assert_allclose(est.score(Q).numpy(), sims.max(1), atol=1e-6)
    np.testing.assert_array_equal(est.predict(Q).numpy(), LABELS[sims.argmax(1)])
    np.testing.assert_array_equal(est.classes_.numpy(), LABELS)
    np.testing.assert_array_equal(est.counts_.numpy(), [(y == c).sum() for c in LABELS])
    np.testing.assert_allclose(est.centers_[:, 0].numpy(), means, rtol=1e-6, atol=1e-6)
    norms = torch.linalg.vector_norm(est.prototypes_, dim=2)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert est.score(Q).dtype == torch.float32 and est.num_classes_ == 3
    assert est.n_features_in_ == X.shape[1]


def test_kmeans_deterministic_and_converged():
    X, y = _data(seed=3, sub=3)
    a = Prototypes(prototypes_per_class=3, seed=7).fit(X, y)
    b = Prototypes(prototypes_per_class=3, seed=7).fit(torch.from_numpy(X), torch.from_numpy(y))
    assert torch.equal(a.prototypes_, b.prototypes_) and torch.equal(a.centers_, b.centers_)
    assert a.prototypes_.shape == (3, 3, X.shape[1])
    assert bool((a.n_iter_ < a.iters).all()) and bool((a.n_iter_ >= 1).all())
    for ci, c in enumerate(LABELS):
        Xc = X[y == c].astype(np.float64)
        centers = a.centers_[ci].numpy().astype(np.float64)
        assign = ((Xc[:, None, :] - centers[None]) ** 2).sum(-1).argmin(1)
        assert len(np.unique(assign)) == 3  # the three blobs found
        for m in range(3):
            np.testing.assert_allclose(centers[m], Xc[assign == m].mean(0), atol=1e-5)
    # other seeds find the same blobs (maybe in another order): same sets of centres
    c = Prototypes(prototypes_per_class=3, seed=8).fit(X, y)
    for ci in range(3):
        A = a.centers_[ci].numpy()
        C = c.centers_[ci].numpy()
        A = A[np.lexsort(A.T)]
        C = C[np.lexsort(C.T)]
        np.testing.assert_allclose(A, C, atol=1e-4)


def test_kmeans_function_duplicates_and_reseeding():
    # two distinct points, three clusters: the duplicate centre goes empty and is re-seeded
    X = torch.tensor([[0.0, 0.0]] * 5 + [[3.0, 4.0]] * 5, dtype=torch.float64)
    for seed in range(4):
        centers, assign, n_iter = kmeans(
            X, 3, iters=10, generator=torch.Generator().manual_seed(seed)
        )
        pts = {tuple(r) for r in centers.tolist()}
        assert pts == {(0.0, 0.0), (3.0, 4.0)}
        assert assign.shape == (10,)
    # m == n: every point its own centre
    Y = torch.randn(4, 3, dtype=torch.float64)
    centers, assign, _ = kmeans(Y, 4, generator=torch.Generator().manual_seed(0))
    assert sorted(assign.tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(centers[assign], Y)
    with pytest.raises(ValueError, match="m <= n"):
        kmeans(Y, 5)


@pytest.mark.parametrize("reduce", ["max", "mean", "logsumexp"])
@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_reductions_and_metrics_vs_numpy(reduce, metric):
    X, y = _data(N=300, seed=4, sub=2)
    Q = np.random.default_rng(5).standard_normal((40, X.shape[1])).astype(np.float32) * 4
    T = 0.5 if reduce == "logsumexp" else 2.0
    est = Prototypes(3, metric=metric, reduce=reduce, temperature=T).fit(X, y)
    P = est.prototypes_.numpy().astype(np.float64)
    if metric == "cosine":
        s = _cos(Q, P)
    elif metric == "ip":
        s = np.einsum("nd,cmd->ncm", Q.astype(np.float64), P)
    else:
        s = -((Q.astype(np.float64)[:, None, None, :] - P[None]) ** 2).sum(-1)
    s = s / T
    per = {"max": s.max(2), "mean": s.mean(2), "logsumexp": logsumexp(s, axis=2)}[reduce]
    tol = 1e-4 * max(1.0, np.abs(per).max())
    np.testing.assert_allclose(est.class_scores(Q).numpy(), per, atol=tol)
    np.testing.assert_allclose(est.score(Q).numpy(), per.max(1), atol=tol)
    if metric != "cosine":
        assert torch.equal(est.prototypes_, est.centers_)


def test_in_distribution_scores_higher():
    X, y = _data(seed=6)
    est = Prototypes(3).fit(X, y)
    ood = np.random.default_rng(7).standard_normal((200, X.shape[1])).astype(np.float32) * 6
    assert float(est.score(X[:200]).mean()) > float(est.score(ood).mean())
    assert (est.predict(X).numpy() == y).mean() > 0.99


def test_save_load_bit_identical(tmp_path):
    X, y = _data(seed=8)
    Q = X[:30] * 1.1
    est = Prototypes(2, reduce="logsumexp", temperature=0.1, seed=3).fit(X, y)
    est.save(tmp_path / "p.safetensors")
    back = Prototypes.load(tmp_path / "p.safetensors")
    assert repr(back) == repr(est)
    assert torch.equal(back.score(Q), est.score(Q))
    assert torch.equal(back.class_scores(Q), est.class_scores(Q))
    assert torch.equal(back.predict(Q), est.predict(Q))
    assert torch.equal(back.n_iter_, est.n_iter_)
    again = ood_fast.load(tmp_path / "p.safetensors")
    assert isinstance(again, Prototypes) and torch.equal(again.score(Q), est.score(Q))


def test_empty_queries():
    X, y = _data(N=60)
    est = Prototypes().fit(X, y)
    Z = np.zeros((0, X.shape[1]), np.float32)
    assert est.score(Z).shape == (0,)
    assert est.class_scores(Z).shape == (0, 3)
    assert est.predict(Z).shape == (0,)


def test_bad_input():
    X, y = _data(N=60)
    with pytest.raises(NotFittedError, match="fit"):
        Prototypes().score(X)
    with pytest.raises(NotFittedError):
        Prototypes().save("/nonexistent/p")
    with pytest.raises(NotFittedError):
        Prototypes().n_features_in_  # noqa: B018
    est = Prototypes().fit(X, y)
    with pytest.raises(ValueError, match="D=12"):
        est.score(np.zeros((2, 5), np.float32))
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        Prototypes().fit(bad, y)
    with pytest.raises(ValueError, match="non-finite"):
        est.score(bad)
    with pytest.raises(TypeError, match="integers"):
        Prototypes().fit(X, y.astype(np.float32))
    with pytest.raises(ValueError, match="labels"):
        Prototypes().fit(X, y[:-1])
    with pytest.raises(ValueError, match="empty"):
        Prototypes().fit(X[:0], y[:0])
    few = y.copy()
    few[:] = 5
    few[:2] = -3  # class -3 has 2 samples
    with pytest.raises(ValueError, match=r"class -3 has 2 sample\(s\).*prototypes_per_class=3"):
        Prototypes(3).fit(X, few)
    for kw, err in (
        ({"prototypes_per_class": 0}, ValueError),
        ({"prototypes_per_class": 1.5}, TypeError),
        ({"iters": 0}, ValueError),
        ({"metric": "l1"}, ValueError),
        ({"reduce": "min"}, ValueError),
        ({"temperature": 0.0}, ValueError),
        ({"temperature": float("inf")}, ValueError),
        ({"temperature": "1"}, TypeError),
        ({"seed": 1.0}, TypeError),
        ({"backend": "gpu"}, ValueError),
    ):
        with pytest.raises(err):
            Prototypes(**kw)


@pytest.mark.gpu
def test_cuda_fit_and_score():
    X, y = _data(seed=9)
    ref = Prototypes(3, seed=1).fit(X, y)
    est = Prototypes(3, seed=1).fit(torch.from_numpy(X).cuda(), torch.from_numpy(y).cuda())
    s = est.score(torch.from_numpy(X[:20]).cuda())
    assert s.is_cuda
    torch.testing.assert_close(s.cpu(), ref.score(X[:20]), atol=1e-4, rtol=0)
    assert est.predict(torch.from_numpy(X[:20]).cuda()).device.type == "cuda"
