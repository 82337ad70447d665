"""Triton backend of ``mahalanobis_fused`` (see ``ood_fast.ops.mahalanobis``).

Math (the contract is ``ood_fast.reference.mahalanobis.fused``)::

    x̃ = u − center
    q[n, g]  = ‖x̃_n W_g‖²                                     (kernel 1, [N, G])
    d²[n, c] = max(q[n, group[c]] − 2 x̃_n · proj[:, c] + const[c], 0)   (kernel 2)

Kernel 1 (``_quadratic_kernel``): one program per (row block, group). It walks the output
columns of x̃ W_g in blocks of BN; each column block is a K-loop of ``tl.dot`` tiles, followed
by a sum-of-squares epilogue into a per-row accumulator. With ``triangular`` (W_g upper
triangular: W[i, j] = 0 for i > j) the K-loop of column block [j0, j0 + BN) stops at j0 + BN,
skipping the zero blocks below the diagonal (about half the flops).

Kernel 2 (``_distance_kernel``): tiles of x̃ @ proj over blocks of BC classes, with the whole
epilogue fused: add const and q[n, group[c]], clamp at 0, then either store the d² tile
(reduce="none": one program per (row block, class block)), or keep per row a running
(min, first argmin) or an online logsumexp (running max and rescaled sum) across the class
blocks (one program per row block walks every class block). [N, C] is never materialized
unless reduce="none".

precision="fp32": ``tl.dot`` with ``input_precision="ieee"`` (no TF32), so results match the
fp32 reference to rounding. precision="bf16": GEMM operands (x̃, W, proj) rounded to bfloat16,
fp32 accumulation, exactly like the reference.

Every dimension is masked (tile dims are ≥ 16 for ``tl.dot``; smaller problems are padded with
zeros through the masks). On a GPU both kernels autotune over a few tile configs. Under
``TRITON_INTERPRET=1`` (the CPU interpreter, a test tool) each autotuner has exactly one config
(several fail without a GPU) and the wrapper sizes the tiles from the problem: as large as
possible (the interpreter runs tile ops in numpy), but no larger than the padded problem.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_REDUCE_CODE = {"none": 0, "min": 1, "logsumexp": 2}
# Under the interpreter (numpy has no bfloat16) tl.dot multiplies bf16 tiles as their raw 16-bit
# integer patterns, and fp32 → bf16 casts do not round to nearest even. There, bf16 GEMMs round
# their operands with integer arithmetic instead and multiply in fp32: the same numbers (a
# bf16 × bf16 product is exact in fp32, accumulation is fp32 either way).
_EMULATE_BF16 = _INTERPRET

if _INTERPRET:
    # One config, with no tile sizes: the wrapper picks them from the problem shape (large
    # tiles, but no larger than the padded problem: the interpreter pays for every padded lane).
    _Q_CONFIGS = [triton.Config({}, num_warps=4, num_stages=1)]
    _D_CONFIGS = [triton.Config({}, num_warps=4, num_stages=1)]
else:
    _Q_CONFIGS = [
        triton.Config({"BM": 64, "BN": 64, "BK": 32}, num_warps=4, num_stages=3),
        triton.Config({"BM": 128, "BN": 64, "BK": 32}, num_warps=4, num_stages=3),
        triton.Config({"BM": 128, "BN": 128, "BK": 32}, num_warps=8, num_stages=3),
        triton.Config({"BM": 64, "BN": 128, "BK": 64}, num_warps=4, num_stages=2),
        triton.Config({"BM": 32, "BN": 64, "BK": 32}, num_warps=4, num_stages=3),
    ]
    _D_CONFIGS = [
        triton.Config({"BM": 64, "BC": 64, "BK": 32}, num_warps=4, num_stages=3),
        triton.Config({"BM": 128, "BC": 64, "BK": 32}, num_warps=4, num_stages=3),
        triton.Config({"BM": 128, "BC": 128, "BK": 32}, num_warps=8, num_stages=3),
        triton.Config({"BM": 64, "BC": 128, "BK": 64}, num_warps=4, num_stages=2),
        triton.Config({"BM": 32, "BC": 32, "BK": 32}, num_warps=4, num_stages=3),
    ]

# The tile helpers are written inline in both kernels: under the interpreter every call of a
# nested @triton.jit function costs milliseconds of patching, which dominated the test time.


@triton.autotune(configs=_Q_CONFIGS, key=["E", "TRIANGULAR", "BF16"])
@triton.jit
def _quadratic_kernel(
    u_ptr,
    center_ptr,
    w_ptr,
    q_ptr,
    N,
    E,
    G,
    TRIANGULAR: tl.constexpr,
    BF16: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """q[n, g] = ‖x̃_n W_g‖² for one block of BM rows and one group g."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BM)
    pid_m = pid % num_m
    g = pid // num_m
    rows = pid_m * BM + tl.arange(0, BM)
    row_mask = rows < N
    u_rows = u_ptr + rows.to(tl.int64)[:, None] * E
    w_base = w_ptr + g.to(tl.int64) * E * E
    q = tl.zeros([BM], dtype=tl.float32)
    for j0 in range(0, E, BN):
        cols = j0 + tl.arange(0, BN)
        col_mask = cols < E
        if TRIANGULAR:
            k_stop = tl.minimum(E, j0 + BN)  # W[k, j] = 0 for k > j: rows past the block are 0
        else:
            k_stop = E
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, k_stop, BK):
            ks = k0 + tl.arange(0, BK)
            k_mask = ks < E
            xm = row_mask[:, None] & k_mask[None, :]
            x = tl.load(u_rows + ks[None, :], mask=xm, other=0.0).to(tl.float32)
            c = tl.load(center_ptr + ks, mask=k_mask, other=0.0)
            x = tl.where(xm, x - c[None, :], 0.0)  # x̃, zero outside the matrix
            wp = w_base + ks.to(tl.int64)[:, None] * E + cols[None, :]
            w = tl.load(wp, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if BF16:
                if EMULATE_BF16:  # round to nearest-even bf16, keep fp32 (see _EMULATE_BF16)
                    xb = x.to(tl.uint32, bitcast=True)
                    xb = (xb + 0x7FFF + ((xb >> 16) & 1)) & 0xFFFF0000
                    wb = w.to(tl.uint32, bitcast=True)
                    wb = (wb + 0x7FFF + ((wb >> 16) & 1)) & 0xFFFF0000
                    acc = tl.dot(
                        xb.to(tl.float32, bitcast=True),
                        wb.to(tl.float32, bitcast=True),
                        acc,
                        input_precision="ieee",
                        out_dtype=tl.float32,
                    )
                else:
                    acc = tl.dot(x.to(tl.bfloat16), w.to(tl.bfloat16), acc, out_dtype=tl.float32)
            else:
                acc = tl.dot(x, w, acc, input_precision="ieee", out_dtype=tl.float32)
        q += tl.sum(acc * acc, axis=1)
    tl.store(q_ptr + rows.to(tl.int64) * G + g, q, mask=row_mask)


@triton.autotune(configs=_D_CONFIGS, key=["E", "C", "REDUCE", "HAS_Q", "BF16"])
@triton.jit
def _distance_kernel(
    u_ptr,
    center_ptr,
    proj_ptr,
    const_ptr,
    group_ptr,
    q_ptr,
    bias_ptr,
    out_ptr,
    idx_ptr,
    N,
    E,
    C,
    G,
    REDUCE: tl.constexpr,
    HAS_Q: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BF16: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BM: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
):
    """d² tiles of BM rows × BC classes with the fused epilogue (store / min / logsumexp)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BM)
    pid_m = pid % num_m
    pid_c = pid // num_m
    rows = pid_m * BM + tl.arange(0, BM)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    u_rows = u_ptr + rows64[:, None] * E
    if REDUCE == 0:  # one class block per program
        c_begin = pid_c * BC
        c_end = tl.minimum(c_begin + BC, C)
    else:  # one program walks all class blocks of its rows
        c_begin = 0
        c_end = C
    run_min = tl.full([BM], float("inf"), dtype=tl.float32)
    run_arg = tl.zeros([BM], dtype=tl.int64)
    run_max = tl.full([BM], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BM], dtype=tl.float32)
    for c0 in range(c_begin, c_end, BC):
        cols = c0 + tl.arange(0, BC)
        col_mask = cols < C
        acc = tl.zeros([BM, BC], dtype=tl.float32)
        for k0 in range(0, E, BK):
            ks = k0 + tl.arange(0, BK)
            k_mask = ks < E
            xm = row_mask[:, None] & k_mask[None, :]
            x = tl.load(u_rows + ks[None, :], mask=xm, other=0.0).to(tl.float32)
            c = tl.load(center_ptr + ks, mask=k_mask, other=0.0)
            x = tl.where(xm, x - c[None, :], 0.0)  # x̃, zero outside the matrix
            pp = proj_ptr + ks.to(tl.int64)[:, None] * C + cols[None, :]
            p = tl.load(pp, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if BF16:
                if EMULATE_BF16:  # round to nearest-even bf16, keep fp32 (see _EMULATE_BF16)
                    xb = x.to(tl.uint32, bitcast=True)
                    xb = (xb + 0x7FFF + ((xb >> 16) & 1)) & 0xFFFF0000
                    pb = p.to(tl.uint32, bitcast=True)
                    pb = (pb + 0x7FFF + ((pb >> 16) & 1)) & 0xFFFF0000
                    acc = tl.dot(
                        xb.to(tl.float32, bitcast=True),
                        pb.to(tl.float32, bitcast=True),
                        acc,
                        input_precision="ieee",
                        out_dtype=tl.float32,
                    )
                else:
                    acc = tl.dot(x.to(tl.bfloat16), p.to(tl.bfloat16), acc, out_dtype=tl.float32)
            else:
                acc = tl.dot(x, p, acc, input_precision="ieee", out_dtype=tl.float32)
        const = tl.load(const_ptr + cols, mask=col_mask, other=0.0)
        d2 = acc * -2.0 + const[None, :]
        if HAS_Q:
            grp = tl.load(group_ptr + cols, mask=col_mask, other=0)
            qv = tl.load(
                q_ptr + rows64[:, None] * G + grp[None, :],
                mask=row_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
            d2 = d2 + qv
        d2 = tl.maximum(d2, 0.0)
        if REDUCE == 0:
            op = out_ptr + rows64[:, None] * C + cols[None, :]
            tl.store(op, d2, mask=row_mask[:, None] & col_mask[None, :])
        elif REDUCE == 1:
            d2m = tl.where(col_mask[None, :], d2, float("inf"))
            bmin = tl.min(d2m, axis=1)
            cand = tl.where(d2m == bmin[:, None], cols[None, :], C)
            barg = tl.min(cand, axis=1).to(tl.int64)  # first index of the block minimum
            take = bmin < run_min  # strict: earlier blocks win ties (first index overall)
            run_arg = tl.where(take, barg, run_arg)
            run_min = tl.where(take, bmin, run_min)
        else:
            if HAS_BIAS:
                b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0)
                s = b[None, :] - 0.5 * d2
            else:
                s = -0.5 * d2
            s = tl.where(col_mask[None, :], s, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(s, axis=1))
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)  # all −inf so far
            run_sum = run_sum * tl.exp(run_max - safe) + tl.sum(tl.exp(s - safe[:, None]), axis=1)
            run_max = new_max
    if REDUCE == 1:
        tl.store(out_ptr + rows64, run_min, mask=row_mask)
        tl.store(idx_ptr + rows64, run_arg, mask=row_mask)
    elif REDUCE == 2:
        safe = tl.where(run_max == float("-inf"), 0.0, run_max)
        tl.store(out_ptr + rows64, safe + tl.log(run_sum), mask=row_mask)


def _tile(n: int, lo: int, hi: int) -> int:
    """Interpreter tile size: the next power of two ≥ n, within [lo, hi] (tl.dot needs ≥ 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def mahalanobis_fused(u, center, factors, proj, const, group, reduce, bias, triangular, precision):
    """Triton ``mahalanobis_fused``: returns exactly what ``reference.mahalanobis.fused`` does.

    u ``[N, E]`` fp32/fp16/bf16; center ``[E]``, factors ``[G, E, E]`` or None, proj ``[E, C]``,
    const ``[C]``, bias ``[C]`` or None: float32; group ``[C]`` int64.
    """
    if reduce not in _REDUCE_CODE:
        raise ValueError(f"reduce must be one of {tuple(_REDUCE_CODE)}, got {reduce!r}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if u.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"u: expected float32/float16/bfloat16, got {u.dtype}")
    N, E = u.shape
    C = proj.shape[1]
    dev = u.device
    u = u.contiguous()
    center = center.to(dev, torch.float32).contiguous()
    proj = proj.to(dev, torch.float32).contiguous()
    const = const.to(dev, torch.float32).contiguous()
    code = _REDUCE_CODE[reduce]
    if code == 0:
        out = torch.empty(N, C, dtype=torch.float32, device=dev)
    else:
        out = torch.empty(N, dtype=torch.float32, device=dev)
    idx = torch.empty(N, dtype=torch.long, device=dev) if code == 1 else None
    if N == 0:
        return (out, idx) if code == 1 else out
    bf16 = precision == "bf16"

    if factors is not None:
        factors = factors.to(dev, torch.float32).contiguous()
        G = factors.shape[0]
        group = group.to(dev, torch.long).contiguous()
        q = torch.empty(N, G, dtype=torch.float32, device=dev)

        def qgrid(meta):
            return (triton.cdiv(N, meta["BM"]) * G,)

        tiles = dict(BM=_tile(N, 16, 128), BN=_tile(E, 16, 128), BK=_tile(E, 16, 128))
        _quadratic_kernel[qgrid](
            u,
            center,
            factors,
            q,
            N,
            E,
            G,
            TRIANGULAR=bool(triangular),
            BF16=bf16,
            EMULATE_BF16=_EMULATE_BF16,
            **(tiles if _INTERPRET else {}),
        )
    else:
        G = 1
        q = const  # placeholder pointers, never read (HAS_Q=False)
        group = group if group is not None else const
    bias_ = bias.to(dev, torch.float32).contiguous() if bias is not None else const

    tiles = dict(BM=_tile(N, 16, 128), BC=_tile(C, 16, 64), BK=_tile(E, 16, 128))

    def dgrid(meta):
        n_c = triton.cdiv(C, meta["BC"]) if code == 0 else 1
        return (triton.cdiv(N, meta["BM"]) * n_c,)

    _distance_kernel[dgrid](
        u,
        center,
        proj,
        const,
        group,
        q,
        bias_,
        out,
        idx if idx is not None else out,
        N,
        E,
        C,
        G,
        REDUCE=code,
        HAS_Q=factors is not None,
        HAS_BIAS=bias is not None,
        BF16=bf16,
        EMULATE_BF16=_EMULATE_BF16,
        **(tiles if _INTERPRET else {}),
    )
    return (out, idx) if code == 1 else out
