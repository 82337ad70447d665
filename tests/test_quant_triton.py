"""Triton ``rotate_quantize`` and ``int8_linear`` (``ood_fast.kernels.quant``) against numpy
references written here, and the ops with ``backend="triton"`` against ``backend="torch"``.

Interpreter on CPU (tiny shapes), native on a GPU.

rotate_quantize. Without a rotation (K = 0) the kernel's y is x / smooth in fp32, exactly what
numpy computes, so codes, scales and zero points must be EQUAL to the numpy float32 reference
(IEEE division, np.rint = round half to even), exact ties included. With a rotation the fp32
transform's summation order differs from the float64 reference, so: the scale agrees to a
relative 1e-5, the zero point is equal unless −lo/scale is within 1e-3 of a tie, and the codes
equal the float64 y quantized with the kernel's own scale / zero except within 1e-3 of a tie,
where they may differ by one.

int8_linear: the int32 accumulation must be exact (checked at the extremes of the code ranges,
where the float32 result is an exact integer), the fp32 epilogue close to numpy's float32
(acc · sx) · sw + bias (a GPU may fuse the last multiply-add).
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

F32 = np.float32
TIE = 1e-3  # code units: closer than this to a .5 tie may round either way after a rotation


@pytest.fixture
def tq():
    return importlib.import_module("ood_fast.kernels.quant")


# ---------------------------------------------------------------------------------------------
# numpy references
# ---------------------------------------------------------------------------------------------


def _np_quant(y, per_token, sym, static, bits):
    """float32 numpy quantization of y [R, n] (float32): (codes int64, scale, zero | None)."""
    y = y.astype(F32)
    axis = 1 if per_token else None
    kd = dict(axis=axis, keepdims=True)
    if sym:
        qmax = F32(2 ** (bits - 1) - 1)
        if static is not None:
            s = np.full((y.shape[0], 1) if per_token else (1, 1), F32(static), dtype=F32)
        else:
            s = (np.abs(y).max(**kd) / qmax).astype(F32)
        safe = np.where(s == 0, F32(1), s)
        c = np.clip(np.rint(y / safe), -qmax, qmax)
        c = np.where(s == 0, 0, c)
        return c.astype(np.int64), s, None
    L = F32(2**bits - 1)
    lo = np.minimum(y.min(**kd), F32(0))
    hi = np.maximum(y.max(**kd), F32(0))
    s = ((hi - lo) / L).astype(F32)
    safe = np.where(s == 0, F32(1), s)
    z = np.where(s == 0, F32(0), np.clip(np.rint(-lo / safe), 0, L)).astype(F32)
    c = np.clip(np.rint(y / safe) + z, 0, L)
    c = np.where(s == 0, 0, c)
    return c.astype(np.int64), s, z


def _near_tie(v):
    return np.abs(np.abs(v - np.floor(v)) - 0.5) < TIE


def _np_transform(x32, K, hk, signs, smooth):
    """float64 y of the fp32 x' = x / smooth (exactly what the kernel divides)."""
    n = x32.shape[1]
    xs = x32 if smooth is None else (x32 / smooth).astype(F32)
    xs = xs.astype(np.float64)
    if K == 0:
        return xs
    H = dense_hadamard(n, hk)
    if signs is not None:
        xs = xs * signs
    return (xs @ H) / math.sqrt(n)


def _run(tq, x, K, hk, signs, smooth, per_token, sym, static, bits):
    t = lambda a: None if a is None else torch.tensor(a, dtype=torch.float32, device=DEV)  # noqa: E731
    codes, scales, zeros = tq.rotate_quantize(
        x, K, t(hk), t(signs), t(smooth), per_token, sym, static, bits
    )
    assert codes.dtype == (torch.int8 if sym else torch.uint8) and codes.shape == x.shape
    assert scales.dtype == torch.float32
    assert scales.shape == ((x.shape[0],) if per_token else ())
    assert (zeros is None) == sym
    if zeros is not None:
        assert zeros.dtype == torch.int32 and zeros.shape == scales.shape
    c = codes.cpu().numpy().astype(np.int64)
    s = scales.cpu().numpy().reshape(-1, 1)
    z = None if zeros is None else zeros.cpu().numpy().reshape(-1, 1).astype(np.float64)
    return c, s, z


def _check_rotated(c, s, z, y64, per_token, sym, static, bits):
    """Kernel output vs the float64 transform (see the module docstring)."""
    _, s_ref, z_ref = _np_quant(y64.astype(F32), per_token, sym, static, bits)
    np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=0)
    safe = np.where(s == 0, 1.0, s).astype(np.float64)
    if not sym:
        lo = np.minimum(y64.min(axis=1 if per_token else None, keepdims=True), 0)
        zt = -lo / safe
        bad = (z != z_ref) & ~_near_tie(zt)
        assert not bad.any(), (z, z_ref)
    v = y64 / safe
    if sym:
        qmax = 2 ** (bits - 1) - 1
        exp = np.clip(np.rint(v), -qmax, qmax)
    else:
        L = 2**bits - 1
        exp = np.clip(np.rint(np.clip(v, -L, L)) + z, 0, L)
    exp = np.where(s == 0, 0, exp)
    diff = np.abs(c - exp)
    assert diff.max() <= 1, diff.max()
    assert not ((diff == 1) & ~_near_tie(v)).any(), "codes differ away from a tie"


# ---------------------------------------------------------------------------------------------
# rotate_quantize
# ---------------------------------------------------------------------------------------------

MODES = [(pt, sym) for pt in (True, False) for sym in (True, False)]
MODE_IDS = [f"{'tok' if pt else 'tensor'}-{'sym' if s else 'asym'}" for pt, s in MODES]


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("n", NS + (5, 100))
def test_quantize_only_bit_exact(tq, n, mode):
    per_token, sym = mode
    rng = np.random.default_rng(n)
    for R, bits, with_smooth in ((1, 8, False), (3, 4, True), (5, 2, False), (4, 8, True)):
        x = (rng.standard_normal((R, n)) * rng.uniform(0.1, 10, size=(R, 1))).astype(F32)
        if not sym:
            x = x + F32(rng.uniform(-2, 2))  # off-centre rows: zero points away from the middle
        smooth = rng.uniform(0.25, 4.0, size=n).astype(F32) if with_smooth else None
        xt = torch.tensor(x, device=DEV)
        c, s, z = _run(tq, xt, 0, None, None, smooth, per_token, sym, None, bits)
        y = x if smooth is None else (x / smooth).astype(F32)
        c_ref, s_ref, z_ref = _np_quant(y, per_token, sym, None, bits)
        assert np.array_equal(s, s_ref.reshape(-1, 1)), (s, s_ref)
        if not sym:
            assert np.array_equal(z, z_ref.reshape(-1, 1))
        assert np.array_equal(c, c_ref), np.argwhere(c != c_ref)[:5]


def test_exact_ties_round_half_even(tq):
    """absmax 127 -> scale exactly 1: y/scale = k + 0.5 are exact ties."""
    row = np.array([127.0, 0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 126.5, -126.5, 0.0, -127.0])
    x = torch.tensor(np.stack([row, -row]), dtype=torch.float32, device=DEV)
    c, s, _ = _run(tq, x, 0, None, None, None, True, True, None, 8)
    assert np.array_equal(s, [[1.0], [1.0]])
    want = np.array([127, 0, 2, 2, 4, 0, -2, -2, 126, -126, 0, -127])
    assert np.array_equal(c, np.stack([want, -want]))
    # asymmetric: lo = -2, hi = 253 -> scale 1, zero 2; ties at .5 go to even
    row = np.array([-2.0, 253.0, 0.5, 1.5, -0.5, -1.5, 100.5, 101.5])
    x = torch.tensor(row[None], dtype=torch.float32, device=DEV)
    c, s, z = _run(tq, x, 0, None, None, None, True, False, None, 8)
    assert s[0, 0] == 1.0 and z[0, 0] == 2
    assert np.array_equal(c[0], [0, 255, 2, 4, 2, 0, 102, 104])


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("n", NS)
def test_rotated_matches_numpy(tq, n, mode):
    per_token, sym = mode
    K, _ = hadamard_factors(n)
    rng = np.random.default_rng(100 + n)
    hk = rng.choice([-1.0, 1.0], size=(K, K)) if K > 1 else None
    for R, bits, with_signs, with_smooth in ((1, 8, True, False), (5, 4, False, True), (3, 8, True, True)):  # fmt: skip
        x = rng.standard_normal((R, n)).astype(F32)
        x[:, rng.integers(0, n)] *= 20  # an outlier channel
        signs = rng.choice([-1.0, 1.0], size=n) if with_signs else None
        smooth = rng.uniform(0.5, 2.0, size=n).astype(F32) if with_smooth else None
        c, s, z = _run(tq, torch.tensor(x, device=DEV), K, hk, signs, smooth, per_token, sym,
                       None, bits)  # fmt: skip
        y64 = _np_transform(x, K, hk if hk is not None else np.ones((1, 1)), signs, smooth)
        _check_rotated(c, s, z, y64, per_token, sym, None, bits)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("n", (24, 64, 112))
def test_rotated_lowp_input(tq, n, dtype):
    K, _ = hadamard_factors(n)
    rng = np.random.default_rng(n)
    hk = rng.choice([-1.0, 1.0], size=(K, K)) if K > 1 else None
    xt = torch.tensor(rng.standard_normal((4, n)), dtype=torch.float32, device=DEV).to(dtype)
    x32 = xt.float().cpu().numpy()
    c, s, z = _run(tq, xt, K, hk, None, None, True, True, None, 8)
    y64 = _np_transform(x32, K, hk if hk is not None else np.ones((1, 1)), None, None)
    _check_rotated(c, s, z, y64, True, True, None, 8)


@pytest.mark.parametrize("per_token", (True, False))
@pytest.mark.parametrize("n", (12, 64, 80))
def test_static_scale_saturates(tq, n, per_token):
    K, _ = hadamard_factors(n)
    rng = np.random.default_rng(n)
    hk = rng.choice([-1.0, 1.0], size=(K, K)) if K > 1 else None
    x = (rng.standard_normal((3, n)) * 5).astype(F32)
    c, s, z = _run(tq, torch.tensor(x, device=DEV), K, hk, None, None, per_token, True, 0.01, 8)
    assert np.all(s == F32(0.01)) and z is None
    y64 = _np_transform(x, K, hk if hk is not None else np.ones((1, 1)), None, None)
    _check_rotated(c, s, z, y64, per_token, True, 0.01, 8)
    assert np.abs(c).max() == 127  # saturated


def test_zero_rows_and_zero_input(tq):
    x = torch.zeros(3, 24, device=DEV)
    hk = np.ones((12, 12))
    for per_token in (True, False):
        for sym in (True, False):
            c, s, z = _run(tq, x, 12, hk, None, None, per_token, sym, None, 8)
            assert not c.any() and not s.any()
            if z is not None:
                assert not z.any()
    e = torch.empty(0, 24, device=DEV)
    codes, scales, zeros = tq.rotate_quantize(e, 12, torch.ones(12, 12, device=DEV), None, None,
                                              False, True, None, 8)  # fmt: skip
    assert codes.shape == (0, 24) and scales.shape == () and float(scales) == 0.0


def test_out_buffers_reused(tq):
    x = torch.randn(3, 48, device=DEV)
    hk = torch.ones(12, 12, device=DEV)
    ref = tq.rotate_quantize(x, 12, hk, None, None, True, False, None, 8)
    bufs = (torch.empty(3, 48, dtype=torch.uint8, device=DEV),
            torch.empty(3, device=DEV), torch.empty(3, dtype=torch.int32, device=DEV))  # fmt: skip
    got = tq.rotate_quantize(x, 12, hk, None, None, True, False, None, 8, out=bufs)
    assert all(g.data_ptr() == b.data_ptr() for g, b in zip(got, bufs, strict=True))
    assert all(torch.equal(g, r) for g, r in zip(got, ref, strict=True))


def test_rotate_quantize_bad_arguments(tq):
    x = torch.randn(2, 24, device=DEV)
    hk = torch.ones(12, 12, device=DEV)
    with pytest.raises(ValueError, match="bits"):
        tq.rotate_quantize(x, 12, hk, None, None, True, True, None, 9)
    with pytest.raises(ValueError, match="symmetric"):
        tq.rotate_quantize(x, 12, hk, None, None, True, False, 0.5, 8)
    with pytest.raises(ValueError, match="signs need a rotation"):
        tq.rotate_quantize(x, 0, None, torch.ones(24, device=DEV), None, True, True, None, 8)
    with pytest.raises(ValueError, match="smooth"):
        tq.rotate_quantize(x, 12, hk, None, torch.ones(5, device=DEV), True, True, None, 8)
    with pytest.raises(ValueError, match="not K"):
        tq.rotate_quantize(torch.randn(2, 36, device=DEV), 12, hk, None, None, True, True, None, 8)


# ---------------------------------------------------------------------------------------------
# int8_linear
# ---------------------------------------------------------------------------------------------


def _np_linear(qx, sx, zx, qw, sw, bias):
    acc = qx.astype(np.int64) - (0 if zx is None else zx.astype(np.int64)[:, None])
    acc = acc @ qw.astype(np.int64).T
    out = (acc.astype(F32) * sx[:, None].astype(F32)) * sw[None, :].astype(F32)
    if bias is not None:
        out = out + bias[None, :].astype(F32)
    return acc, out.astype(F32)


def _t(a, dtype):
    return None if a is None else torch.tensor(a, dtype=dtype, device=DEV)


@pytest.mark.parametrize("u8", (False, True), ids=("int8", "uint8"))
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (5, 40, 17), (2, 33, 64), (17, 70, 3)])
def test_int8_linear_matches_numpy(tq, shape, u8):
    M, K, N = shape
    rng = np.random.default_rng(M * 100 + K + N)
    qx = rng.integers(0, 256, (M, K)) if u8 else rng.integers(-127, 128, (M, K))
    zx = rng.integers(0, 256, M) if u8 else None
    qw = rng.integers(-127, 128, (N, K))
    sx = rng.uniform(1e-3, 1e-1, M).astype(F32)
    sw = rng.uniform(1e-3, 1e-1, N).astype(F32)
    for bias in (None, rng.standard_normal(N).astype(F32)):
        _, ref = _np_linear(qx, sx, zx, qw, sw, bias)
        out = tq.int8_linear(
            _t(qx, torch.uint8 if u8 else torch.int8), _t(sx, torch.float32),
            _t(zx, torch.int32), _t(qw, torch.int8), _t(sw, torch.float32),
            _t(bias, torch.float32), torch.float32,
        )  # fmt: skip
        assert out.dtype == torch.float32 and out.shape == (M, N)
        np.testing.assert_allclose(out.cpu().numpy(), ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
        for dt in (torch.bfloat16, torch.float16):
            lo = tq.int8_linear(
                _t(qx, torch.uint8 if u8 else torch.int8), _t(sx, torch.float32),
                _t(zx, torch.int32), _t(qw, torch.int8), _t(sw, torch.float32),
                _t(bias, torch.float32), dt,
            )  # fmt: skip
            assert lo.dtype == dt
            want = torch.tensor(ref).to(dt).double().numpy()
            ulp = 2.0**-8 if dt == torch.bfloat16 else 2.0**-11
            assert np.all(np.abs(lo.cpu().double().numpy() - want) <= 2 * ulp * np.abs(want) + 1e-6)


@pytest.mark.parametrize("u8", (False, True), ids=("int8", "uint8"))
def test_int8_linear_exact_accumulation(tq, u8):
    """Extreme codes, K = 300: |acc| up to 255·127·300 < 2^24, so out == acc exactly."""
    M, K, N = 4, 300, 5
    if u8:
        qx = np.array([[255] * K, [0] * K, [255, 0] * (K // 2), [128] * K])
        zx = np.array([0, 255, 0, 128])
    else:
        qx = np.array([[127] * K, [-127] * K, [-128] * K, [127, -128] * (K // 2)])
        zx = None
    qw = np.array([[127] * K, [-127] * K, [127, -127] * (K // 2), [1] * K, [0] * K])
    acc, _ = _np_linear(qx, np.ones(M, F32), zx, qw, np.ones(N, F32), None)
    out = tq.int8_linear(
        _t(qx, torch.uint8 if u8 else torch.int8), torch.ones(M, device=DEV),
        _t(zx, torch.int32), _t(qw, torch.int8), torch.ones(N, device=DEV), None, torch.float32,
    )  # fmt: skip
    assert np.array_equal(out.cpu().numpy().astype(np.int64), acc)


def test_int8_linear_bad_arguments(tq):
    qx = torch.zeros(2, 8, dtype=torch.int8, device=DEV)
    qw = torch.zeros(3, 8, dtype=torch.int8, device=DEV)
    sx, sw = torch.ones(2, device=DEV), torch.ones(3, device=DEV)
    z = torch.zeros(2, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="zx"):
        tq.int8_linear(qx, sx, z, qw, sw, None)
    with pytest.raises(ValueError, match="zx"):
        tq.int8_linear(qx.to(torch.uint8), sx, None, qw, sw, None)
    with pytest.raises(ValueError, match="disagree on K"):
        tq.int8_linear(qx, sx, None, qw[:, :4].contiguous(), sw, None)
    with pytest.raises(ValueError, match="sw must be"):
        tq.int8_linear(qx, sx, None, qw, sx, None)
    with pytest.raises(ValueError, match="out_dtype"):
        tq.int8_linear(qx, sx, None, qw, sw, None, torch.int32)


# ---------------------------------------------------------------------------------------------
# through ops: backend="triton" vs backend="torch"
# ---------------------------------------------------------------------------------------------

ops_q = pytest.importorskip("ood_fast.ops.quant")
ops_h = pytest.importorskip("ood_fast.ops.hadamard")


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("n", (8, 24, 40, 64, 112))
def test_ops_rotate_quantize_triton_vs_torch(n, mode):
    per_token, sym = mode
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, 3, n, generator=g).to(DEV)
    smooth = (torch.rand(n, generator=g) + 0.5).to(DEV)
    for rotation, sm, bits in ((None, None, 8), ("hadamard", smooth, 8),
                               (ops_h.random_hadamard(n, seed=1), None, 4)):  # fmt: skip
        kw = dict(rotation=rotation, smooth=sm, symmetric=sym, bits=bits,
                  granularity="per_token" if per_token else "per_tensor")  # fmt: skip
        got = ops_q.rotate_quantize(x, backend="triton", **kw)
        ref = ops_q.rotate_quantize(x, backend="torch", **kw)
        assert got.codes.dtype == ref.codes.dtype and got.codes.shape == ref.codes.shape
        assert got.scale.shape == ref.scale.shape
        torch.testing.assert_close(got.scale, ref.scale, rtol=1e-5, atol=0)
        if rotation is None:  # quantize only: bit-exact
            assert torch.equal(got.codes, ref.codes) and torch.equal(got.scale, ref.scale)
            if not sym:
                assert torch.equal(got.zero_point, ref.zero_point)
        else:
            gz = 0 if sym else got.zero_point.long().unsqueeze(-1)
            rz = 0 if sym else ref.zero_point.long().unsqueeze(-1)
            d = ((got.codes.long() - gz) - (ref.codes.long() - rz)).abs()
            assert d.max() <= 1
            assert (d > 0).float().mean() < 0.05  # only near ties


@pytest.mark.parametrize("u8", (False, True), ids=("int8", "uint8"))
def test_ops_int8_linear_triton_vs_torch(u8):
    g = torch.Generator().manual_seed(3)
    M, K, N = 6, 40, 9
    if u8:
        qx = torch.randint(0, 256, (2, 3, K), generator=g, dtype=torch.uint8).to(DEV)
        zx = torch.randint(0, 256, (2, 3), generator=g, dtype=torch.int32).to(DEV)
    else:
        qx = torch.randint(-127, 128, (2, 3, K), generator=g, dtype=torch.int8).to(DEV)
        zx = None
    qw = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8).to(DEV)
    sx = (torch.rand(2, 3, generator=g) * 0.1).to(DEV)
    sw = (torch.rand(N, generator=g) * 0.1).to(DEV)
    bias = torch.randn(N, generator=g).to(DEV)
    for dt in (torch.float32, torch.bfloat16):
        got = ops_q.int8_linear(qx, sx, qw, sw, bias, zx=zx, out_dtype=dt, backend="triton")
        ref = ops_q.int8_linear(qx, sx, qw, sw, bias, zx=zx, out_dtype=dt, backend="torch")
        assert got.shape == ref.shape == (2, 3, N) and got.dtype == dt
        torch.testing.assert_close(got, ref, rtol=1e-6 if dt == torch.float32 else 8e-3,
                                   atol=1e-5)  # fmt: skip
    assert M == 6


# ---------------------------------------------------------------------------------------------
# "quick": larger rows and a larger GEMM (the selection gpu_check.sh runs natively on a GPU)
# ---------------------------------------------------------------------------------------------


def _np_transform_fast(x32, K, hk, signs):
    R, n = x32.shape
    _, p = hadamard_factors(n)
    y = (x32.astype(np.float64) * (signs if signs is not None else 1.0)).reshape(R, K, 1 << p)
    for j in range(p):
        h = y.reshape(R, K, -1, 2, 1 << j)
        a, b = h[:, :, :, 0, :], h[:, :, :, 1, :]
        y = np.stack([a + b, a - b], axis=3).reshape(R, K, 1 << p)
    if K > 1:
        y = np.einsum("ac,rab->rcb", hk, y)
    return y.reshape(R, n) / math.sqrt(n)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_quick_rotated_larger_rows(tq, mode):
    per_token, sym = mode
    for n in (1024, 5120):
        K, _ = hadamard_factors(n)
        rng = np.random.default_rng(n)
        hk = rng.choice([-1.0, 1.0], size=(K, K)) if K > 1 else np.ones((1, 1))
        signs = rng.choice([-1.0, 1.0], size=n)
        x = rng.standard_normal((3, n)).astype(F32)
        c, s, z = _run(tq, torch.tensor(x, device=DEV), K, hk if K > 1 else None, signs, None,
                       per_token, sym, None, 8)  # fmt: skip
        _check_rotated(c, s, z, _np_transform_fast(x, K, hk, signs), per_token, sym, None, 8)


@pytest.mark.parametrize("u8", (False, True), ids=("int8", "uint8"))
def test_quick_int8_linear_larger(tq, u8):
    M, K, N = 96, 200, 136
    rng = np.random.default_rng(5)
    qx = rng.integers(0, 256, (M, K)) if u8 else rng.integers(-127, 128, (M, K))
    zx = rng.integers(0, 256, M) if u8 else None
    qw = rng.integers(-127, 128, (N, K))
    sx = rng.uniform(1e-3, 1e-1, M).astype(F32)
    sw = rng.uniform(1e-3, 1e-1, N).astype(F32)
    bias = rng.standard_normal(N).astype(F32)
    _, ref = _np_linear(qx, sx, zx, qw, sw, bias)
    out = tq.int8_linear(
        _t(qx, torch.uint8 if u8 else torch.int8), _t(sx, torch.float32), _t(zx, torch.int32),
        _t(qw, torch.int8), _t(sw, torch.float32), _t(bias, torch.float32), torch.float32,
    )  # fmt: skip
    np.testing.assert_allclose(out.cpu().numpy(), ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
