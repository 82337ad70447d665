"""Triton backend of ``hadamard`` (see ``docs/QUANT_CONTRACT.md`` and ``ood_fast.ops.hadamard``).

Contract::

    hadamard(x [R, n], K, hk [K, K] fp32 | None, signs [n] fp32 | None, scale, out=None) -> out

    out[r, j] = scale * Σ_i (x[r, i] * signs[i]) * H[i, j],   H = kron(H_K, S_{2^p}),  n = K·2^p

with S the Sylvester matrix in natural order (``S_2 = [[1, 1], [1, -1]]``) and ``hk`` the ±1
factor H_K of the reference (``ood_fast.reference.hadamard.hadamard_factor``; K = 1 needs none).
Row-vector convention: with a row viewed as X [K, 2^p] (i = a·2^p + b) the result is
``scale · H_Kᵀ · X · S``: a fast Walsh–Hadamard transform (FWHT) along every sub-row of length
2^p, then the K sub-rows mixed with H_Kᵀ (``y[c, :] = Σ_a H_K[a, c] · fwht(X[a, :])``).
fp32 arithmetic; x and out fp32/fp16/bf16 (out has x's dtype and may be x itself: in place).

Design. One program per block of BR rows; the block lives in registers as a [BR, KP, 2^p]
tile (KP = K padded to a power of two, the padded sub-rows masked to zero on load and never
stored). The FWHT is its p butterfly stages written on a hypercube view of the tile
([BR, KP, 2, 2, ..., 2]): the stage of one index bit is a pair of sums over that size-2 axis,
``a + b`` and ``a − b`` (``tl.sum(h)`` and ``tl.sum(h · (1, −1))``), selected back in place —
exactly the fp32 butterfly, with no reassociation. On a GPU the compiler maps the hypercube's
axes to registers (innermost bits), lanes (the next 5 bits: shuffles) and warps (shared
memory), i.e. the classic register / shuffle / shared-memory FWHT with the row read once from
and written once to global memory. The K mixing is one fp32 ``tl.dot`` ("ieee": no TF32) of
the [BR·2^p, KP] transposed tile with the zero-padded H_K [KP, KP] (K·KP FMAs per element, a
few per byte, far below the memory bound); ``scale`` multiplies at the end.

The transform itself (``_transform_tile``) is shared with ``kernels/quant.py``.

Sizes: every n = K·2^p with K in (1, 12, 20, 28) up to ``MAX_N`` = 32768 (the register tile
of one row: 128 KB at n = 32768 with 16 warps, 64 registers per thread for the data).

Interpreter (``TRITON_INTERPRET=1``): one config; fp32 -> bf16 casts there truncate instead of
rounding to nearest even, so bf16 outputs are rounded with integer arithmetic first (exactly
what the GPU's cast does), and the cast of an already-representable value is exact.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_N = 32768
FACTORS = (1, 12, 20, 28)
_IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _np2(v: int) -> int:
    return 1 if v <= 1 else 1 << (v - 1).bit_length()


def split_n(n: int, K: int) -> int:
    """log2(n / K), checking that n = K·2^p."""
    if K not in FACTORS:
        raise ValueError(f"K must be one of {FACTORS}, got {K}")
    if n <= 0 or n % K:
        raise ValueError(f"n={n} is not a multiple of K={K}")
    p2 = n // K
    if p2 & (p2 - 1):
        raise ValueError(f"n={n} is not K·2^p with K={K}")
    return p2.bit_length() - 1


def _row_configs():
    """GPU configs: BR rows per program × warps; pruned per problem by ``_prune_rows``."""
    return [
        triton.Config({"BR": br}, num_warps=w, num_stages=1)
        for br in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
        for w in (4, 8, 16)
    ]


def _prune_rows(configs, named_args, **kwargs):
    """At most one config per warp count: the BR whose tile gives ~16 elements per thread
    (one row when the row alone is larger), BR·2^p >= 16 when the K mixing runs (``tl.dot``
    needs 16 rows), at most 64 elements per thread. Few configs: each costs a compile."""
    kp, p2, k = kwargs["KP"], kwargs["P2"], kwargs["K"]
    row = kp * p2
    min_br = max(1, 16 // p2) if k > 1 else 1
    keep = []
    for w in sorted({c.num_warps for c in configs}):
        want = max(min_br, (16 * 32 * w) // row)
        cands = [c for c in configs if c.num_warps == w and c.kwargs["BR"] >= min_br]
        if not cands:
            continue
        best = min(cands, key=lambda c: abs(c.kwargs["BR"] - want))
        if best.kwargs["BR"] * row <= 64 * 32 * w:
            keep.append(best)
    return keep or [min(configs, key=lambda c: (abs(c.kwargs["BR"] - min_br), c.num_warps))]


def _interp_br(R: int, KP: int, P2: int, K: int) -> int:
    """Interpreter block: the whole (tiny) problem, at least 16 dot rows when mixing."""
    br = min(_np2(max(R, 1)), 64)
    if K > 1:
        br = max(br, _np2(-(-16 // P2)))
    return br


# ---------------------------------------------------------------------------------------------
# shared tile helpers (also used by kernels/quant.py)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _transform_tile(y, hk_ptr, K: tl.constexpr, KP: tl.constexpr, LOG_P: tl.constexpr,
                    P2: tl.constexpr, BR: tl.constexpr):  # fmt: skip
    """fp32 tile [BR, KP, P2] -> H_Kᵀ · tile · S per row (unscaled); padded sub-rows stay 0."""
    if LOG_P > 0:
        h = tl.reshape(y, [BR, KP] + [2] * LOG_P)
        for j in tl.static_range(LOG_P):  # stage of index bit LOG_P - 1 - j (axis 2 + j)
            pos = tl.reshape(tl.arange(0, 2), [1] * (2 + j) + [2] + [1] * (LOG_P - 1 - j))
            sgn = 1.0 - 2.0 * pos.to(tl.float32)  # (1, -1) along the axis
            s = tl.sum(h, axis=2 + j, keep_dims=True)  # a + b
            d = tl.sum(h * sgn, axis=2 + j, keep_dims=True)  # a - b
            h = tl.where(pos == 0, s, d)
        y = tl.reshape(h, [BR, KP, P2])
    if K > 1:
        ka = tl.arange(0, KP)
        hmask = (ka[:, None] < K) & (ka[None, :] < K)
        hk = tl.load(hk_ptr + ka[:, None] * K + ka[None, :], mask=hmask, other=0.0)  # [a, c]
        z = tl.reshape(tl.permute(y, (0, 2, 1)), [BR * P2, KP])  # [(r, b), a]
        z = tl.dot(z, hk, input_precision="ieee", out_dtype=tl.float32)  # Σ_a X[a, b] H[a, c]
        y = tl.permute(tl.reshape(z, [BR, P2, KP]), (0, 2, 1))
    return y


@triton.jit
def _round_bf16(v):
    """fp32 -> the nearest-even bf16 value, still as fp32 (exact to cast afterwards)."""
    b = v.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.autotune(
    configs=[triton.Config({}, num_warps=4, num_stages=1)] if _INTERPRET else _row_configs(),
    key=["n", "K", "HAS_SIGNS"],
    prune_configs_by=None if _INTERPRET else {"early_config_prune": _prune_rows},
    restore_value=[] if _INTERPRET else ["out_ptr"],  # out may alias x (in place)
)
@triton.jit
def _hadamard_kernel(
    x_ptr,
    out_ptr,
    hk_ptr,
    signs_ptr,
    R,
    n,
    scale,
    K: tl.constexpr,
    KP: tl.constexpr,
    LOG_P: tl.constexpr,
    P2: tl.constexpr,
    HAS_SIGNS: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BR: tl.constexpr,
):
    """out[rows] = scale · hadamard(x[rows] · signs) for one block of BR rows."""
    row = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    a = tl.arange(0, KP)
    b = tl.arange(0, P2)
    col = a[:, None] * P2 + b[None, :]  # [KP, P2] column index a·2^p + b
    mask = (row[:, None, None] < R) & (a[None, :, None] < K)
    offs = row[:, None, None] * n + col[None, :, :]
    y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SIGNS:
        sg = tl.load(signs_ptr + col, mask=a[:, None] < K, other=0.0)
        y = y * sg[None, :, :]
    y = _transform_tile(y, hk_ptr, K, KP, LOG_P, P2, BR)
    y = y * scale
    if ROUND_BF16:
        y = _round_bf16(y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _check_common(x: torch.Tensor, K: int, hk, signs):
    if x.dim() != 2:
        raise ValueError(f"x must be [R, n], got shape {tuple(x.shape)}")
    if x.dtype not in _IO_DTYPES:
        raise ValueError(f"x dtype must be float32/float16/bfloat16, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous")
    n = x.shape[1]
    if n > MAX_N:
        raise ValueError(f"n={n} above the Triton kernel's limit {MAX_N}")
    p = split_n(n, K)
    if K > 1:
        if hk is None or hk.shape != (K, K) or hk.dtype != torch.float32:
            raise ValueError(f"hk must be float32 [{K}, {K}]")
        if hk.device != x.device or not hk.is_contiguous():
            raise ValueError("hk must be contiguous on x's device")
    if signs is not None:
        if signs.shape != (n,) or signs.dtype != torch.float32 or signs.device != x.device:
            raise ValueError(f"signs must be float32 [{n}] on x's device")
        if not signs.is_contiguous():
            raise ValueError("signs must be contiguous")
    return n, p


def hadamard(x: torch.Tensor, K: int, hk, signs, scale: float, out=None) -> torch.Tensor:
    """``scale · (x · signs) @ kron(H_K, S_{2^p})`` row by row: x [R, n] -> [R, n] (x's dtype).

    ``hk``: fp32 [K, K] (ignored for K = 1); ``signs``: fp32 [n] or None; ``out``: optional
    contiguous [R, n] buffer of x's dtype (may be x: in place).
    """
    n, p = _check_common(x, K, hk, signs)
    R = x.shape[0]
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor of x's shape and dtype")
    if R == 0:
        return out
    KP = _np2(K)
    P2 = 1 << p
    hk_arg = hk if K > 1 else x  # never read when K == 1
    signs_arg = signs if signs is not None else x
    round_bf16 = _INTERPRET and x.dtype == torch.bfloat16
    if _INTERPRET:
        br = _interp_br(R, KP, P2, K)
        _hadamard_kernel[(triton.cdiv(R, br),)](
            x, out, hk_arg, signs_arg, R, n, float(scale), K=K, KP=KP, LOG_P=p, P2=P2,
            HAS_SIGNS=signs is not None, ROUND_BF16=round_bf16, BR=br,
        )  # fmt: skip
    else:
        _hadamard_kernel[lambda meta: (triton.cdiv(R, meta["BR"]),)](
            x, out, hk_arg, signs_arg, R, n, float(scale), K=K, KP=KP, LOG_P=p, P2=P2,
            HAS_SIGNS=signs is not None, ROUND_BF16=False,
        )  # fmt: skip
    return out
