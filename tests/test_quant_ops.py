"""rotate_quantize, dequantize, quantize_weight, int8_linear: reference and ops against numpy.

The numpy reference below is written from the contract (docs/QUANT_CONTRACT.md), independently
of ``ood_fast.reference.quant``: the rotation in float64 rounded to float32, then float32 IEEE
division and round-half-even. Without a rotation (y = x, or x / smooth, both exact in float32)
the codes must be bit-identical; with a rotation the fp32 transform rounds differently from
numpy's float64 product, so a code may differ by ±1 only where the pre-rounding value lies within
``TIE_TOL`` of a .5 tie. int8_linear is checked against an int64 numpy matmul. Compiled backends
are compared with the torch reference and skipped (with their reason) while they cannot run.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from test_hadamard_ops import backend_device, dense_h, run_backend  # tests/ is on sys.path

from ood_fast import _backend
from ood_fast import ops as public_ops
from ood_fast.ops import QuantizedTensor

href = importlib.import_module("ood_fast.reference.hadamard")
qref = importlib.import_module("ood_fast.reference.quant")

TIE_TOL = 2e-4  # code units: covers the fp32-vs-fp64 rotation error (~1e-5 relative · 127)
F32 = np.float32


# ---------------------------------------------------------------------------------------------
# numpy reference (from the contract)
# ---------------------------------------------------------------------------------------------


def np_rotate(x, rotation=None, smooth=None):
    """y as float32 numpy, x ``[..., n]``: float64 math, one rounding to float32 at the end
    (exact float32 arithmetic when there is no rotation)."""
    x32 = x.detach().cpu().float().numpy()
    n = x32.shape[-1]
    if rotation is None:
        return x32 / smooth.cpu().numpy().astype(F32) if smooth is not None else x32
    x64 = x32.astype(np.float64)
    if smooth is not None:
        x64 = (x32 / smooth.cpu().numpy().astype(F32)).astype(np.float64)
    if isinstance(rotation, torch.Tensor):
        R = rotation.double().numpy()
    else:
        R = dense_h(n)
        if isinstance(rotation, public_ops.HadamardRotation) and rotation.signs is not None:
            x64 = x64 * rotation.signs.double().numpy()  # x diag(s) H = (x · s) H
        return ((x64 @ R) / math.sqrt(n)).astype(F32)
    return (x64 @ R).astype(F32)


def np_quantize(y, per_token=True, symmetric=True, static_scale=None, bits=8):
    """(codes int64, scale float32, zero int64 | None, pre-rounding values v = y / scale)."""
    y = y.astype(F32)
    axis = -1 if per_token else None
    keep = per_token
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        if static_scale is not None:
            shape = y.shape[:-1] if per_token else ()
            scale = np.full(shape, F32(static_scale), dtype=F32)
        else:
            absmax = np.abs(y).max(axis=axis) if y.size else np.zeros(y.shape[:-1], F32)
            scale = (np.asarray(absmax, F32) / F32(qmax)).astype(F32)
        s = scale[..., None] if keep else scale
        safe = np.where(s == 0, F32(1), s).astype(F32)
        v = (y / safe).astype(F32)
        codes = np.clip(np.rint(v), -qmax, qmax)
        codes = np.where(s == 0, 0, codes).astype(np.int64)
        return codes, np.asarray(scale, F32), None, v
    levels = 2**bits - 1
    lo = np.minimum(y.min(axis=axis), F32(0)).astype(F32)
    hi = np.maximum(y.max(axis=axis), F32(0)).astype(F32)
    scale = ((hi - lo).astype(F32) / F32(levels)).astype(F32)
    safe = np.where(scale == 0, F32(1), scale).astype(F32)
    zero = np.clip(np.rint((-lo / safe).astype(F32)), 0, levels)
    zero = np.where(scale == 0, 0, zero).astype(np.int64)
    s = safe[..., None] if keep else safe
    z = zero[..., None] if keep else zero
    v = (y / s).astype(F32)
    codes = np.clip(np.rint(v) + z, 0, levels)
    codes = np.where((scale[..., None] if keep else scale) == 0, 0, codes).astype(np.int64)
    return codes, np.asarray(scale, F32), zero, v


def assert_codes(got, expect, v, exact):
    """Codes equal; with ``exact=False`` a ±1 difference only where v is within TIE_TOL of a tie."""
    got = got.detach().cpu().numpy().astype(np.int64)
    assert got.shape == expect.shape, (got.shape, expect.shape)
    diff = got - expect
    if exact:
        bad = np.argwhere(diff != 0)
        assert bad.size == 0, (
            f"{len(bad)} codes differ, first at {bad[0]}: {got[tuple(bad[0])]} vs {expect[tuple(bad[0])]} (v={v[tuple(bad[0])]})"
        )
        return
    assert np.abs(diff).max(initial=0) <= 1
    near_tie = np.abs(np.abs(v - np.trunc(v)) - 0.5) < TIE_TOL
    off = (diff != 0) & ~near_tie
    assert not off.any(), f"{int(off.sum())} codes differ away from a tie, e.g. v={v[off][:5]}"


def check_against_numpy(x, rotation=None, smooth=None, granularity="per_token", symmetric=True,
                        static_scale=None, bits=8, backend="torch"):  # fmt: skip
    q = run_backend(
        backend, public_ops.rotate_quantize, x, rotation, smooth, granularity, symmetric,
        static_scale, bits,
    )  # fmt: skip
    y = np_rotate(x, rotation, smooth)
    codes, scale, zero, v = np_quantize(
        y, granularity == "per_token", symmetric, static_scale, bits
    )
    exact = rotation is None
    assert q.codes.dtype == (torch.int8 if symmetric else torch.uint8)
    assert q.bits == bits and q.symmetric == symmetric
    lead = tuple(x.shape[:-1]) if granularity == "per_token" else ()
    assert tuple(q.scale.shape) == lead and q.scale.dtype == torch.float32
    if exact:
        np.testing.assert_array_equal(q.scale.cpu().numpy(), scale)
    else:
        np.testing.assert_allclose(q.scale.cpu().numpy(), scale, rtol=2e-6)
    if symmetric:
        assert q.zero_point is None
    else:
        assert q.zero_point.dtype == torch.int32 and tuple(q.zero_point.shape) == lead
        zdiff = np.abs(q.zero_point.cpu().numpy().astype(np.int64) - zero)
        assert zdiff.max(initial=0) <= (0 if exact else 1)
        if not exact:  # a zero point off by one shifts the whole row: compare y/scale + zero
            zero_got = q.zero_point.cpu().numpy().astype(np.int64)
            codes = (
                codes
                - (zero[..., None] if lead else zero)
                + (zero_got[..., None] if lead else zero_got)
            )
            codes = np.clip(codes, 0, 2**bits - 1)
    assert_codes(q.codes, codes, v, exact)
    return q


# ---------------------------------------------------------------------------------------------
# rotate_quantize: reference / torch backend against numpy
# ---------------------------------------------------------------------------------------------


def heavy(shape, seed=0):
    """Student-t-ish activations with a few outlier channels (so scales are uneven)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) / torch.rand(*shape, generator=g).clamp(min=0.05).sqrt()
    x[..., :: max(1, shape[-1] // 5)] *= 8
    return x


ALL_BACKENDS = ["torch", "cpu", "triton", "cuda"]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_no_rotation_bit_exact(bits, symmetric, granularity, backend):
    """Without a rotation every backend's codes and scales are bit-identical to numpy."""
    x = heavy((3, 5, 64), seed=bits).to(backend_device(backend))
    check_against_numpy(x, None, None, granularity, symmetric, None, bits, backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_smooth_bit_exact(symmetric, backend):
    device = backend_device(backend)
    x = heavy((17, 48), seed=3).to(device)
    smooth = (torch.rand(48) * 4 + 0.1).to(device)
    check_against_numpy(x, None, smooth, "per_token", symmetric, None, 8, backend)
    check_against_numpy(x, None, smooth, "per_tensor", True, 0.05, 8, backend)  # static


def test_round_half_even_at_exact_ties():
    # absmax 127 -> scale exactly 1.0; k + 0.5 values are exact ties
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, -126.5]])
    q = public_ops.rotate_quantize(x, backend="torch")
    assert q.scale.item() == 1.0
    assert q.codes.tolist() == [[127, 0, 2, 2, 0, -2, -2, 3, -126]]
    # asymmetric: lo = 0, hi = 255 -> scale 1, zero 0
    x = torch.tensor([[255.0, 0.5, 1.5, 2.5, 253.5, 0.0]])
    q = public_ops.rotate_quantize(x, symmetric=False, backend="torch")
    assert q.scale.item() == 1.0 and q.zero_point.item() == 0
    assert q.codes.tolist() == [[255, 0, 2, 2, 254, 0]]


@pytest.mark.parametrize("n", [12, 24, 48, 64, 384, 1536, 5120])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_hadamard_rotation_against_numpy(n, symmetric, granularity):
    x = heavy((2, 3, n), seed=n)
    check_against_numpy(x, "hadamard", None, granularity, symmetric)
    check_against_numpy(x, public_ops.random_hadamard(n, seed=5), None, granularity, symmetric)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("n", [12, 40, 64, 384, 5120])
def test_compiled_rotation_against_numpy(backend, n):
    """Compiled backends against the independent numpy reference too (ties only)."""
    device = backend_device(backend)
    if backend == "triton" and device.type == "cpu" and n > 384:
        pytest.skip("the Triton interpreter runs tiny shapes only")
    x = heavy((5, n), seed=n).to(device)
    smooth = (torch.rand(n) + 0.5).to(device)
    rot = public_ops.random_hadamard(n, seed=6)
    check_against_numpy(x, rot, smooth, "per_token", True, None, 8, backend)
    check_against_numpy(x, "hadamard", None, "per_tensor", False, None, 8, backend)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_rotation_smooth_static(bits):
    n = 96
    x = heavy((11, n), seed=bits)
    smooth = torch.rand(n) + 0.5
    rot = public_ops.random_hadamard(n, seed=1)
    check_against_numpy(x, rot, smooth, "per_token", True, None, bits)
    check_against_numpy(x, rot, smooth, "per_tensor", True, 0.05, bits)  # saturates
    q = public_ops.rotate_quantize(x, rot, smooth, static_scale=0.05, bits=bits)
    qmax = 2 ** (bits - 1) - 1
    assert int(q.codes.abs().max()) == qmax  # static scale small enough to saturate
    assert torch.equal(q.scale, torch.full((11,), 0.05))


def test_dense_rotation_against_numpy():
    n = 40  # any n works for a dense rotation: also one with no Hadamard (36)
    for n in (40, 36):
        R, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
        x = heavy((9, n), seed=n)
        smooth = torch.rand(n) + 0.5
        check_against_numpy(x, R, None, "per_token", True)
        check_against_numpy(x, R, smooth, "per_tensor", False)


def test_dense_rotation_is_torch_matmul_then_quantize():
    n = 64
    R = torch.randn(n, n)
    x = torch.randn(5, n)
    q = public_ops.rotate_quantize(x, R)
    expect = qref.quantize(x @ R)
    assert torch.equal(q.codes, expect.codes) and torch.equal(q.scale, expect.scale)


def test_fp16_bf16_fp64_inputs():
    x = heavy((4, 24), seed=9)
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        xd = x.to(dt)
        q = public_ops.rotate_quantize(xd, "hadamard")
        expect = public_ops.rotate_quantize(xd.float(), "hadamard")
        assert torch.equal(q.codes, expect.codes) and torch.equal(q.scale, expect.scale)


def test_zero_rows_and_empty():
    x = torch.zeros(3, 16)
    x[1] = torch.randn(16)
    q = public_ops.rotate_quantize(x, "hadamard")
    assert q.scale[0] == 0 and q.scale[2] == 0 and bool((q.codes[0] == 0).all())
    qa = public_ops.rotate_quantize(x, None, symmetric=False)
    assert qa.scale[0] == 0 and qa.zero_point[0] == 0 and bool((qa.codes[0] == 0).all())
    e = public_ops.rotate_quantize(torch.empty(0, 16), "hadamard")
    assert e.codes.shape == (0, 16) and e.scale.shape == (0,)
    e = public_ops.rotate_quantize(torch.empty(0, 16), granularity="per_tensor", symmetric=False)
    assert e.scale.item() == 0 and e.zero_point.item() == 0


def test_all_positive_and_all_negative_asymmetric():
    x = torch.rand(4, 32) + 1.0  # lo clamps to 0: zero point 0
    q = public_ops.rotate_quantize(x, symmetric=False)
    assert bool((q.zero_point == 0).all())
    x = -(torch.rand(4, 32) + 1.0)  # hi clamps to 0: zero point = levels
    q = public_ops.rotate_quantize(x, symmetric=False)
    assert bool((q.zero_point == 255).all())
    check_against_numpy(x, None, None, "per_token", False)


def test_out_buffers_reused():
    x = heavy((2, 3, 48))
    out = QuantizedTensor(
        torch.empty(2, 3, 48, dtype=torch.uint8),
        torch.empty(2, 3),
        torch.empty(2, 3, dtype=torch.int32),
        8,
        False,
    )
    q = public_ops.rotate_quantize(x, "hadamard", symmetric=False, out=out)
    assert q.codes is out.codes and q.scale is out.scale and q.zero_point is out.zero_point
    expect = public_ops.rotate_quantize(x, "hadamard", symmetric=False)
    assert torch.equal(q.codes, expect.codes) and torch.equal(q.zero_point, expect.zero_point)
    bad = out._replace(codes=torch.empty(2, 3, 48, dtype=torch.int8))
    with pytest.raises(ValueError, match="out.codes"):
        public_ops.rotate_quantize(x, "hadamard", symmetric=False, out=bad)
    with pytest.raises(ValueError, match="out.scale"):
        public_ops.rotate_quantize(
            x, "hadamard", granularity="per_tensor", symmetric=False, out=out
        )


def test_dequantize():
    x = heavy((3, 4, 64))
    for sym in (True, False):
        for gran in ("per_token", "per_tensor"):
            q = public_ops.rotate_quantize(x, "hadamard", granularity=gran, symmetric=sym)
            d = public_ops.dequantize(q)
            assert d.dtype == torch.float32 and d.shape == x.shape
            codes = q.codes.double().numpy()
            scale = q.scale.double().numpy()
            zero = 0 if sym else q.zero_point.double().numpy()
            if gran == "per_token":
                expect = (codes - (zero if sym else zero[..., None])) * scale[..., None]
            else:
                expect = (codes - zero) * scale
            np.testing.assert_allclose(d.numpy(), expect, rtol=1e-6, atol=1e-7)
            # quantization error within half a step (plus the clamp for asymmetric)
            y = public_ops.hadamard(x)
            step = (q.scale[..., None] if gran == "per_token" else q.scale).expand_as(y)
            assert bool(((d - y).abs() <= 0.5001 * step + 1e-6).all())
    with pytest.raises(TypeError):
        public_ops.dequantize((torch.zeros(2, dtype=torch.int8), torch.ones(())))
    bad = QuantizedTensor(torch.zeros(2, 3, dtype=torch.uint8), torch.ones(2), None, 8, False)
    with pytest.raises(ValueError, match="zero_point"):
        public_ops.dequantize(bad)


def test_rotate_quantize_bad_input():
    x = torch.randn(4, 48)
    rq = public_ops.rotate_quantize
    with pytest.raises(ValueError, match=r"12·2\^m"):
        rq(torch.randn(4, 36), "hadamard")
    with pytest.raises(ValueError, match="bits"):
        rq(x, bits=9)
    with pytest.raises(ValueError, match="bits"):
        rq(x, bits=1)
    with pytest.raises(TypeError, match="bits"):
        rq(x, bits=8.0)
    with pytest.raises(ValueError, match="symmetric"):
        rq(x, static_scale=0.1, symmetric=False)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="static_scale"):
            rq(x, static_scale=bad)
    with pytest.raises(ValueError, match="granularity"):
        rq(x, granularity="per_channel")
    with pytest.raises(TypeError, match="symmetric"):
        rq(x, symmetric=1)
    with pytest.raises(ValueError, match="rotation"):
        rq(x, "walsh")
    with pytest.raises(ValueError, match="n=24"):
        rq(x, public_ops.random_hadamard(24))
    with pytest.raises(ValueError, match="48, 48"):
        rq(x, torch.randn(48, 24))
    with pytest.raises(TypeError, match="rotation"):
        rq(x, 3)
    with pytest.raises(TypeError, match="floating"):
        rq(x, torch.ones(48, 48, dtype=torch.int64))
    with pytest.raises(ValueError, match="smooth"):
        rq(x, smooth=torch.ones(24))
    with pytest.raises(ValueError, match="> 0"):
        rq(x, smooth=torch.zeros(48))
    with pytest.raises(ValueError, match="smooth"):
        rq(x, smooth=torch.full((48,), float("nan")))
    with pytest.raises(TypeError, match="float"):
        rq(torch.ones(4, 48, dtype=torch.int8))
    y = x.clone()
    y[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        rq(y, "hadamard")
    with pytest.raises(ValueError, match="device"):
        rq(x, smooth=torch.ones(48, device="meta"))
    with pytest.raises(ValueError, match="device"):
        rq(x, torch.eye(48, device="meta"))


# ---------------------------------------------------------------------------------------------
# quantize_weight
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_weight_against_numpy(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(13, 70, generator=g)
    w[3] = 0
    w[5, 7] = 40.0
    qw, sw = public_ops.quantize_weight(w, bits)
    assert qw.dtype == torch.int8 and sw.dtype == torch.float32 and sw.shape == (13,)
    w32 = w.numpy()
    qmax = 2 ** (bits - 1) - 1
    scale = (np.abs(w32).max(axis=1) / F32(qmax)).astype(F32)
    np.testing.assert_array_equal(sw.numpy(), scale)
    safe = np.where(scale == 0, F32(1), scale)[:, None]
    expect = np.clip(np.rint(w32 / safe), -qmax, qmax)
    expect[3] = 0
    np.testing.assert_array_equal(qw.numpy(), expect)
    assert int(qw.abs().max()) == qmax and int(qw.min()) >= -qmax


def test_quantize_weight_percentile():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 1001, generator=g)
    w[:, 0] = 100.0  # one outlier per row
    qw, sw = public_ops.quantize_weight(w, 8, percentile=0.99)
    clip = np.quantile(np.abs(w.numpy()).astype(np.float64), 0.99, axis=1)
    np.testing.assert_allclose(sw.numpy(), clip / 127, rtol=1e-6)
    assert bool((qw[:, 0] == 127).all())  # the outlier saturates
    q1, s1 = public_ops.quantize_weight(w, 8, percentile=1.0)
    q0, s0 = public_ops.quantize_weight(w, 8)
    assert torch.equal(q1, q0) and torch.allclose(s1, s0)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="percentile"):
            public_ops.quantize_weight(w, percentile=bad)
    with pytest.raises(ValueError, match="2-D"):
        public_ops.quantize_weight(torch.randn(3, 4, 5))
    w[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        public_ops.quantize_weight(w)


# ---------------------------------------------------------------------------------------------
# int8_linear
# ---------------------------------------------------------------------------------------------


def np_int8_linear(qx, sx, qw, sw, bias=None, zx=None):
    """float64 numpy of the contract, the integer part as an exact int64 matmul."""
    a = qx.cpu().numpy().astype(np.int64)
    if zx is not None:
        a = a - zx.cpu().numpy().astype(np.int64).reshape(-1, 1)
    acc = a.reshape(-1, a.shape[-1]) @ qw.cpu().numpy().astype(np.int64).T
    out = acc.astype(np.float64) * sx.cpu().double().numpy().reshape(-1, 1)
    out = out * sw.cpu().double().numpy()[None, :]
    if bias is not None:
        out = out + bias.cpu().double().numpy()[None, :]
    return acc, out


def linear_case(M, N, K, unsigned=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if unsigned:
        qx = torch.randint(0, 256, (M, K), generator=g, dtype=torch.int64).to(torch.uint8)
        zx = torch.randint(0, 256, (M,), generator=g, dtype=torch.int32)
    else:
        qx = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int64).to(torch.int8)
        zx = None
    qw = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int64).to(torch.int8)
    sx = torch.rand(M, generator=g) * 0.1 + 1e-3
    sw = torch.rand(N, generator=g) * 0.01 + 1e-4
    bias = torch.randn(N, generator=g)
    return qx, sx, qw, sw, bias, zx


@pytest.mark.parametrize("unsigned", [False, True], ids=["int8", "uint8"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 5, 33), (64, 48, 256), (3, 130, 1000)])
def test_int8_linear_against_int64(unsigned, shape):
    M, N, K = shape
    qx, sx, qw, sw, bias, zx = linear_case(M, N, K, unsigned, seed=M + N + K)
    out = public_ops.int8_linear(qx, sx, qw, sw, bias, zx=zx, backend="torch")
    assert out.dtype == torch.float32 and out.shape == (M, N)
    acc, expect = np_int8_linear(qx, sx, qw, sw, bias, zx)
    np.testing.assert_allclose(out.double().numpy(), expect, rtol=3e-6, atol=1e-6)
    # unit scales, no bias: the output is the integer accumulator itself (exact below 2^24)
    one_x, one_w = torch.ones(M), torch.ones(N)
    exact = public_ops.int8_linear(qx, one_x, qw, one_w, zx=zx, backend="torch")
    assert np.abs(acc).max() < 2**24
    np.testing.assert_array_equal(exact.numpy().astype(np.int64), acc)


def test_int8_linear_extremes_exact():
    """Largest magnitudes: uint8 255 − zero 0 against ±127, K = 4096: exact integers."""
    K = 4096
    qx = torch.full((2, K), 255, dtype=torch.uint8)
    qw = torch.full((3, K), 127, dtype=torch.int8)
    qw[1] = -127
    zx = torch.tensor([0, 255], dtype=torch.int32)
    out = public_ops.int8_linear(qx, torch.ones(2), qw, torch.ones(3), zx=zx)
    assert out.tolist() == [[255 * 127 * K, -255 * 127 * K, 255 * 127 * K], [0.0, 0.0, 0.0]]


def test_int8_linear_scale_forms_leading_dims_and_out():
    qx, sx, qw, sw, bias, _ = linear_case(12, 9, 40, seed=4)
    _, expect = np_int8_linear(qx, sx, qw, sw, bias)
    li = public_ops.int8_linear
    for s in (sx, sx[:, None], sx.reshape(3, 4), sx.reshape(3, 4, 1)):
        out = li(qx.reshape(3, 4, 40), s, qw, sw, bias)
        assert out.shape == (3, 4, 9)
        np.testing.assert_allclose(out.reshape(12, 9).double().numpy(), expect, rtol=3e-6)
    # per-tensor scale: a python float or a 0-d tensor
    _, e1 = np_int8_linear(qx, torch.full((12,), 0.02), qw, sw, None)
    for s in (0.02, torch.tensor(0.02), torch.tensor([0.02])):
        np.testing.assert_allclose(li(qx, s, qw, sw).double().numpy(), e1, rtol=3e-6)
    buf = torch.empty(12, 9)
    assert li(qx, sx, qw, sw, bias, out=buf) is buf
    np.testing.assert_allclose(buf.double().numpy(), expect, rtol=3e-6)
    bf = li(qx, sx, qw, sw, bias, out_dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    np.testing.assert_allclose(bf.double().numpy(), expect, rtol=1e-2, atol=1e-2)
    # qx straight from rotate_quantize (asymmetric, leading dims, per-token zero points)
    x = heavy((2, 3, 40))
    q = public_ops.rotate_quantize(x, symmetric=False)
    out = li(q.codes, q.scale, qw, sw, zx=q.zero_point)
    _, e2 = np_int8_linear(q.codes.reshape(6, 40), q.scale, qw, sw, None, q.zero_point)
    np.testing.assert_allclose(out.reshape(6, 9).double().numpy(), e2, rtol=3e-6, atol=1e-6)


def test_int8_linear_bad_input():
    qx, sx, qw, sw, bias, _ = linear_case(4, 3, 16)
    li = public_ops.int8_linear
    bad = qw.clone()
    bad[1, 2] = -128
    with pytest.raises(ValueError, match="-128"):
        li(qx, sx, bad, sw)
    with pytest.raises(ValueError, match="K=16"):
        li(qx, sx, qw[:, :8], sw)
    with pytest.raises(ValueError, match="sx"):
        li(qx, sx[:3], qw, sw)
    with pytest.raises(ValueError, match="sw"):
        li(qx, sx, qw, sw[:2])
    with pytest.raises(ValueError, match="bias"):
        li(qx, sx, qw, sw, torch.ones(4))
    with pytest.raises(ValueError, match="zero points"):
        li(qx.to(torch.uint8), sx, qw, sw)
    with pytest.raises(ValueError, match="zx=None"):
        li(qx, sx, qw, sw, zx=torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        li(qx.to(torch.uint8), sx, qw, sw, zx=torch.full((4,), 300))
    with pytest.raises(TypeError, match="zx"):
        li(qx.to(torch.uint8), sx, qw, sw, zx=torch.zeros(4))
    with pytest.raises(TypeError, match="qx"):
        li(qx.float(), sx, qw, sw)
    with pytest.raises(TypeError, match="qw"):
        li(qx, sx, qw.to(torch.uint8), sw)
    with pytest.raises(TypeError, match="sx"):
        li(qx, torch.ones(4, dtype=torch.int32), qw, sw)
    nan = sx.clone()
    nan[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        li(qx, nan, qw, sw)
    with pytest.raises(ValueError, match="2-D"):
        li(qx, sx, qw[None], sw)
    with pytest.raises(TypeError, match="out_dtype"):
        li(qx, sx, qw, sw, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="out"):
        li(qx, sx, qw, sw, out=torch.empty(4, 4))
    with pytest.raises(ValueError, match="device"):
        li(qx, sx, qw.to("meta"), sw)
    with pytest.raises(ValueError, match="int32"):
        li(torch.zeros(1, 70000, dtype=torch.uint8), 1.0, torch.zeros(1, 70000, dtype=torch.int8),
           torch.ones(1), zx=0)  # fmt: skip


def test_int8_linear_weight_check_follows_in_place_edits():
    """The [-127, 127] scan is cached per weight, but an in-place edit invalidates it."""
    qx, sx, qw, sw, _, _ = linear_case(2, 3, 8)
    public_ops.int8_linear(qx, sx, qw, sw)
    qw[0, 0] = -128
    with pytest.raises(ValueError, match="-128"):
        public_ops.int8_linear(qx, sx, qw, sw)


# ---------------------------------------------------------------------------------------------
# Compiled backends against the reference (skipped, with the reason, while they cannot run)
# ---------------------------------------------------------------------------------------------

RQ_CASES = [  # (lead, n, rotation, granularity, symmetric, static, bits, smooth)
    ((7,), 64, "hadamard", "per_token", True, None, 8, False),
    ((3, 5), 24, "random", "per_token", False, None, 8, True),
    ((1,), 12, "random", "per_tensor", True, None, 4, False),
    ((9,), 40, None, "per_token", True, None, 8, True),
    ((4,), 48, "hadamard", "per_tensor", False, None, 6, False),
    ((6,), 384, "random", "per_tensor", True, 0.02, 8, True),
    ((5,), 1536, "random", "per_token", True, None, 8, False),
    ((2,), 5120, "hadamard", "per_token", False, None, 8, True),
    ((3,), 28, "dense", "per_token", True, None, 8, False),
]


def _rq_case(backend, case, dtype=torch.float32):
    lead, n, rot, gran, sym, static, bits, smooth = case
    device = backend_device(backend)
    if backend == "triton" and device.type == "cpu" and n > 384:
        pytest.skip("the Triton interpreter runs tiny shapes only")
    x = heavy((*lead, n), seed=n).to(dtype).to(device)
    if rot == "dense":
        rotation = torch.linalg.qr(torch.randn(n, n))[0].to(device)
    elif rot == "random":
        rotation = public_ops.random_hadamard(n, seed=2)
    else:
        rotation = rot
    s = (torch.rand(n) + 0.5).to(device) if smooth else None
    got = run_backend(backend, public_ops.rotate_quantize, x, rotation, s, gran, sym, static, bits)
    ref_q = public_ops.rotate_quantize(x, rotation, s, gran, sym, static, bits, backend="torch")
    torch.testing.assert_close(got.scale, ref_q.scale, rtol=2e-6, atol=0)
    if sym:
        assert got.zero_point is None
    else:
        assert got.zero_point.dtype == torch.int32
        assert int((got.zero_point - ref_q.zero_point).abs().max()) <= 1
    # codes: ±1 only at near-ties of the reference's pre-rounding value
    y = qref.rotate(x.float().cpu(), rotation if rot != "dense" else rotation.cpu(),
                    None if s is None else s.cpu())  # fmt: skip
    _, _, _, v = np_quantize(y.numpy(), gran == "per_token", sym, static, bits)
    diff = got.codes.cpu().to(torch.int64) - ref_q.codes.cpu().to(torch.int64)
    if not sym:  # a zero point off by one shifts its row
        zd = (got.zero_point - ref_q.zero_point).cpu().to(torch.int64)
        diff = diff - (zd[..., None] if gran == "per_token" else zd)
    assert int(diff.abs().max()) <= 1
    near_tie = np.abs(np.abs(v - np.trunc(v)) - 0.5) < TIE_TOL
    assert not ((diff.numpy() != 0) & ~near_tie).any()


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize(
    "case", RQ_CASES, ids=lambda c: f"{c[1]}-{c[2]}-{c[3]}-{'sym' if c[4] else 'asym'}"
)
def test_rotate_quantize_backends(backend, case):
    _rq_case(backend, case)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_rotate_quantize_backends_half(backend, dtype):
    _rq_case(backend, ((5,), 48, "random", "per_token", True, None, 8, True), dtype)
    _rq_case(backend, ((5,), 24, "hadamard", "per_tensor", False, None, 8, False), dtype)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("unsigned", [False, True], ids=["int8", "uint8"])
@pytest.mark.parametrize("shape", [(1, 1, 4), (5, 7, 33), (37, 70, 130), (256, 96, 512)])
def test_int8_linear_backends(backend, unsigned, shape):
    device = backend_device(backend)
    M, N, K = shape
    if backend == "triton" and device.type == "cpu" and M * N * K > 10**6:
        pytest.skip("the Triton interpreter runs tiny shapes only")
    qx, sx, qw, sw, bias, zx = (
        None if t is None else t.to(device) for t in linear_case(M, N, K, unsigned, seed=K)
    )
    ones = torch.ones(M, device=device), torch.ones(N, device=device)
    exact = run_backend(backend, public_ops.int8_linear, qx, ones[0], qw, ones[1], zx=zx)
    acc, expect = np_int8_linear(qx, sx, qw, sw, bias, zx)
    np.testing.assert_array_equal(exact.cpu().numpy().astype(np.int64), acc)
    out = run_backend(backend, public_ops.int8_linear, qx, sx, qw, sw, bias, zx=zx)
    np.testing.assert_allclose(out.cpu().double().numpy(), expect, rtol=3e-6, atol=1e-6)
    bf = run_backend(
        backend, public_ops.int8_linear, qx, sx, qw, sw, bias, zx=zx, out_dtype=torch.bfloat16
    )
    ref_bf = public_ops.int8_linear(qx, sx, qw, sw, bias, zx=zx, out_dtype=torch.bfloat16,
                                    backend="torch")  # fmt: skip
    torch.testing.assert_close(bf.float(), ref_bf.float(), rtol=8e-3, atol=1e-5)


def test_cpu_int8_linear_rejects_fp16_out():
    qx, sx, qw, sw, _, _ = linear_case(2, 3, 8)
    out = torch.empty(2, 3, dtype=torch.float16)
    why = _backend.reasons("int8_linear", "cpu", qx, sx, None, qw, sw, None, out)
    assert any("float16" in w or "Int8Weight" in w for w in why)


@pytest.mark.gpu
def test_torch_backend_on_cuda_tensors():
    """The reference runs on CUDA tensors too (the fallback there): same results as on CPU."""
    dev = torch.device("cuda")
    x = heavy((3, 7, 96))
    rot, smooth = public_ops.random_hadamard(96, seed=3), torch.rand(96) + 0.5
    torch.testing.assert_close(
        public_ops.hadamard(x.to(dev), signs=rot.signs.to(dev), backend="torch").cpu(),
        public_ops.hadamard(x, signs=rot.signs, backend="torch"),
        rtol=1e-5,
        atol=1e-5,
    )
    for sym in (True, False):
        q = public_ops.rotate_quantize(x.to(dev), rot, smooth.to(dev), symmetric=sym,
                                       backend="torch")  # fmt: skip
        assert q.codes.device.type == "cuda"
        e = public_ops.rotate_quantize(x, rot, smooth, symmetric=sym, backend="torch")
        assert int((q.codes.cpu().int() - e.codes.int()).abs().max()) <= 1
        torch.testing.assert_close(q.scale.cpu(), e.scale, rtol=2e-6, atol=0)
    qx, sx, qw, sw, bias, zx = linear_case(33, 17, 300, unsigned=True)
    got = public_ops.int8_linear(qx.to(dev), sx.to(dev), qw.to(dev), sw.to(dev), bias.to(dev),
                                 zx=zx.to(dev), backend="torch")  # fmt: skip
    _, expect = np_int8_linear(qx, sx, qw, sw, bias, zx)
    np.testing.assert_allclose(got.cpu().double().numpy(), expect, rtol=3e-6, atol=1e-6)


def test_int8_linear_inference_mode_weights():
    """Weights made under inference_mode carry no version counter: the cache must cope."""
    with torch.inference_mode():
        qx, sx, qw, sw, bias, _ = linear_case(4, 5, 24)
        out = public_ops.int8_linear(qx, sx, qw, sw, bias)
        again = public_ops.int8_linear(qx, sx, qw, sw, bias)
    _, expect = np_int8_linear(qx, sx, qw, sw, bias)
    np.testing.assert_allclose(out.double().numpy(), expect, rtol=3e-6, atol=1e-6)
    assert torch.equal(out, again)


def test_parameter_caches_follow_edits_and_free_their_tensors():
    """Validated parameters are cached per tensor: an in-place edit re-validates, and a
    parameter that goes away takes its cache entry with it (no leak through the cache)."""
    import gc
    import weakref

    quant_ops = importlib.import_module("ood_fast.ops.quant")
    x = torch.randn(3, 16)
    smooth = torch.rand(16) + 0.5
    public_ops.rotate_quantize(x, "hadamard", smooth)
    smooth[2] = 0.0  # in place: must be caught on the next call
    with pytest.raises(ValueError, match="> 0"):
        public_ops.rotate_quantize(x, "hadamard", smooth)
    qx, sx, qw, sw, bias, _ = linear_case(3, 4, 16)
    public_ops.int8_linear(qx, sx, qw, sw, bias)
    bias[1] = float("nan")
    with pytest.raises(ValueError, match="bias"):
        public_ops.int8_linear(qx, sx, qw, sw, bias)
    R = torch.linalg.qr(torch.randn(16, 16))[0]
    public_ops.rotate_quantize(x, R)
    refs = [weakref.ref(t) for t in (smooth, qw, sw, bias, R)]
    before = len(quant_ops._WEIGHTS)
    del smooth, qw, sw, bias, R
    gc.collect()
    assert all(r() is None for r in refs)
    assert len(quant_ops._WEIGHTS) <= before - 5
