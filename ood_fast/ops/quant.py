"""Online activation quantization (rotate → quantize in one pass) and the int8 linear layer.

Math (all backends; ``reference.quant`` is the readable version, docs/QUANT_CONTRACT.md the
contract): ``y = hadamard((x / smooth) · signs) / sqrt(n)`` (or ``(x / smooth) @ R`` for a dense
R, or no rotation), computed in fp32; then symmetric int8 codes ``clamp(rint(y / scale), ±qmax)``
with ``scale = absmax / qmax`` per token or per tensor (or a static scale), or asymmetric uint8
codes with an int32 zero point. ``int8_linear`` multiplies such codes by per-channel int8
weights with an exact integer accumulation and the dequantization fused into its epilogue.

Public entry points: ``rotate_quantize``, ``dequantize``, ``quantize_weight``, ``int8_linear``
and ``QuantizedTensor``.
"""

from __future__ import annotations

import math
import numbers
import weakref

import torch

from .. import _backend
from .. import _extensions as ext
from .._validate import as_tensor
from ..reference import quant as ref
from ..reference.hadamard import HadamardRotation, factorize
from ..reference.quant import GRANULARITIES, QuantizedTensor
from .hadamard import (
    DTYPE_CODE,
    FLOAT_DTYPES,
    KERNEL_DTYPES,
    check_out,
    check_rows,
    hk_on,
    reports_nonfinite,
    scan_finite,
)

__all__ = ["QuantizedTensor", "dequantize", "int8_linear", "quantize_weight", "rotate_quantize"]

BITS = range(2, 9)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The int32 accumulator of a K-term dot product of codes is exact while
# K · max|qx − zx| · max|qw| < 2^31: |qx − zx| <= 255 (uint8) or 128 (int8), |qw| <= 127.
_INT32_MAX = 2**31 - 1


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise TypeError(f"bits must be an integer, got {bits!r}")
    bits = int(bits)
    if bits not in BITS:
        raise ValueError(f"bits={bits} out of range: need 2 <= bits <= 8")
    return bits


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _check_vector(v, name: str, n: int, device, positive: bool = False) -> torch.Tensor:
    """A finite floating ``[n]`` vector on ``device``, as float32 contiguous."""
    v = as_tensor(v, name)
    if v.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating tensor, got {v.dtype}")
    if v.shape != (n,):
        raise ValueError(f"{name}: expected shape [{n}], got {tuple(v.shape)}")
    if v.device != torch.device(device):
        raise ValueError(f"{name} is on {v.device} but x is on {device}; move it to x's device")
    v = v.to(torch.float32).contiguous()
    scan_finite(v, name)
    if positive and bool((v <= 0).any()):
        raise ValueError(f"{name}: every entry must be > 0 (got min {float(v.min())})")
    return v


def _rotation_spec(rotation, n: int, device):
    """``(K, signs, dense)``: K = 0 for no Hadamard; dense a float32 ``[n, n]`` or None."""
    if rotation is None:
        return 0, None, None
    if isinstance(rotation, str):
        if rotation != "hadamard":
            raise ValueError(
                f"rotation: unknown spec {rotation!r}; expected None, 'hadamard', a "
                "HadamardRotation or a dense [n, n] matrix"
            )
        return factorize(n)[0], None, None
    if isinstance(rotation, HadamardRotation):
        if rotation.n != n:
            raise ValueError(f"rotation is for n={rotation.n} but x has n={n} features")
        return rotation.K, rotation.signs_on(device), None
    if isinstance(rotation, torch.Tensor):
        if not rotation.is_floating_point():
            raise TypeError(f"rotation: a dense rotation must be floating, got {rotation.dtype}")
        if rotation.shape != (n, n):
            raise ValueError(
                f"rotation: a dense rotation must be [{n}, {n}], got {tuple(rotation.shape)}"
            )
        if rotation.device != torch.device(device):
            raise ValueError(
                f"rotation is on {rotation.device} but x is on {device}; move it to x's device"
            )

        def build(r):
            R = r.to(torch.float32).contiguous()
            scan_finite(R, "rotation")
            return R

        return 0, None, _cached(rotation, ("rotation", str(device)), build)
    raise TypeError(
        "rotation: expected None, 'hadamard', a HadamardRotation or a dense [n, n] tensor, "
        f"got {type(rotation).__name__}"
    )


def _quant_buffers(out, shape, lead, per_token: bool, symmetric: bool, device):
    """(codes, scale, zero) to write into: ``out``'s after checking them, else fresh ones."""
    codes_dtype = torch.int8 if symmetric else torch.uint8
    scale_shape = lead if per_token else ()
    if out is None:
        codes = torch.empty(shape, dtype=codes_dtype, device=device)
        scale = torch.empty(scale_shape, dtype=torch.float32, device=device)
        zero = None if symmetric else torch.empty(scale_shape, dtype=torch.int32, device=device)
        return codes, scale, zero
    if not isinstance(out, QuantizedTensor):
        raise TypeError(f"out: expected a QuantizedTensor, got {type(out).__name__}")
    codes = check_out(out.codes, shape, codes_dtype, device, "out.codes")
    scale = check_out(out.scale, scale_shape, torch.float32, device, "out.scale")
    if symmetric:
        zero = None
    elif out.zero_point is None:
        raise ValueError("out.zero_point: asymmetric quantization needs an int32 buffer")
    else:
        zero = check_out(out.zero_point, scale_shape, torch.int32, device, "out.zero_point")
    return codes, scale, zero


def rotate_quantize(
    x: torch.Tensor,
    rotation: HadamardRotation | str | torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    granularity: str = "per_token",
    symmetric: bool = True,
    static_scale: float | None = None,
    bits: int = 8,
    *,
    out: QuantizedTensor | None = None,
    check_finite: bool = True,
    backend: str | None = None,
) -> QuantizedTensor:
    """Rotate (optionally smooth) and quantize ``x`` along its last dimension, in one pass.

    Args:
        x: ``[..., n]`` float32/float16/bfloat16 (float64 is converted to float32 first).
        rotation: None; ``"hadamard"`` (plain, orthonormal); a ``HadamardRotation`` (random
            signs) for this n; or a dense floating ``[n, n]`` R applied as ``y = x' @ R`` (a
            torch fp32 matmul, then a quantize-only kernel).
        smooth: ``[n]`` > 0 or None: ``x' = x / smooth`` (the weights were multiplied by it).
        granularity: ``"per_token"`` (one scale per row of the last dim) or ``"per_tensor"``.
        symmetric: int8 codes around 0 (True) or uint8 codes with a zero point (False).
        static_scale: a finite float > 0 used as the scale (symmetric only; codes saturate), or
            None for the dynamic absmax scale.
        bits: 2..8.
        out: a QuantizedTensor whose (contiguous) buffers receive the result.
        check_finite: raise ValueError when x holds NaN/Inf. The cpu backend detects them
            during its own pass (no extra read) and x is scanned only when it reports some,
            *after* the call: ``out``'s buffers then hold garbage. Other backends and a dense
            rotation scan x first (one extra read). False skips the check (NaN/Inf then give
            unspecified codes).
        backend: ``"cpu"``, ``"triton"``, ``"cuda"``, ``"torch"`` or None (automatic).

    Returns:
        ``QuantizedTensor(codes [..., n], scale [...] or [], zero_point or None, bits, symmetric)``.

    Raises:
        ValueError: unsupported n for a Hadamard rotation, NaN/Inf, shape/device mismatches,
            bits out of range, static_scale with asymmetric quantization or not > 0.
        TypeError: wrong argument types.
    """
    x = check_rows(x, "x")
    n = x.shape[-1]
    device = x.device
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    per_token = granularity == "per_token"
    _check_bool(symmetric, "symmetric")
    bits = _check_bits(bits)
    if static_scale is not None:
        if not symmetric:
            raise ValueError("static_scale is only supported with symmetric=True")
        if isinstance(static_scale, bool) or not isinstance(static_scale, numbers.Real):
            raise TypeError(f"static_scale must be a number or None, got {static_scale!r}")
        static_scale = float(static_scale)
        if not (math.isfinite(static_scale) and static_scale > 0):
            raise ValueError(f"static_scale must be finite and > 0, got {static_scale}")
    K, signs, dense = _rotation_spec(rotation, n, device)
    if smooth is not None:
        smooth = _cached(
            smooth,
            ("smooth", n, str(device)),
            lambda v: _check_vector(v, "smooth", n, device, positive=True),
        )
    codes, scale, zero = _quant_buffers(out, x.shape, x.shape[:-1], per_token, symmetric, device)
    x_in = x  # what a NaN/Inf message indexes
    if check_finite and dense is not None:  # the matmul could hide nothing, but BLAS is not ours
        scan_finite(x, "x")
        check_finite = False
    if x.dtype == torch.float64:
        x = x.to(torch.float32)
    if dense is not None:
        y = x.to(torch.float32)
        if smooth is not None:
            y = y / smooth
        x, smooth = y @ dense, None  # the dense rotation in torch, then quantize only (K = 0)
    result = QuantizedTensor(codes, scale, zero, bits, symmetric)
    if x.numel() == 0:  # nothing to scan either
        scale.zero_()
        if zero is not None:
            zero.zero_()
        return result
    rows = x.reshape(-1, n) if x.is_contiguous() else x.contiguous().reshape(-1, n)
    R = rows.shape[0]
    args = (
        rows,
        K,
        signs,
        smooth,
        per_token,
        symmetric,
        -1.0 if static_scale is None else static_scale,
        bits,
        codes.view(R, n),
        scale.view(R if per_token else 1),
        None if zero is None else zero.view(R if per_token else 1),
    )
    name = _backend.select("rotate_quantize", *args, backend=backend)
    after = check_finite and name in reports_nonfinite
    if check_finite and not after:
        scan_finite(x_in, "x")
    maybe_bad = _backend.call("rotate_quantize", *args, backend=name)
    if after and maybe_bad:  # NaN/Inf, or a finite row that overflowed: the scan decides
        scan_finite(x_in, "x")
    return result


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """``(codes − zero_point) · scale`` as float32 ``[..., n]``."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"expected a QuantizedTensor, got {type(q).__name__}")
    want = torch.int8 if q.symmetric else torch.uint8
    if q.codes.dtype != want:
        raise TypeError(f"codes: expected {want} for symmetric={q.symmetric}, got {q.codes.dtype}")
    if q.scale.shape not in (q.codes.shape[:-1], torch.Size([])):
        raise ValueError(
            f"scale: expected shape {tuple(q.codes.shape[:-1])} or [], got {tuple(q.scale.shape)}"
        )
    if not q.symmetric and (q.zero_point is None or q.zero_point.shape != q.scale.shape):
        raise ValueError("zero_point: asymmetric codes need a zero point shaped like scale")
    return ref.dequantize(q)


def quantize_weight(
    w: torch.Tensor, bits: int = 8, percentile: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization of a weight ``[N, K]`` (offline, torch).

    Args:
        w: ``[N, K]`` floating, finite (quantized in float32).
        bits: 2..8 (``qmax = 2^(bits−1) − 1``).
        percentile: None (clip at each row's absmax) or a fraction in (0, 1]: clip at that
            quantile of the row's |w|; larger values saturate.

    Returns:
        ``(qw int8 [N, K], sw float32 [N])``, ``w ≈ qw · sw[:, None]``, codes in ``[−qmax, qmax]``.
    """
    w = check_rows(w, "w")
    if w.dim() != 2:
        raise ValueError(f"w: expected a 2-D [N, K] weight, got shape {tuple(w.shape)}")
    bits = _check_bits(bits)
    if percentile is not None:
        if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real):
            raise TypeError(f"percentile must be a number in (0, 1] or None, got {percentile!r}")
        percentile = float(percentile)
        if not 0 < percentile <= 1:
            raise ValueError(f"percentile must be a fraction in (0, 1], got {percentile}")
    scan_finite(w, "w")
    return ref.quantize_weight(w, bits, percentile)


# --- int8_linear -------------------------------------------------------------------------------

# Per-tensor caches (the [-127, 127] scan of a weight, validated/converted parameter vectors,
# packed compiled weights), keyed by the tensor's identity. An entry lives exactly as long as
# its tensor (a weakref callback drops it) and is rebuilt when the tensor is edited in place
# (its version counter moves) or re-pointed (``.data = ...``).
_WEIGHTS: dict[int, tuple[weakref.ref, tuple, dict]] = {}


def _version(w: torch.Tensor) -> int:
    try:
        return w._version
    except RuntimeError:  # inference tensors track no version: they cannot be edited in place
        return -1


def weight_cache(w: torch.Tensor) -> dict:
    """A dict living as long as ``w`` is alive and unmodified (same storage and version)."""
    stamp = (w.data_ptr(), _version(w), tuple(w.shape), w.dtype, str(w.device))
    key = id(w)
    entry = _WEIGHTS.get(key)
    if entry is None or entry[0]() is not w or entry[1] != stamp:
        ref = weakref.ref(w, lambda _, key=key: _WEIGHTS.pop(key, None))
        entry = (ref, stamp, {})
        _WEIGHTS[key] = entry
    return entry[2]


_SELF = object()  # cached "the result is the tensor itself": never a strong ref to the key


def _cached(t, key, build):
    """``build(t)`` once per (tensor, key) while t is unmodified; plain call for non-tensors.

    ``build`` must return ``t`` itself or a fresh tensor (not a view of t): a cached view or t
    itself would keep t alive forever through the cache."""
    if not isinstance(t, torch.Tensor):
        return build(t)
    cache = weight_cache(t)
    if key not in cache:
        value = build(t)
        cache[key] = _SELF if value is t else value
    value = cache[key]
    return t if value is _SELF else value


def _per_row(v, name: str, M: int, lead, device, dtype) -> torch.Tensor:
    """A per-row quantity (scalar, ``[M]``, ``[M, 1]``, ``lead`` or ``lead + [1]``) as ``[M]``."""
    if isinstance(v, numbers.Number) and not isinstance(v, bool):
        v = torch.tensor(v, device=device)
    v = as_tensor(v, name)
    if v.device != torch.device(device):
        raise ValueError(f"{name} is on {v.device} but qx is on {device}; move it to qx's device")
    shapes = {(), (1,), (M,), (M, 1), tuple(lead), (*lead, 1)}
    if tuple(v.shape) not in shapes or (v.numel() != M and v.numel() != 1):
        raise ValueError(
            f"{name}: expected a scalar, [M={M}], [M, 1] or the leading shape {tuple(lead)} of "
            f"qx, got {tuple(v.shape)}"
        )
    return v.reshape(-1).to(dtype).expand(M).contiguous()


def int8_linear(
    qx: torch.Tensor,
    sx,
    qw: torch.Tensor,
    sw: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    zx=None,
    out_dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``out[m, n] = sx[m] · sw[n] · Σ_k (qx[m, k] − zx[m]) · qw[n, k] + bias[n]``.

    Args:
        qx: ``[..., K]`` int8 (symmetric codes) or uint8 (asymmetric codes, needs ``zx``);
            leading dims are flattened to M.
        sx: activation scales, float: a scalar (per tensor), ``[M]``, ``[M, 1]`` or qx's
            leading shape (per token).
        qw: ``[N, K]`` int8 weight codes in [−127, 127] (−128 is rejected: symmetric codes never
            produce it and kernels may rely on its absence).
        sw: ``[N]`` float per-output-channel weight scales.
        bias: ``[N]`` float or None.
        zx: zero points, integer, shaped like ``sx`` (values in [0, 255]); required for uint8
            qx and forbidden for int8 qx.
        out_dtype: float32, bfloat16 or float16 (the cpu kernel: float32/bfloat16).
        out: a contiguous ``[..., N]`` tensor of ``out_dtype`` to write into.
        backend: ``"cpu"``, ``"triton"``, ``"torch"`` or None (automatic).

    Returns:
        ``[..., N]`` of out_dtype. The integer sum is exact (int32), the epilogue fp32.

    Raises:
        ValueError: shape/device mismatches, qw holding −128, zx misuse or out of range, NaN/Inf
            scales or bias, K so large that the int32 accumulator could overflow.
        TypeError: wrong dtypes.
    """
    qx, qw = as_tensor(qx, "qx"), as_tensor(qw, "qw")
    if qx.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"qx: expected int8 or uint8 codes, got {qx.dtype}")
    if qw.dtype != torch.int8:
        raise TypeError(f"qw: expected int8 weight codes, got {qw.dtype}")
    if qx.dim() < 1:
        raise ValueError("qx: expected shape [..., K], got a scalar")
    if qw.dim() != 2:
        raise ValueError(f"qw: expected a 2-D [N, K] weight, got shape {tuple(qw.shape)}")
    device = qx.device
    if qw.device != device:
        raise ValueError(f"qw is on {qw.device} but qx is on {device}; move it to qx's device")
    N, K = qw.shape
    if qx.shape[-1] != K:
        raise ValueError(
            f"shape mismatch: qx has K={qx.shape[-1]} (shape {tuple(qx.shape)}) but qw has "
            f"K={K} (shape {tuple(qw.shape)})"
        )
    if K == 0 or N == 0:
        raise ValueError(f"qw is empty (shape {tuple(qw.shape)}): need N >= 1 and K >= 1")
    lead = qx.shape[:-1]
    M = math.prod(lead)
    unsigned = qx.dtype == torch.uint8
    bound = K * (255 if unsigned else 128) * 127
    if bound > _INT32_MAX:
        raise ValueError(
            f"K={K} is too large for an exact int32 accumulation of {qx.dtype} × int8 codes "
            f"(K · {255 if unsigned else 128} · 127 = {bound} > 2^31 − 1)"
        )
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    if isinstance(sx, torch.Tensor) and not sx.is_floating_point():
        raise TypeError(f"sx: expected floating scales, got {sx.dtype}")
    sx = _per_row(sx, "sx", M, lead, device, torch.float32)
    scan_finite(sx, "sx")
    if unsigned:
        if zx is None:
            raise ValueError("uint8 (asymmetric) qx needs its zero points zx")
        zx_t = as_tensor(zx, "zx") if not isinstance(zx, numbers.Number) else zx
        if isinstance(zx_t, torch.Tensor) and (
            zx_t.is_floating_point() or zx_t.dtype == torch.bool
        ):
            raise TypeError(f"zx: expected integer zero points, got {zx_t.dtype}")
        zx = _per_row(zx_t, "zx", M, lead, device, torch.int64)
        if M and (int(zx.min()) < 0 or int(zx.max()) > 255):
            raise ValueError(
                f"zx: zero points must lie in [0, 255], got [{int(zx.min())}, {int(zx.max())}]"
            )
        zx = zx.to(torch.int32)
    elif zx is not None:
        raise ValueError("int8 (symmetric) qx takes no zero points: pass zx=None")
    sw = _cached(sw, ("sw", N, str(device)), lambda v: _check_weight_vector(v, "sw", N, device))
    if bias is not None:
        bias = _cached(
            bias, ("bias", N, str(device)), lambda v: _check_weight_vector(v, "bias", N, device)
        )
    cache = weight_cache(qw)
    if "range_ok" not in cache:
        if bool((qw == -128).any()):
            raise ValueError(
                "qw holds -128: int8 weight codes must lie in [-127, 127] (int8 range misuse; "
                "quantize with quantize_weight, whose codes are symmetric)"
            )
        cache["range_ok"] = True
    out_shape = (*lead, N)
    if out is not None:
        out = check_out(out, out_shape, out_dtype, device)
        out2 = out.view(M, N)
    else:
        out2 = torch.empty(M, N, dtype=out_dtype, device=device)
    if M:
        _backend.call(
            "int8_linear",
            qx.reshape(M, K).contiguous(),
            sx,
            zx,
            qw.contiguous(),
            sw,
            bias,
            out2,
            backend=backend,
        )
    return out if out is not None else out2.view(out_shape)


def _check_weight_vector(v, name: str, N: int, device) -> torch.Tensor:
    v = as_tensor(v, name)
    if not v.is_floating_point():
        raise TypeError(f"{name}: expected a floating [N] tensor, got {v.dtype}")
    if v.shape != (N,):
        raise ValueError(f"{name}: expected shape [N={N}], got {tuple(v.shape)}")
    if v.device != torch.device(device):
        raise ValueError(f"{name} is on {v.device} but qx is on {device}; move it to qx's device")
    v = v.to(torch.float32).contiguous()
    scan_finite(v, name)
    return v


# ---------------------------------------------------------------------------------------------
# Backends. Contracts (inputs validated, contiguous, on one device, at least one row):
#   rotate_quantize(x [R, n] f32/f16/bf16, K (0: no rotation), signs f32 [n] | None,
#       smooth f32 [n] | None, per_token, symmetric, static_scale (<= 0: dynamic), bits,
#       codes [R, n] int8/uint8, scales f32 [R] or [1], zeros i32 [R]/[1] | None) -> fills the
#       buffers; the backends in ``reports_nonfinite`` return a bool (True: some x value may be
#       NaN/Inf, always when one is; False: all finite), the others anything
#   int8_linear(qx [M, K] i8/u8, sx f32 [M], zx i32 [M] | None, qw i8 [N, K], sw f32 [N],
#       bias f32 [N] | None, out [M, N] f32/bf16/f16) -> out
# ---------------------------------------------------------------------------------------------


@_backend.register("rotate_quantize", "torch")
def _torch_rq(x, K, signs, smooth, per_token, symmetric, static_scale, bits, codes, scales, zeros):
    y = x.to(torch.float32)
    if smooth is not None:
        y = y / smooth
    if K:
        from ..reference.hadamard import hadamard

        y = hadamard(y, signs=signs)
    q = ref.quantize(y, per_token, symmetric, static_scale if static_scale > 0 else None, bits)
    codes.copy_(q.codes)
    scales.copy_(q.scale.reshape(scales.shape))
    if zeros is not None:
        zeros.copy_(q.zero_point.reshape(zeros.shape))


@_backend.register("int8_linear", "torch")
def _torch_linear(qx, sx, zx, qw, sw, bias, out):
    out.copy_(ref.int8_linear(qx, sx, qw, sw, bias, zx, out.dtype))
    return out


def _rq_check(backend: str, symbol: str):
    def check(x, *args) -> list[str]:
        why = ext.missing_symbol(backend, symbol)
        if x.dtype not in KERNEL_DTYPES:
            why.append(
                f"compiled quantization kernels take float32/float16/bfloat16, got {x.dtype}"
            )
        return why

    return check


def _rq_args(x, K, signs, smooth):
    hk = hk_on(K, x.device) if K else None
    return (
        x.data_ptr(), DTYPE_CODE[x.dtype], x.shape[0], x.shape[1], K,
        0 if hk is None else hk.data_ptr(),
        0 if signs is None else signs.data_ptr(),
        0 if smooth is None else smooth.data_ptr(),
    ), hk  # fmt: skip


@_backend.register("rotate_quantize", "cpu", check=_rq_check("cpu", "rotate_quantize"))
def _cpu_rq(x, K, signs, smooth, per_token, symmetric, static_scale, bits, codes, scales, zeros):
    args, _hk = _rq_args(x, K, signs, smooth)
    return bool(ext.cpu_module().rotate_quantize(
        *args, bool(per_token), bool(symmetric), float(static_scale), int(bits),
        codes.data_ptr(), scales.data_ptr(), 0 if zeros is None else zeros.data_ptr(),
        ext.num_threads(),
    ))  # fmt: skip


@_backend.register("rotate_quantize", "cuda", check=_rq_check("cuda", "rotate_quantize"))
def _cuda_rq(x, K, signs, smooth, per_token, symmetric, static_scale, bits, codes, scales, zeros):
    args, _hk = _rq_args(x, K, signs, smooth)
    ext.cuda_module().rotate_quantize(
        *args, bool(per_token), bool(symmetric), float(static_scale), int(bits),
        codes.data_ptr(), scales.data_ptr(), 0 if zeros is None else zeros.data_ptr(),
        torch.cuda.current_stream(x.device).cuda_stream,
    )  # fmt: skip


@_backend.register("rotate_quantize", "triton", check=_rq_check("triton", "quant"))
def _triton_rq(x, K, signs, smooth, per_token, symmetric, static_scale, bits, codes, scales, zeros):
    from ..kernels import quant as tk  # imports triton: only when this backend runs

    hk = hk_on(K, x.device) if K else None
    # the kernel writes straight into the op's buffers (flat views of them)
    bufs = (codes.view(x.shape), scales.view(-1), None if zeros is None else zeros.view(-1))
    tk.rotate_quantize(x, K, hk, signs, smooth, per_token, symmetric, static_scale, bits, out=bufs)


def _linear_check(backend: str, symbol: str, out_dtypes):
    def check(qx, sx, zx, qw, sw, bias, out) -> list[str]:
        why = ext.missing_symbol(backend, symbol)
        if out.dtype not in out_dtypes:
            names = "/".join(str(d).replace("torch.", "") for d in out_dtypes)
            why.append(f"the {backend} int8_linear kernel writes {names}, not {out.dtype}")
        return why

    return check


@_backend.register(
    "int8_linear",
    "cpu",
    check=_linear_check("cpu", "Int8Weight", (torch.float32, torch.bfloat16)),
)
def _cpu_linear(qx, sx, zx, qw, sw, bias, out):
    cache = weight_cache(qw)
    packed = cache.get("cpu")
    if packed is None:  # packs qw once (VNNI / AMX layout); the object owns its copy
        packed = cache["cpu"] = ext.cpu_module().Int8Weight(qw.data_ptr(), *qw.shape)
    packed.forward(
        qx.data_ptr(), qx.dtype == torch.uint8, qx.shape[0], sx.data_ptr(),
        0 if zx is None else zx.data_ptr(), sw.data_ptr(),
        0 if bias is None else bias.data_ptr(), out.data_ptr(), out.dtype == torch.bfloat16,
        ext.num_threads(),
    )  # fmt: skip
    return out


@_backend.register("int8_linear", "triton", check=_linear_check("triton", "quant", OUT_DTYPES))
def _triton_linear(qx, sx, zx, qw, sw, bias, out):
    from ..kernels import quant as tk  # imports triton: only when this backend runs

    return tk.int8_linear(qx, sx, zx, qw, sw, bias, out.dtype, out=out)  # writes into out
