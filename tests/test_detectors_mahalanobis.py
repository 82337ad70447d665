"""The Mahalanobis estimators against independent float64 implementations (numpy, scipy, sklearn),
streaming/merging, bad input, singular covariances, gradients and backends."""

import warnings

import numpy as np
import pytest
import torch

import ood_fast
from ood_fast.detectors.mahalanobis import (
    GaussianStats,
    NotFittedError,
    SingularCovarianceWarning,
)

COVS = ("tied", "per_class", "diagonal")


def _data(N=600, D=8, C=4, seed=0, labels=None, offset=3.0):
    """Class-structured float64 features: correlated noise + separated class means + offset."""
    rng = np.random.default_rng(seed)
    A = 0.5 * rng.standard_normal((D, D)) / np.sqrt(D) + np.eye(D)  # well conditioned
    y = rng.integers(0, C, N)
    means = rng.standard_normal((C, D)) * 2 + offset
    X = rng.standard_normal((N, D)) @ A + means[y]
    if labels is not None:
        y = np.asarray(labels)[y]
    return X, y


def _class_stats(X, y):
    classes = np.unique(y)
    mu = np.stack([X[y == c].mean(0) for c in classes])
    return classes, mu


def _test_points(X, n=9, seed=1):
    rng = np.random.default_rng(seed)
    return X[:n] + rng.standard_normal((n, X.shape[1])) * 0.3


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------


def test_tied_matches_sklearn_empirical_covariance_and_scipy():
    from scipy.spatial.distance import mahalanobis as scipy_md
    from sklearn.covariance import EmpiricalCovariance

    X, y = _data(labels=[-3, 5, 7, 100])
    classes, mu = _class_stats(X, y)
    Xc = X - mu[np.searchsorted(classes, y)]
    emp = EmpiricalCovariance(assume_centered=True).fit(Xc)
    est = ood_fast.Mahalanobis().fit(X, y)
    assert est.classes_.tolist() == [-3, 5, 7, 100]
    assert est.counts_.tolist() == [int((y == c).sum()) for c in classes]
    assert est.n_features_in_ == 8 and est.num_classes_ == 4
    assert est.covariance_.dtype == torch.float64 and est.means_.dtype == torch.float64
    np.testing.assert_allclose(est.means_.numpy(), mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(est.covariance_.numpy(), emp.covariance_, rtol=1e-10, atol=1e-12)
    xt = _test_points(X)
    want = np.stack([emp.mahalanobis(xt - mu[c]) for c in range(len(classes))], axis=1)
    got = est.distances(xt)
    assert got.shape == (9, 4) and got.dtype == torch.float32
    assert _rel(got.numpy(), want) < 1e-4
    s = est.score(xt)
    assert s.dtype == torch.float32 and s.shape == (9,)
    assert _rel(s.numpy(), -want.min(1)) < 1e-4
    assert est.predict(xt).tolist() == classes[want.argmin(1)].tolist()
    prec = np.linalg.inv(emp.covariance_)
    for n, c in [(0, 0), (3, 2), (8, 3)]:
        d = scipy_md(xt[n], mu[c], prec)
        assert abs(float(got[n, c]) - d * d) <= 1e-4 * d * d


def test_per_class_and_diagonal_match_numpy_float64():
    X, y = _data(C=3, seed=2)
    classes, mu = _class_stats(X, y)
    xt = _test_points(X)
    est = ood_fast.Mahalanobis("per_class").fit(X, y)
    covs = np.stack([np.cov(X[y == c].T, bias=True) for c in classes])
    np.testing.assert_allclose(est.covariance_.numpy(), covs, rtol=1e-10, atol=1e-12)
    want = np.stack(
        [
            np.einsum("nd,de,ne->n", xt - mu[c], np.linalg.inv(covs[c]), xt - mu[c])
            for c in range(3)
        ],
        axis=1,
    )
    assert _rel(est.distances(xt).numpy(), want) < 1e-4

    est = ood_fast.Mahalanobis("diagonal").fit(X, y)
    var = np.stack([X[y == c].var(0) for c in classes])
    assert est.covariance_.shape == (3, 8)
    np.testing.assert_allclose(est.covariance_.numpy(), var, rtol=1e-10)
    want = np.stack([((xt - mu[c]) ** 2 / var[c]).sum(1) for c in range(3)], axis=1)
    assert _rel(est.distances(xt).numpy(), want) < 1e-4
    assert _rel(est.score(xt).numpy(), -want.min(1)) < 1e-4


def test_float_shrinkage_formula():
    X, y = _data(seed=3)
    base = ood_fast.Mahalanobis().fit(X, y).covariance_
    est = ood_fast.Mahalanobis(shrinkage=0.3).fit(X, y)
    mu = torch.diagonal(base).mean()
    want = 0.7 * base + 0.3 * mu * torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(est.covariance_, want, rtol=1e-12, atol=1e-12)
    assert est.shrinkage_ == 0.3
    d = ood_fast.Mahalanobis("diagonal", shrinkage=0.5).fit(X, y)
    v = ood_fast.Mahalanobis("diagonal").fit(X, y).covariance_
    torch.testing.assert_close(d.covariance_, 0.5 * v + 0.5 * v.mean(1, keepdim=True))


@pytest.mark.parametrize("kind", ["ledoit_wolf", "oas"])
def test_shrinkage_values_match_sklearn(kind):
    from sklearn.covariance import ledoit_wolf, oas

    fn = {"ledoit_wolf": ledoit_wolf, "oas": oas}[kind]
    X, y = _data(N=300, D=12, C=3, seed=4)
    classes, mu = _class_stats(X, y)
    Xc = X - mu[np.searchsorted(classes, y)]
    cov, alpha = fn(Xc, assume_centered=True)
    est = ood_fast.Mahalanobis(shrinkage=kind).fit(X, y)
    assert est.shrinkage_ == pytest.approx(alpha, rel=1e-9)
    np.testing.assert_allclose(est.covariance_.numpy(), cov, rtol=1e-9, atol=1e-12)

    pc = ood_fast.Mahalanobis("per_class", shrinkage=kind).fit(X, y)
    for i, c in enumerate(classes):
        cov_c, a_c = fn(X[y == c] - mu[i], assume_centered=True)
        assert float(pc.shrinkage_[i]) == pytest.approx(a_c, rel=1e-9)
        np.testing.assert_allclose(pc.covariance_[i].numpy(), cov_c, rtol=1e-9, atol=1e-12)

    rmd = ood_fast.RelativeMahalanobis(shrinkage=kind).fit(X, y)
    cov_g, a_g = fn(X - X.mean(0), assume_centered=True)
    assert rmd.background_shrinkage_ == pytest.approx(a_g, rel=1e-9)
    np.testing.assert_allclose(rmd.background_covariance_.numpy(), cov_g, rtol=1e-9, atol=1e-12)


def test_ledoit_wolf_streaming():
    """per_class: exact across chunks and merges; tied: exact for one fit, close when streamed."""
    from sklearn.covariance import ledoit_wolf

    X, y = _data(N=400, D=10, C=3, seed=5)
    classes, mu = _class_stats(X, y)
    Xc = X - mu[np.searchsorted(classes, y)]
    _, alpha = ledoit_wolf(Xc, assume_centered=True)
    _, alpha_g = ledoit_wolf(X - X.mean(0), assume_centered=True)
    pc = ood_fast.Mahalanobis("per_class", shrinkage="ledoit_wolf")
    tied = ood_fast.RelativeMahalanobis(shrinkage="ledoit_wolf")
    for s in range(0, 400, 70):
        pc.partial_fit(X[s : s + 70], y[s : s + 70])
        tied.partial_fit(X[s : s + 70], y[s : s + 70])
    for i, c in enumerate(classes):
        _, a_c = ledoit_wolf(X[y == c] - mu[i], assume_centered=True)
        assert float(pc.shrinkage_[i]) == pytest.approx(a_c, rel=1e-8)
    assert tied.background_shrinkage_ == pytest.approx(alpha_g, rel=1e-8)  # global: exact
    assert tied.shrinkage_ == pytest.approx(alpha, rel=1e-2)  # documented approximation
    a = ood_fast.Mahalanobis("per_class", shrinkage="ledoit_wolf").fit(X[:200], y[:200])
    b = ood_fast.Mahalanobis("per_class", shrinkage="ledoit_wolf").fit(X[200:], y[200:])
    a.merge(b)
    torch.testing.assert_close(a.shrinkage_, pc.shrinkage_, rtol=1e-8, atol=0)


def test_gaussian_likelihood_matches_scipy():
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal

    X, y = _data(N=500, D=6, C=3, seed=6, offset=0.0)
    classes, mu = _class_stats(X, y)
    xt = _test_points(X)
    counts = np.array([(y == c).sum() for c in classes])
    for cov_mode in COVS:
        for priors in ("empirical", "uniform", [0.2, 0.3, 0.5]):
            est = ood_fast.GaussianLikelihood(cov_mode, priors=priors).fit(X, y)
            if cov_mode == "tied":
                covs = [est.covariance_.numpy()] * 3
            elif cov_mode == "per_class":
                covs = list(est.covariance_.numpy())
            else:
                covs = [np.diag(v) for v in est.covariance_.numpy()]
            pri = {"empirical": counts / counts.sum(), "uniform": np.ones(3) / 3}.get(
                priors if isinstance(priors, str) else "", np.asarray(priors)
            )
            logp = np.stack(
                [np.log(pri[c]) + multivariate_normal(mu[c], covs[c]).logpdf(xt) for c in range(3)],
                axis=1,
            )
            want = logsumexp(logp, axis=1)
            got = est.score(xt).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
            assert est.predict(xt).tolist() == classes[logp.argmax(1)].tolist()


def test_relative_mahalanobis_matches_numpy():
    X, y = _data(seed=7)
    classes, mu = _class_stats(X, y)
    xt = _test_points(X)
    for cov_mode in COVS:
        m = ood_fast.Mahalanobis(cov_mode).fit(X, y)
        r = ood_fast.RelativeMahalanobis(cov_mode).fit(X, y)
        g = X.mean(0)
        if cov_mode == "diagonal":
            v = X.var(0)
            np.testing.assert_allclose(r.background_covariance_.numpy(), v, rtol=1e-10)
            d0 = ((xt - g) ** 2 / v).sum(1)
        else:
            cg = np.cov(X.T, bias=True)
            np.testing.assert_allclose(r.background_covariance_.numpy(), cg, rtol=1e-10, atol=1e-12)
            d0 = np.einsum("nd,de,ne->n", xt - g, np.linalg.inv(cg), xt - g)
        d = m.distances(xt).numpy()
        np.testing.assert_allclose(r.score(xt).numpy(), -(d.min(1) - d0), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(r.distances(xt).numpy(), d - d0[:, None], rtol=1e-4, atol=1e-3)
        assert torch.equal(r.predict(xt), m.predict(xt))


def test_large_dimension_tied():
    from sklearn.covariance import EmpiricalCovariance

    X, y = _data(N=1600, D=777, C=3, seed=8)
    X = X.astype(np.float32).astype(np.float64)  # the float32 features, exactly
    classes, mu = _class_stats(X, y)
    emp = EmpiricalCovariance(assume_centered=True).fit(X - mu[np.searchsorted(classes, y)])
    est = ood_fast.Mahalanobis().fit(torch.from_numpy(X).float(), y)  # fp32 GEMM path
    assert _rel(est.covariance_.numpy(), emp.covariance_) < 1e-6
    xt = _test_points(X, 4)
    want = np.stack([emp.mahalanobis(xt - mu[c]) for c in range(3)], axis=1)
    assert _rel(est.distances(xt).numpy(), want) < 1e-3


# ---------------------------------------------------------------------------------------------
# streaming and merging
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cov_mode", COVS)
def test_partial_fit_and_merge_equal_fit(cov_mode):
    X, y = _data(N=700, seed=9, labels=[10, 20, 30, 40])
    full = ood_fast.Mahalanobis(cov_mode).fit(X, y)
    stream = ood_fast.Mahalanobis(cov_mode)
    # the first chunk lacks class 40: classes grow as they appear
    order = np.argsort(y == 40, kind="stable")
    Xs, ys = X[order], y[order]
    for s in range(0, 700, 128):
        stream.partial_fit(Xs[s : s + 128], ys[s : s + 128])
    a = ood_fast.Mahalanobis(cov_mode).partial_fit(X[:350], y[:350])
    b = ood_fast.Mahalanobis(cov_mode).partial_fit(X[350:], y[350:])
    merged = a.merge(b)
    xt = _test_points(X)
    for other in (stream, merged):
        assert other.classes_.tolist() == [10, 20, 30, 40]
        assert torch.equal(other.counts_, full.counts_)
        torch.testing.assert_close(other.means_, full.means_, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(other.covariance_, full.covariance_, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(other.score(xt), full.score(xt), rtol=1e-5, atol=1e-5)


def test_merge_disjoint_classes_and_empty():
    X, y = _data(N=400, seed=10)
    full = ood_fast.RelativeMahalanobis().fit(X, y)
    a = ood_fast.RelativeMahalanobis().partial_fit(X[y < 2], y[y < 2])
    b = ood_fast.RelativeMahalanobis().partial_fit(X[y >= 2], y[y >= 2])
    a.merge(ood_fast.RelativeMahalanobis())  # merging nothing is a no-op
    a.merge(b)
    torch.testing.assert_close(a.covariance_, full.covariance_, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.background_covariance_, full.background_covariance_)
    empty = ood_fast.RelativeMahalanobis().merge(full)
    torch.testing.assert_close(empty.covariance_, full.covariance_)
    with pytest.raises(TypeError, match="expected RelativeMahalanobis"):
        a.merge(ood_fast.Mahalanobis())
    with pytest.raises(ValueError, match="statistics differ"):
        ood_fast.Mahalanobis().merge(ood_fast.Mahalanobis("per_class").fit(X, y))


def test_stats_covariance_float32_accuracy():
    """fp32 chunk GEMMs accumulated in float64 about a reference point: ≤ 1e-6 relative."""
    g = torch.Generator().manual_seed(0)
    N, D, C = 6000, 300, 20
    means = torch.randn(C, D, generator=g) * 3 + 10  # far from 0, class-structured
    y = torch.randint(0, C, (N,), generator=g)
    X = (
        torch.randn(N, D, generator=g) @ (torch.randn(D, D, generator=g) / D**0.5) + means[y]
    ).float()
    st = GaussianStats("tied", chunk=1024).update(X, y)
    X64 = X.double()
    mu = torch.zeros(C, D, dtype=torch.float64).index_add_(0, y, X64) / torch.bincount(y)[:, None]
    Xc = X64 - mu[y]
    want = Xc.T @ Xc / N
    err = torch.linalg.matrix_norm(st.covariance("tied") - want) / torch.linalg.matrix_norm(want)
    assert err < 1e-6
    glob = X64 - X64.mean(0)
    err_g = torch.linalg.matrix_norm(st.covariance("global") - glob.T @ glob / N)
    assert err_g / torch.linalg.matrix_norm(glob.T @ glob / N) < 1e-6


def test_num_classes_fixed():
    X, y = _data(N=200, C=3, seed=11)
    est = ood_fast.Mahalanobis(num_classes=3).fit(X, y)
    assert est.classes_.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="label 5 out of range for num_classes=3"):
        ood_fast.Mahalanobis(num_classes=3).fit(X, np.where(y == 2, 5, y))
    with pytest.raises(ValueError, match=r"num_classes=4 but classes \[3\] have no samples"):
        ood_fast.Mahalanobis(num_classes=4).fit(X, y)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_bad_inputs():
    X, y = _data(N=100, C=2, seed=12)
    bad = X.copy()
    bad[3, 1] = np.nan
    bad[7, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 non-finite values.*first at row 3"):
        ood_fast.Mahalanobis().fit(bad, y)
    est = ood_fast.Mahalanobis()
    with pytest.raises(RuntimeError, match="call fit first"):
        est.score(X)
    with pytest.raises(NotFittedError, match="call fit first"):
        est.distances(X)
    with pytest.raises(NotFittedError, match="call fit first"):
        est.predict(X)
    with pytest.raises(NotFittedError):
        _ = est.means_
    with pytest.raises(TypeError, match="labels must be integers"):
        est.fit(X, y.astype(np.float64))
    with pytest.raises(ValueError, match="expected 100 labels"):
        est.fit(X, y[:50])
    with pytest.raises(ValueError, match="empty input"):
        est.fit(X[:0], y[:0])
    with pytest.raises(ValueError, match="2-D"):
        est.fit(X[0], y[:1])
    est.fit(X, y)
    with pytest.raises(ValueError, match="expected D=8, got D=5"):
        est.score(X[:, :5])
    with pytest.raises(ValueError, match="non-finite"):
        est.score(bad)
    with pytest.raises(ValueError, match="expected D=8, got D=3"):
        est.partial_fit(X[:, :3], y)
    for cls in (ood_fast.Mahalanobis, ood_fast.RelativeMahalanobis, ood_fast.GaussianLikelihood):
        e = cls().fit(X, y)
        assert e.score(X[:0]).shape == (0,)
        assert e.distances(X[:0]).shape == (0, 2)
        assert e.predict(X[:0]).shape == (0,)
    y1 = y.copy()
    y1[0] = 7  # class 7 has a single sample
    with pytest.raises(ValueError, match=r"class 7 has 1 sample\(s\).*per_class"):
        ood_fast.Mahalanobis("per_class").fit(X, y1)
    with pytest.raises(ValueError, match="class 7 has 1 sample"):
        ood_fast.GaussianLikelihood("diagonal").fit(X, y1)
    ood_fast.Mahalanobis("tied").fit(X, y1)  # tied pools: fine
    with pytest.raises(ValueError, match="covariance must be one of"):
        ood_fast.Mahalanobis("full")
    with pytest.raises(ValueError, match="shrinkage must be"):
        ood_fast.Mahalanobis(shrinkage=1.5)
    with pytest.raises(ValueError, match="dense covariance"):
        ood_fast.Mahalanobis("diagonal", shrinkage="oas")
    with pytest.raises(ValueError, match="priors"):
        ood_fast.GaussianLikelihood(priors=[0.5, -1])
    with pytest.raises(ValueError, match="expected 2 weights"):
        ood_fast.GaussianLikelihood(priors=[1, 1, 1]).fit(X, y)


def test_singular_covariance_warns_and_scores_finitely():
    X, y = _data(N=300, D=8, C=3, seed=13)
    Xs = X.copy()
    Xs[:, 2] = 5.0  # a constant feature
    for cov_mode in COVS:
        with pytest.warns(SingularCovarianceWarning, match="shrinkage="):
            est = ood_fast.Mahalanobis(cov_mode).fit(Xs, y)
        assert torch.isfinite(est.score(Xs[:20])).all()
    with pytest.warns(SingularCovarianceWarning):  # fewer samples than features
        est = ood_fast.GaussianLikelihood("per_class").fit(X[:12], np.arange(12) % 2)
    assert torch.isfinite(est.score(X[:5])).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ood_fast.Mahalanobis(shrinkage=0.1).fit(Xs, y)  # shrinkage fixes it: no warning
    with pytest.raises(ValueError, match="zero"):
        ood_fast.Mahalanobis().fit(np.ones((10, 3)), np.arange(10) % 2)


# ---------------------------------------------------------------------------------------------
# gradients, dtypes, backends, devices
# ---------------------------------------------------------------------------------------------


def _torch_score64(est, x, kind):
    """Independent float64 evaluation from the fitted float64 attributes."""
    x = x.double()
    mu = est.means_
    cov = est.covariance_
    if est.covariance == "diagonal":
        d2 = (((x[:, None, :] - mu[None]) ** 2) / cov[None]).sum(-1)
    else:
        covs = cov.expand(mu.shape[0], *cov.shape[-2:]) if cov.dim() == 2 else cov
        prec = torch.linalg.inv(covs)
        diff = x[:, None, :] - mu[None]
        d2 = torch.einsum("ncd,cde,nce->nc", diff, prec, diff)
    if kind == "mahalanobis":
        return -d2.min(1).values
    return torch.logsumexp(est.bias_ - 0.5 * d2, dim=1)


@pytest.mark.parametrize("cov_mode", COVS)
@pytest.mark.parametrize("kind", ["mahalanobis", "likelihood"])
def test_score_gradient(cov_mode, kind):
    X, y = _data(N=300, D=5, C=3, seed=14, offset=0.0)
    cls = ood_fast.Mahalanobis if kind == "mahalanobis" else ood_fast.GaussianLikelihood
    est = cls(cov_mode).fit(X, y)
    x = torch.from_numpy(_test_points(X, 6)).float().requires_grad_(True)
    est.score(x).sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    _torch_score64(est, x64, kind).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(
        est.score(x).detach().double(),
        _torch_score64(est, x64, kind).detach(),
        rtol=1e-4,
        atol=1e-3,
    )
    # RMD keeps the graph through both terms
    r = ood_fast.RelativeMahalanobis(cov_mode).fit(X, y)
    x2 = x.detach().clone().requires_grad_(True)
    r.score(x2).sum().backward()
    assert x2.grad is not None and torch.isfinite(x2.grad).all()


def test_input_dtypes_and_numpy():
    X, y = _data(N=300, seed=15)
    est = ood_fast.Mahalanobis().fit(torch.from_numpy(X).float(), torch.from_numpy(y))
    ref = est.score(X.astype(np.float32))
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        s = est.score(torch.from_numpy(X).to(dt))
        assert s.dtype == torch.float32
        torch.testing.assert_close(s, ref, rtol=5e-2, atol=5e-1)
    e16 = ood_fast.Mahalanobis().fit(torch.from_numpy(X).to(torch.bfloat16), y)
    assert torch.isfinite(e16.score(X)).all()


def test_backend_torch_vs_auto():
    X, y = _data(N=300, seed=16)
    xt = torch.from_numpy(_test_points(X, 50)).float()
    for cls in (ood_fast.Mahalanobis, ood_fast.RelativeMahalanobis, ood_fast.GaussianLikelihood):
        for cov_mode in COVS:
            a = cls(cov_mode, backend="torch").fit(X, y)
            b = cls(cov_mode).fit(X, y)
            assert b.backend is None
            torch.testing.assert_close(a.score(xt), b.score(xt), rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(a.distances(xt), b.distances(xt), rtol=1e-4, atol=1e-3)
            assert torch.equal(a.predict(xt), b.predict(xt))


@pytest.mark.gpu
def test_cuda_fit_and_score():
    X, y = _data(N=400, seed=17)
    Xg = torch.from_numpy(X).float().cuda()
    est = ood_fast.Mahalanobis().fit(Xg, torch.from_numpy(y))
    assert est.means_.device.type == "cuda" and est.plan_.device.type == "cuda"
    cpu = ood_fast.Mahalanobis().fit(X, y)
    torch.testing.assert_close(est.covariance_.cpu(), cpu.covariance_, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(est.score(Xg).cpu(), cpu.score(Xg.cpu()), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(cpu.score(Xg).cpu(), cpu.score(Xg.cpu()), rtol=1e-4, atol=1e-3)


def test_multi_layer():
    X, y = _data(N=300, D=8, seed=18)
    X2, _ = _data(N=300, D=5, seed=19)
    xs = [_test_points(X), _test_points(X2)]
    m = ood_fast.MultiLayerMahalanobis().fit([X, X2], y)
    s1 = ood_fast.Mahalanobis().fit(X, y).score(xs[0])
    s2 = ood_fast.Mahalanobis().fit(X2, y).score(xs[1])
    torch.testing.assert_close(m.score(xs), s1 + s2)
    assert m.layer_scores(xs).shape == (9, 2)
    w = ood_fast.MultiLayerMahalanobis(layer_weights=[0.25, 2.0]).fit([X, X2], y)
    torch.testing.assert_close(w.score(xs), 0.25 * s1 + 2.0 * s2)
    with pytest.raises(ValueError, match="expected 2 layers"):
        m.score(xs[:1])
    with pytest.raises(RuntimeError, match="call fit first"):
        ood_fast.MultiLayerMahalanobis().score(xs)


def test_ledoit_wolf_exact_across_chunks_in_one_fit(monkeypatch):
    from sklearn.covariance import ledoit_wolf

    X, y = _data(N=500, D=10, C=3, seed=20)
    classes, mu = _class_stats(X, y)
    _, alpha = ledoit_wolf(X - mu[np.searchsorted(classes, y)], assume_centered=True)
    orig = ood_fast.Mahalanobis._new_stats

    def small_chunks(self):
        st = orig(self)
        st.chunk = 64  # many chunks, every class split across them
        return st

    monkeypatch.setattr(ood_fast.Mahalanobis, "_new_stats", small_chunks)
    est = ood_fast.Mahalanobis(shrinkage="ledoit_wolf").fit(X.astype(np.float32), y)
    assert est.shrinkage_ == pytest.approx(alpha, rel=1e-5)
