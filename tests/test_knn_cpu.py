"""The C++ CPU backend of ``knn`` / ``kth_distance`` (csrc/cpu/knn.cpp, csrc/cpu/topk.h).

Checked against the torch reference (``backend="torch"``) over odd shapes, every metric, fp32 /
fp16 / bf16 queries and banks, both kernel paths (small batches split the bank between threads,
larger ones tile the queries over shared bank chunks, with chunk boundaries forced small), exact
tie order on integer-valued data (where every distance is exact in fp32), thread counts, and
against faiss ``IndexFlatL2``.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from ood_fast import _extensions as ext

knn_ops = importlib.import_module("ood_fast.ops.knn")
from test_knn_ops import assert_knn_equal  # noqa: E402  (tests/ is on sys.path under pytest)

_C = ext.cpu_module()
pytestmark = pytest.mark.skipif(
    _C is None or not hasattr(_C, "knn"), reason="C++ extension ood_fast._C has no knn"
)

DT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _randn(n, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(dtype)


def _ints(n, d, seed, lo=-3, hi=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (n, d), generator=g).float()


def _atol(q, b, metric):
    if metric == "cosine":
        return 1e-5
    qn = float(q.float().norm(dim=1).max()) if len(q) else 0.0
    bn = float(b.float().norm(dim=1).max())
    return 1e-5 * ((qn * qn + bn * bn) if metric == "l2" else qn * bn) + 1e-6


def both(q, b, k, metric="l2", exact=True):
    cpu = knn_ops.knn(q, b, k, metric, exact=exact, backend="cpu")
    ref = knn_ops.knn(q, b, k, metric, backend="torch")
    return cpu, ref


@pytest.fixture(params=[None, "70000"], ids=["chunk-default", "chunk-small"])
def chunks(request, monkeypatch):
    """Default bank chunks, and chunks of ~70 kB so that larger banks cross many boundaries."""
    if request.param:
        monkeypatch.setenv("OOD_FAST_KNN_CHUNK_BYTES", request.param)
    else:
        monkeypatch.delenv("OOD_FAST_KNN_CHUNK_BYTES", raising=False)


# ---------------------------------------------------------------------------------------------
# Exact equality on integer-valued data: every distance is exact, so order and ties must match
# ---------------------------------------------------------------------------------------------

SHAPES = [  # (N, M, D, k): M in {1, k, k + 1, 1000, 5000}, k in {1, 50, M}, N in {1, 5, 300}
    (1, 1, 3, 1),
    (5, 1, 1, 1),
    (300, 1, 33, 1),
    (1, 50, 129, 50),
    (5, 51, 33, 50),
    (300, 51, 3, 51),
    (1, 1000, 777, 50),
    (5, 1000, 1, 1000),
    (300, 1000, 33, 50),
    (300, 1000, 129, 1),
    (1, 5000, 33, 5000),
    (5, 5000, 129, 50),
    (300, 5000, 777, 50),
    (40, 5000, 3, 5000),
]


@pytest.mark.parametrize("N,M,D,k", SHAPES)
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_integer_data_equals_reference_exactly(N, M, D, k, metric, chunks):
    q, b = _ints(N, D, 1), _ints(M, D, 2)
    (d, i), (rd, ri) = both(q, b, k, metric)
    assert torch.equal(d, rd)
    assert torch.equal(i, ri)  # exact tie order: lower bank index first


@pytest.mark.parametrize("N", [1, 5, 300])
@pytest.mark.parametrize("k", [1, 7, 50, 600])
def test_duplicate_rows_tie_order(N, k, chunks):
    D = 17
    base = _ints(40, D, 3, -1, 2)
    g = torch.Generator().manual_seed(4)
    b = base[torch.randint(0, 40, (1500,), generator=g)]  # every row repeated many times
    q = _ints(N, D, 5, -1, 2)
    for metric in ("l2", "ip"):
        (d, i), (rd, ri) = both(q, b, k, metric)
        assert torch.equal(d, rd) and torch.equal(i, ri)


@pytest.mark.parametrize("qdt", list(DT))
@pytest.mark.parametrize("bdt", list(DT))
@pytest.mark.parametrize("N", [5, 300])
def test_dtypes_integer_data_exact(qdt, bdt, N):
    q, b = _ints(N, 65, 6).to(DT[qdt]), _ints(3000, 65, 7).to(DT[bdt])  # small ints: exact
    (d, i), (rd, ri) = both(q, b, 50, "l2")
    assert torch.equal(d, rd) and torch.equal(i, ri)


# ---------------------------------------------------------------------------------------------
# Random data: close to the reference, ties only where distances (nearly) tie
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "N,M,D,k",
    [
        (1, 1000, 129, 50),
        (5, 5000, 33, 50),
        (300, 5000, 129, 1000),
        (300, 1000, 777, 1),
        (37, 2000, 3, 2000),
    ],
)
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_random_data_matches_reference(N, M, D, k, metric, chunks):
    q, b = _randn(N, D, 8), _randn(M, D, 9)
    (d, i), (rd, ri) = both(q, b, k, metric)
    assert_knn_equal(d, i, rd, ri, atol=_atol(q, b, metric))


@pytest.mark.parametrize("bdt", ["f16", "bf16"])
@pytest.mark.parametrize("qdt", ["f32", "bf16"])
@pytest.mark.parametrize("N", [1, 5, 300])
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_reduced_precision_bank_exact_equals_fp32_search(bdt, qdt, N, metric):
    """exact=True over an f16/bf16 bank: identical to the fp32 search over the upcast values
    (and within rounding of the torch reference); exact=False: recall >= 0.99."""
    q, b = _randn(N, 129, 10).to(DT[qdt]), _randn(5000, 129, 11).to(DT[bdt])
    d, i = knn_ops.knn(q, b, 50, metric, exact=True, backend="cpu")
    d32, i32 = knn_ops.knn(q, b.float(), 50, metric, backend="cpu")
    assert torch.equal(d, d32) and torch.equal(i, i32)
    rd, ri = knn_ops.knn(q, b, 50, metric, backend="torch")
    assert_knn_equal(d, i, rd, ri, atol=_atol(q.float(), b.float(), metric))
    d2, i2 = knn_ops.knn(q, b, 50, metric, exact=False, backend="cpu")
    recall = np.mean(
        [len(set(a.tolist()) & set(c.tolist())) / 50 for a, c in zip(i2, ri, strict=True)]
    )
    assert recall >= 0.99


def test_threads_identical(monkeypatch):
    q, b = _randn(300, 129, 12), _randn(4000, 129, 13)
    qs = q[:5].contiguous()
    out = {}
    for nt in (1, 2):
        monkeypatch.setattr(ext, "num_threads", lambda nt=nt: nt)
        out[nt] = [
            knn_ops.knn(x, b, k, "l2", backend="cpu") for x in (q, qs) for k in (1, 50, 1000)
        ]
    for a, c in zip(out[1], out[2], strict=True):
        assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])


def test_small_and_large_batch_paths_agree():
    """A query answered in a batch of 1 (bank split over threads) equals the same query in a
    batch of 300 (query tiles): the same fp32 dot-product chain everywhere."""
    q, b = _randn(300, 257, 14), _randn(3000, 257, 15)
    d, i = knn_ops.knn(q, b, 20, "l2", backend="cpu")
    for r in (0, 137, 299):
        d1, i1 = knn_ops.knn(q[r : r + 1], b, 20, "l2", backend="cpu")
        assert torch.equal(d1[0], d[r]) and torch.equal(i1[0], i[r])


def test_empty_queries():
    b = _randn(10, 8, 16)
    d, i = knn_ops.knn(torch.empty(0, 8), b, 3, backend="cpu")
    assert d.shape == (0, 3) and i.shape == (0, 3) and i.dtype == torch.int64


def test_kth_distance_sweep_matches_reference():
    q, b = _ints(300, 33, 17), _ints(3000, 33, 18)
    ks = [50, 100, 1, 200, 1000, 50]
    got = knn_ops.kth_distance(q, b, ks, backend="cpu")
    want = knn_ops.kth_distance(q, b, ks, backend="torch")
    assert torch.equal(got, want)


def test_overflowing_distances_are_inf_in_index_order():
    """Rows whose distance overflows to +inf are kept in index order after the finite ones (the
    reference's rule), including when k covers them."""
    b = torch.zeros(6, 4)
    b[1] = 3e19  # ‖b‖² overflows
    b[4] = 3e19
    q = torch.zeros(2, 4)
    d, i = knn_ops.knn(q, b, 6, "l2", check_bank=False, backend="cpu")
    rd, ri = knn_ops.knn(q, b, 6, "l2", check_bank=False, backend="torch")
    assert torch.equal(d, rd) and torch.equal(i, ri)


def test_matches_faiss_flat_l2():
    faiss = pytest.importorskip("faiss")
    q = torch.nn.functional.normalize(_randn(200, 96, 19), dim=1)
    b = torch.nn.functional.normalize(_randn(4000, 96, 20), dim=1)
    index = faiss.IndexFlatL2(96)
    index.add(b.numpy())
    fd, fi = index.search(q.numpy(), 50)
    d, i = knn_ops.knn(q, b, 50, "l2", backend="cpu")
    assert_knn_equal(d, i, fd, fi, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# bf16 banks on AMX-BF16 processors: split-query AMX pass + certified fp32 re-rank
# ---------------------------------------------------------------------------------------------

_AMX = bool(_C is not None and _C.cpu_features().get("amx_bf16"))


def _search(q, bank, k, metric, monkeypatch, bf16_pass: str, margin: str | None = None, exact=True):
    monkeypatch.setenv("OOD_FAST_KNN_BF16_PASS", bf16_pass)
    if margin is None:
        monkeypatch.delenv("OOD_FAST_KNN_MARGIN", raising=False)
    else:
        monkeypatch.setenv("OOD_FAST_KNN_MARGIN", margin)
    return knn_ops.knn(q, bank, k, metric=metric, backend="cpu", exact=exact)


@pytest.mark.skipif(not _AMX, reason="the bf16 fast pass needs AMX-BF16, which this CPU lacks")
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize(
    ("N", "M", "D", "k"),
    [
        (64, 400, 1, 1),
        (65, 700, 33, 7),
        (130, 3000, 129, 50),
        (97, 1500, 777, 20),
        (200, 900, 64, 300),
    ],
)
@pytest.mark.parametrize("margin", [None, "0", "3"])
def test_bf16_fast_pass_equals_fp32_path_bit_for_bit(
    N, M, D, k, metric, margin, monkeypatch, chunks
):
    """margin "0" leaves every query uncertified (all re-searched by the fp32 path), "3" a mix."""
    q = _randn(N, D, 1)
    bank = torch.nn.functional.normalize(_randn(M, D, 2), dim=1).to(torch.bfloat16)
    bank[5] = bank[9]  # duplicate rows: ties by lower index
    d0, i0 = _search(q, bank, k, metric, monkeypatch, "0")
    d1, i1 = _search(q, bank, k, metric, monkeypatch, "1", margin)
    assert torch.equal(d0, d1)
    assert torch.equal(i0, i1)


@pytest.mark.skipif(not _AMX, reason="the bf16 fast pass needs AMX-BF16, which this CPU lacks")
@pytest.mark.parametrize("qdt", ["f32", "f16", "bf16"])
def test_bf16_fast_pass_query_dtypes_and_scale(qdt, monkeypatch):
    # Unnormalized, large-norm rows: the certification bound scales with the norms.
    q = (_randn(80, 96, 3) * 30).to(DT[qdt])
    bank = (_randn(2500, 96, 4) * 7).to(torch.bfloat16)
    d0, i0 = _search(q, bank, 25, "l2", monkeypatch, "0")
    d1, i1 = _search(q, bank, 25, "l2", monkeypatch, "1")
    assert torch.equal(d0, d1) and torch.equal(i0, i1)


@pytest.mark.skipif(not _AMX, reason="the bf16 fast pass needs AMX-BF16, which this CPU lacks")
def test_bf16_fast_pass_inexact_is_close(monkeypatch):
    """exact=False returns the low pass: distances within the split's error bound of fp32's."""
    q = _randn(100, 256, 5)
    bank = torch.nn.functional.normalize(_randn(4000, 256, 6), dim=1).to(torch.bfloat16)
    d0, _ = _search(q, bank, 10, "l2", monkeypatch, "0")
    d1, i1 = _search(q, bank, 10, "l2", monkeypatch, "1", exact=False)
    qn = q.norm(dim=1, keepdim=True)
    bound = 2 * (2.0**-16 * qn + 1100 * 2.0**-24 * 2 * qn) + 1e-5  # 2Δc for unit bank rows
    assert ((d1 - d0).abs() <= bound).all()
    assert (d1[:, 1:] >= d1[:, :-1]).all()
    exact_d = torch.cdist(q.double(), bank.double()).pow(2).gather(1, i1)
    assert torch.allclose(exact_d.float(), d1, atol=2e-4)


@pytest.mark.skipif(not _AMX, reason="the bf16 fast pass needs AMX-BF16, which this CPU lacks")
def test_bf16_fast_pass_query_blocks(monkeypatch):
    """Batches run in blocks of queries (64 here); a short last block takes the fp32 path."""
    q = _randn(64 * 3 + 17, 48, 7)
    bank = torch.nn.functional.normalize(_randn(3000, 48, 8), dim=1).to(torch.bfloat16)
    d0, i0 = _search(q, bank, 9, "l2", monkeypatch, "0")
    monkeypatch.setenv("OOD_FAST_KNN_BF16_BLOCK", "64")
    d1, i1 = _search(q, bank, 9, "l2", monkeypatch, "1")
    assert torch.equal(d0, d1) and torch.equal(i0, i1)
