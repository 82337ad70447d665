"""The quant benchmark harness's own pieces (ood_fast.bench): its float64 Hadamard check, the
backend recorder, round-robin timing, slicing, the SQNR measurement on a tiny layer."""

from __future__ import annotations

import math

import pytest
import torch

from ood_fast import bench
from ood_fast.reference.hadamard import hadamard_matrix


@pytest.mark.parametrize("n", [12, 20, 28, 64, 96, 160, 224])
def test_hadamard_check_matches_the_dense_reference(n):
    """The bench's factored float64 Hadamard (what every hadamard candidate is checked against)
    equals the dense reference matrix, with and without signs."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, 5, n, generator=g, dtype=torch.float64)
    signs = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.float64)
    h = hadamard_matrix(n, dtype=torch.float64) / math.sqrt(n)
    torch.testing.assert_close(bench._hadamard_ref(x), x @ h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bench._hadamard_ref(x, signs), (x * signs) @ h, rtol=0, atol=1e-12)


def test_record_backends_names_the_backend_that_ran():
    from ood_fast import ops

    x = torch.randn(4, 64)
    with bench.record_backends() as used:
        ops.hadamard(x, backend="torch")
        ops.rotate_quantize(x, "hadamard", backend="torch")
    assert used == [("hadamard", "torch"), ("rotate_quantize", "torch")]
    assert bench._used_str(used) == "torch"
    assert bench._used_str([("a", "cpu"), ("b", "torch")]) == "a=cpu, b=torch"
    with bench.record_backends() as used:
        pass
    assert used == [] and bench._used_str(used) is None
    # the registry is restored: a call outside the block is not recorded
    ops.hadamard(x, backend="torch")
    assert used == []


def test_time_round_robin_interleaves_and_keeps_errors():
    calls = []

    def f(name):
        def run():
            calls.append(name)
            if name == "bad" and calls.count("bad") == 2:  # fails in its first round
                raise RuntimeError("boom")

        return run

    ts = bench.time_round_robin([f("a"), f("b"), f("bad")], repeats=3, budget=10.0)
    assert isinstance(ts[2], RuntimeError)
    assert [t.runs for t in ts[:2]] == [3, 3]
    # warm-ups first, then one call of each per round
    assert calls[:3] == ["a", "b", "bad"] and calls[3:6] == ["a", "b", "bad"]
    assert calls[6:] == ["a", "b", "a", "b"]


def test_slicing_only_for_slow_sliced_candidates():
    case = bench.QuantCase("hadamard", 4096, 64)
    x = case.inputs["x"]
    slow = bench.QuantCandidate(
        "slow",
        "ours",
        case.name,
        "hadamard",
        dict,
        lambda st, xs: __import__("time").sleep(1e-4 * xs.shape[0]),
        sliced=True,
    )
    rows = bench.quant_rows_for_budget(slow, {}, x, budget=0.2, runs=2)
    assert 64 <= rows < 4096
    fast = bench.QuantCandidate("fast", "peer", case.name, "hadamard", dict, lambda st, xs: None)
    assert bench.quant_rows_for_budget(fast, {}, x, budget=1e-9, runs=2) == 4096


def test_sqnr_linear_ranks_the_methods_on_a_spiked_layer():
    """A tiny spiked heavy-tailed layer: every method × granularity is finite, and per-tensor
    static quantization gains from smoothing + KLT over no transform."""
    g = torch.Generator().manual_seed(0)
    n = 64
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.ones(n, dtype=torch.float64)
    lam[:2] = torch.tensor([400.0, 100.0])
    z = torch.distributions.StudentT(3.0).sample((5000, n)).to(torch.float64)
    x = ((z * lam.sqrt()) @ q.T).float()
    w = torch.randn(32, n, generator=g)
    t = bench.sqnr_linear(x[:4000], x[4000:], w)
    assert set(t) == set(bench.QUANT_METHODS)
    for m in bench.QUANT_METHODS:
        assert set(t[m]) == set(bench.QUANT_GRANULARITIES)
        assert all(math.isfinite(v) and v > 0 for v in t[m].values()), t
    assert t["smooth+KLT+H"]["per_tensor"] > t["none"]["per_tensor"], t
