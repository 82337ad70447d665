"""The Mahalanobis op: references against scipy/sklearn, the op's contract, dispatch, errors."""

import numpy as np
import pytest
import torch

import ood_fast
from ood_fast import _backend, ops
from ood_fast.reference import mahalanobis as ref


def _problem(C, D, G, seed=0, dense=False):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(C, D, generator=g, dtype=torch.float64) * 2
    factors = []
    for _ in range(G):
        a = torch.randn(D, D, generator=g, dtype=torch.float64)
        cov = a @ a.T / D + 0.5 * torch.eye(D, dtype=torch.float64)
        if dense:  # eigendecomposition factor: W = V diag(λ^-1/2), not triangular
            lam, v = torch.linalg.eigh(cov)
            factors.append(v * lam.rsqrt())
        else:  # Cholesky factor: W = L^-T, upper triangular
            factors.append(torch.linalg.inv(torch.linalg.cholesky(cov)).T)
    return means, torch.stack(factors), [torch.linalg.inv(w @ w.T) for w in factors]


def test_reference_matches_scipy_and_sklearn():
    from scipy.spatial.distance import mahalanobis as scipy_md
    from sklearn.covariance import EmpiricalCovariance

    rng = np.random.default_rng(0)
    C, D = 3, 6
    x_train = rng.standard_normal((400, D)) @ rng.standard_normal((D, D))
    y = rng.integers(0, C, 400)
    means = np.stack([x_train[y == c].mean(0) for c in range(C)])
    centred = x_train - means[y]
    emp = EmpiricalCovariance(assume_centered=True).fit(centred)
    w = np.linalg.inv(np.linalg.cholesky(emp.covariance_)).T
    x = rng.standard_normal((9, D))
    got = ref.squared_distances(
        torch.from_numpy(x), torch.from_numpy(means), torch.from_numpy(w)[None]
    ).numpy()
    for c in range(C):
        np.testing.assert_allclose(got[:, c], emp.mahalanobis(x - means[c]), rtol=1e-10)
        for n in range(3):
            d = scipy_md(x[n], means[c], emp.precision_)
            np.testing.assert_allclose(got[n, c], d * d, rtol=1e-10)


def test_reference_diagonal_matches_numpy():
    rng = np.random.default_rng(1)
    means, var, x = (
        rng.standard_normal((4, 5)),
        rng.uniform(0.5, 2, (4, 5)),
        rng.standard_normal((7, 5)),
    )
    want = (((x[:, None, :] - means[None]) ** 2) / var[None]).sum(-1)
    got = ref.squared_distances(
        torch.from_numpy(x), torch.from_numpy(means), inv_var=torch.from_numpy(1 / var)
    )
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


@pytest.mark.parametrize("D", [1, 3, 33, 127])
@pytest.mark.parametrize("C", [1, 2, 37])
@pytest.mark.parametrize("mode", ["tied", "per_class", "dense", "diagonal"])
def test_torch_backend_matches_literal(D, C, mode):
    G = C if mode == "per_class" else 1
    means, factors, _ = _problem(C, D, G, dense=(mode == "dense"))
    x = torch.randn(23, D, dtype=torch.float64) * 2
    if mode == "diagonal":
        inv_var = torch.rand(C, D, dtype=torch.float64) + 0.3
        plan = ops.mahalanobis_plan(means, inv_var=inv_var, dtype=torch.float64)
        want = ref.squared_distances(x, means, inv_var=inv_var)
    else:
        plan = ops.mahalanobis_plan(
            means, factors, triangular=(mode != "dense"), dtype=torch.float64
        )
        want = ref.squared_distances(x, means, factors, plan.group)
    got = ops.mahalanobis(x, plan, "none", backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    res = ops.mahalanobis(x, plan, "min", backend="torch")
    torch.testing.assert_close(res.values, want.min(1).values, rtol=1e-9, atol=1e-9)
    assert torch.equal(res.indices, want.argmin(1))
    bias = torch.randn(C, dtype=torch.float64)
    lse = ops.mahalanobis(x, plan, "logsumexp", bias=bias, backend="torch")
    torch.testing.assert_close(lse, torch.logsumexp(bias - 0.5 * want, 1), rtol=1e-9, atol=1e-9)


def test_float32_plan_and_half_inputs_close_to_float64():
    means, factors, _ = _problem(5, 33, 1)
    plan = ops.mahalanobis_plan(means, factors, triangular=True)
    x = torch.randn(50, 33, dtype=torch.float64)
    want = ref.squared_distances(x, means, factors)
    for dtype, tol in [(torch.float32, 1e-4), (torch.float16, 3e-2), (torch.bfloat16, 1e-1)]:
        got = ops.mahalanobis(x.to(dtype), plan, "none", backend="torch").double()
        xr = x.to(dtype).double()  # the rounding of the input is the input's, not the op's
        want = ref.squared_distances(xr, means, factors)
        assert ((got - want).abs() / want.abs().clamp(min=1)).max() < tol, dtype


def test_bf16_precision_error_is_small():
    means, factors, _ = _problem(10, 64, 1)
    plan = ops.mahalanobis_plan(means, factors, triangular=True)
    x = torch.randn(200, 64) * 2
    fp32 = ops.mahalanobis(x, plan, "none", backend="torch")
    bf16 = ops.mahalanobis(x, plan, "none", precision="bf16", backend="torch")
    rel = ((bf16 - fp32).abs() / fp32.abs()).median()
    assert 0 < rel < 1e-2


@pytest.mark.parametrize("reduce", ["none", "min", "logsumexp"])
@pytest.mark.parametrize("mode", ["tied", "per_class", "diagonal"])
def test_gradient_matches_float64_autograd(reduce, mode):
    C, D = 4, 6
    means, factors, _ = _problem(C, D, C if mode == "per_class" else 1)
    inv_var = torch.rand(C, D, dtype=torch.float64) + 0.3
    if mode == "diagonal":
        plan = ops.mahalanobis_plan(means, inv_var=inv_var, dtype=torch.float64)
    else:
        plan = ops.mahalanobis_plan(means, factors, dtype=torch.float64)
    x = torch.randn(8, D, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(C, dtype=torch.float64)
    out = ops.mahalanobis(x, plan, reduce, bias=bias, backend="torch")
    out = out.values if reduce == "min" else out
    weight = torch.randn_like(out)
    (gx,) = torch.autograd.grad((out * weight).sum(), x)

    xr = x.detach().clone().requires_grad_(True)
    kw = {"inv_var": inv_var} if mode == "diagonal" else {"factors": factors, "group": plan.group}
    d2 = ref.squared_distances(xr, means, **kw)
    want = {"none": d2, "min": d2.min(1).values, "logsumexp": torch.logsumexp(bias - 0.5 * d2, 1)}[
        reduce
    ]
    (gr,) = torch.autograd.grad((want * weight).sum(), xr)
    torch.testing.assert_close(gx, gr, rtol=1e-8, atol=1e-8)


def test_empty_input_gives_empty_output():
    means, factors, _ = _problem(3, 4, 1)
    plan = ops.mahalanobis_plan(means, factors)
    x = torch.empty(0, 4)
    assert ops.mahalanobis(x, plan, "none").shape == (0, 3)
    res = ops.mahalanobis(x, plan, "min")
    assert res.values.shape == (0,) and res.indices.dtype == torch.int64


def test_bad_inputs_raise_clear_errors():
    means, factors, _ = _problem(3, 4, 1)
    plan = ops.mahalanobis_plan(means, factors)
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="expected D=4, got D=5"):
        ops.mahalanobis(torch.randn(5, 5), plan)
    bad = x.clone()
    bad[2, 1] = float("nan")
    bad[4, 0] = float("inf")
    with pytest.raises(ValueError, match="2 non-finite values .* first at row 2"):
        ops.mahalanobis(bad, plan)
    with pytest.raises(ValueError, match="2-D"):
        ops.mahalanobis(x[0], plan)
    with pytest.raises(TypeError, match="floating"):
        ops.mahalanobis(x.long(), plan)
    with pytest.raises(ValueError, match="reduce"):
        ops.mahalanobis(x, plan, "max")
    with pytest.raises(ValueError, match="precision"):
        ops.mahalanobis(x, plan, precision="fp8")
    with pytest.raises(ValueError, match="bias"):
        ops.mahalanobis(x, plan, "logsumexp", bias=torch.zeros(2))
    with pytest.raises(TypeError, match="MahalanobisPlan"):
        ops.mahalanobis(x, means)
    with pytest.raises(ValueError, match="exactly one"):
        ops.mahalanobis_plan(means)
    with pytest.raises(ValueError, match="factors"):
        ops.mahalanobis_plan(means, torch.eye(5))
    with pytest.raises(ValueError, match="group"):
        ops.mahalanobis_plan(means, torch.stack([torch.eye(4)] * 2))


def test_explicit_backend_that_cannot_run_lists_reasons():
    means, factors, _ = _problem(3, 4, 1)
    plan = ops.mahalanobis_plan(means, factors, dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(ood_fast.BackendUnavailable, match="float64"):
        ops.mahalanobis(x, plan, backend="cpu")
    with pytest.raises(ood_fast.BackendUnavailable, match="cuda"):
        ops.mahalanobis(x.float(), ops.mahalanobis_plan(means, factors), backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.mahalanobis(x, plan, backend="tpu")


def test_backend_precedence(monkeypatch):
    means, factors, _ = _problem(3, 4, 1)
    plan = ops.mahalanobis_plan(means, factors)
    args = (
        torch.randn(5, 4),
        plan.center,
        plan.factors,
        plan.proj,
        plan.const,
        plan.group,
        "min",
        None,
        False,
        "fp32",
    )
    auto = _backend.select("mahalanobis_fused", *args)
    assert auto in ("cpu", "torch")  # triton's interpreter is never picked automatically
    monkeypatch.setenv("OOD_FAST_BACKEND", "torch")
    assert _backend.select("mahalanobis_fused", *args) == "torch"
    with ood_fast.use_backend("cpu"):
        if not _backend.reasons("mahalanobis_fused", "cpu", *args):
            assert _backend.select("mahalanobis_fused", *args) == "cpu"
        assert _backend.select("mahalanobis_fused", *args, backend="torch") == "torch"
