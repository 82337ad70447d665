"""CUDA backend (``ood_fast._cuda.hadamard`` / ``rotate_quantize``) against the float64
reference transform and against ``ops.*(backend="torch")``.

GPU tests skip (with the reason) when torch sees no CUDA device or the extension did not build
(or was built before ``hadamard`` existed).

Shapes cover every layout of the kernel (csrc/cuda/hadamard.cu): several short rows per block
(n <= 256: 1, 2, 8, 12, 24, 40, 48, 64, 80, 112, 256), one row per block with shuffles only,
with the shared-memory warp stages (n = 1024 .. 32768), the K mixing with and without warp
stages (12·2^m, 20·2^m, 28·2^m up to 28672), many rows (several blocks, per-tensor reductions
over > 1024 rows), misaligned buffers (the scalar load/store path) and in place.

Checks: the transform within fp32 rounding of the float64 result (a bound from the depth of
the butterfly/mixing tree); fp16/bf16 outputs exactly the round-to-nearest-even cast of an
exact result (integer inputs); rotate_quantize scales to 1e-5 relative, codes equal to the
float64 y quantized with the kernel's own scale / zero except within 1e-3 of a tie (±1 there);
quantize-only (no rotation) bit-exact against the torch backend.

``pytest tests/test_hadamard_cuda.py -k quick`` is the selection for the device check (seconds).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from ood_fast import _extensions as _ext

_CUDA = torch.cuda.is_available()
_MOD = _ext.cuda_module()
_MOD_ERR = None if _MOD is not None else _ext._load("ood_fast._cuda")[1]
_HAS = _MOD is not None and hasattr(_MOD, "hadamard") and hasattr(_MOD, "rotate_quantize")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _CUDA, reason="torch sees no CUDA device"),
    pytest.mark.skipif(_MOD is None, reason=f"ood_fast._cuda did not import ({_MOD_ERR})"),
    pytest.mark.skipif(
        _MOD is not None and not _HAS, reason="ood_fast._cuda predates hadamard: rebuild it"
    ),
]

ref_h = importlib.import_module("ood_fast.reference.hadamard")
ops_h = importlib.import_module("ood_fast.ops.hadamard")
ops_q = importlib.import_module("ood_fast.ops.quant")

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
SMALL_NS = (1, 2, 8, 12, 24, 40, 48, 64, 80, 112, 256)
LARGE_NS = (384, 1024, 1536, 2048, 4096, 5120, 8192, 12 * 1024, 16384, 20 * 1024,
            24576, 28672, 32768)  # fmt: skip
QUICK_NS = (12, 64, 112, 1536, 4096, 5120, 32768)
TIE = 1e-3


def _stream():
    return torch.cuda.current_stream().cuda_stream


def _raw(x, n, K, signs, scale, out):
    hk = ops_h.hk_on(K, x.device)
    code = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[x.dtype]
    _MOD.hadamard(x.data_ptr(), code, x.shape[0], n, K, hk.data_ptr(),
                  0 if signs is None else signs.data_ptr(), scale, out.data_ptr(), _stream())  # fmt: skip
    return out


def _ref64(x, signs, scale):
    return ref_h.hadamard(x.double(), scale, signs=None if signs is None else signs.double())


def _tol(x, n, scale):
    K, p = ref_h.factorize(n)
    return 2.0 * (p + K + 2) * 2.0**-24 * abs(scale) * x.double().abs().sum(-1, keepdim=True)


def _check_transform(n, R, dtype, signs_on, seed=0, misalign=False, in_place=False):
    g = torch.Generator(device="cuda").manual_seed(seed * 1000 + n + R)
    dt = DTYPES[dtype]
    if misalign:  # one element off 16-byte alignment: the scalar path
        buf = torch.randn(R * n + 1, device="cuda", generator=g).to(dt)
        x = buf[1:].view(R, n)
    else:
        x = torch.randn(R, n, device="cuda", generator=g).to(dt)
    signs = ref_h.random_hadamard(n, seed=seed).signs.cuda() if signs_on else None
    scale = 1.0 / math.sqrt(n)
    want = _ref64(x, signs, scale)
    out = x if in_place else torch.empty_like(x)
    x_copy = x.clone()
    _raw(x, n, ref_h.factorize(n)[0], signs, scale, out)
    torch.cuda.synchronize()
    tol = _tol(x_copy, n, scale)
    if dt != torch.float32:
        tol = tol + (2.0**-8 if dt == torch.bfloat16 else 2.0**-11) * want.abs()
    err = (out.double() - want).abs()
    assert torch.all(err <= tol), (n, R, dtype, err.max().item())


@pytest.mark.parametrize("dtype", tuple(DTYPES))
@pytest.mark.parametrize("n", SMALL_NS + LARGE_NS)
def test_transform_vs_float64(n, dtype):
    for R, signs_on in ((1, False), (3, True), (257, True)):
        _check_transform(n, R, dtype, signs_on)


@pytest.mark.parametrize("n", QUICK_NS)
def test_quick_transform(n):
    for dtype in DTYPES:
        _check_transform(n, 5, dtype, True)


@pytest.mark.parametrize("n", (12, 64, 112, 1024, 5120))
def test_quick_misaligned_and_in_place(n):
    for dtype in ("f32", "bf16"):
        _check_transform(n, 7, dtype, True, misalign=True)
        _check_transform(n, 7, dtype, True, in_place=True)


@pytest.mark.parametrize("dtype", ("f16", "bf16"))
@pytest.mark.parametrize("n", (24, 112, 1024, 5120))
def test_quick_lowp_exact_cast(n, dtype):
    """Integer inputs, scale 1/4: exact fp32 result; the output cast must be RNE exactly."""
    dt = DTYPES[dtype]
    g = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randint(-100, 101, (4, n), device="cuda", generator=g).to(dt)
    want = _ref64(x, None, 0.25).to(dt)
    out = _raw(x, n, ref_h.factorize(n)[0], None, 0.25, torch.empty_like(x))
    assert torch.equal(out, want)


def test_quick_ops_hadamard_cuda_vs_torch():
    for n in (24, 4096, 5120):
        x = torch.randn(2, 3, n, device="cuda")
        got = ops_h.hadamard(x, backend="cuda")
        ref = ops_h.hadamard(x, backend="torch")
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    x = torch.randn(2, 24, device="cuda")
    hk = ops_h.hk_on(12, x.device)
    with pytest.raises(ValueError):
        _MOD.hadamard(x.data_ptr(), "f64", 2, 24, 12, hk.data_ptr(), 0, 1.0, x.data_ptr(), 0)
    with pytest.raises(ValueError):
        _MOD.hadamard(x.data_ptr(), "f32", 2, 24, 3, hk.data_ptr(), 0, 1.0, x.data_ptr(), 0)
    with pytest.raises(ValueError):
        _MOD.hadamard(x.data_ptr(), "f32", 2, 36, 12, hk.data_ptr(), 0, 1.0, x.data_ptr(), 0)
    with pytest.raises(ValueError):
        _MOD.hadamard(x.data_ptr(), "f32", 1, 65536, 1, 0, 0, 1.0, x.data_ptr(), 0)
    with pytest.raises(ValueError):
        cpu = torch.randn(2, 24)
        _MOD.hadamard(cpu.data_ptr(), "f32", 2, 24, 12, hk.data_ptr(), 0, 1.0, cpu.data_ptr(), 0)


# ---------------------------------------------------------------------------------------------
# rotate_quantize through ops: cuda vs torch
# ---------------------------------------------------------------------------------------------

MODES = [(g, s) for g in ("per_token", "per_tensor") for s in (True, False)]
MODE_IDS = [f"{g}-{'sym' if s else 'asym'}" for g, s in MODES]


def _near_tie(v):
    return ((v - v.floor()).abs() - 0.5).abs() < TIE


def _check_rq(x, rotation, smooth, granularity, symmetric, static_scale, bits):
    kw = dict(rotation=rotation, smooth=smooth, granularity=granularity, symmetric=symmetric,
              static_scale=static_scale, bits=bits)  # fmt: skip
    got = ops_q.rotate_quantize(x, backend="cuda", **kw)
    ref = ops_q.rotate_quantize(x, backend="torch", **kw)
    assert got.codes.dtype == ref.codes.dtype and got.codes.shape == ref.codes.shape
    assert got.scale.shape == ref.scale.shape
    if rotation is None:
        assert torch.equal(got.codes, ref.codes) and torch.equal(got.scale, ref.scale)
        if not symmetric:
            assert torch.equal(got.zero_point, ref.zero_point)
        return
    torch.testing.assert_close(got.scale, ref.scale, rtol=1e-5, atol=0)
    n = x.shape[-1]
    # the float64 y, quantized with the kernel's own scale / zero
    y = x.double() if smooth is None else x.double() / smooth.double()
    y = y.float().double()  # the kernel divides in fp32
    signs = rotation.signs if isinstance(rotation, ref_h.HadamardRotation) else None
    y = ref_h.hadamard(y, 1.0 / math.sqrt(n), signs=None if signs is None else signs.double())
    s = got.scale.double()
    s = s.unsqueeze(-1) if s.dim() else s
    safe = torch.where(s == 0, torch.ones_like(s), s)
    v = y / safe
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        exp = v.round().clamp(-qmax, qmax)
        zero = 0
    else:
        L = 2**bits - 1
        zero = got.zero_point.double()
        zero = zero.unsqueeze(-1) if zero.dim() else zero
        exp = (v.clamp(-L, L).round() + zero).clamp(0, L)
    exp = torch.where(s == 0, torch.zeros_like(exp), exp)
    d = (got.codes.double() - exp).abs()
    assert d.max() <= 1
    assert not ((d == 1) & ~_near_tie(v)).any(), "codes differ away from a tie"


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("dtype", tuple(DTYPES))
@pytest.mark.parametrize("n", SMALL_NS + LARGE_NS)
def test_rotate_quantize_vs_torch(n, dtype, mode):
    granularity, symmetric = mode
    g = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(3, 5, n, device="cuda", generator=g)
    x[..., n // 3] *= 30  # an outlier channel
    x = x.to(DTYPES[dtype])
    smooth = torch.rand(n, device="cuda", generator=g) + 0.5
    rot = ref_h.random_hadamard(n, seed=n)
    for rotation, sm, bits in ((None, None, 8), ("hadamard", smooth, 8), (rot, None, 4)):
        _check_rq(x, rotation, sm, granularity, symmetric, None, bits)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_quick_rotate_quantize(mode):
    granularity, symmetric = mode
    for n in QUICK_NS:
        x = torch.randn(4, n, device="cuda")
        _check_rq(x, ref_h.random_hadamard(n, seed=2), None, granularity, symmetric, None, 8)
        _check_rq(x.to(torch.bfloat16), "hadamard", torch.rand(n, device="cuda") + 0.5,
                  granularity, symmetric, None, 4)  # fmt: skip
        _check_rq(x, None, None, granularity, symmetric, None, 8)


def test_quick_many_rows_per_tensor_and_static():
    """> 1024 rows: multi-block statistics and the one-block reduction; static scales."""
    for n in (12, 256, 4096):
        x = torch.randn(3000, n, device="cuda")
        for sym in (True, False):
            _check_rq(x, "hadamard", None, "per_tensor", sym, None, 8)
        for gran in ("per_token", "per_tensor"):
            _check_rq(x, "hadamard", None, gran, True, 0.01, 8)
