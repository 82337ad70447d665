"""The KNN ops: the torch reference against numpy float64 and faiss, ties, tiles, sweeps,
prototype scores, and every bad input.

``assert_knn_equal`` is the comparison every KNN backend test should use (sorted distances
close; indices equal as sets except where distances are tied; swaps only among ties).
"""

import importlib

import numpy as np
import pytest
import torch

from ood_fast import _backend

# By module path: ``ood_fast.ops.knn`` may also be the name of the exported function.
knn_ops = importlib.import_module("ood_fast.ops.knn")
ref = importlib.import_module("ood_fast.reference.knn")

DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp64": torch.float64,
}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _np(t):
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        return t.numpy() if t.dtype in (torch.int64, torch.int32) else t.double().numpy()
    return np.asarray(t)


def assert_knn_equal(d1, i1, d2, i2, atol, rtol=0.0):
    """Two top-k results agree: distances close position by position, and indices equal up to
    ties. An index may sit at a different position only among (near-)tied distances, and the
    two index sets may differ only in rows tied with the k-th distance (the boundary), where
    "tied" means within ``atol + rtol·|d|``. Accepts tensors or arrays, ``[N, k]`` each.
    """
    d1, i1, d2, i2 = _np(d1), _np(i1), _np(d2), _np(i2)
    assert d1.shape == i1.shape == d2.shape == i2.shape, (d1.shape, i1.shape, d2.shape, i2.shape)
    np.testing.assert_allclose(d1, d2, atol=atol, rtol=rtol)
    for r in range(d1.shape[0]):
        row = f"row {r}: indices {i1[r].tolist()} vs {i2[r].tolist()}"
        assert len(set(i1[r].tolist())) == d1.shape[1], f"repeated index in first result, {row}"
        assert len(set(i2[r].tolist())) == d2.shape[1], f"repeated index in second result, {row}"
        at1 = dict(zip(i1[r].tolist(), d1[r].tolist(), strict=True))
        at2 = dict(zip(i2[r].tolist(), d2[r].tolist(), strict=True))
        for idx in at1.keys() & at2.keys():  # same row, same distance in both (within tol)
            tol = atol + rtol * abs(at2[idx])
            assert abs(at1[idx] - at2[idx]) <= tol, f"index {idx} moved past a non-tie, {row}"
        if d1.shape[1]:
            kth = max(d1[r, -1], d2[r, -1])
            for idx, dist in [(i, at1[i]) for i in at1.keys() - at2.keys()] + [
                (i, at2[i]) for i in at2.keys() - at1.keys()
            ]:
                tol = atol + rtol * abs(kth)
                assert dist >= kth - tol, f"index {idx} (d={dist}) differs below the k-th, {row}"


def test_assert_knn_equal_allows_only_tied_swaps():
    d = np.array([[0.0, 1.0, 1.0, 2.0]])
    assert_knn_equal(d, np.array([[4, 7, 9, 3]]), d, np.array([[4, 9, 7, 3]]), atol=1e-9)
    with pytest.raises(AssertionError, match="non-tie"):  # 4 and 3 are not tied
        assert_knn_equal(d, np.array([[4, 7, 9, 3]]), d, np.array([[3, 7, 9, 4]]), atol=1e-9)
    with pytest.raises(AssertionError, match="below the k-th"):  # 7 (d=1) missing: not a tie
        assert_knn_equal(d, np.array([[4, 7, 9, 3]]), d, np.array([[4, 8, 9, 3]]), atol=1e-9)
    d2 = np.array([[0.0, 1.0, 2.0, 2.0]])  # a different row tied at the k-th: allowed
    assert_knn_equal(d2, np.array([[4, 7, 9, 3]]), d2, np.array([[4, 7, 9, 5]]), atol=1e-9)
    with pytest.raises(AssertionError):
        assert_knn_equal(d, np.array([[4, 7, 9, 3]]), d + 0.1, np.array([[4, 7, 9, 3]]), atol=1e-9)
    with pytest.raises(AssertionError, match="repeated"):
        assert_knn_equal(d2, np.array([[4, 7, 9, 9]]), d2, np.array([[4, 7, 9, 3]]), atol=1e-9)


def np_distances(q, b, metric):
    """``[N, M]`` float64 distances by the definitions (no expanded form)."""
    q, b = np.asarray(q, np.float64), np.asarray(b, np.float64)
    if metric == "l2":
        return (
            np.stack([((b - row) ** 2).sum(axis=1) for row in q])
            if len(q)
            else np.zeros((0, len(b)))
        )
    if metric == "ip":
        return -(q @ b.T)

    def unit(x):
        n = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(n > 0, n, 1.0)

    return 1.0 - unit(q) @ unit(b).T


def np_knn(q, b, k, metric):
    d = np_distances(q, b, metric)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), order


def _scale(q, b, metric):
    """The size of the terms a distance is computed from (rounding errors scale with it)."""
    qn = float(torch.linalg.vector_norm(q.double(), dim=1).max()) if len(q) else 0.0
    bn = float(torch.linalg.vector_norm(b.double(), dim=1).max())
    return {"l2": qn * qn + bn * bn, "ip": qn * bn, "cosine": 1.0}[metric] + 1e-30


def _atol(q, b, metric, acc):
    """Absolute tolerance for one computation in ``acc``."""
    return (1e-12 if acc == torch.float64 else 2e-6) * _scale(q, b, metric)


def _data(N, M, D, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, D, generator=g, dtype=torch.float64)
    b = torch.randn(M, D, generator=g, dtype=torch.float64)
    return q.to(dtype), b.to(dtype)


# ---------------------------------------------------------------------------------------------
# The reference against numpy float64 and faiss
# ---------------------------------------------------------------------------------------------

# bank sizes {1, k, k + 1, 1000} with k in {1, bank size} (plus a middle k)
MK = [(1, 1), (5, 5), (6, 5), (6, 1), (1000, 1), (1000, 37), (1000, 1000)]


@pytest.mark.parametrize("bank_dtype", list(DTYPES))
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("M,k", MK)
@pytest.mark.parametrize("D", [1, 3, 33, 129, 777])
def test_knn_matches_numpy_float64(D, M, k, metric, bank_dtype):
    dt = DTYPES[bank_dtype]
    q, b = _data(11, M, D, seed=D * 7919 + M)
    b = b.to(dt)
    q = q.to(torch.float64 if dt == torch.float64 else torch.float32)
    d, i = knn_ops.knn(q, b, k, metric)
    acc = torch.float64 if dt == torch.float64 else torch.float32
    assert d.dtype == acc and i.dtype == torch.int64 and d.shape == i.shape == (11, k)
    assert bool((d[:, 1:] >= d[:, :-1]).all()), "distances not ascending"
    wd, wi = np_knn(q.double().numpy(), b.double().numpy(), k, metric)  # b's values, upcast
    assert_knn_equal(d, i, wd, wi, atol=_atol(q, b, metric, acc))


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("M,k", [(1, 1), (6, 5), (6, 6), (1000, 1), (1000, 50), (1000, 1000)])
@pytest.mark.parametrize("D", [1, 3, 33, 129, 777])
def test_knn_matches_faiss(D, M, k, metric):
    faiss = pytest.importorskip("faiss")
    q, b = _data(13, M, D, seed=D + M, dtype=torch.float32)
    qn, bn = q.numpy().copy(), b.numpy().copy()
    if metric == "cosine":
        faiss.normalize_L2(qn)
        faiss.normalize_L2(bn)
    index = faiss.IndexFlatL2(D) if metric == "l2" else faiss.IndexFlatIP(D)
    index.add(bn)
    fd, fi = index.search(qn, k)
    want = {"l2": fd, "ip": -fd, "cosine": 1.0 - fd}[metric]  # faiss IP: +q·b, descending
    d, i = knn_ops.knn(q, b, k, metric)
    assert_knn_equal(d, i, want, fi, atol=2 * _atol(q, b, metric, torch.float32))


# ---------------------------------------------------------------------------------------------
# Ties, zero vectors, tiles
# ---------------------------------------------------------------------------------------------


def _integer_bank_with_duplicates(M, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-3, 4, (M // 2, D), generator=g).double()
    rows = torch.cat([base, base[torch.randint(0, M // 2, (M - M // 2,), generator=g)]])
    return rows[torch.randperm(M, generator=g)]


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "fp64"])
def test_exact_ties_break_by_lower_index(metric, dtype):
    # Small integers: every distance is exact in any precision, so ties are exact ties and the
    # order must equal a stable numpy argsort, index for index.
    b = _integer_bank_with_duplicates(300, 5).to(DTYPES[dtype])
    q = torch.randint(-3, 4, (23, 5)).double()
    q = q.to(torch.float64 if dtype == "fp64" else torch.float32)
    for k in (1, 2, 7, 150, 300):
        d, i = knn_ops.knn(q, b, k, metric)
        wd, wi = np_knn(q.double().numpy(), b.double().numpy(), k, metric)
        np.testing.assert_array_equal(d.double().numpy(), wd)
        np.testing.assert_array_equal(i.numpy(), wi)


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("D", [3, 129])
def test_duplicate_rows_match_numpy_up_to_ties(metric, D):
    q, b = _data(20, 200, D, seed=D)
    g = torch.Generator().manual_seed(1)
    b = torch.cat([b, b[torch.randint(0, 200, (150,), generator=g)], b[:40]])
    b = b[torch.randperm(b.shape[0], generator=g)].float()
    q = torch.cat([q[:10], b[:10].double()]).float()  # some queries sit exactly on bank rows
    for k in (1, 3, 10, b.shape[0]):
        d, i = knn_ops.knn(q, b, k, metric)
        wd, wi = np_knn(q.numpy(), b.numpy(), k, metric)
        assert_knn_equal(d, i, wd, wi, atol=_atol(q, b, metric, torch.float32))


def test_cosine_zero_vectors_have_similarity_zero():
    q, b = _data(6, 40, 8, dtype=torch.float32)
    q[2] = 0
    b[[0, 5, 17]] = 0
    d, i = knn_ops.knn(q, b, 40, "cosine")
    wd, wi = np_knn(q.numpy(), b.numpy(), 40, "cosine")
    assert_knn_equal(d, i, wd, wi, atol=1e-5)
    assert torch.equal(d[2], torch.ones(40)) and torch.equal(i[2], torch.arange(40))
    for r in (0, 1, 3, 4, 5):  # zero bank rows: distance exactly 1 from every query
        at = dict(zip(i[r].tolist(), d[r].tolist(), strict=True))
        assert at[0] == at[5] == at[17] == 1.0
    assert bool(((d >= 0) & (d <= 2)).all())
    ps, _ = knn_ops.prototype_scores(q, b[:, None, :], metric="cosine")
    assert float(ps[2].abs().max()) == 0.0 and float(ps[:, [0, 5, 17]].abs().max()) == 0.0


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_tile_boundaries(monkeypatch, metric):
    q, b = _data(10, 50, 9, seed=3, dtype=torch.float32)
    qi = torch.randint(-3, 4, (10, 9)).float()
    bi = _integer_bank_with_duplicates(50, 9).float()
    untiled = {k: knn_ops.knn(qi, bi, k, metric) for k in (1, 6, 7, 8, 14, 15, 50)}
    monkeypatch.setattr(ref, "BANK_TILE", 7)
    monkeypatch.setattr(ref, "QUERY_CHUNK", 3)
    for k in (1, 6, 7, 8, 14, 15, 50):
        d, i = knn_ops.knn(q, b, k, metric)
        wd, wi = np_knn(q.numpy(), b.numpy(), k, metric)
        assert_knn_equal(d, i, wd, wi, atol=_atol(q, b, metric, torch.float32))
        d, i = knn_ops.knn(qi, bi, k, metric)
        if metric != "cosine":  # exact integer arithmetic: tiled == untiled == numpy, exactly
            assert torch.equal(d, untiled[k][0]) and torch.equal(i, untiled[k][1])
            wd, wi = np_knn(qi.numpy(), bi.numpy(), k, metric)
            np.testing.assert_array_equal(d.double().numpy(), wd)
            np.testing.assert_array_equal(i.numpy(), wi)
        else:
            assert_knn_equal(d, i, *untiled[k], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Precision: mixed dtypes, exact mode over reduced-precision banks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qdt", list(DTYPES))
@pytest.mark.parametrize("bdt", list(DTYPES))
def test_mixed_dtypes_compute_in_float32_unless_both_float64(qdt, bdt):
    q, b = _data(9, 60, 17, seed=5)
    q, b = q.to(DTYPES[qdt]), b.to(DTYPES[bdt])
    d, i = knn_ops.knn(q, b, 10, "l2")
    acc = torch.float64 if qdt == bdt == "fp64" else torch.float32
    assert d.dtype == acc
    wd, wi = np_knn(q.double().numpy(), b.double().numpy(), 10, "l2")
    assert_knn_equal(d, i, wd, wi, atol=_atol(q, b, "l2", acc))
    assert knn_ops.kth_distance(q, b, [3]).dtype == acc
    assert knn_ops.prototype_scores(q, b.view(6, 10, 17))[0].dtype == acc


@pytest.mark.parametrize("bdt", ["fp16", "bf16"])
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_reduced_precision_bank_exact_equals_fp32_search(bdt, metric):
    q, b = _data(30, 500, 64, seed=11, dtype=torch.float32)
    b = b.to(DTYPES[bdt])
    for k in (1, 50, 500):
        want = knn_ops.knn(q, b.float(), k, metric)
        got = knn_ops.knn(q, b, k, metric)  # exact=True by default
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        fast = knn_ops.knn(q, b, k, metric, exact=False)
        # a low-precision pass (bf16-rounded queries) is off by about 2^-8 of the scale
        assert_knn_equal(*fast, *want, atol=1e-2 * _scale(q, b, metric))


# ---------------------------------------------------------------------------------------------
# kth_distance
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("tiny_tiles", [False, True])
def test_kth_distance_equals_separate_knn_calls(monkeypatch, metric, tiny_tiles):
    if tiny_tiles:
        monkeypatch.setattr(ref, "BANK_TILE", 13)
        monkeypatch.setattr(ref, "QUERY_CHUNK", 4)
    q, b = _data(15, 300, 21, seed=2, dtype=torch.float32)
    ks = [50, 1, 7, 50, 300, 2]
    got = knn_ops.kth_distance(q, b, ks, metric)
    assert got.shape == (15, len(ks)) and got.dtype == torch.float32
    for j, k in enumerate(ks):
        assert torch.equal(got[:, j], knn_ops.knn(q, b, k, metric)[0][:, k - 1])
    # ks may also come as a tuple, range, numpy array or tensor
    for seq in ((1, 7), range(1, 8, 6), np.array([1, 7]), torch.tensor([1, 7])):
        assert torch.equal(knn_ops.kth_distance(q, b, seq, metric), got[:, [1, 2]])


# ---------------------------------------------------------------------------------------------
# prototype_scores
# ---------------------------------------------------------------------------------------------


def np_prototype_scores(x, protos, reduce, temperature, metric):
    x, protos = np.asarray(x, np.float64), np.asarray(protos, np.float64)
    C, M, _ = protos.shape
    per = np.empty((x.shape[0], C))
    for c in range(C):
        if metric == "cosine":
            s = 1.0 - np_distances(x, protos[c], "cosine")
        elif metric == "ip":
            s = x @ protos[c].T
        else:
            s = -np_distances(x, protos[c], "l2")
        s = s / temperature
        if reduce == "max":
            per[:, c] = s.max(axis=1)
        elif reduce == "mean":
            per[:, c] = s.mean(axis=1)
        else:
            top = s.max(axis=1, keepdims=True)
            per[:, c] = (top + np.log(np.exp(s - top).sum(axis=1, keepdims=True)))[:, 0]
    return per, per.max(axis=1)


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
@pytest.mark.parametrize("reduce", ["max", "mean", "logsumexp"])
@pytest.mark.parametrize("temperature", [1.0, 0.07])
@pytest.mark.parametrize("M", [1, 3])
def test_prototype_scores_match_numpy(monkeypatch, metric, reduce, temperature, M):
    x, p = _data(11, 7 * M, 33, seed=M)
    x[3] = 0
    p = p.view(7, M, 33)
    want_per, want_all = np_prototype_scores(x.numpy(), p.numpy(), reduce, temperature, metric)
    per, overall = knn_ops.prototype_scores(x, p, reduce, temperature, metric)
    assert per.dtype == torch.float64 and per.shape == (11, 7) and overall.shape == (11,)
    np.testing.assert_allclose(per.numpy(), want_per, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(overall.numpy(), want_all, rtol=1e-10, atol=1e-9)
    # float32, and class tiles of one class each
    monkeypatch.setattr(ref, "BANK_TILE", M)
    monkeypatch.setattr(ref, "QUERY_CHUNK", 4)
    per32, all32 = knn_ops.prototype_scores(x.float(), p.float(), reduce, temperature, metric)
    assert per32.dtype == torch.float32
    scale = 1.0 if metric == "cosine" else 2.0 * 33
    np.testing.assert_allclose(
        per32.double().numpy(), want_per, rtol=1e-5, atol=1e-5 * scale / temperature
    )
    np.testing.assert_allclose(
        all32.double().numpy(), want_all, rtol=1e-5, atol=1e-5 * scale / temperature
    )


def test_prototype_scores_accepts_one_prototype_per_class_as_2d():
    x, p = _data(5, 4, 6)
    a = knn_ops.prototype_scores(x, p, "max")
    b = knn_ops.prototype_scores(x, p[:, None, :], "max")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------------------------------------
# Empty queries, inputs, dispatch, bad inputs
# ---------------------------------------------------------------------------------------------


def test_empty_queries_give_empty_outputs():
    b = torch.randn(10, 4)
    for metric in ("l2", "ip", "cosine"):
        d, i = knn_ops.knn(torch.empty(0, 4), b, 3, metric)
        assert d.shape == i.shape == (0, 3) and d.dtype == torch.float32 and i.dtype == torch.int64
    assert knn_ops.kth_distance(torch.empty(0, 4), b, [1, 5]).shape == (0, 2)
    per, overall = knn_ops.prototype_scores(torch.empty(0, 4), b.view(5, 2, 4), "logsumexp")
    assert per.shape == (0, 5) and overall.shape == (0,)


def test_numpy_inputs_and_explicit_torch_backend():
    q, b = _data(4, 20, 3, dtype=torch.float32)
    d, i = knn_ops.knn(q.numpy(), b.numpy(), 5, backend="torch")
    d2, i2 = knn_ops.knn(q, b, 5, backend="torch")
    assert torch.equal(d, d2) and torch.equal(i, i2)
    for op in ("knn", "kth_distance", "prototype_scores"):
        assert "torch" in _backend.registered_ops()[op]
    if not torch.cuda.is_available():
        with pytest.raises(_backend.BackendUnavailable, match="cuda"):
            knn_ops.knn(q, b, 5, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        knn_ops.kth_distance(q, b, [1], backend="tpu")


def test_bad_inputs_raise_clear_errors():
    q, b = torch.randn(4, 3), torch.randn(5, 3)
    p = torch.randn(2, 2, 3)
    # k
    with pytest.raises(ValueError, match=r"k=0 out of range.*bank size M=5"):
        knn_ops.knn(q, b, 0)
    with pytest.raises(ValueError, match=r"k=6 out of range.*bank size M=5"):
        knn_ops.knn(q, b, 6)
    with pytest.raises(TypeError, match="k must be an integer"):
        knn_ops.knn(q, b, 1.5)
    with pytest.raises(TypeError, match="k must be an integer"):
        knn_ops.knn(q, b, True)
    # NaN / Inf rows
    bad = q.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"queries: 1 non-finite .* first at row 2"):
        knn_ops.knn(bad, b, 1)
    badb = b.clone()
    badb[4, 0] = float("inf")
    with pytest.raises(ValueError, match=r"bank: 1 non-finite .* first at row 4"):
        knn_ops.kth_distance(q, badb, [1])
    # shapes, dtypes, devices
    with pytest.raises(ValueError, match=r"queries have D=4 .* bank has D=3"):
        knn_ops.knn(torch.randn(4, 4), b, 1)
    with pytest.raises(ValueError, match="bank is empty"):
        knn_ops.knn(q, torch.empty(0, 3), 1)
    with pytest.raises(ValueError, match="2-D"):
        knn_ops.knn(q[0], b, 1)
    with pytest.raises(TypeError, match="floating"):
        knn_ops.knn(q, torch.ones(5, 3, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="different devices"):
        knn_ops.knn(q, b.to("meta"), 1)
    with pytest.raises(ValueError, match="metric must be one of"):
        knn_ops.knn(q, b, 1, "manhattan")
    with pytest.raises(TypeError, match="exact"):
        knn_ops.knn(q, b, 1, exact="yes")
    # ks
    with pytest.raises(ValueError, match="ks is empty"):
        knn_ops.kth_distance(q, b, [])
    with pytest.raises(ValueError, match=r"ks entry=0 out of range.*M=5"):
        knn_ops.kth_distance(q, b, [1, 0])
    with pytest.raises(ValueError, match=r"ks entry=6 out of range.*M=5"):
        knn_ops.kth_distance(q, b, [6])
    with pytest.raises(TypeError, match="ks must be a sequence"):
        knn_ops.kth_distance(q, b, 3)
    with pytest.raises(TypeError, match="ks entry must be an integer"):
        knn_ops.kth_distance(q, b, [2.0])
    with pytest.raises(ValueError, match="different devices"):
        knn_ops.kth_distance(q.to("meta"), b, [1])
    # prototype_scores
    with pytest.raises(ValueError, match="reduce must be one of"):
        knn_ops.prototype_scores(q, p, "median")
    with pytest.raises(ValueError, match="metric must be one of"):
        knn_ops.prototype_scores(q, p, metric="hamming")
    for t in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be finite and > 0"):
            knn_ops.prototype_scores(q, p, temperature=t)
    with pytest.raises(TypeError, match="temperature"):
        knn_ops.prototype_scores(q, p, temperature="hot")
    with pytest.raises(ValueError, match=r"expected \[C, M, D\]"):
        knn_ops.prototype_scores(q, p[None])
    with pytest.raises(ValueError, match="prototypes is empty"):
        knn_ops.prototype_scores(q, torch.empty(0, 2, 3))
    with pytest.raises(ValueError, match="prototypes is empty"):
        knn_ops.prototype_scores(q, torch.empty(2, 0, 3))
    with pytest.raises(ValueError, match=r"x has D=4 .* prototypes have D=3"):
        knn_ops.prototype_scores(torch.randn(4, 4), p)
    badp = p.clone()
    badp[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="prototypes: 1 non-finite"):
        knn_ops.prototype_scores(q, badp)
    with pytest.raises(ValueError, match="x: 1 non-finite"):
        knn_ops.prototype_scores(bad, p)
    with pytest.raises(ValueError, match="different devices"):
        knn_ops.prototype_scores(q, p.to("meta"))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_bank_finiteness_scan(dtype):
    q = torch.randn(3, 4)
    b = torch.randn(50, 4).to(DTYPES[dtype])
    big = torch.finfo(DTYPES[dtype]).max / 4
    huge = b.clone()
    huge[:, 0] = big  # the sum overflows, yet every value is finite: accepted
    assert knn_ops.knn(q, huge, 3, "ip")[0].shape == (3, 3)
    for values, n in (([float("nan")], 1), ([float("inf"), -float("inf")], 2)):
        bad = b.clone()
        bad[7 : 7 + len(values), 2] = torch.tensor(values).to(bad.dtype)
        with pytest.raises(ValueError, match=rf"bank: {n} non-finite .* first at row 7"):
            knn_ops.knn(q, bad, 3)
        with pytest.raises(ValueError, match=rf"bank: {n} non-finite .* first at row 7"):
            knn_ops.kth_distance(q, bad, [3])
    # check_bank=False skips the scan (for banks validated once at fit time), same results
    for a, c in zip(knn_ops.knn(q, b, 5, check_bank=False), knn_ops.knn(q, b, 5), strict=True):
        assert torch.equal(a, c)
    assert torch.equal(
        knn_ops.kth_distance(q, b, [2, 5], check_bank=False), knn_ops.kth_distance(q, b, [2, 5])
    )
    with pytest.raises(TypeError, match="check_bank"):
        knn_ops.knn(q, b, 1, check_bank=None)


@pytest.mark.gpu
def test_reference_on_cuda_matches_cpu():
    q, b = _data(50, 3000, 65, dtype=torch.float32)
    for metric in ("l2", "ip", "cosine"):
        d, i = knn_ops.knn(q, b, 100, metric)
        dc, ic = knn_ops.knn(q.cuda(), b.cuda().half(), 100, metric)
        wd, wi = knn_ops.knn(q, b.half(), 100, metric)
        assert_knn_equal(dc, ic, wd, wi, atol=_atol(q, b, metric, torch.float32))
        assert d.shape == dc.shape
