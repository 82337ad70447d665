"""Exact k-nearest-neighbour search over a bank sharded across processes or GPUs.

Every process (rank) of a ``torch.distributed`` process group holds one shard of the bank — a
block of consecutive rows — and the SAME queries (replicated queries: every rank passes
identical ``queries``). A search runs in three steps:

1. each rank finds the top ``min(k, M_r)`` of its own shard with ``ood_fast.ops.knn`` (any
   backend: ``cpu``, ``cuda``, ``triton``, ``torch``) and pads the list to ``k`` columns with
   distance ``+inf`` / index ``-1`` when its shard has fewer than ``k`` rows (or none);
2. the ``[N, k]`` candidate lists (distances and GLOBAL indices) are all-gathered;
3. every rank merges the ``world_size × k`` candidates of each query, sorted by
   ``(distance, global index)``, and keeps the first ``k``.

Global indices number the rows of the concatenation of all shards in group-rank order: rank r's
row i is global row ``offset_r + i`` with ``offset_r = M_0 + ... + M_{r-1}`` (shard sizes are
all-gathered once, when a ``ShardedBank`` is built). The result — on every rank — is identical
to ``ops.knn(queries, torch.cat(shards), k, metric)`` on one process: the k nearest rows of the
whole bank are among the union of each shard's k nearest, each shard's list already breaks ties
by (local, hence global) index, and the merge breaks ties across shards by global index, so
ties go to the lower global index exactly as in the single-process search. (Distances are
computed per (query, row) pair, so they are the same numbers in both; the only caveat is a
compiled backend whose rounding depends on where a row falls in its tile.)

Communication per search, received by each rank: ``world_size × N × k × (4 + 8)`` bytes
(float32 distances + int64 indices; ``8 + 8`` for float64 results), plus one tiny all-gather of
a few integers per rank that checks the queries agree. Building a ``ShardedBank`` costs one
tiny all-gather. For ImageNet-scale OOD scoring (10,000 queries, k = 1000, 8 ranks) that is
960 MB per search: batch the queries when that matters.

Process groups: any initialized ``torch.distributed`` group — gloo (CPU tensors; CUDA results
are staged through host memory) or NCCL (each rank's bank on its GPU; set the CUDA device of
each rank first, e.g. ``torch.cuda.set_device(local_rank)``). ``group=None`` uses the default
(world) group.

Errors never leave a rank waiting in a collective: every input that could differ between ranks
(the shard, the queries) is validated locally first and the outcome is all-gathered, so a bad
shard on one rank raises ``ValueError`` on every rank (the offending rank with the detailed
message). ``k`` larger than the total bank size raises ``ValueError`` on every rank, before any
distance is computed. Arguments that must be the same on every rank (``k``, ``ks``, ``metric``)
are checked before any communication; if they are given differently on different ranks the
behaviour is undefined (a collective may fail or hang until the group's timeout).

Example (``torchrun --nproc-per-node 2 script.py``)::

    import torch.distributed as dist
    from ood_fast.distributed import ShardedBank

    dist.init_process_group("gloo")
    bank = ShardedBank(my_rows)          # this rank's [M_r, D] block of the bank
    d, idx = bank.knn(queries, k=50)     # same (d, idx) on every rank; idx are global rows
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from . import ops
from ._validate import as_tensor, check_features, check_same_device
from .ops.knn import METRICS

__all__ = ["ShardedBank", "sharded_knn", "sharded_kth_distance"]

# Bank dtypes as small integers for the metadata all-gather (-1: empty shard, no dtype).
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
_EMPTY = -1


def _dist():
    """``torch.distributed``, checked to be usable and initialized."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        raise RuntimeError(
            "no torch.distributed process group is initialized: call "
            "torch.distributed.init_process_group(...) first (or run under torchrun)"
        )
    return dist


def _comm_device(dist, group, local: torch.device) -> torch.device:
    """Where tensors must live for collectives of ``group``: CUDA for NCCL, else host memory."""
    if dist.get_backend(group) == "nccl":
        if local.type == "cuda":
            return local
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(dist, group, t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """All-gather a same-shaped tensor from every rank, on the group's communication device."""
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _check_k(k, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(k).__name__} {k!r}")
    k = int(k)
    if k < 1:
        raise ValueError(f"{name}={k} out of range: need {name} >= 1")
    return k


def _check_ks(ks) -> list[int]:
    if isinstance(ks, str | bytes) or not hasattr(ks, "__iter__"):
        raise TypeError(f"ks must be a sequence of integers, got {type(ks).__name__} {ks!r}")
    if isinstance(ks, torch.Tensor | np.ndarray):
        ks = ks.tolist()
    ks = [_check_k(k, "ks entry") for k in ks]
    if not ks:
        raise ValueError("ks is empty: give at least one k")
    return ks


def _check_metric(metric) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


class ShardedBank:
    """This rank's block of a KNN bank sharded across a ``torch.distributed`` process group.

    Building one is a collective: every rank of ``group`` must construct its ``ShardedBank``
    (in the same order relative to other collectives). The shard sizes are all-gathered once,
    so the object knows its global row ``offset`` and the ``total`` bank size; the shard is
    checked once for NaN/Inf (searches then skip that scan).

    Args:
        local_bank: ``[M_r, D]`` float16/bfloat16/float32/float64 rows (tensor or numpy array);
            ``M_r`` may be 0 (an empty shard; its ``D`` is then not checked). All non-empty
            shards must share one ``D`` and one dtype.
        group: the process group (None: the default group). Rank order in this group is the
            order in which shards are concatenated into the global bank.

    Attributes:
        rank, world_size: this process's rank in ``group`` and the group size.
        sizes: ``[M_0, ..., M_{W-1}]``, the shard sizes in rank order.
        offset: global index of this shard's first row (sum of lower ranks' sizes).
        total: the size of the whole bank.
        dim: the feature dimension D (None when every shard is empty).
        dtype: the common dtype of the non-empty shards (None when every shard is empty).

    Raises:
        ValueError on every rank when any rank's shard is invalid (wrong rank, NaN/Inf,
        non-floating), or the shards disagree on D or dtype. TypeError/ValueError from the
        local checks are re-raised on the offending rank; the others get a ValueError naming it.
        RuntimeError when no process group is initialized.
    """

    def __init__(self, local_bank, group=None):
        dist = _dist()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

        error: Exception | None = None
        bank = None
        try:
            bank = as_tensor(local_bank, "local_bank")
            if bank.dim() == 2 and bank.shape[0] == 0:
                if not bank.dtype.is_floating_point:
                    bank = bank.float()
            else:
                bank = check_features(bank, "local_bank").contiguous()
        except (TypeError, ValueError) as exc:
            error = exc
        if error is None:
            meta = [bank.shape[0], bank.shape[1], _DTYPE_CODES.get(bank.dtype, _EMPTY), 0]
            if bank.shape[0] == 0:
                meta[1] = meta[2] = _EMPTY
        else:
            meta = [0, _EMPTY, _EMPTY, 1]
        local_device = bank.device if bank is not None else torch.device("cpu")
        self._comm = _comm_device(dist, group, local_device)
        parts = _all_gather(
            dist, group, torch.tensor(meta, dtype=torch.int64, device=self._comm), self.world_size
        )
        table = torch.stack(parts).cpu().tolist()  # [W, 4]

        failed = [r for r, row in enumerate(table) if row[3]]
        if failed:
            if error is not None:
                raise error
            raise ValueError(
                f"ShardedBank: the shard on rank(s) {failed} is invalid (see the error raised "
                "on those ranks); no rank was left waiting"
            )
        dims = {row[1] for row in table if row[0] > 0}
        if len(dims) > 1:
            listing = ", ".join(f"rank {r}: D={row[1]}" for r, row in enumerate(table) if row[0])
            raise ValueError(f"ShardedBank: shards disagree on the feature dimension ({listing})")
        codes = {row[2] for row in table if row[0] > 0}
        if len(codes) > 1:
            listing = ", ".join(
                f"rank {r}: {_CODE_DTYPES[row[2]]}" for r, row in enumerate(table) if row[0]
            )
            raise ValueError(
                f"ShardedBank: shards disagree on the dtype ({listing}); cast them to one dtype"
            )

        self.local_bank = bank
        self.sizes = [int(row[0]) for row in table]
        self.offset = sum(self.sizes[: self.rank])
        self.total = sum(self.sizes)
        self.dim = dims.pop() if dims else None
        self.dtype = _CODE_DTYPES[codes.pop()] if codes else None

    def __repr__(self) -> str:
        return (
            f"ShardedBank(rank={self.rank}/{self.world_size}, rows=[{self.offset}, "
            f"{self.offset + self.sizes[self.rank]}) of {self.total}, D={self.dim}, "
            f"dtype={self.dtype})"
        )

    def communication_bytes(self, n: int, k: int) -> int:
        """Bytes each rank receives in one search of n queries: ``world_size × n × k × (4 + 8)``
        (``8 + 8`` for a float64 bank), not counting the few-integer agreement on the queries."""
        return self.world_size * n * k * ((8 if self.dtype == torch.float64 else 4) + 8)

    # ---------------------------------------------------------------------------------------
    def _check_queries(self, dist, queries):
        """Validate the queries locally, then agree on (N, D, dtype) across ranks.

        Returns (queries, N, result dtype). Raises on every rank when any rank failed.
        """
        error: Exception | None = None
        q = None
        try:
            q = check_features(as_tensor(queries, "queries"), "queries")
            if self.sizes[self.rank]:
                check_same_device(queries=q, bank=self.local_bank)
            if self.dim is not None and q.shape[1] != self.dim:
                raise ValueError(
                    f"dimension mismatch: queries have D={q.shape[1]} (shape "
                    f"{tuple(q.shape)}) but the sharded bank has D={self.dim}"
                )
        except (TypeError, ValueError) as exc:
            error = exc
        if error is None:
            meta = [q.shape[0], q.shape[1], _DTYPE_CODES[q.dtype], 0]
        else:
            meta = [0, _EMPTY, _EMPTY, 1]
        parts = _all_gather(
            dist,
            self.group,
            torch.tensor(meta, dtype=torch.int64, device=self._comm),
            self.world_size,
        )
        table = torch.stack(parts).cpu().tolist()
        failed = [r for r, row in enumerate(table) if row[3]]
        if failed:
            if error is not None:
                raise error
            raise ValueError(
                f"sharded search: the queries on rank(s) {failed} are invalid (see the error "
                "raised on those ranks)"
            )
        shapes = {(row[0], row[1]) for row in table}
        if len(shapes) > 1:
            listing = ", ".join(f"rank {r}: [{row[0]}, {row[1]}]" for r, row in enumerate(table))
            raise ValueError(
                "sharded search: queries must be replicated (identical on every rank), but "
                f"their shapes differ ({listing})"
            )
        all_f64 = all(row[2] == _DTYPE_CODES[torch.float64] for row in table)
        acc = torch.float64 if all_f64 and self.dtype == torch.float64 else torch.float32
        return q.contiguous(), q.shape[0], acc

    def _check_k_total(self, k: int, name: str = "k") -> None:
        if k > self.total:
            raise ValueError(
                f"{name}={k} out of range: need 1 <= {name} <= total bank size {self.total} "
                f"(shard sizes by rank: {self.sizes})"
            )

    def knn(self, queries, k: int, metric: str = "l2", *, exact: bool = True, backend=None):
        """The k nearest rows of the whole (sharded) bank for every query; same on every rank.

        A collective: every rank of the group must call it with the same queries, k and metric.

        Args:
            queries: ``[N, D]``, replicated (identical on every rank), on this rank's bank
                device (N may be 0).
            k: ``1 <= k <= total``.
            metric: ``"l2"``, ``"ip"`` or ``"cosine"`` (as ``ops.knn``).
            exact: as ``ops.knn`` (re-rank a reduced-precision bank in float32).
            backend: the ``ood_fast`` compute backend of the local search (as ``ops.knn``),
                not the ``torch.distributed`` backend.

        Returns:
            ``(distances [N, k], indices [N, k] int64)`` on the queries' device: distances
            ascending (float32; float64 when queries and bank are float64), global indices,
            ties to the lower global index — identical to ``ops.knn`` over the concatenated bank.
        """
        _check_metric(metric)
        k = _check_k(k)
        if not isinstance(exact, bool):
            raise TypeError(f"exact must be True or False, got {exact!r}")
        self._check_k_total(k)  # every rank knows the total: all raise, none waits
        dist = _dist()
        queries, n, acc = self._check_queries(dist, queries)
        device = queries.device
        if n == 0:
            return (
                torch.empty(0, k, dtype=acc, device=device),
                torch.empty(0, k, dtype=torch.long, device=device),
            )

        # 1. Local top-min(k, M_r), padded to k columns.
        m = self.sizes[self.rank]
        kk = min(k, m)
        dist_local = torch.full((n, k), float("inf"), dtype=acc, device=device)
        idx_local = torch.full((n, k), -1, dtype=torch.long, device=device)
        if kk:
            d, i = ops.knn(
                queries,
                self.local_bank,
                kk,
                metric,
                exact=exact,
                check_bank=False,
                backend=backend,
            )
            dist_local[:, :kk] = d.to(acc)
            idx_local[:, :kk] = i + self.offset

        # 2. All-gather every rank's candidates.
        d_parts = _all_gather(dist, self.group, dist_local.to(self._comm), self.world_size)
        i_parts = _all_gather(dist, self.group, idx_local.to(self._comm), self.world_size)

        # 3. Merge: drop the padding (rank r's valid columns are its first min(k, M_r)), then
        # order by (distance, global index): sort by index, then stably by distance.
        valid = [min(k, size) for size in self.sizes]
        cand_d = torch.cat([d_parts[r][:, : valid[r]] for r in range(self.world_size)], dim=1)
        cand_i = torch.cat([i_parts[r][:, : valid[r]] for r in range(self.world_size)], dim=1)
        order = torch.argsort(cand_i, dim=1)
        cand_d, cand_i = cand_d.gather(1, order), cand_i.gather(1, order)
        order = torch.sort(cand_d, dim=1, stable=True).indices[:, :k]
        return cand_d.gather(1, order).to(device), cand_i.gather(1, order).to(device)

    def kth_distance(self, queries, ks, metric: str = "l2", *, exact: bool = True, backend=None):
        """``[N, len(ks)]``: column j is the ``ks[j]``-th nearest distance in the whole bank.

        One sharded search with k = max(ks); equals ``ops.kth_distance`` over the concatenated
        bank. A collective, like ``knn``.
        """
        ks = _check_ks(ks)
        for k in ks:
            self._check_k_total(k, "ks entry")
        d, _ = self.knn(queries, max(ks), metric, exact=exact, backend=backend)
        cols = torch.tensor([k - 1 for k in ks], dtype=torch.long, device=d.device)
        return d.index_select(1, cols)


def sharded_knn(
    queries,
    local_bank,
    k: int,
    metric: str = "l2",
    *,
    group=None,
    backend=None,
    exact: bool = True,
):
    """``ShardedBank(local_bank, group).knn(queries, k, metric)`` in one call (a collective).

    Each call all-gathers the shard sizes again; build a ``ShardedBank`` once to search the same
    shards repeatedly. ``queries`` are replicated (identical on every rank); ``local_bank`` is
    this rank's ``[M_r, D]`` block (may be empty); ``backend`` is the ``ood_fast`` compute
    backend of the local search. Returns ``(distances [N, k], global indices [N, k])`` on every
    rank, identical to ``ops.knn`` over the shards concatenated in rank order. ``k`` larger than
    the total bank size raises ValueError on every rank.
    """
    bank = ShardedBank(local_bank, group=group)
    return bank.knn(queries, k, metric, exact=exact, backend=backend)


def sharded_kth_distance(
    queries,
    local_bank,
    ks,
    metric: str = "l2",
    *,
    group=None,
    backend=None,
    exact: bool = True,
):
    """``ShardedBank(local_bank, group).kth_distance(queries, ks, metric)`` in one call.

    ``[N, len(ks)]``, identical on every rank to ``ops.kth_distance`` over the concatenated bank.
    """
    bank = ShardedBank(local_bank, group=group)
    return bank.kth_distance(queries, ks, metric, exact=exact, backend=backend)
