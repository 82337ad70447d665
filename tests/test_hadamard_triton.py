"""Triton ``hadamard`` kernel (``ood_fast.kernels.hadamard``) against a numpy float64 reference,
and ``ops.hadamard(backend="triton")`` against ``backend="torch"``.

On CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
before triton is first imported), so shapes are tiny: rows 1..5, n in
{1, 2, 8, 12, 24, 48, 64, 80, 112} (K = 1, 12, 20, 28). On a GPU machine it runs natively.

The kernel-level tests use a random ±1 H_K (not symmetric, not orthogonal): the kernel must
compute exactly ``x @ kron(H_K, S)`` for whatever factor it is given, so a wrong transpose or a
wrong sub-row order cannot hide behind a symmetric matrix. Small-integer inputs make the fp32
transform exact, so fp16/bf16 outputs must then equal the round-to-nearest-even cast of the
float64 result bit for bit.
"""

import importlib
import math

import numpy as np
import pytest
import torch
from _triton_helpers import (
    DEV,
    NS,
    dense_hadamard,
    hadamard_factors,
    need_triton_backend,  # noqa: F401  (autouse: skips without triton)
)

pytestmark = pytest.mark.triton  # tests/conftest.py skips these where triton cannot import

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture
def th():
    return importlib.import_module("ood_fast.kernels.hadamard")


# ---------------------------------------------------------------------------------------------
# numpy float64 reference (independent of ood_fast.reference)
# ---------------------------------------------------------------------------------------------


def _np_hadamard(x, hk, signs, scale):
    """scale · (x · signs) @ kron(hk, S_{2^p}) in float64."""
    H = dense_hadamard(x.shape[1], hk)
    xs = x * (signs if signs is not None else 1.0)
    return scale * (xs @ H)


def _random_hk(K, seed):
    rng = np.random.default_rng(seed)
    return rng.choice([-1.0, 1.0], size=(K, K))


def _data(R, n, seed, ints=False):
    rng = np.random.default_rng(seed)
    if ints:
        return rng.integers(-100, 101, size=(R, n)).astype(np.float64)
    return rng.standard_normal((R, n))


def _tol(x64, n, scale):
    """fp32 rounding of a summation tree of depth ~ p + K (each output is ±Σ of the inputs)."""
    K, p = hadamard_factors(n)
    l1 = np.abs(x64).sum(axis=1, keepdims=True)
    return 2.0 * (p + K + 2) * 2.0**-24 * abs(scale) * l1 + 1e-30


def _args(n, seed, with_signs):
    K, _ = hadamard_factors(n)
    hk = _random_hk(K, seed)
    signs = np.random.default_rng(seed + 1).choice([-1.0, 1.0], size=n) if with_signs else None
    t_hk = torch.tensor(hk, dtype=torch.float32, device=DEV)
    t_signs = None if signs is None else torch.tensor(signs, dtype=torch.float32, device=DEV)
    return K, hk, signs, t_hk, t_signs


# ---------------------------------------------------------------------------------------------
# the kernel
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("R", (1, 2, 3, 4, 5))
def test_fp32_matches_numpy(th, n, R):
    x = _data(R, n, seed=n * 10 + R)
    for with_signs in (False, True):
        K, hk, signs, t_hk, t_signs = _args(n, n + R, with_signs)
        scale = 1.0 / math.sqrt(n)
        xt = torch.tensor(x, dtype=torch.float32, device=DEV)
        out = th.hadamard(xt, K, t_hk, t_signs, scale)
        assert out.dtype == torch.float32 and out.shape == (R, n)
        x32 = xt.double().cpu().numpy()  # the fp32 input, exactly
        ref = _np_hadamard(x32, hk, signs, scale)
        err = np.abs(out.double().cpu().numpy() - ref)
        assert np.all(err <= _tol(x32, n, scale)), (n, R, with_signs, err.max())


@pytest.mark.parametrize("dtype", ("fp16", "bf16"))
@pytest.mark.parametrize("n", NS)
def test_lowp_exact_rounding(th, n, dtype):
    """Integer inputs, scale 0.5: the fp32 result is exact, the cast must round to nearest
    even exactly like torch's."""
    dt = DTYPES[dtype]
    R = 3
    x = _data(R, n, seed=n + 7, ints=True)
    K, hk, signs, t_hk, t_signs = _args(n, n, True)
    xt = torch.tensor(x, dtype=torch.float32, device=DEV).to(dt)
    x_in = xt.double().cpu().numpy()  # the values the kernel reads
    ref = torch.tensor(_np_hadamard(x_in, hk, signs, 0.5)).to(dt)
    out = th.hadamard(xt, K, t_hk, t_signs, 0.5)
    assert out.dtype == dt
    assert torch.equal(out.cpu(), ref), (out.cpu().double() - ref.double()).abs().max()


@pytest.mark.parametrize("dtype", ("fp16", "bf16"))
@pytest.mark.parametrize("n", (12, 64, 112))
def test_lowp_random_close(th, n, dtype):
    dt = DTYPES[dtype]
    x = _data(5, n, seed=n + 3)
    K, hk, signs, t_hk, t_signs = _args(n, n + 9, True)
    xt = torch.tensor(x, dtype=torch.float32, device=DEV).to(dt)
    x_in = xt.double().cpu().numpy()
    ref = _np_hadamard(x_in, hk, signs, 1.0 / math.sqrt(n))
    out = th.hadamard(xt, K, t_hk, t_signs, 1.0 / math.sqrt(n)).double().cpu().numpy()
    eps = 2.0**-8 if dtype == "bf16" else 2.0**-11  # half an ulp, relative
    assert np.all(np.abs(out - ref) <= eps * np.abs(ref) + _tol(x_in, n, 1.0) + 1e-6)


@pytest.mark.parametrize("n", (8, 48, 112))
def test_in_place_and_out(th, n):
    x = _data(4, n, seed=n)
    K, hk, signs, t_hk, t_signs = _args(n, n, True)
    xt = torch.tensor(x, dtype=torch.float32, device=DEV)
    ref = th.hadamard(xt, K, t_hk, t_signs, 0.25)
    buf = torch.empty_like(xt)
    res = th.hadamard(xt, K, t_hk, t_signs, 0.25, out=buf)
    assert res.data_ptr() == buf.data_ptr() and torch.equal(buf, ref)
    y = xt.clone()
    th.hadamard(y, K, t_hk, t_signs, 0.25, out=y)
    assert torch.equal(y, ref)


def test_zero_rows(th):
    x = torch.empty(0, 24, device=DEV)
    hk = torch.ones(12, 12, device=DEV)
    assert th.hadamard(x, 12, hk, None, 1.0).shape == (0, 24)


def test_involution(th):
    """S·S = 2^p I: applying the orthonormal K = 1 transform twice returns x."""
    x = torch.randn(3, 64, device=DEV)
    y = th.hadamard(th.hadamard(x, 1, None, None, 0.125), 1, None, None, 0.125)
    assert torch.allclose(y, x, atol=1e-5)


def test_bad_arguments(th):
    x = torch.randn(2, 24, device=DEV)
    hk = torch.ones(12, 12, device=DEV)
    with pytest.raises(ValueError, match="K must be one of"):
        th.hadamard(x, 3, hk, None, 1.0)
    with pytest.raises(ValueError, match="not K"):
        th.hadamard(torch.randn(2, 36, device=DEV), 12, hk, None, 1.0)
    with pytest.raises(ValueError, match="hk must be"):
        th.hadamard(x, 12, None, None, 1.0)
    with pytest.raises(ValueError, match="signs must be"):
        th.hadamard(x, 12, hk, torch.ones(5, device=DEV), 1.0)
    with pytest.raises(ValueError, match="dtype"):
        th.hadamard(x.double(), 12, hk, None, 1.0)
    with pytest.raises(ValueError, match=r"\[R, n\]"):
        th.hadamard(x[0], 12, hk, None, 1.0)
    with pytest.raises(ValueError, match="out must be"):
        th.hadamard(x, 12, hk, None, 1.0, out=torch.empty(2, 24, dtype=torch.float16))


# ---------------------------------------------------------------------------------------------
# through ops: backend="triton" vs backend="torch" (the reference H_K)
# ---------------------------------------------------------------------------------------------

ops_h = pytest.importorskip("ood_fast.ops.hadamard")


@pytest.mark.parametrize("dtype", tuple(DTYPES))
@pytest.mark.parametrize("n", NS + (40, 160))
def test_ops_triton_vs_torch(n, dtype):
    dt = DTYPES[dtype]
    x = torch.randn(2, 3, n, device=DEV).to(dt)  # a leading shape
    rot = ops_h.random_hadamard(n, seed=n)
    signs = rot.signs.to(DEV) if rot.signs is not None else None
    for scale, sg in ((None, None), (0.5, signs)):
        got = ops_h.hadamard(x, scale, signs=sg, backend="triton")
        ref = ops_h.hadamard(x, scale, signs=sg, backend="torch")
        assert got.dtype == dt and got.shape == x.shape
        s = 1.0 / math.sqrt(n) if scale is None else scale
        x64 = x.double().reshape(-1, n).cpu().numpy()
        tol = torch.as_tensor(_tol(x64, n, s).reshape(2, 3, 1))
        if dt != torch.float32:
            tol = tol + (2.0**-7 if dt == torch.bfloat16 else 2.0**-10) * ref.double().abs().cpu()
        diff = (got.double() - ref.double()).abs().cpu()
        assert torch.all(diff <= tol), diff.max()


# ---------------------------------------------------------------------------------------------
# "quick": a few larger rows (the selection gpu_check.sh runs natively on a lent GPU)
# ---------------------------------------------------------------------------------------------


def _np_hadamard_fast(x, hk, signs, scale):
    """The same float64 transform without building H: FWHT by reshapes, then the H_K mix."""
    R, n = x.shape
    K, p = hadamard_factors(n)
    y = (x * (signs if signs is not None else 1.0)).reshape(R, K, 1 << p)
    for j in range(p):
        h = y.reshape(R, K, -1, 2, 1 << j)
        a, b = h[:, :, :, 0, :], h[:, :, :, 1, :]
        y = np.stack([a + b, a - b], axis=3).reshape(R, K, 1 << p)
    if K > 1:
        y = np.einsum("ac,rab->rcb", hk, y)
    return scale * y.reshape(R, n)


@pytest.mark.parametrize("n", (112, 1024, 5120))
def test_quick_larger_rows(th, n):
    R = 3
    K, hk, signs, t_hk, t_signs = _args(n, n, True)
    assert np.allclose(_np_hadamard_fast(np.eye(n)[:4], hk, signs, 1.0),
                       _np_hadamard(np.eye(n)[:4], hk, signs, 1.0)) if n <= 1024 else True  # fmt: skip
    for dtype in ("fp32", "bf16"):
        xt = torch.tensor(_data(R, n, seed=n), dtype=torch.float32, device=DEV).to(DTYPES[dtype])
        x64 = xt.double().cpu().numpy()
        ref = _np_hadamard_fast(x64, hk, signs, 1.0 / math.sqrt(n))
        out = th.hadamard(xt, K, t_hk, t_signs, 1.0 / math.sqrt(n)).double().cpu().numpy()
        tol = _tol(x64, n, 1.0 / math.sqrt(n))
        if dtype == "bf16":
            tol = tol + 2.0**-8 * np.abs(ref)
        assert np.all(np.abs(out - ref) <= tol)
