"""Triton backend of ``rotate_quantize`` and ``int8_linear`` (``docs/QUANT_CONTRACT.md``).

``rotate_quantize(x [R, n], K, hk, signs, smooth, per_token, symmetric, static_scale, bits,
out=None) -> (codes [R, n], scales, zeros | None)``

    x' = x / smooth                     (fp32 IEEE division, when smooth is given)
    y  = hadamard(x', 1/sqrt(n), signs) (K >= 1; K = 0: y = x', quantize only)
    symmetric:  qmax = 2^(bits-1) - 1, scale = absmax / qmax (or static_scale),
                codes = clamp(rint(y / scale), -qmax, qmax)            int8
    asymmetric: lo = min(min y, 0), hi = max(max y, 0), L = 2^bits - 1,
                scale = (hi - lo) / L, zero = clamp(rint(-lo / scale), 0, L),
                codes = clamp(rint(y / scale) + zero, 0, L)             uint8, zero int32
    scale == 0 gives codes 0 (and zero 0).

Per token, scales/zeros are [R] and everything happens in one pass (read x once, write codes
once): the transformed block of rows stays in registers, a row reduction gives each row's
absmax (or min/max), the division and rounding run on the registers. Per tensor and dynamic,
the global statistic must exist before any code is written: pass 1 transforms and writes one
statistic per row (no codes), torch reduces them (max/min are order-independent, so exact) and
computes scale/zero with the same fp32 formulas, pass 2 transforms again and quantizes (x is
read twice; codes written once). Static scales are a single pass.

Division is ``tl.math.div_rn`` (IEEE round-to-nearest, not the approximate ``/`` of the GPU
fast path); rint is round-half-even computed exactly from ``floor`` (``_rint``: for |v| <= 255
every step is exact in fp32), which gives the same result on the GPU and under the interpreter
(libdevice's ``rint`` does not exist there). Values are clamped to the code range before
rounding, which changes nothing (the bounds are integers, rint is monotone) but keeps huge
quotients of a static scale out of the rounding.

``int8_linear(qx [M, K] int8 | uint8, sx [M], zx [M] | None, qw [N, K] int8, sw [N], bias [N] |
None, out_dtype, out=None) -> [M, N]``:
``out[m, n] = sx[m] · sw[n] · Σ_k (qx[m, k] − zx[m]) · qw[n, k] + bias[n]``.
The sum is an int8 ``tl.dot`` with int32 accumulation (exact: int32 arithmetic wraps modulo
2^32, so the result is exact whenever the true sum fits, |sum| <= 255·127·K, i.e. K <= 66 000).
uint8 codes (asymmetric activations) enter the int8 dot as q − 128 (exact in int8), and the
epilogue adds (128 − zx[m]) · Σ_k qw[n, k], the weight row sums accumulated in the same K loop:
Σ (q − z)·w = Σ (q − 128)·w + (128 − z)·Σ w. Dequantization in fp32 in the epilogue:
``(acc · sx[m]) · sw[n] + bias[n]``, then the cast to out_dtype (fp32 / fp16 / bf16).
qw is read [BN, BK] with K contiguous, which is the K-major B operand the int8 tensor-core MMA
wants. GPU: autotuned tiles with grouped (L2-friendly) program order; interpreter: one config.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .hadamard import (
    _INTERPRET,
    _interp_br,
    _np2,
    _prune_rows,
    _round_bf16,
    _row_configs,
    _transform_tile,
)
from .hadamard import _check_common as _check_transform_args

MAX_N = 32768

# modes of _rotq_kernel
_PER_TOKEN = 0  # per-row dynamic scale (and zero) computed in the kernel
_FIXED = 1  # one scale (and zero) read from scale_ptr[0] / zero_ptr[0]
_STATS = 2  # per-row statistics only: absmax (sym) or (lo, hi) (asym)


@triton.jit
def _rint(v):
    """Round half to even, exact for |v| < 2^22 (floor, the fraction, the parity: all exact)."""
    f = tl.floor(v)
    d = v - f
    half = f * 0.5
    odd = (half - tl.floor(half)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.autotune(
    configs=[triton.Config({}, num_warps=4, num_stages=1)] if _INTERPRET else _row_configs(),
    key=["n", "K", "HAS_SIGNS", "HAS_SMOOTH", "MODE", "SYM"],
    prune_configs_by=None if _INTERPRET else {"early_config_prune": _prune_rows},
)
@triton.jit
def _rotq_kernel(
    x_ptr,
    hk_ptr,
    signs_ptr,
    smooth_ptr,
    codes_ptr,
    scale_ptr,
    zero_ptr,
    stat_ptr,
    R,
    n,
    rscale,
    qmax,
    levels,
    K: tl.constexpr,
    KP: tl.constexpr,
    LOG_P: tl.constexpr,
    P2: tl.constexpr,
    ROTATE: tl.constexpr,
    HAS_SIGNS: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    MODE: tl.constexpr,
    SYM: tl.constexpr,
    BR: tl.constexpr,
):
    """One block of BR rows: load, smooth, sign, transform, then MODE (see the module doc)."""
    row = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    a = tl.arange(0, KP)
    b = tl.arange(0, P2)
    col = a[:, None] * P2 + b[None, :]
    cmask = (a[:, None] < K) & (col < n)  # K = 1 without rotation: the row padded to P2
    rmask = row < R
    mask = rmask[:, None, None] & cmask[None, :, :]
    offs = row[:, None, None] * n + col[None, :, :]
    y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        sm = tl.load(smooth_ptr + col, mask=cmask, other=1.0)
        y = tl.math.div_rn(y, tl.broadcast_to(sm[None, :, :], [BR, KP, P2]))
    if HAS_SIGNS:
        sg = tl.load(signs_ptr + col, mask=cmask, other=0.0)
        y = y * sg[None, :, :]
    if ROTATE:
        y = _transform_tile(y, hk_ptr, K, KP, LOG_P, P2, BR)
        y = y * rscale
    flat = tl.reshape(y, [BR, KP * P2])  # padding is 0: neutral for absmax, min(., 0), max(., 0)
    if MODE == 2:
        if SYM:
            tl.store(stat_ptr + row, tl.max(tl.abs(flat), axis=1), mask=rmask)
        else:
            tl.store(stat_ptr + row, tl.minimum(tl.min(flat, axis=1), 0.0), mask=rmask)
            tl.store(stat_ptr + R + row, tl.maximum(tl.max(flat, axis=1), 0.0), mask=rmask)
    else:
        if MODE == 0:
            if SYM:
                amax = tl.max(tl.abs(flat), axis=1)
                scale = tl.math.div_rn(amax, tl.full([BR], 0.0, tl.float32) + qmax)
            else:
                lo = tl.minimum(tl.min(flat, axis=1), 0.0)
                hi = tl.maximum(tl.max(flat, axis=1), 0.0)
                scale = tl.math.div_rn(hi - lo, tl.full([BR], 0.0, tl.float32) + levels)
                safe = tl.where(scale == 0.0, 1.0, scale)
                zero = _rint(tl.minimum(tl.maximum(tl.math.div_rn(-lo, safe), 0.0), levels))
                zero = tl.where(scale == 0.0, 0.0, zero)
                tl.store(zero_ptr + row, zero.to(tl.int32), mask=rmask)
            tl.store(scale_ptr + row, scale, mask=rmask)
        else:
            scale = tl.load(scale_ptr) + tl.zeros([BR], tl.float32)
            if not SYM:
                zero = tl.load(zero_ptr).to(tl.float32) + tl.zeros([BR], tl.float32)
        safe = tl.where(scale == 0.0, 1.0, scale)
        v = tl.math.div_rn(y, tl.broadcast_to(safe[:, None, None], [BR, KP, P2]))
        if SYM:
            c = _rint(tl.minimum(tl.maximum(v, -qmax), qmax))
            c = tl.where(scale[:, None, None] == 0.0, 0.0, c)
            tl.store(codes_ptr + offs, c.to(tl.int32).to(tl.int8), mask=mask)
        else:
            c = _rint(tl.minimum(tl.maximum(v, -levels), levels)) + zero[:, None, None]
            c = tl.minimum(tl.maximum(c, 0.0), levels)
            c = tl.where(scale[:, None, None] == 0.0, 0.0, c)
            tl.store(codes_ptr + offs, c.to(tl.int32).to(tl.uint8), mask=mask)


def rotate_quantize(
    x: torch.Tensor,
    K: int,
    hk,
    signs,
    smooth,
    per_token: bool,
    symmetric: bool,
    static_scale,
    bits: int,
    out=None,
):
    """Fused (smooth, signs, Hadamard) + quantization of x [R, n]; see the module docstring.

    K = 0: no rotation (signs must be None). static_scale: float > 0 or None/<= 0 (dynamic;
    symmetric only when given). Returns (codes [R, n] int8|uint8, scales fp32 [R] | [1],
    zeros int32 like scales | None). ``out``: optional (codes, scales, zeros) buffers to reuse.
    """
    if not 2 <= int(bits) <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    bits = int(bits)
    static = static_scale is not None and float(static_scale) > 0
    if static and not symmetric:
        raise ValueError("static_scale needs symmetric=True")
    if static and not math.isfinite(float(static_scale)):
        raise ValueError(f"static_scale must be finite, got {static_scale}")
    if K == 0:
        if signs is not None:
            raise ValueError("signs need a rotation (K >= 1)")
        if x.dim() != 2 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError("x must be a float32/float16/bfloat16 [R, n] tensor")
        if not x.is_contiguous():
            raise ValueError("x must be contiguous")
        n = x.shape[1]
        if not 1 <= n <= MAX_N:
            raise ValueError(f"n={n} out of range 1..{MAX_N}")
        KP, P2, p = 1, _np2(n), 0
    else:
        n, p = _check_transform_args(x, K, hk, signs)
        KP, P2 = _np2(K), 1 << p
    if smooth is not None:
        if smooth.shape != (n,) or smooth.dtype != torch.float32 or smooth.device != x.device:
            raise ValueError(f"smooth must be float32 [{n}] on x's device")
        if not smooth.is_contiguous():
            raise ValueError("smooth must be contiguous")
    R = x.shape[0]
    dev = x.device
    code_dtype = torch.int8 if symmetric else torch.uint8
    ns = R if per_token else 1
    if out is not None:
        codes, scales, zeros = out
        if codes.shape != x.shape or codes.dtype != code_dtype or not codes.is_contiguous():
            raise ValueError(f"out codes must be contiguous {code_dtype} {tuple(x.shape)}")
        if scales.numel() != ns or scales.dtype != torch.float32 or not scales.is_contiguous():
            raise ValueError(f"out scales must be contiguous float32 with {ns} elements")
        if symmetric:
            zeros = None
        elif zeros is None or zeros.numel() != ns or zeros.dtype != torch.int32:
            raise ValueError(f"out zeros must be int32 with {ns} elements")
    else:
        codes = torch.empty(x.shape, dtype=code_dtype, device=dev)
        scales = torch.empty(ns if per_token else (), dtype=torch.float32, device=dev)
        zeros = None if symmetric else torch.empty_like(scales, dtype=torch.int32)
    if R == 0:
        if not per_token:  # empty tensor: absmax 0 -> scale 0 (or the static scale)
            scales.fill_(float(static_scale) if static else 0.0)
            if zeros is not None:
                zeros.zero_()
        return codes, scales, zeros

    qmax = float(2 ** (bits - 1) - 1)
    levels = float(2**bits - 1)
    rscale = 1.0 / math.sqrt(n)
    hk_arg = hk if K > 1 else x
    common = dict(
        K=max(K, 1), KP=KP, LOG_P=p, P2=P2, ROTATE=K >= 1, HAS_SIGNS=signs is not None,
        HAS_SMOOTH=smooth is not None, SYM=bool(symmetric),
    )  # fmt: skip
    ptrs = (x, hk_arg, signs if signs is not None else x, smooth if smooth is not None else x)

    def launch(mode, scale_t, zero_t, stat_t):
        args = (*ptrs, codes, scale_t, zero_t, stat_t, R, n, rscale, qmax, levels)
        if _INTERPRET:
            br = _interp_br(R, KP, P2, max(K, 1) if K >= 1 else 1)
            _rotq_kernel[(triton.cdiv(R, br),)](*args, MODE=mode, BR=br, **common)
        else:
            grid = lambda meta: (triton.cdiv(R, meta["BR"]),)  # noqa: E731
            _rotq_kernel[grid](*args, MODE=mode, **common)

    zero_arg = zeros if zeros is not None else scales
    if static:
        scales.fill_(float(static_scale))
        one = scales.reshape(-1)[:1]
        launch(_FIXED, one, one, one)
    elif per_token:
        launch(_PER_TOKEN, scales, zero_arg, scales)
    else:
        stat = torch.empty((R if symmetric else 2 * R,), dtype=torch.float32, device=dev)
        launch(_STATS, scales, zero_arg, stat)
        if symmetric:
            s = stat.max() / qmax  # fp32 IEEE division, as the reference
            scales.copy_(s)
        else:
            lo, hi = stat[:R].min(), stat[R:].max()
            s = (hi - lo) / levels
            safe = torch.where(s == 0, torch.ones_like(s), s)
            z = torch.clamp(torch.round(-lo / safe), 0, levels)  # torch.round: half to even
            z = torch.where(s == 0, torch.zeros_like(z), z)
            scales.copy_(s)
            zeros.copy_(z.to(torch.int32))
        launch(_FIXED, scales.reshape(-1), zero_arg.reshape(-1), stat)
    return codes, scales, zeros


# ---------------------------------------------------------------------------------------------
# int8 GEMM with the dequantization epilogue
# ---------------------------------------------------------------------------------------------

if _INTERPRET:
    _GEMM_CONFIGS = [triton.Config({}, num_warps=4, num_stages=1)]
else:
    _GEMM_CONFIGS = [
        triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in (
            (128, 256, 128, 8, 3),
            (256, 128, 128, 8, 3),
            (128, 128, 128, 8, 4),
            (128, 128, 64, 4, 4),
            (64, 128, 128, 4, 4),
            (128, 64, 128, 4, 4),
            (64, 64, 128, 4, 4),
            (32, 64, 128, 4, 4),
            (64, 64, 64, 4, 3),
            (32, 32, 64, 4, 2),
        )
    ]


def _prune_gemm(configs, named_args, **kwargs):
    """Tiles no larger than the problem (small problems: fewer configs to compile)."""
    M, N, K = named_args["M"], named_args["N"], named_args["K"]

    def fits(c):
        kw = c.kwargs
        return (
            kw["BM"] <= max(32, _np2(M))
            and kw["BN"] <= max(32, _np2(N))
            and kw["BK"] <= max(64, _np2(K))
        )

    keep = [c for c in configs if fits(c)]
    return keep or [min(configs, key=lambda c: c.kwargs["BM"] * c.kwargs["BN"] * c.kwargs["BK"])]


@triton.autotune(
    configs=_GEMM_CONFIGS,
    key=["M_BUCKET", "N", "K", "U8", "HAS_BIAS"],
    prune_configs_by=None if _INTERPRET else {"early_config_prune": _prune_gemm},
)
@triton.jit
def _int8_linear_kernel(
    a_ptr,
    w_ptr,
    sx_ptr,
    zx_ptr,
    sw_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    M_BUCKET,
    U8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out tile [BM, BN] = dequant(Σ_k a[m, k] · w[n, k]) (see the module docstring)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n  # grouped order: GROUP_M row tiles share the weight tiles in L2
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rm = pid_m.to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
    rn = pid_n.to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
    mmask = rm < M
    nmask = rn < N
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    wsum = tl.zeros([BN], dtype=tl.int32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        kmask = rk < K
        a = tl.load(a_ptr + rm[:, None] * K + rk[None, :], mask=mmask[:, None] & kmask[None, :],
                    other=0)  # fmt: skip
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=nmask[:, None] & kmask[None, :],
                    other=0)  # fmt: skip
        if U8:
            a = (a.to(tl.int32) - 128).to(tl.int8)  # masked zeros become -128: w is 0 there
            wsum += tl.sum(w.to(tl.int32), axis=1)
        acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
    if U8:
        zx = tl.load(zx_ptr + rm, mask=mmask, other=0)
        acc += (128 - zx)[:, None] * wsum[None, :]
    sx = tl.load(sx_ptr + rm, mask=mmask, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=nmask, other=0.0)
    out = (acc.to(tl.float32) * sx[:, None]) * sw[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rn, mask=nmask, other=0.0)[None, :]
    if ROUND_BF16:
        out = _round_bf16(out)
    omask = mmask[:, None] & nmask[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=omask)


def int8_linear(qx, sx, zx, qw, sw, bias, out_dtype=torch.float32, out=None) -> torch.Tensor:
    """Dequantized int8 GEMM: qx [M, K] int8|uint8, sx fp32 [M], zx int32 [M] | None (uint8
    only), qw [N, K] int8, sw fp32 [N], bias fp32 [N] | None -> [M, N] of out_dtype."""
    if qx.dim() != 2 or qw.dim() != 2:
        raise ValueError(f"qx and qw must be 2-D, got {tuple(qx.shape)} and {tuple(qw.shape)}")
    M, K = qx.shape
    N = qw.shape[0]
    if qw.shape[1] != K:
        raise ValueError(f"qx [M, K={K}] and qw [N, K={qw.shape[1]}] disagree on K")
    if qw.dtype != torch.int8:
        raise ValueError(f"qw must be int8, got {qw.dtype}")
    u8 = qx.dtype == torch.uint8
    if qx.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"qx must be int8 or uint8, got {qx.dtype}")
    if u8 != (zx is not None):
        raise ValueError("zx is required with uint8 qx and not allowed with int8 qx")
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"out_dtype must be float32/float16/bfloat16, got {out_dtype}")
    for name, t, size, dt in (("sx", sx, M, torch.float32), ("sw", sw, N, torch.float32)):
        if t.shape != (size,) or t.dtype != dt:
            raise ValueError(f"{name} must be {dt} [{size}], got {t.dtype} {tuple(t.shape)}")
    if zx is not None and (zx.shape != (M,) or zx.dtype != torch.int32):
        raise ValueError(f"zx must be int32 [{M}]")
    if bias is not None and (bias.shape != (N,) or bias.dtype != torch.float32):
        raise ValueError(f"bias must be float32 [{N}]")
    tensors = [t for t in (qx, sx, zx, qw, sw, bias) if t is not None]
    if any(t.device != qx.device for t in tensors):
        raise ValueError("all tensors must be on one device")
    if any(not t.is_contiguous() for t in tensors):
        raise ValueError("all tensors must be contiguous")
    if out is None:
        out = torch.empty((M, N), dtype=out_dtype, device=qx.device)
    elif out.shape != (M, N) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {out_dtype} [{M}, {N}]")
    if M == 0 or N == 0:
        return out
    if K == 0:
        out.copy_((bias if bias is not None else torch.zeros(N, device=qx.device)).expand(M, N))
        return out
    args = (qx, qw, sx, zx if zx is not None else sx, sw, bias if bias is not None else sw, out)
    flags = dict(U8=u8, HAS_BIAS=bias is not None)
    if _INTERPRET:
        bm = min(max(16, _np2(M)), 64)
        bn = min(max(16, _np2(N)), 64)
        bk = min(max(16, _np2(K)), 64)
        _int8_linear_kernel[(triton.cdiv(M, bm) * triton.cdiv(N, bn),)](
            *args, M, N, K, _np2(M), **flags, ROUND_BF16=out_dtype == torch.bfloat16,
            BM=bm, BN=bn, BK=bk, GROUP_M=4,
        )  # fmt: skip
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
        _int8_linear_kernel[grid](*args, M, N, K, min(_np2(M), 4096), **flags, ROUND_BF16=False)
    return out
