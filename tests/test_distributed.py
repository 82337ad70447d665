"""The sharded KNN search (``ood_fast.distributed``): 2 processes on loopback with gloo.

Two worker processes (this file, run as a script) join a gloo process group on 127.0.0.1 — a
free port found by binding port 0 there, ``GLOO_SOCKET_IFNAME`` set to the loopback interface,
a bounded collective timeout — and run every scenario of ``_scenarios()`` with their own shard.
Each rank writes its results (tensors, or the error it raised) to a file with ``torch.save``;
the parent process checks that both ranks agree and that the result equals ``ops.knn`` /
``ops.kth_distance`` over the shards concatenated in rank order, on one process.

The workers are started once per module (a few seconds, mostly importing torch twice).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # when run as a worker script
    sys.path.insert(0, str(ROOT))

from ood_fast import ops  # noqa: E402

try:
    import torch.distributed as dist

    _GLOO = dist.is_available() and dist.is_gloo_available()
except ImportError:  # pragma: no cover - a torch build without distributed
    dist = None
    _GLOO = False

pytestmark = pytest.mark.skipif(
    not _GLOO, reason="torch.distributed with the gloo backend is not available in this torch build"
)

WORLD = 2
D = 33
WORKER_TIMEOUT_S = 50  # the whole 2-process run; a hung collective fails the test, not CI
COLLECTIVE_TIMEOUT = timedelta(seconds=30)


# ---------------------------------------------------------------------------------------------
# Scenarios: the same deterministic data in the parent and in both workers
# ---------------------------------------------------------------------------------------------


def _scenarios() -> dict[str, dict]:
    """name -> {queries, shards (one per rank), k or ks, metric, api, exact_data, error}.

    ``queries`` is one tensor (replicated on both ranks) or, in error scenarios, one per rank.

    ``exact_data``: integer-valued features, so every distance is exact in float32 and the
    distances must match bit for bit; ``error``: the exception type every rank must raise.
    """
    g = torch.Generator().manual_seed(1234)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    def randint(lo, hi, *shape):
        return torch.randint(lo, hi, shape, generator=g).to(torch.float32)

    out: dict[str, dict] = {}

    def add(name, queries, shards, metric="l2", k=None, ks=None, api="function", **extra):
        out[name] = dict(
            queries=queries, shards=shards, metric=metric, k=k, ks=ks, api=api,
            exact_data=extra.get("exact_data", False), error=extra.get("error"),
        )  # fmt: skip

    q = randn(20, D)
    uneven = [randn(37, D), randn(150, D)]
    for metric in ("l2", "ip", "cosine"):
        add(f"uneven-{metric}", q, uneven, metric, k=10)
        add(f"shard-smaller-than-k-{metric}", q, [randn(3, D), randn(60, D)], metric, k=8)
    add("empty-shard-rank0", q, [torch.empty(0, D), randn(25, D)], "l2", k=5)
    add("empty-shard-rank1-k-total", q, [randn(25, D), torch.empty(0, D)], "cosine", k=25)
    add("k-equals-total", q, [randn(4, D), randn(7, D)], "ip", k=11)
    add("k1", q, [randn(50, D), randn(51, D)], "l2", k=1)
    add("no-queries", torch.empty(0, D), [randn(5, D), randn(6, D)], "l2", k=3)
    add(
        "float64",
        randn(9, D, dtype=torch.float64),
        [randn(20, D, dtype=torch.float64), randn(13, D, dtype=torch.float64)],
        "l2",
        k=12,
    )
    add("bf16-bank", q, [randn(30, D).bfloat16(), randn(41, D).bfloat16()], "cosine", k=7)
    add("sharded-bank-object", q, uneven, "l2", k=16, api="object")

    # Duplicate rows within and across shards: integer features (exact distances), many ties,
    # k cutting through tie groups. Ties must go to the lower global index.
    base = randint(-3, 4, 6, D)
    tie_shards = [base[[0, 1, 2, 3, 0, 1]], base[[2, 0, 4, 1, 5, 0, 3, 2]]]
    tie_q = torch.cat([base[[0, 2, 5]], randint(-3, 4, 5, D), torch.zeros(1, D)])
    for metric in ("l2", "ip", "cosine"):
        for k in (3, 9):
            add(f"ties-{metric}-k{k}", tie_q, tie_shards, metric, k=k, exact_data=True)
    same = randint(-2, 3, 1, D).expand(5, D).contiguous()  # every row identical
    add("all-rows-equal", tie_q, [same[:2], same[2:]], "l2", k=4, exact_data=True)

    add("kth-distance", q, [randn(30, D), randn(12, D)], "l2", ks=[5, 1, 42, 17, 5])
    add("kth-distance-object", q, uneven, "cosine", ks=[1, 10, 100], api="object")

    # Errors: raised on every rank, and the group stays usable for the scenarios after them.
    add("k-exceeds-total", q, [randn(3, D), randn(4, D)], "l2", k=8, error=ValueError)
    add("ks-exceeds-total", q, [randn(3, D), randn(4, D)], "l2", ks=[1, 8], error=ValueError)
    add("k-exceeds-total-object", q, uneven, "l2", k=188, api="object", error=ValueError)
    nan_shard = randn(4, D)
    nan_shard[2, 5] = float("nan")
    add("nan-in-rank1-shard", q, [randn(5, D), nan_shard], "l2", k=2, error=ValueError)
    add("shards-disagree-on-D", q, [randn(5, D), randn(5, D + 1)], "l2", k=2, error=ValueError)
    add("queries-differ-in-shape", [q, q[:7]], uneven, "l2", k=3, error=ValueError)
    add("after-errors", q, uneven, "ip", k=5)  # the group still works
    return out


# ---------------------------------------------------------------------------------------------
# Worker (this file run as a script): one rank
# ---------------------------------------------------------------------------------------------


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from ood_fast.distributed import ShardedBank, sharded_knn, sharded_kth_distance

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=COLLECTIVE_TIMEOUT,
    )
    results: dict[str, dict] = {}
    try:
        for name, sc in _scenarios().items():
            shard, queries = sc["shards"][rank], sc["queries"]
            if isinstance(queries, list):  # per-rank queries (only in error scenarios)
                queries = queries[rank]
            t0 = time.perf_counter()
            try:
                if sc["api"] == "object":
                    bank = ShardedBank(shard)
                    meta = dict(offset=bank.offset, total=bank.total, sizes=bank.sizes)
                    if sc["ks"] is not None:
                        res = bank.kth_distance(queries, sc["ks"], sc["metric"])
                    else:
                        res = bank.knn(queries, sc["k"], sc["metric"])
                        res = bank.knn(queries, sc["k"], sc["metric"])  # reused: same again
                    meta["bytes"] = bank.communication_bytes(queries.shape[0], 10)
                else:
                    meta = {}
                    if sc["ks"] is not None:
                        res = sharded_kth_distance(queries, shard, sc["ks"], sc["metric"])
                    else:
                        res = sharded_knn(queries, shard, sc["k"], sc["metric"])
                results[name] = dict(result=res, meta=meta, error=None)
            except Exception as exc:  # recorded; the parent checks it was expected
                results[name] = dict(result=None, meta={}, error=(type(exc).__name__, str(exc)))
            results[name]["seconds"] = time.perf_counter() - t0
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Parent: start both ranks, collect their files
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()] if hasattr(socket, "if_nameindex") else []
    for name in ("lo", "lo0"):
        if name in names:
            return name
    return names[0] if names else "lo"


def _launch(out_dir: str):
    port = _free_port()
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME=_loopback_interface(),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(r), str(WORLD), str(port), out_dir],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            logs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.communicate()
        pytest.fail(f"the 2-rank gloo run did not finish within {WORKER_TIMEOUT_S} s")
    return [p.returncode for p in procs], logs


@pytest.fixture(scope="module")
def ranks():
    """``[results of rank 0, results of rank 1]`` and the wall time of the whole run."""
    with tempfile.TemporaryDirectory() as out_dir:
        t0 = time.perf_counter()
        for attempt in range(2):  # the free port can be taken between probe and bind: retry once
            codes, logs = _launch(out_dir)
            if all(c == 0 for c in codes):
                break
            if attempt == 0 and "address already in use" in "".join(logs).lower():
                continue
            pytest.fail(f"worker exit codes {codes}; output:\n" + "\n---\n".join(logs))
        results = [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(WORLD)
        ]
        return results, time.perf_counter() - t0


SCENARIOS = _scenarios()
OK = [name for name, sc in SCENARIOS.items() if sc["error"] is None]
ERRORS = [name for name, sc in SCENARIOS.items() if sc["error"] is not None]


def _expected(sc):
    shards = [s for s in sc["shards"] if s.shape[0]]
    bank = torch.cat([s.to(shards[0].dtype) for s in shards])
    if sc["ks"] is not None:
        return ops.kth_distance(sc["queries"], bank, sc["ks"], sc["metric"])
    return ops.knn(sc["queries"], bank, sc["k"], sc["metric"])


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_run_is_fast(ranks):
    _, seconds = ranks
    assert seconds < 60, f"the 2-rank run took {seconds:.1f} s"


@pytest.mark.parametrize("name", OK)
def test_sharded_equals_single_process(ranks, name):
    results, _ = ranks
    sc = SCENARIOS[name]
    r0, r1 = results[0][name], results[1][name]
    assert r0["error"] is None, r0["error"]
    assert r1["error"] is None, r1["error"]
    expected = _expected(sc)
    if sc["ks"] is not None:
        got = [r0["result"], r1["result"]]
        torch.testing.assert_close(got[0], got[1], rtol=0, atol=0)  # ranks agree bit for bit
        assert got[0].dtype == expected.dtype and got[0].shape == expected.shape
        torch.testing.assert_close(got[0], expected, rtol=1e-6, atol=1e-6)
        return
    (d0, i0), (d1, i1) = r0["result"], r1["result"]
    assert torch.equal(i0, i1) and torch.equal(d0, d1), "ranks disagree"
    ed, ei = expected
    assert d0.dtype == ed.dtype and i0.dtype == torch.int64
    assert d0.shape == ed.shape == i0.shape
    # Indices identical: the same rows, the same order, ties to the lower global index.
    assert torch.equal(i0, ei), f"indices differ:\n{i0}\nexpected\n{ei}"
    if sc["exact_data"]:
        assert torch.equal(d0, ed), "distances differ on exactly representable data"
    else:
        torch.testing.assert_close(d0, ed, rtol=1e-6, atol=1e-6)
    assert bool((d0[:, 1:] >= d0[:, :-1]).all()), "distances not ascending"


@pytest.mark.parametrize("name", ERRORS)
def test_errors_raised_on_every_rank(ranks, name):
    results, _ = ranks
    expected = SCENARIOS[name]["error"].__name__
    for r in range(WORLD):
        err = results[r][name]["error"]
        assert err is not None, f"rank {r} did not raise"
        assert err[0] == expected, f"rank {r}: {err}"


def test_error_messages(ranks):
    results, _ = ranks
    for r in range(WORLD):
        msg = results[r]["k-exceeds-total"]["error"][1]
        assert "k=8" in msg and "total bank size 7" in msg and "[3, 4]" in msg
    # The rank with the NaN says what is wrong; the other names it.
    assert "non-finite" in results[1]["nan-in-rank1-shard"]["error"][1]
    assert "rank(s) [1]" in results[0]["nan-in-rank1-shard"]["error"][1]
    for r in range(WORLD):
        assert "feature dimension" in results[r]["shards-disagree-on-D"]["error"][1]
        assert "replicated" in results[r]["queries-differ-in-shape"]["error"][1]


def test_sharded_bank_metadata(ranks):
    results, _ = ranks
    sizes = [37, 150]
    for r in range(WORLD):
        meta = results[r]["sharded-bank-object"]["meta"]
        assert meta["sizes"] == sizes and meta["total"] == sum(sizes)
        assert meta["offset"] == sum(sizes[:r])
        # world_size × N × k × (4 + 8) bytes, here for N = 20, k = 10
        assert meta["bytes"] == WORLD * 20 * 10 * 12


def test_needs_an_initialized_group():
    from ood_fast.distributed import sharded_knn

    if dist.is_initialized():  # pragma: no cover - only if another test left one behind
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        sharded_knn(torch.zeros(1, 2), torch.zeros(3, 2), 1)


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
