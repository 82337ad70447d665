"""The C++ CPU backend of ``mahalanobis_fused`` (csrc/cpu/mahalanobis.cpp, csrc/cpu/gemm.h).

Checked against the torch backend (same expanded-form math, same rounding of bf16 operands) and
against the float64 literal ``reference.squared_distances``; over odd shapes, tied / per-class /
diagonal covariances, triangular and dense factors, fp32/fp16/bf16 inputs, every reduction,
thread counts, and every micro-kernel this processor can run (the portable fallback included).
"""

from __future__ import annotations

import pytest
import torch

from ood_fast import _extensions as ext
from ood_fast import ops
from ood_fast.reference import mahalanobis as ref

_C = ext.cpu_module()
pytestmark = pytest.mark.skipif(
    _C is None or not hasattr(_C, "FusedDistance"), reason="C++ extension ood_fast._C not built"
)

SEED = 42
KINDS = ("tied-tri", "tied-dense", "class-tri", "class-dense", "diag")


# ---------------------------------------------------------------------------------------------
# Problems (cached: plans with large D are not free to build)
# ---------------------------------------------------------------------------------------------


def _factors(G: int, D: int, triangular: bool, g: torch.Generator) -> torch.Tensor:
    """Whitening factors W_g with W Wᵀ = Σ⁻¹ (float64), for random well-conditioned covariances.

    Triangular: Σ = A Aᵀ + ½ I = L Lᵀ (Cholesky), W = L⁻ᵀ (upper triangular). Dense: from the
    eigendecomposition Σ = V Λ Vᵀ, W = V Λ^-½ (V the Q of a QR, Λ uniform in [0.5, 3]). One
    factorization serves all G groups, each made distinct by a diagonal rescaling (triangular:
    S₁ L⁻ᵀ S₂ stays upper triangular) or a column permutation and new spectrum (dense): batched
    factorizations of large matrices would dominate the test time.
    """
    if triangular:
        A = torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5
        L = torch.linalg.cholesky(A @ A.T + 0.5 * torch.eye(D, dtype=torch.float64))
        W = torch.linalg.solve_triangular(L, torch.eye(D, dtype=torch.float64), upper=False).T
        s1 = 0.7 + 0.6 * torch.rand(G, D, 1, generator=g, dtype=torch.float64)
        s2 = 0.7 + 0.6 * torch.rand(G, 1, D, generator=g, dtype=torch.float64)
        s1[0], s2[0] = 1.0, 1.0
        return (s1 * W * s2).contiguous()
    V, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    perm = torch.stack([torch.randperm(D, generator=g) for _ in range(G)])
    lam = 0.5 + 2.5 * torch.rand(G, D, generator=g, dtype=torch.float64)
    return (V.T[perm].transpose(1, 2) * lam.rsqrt()[:, None, :]).contiguous()


_PROBLEMS: dict = {}


def problem(D: int, C: int, kind: str, group: str = "default"):
    """(means64, factors64 | None, inv_var64 | None, group | None, plan) for one configuration."""
    key = (D, C, kind, group)
    if key in _PROBLEMS:
        return _PROBLEMS[key]
    g = torch.Generator().manual_seed(SEED + 1000 * D + C + 7 * KINDS.index(kind))
    means = 2.0 * torch.randn(C, D, generator=g, dtype=torch.float64)
    factors = inv_var = grp = None
    if kind == "diag":
        inv_var = 0.5 + 1.5 * torch.rand(C, D, generator=g, dtype=torch.float64)
        plan = ops.mahalanobis_plan(means.float(), inv_var=inv_var.float())
    else:
        G = 1 if kind.startswith("tied") else (3 if group == "mod3" else C)
        tri = kind.endswith("tri")
        factors = _factors(G, D, tri, g)
        if group == "mod3":
            grp = torch.arange(C) % 3
        plan = ops.mahalanobis_plan(means.float(), factors.float(), group=grp, triangular=tri)
        grp = plan.group
    out = (means, factors, inv_var, grp, plan)
    _PROBLEMS[key] = out
    return out


def features(N: int, means: torch.Tensor, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Points scattered around random class means (so distances have a realistic spread)."""
    g = torch.Generator().manual_seed(SEED + seed)
    C, D = means.shape
    c = torch.randint(0, C, (N,), generator=g)
    x = means[c] + torch.randn(N, D, generator=g, dtype=torch.float64)
    return x.to(dtype)


def literal(x, means, factors, inv_var, group) -> torch.Tensor:
    """float64 d² by the definition (the independent truth)."""
    return ref.squared_distances(x.double(), means, factors=factors, group=group, inv_var=inv_var)


def run_all(x, plan, bias, precision, backend):
    return {
        "none": ops.mahalanobis(x, plan, "none", precision=precision, backend=backend),
        "min": ops.mahalanobis(x, plan, "min", precision=precision, backend=backend),
        "logsumexp": ops.mahalanobis(
            x, plan, "logsumexp", bias=bias, precision=precision, backend=backend
        ),
    }


def check_against(got: dict, d2_ref: torch.Tensor, bias: torch.Tensor, atol: float):
    """none / min / logsumexp of ``got`` against float64 d² within ``atol`` (in d² units)."""
    d2_ref = d2_ref.double()
    torch.testing.assert_close(got["none"].double(), d2_ref, atol=atol, rtol=0)
    v, i = got["min"]
    ref_v, ref_i = d2_ref.min(dim=1)
    torch.testing.assert_close(v.double(), ref_v, atol=atol, rtol=0)
    assert i.dtype == torch.int64
    # The index must be the true argmin wherever the runner-up is clearly worse.
    if d2_ref.shape[1] > 1:
        two = d2_ref.topk(2, dim=1, largest=False).values
        clear = (two[:, 1] - two[:, 0]) > 4 * atol
        assert torch.equal(i[clear], ref_i[clear])
    # Whatever index is returned must hold the minimum value.
    torch.testing.assert_close(d2_ref.gather(1, i[:, None])[:, 0], ref_v, atol=2 * atol, rtol=0)
    lse_ref = torch.logsumexp(bias.double() - 0.5 * d2_ref, dim=1)
    torch.testing.assert_close(
        got["logsumexp"].double(), lse_ref, atol=0.5 * atol + 1e-5, rtol=1e-6
    )


def fp32_atol(d2_ref: torch.Tensor) -> float:
    return 1e-4 * max(float(d2_ref.abs().max()), 1.0)


# ---------------------------------------------------------------------------------------------
# Shapes x covariance kinds (fp32 features, fp32 precision)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("C", [1, 2, 37])
@pytest.mark.parametrize("D", [1, 3, 33, 127, 777])
def test_shapes_fp32(D, C, kind):
    means, factors, inv_var, grp, plan = problem(D, C, kind)
    for N in (1, 5, 300):
        x = features(N, means, seed=N)
        bias = torch.randn(C, generator=torch.Generator().manual_seed(SEED + N))
        d2_ref = literal(x, means, factors, inv_var, grp)
        atol = fp32_atol(d2_ref)
        got = run_all(x, plan, bias, "fp32", "cpu")
        check_against(got, d2_ref, bias, atol)
        # and against the torch backend (same expanded form, fp32)
        want = ops.mahalanobis(x, plan, "none", backend="torch")
        torch.testing.assert_close(got["none"], want, atol=atol, rtol=0)


def test_custom_groups():
    """G = 3 factors shared by 37 classes (group = c mod 3): column panels mix groups."""
    for kind in ("class-tri", "class-dense"):
        means, factors, inv_var, grp, plan = problem(127, 37, kind, group="mod3")
        assert plan.factors.shape[0] == 3
        x = features(300, means, seed=3)
        bias = torch.randn(37)
        d2_ref = literal(x, means, factors, inv_var, grp)
        check_against(run_all(x, plan, bias, "fp32", "cpu"), d2_ref, bias, fp32_atol(d2_ref))


# ---------------------------------------------------------------------------------------------
# Input dtypes x precision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["tied-tri", "class-dense", "diag"])
@pytest.mark.parametrize("D", [33, 777])
def test_dtypes_and_precision(D, kind, dtype, precision):
    C = 37 if D < 500 else 10
    means, factors, inv_var, grp, plan = problem(D, C, kind)
    x = features(300, means, dtype=dtype, seed=11)
    bias = torch.randn(C)
    # the truth for the features as given (rounded to their dtype)
    d2_ref = literal(x, means, factors, inv_var, grp)
    got = run_all(x, plan, bias, precision, "cpu")
    want = run_all(x, plan, bias, precision, "torch")  # rounds the same GEMM operands
    atol = fp32_atol(d2_ref)
    # Same operands, fp32 sums in another order: as close as fp32 is to itself.
    torch.testing.assert_close(got["none"], want["none"], atol=atol, rtol=0)
    torch.testing.assert_close(got["min"].values, want["min"].values, atol=atol, rtol=0)
    torch.testing.assert_close(got["logsumexp"], want["logsumexp"], atol=atol, rtol=1e-6)
    if precision == "fp32":
        check_against(got, d2_ref, bias, atol)
    else:
        rel = (got["none"].double() - d2_ref).abs() / d2_ref.abs().clamp_min(
            1e-6 * float(d2_ref.max())
        )
        assert float(rel.median()) <= 1e-2
        assert float(rel.quantile(0.9)) <= 5e-2


def test_bf16_rounds_the_operands():
    """precision=bf16 must differ from fp32 (the operands really are rounded), close to torch's."""
    means, factors, inv_var, grp, plan = problem(127, 37, "tied-tri")
    x = features(300, means, seed=5)
    a = ops.mahalanobis(x, plan, "none", precision="bf16", backend="cpu")
    b = ops.mahalanobis(x, plan, "none", precision="fp32", backend="cpu")
    t = ops.mahalanobis(x, plan, "none", precision="bf16", backend="torch")
    assert not torch.equal(a, b)
    assert float((a - t).abs().max()) < float((a - b).abs().max())


# ---------------------------------------------------------------------------------------------
# Threads, empty input, tiles, kernels
# ---------------------------------------------------------------------------------------------


def test_threads_identical():
    means, factors, inv_var, grp, plan = problem(127, 37, "class-tri")
    x = features(1000, means, seed=7)  # several tiles
    bias = torch.randn(37)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_all(x, plan, bias, "fp32", "cpu")
        torch.set_num_threads(2)
        two = run_all(x, plan, bias, "fp32", "cpu")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one["none"], two["none"])
    assert torch.equal(one["min"].values, two["min"].values)
    assert torch.equal(one["min"].indices, two["min"].indices)
    assert torch.equal(one["logsumexp"], two["logsumexp"])


def test_rows_independent_of_batch():
    """A row's result does not depend on where it falls in the tiles (N not a tile multiple)."""
    means, factors, inv_var, grp, plan = problem(33, 37, "tied-dense")
    x = features(777, means, seed=8)
    full = ops.mahalanobis(x, plan, "none", backend="cpu")
    part = ops.mahalanobis(x[261:700], plan, "none", backend="cpu")
    assert torch.equal(full[261:700], part)


def test_empty():
    means, factors, inv_var, grp, plan = problem(33, 37, "tied-tri")
    x = torch.empty(0, 33)
    assert ops.mahalanobis(x, plan, "none", backend="cpu").shape == (0, 37)
    v, i = ops.mahalanobis(x, plan, "min", backend="cpu")
    assert v.shape == (0,) and i.shape == (0,) and i.dtype == torch.int64
    assert ops.mahalanobis(x, plan, "logsumexp", backend="cpu").shape == (0,)


def test_ties_first_index():
    """Duplicate classes: min returns the first of the tied indices, like torch."""
    g = torch.Generator().manual_seed(SEED)
    D = 33
    base = torch.randn(5, D, generator=g)
    means = torch.cat([base, base, base])  # class c ties with c + 5 and c + 10
    plan = ops.mahalanobis_plan(means, torch.eye(D), triangular=True)
    x = base[torch.randint(0, 5, (200,), generator=g)] + 0.1 * torch.randn(200, D, generator=g)
    v, i = ops.mahalanobis(x, plan, "min", backend="cpu")
    assert bool((i < 5).all())
    want = ops.mahalanobis(x, plan, "min", backend="torch")
    assert torch.equal(i, want.indices)


def _raw(obj, x, C, reduce, bias=None, threads=2):
    """Call a FusedDistance object directly, as the ops adapter does."""
    N = x.shape[0]
    code = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[x.dtype]
    out = torch.empty((N, C) if reduce == 0 else (N,), dtype=torch.float32)
    idx = torch.empty(N, dtype=torch.long) if reduce == 1 else None
    obj.run(
        x.data_ptr(),
        code,
        N,
        reduce,
        0 if bias is None else bias.data_ptr(),
        out.data_ptr(),
        0 if idx is None else idx.data_ptr(),
        threads,
    )
    return out, idx


def _make(plan, precision, isa):
    f = plan.kernel_factors
    return _C.FusedDistance(
        plan.center.data_ptr(),
        0 if f is None else f.data_ptr(),
        0 if f is None else f.shape[0],
        plan.proj.data_ptr(),
        plan.const.data_ptr(),
        plan.group.data_ptr(),
        plan.proj.shape[0],
        plan.proj.shape[1],
        plan.triangular,
        precision == "bf16",
        isa,
    )


def _isas(precision):
    feats = _C.cpu_features()
    isas = ["generic"]
    if feats["avx512f"]:
        isas.append("avx512f")
    if precision == "bf16" and feats["avx512bf16"]:
        isas.append("avx512bf16")
    if precision == "bf16" and _amx_available():
        isas.append("amx")
    return isas


def _amx_available() -> bool:
    """Whether FusedDistance accepts isa="amx" here (AMX-BF16 CPU and OS permission)."""
    plan = problem(3, 2, "tied-tri")[-1]
    try:
        _make(plan, "bf16", "amx")
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["tied-tri", "class-dense", "diag"])
@pytest.mark.parametrize("D", [1, 3, 33, 127])
def test_every_kernel(D, kind, precision):
    """Each micro-kernel this CPU can run (portable fallback, AVX-512 fp32, AVX512-BF16, AMX) agrees."""
    C = 37
    means, factors, inv_var, grp, plan = problem(D, C, kind)
    x = features(300, means, seed=13)
    bias = torch.randn(C)
    u = x
    if plan.diagonal:  # the op feeds diagonal plans the expanded features [x̃², x̃]
        xt = x - plan.shift
        u = torch.cat([xt.square(), xt], dim=1).contiguous()
    want = ops.mahalanobis(x, plan, "none", precision=precision, backend="torch")
    atol = fp32_atol(want)
    for isa in _isas(precision):
        obj = _make(plan, precision, isa)
        assert obj.isa == isa
        d2, _ = _raw(obj, u, C, 0)
        torch.testing.assert_close(
            d2, want, atol=atol, rtol=0, msg=lambda m, isa=isa: f"{isa}: {m}"
        )
        v, i = _raw(obj, u, C, 1)
        torch.testing.assert_close(v, d2.min(dim=1).values, atol=0, rtol=0)
        lse, _ = _raw(obj, u, C, 2, bias=bias)
        torch.testing.assert_close(
            lse, torch.logsumexp(bias - 0.5 * d2, dim=1), atol=1e-5, rtol=1e-6
        )


def test_half_input_conversion():
    """fp16 / bf16 features (normals, subnormals, signs, extremes) convert exactly, every kernel.

    With center 0, no factors, proj = ∓½·I and const 0, d²[n, c] = max(0, ±x[n, c]): the run
    returns the converted features themselves."""
    K = 37  # one full 16-lane block, and a tail
    vals = torch.tensor(
        [0.0, -0.0, 1.0, -2.5, 6e-8, -3e-5, 65504.0, -1e-3, 0.333, 7.0, 1e-7, -5e-8]
    )
    x32 = (
        vals[torch.arange(3 * K) % len(vals)].reshape(3, K)
        * torch.tensor([1.0, -1.0, 0.5])[:, None]
    )
    center = torch.zeros(K)
    const = torch.zeros(K)
    group = torch.zeros(K, dtype=torch.long)
    for dtype in (torch.float16, torch.bfloat16):
        x = x32.to(dtype)
        want = x.float()
        for isa in _isas("fp32"):
            parts = []
            for sign in (-0.5, 0.5):
                proj = sign * torch.eye(K)
                obj = _C.FusedDistance(
                    center.data_ptr(),
                    0,
                    0,
                    proj.data_ptr(),
                    const.data_ptr(),
                    group.data_ptr(),
                    K,
                    K,
                    False,
                    False,
                    isa,
                )
                parts.append(_raw(obj, x, K, 0)[0])
            got = parts[0] - parts[1]
            assert torch.equal(got, want), (dtype, isa)


def test_errors():
    means, factors, inv_var, grp, plan = problem(3, 2, "tied-tri")
    with pytest.raises(ValueError):
        _make(plan, "fp32", "no-such-isa")
    obj = _make(plan, "fp32", "generic")
    x = torch.zeros(2, 3)
    out = torch.empty(2, 2)
    with pytest.raises(ValueError):
        obj.run(x.data_ptr(), "f64", 2, 0, 0, out.data_ptr(), 0, 1)
    with pytest.raises(ValueError):
        obj.run(x.data_ptr(), "f32", 2, 1, 0, out.data_ptr(), 0, 1)  # min without idx
