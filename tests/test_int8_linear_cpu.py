"""The C++ CPU int8 GEMM behind ``ops.int8_linear`` (csrc/cpu/int8_linear.cpp, int8_gemm.h).

``ood_fast._C.Int8Weight`` is called directly through raw pointers and checked against an
independent numpy reference: the exact int64 matmul of ``qx - zx`` and ``qw``, then the epilogue
``sx[m] * sw[n] * acc + bias[n]`` in float64. The only tolerance is the kernel's fp32 epilogue
(int32 -> fp32, the fp32 product of the scales, one fused multiply-add) and, for bf16 output,
the final bf16 rounding. Every micro-kernel this processor can run (AMX-INT8, AVX512-VNNI, the
portable one) over odd shapes, int8 and uint8 + zero-point activations, extreme values up to the
int32 bound at K = 65536, bias or not, fp32 and bf16 out, and several thread counts.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ood_fast import _extensions as ext

_C = ext.cpu_module()
pytestmark = pytest.mark.skipif(
    _C is None or not hasattr(_C, "Int8Weight"), reason="C++ extension ood_fast._C not built"
)

ISAS = list(_C.int8_linear_isas()) if _C is not None and hasattr(_C, "int8_linear_isas") else []
U = 2.0**-24  # fp32 unit roundoff
UBF = 2.0**-8  # bf16 unit roundoff

MS, KS, NS = (1, 3, 17, 200), (1, 3, 64, 65, 777), (1, 5, 33, 130)


def _ptr(a: np.ndarray | None) -> int:
    return 0 if a is None else a.ctypes.data


def run(qw, qx, sx, zx, sw, bias, *, bf16=False, isa="auto", threads=2, weight=None):
    """out [M, N] as float64 (bf16 bits widened) from Int8Weight.forward."""
    M = qx.shape[0]
    N, K = qw.shape
    w = weight or _C.Int8Weight(_ptr(qw), N, K, isa)
    out = np.full((M, N), 0xFFFF if bf16 else np.nan, np.uint16 if bf16 else np.float32)
    w.forward(_ptr(qx), qx.dtype == np.uint8, M, _ptr(sx), _ptr(zx), _ptr(sw), _ptr(bias),
              _ptr(out), bf16, threads)  # fmt: skip
    if bf16:
        return (out.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return out.astype(np.float64)


def reference(qw, qx, sx, zx, sw, bias):
    """(out float64 [M, N], |sx sw acc| float64) with the exact int64 sum."""
    x = qx.astype(np.int64)
    if zx is not None:
        x = x - zx.astype(np.int64)[:, None]
    acc = x @ qw.astype(np.int64).T
    prod = acc.astype(np.float64) * sx.astype(np.float64)[:, None] * sw.astype(np.float64)[None]
    b = np.zeros(qw.shape[0]) if bias is None else bias.astype(np.float64)
    return prod + b[None], np.abs(prod), np.abs(b)[None]


def check(got, qw, qx, sx, zx, sw, bias, bf16, what=""):
    ref, aprod, abias = reference(qw, qx, sx, zx, sw, bias)
    # fp32 epilogue: float(acc), sx*sw, one fma (<= 3 roundings of the product, 1 of the sum);
    # bf16 output: one more rounding of the result.
    tol = 4 * U * aprod + 2 * U * abias + 1e-30
    if bf16:
        tol = tol + UBF * np.abs(ref) * 1.01
    err = np.abs(got - ref)
    assert np.all(np.isfinite(got)), f"{what}: non-finite output"
    bad = err > tol
    assert not bad.any(), (
        f"{what}: {bad.sum()} of {bad.size} outside tolerance; worst err "
        f"{err.max():.3g} at {np.unravel_index(np.argmax(err - tol), err.shape)}"
    )


def problem(M, K, N, u8, seed, bias=True):
    rng = np.random.default_rng(seed)
    qw = rng.integers(-127, 128, (N, K), dtype=np.int8)
    if u8:
        qx = rng.integers(0, 256, (M, K), dtype=np.uint8)
        zx = rng.integers(0, 256, M).astype(np.int32)
    else:
        qx = rng.integers(-128, 128, (M, K), dtype=np.int8)
        zx = None
    sx = (rng.random(M) * 0.1 + 1e-3).astype(np.float32)
    sw = (rng.random(N) * 0.01 + 1e-4).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32) if bias else None
    return qw, qx, sx, zx, sw, b


def test_isa_list():
    assert ISAS and ISAS[-1] == "generic"
    feats = _C.cpu_features()
    assert ("vnni" in ISAS) == bool(feats["avx512vnni"])
    rng = np.random.default_rng(0)
    qw = rng.integers(-127, 128, (4, 8), dtype=np.int8)
    w = _C.Int8Weight(qw.ctypes.data, 4, 8)
    assert w.isa == ISAS[0] and (w.N, w.K) == (4, 8)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("u8", [False, True], ids=["int8", "uint8+zp"])
def test_odd_shapes(isa, u8):
    """Every (M, K, N) of the odd-shape grid; bias / no bias and fp32 / bf16 out alternate."""
    for i, (M, K, N) in enumerate(itertools.product(MS, KS, NS)):
        bias, bf16 = i % 2 == 0, (i // 2) % 2 == 1
        qw, qx, sx, zx, sw, b = problem(M, K, N, u8, seed=i, bias=bias)
        got = run(qw, qx, sx, zx, sw, b, bf16=bf16, isa=isa)
        assert _C.Int8Weight(qw.ctypes.data, N, K, isa).isa == isa
        check(got, qw, qx, sx, zx, sw, b, bf16, f"{isa} M={M} K={K} N={N} bias={bias} bf16={bf16}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
def test_larger_shapes_and_threads(isa, bf16):
    """Many k-blocks, several weight chunks / row-block groups, thread counts 1..5 agree bitwise.

    The kernel uses one thread per ~2^26 multiply-adds, so only the last two shapes run on
    several threads (the last one splits its weight chunks over jobs, the one before its rows).
    """
    for M, K, N in [(70, 4096, 100), (200, 300, 32), (33, 1000, 700), (2000, 600, 130),
                    (300, 1100, 1000)]:  # fmt: skip
        for u8 in (False, True):
            qw, qx, sx, zx, sw, b = problem(M, K, N, u8, seed=M + K + N)
            w = _C.Int8Weight(qw.ctypes.data, N, K, isa)
            outs = [run(qw, qx, sx, zx, sw, b, bf16=bf16, weight=w, threads=t) for t in (1, 2, 5)]
            check(outs[0], qw, qx, sx, zx, sw, b, bf16, f"{isa} M={M} K={K} N={N} u8={u8}")
            for o in outs[1:]:
                np.testing.assert_array_equal(o, outs[0])


@pytest.mark.parametrize("isa", ISAS)
def test_extreme_values(isa):
    """Saturated codes: -128 / 127 activations, 0 / 255 uint8 with zero points 0 / 255, weights
    +-127 (and -128, which the kernel handles exactly though ops rejects it)."""
    rng = np.random.default_rng(7)
    M, K, N = 19, 257, 37
    qw = rng.choice(np.array([-127, 127, -128, 0], np.int8), (N, K))
    qw[0] = 127
    qw[1] = -128
    sx = np.full(M, 1e-3, np.float32)
    sw = np.full(N, 1e-2, np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    qx = rng.choice(np.array([-128, 127], np.int8), (M, K))
    qx[0], qx[1] = -128, 127
    check(run(qw, qx, sx, None, sw, b, isa=isa), qw, qx, sx, None, sw, b, False, f"{isa} int8")
    qxu = rng.choice(np.array([0, 255], np.uint8), (M, K))
    qxu[0], qxu[1] = 0, 255
    zx = rng.choice(np.array([0, 255, 128], np.int32), M)
    zx[0], zx[1] = 255, 0
    got = run(qw, qxu, sx, zx, sw, None, bf16=True, isa=isa)
    check(got, qw, qxu, sx, zx, sw, None, True, f"{isa} uint8")


@pytest.mark.parametrize("isa", ISAS)
def test_int32_bound(isa):
    """K = 65536 with every product at its largest: the true sums (up to 255 * 128 * 65536, just
    under 2^31) must come out exact; K = 65537 is refused."""
    K, N = 65536, 3
    qw = np.empty((N, K), np.int8)
    qw[0], qw[1], qw[2] = 127, -128, -127
    qxu = np.empty((3, K), np.uint8)
    qxu[0], qxu[1], qxu[2] = 255, 0, 255
    zx = np.array([0, 255, 0], np.int32)
    sx = np.ones(3, np.float32)
    sw = np.ones(N, np.float32)
    got = run(qw, qxu, sx, zx, sw, None, isa=isa)
    ref, _, _ = reference(qw, qxu, sx, zx, sw, None)
    assert abs(ref).max() > 2.1e9  # the test reaches the bound
    np.testing.assert_allclose(got, ref, rtol=2 * U, atol=0)
    qx = np.full((2, K), -128, np.int8)
    qx[1] = 127
    got = run(qw, qx, sx[:2], None, sw, None, isa=isa)
    np.testing.assert_allclose(got, reference(qw, qx, sx[:2], None, sw, None)[0], rtol=2 * U)
    big = np.zeros((1, K + 1), np.int8)
    with pytest.raises(ValueError, match="65536"):
        _C.Int8Weight(big.ctypes.data, 1, K + 1, isa)


def test_isas_agree_bitwise():
    """AMX and VNNI share the epilogue: identical bits (the int32 sums are exact in both)."""
    fast = [i for i in ISAS if i != "generic"]
    if len(fast) < 2:
        pytest.skip("fewer than two SIMD kernels on this processor")
    for u8 in (False, True):
        qw, qx, sx, zx, sw, b = problem(45, 321, 77, u8, seed=3)
        outs = [run(qw, qx, sx, zx, sw, b, isa=i) for i in fast]
        for o in outs[1:]:
            np.testing.assert_array_equal(o, outs[0])


def test_zero_point_with_int8_and_none_with_uint8():
    """Beyond the contract, but exact: zx with int8 codes, uint8 codes without zx (zero 0)."""
    for isa in ISAS:
        qw, qx, sx, _, sw, b = problem(9, 100, 40, False, seed=5)
        zx = np.arange(-4, 5, dtype=np.int32)
        check(run(qw, qx, sx, zx, sw, b, isa=isa), qw, qx, sx, zx, sw, b, False, isa)
        qw, qxu, sx, _, sw, b = problem(9, 100, 40, True, seed=6)
        check(run(qw, qxu, sx, None, sw, b, isa=isa), qw, qxu, sx, None, sw, b, False, isa)


def test_env_forces_isa(monkeypatch):
    qw = np.ones((3, 5), np.int8)
    monkeypatch.setenv("OOD_FAST_INT8_ISA", "generic")
    assert _C.Int8Weight(qw.ctypes.data, 3, 5).isa == "generic"
    assert _C.Int8Weight(qw.ctypes.data, 3, 5, ISAS[0]).isa == ISAS[0]  # explicit isa wins
    monkeypatch.setenv("OOD_FAST_INT8_ISA", "bogus")
    with pytest.raises(ValueError, match="isa"):
        _C.Int8Weight(qw.ctypes.data, 3, 5)


def test_bad_arguments():
    qw = np.ones((3, 5), np.int8)
    for isa in ("avx2", "AMX", ""):
        with pytest.raises(ValueError, match="isa"):
            _C.Int8Weight(qw.ctypes.data, 3, 5, isa)
    with pytest.raises(ValueError):
        _C.Int8Weight(qw.ctypes.data, 0, 5)
    with pytest.raises(ValueError):
        _C.Int8Weight(qw.ctypes.data, 3, 0)
    with pytest.raises(ValueError):
        _C.Int8Weight(0, 3, 5)
    w = _C.Int8Weight(qw.ctypes.data, 3, 5)
    qx = np.ones((2, 5), np.int8)
    s = np.ones(3, np.float32)
    out = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError):
        w.forward(qx.ctypes.data, False, -1, s.ctypes.data, 0, s.ctypes.data, 0, out.ctypes.data,
                  False, 1)  # fmt: skip
    with pytest.raises(ValueError):
        w.forward(qx.ctypes.data, False, 2, 0, 0, s.ctypes.data, 0, out.ctypes.data, False, 1)
    w.forward(0, False, 0, 0, 0, 0, 0, 0, False, 1)  # M = 0: nothing to do, nothing touched


def test_ops_cpu_matches_torch():
    """ops.int8_linear(backend="cpu") against backend="torch" (when quant-py's ops exist)."""
    torch = pytest.importorskip("torch")
    from ood_fast import ops

    if not hasattr(ops, "int8_linear"):
        pytest.skip("ood_fast.ops.int8_linear not merged yet")
    g = torch.Generator().manual_seed(0)
    for M, K, N in [(1, 64, 5), (17, 777, 130), (200, 65, 33)]:
        qw = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
        sw = torch.rand(N, generator=g) * 0.01 + 1e-4
        bias = torch.randn(N, generator=g)
        sx = torch.rand(M, generator=g) * 0.1 + 1e-3
        qx = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
        qxu = torch.randint(0, 256, (M, K), dtype=torch.uint8, generator=g)
        zx = torch.randint(0, 256, (M,), dtype=torch.int32, generator=g)
        for x, z in ((qx, None), (qxu, zx)):
            for dt in (torch.float32, torch.bfloat16):
                kw = dict(zx=z, out_dtype=dt)
                got = ops.int8_linear(x, sx, qw, sw, bias, backend="cpu", **kw)
                want = ops.int8_linear(x, sx, qw, sw, bias, backend="torch", **kw)
                assert got.dtype == dt and got.shape == (M, N)
                tol = (
                    dict(rtol=1e-5, atol=1e-5)
                    if dt == torch.float32
                    else dict(rtol=1e-2, atol=1e-2)
                )
                torch.testing.assert_close(got.float(), want.float(), **tol)
