"""Triton backend of ``knn`` (see ``ood_fast.ops.knn``): fused distance + top-k.

Contract (``ood_fast.ops.knn._run_triton``)::

    knn(queries [N, D], bank [M, D], k, metric_code, exact) -> (distances [N, k] float32
        ascending, indices [N, k] int64), ties broken by bank index (lower first)

metric_code 0 = "l2": d = max(‖q‖² + ‖b‖² − 2 q·b, 0) (squared, the reference's expanded form);
metric_code 1 = "ip": d = −q·b. (Cosine is "ip" over unit rows; the adapter does it.)

Sort keys. Every (distance, bank index) pair is packed into one int64 whose signed order is the
lexicographic (distance, index) order: the high 32 bits are the float32 distance's bits mapped
to a signed integer of the same order (negative floats get their magnitude bits flipped; −0 is
first turned into +0 and NaN into +inf, as the reference does), the low 32 bits are the index.
Keys are unique, so any selection over keys is exact and deterministic, and the lower index wins
every tie — the reference's rule — with no extra work. Padding (masked bank rows, empty
candidate slots) is INT64_MAX, above every real key. Indices must fit in 31 bits: a bank of
2³¹ rows or more is searched in pieces that are merged in torch.

Single pass (k <= ``SINGLE_PASS_MAX_K`` = 1024), ``_topk_kernel``: one program per (block of BN
queries, split of the bank). A split is a contiguous range of CHUNK bank rows; the program
walks it in tiles of TILE rows: the [BN, TILE] distance tile is a K-loop of ``tl.dot`` (bank
norms precomputed once in float32), turned into keys and merged into a running per-query
top-KB list (KB = the next power of two >= max(k, 2), TILE >= KB), all in registers:

    1. bitonic top-KB of the tile: sort chunks of KB keys in alternating directions, then
       repeatedly take the elementwise min of neighbouring (ascending, descending) chunks —
       a bitonic sequence holding their KB smallest — and bitonic-merge it;
    2. the running list is kept sorted descending: min(running, tile top-KB ascending) is
       bitonic and holds the KB smallest of both; one bitonic merge sorts it again.

A tile whose smallest key is above every query's current KB-th key is skipped. The network is
written inline on a hypercube view ([BN, 2, 2, ..., 2]) with min/max reductions over one size-2
axis (no nested jit calls: the interpreter pays milliseconds per call; no ``tl.sort``/
``tl.topk``, whose xor-reduction runs element by element in the interpreter and which older
Triton versions lack). The [N, splits, KB] candidate keys go to torch: ``topk`` of the k
smallest keys, one sort, decode. The N × M distance matrix never exists.

Two passes (k > SINGLE_PASS_MAX_K, any k up to M; never an error), ``_keys_kernel``: a GEMM
kernel writes the keys of a block of queries × a block of bank rows; torch keeps a running top-k
(``torch.topk`` over [running k | block] keys), one block at a time, so memory stays at
O(query chunk × (k + bank block)).

Precision. exact=True, or a float32 bank: every operand is upcast to float32 and ``tl.dot`` runs
with ``input_precision="ieee"`` (no TF32): the distances are the float32 search over the upcast
bank (an exact conversion), i.e. the reference's numbers up to float32 rounding of the
accumulation order. exact=False with a float16/bfloat16 bank: queries are rounded to the bank's
format and ``tl.dot`` multiplies the low-precision tiles with float32 accumulation (the norms
of l2 stay float32). Under the interpreter (numpy has no bfloat16: ``tl.dot`` multiplies bf16
tiles as raw integers, and fp32 -> bf16 casts do not round to nearest even) the queries are
rounded with integer arithmetic and both tiles multiplied in float32: the same numbers, since a
product of two 16-bit floats is exact in float32.

Every dimension is masked (``tl.dot`` tiles are >= 16; smaller problems are padded through the
masks) and every pointer offset is 64-bit. On a GPU each kernel autotunes over a few configs
(pruned to TILE >= KB and bounded register tiles; one config for k > 512); under ``TRITON_INTERPRET=1`` each has exactly
one config and the wrapper sizes tiles from the problem.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_EMULATE_LOWP = _INTERPRET  # see "Precision" in the module docstring

SINGLE_PASS_MAX_K = 1024  # largest k of the fused single-pass kernel (KB = next pow2 <= this)
MAX_ROWS = 2**31 - 1  # bank rows per search (indices live in the low 31 bits of a key)
FALLBACK_BANK_BLOCK = 16384  # two-pass path: bank rows per block
FALLBACK_BYTES = 256 * 2**20  # two-pass path: bytes of keys per (query chunk × block) step
_SENTINEL = tl.constexpr(0x7FFFFFFFFFFFFFFF)  # INT64_MAX: padding key, above every real key
_CHUNK_ALIGN = 1024  # GPU split sizes are multiples of this (a multiple of every TILE)


def _log2(n: int) -> int:
    return n.bit_length() - 1


if _INTERPRET:
    # One config, no tile sizes: the wrapper picks them from the problem shape.
    _TOPK_CONFIGS = [triton.Config({}, num_warps=4, num_stages=1)]
    _KEYS_CONFIGS = [triton.Config({}, num_warps=4, num_stages=1)]
    _TOPK_PRUNE = None
else:

    def _tc(bn, tile, bk, warps, stages):
        return triton.Config(
            {"BN": bn, "TILE": tile, "LOG_T": _log2(tile), "BK": bk},
            num_warps=warps,
            num_stages=stages,
        )

    _TOPK_CONFIGS = [
        _tc(64, 64, 32, 4, 3),
        _tc(128, 64, 32, 8, 3),
        _tc(32, 64, 64, 4, 3),
        _tc(64, 128, 32, 8, 3),
        _tc(32, 128, 32, 4, 3),
        _tc(128, 128, 32, 8, 3),
        _tc(32, 256, 32, 8, 3),
        _tc(64, 256, 32, 8, 2),
        _tc(16, 256, 32, 4, 3),
        _tc(16, 512, 32, 8, 2),
        _tc(32, 512, 32, 8, 2),
        _tc(16, 1024, 32, 8, 2),
    ]

    def _prune_topk(configs, named_args, **kwargs):
        """TILE >= KB: up to 2 × max(KB, 64) for small KB, exactly KB from 256 on (the sorting
        network of a large tile takes minutes to compile); at most 32K keys per register tile."""
        kb = kwargs["KB"]
        lo = max(kb, 64)
        hi = 2 * lo if lo < 256 else lo
        keep = [
            c
            for c in configs
            if lo <= c.kwargs["TILE"] <= hi and c.kwargs["BN"] * c.kwargs["TILE"] <= 32768
        ]
        return keep or [c for c in configs if c.kwargs["TILE"] >= kb][:1]

    _TOPK_PRUNE = {"early_config_prune": _prune_topk}
    _KEYS_CONFIGS = [
        triton.Config({"BN": 64, "TILE": 64, "BK": 32}, num_warps=4, num_stages=3),
        triton.Config({"BN": 128, "TILE": 64, "BK": 32}, num_warps=4, num_stages=3),
        triton.Config({"BN": 64, "TILE": 128, "BK": 32}, num_warps=4, num_stages=3),
        triton.Config({"BN": 128, "TILE": 128, "BK": 32}, num_warps=8, num_stages=3),
        triton.Config({"BN": 64, "TILE": 128, "BK": 64}, num_warps=4, num_stages=2),
    ]

# Tile helpers (distance tile, key packing, compare-and-swap) are written inline in both
# kernels: under the interpreter every call of a nested @triton.jit function costs milliseconds.


@triton.autotune(
    configs=_TOPK_CONFIGS,
    key=["D", "METRIC", "LOWP", "BANK_BF16", "KB"],
    prune_configs_by=_TOPK_PRUNE,
)
@triton.jit
def _topk_kernel(
    q_ptr,
    b_ptr,
    qsq_ptr,
    bsq_ptr,
    out_ptr,
    N,
    M,
    D,
    CHUNK,
    METRIC: tl.constexpr,
    LOWP: tl.constexpr,
    BANK_BF16: tl.constexpr,
    EMULATE_LOWP: tl.constexpr,
    KB: tl.constexpr,
    LOG_K: tl.constexpr,
    BN: tl.constexpr,
    TILE: tl.constexpr,
    LOG_T: tl.constexpr,
    BK: tl.constexpr,
):
    """Top-KB keys of BN queries over one split of the bank -> out[rows, split, :KB]."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_s = tl.num_programs(1)
    rows = pid_n * BN + tl.arange(0, BN)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    q_rows = q_ptr + rows64[:, None] * D
    if METRIC == 0:
        qsq = tl.load(qsq_ptr + rows64, mask=row_mask, other=0.0)
    m_begin = pid_s.to(tl.int64) * CHUNK
    m_end = tl.minimum(m_begin + CHUNK, M)
    run = tl.full([BN, KB], _SENTINEL, dtype=tl.int64)  # running top-KB, sorted descending
    for m0 in range(m_begin, m_end, TILE):
        cols = m0 + tl.arange(0, TILE).to(tl.int64)
        col_mask = cols < m_end
        # ---- distance tile [BN, TILE] ------------------------------------------------------
        acc = tl.zeros([BN, TILE], dtype=tl.float32)
        for k0 in range(0, D, BK):
            ks = k0 + tl.arange(0, BK)
            k_mask = ks < D
            q = tl.load(q_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            q = q.to(tl.float32)
            b = tl.load(
                b_ptr + cols[:, None] * D + ks[None, :],
                mask=col_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            if LOWP:
                if EMULATE_LOWP:  # round q to the bank's format, multiply in fp32 (exact)
                    if BANK_BF16:
                        qb = q.to(tl.uint32, bitcast=True)
                        qb = (qb + 0x7FFF + ((qb >> 16) & 1)) & 0xFFFF0000
                        q = qb.to(tl.float32, bitcast=True)
                    else:
                        q = q.to(tl.float16).to(tl.float32)
                    acc = tl.dot(
                        q, tl.trans(b.to(tl.float32)), acc, input_precision="ieee",
                        out_dtype=tl.float32,
                    )  # fmt: skip
                else:
                    acc = tl.dot(q.to(b.dtype), tl.trans(b), acc, out_dtype=tl.float32)
            else:
                acc = tl.dot(
                    q, tl.trans(b.to(tl.float32)), acc, input_precision="ieee",
                    out_dtype=tl.float32,
                )  # fmt: skip
        if METRIC == 0:
            bsq = tl.load(bsq_ptr + cols, mask=col_mask, other=0.0)
            d = (qsq[:, None] + bsq[None, :]) - 2.0 * acc
            d = tl.where(d == d, d, float("inf"))  # NaN (overflow only) -> +inf, as the reference
            d = tl.maximum(d, 0.0)
        else:
            d = -acc
            d = tl.where(d == d, d, float("inf"))
        d = tl.where(d == 0.0, 0.0, d)  # -0 -> +0: equal distances must give equal keys
        # ---- keys: (distance, index) in signed int64 order -----------------------------------
        bits = d.to(tl.int32, bitcast=True)
        bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        key = (bits.to(tl.int64) << 32) | cols[None, :]
        key = tl.where(col_mask[None, :], key, _SENTINEL)
        # ---- merge into the running top-KB (skipped when no query can gain) -----------------
        thresh = tl.max(run, axis=1)
        hit = tl.max((tl.min(key, axis=1) < thresh).to(tl.int32), axis=0)
        if hit > 0:
            h = tl.reshape(key, [BN] + [2] * LOG_T)  # axis LOG_T - j <-> bit j of the column
            # 1. sort chunks of KB keys, ascending/descending by bit LOG_K of the position
            for s in tl.static_range(1, LOG_K + 1):
                for i in tl.static_range(s):
                    lo = tl.min(h, axis=LOG_T - (s - 1 - i), keep_dims=True)
                    hi = tl.max(h, axis=LOG_T - (s - 1 - i), keep_dims=True)
                    right = tl.reshape(
                        tl.arange(0, 2), [1] * (LOG_T - (s - 1 - i)) + [2] + [1] * (s - 1 - i)
                    )
                    if s < LOG_T:
                        flip = tl.reshape(tl.arange(0, 2), [1] * (LOG_T - s) + [2] + [1] * s)
                        h = tl.where((right ^ flip) != 0, hi, lo)
                    else:
                        h = tl.where(right != 0, hi, lo)
            # 2. halve: min of neighbouring chunks (bitonic, their KB smallest), then merge
            for lvl in tl.static_range(LOG_T - LOG_K):
                h = tl.min(h, axis=LOG_T - lvl - LOG_K)  # now LOG_T - lvl - 1 bits
                for i in tl.static_range(LOG_K):
                    lo = tl.min(h, axis=LOG_T - lvl - 1 - (LOG_K - 1 - i), keep_dims=True)
                    hi = tl.max(h, axis=LOG_T - lvl - 1 - (LOG_K - 1 - i), keep_dims=True)
                    right = tl.reshape(
                        tl.arange(0, 2),
                        [1] * (LOG_T - lvl - 1 - (LOG_K - 1 - i)) + [2] + [1] * (LOG_K - 1 - i),
                    )
                    if LOG_T - lvl - 1 > LOG_K:
                        flip = tl.reshape(
                            tl.arange(0, 2), [1] * (LOG_T - lvl - 1 - LOG_K) + [2] + [1] * LOG_K
                        )
                        h = tl.where((right ^ flip) != 0, hi, lo)
                    else:
                        h = tl.where(right != 0, hi, lo)
            # 3. min(running descending, tile ascending) is bitonic: merge it descending
            h = tl.minimum(tl.reshape(run, [BN] + [2] * LOG_K), h)
            for i in tl.static_range(LOG_K):
                lo = tl.min(h, axis=LOG_K - (LOG_K - 1 - i), keep_dims=True)
                hi = tl.max(h, axis=LOG_K - (LOG_K - 1 - i), keep_dims=True)
                right = tl.reshape(tl.arange(0, 2), [1] * (i + 1) + [2] + [1] * (LOG_K - 1 - i))
                h = tl.where(right == 0, hi, lo)
            run = tl.reshape(h, [BN, KB])
    slots = tl.arange(0, KB)
    op = out_ptr + rows64[:, None] * (num_s * KB) + pid_s * KB + slots[None, :]
    tl.store(op, run, mask=row_mask[:, None])


@triton.autotune(configs=_KEYS_CONFIGS, key=["D", "METRIC", "LOWP", "BANK_BF16"])
@triton.jit
def _keys_kernel(
    q_ptr,
    b_ptr,
    qsq_ptr,
    bsq_ptr,
    out_ptr,
    N,
    M,
    D,
    COL_OFFSET,
    METRIC: tl.constexpr,
    LOWP: tl.constexpr,
    BANK_BF16: tl.constexpr,
    EMULATE_LOWP: tl.constexpr,
    BN: tl.constexpr,
    TILE: tl.constexpr,
    BK: tl.constexpr,
):
    """out[n, m] = key(d(q_n, b_m), COL_OFFSET + m) for one [BN, TILE] tile (two-pass path)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    cols = pid_m.to(tl.int64) * TILE + tl.arange(0, TILE).to(tl.int64)
    col_mask = cols < M
    q_rows = q_ptr + rows64[:, None] * D
    acc = tl.zeros([BN, TILE], dtype=tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        k_mask = ks < D
        q = tl.load(q_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        q = q.to(tl.float32)
        b = tl.load(
            b_ptr + cols[:, None] * D + ks[None, :],
            mask=col_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if LOWP:
            if EMULATE_LOWP:
                if BANK_BF16:
                    qb = q.to(tl.uint32, bitcast=True)
                    qb = (qb + 0x7FFF + ((qb >> 16) & 1)) & 0xFFFF0000
                    q = qb.to(tl.float32, bitcast=True)
                else:
                    q = q.to(tl.float16).to(tl.float32)
                acc = tl.dot(
                    q, tl.trans(b.to(tl.float32)), acc, input_precision="ieee",
                    out_dtype=tl.float32,
                )  # fmt: skip
            else:
                acc = tl.dot(q.to(b.dtype), tl.trans(b), acc, out_dtype=tl.float32)
        else:
            acc = tl.dot(
                q, tl.trans(b.to(tl.float32)), acc, input_precision="ieee", out_dtype=tl.float32
            )
    if METRIC == 0:
        qsq = tl.load(qsq_ptr + rows64, mask=row_mask, other=0.0)
        bsq = tl.load(bsq_ptr + cols, mask=col_mask, other=0.0)
        d = (qsq[:, None] + bsq[None, :]) - 2.0 * acc
        d = tl.where(d == d, d, float("inf"))  # NaN (overflow only) -> +inf, as the reference
        d = tl.maximum(d, 0.0)
    else:
        d = -acc
        d = tl.where(d == d, d, float("inf"))
    d = tl.where(d == 0.0, 0.0, d)
    bits = d.to(tl.int32, bitcast=True)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = (bits.to(tl.int64) << 32) | (cols + COL_OFFSET)[None, :]
    op = out_ptr + rows64[:, None] * M + cols[None, :]
    tl.store(op, key, mask=row_mask[:, None] & col_mask[None, :])


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


def _tile(n: int, lo: int, hi: int) -> int:
    """Interpreter tile size: the next power of two >= n, within [lo, hi] (tl.dot needs >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def decode_keys(keys: torch.Tensor):
    """int64 keys -> (float32 distances, int64 indices): the inverse of the kernels' packing."""
    hi = (keys >> 32).to(torch.int32)
    bits = hi ^ ((hi >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), keys & 0xFFFFFFFF


def _smallest_sorted(keys: torch.Tensor, k: int) -> torch.Tensor:
    """The k smallest keys of each row, ascending (keys are unique: the order is total)."""
    if keys.shape[1] > k:
        keys = torch.topk(keys, k, dim=1, largest=False, sorted=False).values
    return torch.sort(keys, dim=1).values


def _sq_norms(x: torch.Tensor, rows: int = 1 << 16) -> torch.Tensor:
    """‖x_i‖² in float32 (as the reference computes them), upcasting ``rows`` rows at a time."""
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], rows):
        out[s : s + rows] = x[s : s + rows].float().square().sum(dim=1)
    return out


def _num_splits(n_query_blocks: int, M: int, KB: int, device: torch.device):
    """(splits, CHUNK): enough programs to fill the GPU, each split at least a few tiles."""
    if _INTERPRET:  # few programs (each costs time), but two splits to exercise the merge
        tile = max(KB, _tile(M, 16, 128))
        chunk = triton.cdiv(M, min(2, triton.cdiv(M, tile)))
        return triton.cdiv(M, chunk), chunk
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * sms, max(1, n_query_blocks))
    most = max(1, triton.cdiv(M, max(4 * KB, 2 * _CHUNK_ALIGN)))
    splits = max(1, min(want, most))
    chunk = triton.cdiv(triton.cdiv(M, splits), _CHUNK_ALIGN) * _CHUNK_ALIGN
    return triton.cdiv(M, chunk), chunk


def _flags(bank: torch.Tensor, exact: bool):
    lowp = (not exact) and bank.dtype in (torch.float16, torch.bfloat16)
    return dict(LOWP=lowp, BANK_BF16=bank.dtype == torch.bfloat16, EMULATE_LOWP=_EMULATE_LOWP)


def _single_pass(queries, bank, k, metric_code, exact, qsq, bsq):
    N, D = queries.shape
    M = bank.shape[0]
    KB = max(2, triton.next_power_of_2(k))
    n_blocks_est = triton.cdiv(N, 16 if KB >= 512 else 64)
    splits, chunk = _num_splits(n_blocks_est, M, KB, queries.device)
    cand = torch.empty(N, splits, KB, dtype=torch.int64, device=queries.device)
    meta = dict(KB=KB, LOG_K=_log2(KB), **_flags(bank, exact))
    if _INTERPRET:
        tile = max(KB, _tile(chunk, 16, 128))
        meta.update(BN=_tile(N, 16, 64), TILE=tile, LOG_T=_log2(tile), BK=_tile(D, 16, 128))

    def grid(m):
        return (triton.cdiv(N, m["BN"]), splits)

    _topk_kernel[grid](queries, bank, qsq, bsq, cand, N, M, D, chunk, METRIC=metric_code, **meta)
    return _smallest_sorted(cand.view(N, splits * KB), k)


def _two_pass(queries, bank, k, metric_code, exact, qsq, bsq):
    N, D = queries.shape
    M = bank.shape[0]
    dev = queries.device
    block = max(1, min(M, FALLBACK_BANK_BLOCK))
    q_chunk = max(1, min(N, FALLBACK_BYTES // (8 * (k + block))))
    meta = _flags(bank, exact)
    if _INTERPRET:
        meta.update(
            BN=_tile(min(N, q_chunk), 16, 64), TILE=_tile(block, 16, 128), BK=_tile(D, 16, 128)
        )
    out = torch.empty(N, k, dtype=torch.int64, device=dev)
    for n0 in range(0, N, q_chunk):
        q = queries[n0 : n0 + q_chunk]
        qs = qsq[n0 : n0 + q_chunk]
        nq = q.shape[0]
        run = None
        for m0 in range(0, M, block):
            b = bank[m0 : m0 + block]
            mb = b.shape[0]
            keys = torch.empty(nq, mb, dtype=torch.int64, device=dev)

            def grid(m, nq=nq, mb=mb):
                return (triton.cdiv(nq, m["BN"]), triton.cdiv(mb, m["TILE"]))

            _keys_kernel[grid](
                q, b, qs, bsq[m0 : m0 + block], keys, nq, mb, D, m0, METRIC=metric_code, **meta
            )
            cand = keys if run is None else torch.cat([run, keys], dim=1)
            run = (
                cand
                if cand.shape[1] <= k
                else torch.topk(cand, k, dim=1, largest=False, sorted=False).values
            )
            del keys, cand
        out[n0 : n0 + nq] = torch.sort(run, dim=1).values
    return out


def _search(queries, bank, k, metric_code, exact):
    """Sorted keys [N, k] of a bank of at most MAX_ROWS rows."""
    dev = queries.device
    if metric_code == 0:
        qsq, bsq = _sq_norms(queries), _sq_norms(bank)
    else:  # never read (METRIC=1): any float32 pointer
        qsq = bsq = torch.empty(1, dtype=torch.float32, device=dev)
    if k <= SINGLE_PASS_MAX_K:
        return _single_pass(queries, bank, k, metric_code, exact, qsq, bsq)
    return _two_pass(queries, bank, k, metric_code, exact, qsq, bsq)


def _merge_pieces(parts, k):
    """Merge per-piece (distances, global indices) [N, k_p] results: (distance, index) order."""
    d = torch.cat([p[0] for p in parts], dim=1)
    i = torch.cat([p[1] for p in parts], dim=1)
    order = torch.argsort(i, dim=1, stable=True)
    d, i = d.gather(1, order), i.gather(1, order)
    order = torch.argsort(d, dim=1, stable=True)[:, :k]
    return d.gather(1, order), i.gather(1, order)


def knn(queries: torch.Tensor, bank: torch.Tensor, k: int, metric_code: int, exact: bool):
    """Fused distance + top-k: ``(distances [N, k] float32 ascending, indices [N, k] int64)``.

    queries ``[N, D]`` and bank ``[M, D]``: float32/float16/bfloat16, contiguous, on one device;
    ``1 <= k <= M``; metric_code 0 = squared l2, 1 = negated inner product.
    """
    if metric_code not in (0, 1):
        raise ValueError(f"metric_code must be 0 (l2) or 1 (ip), got {metric_code!r}")
    for name, t in (("queries", queries), ("bank", bank)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name}: expected float32/float16/bfloat16, got {t.dtype}")
    N, D = queries.shape
    M = bank.shape[0]
    if bank.shape[1] != D:
        raise ValueError(f"dimension mismatch: queries D={D}, bank D={bank.shape[1]}")
    if not 1 <= k <= M:
        raise ValueError(f"k={k} out of range: need 1 <= k <= bank size M={M}")
    dev = queries.device
    if N == 0:
        return (
            torch.empty(0, k, dtype=torch.float32, device=dev),
            torch.empty(0, k, dtype=torch.int64, device=dev),
        )
    queries, bank = queries.contiguous(), bank.contiguous()
    guard = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with guard:
        if M <= MAX_ROWS:
            return decode_keys(_search(queries, bank, k, metric_code, exact))
        parts = []
        for m0 in range(0, M, MAX_ROWS):
            piece = bank[m0 : m0 + MAX_ROWS]
            d, i = decode_keys(_search(queries, piece, min(k, piece.shape[0]), metric_code, exact))
            parts.append((d, i + m0))
        return _merge_pieces(parts, k)
