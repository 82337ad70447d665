"""The C++ CPU kernels ``hadamard`` and ``rotate_quantize`` (csrc/cpu/hadamard.cpp, fwht.h).

Called through ``ood_fast._C`` directly (raw pointers, docs/QUANT_CONTRACT.md), so they are checked
independently of the Python ops layer:

* ``hadamard`` against numpy float64 ``scale * (x * signs) @ kron(H_K, S_L)`` (the dense Kronecker
  up to n = 2048; above, a float64 numpy butterfly that is itself checked against the dense
  product), every dtype, odd row counts, n = 1 .. 8192 and K * 2^p for K = 12, 20, 28, in place,
  signs, the AVX-512 and the portable path; f16 / bf16 outputs are the fp32 result rounded
  exactly as torch rounds it.
* ``rotate_quantize`` codes against a numpy round-half-even quantizer applied to the float64
  rotated values with the kernel's scale (a code may differ by 1 only within 1e-3 of a .5 tie),
  scales against float64 statistics; without rotation (K = 0) bit-exact against numpy float32
  (true division, round half to even), exact ties included; every mode (per token / per tensor,
  symmetric / asymmetric, dynamic / static, bits 2..8), the per-tensor paths that keep rows and
  that read the input twice, thread counts.
* when the ops layer exists: ``ood_fast.ops.hadamard`` / ``rotate_quantize`` with
  ``backend="cpu"`` against ``backend="torch"``.

H_K: the package's ``hadamard_factor`` when present, and always also a random, non-symmetric
+-1 matrix (the kernel takes any [K, K] and must use it transposed as the contract says).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from ood_fast import _extensions as ext

_C = ext.cpu_module()
pytestmark = pytest.mark.skipif(
    _C is None or not hasattr(_C, "hadamard"), reason="C++ extension ood_fast._C has no hadamard"
)

DT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
NT = 2

try:  # the package's one definition of H_K (quant-py); random +-1 matrices are tested regardless
    from ood_fast.reference.hadamard import hadamard_factor as _pkg_factor
except ImportError:  # pragma: no cover - until the reference lands
    _pkg_factor = None


def _factorize(n):
    for k in (1, 12, 20, 28):
        if n % k == 0 and (n // k) & (n // k - 1) == 0:
            return k, n // k
    raise ValueError(n)


def _hk(K, kind="random"):
    """fp32 [K, K] +-1: the package's H_K, or a seeded random non-symmetric one."""
    if K == 1:
        return np.ones((1, 1), np.float32)
    if kind == "package":
        return np.ascontiguousarray(_pkg_factor(K).numpy().astype(np.float32))
    h = np.random.default_rng(K).choice([-1.0, 1.0], (K, K)).astype(np.float32)
    assert not np.array_equal(h, h.T)
    return h


def _fwht64(x):
    """float64 Sylvester transform (natural order) along the last axis, x [..., L]: y = x @ S_L."""
    L = x.shape[-1]
    y = np.array(x, dtype=np.float64).reshape(-1, L)
    h = 1
    while h < L:
        y = y.reshape(-1, L // (2 * h), 2, h)
        y = np.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], axis=2)
        h *= 2
    return y.reshape(x.shape)


def _ref(x, hk, scale, signs=None):
    """float64 scale * (x * signs) @ kron(hk, S_L), x [rows, n] (any float array)."""
    x = np.asarray(x, np.float64)
    if signs is not None:
        x = x * np.asarray(signs, np.float64)
    rows, n = x.shape
    K = hk.shape[0]
    L = n // K
    if n <= 2048:
        S = scipy.linalg.hadamard(L).astype(np.float64)
        return scale * (x @ np.kron(hk.astype(np.float64), S))
    y = _fwht64(x.reshape(rows, K, L))
    return scale * np.einsum("rab,ac->rcb", y, hk.astype(np.float64)).reshape(rows, n)


def _ptr(a):
    if a is None:
        return 0
    return a.data_ptr() if isinstance(a, torch.Tensor) else a.ctypes.data


def run_hadamard(x, hk, scale, signs=None, out=None, nt=NT):
    rows, n = x.shape
    out = torch.empty_like(x) if out is None else out
    code = {v: k for k, v in DT.items()}[x.dtype]
    _C.hadamard(_ptr(x), code, rows, n, hk.shape[0], _ptr(hk), _ptr(signs), scale, _ptr(out), nt)
    return out


def _x(rows, n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, n, generator=g).to(dtype)


def _signs(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).float()


POW2 = [2**p for p in range(14)]  # 1 .. 8192
KSIZES = [12, 24, 48, 96, 384, 1536, 20, 40, 80, 320, 5120, 28, 56, 448, 1792, 7168, 12 * 1024]


@pytest.fixture(params=["avx512", "generic"])
def isa(request, monkeypatch):
    """Both code paths: AVX-512 (where the CPU has it) and the portable one."""
    if request.param == "generic":
        monkeypatch.setenv("OOD_FAST_HADAMARD_ISA", "generic")
    elif not _C.cpu_features()["avx512f"]:
        pytest.skip("no AVX-512 on this CPU")
    return request.param


# ------------------------------------------------------------------------------------------
# the float64 reference itself
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [16, 256, 1536, 5120 // 4])
def test_butterfly_reference_matches_dense_kronecker(n):
    K, L = _factorize(n)
    hk = _hk(K)
    x = np.random.default_rng(0).standard_normal((3, n))
    dense = x @ np.kron(hk.astype(np.float64), scipy.linalg.hadamard(L))
    y = np.einsum("rab,ac->rcb", _fwht64(x.reshape(3, K, L)), hk.astype(np.float64))
    np.testing.assert_allclose(y.reshape(3, n), dense, rtol=1e-12, atol=1e-10)


@pytest.mark.skipif(_pkg_factor is None, reason="ood_fast.reference.hadamard not merged yet")
@pytest.mark.parametrize("K", [12, 20, 28])
def test_package_factor_is_hadamard(K):
    h = _hk(K, "package").astype(np.float64)
    np.testing.assert_array_equal(h @ h.T, K * np.eye(K))


# ------------------------------------------------------------------------------------------
# hadamard
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("n", POW2 + KSIZES)
def test_hadamard_fp32(n, rows, isa):
    K, _ = _factorize(n)
    hk = _hk(K)
    x = _x(rows, n, seed=n + rows)
    scale = 1.0 / np.sqrt(n)
    out = run_hadamard(x, hk, scale)
    np.testing.assert_allclose(out.numpy(), _ref(x.numpy(), hk, scale), rtol=1e-5, atol=3e-6)


@pytest.mark.skipif(_pkg_factor is None, reason="ood_fast.reference.hadamard not merged yet")
@pytest.mark.parametrize("n", [12, 24, 384, 1536, 5120, 28 * 64, 20 * 512])
def test_hadamard_package_factor(n, isa):
    K, _ = _factorize(n)
    hk = _hk(K, "package")
    x = _x(5, n)
    out = run_hadamard(x, hk, 1.0 / np.sqrt(n))
    np.testing.assert_allclose(
        out.numpy(), _ref(x.numpy(), hk, 1 / np.sqrt(n)), rtol=1e-5, atol=3e-6
    )


@pytest.mark.parametrize("n", [8, 64, 1024, 8192, 24, 1536, 5120, 7168])
def test_hadamard_signs_and_scale(n, isa):
    K, _ = _factorize(n)
    hk = _hk(K)
    x, s = _x(3, n, seed=5), _signs(n)
    out = run_hadamard(x, hk, 0.37, signs=s)
    np.testing.assert_allclose(
        out.numpy(), _ref(x.numpy(), hk, 0.37, s.numpy()), rtol=1e-5, atol=3e-6 * np.sqrt(n) * 0.37
    )


@pytest.mark.parametrize("n", [4, 256, 4096, 48, 5120])
def test_hadamard_unnormalised_is_integer_exact(n, isa):
    """Integer inputs, scale 1: every partial sum is an exact fp32 integer, so no rounding at all."""
    K, _ = _factorize(n)
    hk = _hk(K)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-8, 9, (3, n), generator=g).float()
    out = run_hadamard(x, hk, 1.0)
    np.testing.assert_array_equal(out.numpy(), _ref(x.numpy(), hk, 1.0))


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("n", [1, 8, 16, 256, 2048, 8192, 12, 384, 5120, 28 * 32])
def test_hadamard_half_dtypes(n, dtype, isa):
    """f16/bf16 in and out: fp32 arithmetic on the upcast input, one rounding at the store."""
    K, _ = _factorize(n)
    hk = _hk(K)
    x = _x(3, n, seed=7, dtype=DT[dtype])
    s = _signs(n)
    out = run_hadamard(x, hk, 1 / np.sqrt(n), signs=s)
    assert out.dtype == DT[dtype]
    # The same fp32 operations as the fp32 kernel on the upcast input, then torch's rounding.
    f32 = run_hadamard(x.float(), hk, 1 / np.sqrt(n), signs=s)
    torch.testing.assert_close(out, f32.to(DT[dtype]), rtol=0, atol=0)
    ref = _ref(x.float().numpy(), hk, 1 / np.sqrt(n), s.numpy())
    tol = 2.0**-10 if dtype == "f16" else 2.0**-7
    np.testing.assert_allclose(out.float().numpy(), ref, rtol=tol, atol=1e-5)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("n", [2, 128, 4096, 8192, 20, 1536, 5120])
def test_hadamard_in_place(n, dtype, isa):
    K, _ = _factorize(n)
    hk = _hk(K)
    x = _x(17, n, seed=11, dtype=DT[dtype])
    expect = run_hadamard(x, hk, 1 / np.sqrt(n))
    y = x.clone()
    run_hadamard(y, hk, 1 / np.sqrt(n), out=y)
    torch.testing.assert_close(y, expect, rtol=0, atol=0)


def test_hadamard_threads_and_large():
    """Many rows over 1, 2 and 3 threads give identical bits (each row is one thread's)."""
    n = 1024
    hk = _hk(1)
    x = _x(500, n, seed=2)
    outs = [run_hadamard(x, hk, 1 / 32, nt=t) for t in (1, 2, 3)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=0, atol=0)
    np.testing.assert_allclose(outs[0].numpy(), _ref(x.numpy(), hk, 1 / 32), rtol=1e-5, atol=3e-6)


def test_hadamard_is_orthonormal_involution():
    """Sylvester / sqrt(n) is its own inverse: applying it twice returns x (fp32 round-off)."""
    x = _x(4, 4096, seed=9)
    y = run_hadamard(run_hadamard(x, _hk(1), 1 / 64), _hk(1), 1 / 64)
    torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)


def test_hadamard_zero_rows():
    x = torch.empty(0, 256)
    run_hadamard(x, _hk(1), 1.0)


@pytest.mark.parametrize(
    "n,K,dtype,match",
    [
        (24, 5, "f32", "not K \\* 2\\^p"),
        (96, 12, "f64", "dtype"),
        (40, 1, "f32", "not K \\* 2\\^p"),
        (48, 12, "f32", "H_K"),
    ],
)
def test_hadamard_bad_input(n, K, dtype, match):
    x = torch.zeros(2, n)
    with pytest.raises(ValueError, match=match):
        hk_ptr = 0 if match == "H_K" else _ptr(np.ones((K, K), np.float32))
        _C.hadamard(x.data_ptr(), dtype, 2, n, K, hk_ptr, 0, 1.0, x.data_ptr(), 1)


# ------------------------------------------------------------------------------------------
# rotate_quantize
# ------------------------------------------------------------------------------------------


def run_rq(x, K, hk, signs, smooth, per_token, symmetric, static, bits, nt=NT):
    rows, n = x.shape
    code = {v: k for k, v in DT.items()}[x.dtype]
    codes = torch.full((rows, n), 99, dtype=torch.int8 if symmetric else torch.uint8)
    scales = torch.full((rows if per_token else 1,), -1.0)
    zeros = None if symmetric else torch.full((rows if per_token else 1,), -7, dtype=torch.int32)
    _C.rotate_quantize(
        _ptr(x), code, rows, n, K, _ptr(hk) if K else 0, _ptr(signs), _ptr(smooth),
        per_token, symmetric, float(static or 0.0), bits,
        _ptr(codes), _ptr(scales), _ptr(zeros), nt,
    )  # fmt: skip
    return codes, scales, zeros


def _stats64(y, per_token):
    """float64 extremes per row [rows, 1] or of the tensor [1, 1]."""
    ax = 1 if per_token else None
    am = np.abs(y).max(axis=ax, keepdims=True) if y.size else np.zeros((1, 1))
    lo = np.minimum(y.min(axis=ax, keepdims=True), 0) if y.size else np.zeros((1, 1))
    hi = np.maximum(y.max(axis=ax, keepdims=True), 0) if y.size else np.zeros((1, 1))
    return np.atleast_2d(am), np.atleast_2d(lo), np.atleast_2d(hi)


def check_codes(y, codes, scales, zeros, per_token, symmetric, static, bits, tie_tol):
    """Codes == clamp(rint(y / scale) (+ zero)) with the kernel's scale; +-1 only near .5 ties."""
    rows = y.shape[0]
    sc = scales.numpy().astype(np.float64).reshape(-1, 1)
    am, lo, hi = _stats64(y, per_token)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        want_scale = np.full_like(am, static) if static else am / qmax
        np.testing.assert_allclose(sc, want_scale, rtol=2e-6)
        lo_c, hi_c, zero = -qmax, qmax, np.zeros_like(sc)
    else:
        levels = 2**bits - 1
        np.testing.assert_allclose(sc, (hi - lo) / levels, rtol=2e-6)
        zero = zeros.numpy().astype(np.float64).reshape(-1, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            zq = np.where(sc > 0, -lo / sc, 0.0)
        want_zero = np.clip(np.rint(zq), 0, levels)
        near = np.abs(np.abs(zq - np.floor(zq)) - 0.5) < tie_tol
        assert np.all((want_zero == zero) | (near & (np.abs(want_zero - zero) <= 1)))
        lo_c, hi_c = 0, levels
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(sc > 0, y / sc, 0.0)
    want = np.clip(np.rint(q) + zero, lo_c, hi_c)
    want = np.where(sc > 0, want, 0)
    got = codes.numpy().astype(np.float64)
    diff = np.abs(got - want)
    frac = np.abs(q - np.floor(q))
    near_tie = np.abs(frac - 0.5) < tie_tol
    bad = (diff > 1) | ((diff == 1) & ~near_tie)
    assert not bad.any(), (
        f"{int(bad.sum())} codes off (of {bad.size}); first at {np.argwhere(bad)[0]}"
    )
    assert rows == codes.shape[0]


MODES = [  # (per_token, symmetric, static)
    (True, True, None),
    (True, False, None),
    (False, True, None),
    (False, False, None),
    (True, True, 0.05),
    (False, True, 0.02),
]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"tok{int(m[0])}-sym{int(m[1])}-st{m[2]}")
@pytest.mark.parametrize("n", [16, 256, 4096, 8192, 12, 384, 1536, 5120, 7168])
def test_rotate_quantize_modes(n, mode, isa):
    per_token, symmetric, static = mode
    K, _ = _factorize(n)
    hk = _hk(K)
    x = _x(17, n, seed=n)
    x[3] *= 20.0  # an outlier token: per-tensor and per-token scales differ
    s = _signs(n)
    sm = torch.rand(n, generator=torch.Generator().manual_seed(4)) + 0.5
    codes, scales, zeros = run_rq(x, K, hk, s, sm, per_token, symmetric, static, 8)
    y = _ref(x.numpy() / sm.numpy().astype(np.float64), hk, 1 / np.sqrt(n), s.numpy())
    check_codes(y, codes, scales, zeros, per_token, symmetric, static, 8, 1e-3)


@pytest.mark.parametrize("bits", [2, 3, 4, 7, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_rotate_quantize_bits_dtypes(bits, symmetric, dtype, isa):
    n = 1024
    x = _x(9, n, seed=bits, dtype=DT[dtype])
    codes, scales, zeros = run_rq(x, 1, _hk(1), None, None, True, symmetric, None, bits)
    y = _ref(x.float().numpy(), _hk(1), 1 / 32)
    check_codes(y, codes, scales, zeros, True, symmetric, None, bits, 1e-3)
    codes, scales, zeros = run_rq(x, 1, _hk(1), None, None, False, symmetric, None, bits)
    check_codes(y, codes, scales, zeros, False, symmetric, None, bits, 1e-3)


def _numpy_quant32(y, per_token, symmetric, static, bits):
    """float32 numpy quantizer, the contract's formulas operation by operation."""
    ax = 1 if per_token else None
    f = np.float32
    if symmetric:
        qmax = f(2 ** (bits - 1) - 1)
        if static:
            scale = np.full((y.shape[0] if per_token else 1, 1), f(static), np.float32)
        else:
            scale = (np.abs(y).max(axis=ax, keepdims=True) / qmax).astype(np.float32).reshape(-1, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.clip(np.rint(y / scale), -qmax, qmax)
        return np.where(scale > 0, q, 0).astype(np.int8), scale.ravel(), None
    levels = f(2**bits - 1)
    lo = np.minimum(y.min(axis=ax, keepdims=True), f(0)).reshape(-1, 1)
    hi = np.maximum(y.max(axis=ax, keepdims=True), f(0)).reshape(-1, 1)
    scale = ((hi - lo) / levels).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zero = np.where(scale > 0, np.clip(np.rint(-lo / scale), f(0), levels), f(0))
        q = np.clip(np.rint(y / scale) + zero, f(0), levels)
    q = np.where(scale > 0, q, 0)
    return q.astype(np.uint8), scale.ravel(), zero.ravel().astype(np.int32)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"tok{int(m[0])}-sym{int(m[1])}-st{m[2]}")
@pytest.mark.parametrize("n", [1, 7, 16, 100, 1000])
@pytest.mark.parametrize("smooth", [False, True])
def test_quantize_only_bit_exact(n, smooth, mode, isa):
    """K = 0: y = x / smooth in fp32, then the quantizer: every bit as numpy float32 gives it."""
    per_token, symmetric, static = mode
    x = _x(17, n, seed=n + 1)
    sm = (torch.rand(n, generator=torch.Generator().manual_seed(2)) + 0.3) if smooth else None
    codes, scales, zeros = run_rq(x, 0, None, None, sm, per_token, symmetric, static, 8)
    y = x.numpy() / sm.numpy() if smooth else x.numpy()
    wc, ws, wz = _numpy_quant32(y.astype(np.float32), per_token, symmetric, static, 8)
    np.testing.assert_array_equal(codes.numpy(), wc)
    np.testing.assert_array_equal(scales.numpy(), ws)
    if not symmetric:
        np.testing.assert_array_equal(zeros.numpy(), wz)


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_exact_ties_round_half_even(symmetric, isa):
    """y / scale exactly k + 0.5 (scale a power of two): codes round to the even neighbour."""
    n = 64
    k = torch.arange(-40, 24).float()  # rows' values: (k + 0.5) * scale
    x = ((k + 0.5) / 4).repeat(3, 1)  # scale 1/4 ...
    if symmetric:
        codes, scales, _ = run_rq(x, 0, None, None, None, True, True, 0.25, 8)
        want = np.clip(np.rint(k.numpy() + 0.5), -127, 127)
        np.testing.assert_array_equal(codes.numpy(), np.tile(want, (3, 1)).astype(np.int8))
        assert np.all(np.abs(want - np.floor(want)) == 0) and np.all(want % 2 == 0)
    else:
        # asymmetric: lo = -39.5/4, hi = 23.5/4, 4 bits -> scale (63/4)/15 = 1.05: not a tie test;
        # use 6 bits: levels 63, scale = (hi - lo) / 63 = 0.25 exactly, zero = rint(39.5) = 40.
        codes, scales, zeros = run_rq(x, 0, None, None, None, True, False, None, 6)
        assert float(scales[0]) == 0.25 and int(zeros[0]) == 40
        want = np.clip(np.rint(k.numpy() + 0.5) + 40, 0, 63)
        np.testing.assert_array_equal(codes.numpy(), np.tile(want, (3, 1)).astype(np.uint8))
    assert n == x.shape[1]


def test_quantize_zero_rows_and_zero_scale(isa):
    x = torch.zeros(3, 256)
    for sym in (True, False):
        for tok in (True, False):
            codes, scales, zeros = run_rq(x, 1, _hk(1), None, None, tok, sym, None, 8)
            assert (codes == 0).all() and (scales == 0).all()
            if not sym:
                assert (zeros == 0).all()
    codes, scales, _ = run_rq(torch.zeros(0, 256), 1, _hk(1), None, None, False, True, None, 8)
    assert float(scales[0]) == 0.0


@pytest.mark.parametrize("rows,nt", [(300, 2), (600, 2), (600, 1), (601, 3)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_keep_and_two_pass(rows, nt, symmetric):
    """Per-tensor dynamic: rows kept per thread (<= 1 MiB each) or transformed twice; same result
    for any thread count."""
    n = 1024
    x = _x(rows, n, seed=rows)
    x[rows // 2] *= 30.0
    codes, scales, zeros = run_rq(x, 1, _hk(1), None, None, False, symmetric, None, 8, nt=nt)
    y = _ref(x.numpy(), _hk(1), 1 / 32)
    check_codes(y, codes, scales, zeros, False, symmetric, None, 8, 1e-3)
    c1, s1, z1 = run_rq(x, 1, _hk(1), None, None, False, symmetric, None, 8, nt=1)
    torch.testing.assert_close(codes, c1, rtol=0, atol=0)
    torch.testing.assert_close(scales, s1, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(bits=1), "bits"),
        (dict(bits=9), "bits"),
        (dict(symmetric=False, static=0.1), "static"),
        (dict(K=5), "not K \\* 2\\^p"),
        (dict(K=0, signs=True), "signs"),
    ],
)
def test_rotate_quantize_bad_input(kw, match):
    n = 64
    x = torch.zeros(2, n)
    K = kw.get("K", 1)
    signs = _signs(n) if kw.get("signs") else None
    symmetric = kw.get("symmetric", True)
    with pytest.raises(ValueError, match=match):
        run_rq(x, K, _hk(1), signs, None, True, symmetric, kw.get("static"), kw.get("bits", 8))


@pytest.mark.parametrize("n", [64, 256, 4096, 1536, 5120])
def test_streaming_stores_same_bits(n, monkeypatch):
    """Non-temporal stores (used for large outputs; forced here) write the same values."""
    K, _ = _factorize(n)
    hk = _hk(K)
    x = _x(17, n, seed=n)
    monkeypatch.setenv("OOD_FAST_HADAMARD_STREAM", "0")
    plain = run_hadamard(x, hk, 1 / np.sqrt(n))
    rq_plain = [run_rq(x, K, hk, None, None, tok, sym, None, 8) for tok in (1, 0) for sym in (1, 0)]
    monkeypatch.setenv("OOD_FAST_HADAMARD_STREAM", "1")
    torch.testing.assert_close(run_hadamard(x, hk, 1 / np.sqrt(n)), plain, rtol=0, atol=0)
    rq_stream = [
        run_rq(x, K, hk, None, None, tok, sym, None, 8) for tok in (1, 0) for sym in (1, 0)
    ]
    for a, b in zip(rq_plain, rq_stream, strict=True):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# through the ops layer (quant-py), when it exists
# ------------------------------------------------------------------------------------------


def _ops():
    import ood_fast.ops as ops

    if not (hasattr(ops, "hadamard") and hasattr(ops, "rotate_quantize")):
        pytest.skip("ood_fast.ops.hadamard / rotate_quantize not merged yet")
    return ops


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("n", [16, 1024, 8192, 12, 1536, 5120])
def test_ops_hadamard_cpu_vs_torch(n, dtype):
    ops = _ops()
    x = _x(3 * 5, n, seed=n, dtype=DT[dtype]).reshape(3, 5, n)
    rot = ops.random_hadamard(n, seed=1)
    for signs in (None, rot.signs):
        cpu = ops.hadamard(x, signs=signs, backend="cpu")
        ref = ops.hadamard(x, signs=signs, backend="torch")
        tol = {"f32": 1e-5, "f16": 2e-3, "bf16": 1.6e-2}[dtype]
        torch.testing.assert_close(cpu.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("n", [256, 1536])
def test_ops_rotate_quantize_cpu_vs_torch(n, symmetric, granularity):
    ops = _ops()
    x = _x(2 * 7, n, seed=3).reshape(2, 7, n)
    rot = ops.random_hadamard(n, seed=2)
    sm = torch.rand(n) + 0.5
    a = ops.rotate_quantize(x, rot, sm, granularity, symmetric, backend="cpu")
    b = ops.rotate_quantize(x, rot, sm, granularity, symmetric, backend="torch")
    torch.testing.assert_close(a.scale, b.scale, rtol=1e-5, atol=0)
    assert a.codes.dtype == b.codes.dtype and a.codes.shape == b.codes.shape
    assert (a.codes.int() - b.codes.int()).abs().max() <= 1
    assert (a.codes != b.codes).float().mean() < 1e-3  # only at near-ties


# ------------------------------------------------------------------------------------------
# NaN/Inf: the kernels report them from their own pass (the ops' check_finite on cpu)
# ------------------------------------------------------------------------------------------

NONFINITE_N = [16, 256, 4096, 8192, 12, 1536, 5120, 7168]  # load pass only .. 2 radix passes, K > 1
NONFINITE_AT = {"first": (0, 0), "last": (-1, -1), "middle-row": (2, 37)}


def _poisoned(rows, n, dtype, where, value):
    x = _x(rows, n, seed=n, dtype=DT[dtype])
    r, c = NONFINITE_AT[where]
    x[r, c % n] = value
    return x


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("where", list(NONFINITE_AT))
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("n", NONFINITE_N)
def test_hadamard_reports_nonfinite(n, dtype, where, value, isa):
    K, _ = _factorize(n)
    hk = _hk(K)
    x = _x(5, n, seed=n, dtype=DT[dtype])
    code = {v: k for k, v in DT.items()}[x.dtype]
    out = torch.empty_like(x)
    assert _C.hadamard(_ptr(x), code, 5, n, K, _ptr(hk), 0, 0.1, _ptr(out), NT) is False
    x = _poisoned(5, n, dtype, where, value)
    assert _C.hadamard(_ptr(x), code, 5, n, K, _ptr(hk), 0, 0.1, _ptr(out), NT) is True
    # a zero scale (every multiplier 0) still reports: Inf * 0 = NaN
    assert _C.hadamard(_ptr(x), code, 5, n, K, _ptr(hk), 0, 0.0, _ptr(out), NT) is True


def _rq_report(x, n, K, per_token, symmetric, static, nt=NT, smooth=None):
    rows = x.shape[0]
    code = {v: k for k, v in DT.items()}[x.dtype]
    hk = _hk(K) if K else None
    codes = torch.empty(rows, n, dtype=torch.int8 if symmetric else torch.uint8)
    scales = torch.empty(rows if per_token else 1)
    zeros = None if symmetric else torch.empty(rows if per_token else 1, dtype=torch.int32)
    return _C.rotate_quantize(
        _ptr(x), code, rows, n, K, _ptr(hk), 0, _ptr(smooth), per_token, symmetric,
        float(static or 0.0), 8, _ptr(codes), _ptr(scales), _ptr(zeros), nt,
    )  # fmt: skip


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"tok{int(m[0])}-sym{int(m[1])}-st{m[2]}")
@pytest.mark.parametrize("where", list(NONFINITE_AT))
@pytest.mark.parametrize("n", [16, 4096, 8192, 1536, 7168, 100])  # 100: K = 0 only
def test_rotate_quantize_reports_nonfinite(n, where, mode, isa):
    per_token, symmetric, static = mode
    Ks = [0] if n == 100 else [0, _factorize(n)[0]]
    for K in Ks:
        for dtype, value in (("f32", float("nan")), ("f16", float("inf")), ("bf16", -float("inf"))):
            x = _x(5, n, seed=n, dtype=DT[dtype])
            assert _rq_report(x, n, K, per_token, symmetric, static) is False
            x = _poisoned(5, n, dtype, where, value)
            assert _rq_report(x, n, K, per_token, symmetric, static) is True, (K, dtype)


@pytest.mark.parametrize("rows,nt", [(300, 2), (600, 1)])  # per tensor: rows kept / read twice
def test_rotate_quantize_reports_nonfinite_per_tensor_paths(rows, nt):
    n = 1024
    for r in (0, rows // 2, rows - 1):
        x = _x(rows, n, seed=5)
        x[r, 7] = float("nan")
        for symmetric in (True, False):
            assert _rq_report(x, n, 1, False, symmetric, None, nt=nt) is True


def test_reports_finite_overflow_but_ops_do_not_raise():
    """A finite row that overflows in the transform may be reported; the op's scan clears it."""
    n = 4096
    x = torch.full((3, n), 3e38)
    out = torch.empty_like(x)
    hk = _hk(1)
    assert _C.hadamard(_ptr(x), "f32", 3, n, 1, _ptr(hk), 0, 1.0, _ptr(out), NT) is True
    ops = _ops()
    assert torch.isinf(ops.hadamard(x, 1.0, backend="cpu")).any()  # no ValueError
    ops.rotate_quantize(x, "hadamard", backend="cpu")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=str)
@pytest.mark.parametrize("where", list(NONFINITE_AT))
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("n", [16, 4096, 1536, 5120])
def test_ops_nonfinite_raise_through_cpu(n, dtype, where, value):
    """Same ValueError as the torch backend's pre-scan, for every op mode, every position."""
    ops = _ops()
    x = _poisoned(6, n, dtype, where, value).reshape(2, 3, n)
    with pytest.raises(ValueError) as want:
        ops.hadamard(x, backend="torch")
    msg = str(want.value)
    assert "non-finite" in msg
    with pytest.raises(ValueError) as got:
        ops.hadamard(x, backend="cpu")
    assert str(got.value) == msg
    y = x.clone()
    with pytest.raises(ValueError) as got:  # in place: the pre-scan path, y left untouched
        ops.hadamard(y, out=y, backend="cpu")
    assert str(got.value) == msg and torch.equal(y.isnan(), x.isnan())
    rot = ops.random_hadamard(n, seed=3)
    for kw in (
        {"rotation": rot},
        {"rotation": "hadamard", "granularity": "per_tensor"},
        {"rotation": "hadamard", "symmetric": False},
        {"rotation": rot, "static_scale": 0.1, "granularity": "per_tensor"},
        {"smooth": torch.rand(n) + 0.5},
        {},
    ):
        with pytest.raises(ValueError) as got:
            ops.rotate_quantize(x, backend="cpu", **kw)
        assert str(got.value) == msg, kw
    ops.hadamard(x, backend="cpu", check_finite=False)  # no check: no error
    ops.rotate_quantize(x, "hadamard", backend="cpu", check_finite=False)


@pytest.mark.parametrize("n", [12 * 16, 1536, 20 * 64, 5120, 28 * 128, 12 * 1024])
def test_hadamard_mix_paths(n, monkeypatch):
    """K > 1 on AVX-512: the sign-set mix (+-1 H_K), the K-FMA mix (OOD_FAST_HADAMARD_MIX=fma),
    and the FMA fallback for an H_K that is not +-1; all against float64."""
    if not _C.cpu_features()["avx512f"]:
        pytest.skip("no AVX-512 on this CPU")
    K, _ = _factorize(n)
    x, s = _x(5, n, seed=n), _signs(n)
    hk = _hk(K)
    ref = _ref(x.numpy(), hk, 0.5, s.numpy())
    sign = run_hadamard(x, hk, 0.5, signs=s)
    monkeypatch.setenv("OOD_FAST_HADAMARD_MIX", "fma")
    fma = run_hadamard(x, hk, 0.5, signs=s)
    monkeypatch.delenv("OOD_FAST_HADAMARD_MIX")
    for got in (sign, fma):
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=3e-6 * np.sqrt(n))
    h2 = (hk * np.linspace(0.5, 1.5, K * K, dtype=np.float32).reshape(K, K)).astype(np.float32)
    np.testing.assert_allclose(
        run_hadamard(x, h2, 0.5, signs=s).numpy(),
        _ref(x.numpy(), h2, 0.5, s.numpy()),
        rtol=1e-5,
        atol=3e-6 * np.sqrt(n),
    )
    # rotate_quantize takes the same mix: codes within 1 of the float64 ones
    codes, scales, _ = run_rq(x, K, hk, s, None, True, True, None, 8)
    y64 = _ref(x.numpy(), hk, 1 / np.sqrt(n), s.numpy())
    check_codes(y64, codes, scales, None, True, True, None, 8, 1e-3)
