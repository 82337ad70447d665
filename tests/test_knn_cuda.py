"""CUDA backend (``ood_fast._cuda.knn``) of ``ops.knn`` / ``ops.kth_distance`` against the torch
backend (``reference.knn``, the truth of every KNN backend).

GPU tests skip (with the reason) when torch sees no CUDA device or the extension did not build
(or was built before ``knn`` existed).

Comparisons:
* random data: distances close position by position (a tolerance per problem, relative to the
  size of the terms the expanded form adds up), index sets equal except among rows tied (within
  that tolerance) with the k-th distance, an index's distance the same in both results; and the
  CUDA result itself exactly ordered: distances ascending, equal distances in index order, no
  repeated index.
* small-integer data (every product and sum exact in fp32, so both backends compute bit-identical
  distances): indices and distances EQUAL to the reference, with many duplicate bank rows, i.e.
  the exact (distance, index) tie order, also at the k-th place.

A quick selection for a device run: ``pytest tests/test_knn_cuda.py -k quick`` (under a minute
on an H100/H200); the whole file takes a few minutes there.
"""

from __future__ import annotations

import functools
import importlib
import math

import pytest
import torch

from ood_fast import _extensions as _ext

knn_ops = importlib.import_module("ood_fast.ops.knn")  # module (``ops.knn`` may be the function)

_CUDA = torch.cuda.is_available()
_MOD = _ext.cuda_module()
_MOD_ERR = None if _MOD is not None else _ext._load("ood_fast._cuda")[1]
_HAS_KNN = _MOD is not None and hasattr(_MOD, "knn")

_GPU_MARKS = (
    pytest.mark.gpu,
    pytest.mark.skipif(not _CUDA, reason="torch sees no CUDA device"),
    pytest.mark.skipif(_MOD is None, reason=f"ood_fast._cuda did not import ({_MOD_ERR})"),
    pytest.mark.skipif(
        _MOD is not None and not _HAS_KNN, reason="ood_fast._cuda predates knn: rebuild it"
    ),
)


def needs_gpu(fn):
    for mark in _GPU_MARKS:
        fn = mark(fn)
    return fn


DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
METRICS = ("l2", "ip", "cosine")
SEED = 1234


# ---------------------------------------------------------------------------------------------
# Data (seeded, on the GPU, cached: a bank serves several N, k and metrics)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=3)
def _bank(M: int, D: int, seed: int = SEED) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed * 7919 + M * 31 + D)
    return torch.randn(M, D, device="cuda", generator=g) + 0.25


def _queries(N: int, D: int, bank: torch.Tensor, seed: int = SEED) -> torch.Tensor:
    """Half near bank rows (realistic nearest neighbours), half random."""
    g = torch.Generator(device="cuda").manual_seed(seed + N * 13 + D)
    q = torch.randn(N, D, device="cuda", generator=g) + 0.25
    near = torch.randint(0, bank.shape[0], (N,), device="cuda", generator=g)
    half = N // 2
    q[:half] = bank[near[:half]].float() + 0.1 * q[:half]
    return q


def _int_problem(N: int, M: int, D: int, distinct: int, seed: int = SEED):
    """Small-integer queries and a bank of many duplicate rows: exact fp32 arithmetic."""
    g = torch.Generator(device="cuda").manual_seed(seed + 17 * M + D)
    rows = torch.randint(-3, 4, (distinct, D), device="cuda", generator=g).float()
    bank = rows[torch.randint(0, distinct, (M,), device="cuda", generator=g)]
    q = torch.randint(-3, 4, (N, D), device="cuda", generator=g).float()
    return q, bank


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------


def _tolerance(q: torch.Tensor, bank: torch.Tensor, metric: str) -> float:
    D = q.shape[1]
    qn = q.float().norm(dim=1).max().item() if q.shape[0] else 0.0
    bn = bank.float().norm(dim=1).max().item()
    scale = {"l2": qn * qn + bn * bn, "ip": qn * bn, "cosine": 1.0}[metric]
    return 4.0 * (math.sqrt(D) + 4.0) * 1.2e-7 * max(scale, 1e-30)


def _check_order(d: torch.Tensor, i: torch.Tensor, M: int):
    """The CUDA result's own order: ascending, ties by index, no repeats, indices in range."""
    assert d.dtype == torch.float32 and i.dtype == torch.int64
    assert not torch.isnan(d).any()
    assert bool(((i >= 0) & (i < M)).all()), "index out of range"
    if d.shape[1] > 1:
        dd = d[:, 1:] - d[:, :-1]
        assert bool((d[:, 1:] >= d[:, :-1]).all()), f"not ascending: min step {dd.min().item()}"
        tied = d[:, 1:] == d[:, :-1]
        assert bool((i[:, 1:] > i[:, :-1])[tied].all()), "equal distances not in index order"
        s = i.sort(dim=1).values
        assert bool((s[:, 1:] != s[:, :-1]).all()), "repeated index in a row"


def assert_knn_close(d1, i1, d2, i2, M: int, atol: float):
    """(d1, i1) agrees with (d2, i2) up to near-ties (vectorized ``assert_knn_equal``)."""
    assert d1.shape == i1.shape == d2.shape == i2.shape, (d1.shape, d2.shape)
    N, k = d1.shape
    if N == 0:
        return
    torch.testing.assert_close(d1.double(), d2.double(), atol=atol, rtol=0.0)
    rows = torch.arange(N, device=d1.device)[:, None]
    key1 = (rows * M + i1).flatten()
    key2 = (rows * M + i2).flatten()
    order = key2.argsort()
    k2s, d2s = key2[order], d2.flatten()[order]
    pos = torch.searchsorted(k2s, key1).clamp(max=k2s.numel() - 1)
    found = k2s[pos] == key1
    # the same bank row has the same distance in both results
    diff = (d1.flatten() - d2s[pos]).abs()
    assert bool((diff[found] <= atol).all()), f"an index moved past a non-tie: {diff[found].max()}"
    # a row in one result only is tied with the k-th distance
    kth = torch.maximum(d1[:, -1], d2[:, -1])[:, None].expand(N, k).flatten()
    only1 = ~found
    assert bool((d1.flatten()[only1] >= kth[only1] - atol).all()), "index differs below the k-th"
    only2 = ~torch.isin(key2, key1)
    assert bool((d2.flatten()[only2] >= kth[only2] - atol).all()), "index differs below the k-th"


def _run_both(q, bank, k, metric, exact=True):
    dc, ic = knn_ops.knn(q, bank, k, metric, exact=exact, backend="cuda")
    dt, it = knn_ops.knn(q, bank, k, metric, backend="torch")
    torch.cuda.synchronize()
    return dc, ic, dt, it


def _compare(q, bank, k, metric, exact=True):
    dc, ic, dt, it = _run_both(q, bank, k, metric, exact)
    assert dc.shape == (q.shape[0], k) and ic.shape == (q.shape[0], k)
    assert dc.device == q.device and ic.device == q.device
    _check_order(dc, ic, bank.shape[0])
    assert_knn_close(dc, ic, dt, it, bank.shape[0], _tolerance(q, bank, metric))
    return dc, ic


# ---------------------------------------------------------------------------------------------
# Shapes: D × (M, k) × N, every path (1 split, several splits + merge, every list size,
# the k > 1024 two-pass path)
# ---------------------------------------------------------------------------------------------


def _shape_cases():
    cases = []
    for D in (1, 3, 33, 129, 777, 2048):
        mk = [(1, 1), (1000, 1), (1000, 50), (1000, 1000)]
        for k in (1, 50, 1000, 2048):
            mk += [(k, k), (k + 1, k)]
        mk += [(50000, 1), (50000, 50), (50000, 1000), (50000, 2048)]
        for M, k in sorted(set(mk)):
            for N in (1, 7, 1000):
                if D == 2048 and M == 50000 and N == 1000 and k > 50:
                    continue  # covered at smaller D; keeps the file's device time down
                cases.append((D, M, k, N))
    return cases


_QUICK_SHAPES = {
    (33, 1, 1, 7),
    (129, 1000, 50, 1),  # several splits + merge
    (129, 1000, 50, 1000),
    (3, 1001, 1000, 7),  # P = 32
    (777, 2049, 2048, 7),  # two-pass path
    (129, 50000, 50, 1),  # batch-1 over a large bank
    (33, 50000, 1000, 7),
    (1, 1000, 1000, 1),  # k = M
}


def _shape_params():
    out = []
    for D, M, k, N in _shape_cases():
        quick = "quick-" if (D, M, k, N) in _QUICK_SHAPES else ""
        out.append(pytest.param(D, M, k, N, id=f"{quick}D{D}-M{M}-k{k}-N{N}"))
    return out


@needs_gpu
@pytest.mark.parametrize("D, M, k, N", _shape_params())
def test_knn_shapes_l2(D, M, k, N):
    bank = _bank(M, D)
    _compare(_queries(N, D, bank), bank, k, "l2")


@needs_gpu
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(
    "D, M, k, N",
    [
        pytest.param(33, 1000, 50, 7, id="quick-D33-M1000-k50-N7"),
        pytest.param(129, 5000, 100, 1000, id="D129-M5000-k100-N1000"),
        pytest.param(777, 50000, 50, 1, id="D777-M50000-k50-N1"),
        pytest.param(3, 3000, 1000, 7, id="D3-M3000-k1000-N7"),
        pytest.param(33, 3000, 2048, 7, id="quick-D33-M3000-k2048-N7"),
    ],
)
def test_knn_metrics_dtypes(D, M, k, N, metric, dtype):
    bank = _bank(M, D).to(DTYPES[dtype])
    _compare(_queries(N, D, bank), bank, k, metric)


@needs_gpu
@pytest.mark.parametrize("qdtype", ["f16", "bf16"])
def test_knn_quick_reduced_precision_queries(qdtype):
    bank = _bank(3000, 129)
    q = _queries(64, 129, bank).to(DTYPES[qdtype])
    for metric in ("l2", "ip"):
        _compare(q, bank.to(torch.bfloat16), 64, metric)


@needs_gpu
@pytest.mark.parametrize("k", [1, 50, 1000])
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_knn_quick_exact_reduced_bank_equals_fp32_search(k, dtype):
    """exact=True over a reduced-precision bank equals the fp32 search over its upcast values."""
    bank = _bank(20000, 129).to(DTYPES[dtype])
    q = _queries(33, 129, bank)
    d1, i1 = knn_ops.knn(q, bank, k, "l2", backend="cuda")
    d2, i2 = knn_ops.knn(q, bank.float(), k, "l2", backend="cuda")
    torch.testing.assert_close(d1, d2, atol=0, rtol=0)
    assert torch.equal(i1, i2)


# ---------------------------------------------------------------------------------------------
# Exact ties: duplicate bank rows with exact arithmetic, compared for equality
# ---------------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(
    "N, M, D, k, distinct",
    [
        pytest.param(7, 1000, 33, 50, 20, id="quick-N7-M1000-D33-k50"),
        pytest.param(1, 5000, 129, 1000, 40, id="quick-N1-M5000-D129-k1000"),  # splits + merge
        pytest.param(1000, 3000, 3, 7, 5, id="N1000-M3000-D3-k7"),
        pytest.param(5, 3000, 65, 2048, 30, id="quick-N5-M3000-D65-k2048"),  # two-pass path
        pytest.param(3, 300, 9, 300, 4, id="N3-M300-D9-kM"),
        pytest.param(2, 50000, 17, 100, 10, id="N2-M50000-D17-k100"),
    ],
)
def test_knn_duplicate_rows_exact_tie_order(N, M, D, k, distinct, metric, dtype):
    q, bank = _int_problem(N, M, D, distinct)
    bank = bank.to(DTYPES[dtype])  # small integers: exact in every dtype
    dc, ic, dt, it = _run_both(q, bank, k, metric)
    _check_order(dc, ic, M)
    assert torch.equal(dc, dt.float()), (dc - dt).abs().max()
    assert torch.equal(ic, it)


@needs_gpu
def test_knn_quick_duplicate_rows_cosine():
    q, bank = _int_problem(7, 2000, 33, 25)
    dc, ic = _compare(q, bank, 200, "cosine")
    _check_order(dc, ic, 2000)


@needs_gpu
def test_knn_quick_all_rows_identical():
    """Every bank row equal: the result is 0..k-1 in order, for every path."""
    bank = torch.ones(3000, 16, device="cuda")
    q = torch.randn(5, 16, device="cuda")
    for k in (1, 50, 1000, 2048, 3000):
        for metric in ("l2", "ip"):
            d, i = knn_ops.knn(q, bank, k, metric, backend="cuda")
            assert torch.equal(i, torch.arange(k, device="cuda").expand(5, k)), (k, metric)
            assert bool((d == d[:, :1]).all())


# ---------------------------------------------------------------------------------------------
# exact=False, kth_distance, determinism, streams, zero queries, raw-binding errors
# ---------------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 50, 1000, 2048])
def test_knn_quick_inexact_bf16_recall(k, metric):
    bank = _bank(20000, 129).to(torch.bfloat16)
    q = _queries(100, 129, bank)
    dc, ic = knn_ops.knn(q, bank, k, metric, exact=False, backend="cuda")
    dt, it = knn_ops.knn(q, bank, k, metric, backend="torch")
    assert dc.shape == (100, k) and ic.dtype == torch.int64
    rows = torch.arange(100, device="cuda")[:, None]
    hit = torch.isin((rows * 20000 + ic).flatten(), (rows * 20000 + it).flatten())
    recall = hit.float().mean().item()
    assert recall >= 0.99, recall


@needs_gpu
@pytest.mark.parametrize("metric", METRICS)
def test_kth_distance_quick(metric):
    bank = _bank(5000, 33)
    q = _queries(100, 33, bank)
    ks = [50, 1, 1000, 100, 50, 5000]
    kc = knn_ops.kth_distance(q, bank, ks, metric, backend="cuda")
    kt = knn_ops.kth_distance(q, bank, ks, metric, backend="torch")
    assert kc.shape == (100, len(ks))
    torch.testing.assert_close(kc.double(), kt.double(), atol=_tolerance(q, bank, metric), rtol=0)
    d, _ = knn_ops.knn(q, bank, max(ks), metric, backend="cuda")
    assert torch.equal(kc, d[:, [k - 1 for k in ks]])


@needs_gpu
@pytest.mark.parametrize("k", [10, 2000])
def test_knn_quick_deterministic_and_stream(k):
    bank = _bank(20000, 65)
    q = _queries(9, 65, bank)
    d1, i1 = knn_ops.knn(q, bank, k, "l2", backend="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        d2, i2 = knn_ops.knn(q, bank, k, "l2", backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert torch.equal(d1, d2) and torch.equal(i1, i2)


@needs_gpu
def test_knn_quick_no_queries():
    bank = _bank(1000, 33)
    d, i = knn_ops.knn(bank[:0], bank, 5, "l2", backend="cuda")
    assert d.shape == (0, 5) and i.shape == (0, 5)


@needs_gpu
def test_knn_quick_raw_binding_errors():
    q = torch.randn(4, 8, device="cuda")
    d = torch.empty(4, 2, device="cuda")
    i = torch.empty(4, 2, dtype=torch.int64, device="cuda")
    args = dict(q_ptr=q.data_ptr(), q_dtype="f32", N=4, bank_ptr=q.data_ptr(), bank_dtype="f32",
                M=4, D=8, k=2, metric=0, exact=True, out_d_ptr=d.data_ptr(),
                out_i_ptr=i.data_ptr(), stream=0)  # fmt: skip
    _MOD.knn(**args)
    torch.cuda.synchronize()
    assert torch.equal(i[:, 0], torch.arange(4, device="cuda"))  # each row is its own nearest
    for bad, exc in [
        (dict(q_dtype="f64"), ValueError),
        (dict(k=5), ValueError),
        (dict(k=0), ValueError),
        (dict(metric=2), ValueError),
        (dict(D=0), ValueError),
        (dict(bank_ptr=0), ValueError),
    ]:
        with pytest.raises(exc):
            _MOD.knn(**{**args, **bad})
    host = torch.randn(4, 8)
    with pytest.raises(ValueError, match="device memory"):
        _MOD.knn(**{**args, "q_ptr": host.data_ptr()})
