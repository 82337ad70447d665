"""The KNN estimator against OpenOOD's and pytorch-ood's formulas (written here from their math
with faiss / sklearn), sweeps, incremental banks, memory-mapped banks streamed in chunks,
reduced-precision banks, subsampling, persistence and bad input."""

import numpy as np
import pytest
import torch

import ood_fast
from ood_fast import ops
from ood_fast.detectors import knn as knn_mod
from ood_fast.detectors.knn import KNN
from ood_fast.detectors.mahalanobis import NotFittedError

faiss = pytest.importorskip("faiss")


def _data(M=1500, N=40, D=33, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((5, D)) * 2
    bank = (centers[rng.integers(0, 5, M)] + rng.standard_normal((M, D))).astype(np.float32)
    queries = rng.standard_normal((N, D)).astype(np.float32) * 2
    queries[: N // 2] += centers[rng.integers(0, 5, N // 2)].astype(np.float32)  # some ID-like
    return bank, queries


def _openood_norm(x):
    # OpenOOD's knn_postprocessor: x / (np.linalg.norm(x, ord=2, axis=-1, keepdims=True) + 1e-10)
    return x / (np.linalg.norm(x, ord=2, axis=-1, keepdims=True) + 1e-10)


def _openood_knn(bank, queries, k):
    """OpenOOD: faiss IndexFlatL2 over normalized features, conf = -D[:, k-1]."""
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(np.ascontiguousarray(_openood_norm(bank), dtype=np.float32))
    D, _ = index.search(np.ascontiguousarray(_openood_norm(queries), dtype=np.float32), k)
    return -D[:, k - 1]


def _pytorch_ood_knn(bank, queries, k):
    """pytorch-ood: F.normalize (clamp 1e-12), sklearn NearestNeighbors brute, dist[:, -1]."""
    from sklearn.neighbors import NearestNeighbors

    def norm(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    nn = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(norm(bank))
    dist, _ = nn.kneighbors(norm(queries), n_neighbors=k)
    return -dist[:, -1]  # pytorch-ood returns +dist (higher = OOD); ours is higher = ID


def _check_neighbours(bank_rows, q_rows, d, idx, k, tol=1e-5):
    """(d, idx) is a valid exact kNN result: the rows at idx are at the true k smallest squared
    L2 distances (float64), whatever the order among near-ties."""
    bank_rows = np.asarray(bank_rows, np.float64)
    q_rows = np.asarray(q_rows, np.float64)
    full = ((q_rows[:, None, :] - bank_rows[None, :, :]) ** 2).sum(-1)
    true = np.sort(full, axis=1)[:, :k]
    idx = idx.numpy()
    assert idx.shape == (q_rows.shape[0], k)
    for n in range(q_rows.shape[0]):
        assert len(set(idx[n].tolist())) == k  # distinct rows
    got = np.take_along_axis(full, idx, axis=1)
    np.testing.assert_allclose(got, true, atol=tol)
    np.testing.assert_allclose(d.numpy(), true, atol=tol)


@pytest.fixture
def small_chunks(monkeypatch):
    """Stream memory-mapped banks in chunks of 97 rows (several chunks, some smaller than k)."""
    monkeypatch.setattr(knn_mod, "CHUNK_ROWS", 97)
    return 97


# ---------------------------------------------------------------------------------------------
# anchors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 7, 50])
@pytest.mark.parametrize("D", [1, 33, 128])
def test_default_score_is_openood_formula(k, D):
    bank, queries = _data(M=1200, D=D, seed=D + k)
    bank[5] = 0.0  # zero rows: OpenOOD's normalizer keeps them at zero
    queries[3] = 0.0
    est = KNN(k=k).fit(bank)
    s = est.score(queries)
    assert s.dtype == torch.float32 and s.shape == (queries.shape[0],)
    np.testing.assert_allclose(s.numpy(), _openood_knn(bank, queries, k), atol=2e-6, rtol=0)


@pytest.mark.parametrize("k", [1, 50])
def test_unsquared_score_is_pytorch_ood_formula(k):
    bank, queries = _data(seed=k)
    s = KNN(k=k, squared=False).fit(torch.from_numpy(bank)).score(torch.from_numpy(queries))
    np.testing.assert_allclose(s.numpy(), _pytorch_ood_knn(bank, queries, k), atol=1e-5, rtol=0)


def test_ip_and_cosine_metrics():
    bank, queries = _data(seed=3)
    k = 11
    # ip on normalized features = k-th largest inner product (faiss IndexFlatIP order)
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(_openood_norm(bank).astype(np.float32))
    sims, _ = index.search(_openood_norm(queries).astype(np.float32), k)
    s = KNN(k=k, metric="ip").fit(bank).score(queries)
    np.testing.assert_allclose(s.numpy(), sims[:, k - 1], atol=2e-6)
    # cosine without normalization: -(1 - cos) of the k-th most similar row (float64 numpy)
    b64, q64 = bank.astype(np.float64), queries.astype(np.float64)
    cos = (q64 / np.linalg.norm(q64, axis=1, keepdims=True)) @ (
        b64 / np.linalg.norm(b64, axis=1, keepdims=True)
    ).T
    ref = -(1 - np.sort(cos, axis=1)[:, ::-1][:, k - 1])
    s = KNN(k=k, metric="cosine", normalize=False).fit(bank).score(queries)
    np.testing.assert_allclose(s.numpy(), ref, atol=2e-6)


def test_unnormalized_l2_and_kneighbors():
    bank, queries = _data(M=800, seed=4)
    est = KNN(k=9, normalize=False).fit(bank)
    d, i = est.kneighbors(queries)
    _check_neighbours(bank, queries, d, i, 9, tol=2e-4)
    np.testing.assert_allclose(est.score(queries).numpy(), -d[:, -1].numpy(), atol=1e-6, rtol=0)
    d3, _ = est.kneighbors(queries, k=3)
    np.testing.assert_allclose(d3.numpy(), d[:, :3].numpy(), atol=1e-6)
    du, iu = KNN(k=9, normalize=False, squared=False).fit(bank).kneighbors(queries)
    np.testing.assert_allclose(du.numpy() ** 2, d.numpy(), rtol=1e-5, atol=1e-5)


def test_query_dtypes_and_empty_queries():
    bank, queries = _data(seed=5)
    est = KNN(k=5).fit(bank)
    ref = est.score(queries)
    torch.testing.assert_close(est.score(queries.astype(np.float64)), ref, atol=1e-6, rtol=0)
    assert est.score(np.zeros((0, bank.shape[1]), np.float32)).shape == (0,)
    assert est.score_sweep(np.zeros((0, bank.shape[1]), np.float32), [1, 2]).shape == (0, 2)
    d, i = est.kneighbors(np.zeros((0, bank.shape[1]), np.float32))
    assert d.shape == i.shape == (0, 5)


# ---------------------------------------------------------------------------------------------
# sweeps, incremental banks, memory-mapped banks
# ---------------------------------------------------------------------------------------------


def test_score_sweep_equals_separate_scores():
    bank, queries = _data(seed=6)
    ks = [50, 1, 200, 7, 50, 1500]
    est = KNN().fit(bank)
    sweep = est.score_sweep(queries, ks)
    assert sweep.shape == (queries.shape[0], len(ks)) and sweep.dtype == torch.float32
    for j, k in enumerate(ks):
        est.k = k
        torch.testing.assert_close(sweep[:, j], est.score(queries), atol=1e-6, rtol=0)
        np.testing.assert_allclose(sweep[:, j].numpy(), _openood_knn(bank, queries, k), atol=2e-6)
    unsq = KNN(squared=False).fit(bank).score_sweep(queries, np.array([7, 9]))
    np.testing.assert_allclose(unsq.numpy()[:, 0], -np.sqrt(-sweep.numpy()[:, 3]), atol=1e-6)
    np.testing.assert_allclose(
        unsq.numpy()[:, 1], _pytorch_ood_knn(bank, queries, 9), atol=1e-5, rtol=0
    )


def test_sweep_uses_one_pass(monkeypatch):
    bank, queries = _data(seed=7)
    calls = []
    real = ops.kth_distance

    def spy(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "kth_distance", spy)
    KNN().fit(bank).score_sweep(queries, [50, 100, 200, 500, 1000])
    assert calls == [[50, 100, 200, 500, 1000]]


def test_add_equals_fit_concat():
    bank, queries = _data(M=1000, seed=8)
    parts = np.split(bank, [300, 301, 700])
    est = KNN(k=40).fit(parts[0])
    for p in parts[1:]:
        est.add(torch.from_numpy(p))
    est.add(np.zeros((0, bank.shape[1]), np.float32))  # no-op
    ref = KNN(k=40).fit(bank)
    assert est.n_samples_ == 1000 and est.n_features_in_ == bank.shape[1]
    assert torch.equal(est.bank_, ref.bank_)
    assert torch.equal(est.score(queries), ref.score(queries))
    d, i = est.kneighbors(queries)
    d0, i0 = ref.kneighbors(queries)
    assert torch.equal(d, d0) and torch.equal(i, i0)
    # add on an unfitted estimator is fit
    assert torch.equal(KNN(k=40).add(bank).score(queries), ref.score(queries))
    # fit replaces
    est.fit(parts[0])
    assert est.n_samples_ == 300


def test_memmap_bank_equals_in_memory(tmp_path, small_chunks, monkeypatch):
    bank, queries = _data(M=1000, seed=9)
    path = tmp_path / "bank.npy"
    np.save(path, bank)
    mm = np.load(path, mmap_mode="r")
    ref = KNN(k=150).fit(bank)  # k > chunk rows: the running top-k spans chunks
    seen = []
    real = ops.knn

    def spy(q, b, k, *args, **kwargs):
        seen.append(b.shape[0])
        return real(q, b, k, *args, **kwargs)

    for source in (mm, str(path), path):
        est = KNN(k=150).fit(source)
        assert est.n_samples_ == 1000
        monkeypatch.setattr(ops, "knn", spy)
        seen.clear()
        s = est.score(queries)
        monkeypatch.setattr(ops, "knn", real)
        assert len(seen) == -(-1000 // small_chunks) and max(seen) <= small_chunks
        torch.testing.assert_close(s, ref.score(queries), atol=1e-6, rtol=0)
        torch.testing.assert_close(
            est.score_sweep(queries, [1, 150, 999]),
            ref.score_sweep(queries, [1, 150, 999]),
            atol=1e-6,
            rtol=0,
        )
        d, i = est.kneighbors(queries)
        _check_neighbours(_openood_norm(bank), _openood_norm(queries), d, i, 150)
    assert isinstance(est._segments[0].source, np.memmap)  # kept on disk, not loaded


def test_memmap_views_and_layouts(tmp_path, small_chunks):
    bank, queries = _data(M=600, seed=10)
    path = tmp_path / "bank.npy"
    np.save(path, bank)
    mm = np.load(path, mmap_mode="r")
    # a row slice of a memmap (read from its own position in the file)
    view = mm[123:]
    est = KNN(k=20).fit(view)
    assert est._segments[0].region is not None
    torch.testing.assert_close(
        est.score(queries), KNN(k=20).fit(bank[123:]).score(queries), atol=1e-6, rtol=0
    )
    # Fortran-order file and a copy-on-write memmap: read through the mapping instead
    fpath = tmp_path / "bank_f.npy"
    np.save(fpath, np.asfortranarray(bank))
    ref = KNN(k=20).fit(bank).score(queries)
    for source in (np.load(fpath, mmap_mode="r"), np.load(path, mmap_mode="c")):
        est = KNN(k=20).fit(source)
        assert est._segments[0].region is None
        torch.testing.assert_close(est.score(queries), ref, atol=1e-6, rtol=0)
    # float16 and float64 files
    for dt in (np.float16, np.float64):
        p = tmp_path / f"bank_{np.dtype(dt).name}.npy"
        np.save(p, bank.astype(dt))
        got = KNN(k=20).fit(p).score(queries)
        want = KNN(k=20).fit(bank.astype(dt)).score(queries)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_mixed_segments_equal_fit_concat(tmp_path, small_chunks):
    bank, queries = _data(M=900, seed=11)
    np.save(tmp_path / "a.npy", bank[:400])
    np.save(tmp_path / "c.npy", bank[650:])
    est = KNN(k=60).fit(tmp_path / "a.npy").add(bank[400:500]).add(torch.from_numpy(bank[500:650]))
    est.add(np.load(tmp_path / "c.npy", mmap_mode="r"))
    assert [s.kind for s in est._segments] == ["stream", "memory", "stream"]
    ref = KNN(k=60).fit(bank)
    torch.testing.assert_close(est.score(queries), ref.score(queries), atol=1e-6, rtol=0)
    d, i = est.kneighbors(queries)
    _check_neighbours(_openood_norm(bank), _openood_norm(queries), d, i, 60)
    assert torch.equal(est.bank_, ref.bank_)


# ---------------------------------------------------------------------------------------------
# reduced-precision banks, subsampling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_bank_equals_fp32_search_of_rounded_bank(dtype, tmp_path, small_chunks):
    bank, queries = _data(seed=12)
    k = 30
    est = KNN(k=k, bank_dtype=dtype).fit(bank)
    assert est.bank_.dtype == dtype
    b = torch.from_numpy(bank)
    normed = b / (torch.linalg.vector_norm(b, dim=1, keepdim=True) + 1e-10)  # fp32, then rounded
    rounded = normed.to(dtype).float().numpy()
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(rounded)
    D, _ = index.search(_openood_norm(queries).astype(np.float32), k)
    np.testing.assert_allclose(est.score(queries).numpy(), -D[:, k - 1], atol=2e-6, rtol=0)
    d, i = est.kneighbors(queries)
    _check_neighbours(rounded, _openood_norm(queries), d, i, k)
    # the same from a memory-mapped bank (chunks rounded on the fly)
    np.save(tmp_path / "b.npy", bank)
    got = KNN(k=k, bank_dtype=dtype).fit(tmp_path / "b.npy").score(queries)
    torch.testing.assert_close(got, est.score(queries), atol=1e-6, rtol=0)


def test_bank_dtype_strings_and_fp16_overflow():
    bank, _ = _data(M=50)
    assert KNN(bank_dtype="bf16").bank_dtype == torch.bfloat16
    assert KNN(bank_dtype="float16").bank_dtype == torch.float16
    assert KNN().fit(bank).bank_.dtype == torch.float32
    KNN(bank_dtype=torch.float16).fit(bank * 1e6)  # normalized first: fine
    with pytest.raises(ValueError, match="float16"):
        KNN(bank_dtype=torch.float16, normalize=False).fit(bank * 1e6)


def test_subsample_fraction_and_count():
    bank, queries = _data(M=1000, seed=13)
    normed = _openood_norm(bank)
    for sub, m in ((0.25, 250), (123, 123), (5000, 1000), (1.0, 1000)):
        est = KNN(k=5, subsample=sub, seed=3).fit(bank)
        assert est.n_samples_ == m
        kept = est.bank_.numpy()
        # every kept row is a bank row, in the original order, without repeats
        rows = ((kept[:, None, :] - normed[None, :, :]) ** 2).sum(-1).argmin(1)
        np.testing.assert_allclose(kept, normed[rows], atol=1e-7)
        assert np.all(np.diff(rows) > 0)
        np.testing.assert_allclose(
            est.score(queries).numpy(), _openood_knn(bank[rows], queries, 5), atol=2e-6
        )
    a = KNN(subsample=0.1, seed=1).fit(bank).bank_
    assert torch.equal(a, KNN(subsample=0.1, seed=1).fit(bank).bank_)
    assert not torch.equal(a, KNN(subsample=0.1, seed=2).fit(bank).bank_)
    # add() subsamples each batch
    est = KNN(subsample=0.5).fit(bank).add(bank)
    assert est.n_samples_ == 1000


def test_subsample_memmap_reads_kept_rows(tmp_path):
    bank, queries = _data(M=500, seed=14)
    np.save(tmp_path / "b.npy", bank)
    a = KNN(k=5, subsample=0.2, seed=4).fit(tmp_path / "b.npy")
    b = KNN(k=5, subsample=0.2, seed=4).fit(bank)
    assert a.n_samples_ == 100 and [s.kind for s in a._segments] == ["memory"]
    assert torch.equal(a.bank_, b.bank_)


# ---------------------------------------------------------------------------------------------
# persistence
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw", [{}, {"squared": False, "k": 3}, {"bank_dtype": torch.bfloat16}, {"metric": "ip"}]
)
def test_save_load_bit_identical(tmp_path, kw):
    bank, queries = _data(seed=15)
    est = KNN(**kw).fit(bank)
    est.save(tmp_path / "knn.safetensors")
    back = KNN.load(tmp_path / "knn.safetensors")
    assert repr(back) == repr(est)
    assert torch.equal(back.score(queries), est.score(queries))
    assert torch.equal(back.score_sweep(queries, [1, 20]), est.score_sweep(queries, [1, 20]))
    again = ood_fast.load(tmp_path / "knn.safetensors")
    assert isinstance(again, KNN) and torch.equal(again.score(queries), est.score(queries))


def test_save_load_memmap_copy_and_reference(tmp_path, small_chunks):
    bank, queries = _data(M=700, seed=16)
    np.save(tmp_path / "b.npy", bank)
    est = KNN(k=20, subsample=None).fit(tmp_path / "b.npy").add(bank[:50])
    s = est.score(queries)
    est.save(tmp_path / "copy.safetensors")
    est.save(tmp_path / "ref.safetensors", bank="reference")
    assert (tmp_path / "ref.safetensors").stat().st_size < bank.nbytes // 2
    for name in ("copy", "ref"):
        back = KNN.load(tmp_path / f"{name}.safetensors")
        assert back.n_samples_ == 750
        assert torch.equal(back.score(queries), s)
        assert torch.equal(back.kneighbors(queries)[1], est.kneighbors(queries)[1])
    # add() continues after load
    back.add(bank[:10])
    assert back.n_samples_ == 760
    with pytest.raises(ValueError, match="copy"):
        est.save(tmp_path / "x.safetensors", bank="bogus")


def test_load_wrong_kind(tmp_path):
    from ood_fast.detectors.mahalanobis import Mahalanobis

    X, _ = _data(M=100)
    Mahalanobis().fit(X, np.arange(100) % 3).save(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="not 'knn'"):
        KNN.load(tmp_path / "m.safetensors")


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_not_fitted():
    est = KNN()
    X = np.zeros((2, 3), np.float32)
    for call in (
        lambda: est.score(X),
        lambda: est.score_sweep(X, [1]),
        lambda: est.kneighbors(X),
        lambda: est.save("/nonexistent/x"),
        lambda: est.n_samples_,
        lambda: est.bank_,
    ):
        with pytest.raises(NotFittedError, match="fit"):
            call()


def test_k_larger_than_bank_at_score_time():
    bank, queries = _data(M=30)
    est = KNN(k=50).fit(bank)  # fit accepts it: add() may grow the bank
    with pytest.raises(ValueError, match=r"k=50.*M=30"):
        est.score(queries)
    with pytest.raises(ValueError, match=r"M=30"):
        est.score_sweep(queries, [5, 31])
    with pytest.raises(ValueError, match=r"k=31.*M=30"):
        est.kneighbors(queries, k=31)
    with pytest.raises(ValueError, match="subsampling"):
        KNN(k=20, subsample=10).fit(bank).score(queries)
    est.add(bank)
    assert est.score(queries).shape == (queries.shape[0],)


def test_bad_k_and_parameters():
    for k in (0, -1):
        with pytest.raises(ValueError, match="k must be >= 1"):
            KNN(k=k)
    for k in (2.5, True, "5", None):
        with pytest.raises(TypeError, match="k must be an integer"):
            KNN(k=k)
    with pytest.raises(ValueError, match="metric"):
        KNN(metric="l1")
    with pytest.raises(ValueError, match="squared=False"):
        KNN(metric="ip", squared=False)
    with pytest.raises(TypeError, match="normalize"):
        KNN(normalize=1)
    for sub in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            KNN(subsample=sub)
    with pytest.raises(ValueError, match="subsample must be >= 1"):
        KNN(subsample=0)
    for sub in (True, "half"):
        with pytest.raises(TypeError, match="subsample"):
            KNN(subsample=sub)
    for dt in (torch.float64, torch.int8, "float64", 3):
        with pytest.raises(ValueError, match="bank_dtype"):
            KNN(bank_dtype=dt)
    with pytest.raises(ValueError, match="backend"):
        KNN(backend="gpu")
    bank, queries = _data(M=100)
    est = KNN(k=5).fit(bank)
    with pytest.raises(ValueError, match="k must be >= 1"):
        est.kneighbors(queries, k=0)
    with pytest.raises(ValueError, match="ks is empty"):
        est.score_sweep(queries, [])
    with pytest.raises(ValueError, match="ks entry must be >= 1"):
        est.score_sweep(queries, [3, 0])
    with pytest.raises(TypeError, match="ks"):
        est.score_sweep(queries, 5)


def test_empty_bank(tmp_path):
    with pytest.raises(ValueError, match="bank is empty"):
        KNN().fit(np.zeros((0, 8), np.float32))
    np.save(tmp_path / "e.npy", np.zeros((0, 8), np.float32))
    with pytest.raises(ValueError, match="bank is empty"):
        KNN().fit(tmp_path / "e.npy")
    with pytest.raises(FileNotFoundError):
        KNN().fit(tmp_path / "missing.npy")


def test_non_finite_values(tmp_path, small_chunks):
    bank, queries = _data(M=500)
    bad = bank.copy()
    bad[321, 4] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        KNN().fit(bad)
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(ValueError, match=r"non-finite.*row 321"):
        KNN().fit(tmp_path / "bad.npy")
    est = KNN(k=5).fit(bank)
    with pytest.raises(ValueError, match="non-finite"):
        est.add(np.full((2, bank.shape[1]), np.inf, np.float32))
    assert est.n_samples_ == 500
    q = queries.copy()
    q[1, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        est.score(q)
    # a failed fit leaves the estimator unfitted
    with pytest.raises(ValueError):
        est.fit(bad)
    with pytest.raises(NotFittedError):
        est.score(queries)


def test_wrong_dimension_and_dtype(tmp_path):
    bank, queries = _data(M=100, D=8)
    est = KNN(k=3).fit(bank)
    with pytest.raises(ValueError, match="D=8.*D=9"):
        est.score(np.zeros((2, 9), np.float32))
    with pytest.raises(ValueError, match="D=8"):
        est.add(np.zeros((2, 7), np.float32))
    np.save(tmp_path / "b7.npy", np.zeros((5, 7), np.float32))
    with pytest.raises(ValueError, match="D=8"):
        est.add(tmp_path / "b7.npy")
    with pytest.raises(ValueError, match="2-D"):
        est.score(np.zeros(8, np.float32))
    with pytest.raises(TypeError, match="floating"):
        KNN().fit(np.ones((4, 8), np.int64))
    np.save(tmp_path / "i.npy", np.ones((4, 8), np.int32))
    with pytest.raises(TypeError, match="floating"):
        KNN().fit(tmp_path / "i.npy")
    assert est.n_samples_ == 100


@pytest.mark.gpu
def test_cuda_banks_and_queries(tmp_path, small_chunks):
    bank, queries = _data(M=600, seed=17)
    ref = KNN(k=25).fit(bank).score(queries)
    # bank on the GPU, queries on the CPU: scores come back on the CPU
    est = KNN(k=25).fit(torch.from_numpy(bank).cuda())
    assert est.bank_.is_cuda
    s = est.score(queries)
    assert s.device.type == "cpu"
    torch.testing.assert_close(s, ref, atol=1e-5, rtol=0)
    # a memory-mapped bank streams to the queries' device
    np.save(tmp_path / "b.npy", bank)
    s = KNN(k=25).fit(tmp_path / "b.npy").score(torch.from_numpy(queries).cuda())
    assert s.is_cuda
    torch.testing.assert_close(s.cpu(), ref, atol=1e-5, rtol=0)
