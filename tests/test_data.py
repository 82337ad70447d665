"""ood_fast.data: the synthetic generator and the feature-file loader."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from ood_fast import metrics
from ood_fast.data import PRESETS, load_features, synthetic_features


def mahalanobis_fit_score(train_x, train_y, test_x):
    """float64 tied Mahalanobis: (−min d², argmin)."""
    x, t = train_x.double(), test_x.double()
    C = int(train_y.max()) + 1
    mu = torch.zeros(C, x.shape[1], dtype=torch.float64).index_add_(0, train_y, x)
    mu /= torch.bincount(train_y, minlength=C)[:, None]
    xc = x - mu[train_y]
    L = torch.linalg.cholesky(xc.T @ xc / x.shape[0])
    z = torch.linalg.solve_triangular(L, t.T, upper=False).T
    m = torch.linalg.solve_triangular(L, mu.T, upper=False).T
    d2 = (z * z).sum(1, keepdim=True) - 2 * z @ m.T + (m * m).sum(1)
    v, i = d2.min(1)
    return -v, i


def test_shapes_dtypes_and_balance():
    d = synthetic_features(1003, 201, 33, 7, ood_fraction=0.3, seed=1)
    assert set(d) >= {"train_x", "train_y", "test_x", "test_is_ood", "test_y"}
    assert d["train_x"].shape == (1003, 33) and d["train_x"].dtype == torch.float32
    assert d["test_x"].shape == (201, 33)
    assert d["train_y"].dtype == torch.int64 and d["test_is_ood"].dtype == torch.bool
    counts = torch.bincount(d["train_y"], minlength=7)
    assert int(counts.min()) == 143 and int(counts.max()) == 144  # balanced
    assert int(d["test_is_ood"].sum()) == round(201 * 0.3)
    assert bool((d["test_y"][d["test_is_ood"]] == -1).all())
    assert bool((d["test_y"][~d["test_is_ood"]] >= 0).all())
    assert torch.isfinite(d["train_x"]).all() and torch.isfinite(d["test_x"]).all()
    for dt, want in (
        (np.float64, torch.float64),
        ("bfloat16", torch.bfloat16),
        (torch.float16, torch.float16),
    ):
        assert synthetic_features(10, 4, 5, 2, dtype=dt)["test_x"].dtype == want


def test_deterministic_by_seed():
    a = synthetic_features(4200, 30, 640, 5, seed=7)  # > 1 chunk, factored rotation
    b = synthetic_features(4200, 30, 640, 5, seed=7)
    c = synthetic_features(4200, 30, 640, 5, seed=8)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["train_x"], c["train_x"])


@pytest.mark.parametrize("dim", [1, 3, 200, 640, 777])  # 640: factored rotation; 777: dense
def test_covariance_spectrum_and_means(dim):
    """The data follow the stated model: per-class means, power-law spectrum of Σ = Q Λ Qᵀ."""
    n = max(2000, 5 * dim)
    d = synthetic_features(n, 10, dim, 4, seed=2, return_params=True)
    p = d["params"]
    lam = torch.linalg.eigvalsh(p["covariance"]).flip(0)
    want = torch.arange(1, dim + 1, dtype=torch.float64).pow(-1.0)
    want = want / want.mean()
    torch.testing.assert_close(lam, want, rtol=1e-5, atol=1e-6)  # Q is orthogonal
    x, y = d["train_x"].double(), d["train_y"]
    mu = torch.stack([x[y == c].mean(0) for c in range(4)])
    xc = x - mu[y]
    emp = xc.T @ xc / n
    # empirical covariance close to the true one (relative Frobenius, sampling error ~sqrt(D/n))
    err = torch.linalg.norm(emp - p["covariance"]) / torch.linalg.norm(p["covariance"])
    assert err < 4 * math.sqrt(dim / n) + 0.02
    # the covariance is not (nearly) diagonal: the rotation mixes coordinates
    if dim >= 200:
        cov = p["covariance"]
        off = cov - torch.diag(torch.diagonal(cov))
        assert torch.linalg.norm(off) > 0.5 * torch.linalg.norm(cov)
    # class means: within sampling error of the stated ones
    se = (torch.diagonal(p["covariance"]).sqrt() / math.sqrt(n / 4)).max()
    assert float((mu - p["means"]).abs().max()) < 6 * se


def test_quick_preset_is_realistic():
    """ID accuracy high but not perfect; Mahalanobis AUROC well above chance, below 1."""
    d = synthetic_features(**PRESETS["quick"], seed=0)
    s, pred = mahalanobis_fit_score(d["train_x"], d["train_y"], d["test_x"])
    ood = d["test_is_ood"]
    acc = float((pred[~ood] == d["test_y"][~ood]).double().mean())
    assert 0.85 < acc < 0.995
    auroc = metrics.auroc(s[~ood], s[ood])
    assert 0.8 < auroc < 0.97


def test_presets():
    assert set(PRESETS) == {"quick", "cifar10", "imagenet"}
    assert PRESETS["cifar10"] == dict(
        n_train=50_000, n_test=10_000, dim=512, num_classes=10, ood_fraction=0.5
    )
    assert PRESETS["imagenet"]["num_classes"] == 1000 and PRESETS["imagenet"]["dim"] == 2048
    assert PRESETS["imagenet"]["n_train"] == 100_000 and PRESETS["imagenet"]["n_test"] == 10_000


def test_edge_cases_and_errors():
    d = synthetic_features(0, 0, 8, 3)
    assert d["train_x"].shape == (0, 8) and d["test_x"].shape == (0, 8)
    d = synthetic_features(5, 4, 8, 1, ood_fraction=1.0)
    assert bool(d["test_is_ood"].all())
    with pytest.raises(ValueError, match="ood_fraction"):
        synthetic_features(10, 10, 4, 2, ood_fraction=1.5)
    with pytest.raises(ValueError, match="n_train"):
        synthetic_features(-1, 10, 4, 2)
    with pytest.raises(ValueError, match="dim"):
        synthetic_features(10, 10, 0, 2)
    with pytest.raises(ValueError, match="dtype"):
        synthetic_features(10, 10, 4, 2, dtype="int32")


# ----------------------------------------------------------------------------- load_features


@pytest.fixture()
def arrays():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5)).astype(np.float32)
    y = rng.integers(0, 3, 12)
    ood = rng.integers(0, 2, 12).astype(bool)
    return x, y, ood


def check(got, x, y, ood):
    gx, gy, go = got
    assert isinstance(gx, torch.Tensor)
    np.testing.assert_array_equal(gx.numpy(), x)
    if y is None:
        assert gy is None
    else:
        np.testing.assert_array_equal(gy.numpy(), y)
    if ood is None:
        assert go is None
    else:
        assert go.dtype == torch.bool
        np.testing.assert_array_equal(go.numpy(), ood)


def test_load_npy_npz(tmp_path, arrays):
    x, y, ood = arrays
    np.save(tmp_path / "f.npy", x)
    check(load_features(tmp_path / "f.npy"), x, None, None)
    np.savez(tmp_path / "a.npz", x=x, y=y, is_ood=ood)
    check(load_features(str(tmp_path / "a.npz")), x, y, ood)
    np.savez(tmp_path / "b.npz", features=x, labels=y)
    check(load_features(tmp_path / "b.npz"), x, y, None)
    np.savez(tmp_path / "c.npz", features=x, ood=ood.astype(np.int64))
    check(load_features(tmp_path / "c.npz"), x, None, ood)


def test_load_safetensors(tmp_path, arrays):
    from safetensors.torch import save_file

    x, y, ood = arrays
    save_file(
        {"x": torch.from_numpy(x), "labels": torch.from_numpy(y), "ood": torch.from_numpy(ood)},
        str(tmp_path / "f.safetensors"),
    )
    check(load_features(tmp_path / "f.safetensors"), x, y, ood)


def test_load_pt(tmp_path, arrays):
    x, y, ood = arrays
    tx, ty, to = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(ood)
    torch.save({"features": tx, "y": ty, "is_ood": to}, tmp_path / "d.pt")
    check(load_features(tmp_path / "d.pt"), x, y, ood)
    torch.save(tx, tmp_path / "t.pt")
    check(load_features(tmp_path / "t.pt"), x, None, None)
    torch.save((tx, ty), tmp_path / "tup.pth")
    check(load_features(tmp_path / "tup.pth"), x, y, None)


class Evil:
    def __reduce__(self):
        return (exec, ("import sys; sys.modules['ood_fast']._pwned = True",))


def test_load_never_executes_code(tmp_path, arrays):
    import ood_fast

    x, _, _ = arrays
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"x": torch.from_numpy(x), "payload": Evil()}, f, protocol=2)
    with pytest.raises(ValueError, match="weights_only"):
        load_features(tmp_path / "evil.pt")
    np.save(tmp_path / "obj.npy", np.array([Evil()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        load_features(tmp_path / "obj.npy")
    np.savez(tmp_path / "obj.npz", x=np.array([Evil()], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        load_features(tmp_path / "obj.npz")
    assert not hasattr(ood_fast, "_pwned")


def test_load_errors(tmp_path, arrays):
    x, y, ood = arrays
    with pytest.raises(FileNotFoundError):
        load_features(tmp_path / "missing.npz")
    np.savez(tmp_path / "nox.npz", feats=x, y=y)
    with pytest.raises(KeyError, match=r"expected key 'x' or 'features'.*\['feats', 'y'\]"):
        load_features(tmp_path / "nox.npz")
    np.savez(tmp_path / "both.npz", x=x, features=x)
    with pytest.raises(ValueError, match="ambiguous"):
        load_features(tmp_path / "both.npz")
    np.savez(tmp_path / "shape.npz", x=x, y=y[:5])
    with pytest.raises(ValueError, match=r"labels must have shape \[12\]"):
        load_features(tmp_path / "shape.npz")
    np.savez(tmp_path / "oodv.npz", x=x, is_ood=np.arange(12))
    with pytest.raises(ValueError, match="boolean or 0/1"):
        load_features(tmp_path / "oodv.npz")
    np.save(tmp_path / "one.npy", x[0])
    with pytest.raises(ValueError, match="2-D"):
        load_features(tmp_path / "one.npy")
    (tmp_path / "f.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="unsupported"):
        load_features(tmp_path / "f.csv")
    torch.save({"y": torch.from_numpy(y)}, tmp_path / "nofeat.pt")
    with pytest.raises(KeyError, match="no features"):
        load_features(tmp_path / "nofeat.pt")
