"""Triton backend of ``mahalanobis_fused`` against the torch backend and the float64 definition.

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
before triton is first imported); on a GPU machine they run natively.
Shapes are tiny: the interpreter executes every tile op in numpy.
"""

import pytest
import torch

from ood_fast import _backend  # noqa: E402
from ood_fast import _extensions as _ext  # noqa: E402
from ood_fast.ops import mahalanobis, mahalanobis_plan  # noqa: E402
from ood_fast.reference.mahalanobis import squared_distances  # noqa: E402

pytestmark = pytest.mark.triton  # tests/conftest.py skips these where triton cannot import

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SEED = 42
REDUCES = ("none", "min", "logsumexp")

# (atol, rtol) for d², atol relative to the largest d² of the case
TOL_VS_TORCH = {"fp32": 2e-5, "bf16": 2e-4}
TOL_VS_TRUTH = {"fp32": 1e-4, "bf16": 3e-2}


@pytest.fixture(autouse=True)
def _need_triton_backend():
    why = _ext.triton_unavailable()
    if why:
        pytest.skip("triton backend unavailable: " + "; ".join(why))


# ---------------------------------------------------------------------------------------------
# problem builders (float64, seeded)
# ---------------------------------------------------------------------------------------------


def _gen(seed=SEED):
    return torch.Generator().manual_seed(seed)


def _factors(G, D, triangular, g):
    """Whitening factors W_g (precision W Wᵀ): L⁻ᵀ of a random SPD covariance (upper triangular),
    or a dense random matrix."""
    if triangular:
        A = torch.randn(G, D, D, generator=g, dtype=torch.float64) / D**0.5
        cov = A @ A.transpose(1, 2) + 0.5 * torch.eye(D, dtype=torch.float64)
        L = torch.linalg.cholesky(cov)
        return torch.linalg.inv(L).transpose(1, 2).contiguous()
    return torch.randn(G, D, D, generator=g, dtype=torch.float64) / D**0.5 + torch.eye(
        D, dtype=torch.float64
    )


def _problem(N, D, C, kind, triangular=False, seed=SEED):
    """x [N, D] f32, a float32 plan on DEV, and a float64 truth function of x."""
    g = _gen(seed)
    means = torch.randn(C, D, generator=g, dtype=torch.float64) * 1.5
    x = means[torch.randint(0, C, (N,), generator=g)] + torch.randn(
        N, D, generator=g, dtype=torch.float64
    )
    if kind == "diag":
        inv_var = torch.rand(C, D, generator=g, dtype=torch.float64) * 2 + 0.2
        plan = mahalanobis_plan(means.to(DEV), inv_var=inv_var.to(DEV))

        def truth(xx):
            return squared_distances(xx.double().cpu(), means, inv_var=inv_var)
    else:
        G = 1 if kind == "tied" else C
        W = _factors(G, D, triangular, g)
        plan = mahalanobis_plan(means.to(DEV), W.to(DEV), triangular=triangular)
        group = plan.group.cpu()

        def truth(xx):
            return squared_distances(xx.double().cpu(), means, W, group)

    bias = (torch.randn(C, generator=g) * 2).to(DEV)
    return x.float().to(DEV), plan, truth, bias


# ---------------------------------------------------------------------------------------------
# comparisons
# ---------------------------------------------------------------------------------------------


def _close(a, b, tol, scale, what):
    a, b = a.double().cpu(), b.double().cpu()
    torch.testing.assert_close(a, b, atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}")


def _check_min(res, d2_ref, tol, scale, what):
    vals, idx = res
    assert idx.dtype == torch.int64 and vals.dtype == torch.float32, what
    d2_ref = d2_ref.double().cpu()
    vals, idx = vals.double().cpu(), idx.cpu()
    ref_vals = d2_ref.min(dim=1).values
    _close(vals, ref_vals, tol, scale, what + " min values")
    # the chosen class must be a minimiser within rounding (exact ties: tested separately)
    chosen = d2_ref.gather(1, idx[:, None])[:, 0]
    assert bool(((chosen - ref_vals) <= tol * scale + tol * ref_vals.abs()).all()), what


def _check_all(x, plan, truth, bias, precision, what):
    """Triton vs torch backend (tight) and vs the float64 definition, for every reduction."""
    d2_true = truth(x)
    scale = float(d2_true.abs().max()) + 1.0
    t_tol, r_tol = TOL_VS_TORCH[precision], TOL_VS_TRUTH[precision]
    for reduce in REDUCES:
        kw = dict(precision=precision, bias=bias if reduce == "logsumexp" else None)
        got = mahalanobis(x, plan, reduce, backend="triton", **kw)
        ref = mahalanobis(x, plan, reduce, backend="torch", **kw)
        tag = f"{what} reduce={reduce}"
        if reduce == "none":
            assert got.shape == d2_true.shape and got.dtype == torch.float32
            assert bool((got >= 0).all()), tag + " (clamp)"
            _close(got, ref, t_tol, scale, tag + " vs torch")
            _close(got, d2_true, r_tol, scale, tag + " vs float64")
        elif reduce == "min":
            d2_torch = mahalanobis(x, plan, "none", backend="torch", precision=precision)
            _check_min(got, d2_torch, t_tol, scale, tag + " vs torch")
            _check_min(got, d2_true, r_tol, scale, tag + " vs float64")
        else:
            assert got.shape == (x.shape[0],) and got.dtype == torch.float32
            lse_true = torch.logsumexp(bias.double().cpu() - 0.5 * d2_true, dim=1)
            _close(got, ref, t_tol, scale, tag + " vs torch")
            _close(got, lse_true, r_tol, scale, tag + " vs float64")


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

SHAPES = [(1, 7), (3, 70), (33, 1), (33, 70), (127, 7)]  # (D, N)


@pytest.mark.parametrize("C", [1, 2, 37])
@pytest.mark.parametrize("D,N", SHAPES)
@pytest.mark.parametrize(
    "kind,triangular", [("tied", True), ("tied", False), ("per_class", True), ("per_class", False)]
)
def test_dense_fp32(kind, triangular, D, N, C):
    x, plan, truth, bias = _problem(N, D, C, kind, triangular)
    _check_all(x, plan, truth, bias, "fp32", f"{kind} tri={triangular} D={D} N={N} C={C}")


@pytest.mark.parametrize("C", [1, 2, 37])
@pytest.mark.parametrize("D,N", SHAPES)
def test_diagonal_fp32(D, N, C):
    x, plan, truth, bias = _problem(N, D, C, "diag")
    _check_all(x, plan, truth, bias, "fp32", f"diag D={D} N={N} C={C}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["tied", "per_class", "diag"])
def test_half_inputs(dtype, kind):
    x, plan, truth, bias = _problem(70, 33, 37, kind, triangular=True)
    x = x.to(dtype)  # the truth sees the same rounded features
    _check_all(x, plan, truth, bias, "fp32", f"{kind} x={dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,triangular", [("tied", True), ("per_class", False), ("diag", False)])
def test_bf16_precision(kind, triangular, dtype):
    x, plan, truth, bias = _problem(70, 33, 37, kind, triangular)
    _check_all(x.to(dtype), plan, truth, bias, "bf16", f"bf16 {kind} tri={triangular} x={dtype}")


@pytest.mark.parametrize("kind,triangular", [("tied", True), ("tied", False), ("diag", False)])
def test_large_dim(kind, triangular):
    x, plan, truth, bias = _problem(3, 777, 2, kind, triangular)
    _check_all(x, plan, truth, bias, "fp32", f"D=777 {kind} tri={triangular}")


@pytest.mark.parametrize("kind", ["tied", "per_class"])
def test_min_ties_pick_first_index(kind):
    """Duplicated classes give bit-identical d²: argmin must return the first, also across class
    blocks (C = 150 spans several blocks of every config)."""
    N, D, C = 9, 5, 150
    g = _gen()
    base = torch.randn(4, D, generator=g, dtype=torch.float64)
    assign = torch.randint(0, 4, (C,), generator=g)
    means = base[assign]
    G = 1 if kind == "tied" else C
    W0 = _factors(1, D, True, g)
    W = W0.expand(G, D, D).contiguous()
    plan = mahalanobis_plan(means.to(DEV), W.to(DEV), triangular=True)
    x = (
        base[torch.randint(0, 4, (N,), generator=g)] + 0.3 * torch.randn(N, D, generator=g)
    ).float()
    x = x.to(DEV)
    vals, idx = mahalanobis(x, plan, "min", backend="triton")
    d2 = mahalanobis(x, plan, "none", backend="triton").cpu()
    first = torch.tensor([int((row == row.min()).nonzero()[0, 0]) for row in d2])
    assert torch.equal(idx.cpu(), first)
    assert torch.equal(vals.cpu(), d2.min(dim=1).values)
    # and the first occurrence of the nearest base mean is what the float64 truth says
    truth = squared_distances(x.double().cpu(), means, W, plan.group.cpu())
    want_class = assign[truth.argmin(dim=1)]
    assert torch.equal(assign[idx.cpu()], want_class)
    assert torch.equal(
        idx.cpu(), torch.tensor([int((assign == a).nonzero()[0, 0]) for a in want_class])
    )


def test_logsumexp_without_bias_and_many_classes():
    """bias=None (zeros), and C = 150 > one class block: exercises the online rescaling."""
    x, plan, truth, _ = _problem(7, 3, 150, "per_class", triangular=True)
    got = mahalanobis(x, plan, "logsumexp", backend="triton")
    want = torch.logsumexp(-0.5 * truth(x), dim=1)
    scale = float(truth(x).max()) + 1.0
    _close(got, want, 1e-4, scale, "logsumexp bias=None C=150")
    d2 = mahalanobis(x, plan, "none", backend="triton")
    _close(d2, truth(x), 1e-4, scale, "none C=150")


def test_logsumexp_extreme_bias():
    """A −inf bias drops a class; huge distances do not underflow the sum to −inf."""
    x, plan, truth, bias = _problem(7, 3, 37, "tied", triangular=True)
    bias = bias.clone()
    bias[::2] = float("-inf")
    got = mahalanobis(x, plan, "logsumexp", bias=bias, backend="triton")
    want = torch.logsumexp(bias.double().cpu() - 0.5 * truth(x), dim=1)
    _close(got, want, 1e-4, float(truth(x).max()) + 1.0, "logsumexp -inf bias")
    far = x + 300.0  # d² ~ 1e5: exp(−d²/2) underflows without the running max
    got = mahalanobis(far, plan, "logsumexp", backend="triton")
    want = torch.logsumexp(-0.5 * truth(far), dim=1)
    assert bool(torch.isfinite(got).all())
    _close(got, want, 1e-4, float(truth(far).max()), "logsumexp far")


def test_gradient_matches_torch_backend():
    x, plan, _, bias = _problem(7, 33, 37, "tied", triangular=True)
    grads = {}
    for backend in ("triton", "torch"):
        xx = x.clone().requires_grad_(True)
        out = mahalanobis(xx, plan, "logsumexp", bias=bias, backend=backend)
        out.sum().backward()
        grads[backend] = xx.grad.cpu()
    scale = float(grads["torch"].abs().max()) + 1.0
    _close(grads["triton"], grads["torch"], 1e-4, scale, "grad")


def test_kernel_direct_empty_and_no_quadratic():
    """The kernel module on its own: N = 0, and factors=None (no quadratic term)."""
    from ood_fast.kernels import mahalanobis as tk

    from ood_fast.reference import mahalanobis as ref

    g = _gen()
    E, C = 17, 5
    center = torch.randn(E, generator=g).to(DEV)
    proj = torch.randn(E, C, generator=g).to(DEV)
    const = (torch.rand(C, generator=g) * 50).to(DEV)
    group = torch.zeros(C, dtype=torch.long, device=DEV)
    u = torch.randn(6, E, generator=g).to(DEV)
    for reduce in REDUCES:
        got = tk.mahalanobis_fused(u, center, None, proj, const, group, reduce, None, False, "fp32")
        want = ref.fused(u, center, None, proj, const, group, reduce, None, False, "fp32")
        if reduce == "min":
            _close(got[0], want[0], 1e-5, 100.0, "no-q min")
            assert torch.equal(got[1].cpu(), want[1].cpu())
        else:
            _close(got, want, 1e-5, 100.0, f"no-q {reduce}")
        empty = tk.mahalanobis_fused(
            u[:0], center, None, proj, const, group, reduce, None, False, "fp32"
        )
        if reduce == "min":
            assert (
                empty[0].shape == (0,) and empty[1].shape == (0,) and empty[1].dtype == torch.int64
            )
        else:
            assert empty.shape == ((0, C) if reduce == "none" else (0,))


def test_not_selected_automatically_for_cpu_tensors(monkeypatch):
    """The interpreter is a test tool: auto selection on CPU tensors never picks triton."""
    monkeypatch.delenv("OOD_FAST_BACKEND", raising=False)
    x, plan, _, _ = _problem(7, 3, 2, "tied", triangular=True)
    x = x.cpu()
    plan = plan.to("cpu")
    args = (x, plan.center, plan.kernel_factors, plan.proj, plan.const, plan.group)
    for reduce in REDUCES:
        name = _backend.select("mahalanobis_fused", *args, reduce, None, plan.triangular, "fp32")
        assert name in ("cpu", "torch"), name
    # even inside an explicit "automatic" context
    with _backend.use_backend(None):
        name = _backend.select("mahalanobis_fused", *args, "min", None, plan.triangular, "bf16")
        assert name in ("cpu", "torch"), name
