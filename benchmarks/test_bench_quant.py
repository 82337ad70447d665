"""Rotation-quantization kernels, ours vs the peers a user would pick, side by side in one run.

One pytest-benchmark group per case (``ood_fast.bench.quant_cases("default")``); candidates and
their checks come from ``ood_fast.bench`` (the same code as ``ood-fast bench --workload quant``):

* ``hadamard n=… fp32 64 MB``   ours (the backend that auto-selects, ``check_finite=False``;
                                 ``extra_info["backend_used"]`` says which ran), "ours:scan" (the
                                 op's default NaN/Inf scan of the input; no bar), vs
                                 ``dst.copy_(src)`` of the same bytes into a preallocated buffer
                                 (bar: >= 0.8×, K·2^m sizes >= 0.5×) and, at n = 4096, a dense
                                 ``torch.matmul(x, H, out=)`` (bar: >= 50×); n ∈ {256, 1024,
                                 4096, 8192} and 1536 = 12·2^7, 3584 = 28·2^7, 5120 = 20·2^8
* ``rotate_quantize n=4096 …``   ours (random Hadamard, per token, fp32 -> int8, out= buffers)
                                 vs a copy moving the same total bytes (bar: >= 0.7×), at 64 MB
                                 and at 512 MB of input (beyond the last-level cache)
* ``int8_linear M=2048 K=4096 N=4096``
                                 ours ``int8_linear`` on int8 inputs (bars: >= 2× fp32
                                 ``F.linear``, >= 1.0× torch's dynamic int8 ``Linear``, the faster
                                 of fbgemm / onednn), ours rotated W8A8 (rotate_quantize +
                                 int8_linear chained, fp32 in/out; bar: >= 0.9× torch int8), a
                                 ``QuantLinear`` forward where ood_fast.quant has one, and
                                 ``torch._int_mm`` (int32 out, no dequantization) for reference

Every candidate is checked before it is timed (``extra_info``: max rel diff vs float64, or the
int GEMM vs int64, or SQNR vs float64). A candidate on the torch reference backend (a kernel
not built yet) is timed on its first rows, sized to ``BUDGET_S``, and scaled linearly
(``scale_to_full``), so the suite stays near two minutes. The ratio summary at the end
(benchmarks/conftest.py) prints peer time / ours and each bar as ok or MISS, and the same ratio
timed interleaved with that peer (``extra_info["interleaved"]``, steadier on a shared machine).

    python -m pytest benchmarks/test_bench_quant.py -q --benchmark-only --bench-threads 2
"""

from __future__ import annotations

import pytest
import torch

from ood_fast import bench

PRESET = "default"
CASES = {f"{c.op}:{c.n}:{c.rows}": c for c in bench.quant_cases(PRESET)}
DENSE_NS = bench.QUANT_PRESETS[PRESET]["dense_ns"]
BUDGET_S = 4.0  # per candidate: a slower one is sliced to fit
ROUNDS = {"hadamard": 10, "rotate_quantize": 10, "int8_linear": 3}

_ALIVE: dict = {}


def case_for(key: str) -> bench.QuantCase:
    """The case, with its inputs generated once; the previous case's inputs are freed (64 MB
    each, and the groups run in order)."""
    case = CASES[key]
    prev = _ALIVE.get("case")
    if prev is not None and prev is not case:
        prev._inputs = None
    _ALIVE["case"] = case
    return case


def candidate(case: bench.QuantCase, spec: str) -> bench.QuantCandidate:
    """'ours' | 'ours:w8a8' | 'ours:quantlinear' | a QUANT_PEERS name ('torch_int8:onednn')."""
    name, _, arg = spec.partition(":")
    if name == "ours":
        c = bench._quant_ours(case, None, arg or "op")
    else:
        c = bench._quant_peer(case, name, arg or None)
    if isinstance(c, str):
        pytest.skip(c)
    return c


def bench_quant(benchmark, key: str, spec: str):
    case = case_for(key)
    cand = candidate(case, spec)
    inp = case.inputs
    state = cand.prepare(inp)
    with bench.record_backends() as used:
        checked = cand.check(state, inp) if cand.check is not None else {}
    x = inp[cand.input_key]
    n_total = x.shape[0]
    rounds = ROUNDS[case.op]
    rows = bench.quant_rows_for_budget(cand, state, x, BUDGET_S, rounds + 1)
    xt = x[:rows]
    scale = 1.0 if cand.fixed_bytes else n_total / rows
    benchmark.group = case.name
    benchmark.extra_info.update(
        cand.info(),
        **checked,
        backend_used=bench._used_str(used),
        rows=rows,
        n_total=n_total,
        scale_to_full=scale,
        bytes=case.bytes,
    )
    if cand.kind == "ours":
        benchmark.extra_info["bars"] = {  # the dense x@H peer runs at DENSE_NS only
            r: b for r, b in case.bars(cand.role).items() if r != "dense" or case.n in DENSE_NS
        }
        benchmark.extra_info["interleaved"] = interleaved_ratios(case, cand, state, xt, scale)
    benchmark.pedantic(
        cand.score,
        args=(state, xt),
        rounds=1 if rows < n_total else rounds,
        warmup_rounds=0 if rows < n_total else 1,
        iterations=1,
    )
    t = float(benchmark.stats.stats.median) * scale
    if case.op == "int8_linear":
        benchmark.extra_info["gops"] = case.ops / t / 1e9
    else:
        benchmark.extra_info["gbps"] = case.bytes / t / 1e9


def interleaved_ratios(case, cand, state, xt, scale) -> dict:
    """{peer role: fastest peer time / ours} for the bars' peers (but the slow dense x@H),
    timed round-robin with ours (``bench.time_round_robin``) besides pytest-benchmark's
    back-to-back groups: on a machine shared with other jobs, ours and its peer then see the
    same load. Printed next to each bar by the ratio summary."""
    out = {}
    for role in case.bars(cand.role):
        if role == "dense":
            continue
        engines = bench.peers_quantized_engines() if role == "torch_int8" else [None]
        peers = [bench._quant_peer(case, role, e) for e in engines]
        peers = [p for p in peers if not isinstance(p, str)]
        if not peers:
            continue
        calls = [lambda: cand.score(state, xt)]
        for p in peers:
            st = p.prepare(case.inputs)
            px = case.inputs[p.input_key]
            calls.append(lambda p=p, st=st, px=px: p.score(st, px))
        ts = bench.time_round_robin(calls, repeats=ROUNDS[case.op], budget=BUDGET_S)
        if any(isinstance(t, BaseException) for t in ts):
            continue
        out[role] = min(t.median for t in ts[1:]) / (ts[0].median * scale)
    return out


HADAMARD = [k for k in CASES if k.startswith("hadamard:")]


@pytest.mark.parametrize(
    "key,spec",
    [
        (k, s)
        for k in HADAMARD
        for s in ("ours", "ours:scan", "copy") + (("dense",) if CASES[k].n in DENSE_NS else ())
    ],
)
def test_hadamard(benchmark, key, spec):
    torch.manual_seed(0)
    bench_quant(benchmark, key, spec)


@pytest.mark.parametrize(
    "key,spec",
    [
        (k, s)
        for k in CASES
        if k.startswith("rotate_quantize:")
        for s in ("ours", "ours:scan", "copy")
    ],
)
def test_rotate_quantize(benchmark, key, spec):
    bench_quant(benchmark, key, spec)


@pytest.mark.parametrize(
    "spec",
    [
        "ours",
        "ours:w8a8",
        "ours:quantlinear",
        "torch_fp32",
        "torch_int8:fbgemm",
        "torch_int8:onednn",
        "int_mm",
    ],
)
def test_int8_linear(benchmark, spec):
    key = next(k for k in CASES if k.startswith("int8_linear:"))
    bench_quant(benchmark, key, spec)
