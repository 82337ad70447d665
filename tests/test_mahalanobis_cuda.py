"""CUDA backend (``ood_fast._cuda``) of ``mahalanobis_fused`` against the torch backend and the
float64 definition (``reference.mahalanobis.squared_distances``).

GPU tests skip (with the reason) when torch sees no CUDA device or the extension did not build.
Tolerances are per element, relative to the size of the terms that the expanded form adds up:

    T[n, c] = q[n, g(c)] + 2 |x̃_n|·|proj[:, c]| + |const[c]|     (float64)

so cancellation near a class mean (d² ≪ T) is allowed for, and nothing looser is. min and
logsumexp are checked exactly against the kernel's own ``none`` output (same tiles, same
arithmetic), then against the torch backend and the float64 truth within tolerance.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from ood_fast import _extensions as _ext
from ood_fast.ops import mahalanobis, mahalanobis_plan
from ood_fast.reference.mahalanobis import squared_distances

_CUDA = torch.cuda.is_available()
_MOD = _ext.cuda_module()
_MOD_ERR = None if _MOD is not None else _ext._load("ood_fast._cuda")[1]

_GPU_MARKS = (
    pytest.mark.gpu,
    pytest.mark.skipif(not _CUDA, reason="torch sees no CUDA device"),
    pytest.mark.skipif(_MOD is None, reason=f"ood_fast._cuda did not import ({_MOD_ERR})"),
)


def needs_gpu(fn):
    for mark in _GPU_MARKS:
        fn = mark(fn)
    return fn


SEED = 42
REDUCES = ("none", "min", "logsumexp")
# relative error per unit of T, times (sqrt(E) + 10): summation-order and input-rounding slack
TOL_VS_TORCH = {"fp32": 1e-6, "bf16": 2e-6}
TOL_VS_TRUTH = {"fp32": 1e-6, "bf16": None}  # bf16 vs float64: a flat 1.5e-2 · T
BF16_VS_TRUTH = 1.5e-2
KINDS = [  # (kind, triangular)
    ("tied", True),
    ("tied", False),
    ("per_class", True),
    ("per_class", False),
    ("diag", False),
]
MAX_PER_CLASS_FLOATS = 2e8  # C·D² of per-class factors (fp64 copies included, this is ~1.6 GB)


# ---------------------------------------------------------------------------------------------
# problems (float64 on the GPU, seeded), cached: a problem serves every N, dtype and reduction
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _problem(D, C, kind, triangular):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(SEED)
    f64 = dict(dtype=torch.float64, device=dev, generator=g)
    means = torch.randn(C, D, **f64) * 1.5 + 0.75  # offset: exercises the centring
    if kind == "diag":
        inv_var = torch.rand(C, D, **f64) * 2 + 0.2
        plan = mahalanobis_plan(means, inv_var=inv_var)
        factors, group = None, None
        center = means.mean(0)
        mc = means - center
        proj64 = torch.cat([-0.5 * inv_var, mc * inv_var], dim=1).T  # [2D, C]
        const64 = (mc.square() * inv_var).sum(1)
    else:
        G = 1 if kind == "tied" else C
        if triangular:  # upper triangular with a positive diagonal
            factors = torch.triu(torch.randn(G, D, D, **f64)) / math.sqrt(D)
            factors += torch.diag_embed(1.0 + torch.rand(G, D, **f64))
        else:  # dense
            factors = torch.randn(G, D, D, **f64) / math.sqrt(D)
            factors += torch.eye(D, dtype=torch.float64, device=dev)
        plan = mahalanobis_plan(means, factors, triangular=triangular)
        inv_var = None
        group = plan.group
        center = means.mean(0)
        mc = means - center
        # expanded-form parameters in float64, without the [C, D, D] expansion of a tied W
        if G == 1:
            mw = mc @ factors[0]  # [C, D] whitened means
            proj64 = factors[0] @ mw.T  # [D, C] = P m_c
        else:  # group = arange(C)
            mw = torch.einsum("cd,cde->ce", mc, factors)
            proj64 = torch.einsum("cde,ce->dc", factors, mw)
        const64 = mw.square().sum(1)
    bias = torch.randn(C, **f64).float() * 2
    return dict(
        means=means,
        factors=factors,
        inv_var=inv_var,
        group=group,
        plan=plan,
        center=center,
        proj64=proj64,
        const64=const64,
        bias=bias,
    )


def _features(P, N, dtype, seed=SEED):
    g = torch.Generator(device="cuda").manual_seed(seed + N)
    C, D = P["means"].shape
    pick = torch.randint(0, C, (N,), device="cuda", generator=g)
    x = P["means"][pick] + torch.randn(N, D, dtype=torch.float64, device="cuda", generator=g)
    return x.to(dtype)


def _truth_and_scale(P, x):
    """float64 d² [N, C] from the definition, and the term scale T [N, C]."""
    x64 = x.double()
    d2 = squared_distances(x64, P["means"], P["factors"], P["group"], P["inv_var"])
    if P["inv_var"] is not None:
        xt = x64 - P["center"]
        xt = torch.cat([xt.square(), xt], dim=1)  # u = [x̃², x̃] (kernel centre 0)
        T = 2 * xt.abs() @ P["proj64"].abs() + P["const64"].abs()
    else:
        xt = x64 - P["center"]
        q = torch.stack([(xt @ w).square().sum(1) for w in P["factors"]], dim=1)
        T = q[:, P["group"]] + 2 * xt.abs() @ P["proj64"].abs() + P["const64"].abs()
    return d2, T + 1e-2 * T.max()


def _assert_within(got, want, bound, what):
    got, want = got.double(), want.double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite values"
    err = (got - want).abs()
    bad = err > bound
    if bool(bad.any()):
        i = int(torch.argmax((err / bound).flatten()))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements off; worst at flat index {i}: "
            f"got {got.flatten()[i].item()!r}, want {want.flatten()[i].item()!r}, "
            f"|err| {err.flatten()[i].item():.3g} > bound {bound.flatten()[i].item():.3g}"
        )


def _check(P, x, precision, what, backend="cuda"):
    """Every reduction of the CUDA backend against itself, the torch backend and float64."""
    plan, bias = P["plan"], P["bias"]
    N, E = x.shape[0], P["proj64"].shape[0]
    d2_true, T = _truth_and_scale(P, x)
    rel_t = TOL_VS_TORCH[precision] * (math.sqrt(E) + 10)
    truth_bound = (
        TOL_VS_TRUTH[precision] * (math.sqrt(E) + 10) * T
        if precision == "fp32"
        else BF16_VS_TRUTH * T
    )

    # none
    d2 = mahalanobis(x, plan, "none", precision=precision, backend=backend)
    assert d2.dtype == torch.float32 and d2.shape == (N, plan.num_classes), what
    assert bool((d2 >= 0).all()), f"{what}: d² < 0 (clamp)"
    d2_torch = mahalanobis(x, plan, "none", precision=precision, backend="torch")
    _assert_within(d2, d2_torch, rel_t * T, f"{what} none vs torch")
    _assert_within(d2, d2_true, truth_bound, f"{what} none vs float64")

    # min: exactly the kernel's own d² table (first index on ties), and close to the others
    vals, idx = mahalanobis(x, plan, "min", precision=precision, backend=backend)
    assert vals.dtype == torch.float32 and idx.dtype == torch.int64, what
    assert vals.shape == (N,) and idx.shape == (N,), what
    own_v, own_i = d2.min(dim=1)
    assert torch.equal(vals, own_v), f"{what}: min values differ from min over reduce='none'"
    assert torch.equal(idx, own_i), f"{what}: argmin differs from argmin over reduce='none'"
    tv, ti = mahalanobis(x, plan, "min", precision=precision, backend="torch")
    rows = torch.arange(N, device=x.device)
    bt = rel_t * T
    _assert_within(vals, tv, torch.maximum(bt[rows, idx], bt[rows, ti]), f"{what} min vs torch")
    best, bi = d2_true.min(dim=1)
    chosen = d2_true[rows, idx]  # the chosen class is a minimiser within the error bounds
    slack = truth_bound[rows, idx] + truth_bound[rows, bi]
    assert bool((chosen - best <= slack).all()), f"{what}: argmin not minimal"

    # logsumexp
    lse = mahalanobis(x, plan, "logsumexp", bias=bias, precision=precision, backend=backend)
    assert lse.dtype == torch.float32 and lse.shape == (N,), what
    own = torch.logsumexp(bias.double() - 0.5 * d2.double(), dim=1)
    _assert_within(lse, own, 2e-6 * (own.abs() + 1), f"{what} logsumexp vs own d²")
    # |Δ lse| <= max_c |Δ d²_c| / 2: bound by the d² bounds
    lt = mahalanobis(x, plan, "logsumexp", bias=bias, precision=precision, backend="torch")
    lse_b = 0.5 * (rel_t * T).max(dim=1).values + 2e-6 * (own.abs() + 1)
    _assert_within(lse, lt, lse_b, f"{what} logsumexp vs torch")
    lse_true = torch.logsumexp(bias.double() - 0.5 * d2_true, dim=1)
    _assert_within(
        lse,
        lse_true,
        0.5 * truth_bound.max(dim=1).values + 2e-6 * (own.abs() + 1),
        f"{what} logsumexp vs float64",
    )


def _cases(Ds, Cs, Ns, kinds=KINDS):
    out = []
    for D in Ds:
        for C in Cs:
            for kind, tri in kinds:
                if kind == "per_class" and C * D * D > MAX_PER_CLASS_FLOATS:
                    continue  # [C, D, D] factors too large for a test
                for N in Ns:
                    out.append(
                        pytest.param(
                            D, C, kind, tri, N, id=f"D{D}-C{C}-{kind}{'-tri' if tri else ''}-N{N}"
                        )
                    )
    return out


# ---------------------------------------------------------------------------------------------
# GPU tests
# ---------------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize(
    "D,C,kind,tri,N", _cases([1, 3, 33, 127, 777, 2048], [1, 2, 37, 1000], [1, 5, 1000])
)
def test_fp32(D, C, kind, tri, N):
    P = _problem(D, C, kind, tri)
    _check(P, _features(P, N, torch.float32), "fp32", f"fp32 D={D} C={C} {kind} tri={tri} N={N}")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("D,C,kind,tri,N", _cases([3, 127, 2048], [2, 1000], [1000]))
def test_half_inputs(D, C, kind, tri, N, dtype):
    P = _problem(D, C, kind, tri)
    # the truth sees the same rounded features; for diagonal plans the op expands x into
    # u = [x̃², x̃] in float32 first, so only the dense kinds reach the kernel's f16/bf16 loads
    x = _features(P, N, dtype)
    _check(P, x, "fp32", f"x={dtype} D={D} C={C} {kind} tri={tri} N={N}")


def _bf16_cases():
    out = []
    for p in _cases([1, 33, 127, 777, 2048], [1, 37, 1000], [5, 1000]):
        D, C, kind, tri, N = p.values
        out.append(pytest.param(*p.values, torch.float32, id=p.id + "-f32"))
        if D in (33, 2048) and N == 1000:  # bf16 features: a subset of shapes is enough
            out.append(pytest.param(*p.values, torch.bfloat16, id=p.id + "-bf16"))
    return out


@needs_gpu
@pytest.mark.parametrize("D,C,kind,tri,N,dtype", _bf16_cases())
def test_bf16_precision(D, C, kind, tri, N, dtype):
    P = _problem(D, C, kind, tri)
    _check(P, _features(P, N, dtype), "bf16", f"bf16 x={dtype} D={D} C={C} {kind} tri={tri} N={N}")


def _tie_plan(kind, C, D=5):
    """Classes 0..C-1 drawn from 4 distinct Gaussians: duplicates give bit-identical d²."""
    g = torch.Generator(device="cuda").manual_seed(SEED)
    base = torch.randn(4, D, dtype=torch.float64, device="cuda", generator=g)
    assign = torch.arange(C, device="cuda") % 4
    means = base[assign]
    if kind == "diag":
        return (
            mahalanobis_plan(
                means, inv_var=torch.full((D,), 0.7, dtype=torch.float64, device="cuda")
            ),
            base,
            assign,
        )
    W = torch.eye(D, dtype=torch.float64, device="cuda") + 0.1 * torch.triu(
        torch.randn(D, D, dtype=torch.float64, device="cuda", generator=g)
    )
    if kind == "tied":
        return mahalanobis_plan(means, W, triangular=True), base, assign
    return mahalanobis_plan(means, W.expand(C, D, D).contiguous(), triangular=True), base, assign


@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("N", [5, 1000, 20000])
@pytest.mark.parametrize("kind", ["tied", "per_class", "diag"])
def test_min_ties_pick_first_index(kind, N, precision):
    """C = 150 spans 3 class tiles; N = 5 / 1000 split class tiles over CTAs (partials + combine),
    N = 20000 does not (one CTA per row tile writes the result)."""
    C = 150
    plan, base, assign = _tie_plan(kind, C)
    g = torch.Generator(device="cuda").manual_seed(SEED + 1)
    x = base[torch.randint(0, 4, (N,), device="cuda", generator=g)]
    x = (x + 0.3 * torch.randn(x.shape, dtype=torch.float64, device="cuda", generator=g)).float()
    vals, idx = mahalanobis(x, plan, "min", precision=precision, backend="cuda")
    d2 = mahalanobis(x, plan, "none", precision=precision, backend="cuda")
    own_v, own_i = d2.min(dim=1)
    assert torch.equal(vals, own_v) and torch.equal(idx, own_i)
    if precision == "fp32":  # SIMT: every column sums in the same order, duplicates tie exactly
        assert torch.equal(d2[:, 4:8], d2[:, 0:4]) and torch.equal(d2[:, 144:148], d2[:, 0:4])
        assert bool((idx < 4).all()), "a tie must resolve to the first class of its duplicates"
    lse = mahalanobis(x, plan, "logsumexp", precision=precision, backend="cuda")
    own = torch.logsumexp(-0.5 * d2.double(), dim=1)
    _assert_within(lse, own, 2e-6 * (own.abs() + 1), "logsumexp (no bias)")


@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kind,tri", [("tied", True), ("per_class", False), ("per_class", True)])
def test_row_chunks_and_side_stream(kind, tri, precision):
    """A tiny workspace budget forces 64-row chunks (last one partial); a side stream must be
    honoured (results identical to the default stream's)."""
    P = _problem(33, 37, kind, tri)
    x = _features(P, 1000, torch.float32)
    plan, bias = P["plan"], P["bias"]
    ref = {
        r: mahalanobis(
            x, plan, r, bias=bias if r == "logsumexp" else None, precision=precision, backend="cuda"
        )
        for r in REDUCES
    }
    G = plan.factors.shape[0]
    old = _MOD._set_workspace_budget(4 * 64 * G)  # q [64 rows, G] per chunk: 16 chunks
    try:
        chunked = {
            r: mahalanobis(
                x,
                plan,
                r,
                bias=bias if r == "logsumexp" else None,
                precision=precision,
                backend="cuda",
            )
            for r in REDUCES
        }
    finally:
        _MOD._set_workspace_budget(old)
    d2_true, T = _truth_and_scale(P, x)
    bound = (1e-6 if precision == "fp32" else 2e-6) * (math.sqrt(33) + 10) * T
    _assert_within(chunked["none"], ref["none"], bound, "chunked none")
    rows = torch.arange(1000, device="cuda")
    own_v, own_i = chunked["none"].min(dim=1)
    assert torch.equal(chunked["min"][0], own_v) and torch.equal(chunked["min"][1], own_i)
    _assert_within(
        chunked["min"][0],
        ref["min"][0],
        torch.maximum(bound[rows, own_i], bound[rows, ref["min"][1]]),
        "chunked min",
    )
    _assert_within(
        chunked["logsumexp"],
        ref["logsumexp"],
        0.5 * bound.max(dim=1).values + 2e-6 * (ref["logsumexp"].abs() + 1),
        "chunked logsumexp",
    )

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = {
            r: mahalanobis(
                x,
                plan,
                r,
                bias=bias if r == "logsumexp" else None,
                precision=precision,
                backend="cuda",
            )
            for r in REDUCES
        }
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(out["none"], ref["none"])
    assert torch.equal(out["min"][0], ref["min"][0]) and torch.equal(out["min"][1], ref["min"][1])
    assert torch.equal(out["logsumexp"], ref["logsumexp"])


@needs_gpu
def test_deterministic_and_gradient_path():
    """Two runs are bit-identical (no atomics); the analytic backward runs on the CUDA forward."""
    P = _problem(127, 37, "tied", True)
    x = _features(P, 1000, torch.float32)
    a = mahalanobis(x, P["plan"], "none", backend="cuda")
    b = mahalanobis(x, P["plan"], "none", backend="cuda")
    assert torch.equal(a, b)
    xg = x[:7].clone().requires_grad_(True)
    out = mahalanobis(xg, P["plan"], "logsumexp", bias=P["bias"], backend="cuda")
    (gx,) = torch.autograd.grad(out.sum(), xg)
    xr = x[:7].clone().requires_grad_(True)
    outr = mahalanobis(xr, P["plan"], "logsumexp", bias=P["bias"], backend="torch")
    (gr,) = torch.autograd.grad(outr.sum(), xr)
    torch.testing.assert_close(gx, gr, rtol=1e-3, atol=1e-3 * float(gr.abs().max()))


# ---------------------------------------------------------------------------------------------
# Tests of the module itself (no GPU needed)
# ---------------------------------------------------------------------------------------------

_ARGS = dict(  # plausible-looking fake device addresses: never dereferenced by these tests
    x_ptr=1 << 20,
    x_dtype="f32",
    N=10,
    E=3,
    center_ptr=2 << 20,
    factors_ptr=3 << 20,
    G=1,
    proj_ptr=4 << 20,
    const_ptr=5 << 20,
    group_ptr=6 << 20,
    C=4,
    reduce=1,
    bias_ptr=0,
    out_ptr=7 << 20,
    idx_ptr=8 << 20,
    triangular=False,
    bf16=False,
    stream=0,
)


@pytest.mark.skipif(_MOD is None, reason=f"ood_fast._cuda did not import ({_MOD_ERR})")
@pytest.mark.parametrize(
    "bad,msg",
    [
        (dict(x_dtype="f64"), "x_dtype"),
        (dict(reduce=3), "reduce"),
        (dict(x_ptr=0), "x_ptr"),
        (dict(idx_ptr=0), "idx_ptr"),
        (dict(E=0), "E"),
        (dict(C=0), "C"),
        (dict(G=0), "G"),
        (dict(N=-1), "N"),
    ],
)
def test_bad_arguments_raise_value_error(bad, msg):
    """Argument checks run before any CUDA call, so they behave the same with or without a GPU."""
    with pytest.raises(ValueError, match=msg):
        _MOD.mahalanobis_fused(**{**_ARGS, **bad})


@pytest.mark.skipif(_MOD is None, reason=f"ood_fast._cuda did not import ({_MOD_ERR})")
@pytest.mark.skipif(_CUDA, reason="checks the behaviour on a machine without a usable GPU")
def test_without_gpu_raises_runtime_error():
    """The module imports without a GPU/driver; a call fails with a RuntimeError, not a crash."""
    assert callable(_MOD.mahalanobis_fused)
    assert _MOD.runtime_version() > 0
    assert _MOD.device_count() == 0
    with pytest.raises(RuntimeError, match="CUDA|cuda"):
        _MOD.mahalanobis_fused(**_ARGS)
    _MOD.mahalanobis_fused(**{**_ARGS, "N": 0})  # nothing to do: returns without touching CUDA
