"""KNN (deep nearest neighbours) scoring, ours vs faiss / torch / sklearn, side by side in one run.

Bank: 50,000×512 L2-normalized features (the train split of ``ood_fast.data.synthetic_features``),
10,000 raw queries (half OOD); scores are OpenOOD's −‖q̂ − b̂_(k)‖² for every candidate
(``ood_fast.peers`` converts each peer). Groups (pytest-benchmark ``group=``), one per case; see
benchmarks/README.md:

* ``knn k=50 50k×512 N=10k``      ours (cpu, torch backends), faiss IndexFlatL2 (OpenOOD),
                                   faiss IndexFlatIP, torch mm+topk (chunks of 2048), sklearn
                                   brute (pytorch-ood; 500 rows, scaled)
* ``knn k=1000 50k×512 N=10k``    the same at k=1000 (faiss's heap selection gets slower)
* ``knn sweep k∈{50..1000}``       ours ``score_sweep`` (one pass) vs faiss IndexFlatL2 searched
                                   once per k (OpenOOD's sweep), torch (one topk(1000) + gather)
* ``knn bf16 bank k=50``           ours with a bf16 bank (exact fp32 re-rank) and fp32 vs faiss
                                   IndexFlatL2 fp32
* ``knn batch 1 query``            one query: ours, faiss with 1 and 2 threads, torch
* ``knn memmap 2 GB bank, 1 query`` (slow: --run-slow) a 256k×2048 .npy bank memory-mapped and
                                   streamed by ours vs faiss (which loads it); extra_info holds
                                   the memory each needed

Before a candidate is timed, its scores are checked against a float64 evaluation on 256 queries
(max |Δscore| < 1e-5; a bf16 bank against the float64 search over the bank as stored, which its
exact re-rank must equal). Every group also records the peak extra resident memory of one
scoring call (``peak_extra_mb``, RSS sampled every ~0.5 ms by a thread: a call that holds the
GIL throughout can be under-measured).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

from ood_fast import bench

BANK, QUERIES, DIM = 50_000, 10_000, 512
SWEEP = list(bench.KNN_SWEEP)
CHECK_ROWS = 256
SLICES = {"sklearn": 500}  # rows timed for the slow peers, scaled to the full query set


# ---------------------------------------------------------------------------------------------
# Data, models, checks
# ---------------------------------------------------------------------------------------------

_STATE: dict = {}


def workload() -> bench.KNNWorkload:
    if "wl" not in _STATE:
        wl = bench.KNNWorkload("knn 50k×512", BANK, QUERIES, DIM, num_classes=10, k=50)
        wl.data  # noqa: B018  (generated once per session)
        _STATE["wl"] = wl
        _STATE["models"] = {}
        _STATE["refs"] = {}
    return _STATE["wl"]


def reference(precision: str, ks) -> tuple[torch.Tensor, np.ndarray]:
    """(check rows, float64 scores [rows, len(ks)]) over the bank as ``precision`` stores it."""
    wl = workload()
    key = (precision, tuple(ks))
    if key not in _STATE["refs"]:
        from ood_fast.detectors.knn import openood_normalize

        d = wl.data
        idx = bench.slice_rows(wl.n_test, CHECK_ROWS)
        dt = bench.KNN_BANK_DTYPES[precision]
        if dt == torch.float32:
            ref = bench.knn_reference(d["bank"], d["test_x"][idx], ks)
        else:
            bank = openood_normalize(d["bank"]).to(dt)
            ref = bench.knn_reference(bank, d["test_x"][idx], ks, normalize_bank=False)
        _STATE["refs"][key] = (idx, ref)
    return _STATE["refs"][key]


def make_candidate(spec: str, k: int, case: str) -> bench.KNNCandidate:
    """'ours:cpu:fp32', 'peer:faiss_l2' or 'peer:faiss_l2:1' (threads) -> candidate, or skip."""
    kind, *rest = spec.split(":")
    wl = workload()
    if kind == "ours":
        backend, precision = rest
        why = bench.available_knn_backends().get(backend)
        if why:
            pytest.skip(f"backend {backend} unavailable: {'; '.join(why)}")
        return bench._knn_ours(backend, precision, k, wl.ks, case)
    threads = int(rest[1]) if len(rest) > 1 else None
    c = bench._knn_peer(rest[0], k, wl.ks, case, threads=threads)
    if isinstance(c, str):
        pytest.skip(f"{bench.KNN_PEER_LABELS[rest[0]]}: {c}")
    return c


def model_for(cand: bench.KNNCandidate):
    """Fitted once per session per (ours backend × bank dtype | peer), shared by the groups."""
    models = _STATE["models"]
    if cand.fit_key not in models:
        try:
            models[cand.fit_key] = cand.fit(workload().data["bank"].to(cand.device))
        except NotImplementedError as exc:
            pytest.skip(f"{cand.name}: {exc}")
    return models[cand.fit_key]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_mb(fn) -> float:
    """Peak resident memory above the level before ``fn()``, in MB (sampled by a thread)."""
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    peak[0] = max(peak[0], _rss())
    return (peak[0] - base) / 1e6


def bench_knn(
    benchmark,
    group: str,
    spec: str,
    k: int,
    case: str = "search",
    rounds: int = 3,
    cand: bench.KNNCandidate | None = None,
):
    """Check against float64 (untimed), measure memory once, then time scoring."""
    wl = workload()
    cand = cand or make_candidate(spec, k, case)
    model = model_for(cand)
    d = wl.data
    N = 1 if case == "batch1" else wl.n_test
    x_all = d["test_x"].to(cand.device)
    rows = SLICES.get(cand.peer, N) if cand.sliced else N
    if case == "batch1":
        x = x_all[:1]
    else:
        x = x_all if rows >= N else x_all[bench.slice_rows(N, rows).to(cand.device)]
    ks = SWEEP if case == "sweep" else [k]
    rounded = cand.kind == "ours" and cand.precision != "fp32"
    if case == "batch1":
        bank = model.bank_.cpu() if rounded else d["bank"]
        ref = bench.knn_reference(bank, d["test_x"][:1], ks, normalize_bank=not rounded)
        xc = x
    else:
        idx, ref = reference(cand.precision if rounded else "fp32", ks)
        if cand.sliced:  # a slow peer: its check on the first 64 check rows
            idx, ref = idx[:64], ref[:64]
        xc = x_all[idx.to(cand.device)]
    got = bench._numpy64(cand.score(model, xc)).reshape(xc.shape[0], -1)
    err = float(np.abs(got - ref).max())
    assert err < 1e-5, f"{cand.name} disagrees with the float64 evaluation: max |Δ| {err:.2e}"
    mem = peak_extra_mb(lambda: cand.score(model, x))
    benchmark.group = group
    benchmark.extra_info.update(
        cand.info(),
        rows=int(x.shape[0]),
        n_total=N,
        scale_to_full=N / x.shape[0],
        max_abs_diff_f64=err,
        peak_extra_mb=mem,
        gflops_needed=wl.flops(N) / 1e9,
    )
    slow = rows < N
    benchmark.pedantic(
        cand.score,
        args=(model, x),
        rounds=1 if slow else rounds,
        warmup_rounds=0 if slow else 1,
        iterations=1,
    )


OURS = ["ours:cpu:fp32", "ours:torch:fp32"]
PEERS = ["peer:faiss_l2", "peer:faiss_ip", "peer:torch"]


# ---------------------------------------------------------------------------------------------
# Groups
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", OURS + PEERS + ["peer:sklearn"])
def test_knn_k50(benchmark, spec):
    bench_knn(benchmark, "knn k=50 50k×512 N=10k", spec, 50)


@pytest.mark.parametrize("spec", OURS + PEERS)
def test_knn_k1000(benchmark, spec):
    bench_knn(benchmark, "knn k=1000 50k×512 N=10k", spec, 1000)


def _torch_sweep_candidate() -> bench.KNNCandidate:
    """torch mm+topk with k = max(ks), then a gather of the sweep's columns: the one-pass sweep a
    practitioner can write in torch."""
    from ood_fast import peers as P

    ks = SWEEP

    def score(m, x):
        xn = x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + 1e-10)
        out = torch.empty(x.shape[0], len(ks))
        for s in range(0, x.shape[0], 2048):
            qc = xn[s : s + 2048]
            d2 = torch.addmm(m.bank_sq[None, :], qc, m.bank.T, alpha=-2.0)
            d2 += qc.square().sum(1, keepdim=True)
            top = d2.topk(max(ks), dim=1, largest=False, sorted=True).values
            out[s : s + 2048] = -top[:, [k - 1 for k in ks]].clamp(min=0.0)
        return out

    return bench.KNNCandidate(
        name="torch mm+topk(1000) + gather",
        kind="peer",
        case="sweep",
        fit_key="peer:torch",
        fit=P.torch_knn_fit,
        score=score,
        peer="torch",
    )


SWEEP_GROUP = "knn sweep k∈{50,100,200,500,1000} 50k×512 N=10k"


@pytest.mark.parametrize(
    "spec", ["ours:cpu:fp32", "ours:torch:fp32", "peer:faiss_l2", "peer:torch_one_pass"]
)
def test_knn_sweep(benchmark, spec):
    cand = _torch_sweep_candidate() if spec == "peer:torch_one_pass" else None
    bench_knn(benchmark, SWEEP_GROUP, spec, 50, "sweep", rounds=2, cand=cand)


@pytest.mark.parametrize("spec", ["ours:cpu:bf16", "ours:cpu:fp32", "peer:faiss_l2"])
def test_knn_bf16_bank(benchmark, spec):
    bench_knn(benchmark, "knn bf16 bank k=50 50k×512 N=10k", spec, 50)


@pytest.mark.parametrize(
    "spec",
    [
        "ours:cpu:fp32",
        "ours:cpu:bf16",
        "ours:torch:fp32",
        "peer:faiss_l2:1",
        "peer:faiss_l2:2",
        "peer:torch",
    ],
)
def test_knn_batch1(benchmark, spec):
    bench_knn(benchmark, "knn batch 1 query 50k×512 k=50", spec, 50, "batch1", rounds=200)


# ---------------------------------------------------------------------------------------------
# Slow: a 2 GB memory-mapped bank, one query (the memory bar)
# ---------------------------------------------------------------------------------------------

MEMMAP_GROUP = "knn memmap 2 GB bank (256k×2048), 1 query"


@pytest.fixture(scope="module")
def memmap_bank(tmp_path_factory):
    """A 256,000×2048 float32 .npy file (2.1 GB), written in chunks, never held in memory."""
    _STATE.pop("models", None)
    _STATE.pop("wl", None)
    path = tmp_path_factory.mktemp("knn_memmap") / "bank.npy"
    M, D = 256_000, 2048
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(M, D))
    g = torch.Generator().manual_seed(0)
    for s in range(0, M, 16_384):
        n = min(16_384, M - s)
        mm[s : s + n] = torch.randn(n, D, generator=g).numpy()
    mm.flush()
    del mm
    q = torch.randn(1, D, generator=g)
    yield str(path), q
    os.remove(path)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["ours:cpu:fp32", "ours:torch:fp32", "peer:faiss_l2"])
def test_knn_memmap_bank_batch1(benchmark, memmap_bank, spec):
    path, q = memmap_bank
    kind, *rest = spec.split(":")
    if kind == "ours":
        why = bench.available_knn_backends().get(rest[0])
        if why:
            pytest.skip(f"backend {rest[0]} unavailable: {'; '.join(why)}")
        import ood_fast

        fit_mem = [0.0]
        model = [None]
        fit_mem[0] = peak_extra_mb(
            lambda: model.__setitem__(0, ood_fast.KNN(k=50, backend=rest[0]).fit(path))
        )
        score = model[0].score
        name = f"ours {rest[0]} {rest[1]} (memory-mapped, streamed)"
    else:
        from ood_fast import peers as P

        if P.faiss_available() is not True:
            pytest.skip(str(P.faiss_available()))
        holder = [None]
        fit_mem = [
            peak_extra_mb(
                lambda: holder.__setitem__(0, P.faiss_l2_fit(np.load(path, mmap_mode="r")))
            )
        ]
        score = lambda x: P.faiss_l2_score(holder[0], x, 50)  # noqa: E731
        name = "faiss IndexFlatL2 (loads the bank)"
    mem = peak_extra_mb(lambda: score(q))
    benchmark.group = MEMMAP_GROUP
    benchmark.extra_info.update(
        candidate=name,
        kind=kind,
        rows=1,
        n_total=1,
        scale_to_full=1.0,
        peak_extra_mb=mem,
        fit_peak_extra_mb=fit_mem[0],
    )
    benchmark.pedantic(score, args=(q,), rounds=3, warmup_rounds=1, iterations=1)
