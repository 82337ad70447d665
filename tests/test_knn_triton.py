"""Triton backend of ``knn`` / ``kth_distance`` against the torch backend (the reference).

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
before triton is first imported); on a GPU machine they run natively.
Shapes are tiny: the interpreter executes every tile op in numpy.

Two kinds of data: Gaussian features, compared with ``assert_knn_equal`` (distances close,
indices equal up to near-ties), and small-integer features with many duplicate rows, whose
distances are exact in float32 whatever the accumulation order: there the results must equal
the reference exactly, indices included (ties go to the lower bank index).
"""

import importlib

import pytest
import torch
from test_knn_ops import assert_knn_equal  # noqa: E402

from ood_fast import _extensions as _ext  # noqa: E402
from ood_fast.ops import knn, kth_distance  # noqa: E402

pytestmark = pytest.mark.triton  # tests/conftest.py skips these where triton cannot import

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
METRICS = ("l2", "ip", "cosine")
LOWP = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _need_triton_backend():
    why = _ext.triton_unavailable()
    if why:
        pytest.skip("triton backend unavailable: " + "; ".join(why))


@pytest.fixture
def tk():
    """The kernel module (imported lazily: it imports triton)."""
    return importlib.import_module("ood_fast.kernels.knn")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _gauss(N, M, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, D, generator=g)
    b = torch.randn(M, D, generator=g)
    return q.to(DEV), b.to(DEV)


def _ints(N, M, D, seed=0, distinct=3):
    """Small-integer rows (exact arithmetic in float32) drawn from ``distinct`` prototypes per
    coordinate range, so the bank is full of duplicates and the distances full of ties."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randint(-2, 3, (distinct, D), generator=g).float()
    b = protos[torch.randint(0, distinct, (M,), generator=g)]
    q = torch.randint(-2, 3, (N, D), generator=g).float()
    return q.to(DEV), b.to(DEV)


def _atol(q, b, metric):
    """Float32 rounding scale of the distances (accumulation order differs from torch's)."""
    qn = q.float().norm(dim=1).max().item() if q.shape[0] else 0.0
    bn = b.float().norm(dim=1).max().item()
    if metric == "cosine":
        return 1e-5
    if metric == "l2":
        return 1e-5 * (qn * qn + bn * bn + 1.0)
    return 1e-5 * (qn * bn + 1.0)


def _both(q, b, k, metric, **kw):
    dt, it = knn(q, b, k, metric, backend="triton", **kw)
    dr, ir = knn(q, b, k, metric, backend="torch", **kw)
    assert dt.dtype == torch.float32 and it.dtype == torch.int64
    assert dt.shape == it.shape == (q.shape[0], k)
    assert dt.device == q.device and it.device == q.device
    return dt, it, dr, ir


def _assert_exact(dt, it, dr, ir):
    assert torch.equal(dt, dr), (dt - dr).abs().max()
    assert torch.equal(it, ir), (it != ir).nonzero()[:5]


# ---------------------------------------------------------------------------------------------
# float32: odd shapes, every metric
# ---------------------------------------------------------------------------------------------

# (N, M, D, k): D in {1, 3, 33, 129}; M in {1, k, k + 1, ~300}; k in {1, M, above a tile}
SHAPES = [
    (1, 1, 1, 1),
    (5, 7, 3, 7),  # k == M
    (5, 8, 33, 7),  # M == k + 1
    (40, 300, 33, 1),
    (40, 300, 129, 150),  # k above a 128-row tile
    (5, 300, 3, 300),  # k == M, two splits of 150 rows each, fewer than KB = 512
    (1, 301, 129, 20),
    (40, 151, 1, 150),  # D = 1, M == k + 1
]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-M{}-D{}-k{}".format(*s))
def test_fp32_matches_torch(shape, metric):
    N, M, D, k = shape
    q, b = _gauss(N, M, D, seed=N + M + D + k)
    dt, it, dr, ir = _both(q, b, k, metric)
    assert_knn_equal(dt, it, dr, ir, atol=_atol(q, b, metric))
    assert torch.all(dt[:, 1:] >= dt[:, :-1])


@pytest.mark.parametrize("metric", ("l2", "ip"))
@pytest.mark.parametrize(
    "shape", [(40, 300, 3, 10), (5, 300, 33, 300), (40, 260, 1, 129), (1, 5, 129, 5)]
)
def test_ties_equal_reference_exactly(shape, metric):
    """Duplicate rows: identical distances, indices in bank order, lowest indices at the k-th."""
    N, M, D, k = shape
    q, b = _ints(N, M, D, seed=M + k)
    _assert_exact(*_both(q, b, k, metric))


def test_ties_cosine_in_index_order():
    q, b = _ints(40, 300, 3, seed=7)
    dt, it, dr, ir = _both(q, b, 60, "cosine")
    assert_knn_equal(dt, it, dr, ir, atol=1e-6)
    same = dt[:, 1:] == dt[:, :-1]
    assert torch.all(it[:, 1:][same] > it[:, :-1][same])  # equal distances: ascending indices


def test_all_distances_tied_take_first_indices():
    q = torch.zeros(5, 33, device=DEV)
    b = torch.ones(300, 33, device=DEV)
    for metric in METRICS:
        dt, it, dr, ir = _both(q, b, 37, metric)
        _assert_exact(dt, it, dr, ir)
        assert torch.equal(it, torch.arange(37, device=DEV).expand(5, 37))


def test_nearest_rows_first_skips_later_tiles():
    """A bank sorted by distance: after the first tile no tile can improve (the skip path)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(5, 33, generator=g)
    b = torch.randn(300, 33, generator=g)
    order = torch.argsort(torch.cdist(q[:1], b)[0])
    q, b = q[:1].to(DEV), b[order].contiguous().to(DEV)
    dt, it, dr, ir = _both(q, b, 10, "l2")
    assert_knn_equal(dt, it, dr, ir, atol=_atol(q, b, "l2"))
    assert torch.equal(it[0], torch.arange(10, device=DEV))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy overflow in the interpreter
def test_overflow_distances_are_inf_and_tied():
    q = torch.full((3, 33), 1e20, device=DEV)
    b = torch.full((40, 33), 1e20, device=DEV)
    for metric in ("l2", "ip"):
        _assert_exact(*_both(q, b, 17, metric))


# ---------------------------------------------------------------------------------------------
# reduced-precision banks and mixed dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", list(LOWP), ids=str)
@pytest.mark.parametrize("shape", [(40, 300, 33, 10), (5, 200, 129, 150)], ids=str)
def test_lowp_bank_exact_equals_fp32_search(shape, dtype, metric):
    """exact=True: the result is the float32 search over the upcast bank."""
    N, M, D, k = shape
    q, b = _gauss(N, M, D, seed=k)
    b = b.to(LOWP[dtype])
    dt, it, dr, ir = _both(q, b, k, metric)  # torch on the same (reduced) bank
    assert_knn_equal(dt, it, dr, ir, atol=_atol(q, b, metric))
    d32, i32 = knn(q, b.float(), k, metric, backend="torch")
    assert_knn_equal(dt, it, d32, i32, atol=_atol(q, b, metric))


@pytest.mark.parametrize("metric", ("l2", "ip"))
@pytest.mark.parametrize("dtype", list(LOWP), ids=str)
def test_lowp_bank_exact_ties_equal_reference_exactly(dtype, metric):
    q, b = _ints(40, 300, 33, seed=11)
    _assert_exact(*_both(q, b.to(LOWP[dtype]), 70, metric))


def _lowp_model(q, b, k, metric):
    """What exact=False computes: queries rounded to the bank's format, fp32 accumulation,
    float32 norms for l2 (cosine: unit rows in float32 first, as the adapter passes them)."""
    qf, bf = q.float(), b.float()
    if metric == "cosine":
        qf = qf / qf.norm(dim=1, keepdim=True)
        bf = bf / bf.norm(dim=1, keepdim=True)
    g = qf.to(b.dtype).float() @ bf.T
    if metric == "l2":
        d = (qf.square().sum(1)[:, None] + bf.square().sum(1)[None, :] - 2 * g).clamp(min=0)
    elif metric == "ip":
        d = -g
    else:
        d = (1 - g).clamp(0, 2)
    return torch.sort(d, dim=1, stable=True)[0][:, :k]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", list(LOWP), ids=str)
def test_lowp_bank_inexact(dtype, metric):
    """exact=False: the low-precision product (cosine: the bank is upcast to unit float32 rows
    by the adapter, so it is the float32 search)."""
    q, b = _gauss(40, 300, 33, seed=5)
    b = b.to(LOWP[dtype])
    dt, it = knn(q, b, 20, metric, exact=False, backend="triton")
    if metric == "cosine":
        dr, ir = knn(q, b, 20, metric, backend="torch")
        assert_knn_equal(dt, it, dr, ir, atol=_atol(q, b, metric))
    else:
        model = _lowp_model(q, b, 20, metric)
        torch.testing.assert_close(dt, model, atol=_atol(q, b, metric), rtol=0)
        # the indices point at rows whose low-precision distance is the one reported
        qf, bf = q.float(), b.float()
        g = (qf.to(b.dtype).float()[:, None, :] * bf[it]).sum(-1)
        d = -g if metric == "ip" else qf.square().sum(1)[:, None] + bf[it].square().sum(-1) - 2 * g
        torch.testing.assert_close(dt, d.clamp(min=0) if metric == "l2" else d,
                                   atol=_atol(q, b, metric), rtol=0)  # fmt: skip


@pytest.mark.parametrize(
    "qdt,bdt",
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),
        (torch.float32, torch.float16),
    ],
    ids=str,
)
def test_mixed_dtypes(qdt, bdt):
    q, b = _gauss(5, 300, 33, seed=9)
    q, b = q.to(qdt), b.to(bdt)
    dt, it, dr, ir = _both(q, b, 25, "l2")
    assert_knn_equal(dt, it, dr, ir, atol=_atol(q, b, "l2"))


# ---------------------------------------------------------------------------------------------
# kth_distance, empty queries, the two-pass path, banks in pieces
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_kth_distance_matches_torch(metric):
    q, b = _gauss(40, 300, 33, seed=2)
    ks = [150, 1, 7, 7, 64]
    got = kth_distance(q, b, ks, metric, backend="triton")
    want = kth_distance(q, b, ks, metric, backend="torch")
    assert got.shape == (40, len(ks)) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=_atol(q, b, metric), rtol=0)
    for j, k in enumerate(ks):
        assert torch.equal(got[:, j], knn(q, b, k, metric, backend="triton")[0][:, k - 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_empty_queries(metric, dtype):
    q = torch.empty(0, 33, device=DEV, dtype=dtype)
    b = torch.randn(20, 33, device=DEV).to(dtype)
    d, i = knn(q, b, 5, metric, backend="triton")
    assert d.shape == i.shape == (0, 5)
    assert d.dtype == torch.float32 and i.dtype == torch.int64
    assert kth_distance(q, b, [1, 5], metric, backend="triton").shape == (0, 2)


@pytest.mark.parametrize("metric", METRICS)
def test_two_pass_fallback(tk, monkeypatch, metric):
    """k above the single-pass limit: blocks of bank rows, several query chunks."""
    monkeypatch.setattr(tk, "SINGLE_PASS_MAX_K", 4)
    monkeypatch.setattr(tk, "FALLBACK_BANK_BLOCK", 100)
    monkeypatch.setattr(tk, "FALLBACK_BYTES", 8 * 16 * (150 + 100))  # 16 queries per chunk
    calls = []
    monkeypatch.setattr(tk, "_single_pass", lambda *a: calls.append(a) or pytest.fail("1-pass"))
    q, b = _gauss(40, 300, 33, seed=4)
    for k in (5, 150, 300):
        dt, it, dr, ir = _both(q, b, k, metric)
        assert_knn_equal(dt, it, dr, ir, atol=_atol(q, b, metric))
    if metric != "cosine":
        qi, bi = _ints(40, 300, 3, seed=4)
        _assert_exact(*_both(qi, bi, 150, metric))
        _assert_exact(*_both(qi, bi.to(torch.bfloat16), 150, metric))
        dt, it = knn(q, b.to(torch.float16), 30, metric, exact=False, backend="triton")
        torch.testing.assert_close(
            dt, _lowp_model(q, b.to(torch.float16), 30, metric), atol=_atol(q, b, metric), rtol=0
        )
    got = kth_distance(q, b, [5, 150], metric, backend="triton")
    torch.testing.assert_close(
        got, kth_distance(q, b, [5, 150], metric, backend="torch"), atol=_atol(q, b, metric), rtol=0
    )


@pytest.mark.parametrize("k", [3, 200])
def test_bank_in_pieces(tk, monkeypatch, k):
    """Banks above the 31-bit index limit are searched in pieces (limit shrunk to 128 rows)."""
    monkeypatch.setattr(tk, "MAX_ROWS", 128)
    q, b = _ints(40, 300, 3, seed=k)
    for metric in ("l2", "ip"):
        _assert_exact(*_both(q, b, k, metric))


def test_kernel_rejects_bad_arguments(tk):
    q, b = _gauss(2, 10, 4)
    with pytest.raises(ValueError, match="metric_code"):
        tk.knn(q, b, 3, 2, True)
    with pytest.raises(ValueError, match="out of range"):
        tk.knn(q, b, 11, 0, True)
    with pytest.raises(TypeError, match="float32"):
        tk.knn(q.double(), b, 3, 0, True)


def test_decode_keys_roundtrip(tk):
    d = torch.tensor([-float("inf"), -3.5, -1e-30, 0.0, 1e-30, 2.0, float("inf")])
    i = torch.arange(7, dtype=torch.int64) * 1000 + 5
    bits = d.view(torch.int32)
    keys = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64) << 32) | i
    assert torch.equal(torch.sort(keys).values, keys)  # key order == distance order
    d2, i2 = tk.decode_keys(keys)
    assert torch.equal(d2, d) and torch.equal(i2, i)
