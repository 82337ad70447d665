"""Reference exact k-nearest-neighbour search and prototype scores, streamed tile by tile.

This is the truth every compiled KNN backend is tested against, and the ``torch`` backend of
``ops.knn``, ``ops.kth_distance`` and ``ops.prototype_scores``. The bank is read once, in tiles
of ``BANK_TILE`` rows; for every tile and every chunk of ``QUERY_CHUNK`` queries the distances
of that tile are computed, its k smallest are selected and merged into a running top-k per
query. Nothing of size N × M (queries × bank) is ever built.

Metrics (distances: smaller = nearer; results are sorted ascending):

``"l2"``
    squared Euclidean distance ‖q − b‖², as faiss ``IndexFlatL2`` returns it. Computed in the
    expanded form ‖q‖² − 2 q·b + ‖b‖² (as faiss does) and clamped at 0.
``"ip"``
    the NEGATED inner product −q·b, so that "ascending" puts the most similar first. faiss
    ``IndexFlatIP`` returns +q·b sorted descending: its distances are exactly our negatives,
    with the same indices.
``"cosine"``
    1 − cos(q, b), in [0, 2] (clamped there against rounding). A zero vector (query or bank
    row) has cosine similarity 0 to everything, hence cosine distance 1: every vector is scaled
    by 1/‖v‖ when ‖v‖ > 0 and left at zero otherwise.

Precision: the computation runs in float64 when the queries and the bank are both float64 and
in float32 otherwise (a float16/bfloat16 bank is upcast tile by tile, which is exact).

Ties are broken by index: among equal distances the lower bank index comes first, both inside
the result and at the k-th position (which of several tied rows makes it into the top k).
"""

from __future__ import annotations

import torch

BANK_TILE = 8192  # bank rows per tile (tests shrink it to exercise tile boundaries)
QUERY_CHUNK = 1024  # queries per step: a step holds at most QUERY_CHUNK × BANK_TILE distances

METRICS = ("l2", "ip", "cosine")
PROTOTYPE_METRICS = ("cosine", "ip", "l2")
REDUCTIONS = ("max", "mean", "logsumexp")


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when every input is float64, else float32 (the dtype of every computed result)."""
    return torch.float64 if all(t.dtype == torch.float64 for t in tensors) else torch.float32


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm; zero rows stay zero (cosine similarity 0 to everything)."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def _prepare(x: torch.Tensor, metric: str, acc: torch.dtype):
    """Rows in the accumulation dtype (unit rows for cosine) and their squared norms (l2 only)."""
    xa = x.to(acc)
    if metric == "cosine":
        xa = _normalize(xa)
    sq = xa.square().sum(dim=1) if metric == "l2" else None
    return xa, sq


def _distances(qa, qsq, ba, bsq, metric: str) -> torch.Tensor:
    """``[n, t]`` distances between prepared query rows and prepared bank rows."""
    g = qa @ ba.T
    if metric == "l2":
        d = (qsq[:, None] + bsq[None, :]).sub_(g, alpha=2.0).clamp_(min=0.0)
    elif metric == "ip":
        d = g.neg_()
    else:  # cosine
        d = g.neg_().add_(1.0).clamp_(0.0, 2.0)
    # Only absurd inputs overflow (|x| ~ 1e19 in float32); keep the selection well defined then.
    return d.nan_to_num_(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))


def _smallest(d: torch.Tensor, k: int):
    """The k smallest entries of each row, ordered by (value, position): ``(values, positions)``.

    Among equal values the earlier position wins, both for membership (which of several rows
    tied at the k-th value get in) and for order. ``topk`` picks the set; only rows where more
    than k entries are <= the k-th value (ties straddling the boundary) are redone by rule.
    """
    width = d.shape[1]
    if k >= width:
        pos = torch.arange(width, device=d.device).expand(d.shape[0], width)
    else:
        pos = torch.topk(d, k, dim=1, largest=False, sorted=False).indices
        kth = d.gather(1, pos).amax(dim=1, keepdim=True)  # the k-th smallest value
        straddle = ((d <= kth).sum(dim=1) > k).nonzero().flatten()
        if straddle.numel():
            pos = pos.clone()
            pos[straddle] = _first_k_by_position(d[straddle], kth[straddle], k)
        pos = pos.sort(dim=1).values  # position order, so the stable sort below breaks ties
    vals = d.gather(1, pos)
    vals, order = torch.sort(vals, dim=1, stable=True)
    return vals, pos.gather(1, order)


def _first_k_by_position(d: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of every entry < kth plus the earliest entries == kth, k per row, ascending."""
    below = d < kth
    tied = d == kth
    room = k - below.sum(dim=1, keepdim=True)  # tied entries that still fit, >= 1
    take = below | (tied & (tied.cumsum(dim=1) <= room))
    return take.nonzero()[:, 1].view(d.shape[0], k)


def knn(queries: torch.Tensor, bank: torch.Tensor, k: int, metric: str = "l2"):
    """Exact k nearest bank rows of every query.

    Args:
        queries: ``[N, D]`` float16/bfloat16/float32/float64.
        bank: ``[M, D]`` float16/bfloat16/float32/float64, on the queries' device; M >= k >= 1.
        k: number of neighbours.
        metric: ``"l2"`` (squared), ``"ip"`` (negated inner product) or ``"cosine"``
            (1 − cosine similarity); see the module docstring.

    Returns:
        ``(distances [N, k], indices [N, k] int64)``, distances ascending (float64 when both
        inputs are float64, else float32), ties in index order.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    N, M = queries.shape[0], bank.shape[0]
    if not 1 <= k <= M:
        raise ValueError(f"k={k} out of range: need 1 <= k <= bank size M={M}")
    acc = accumulation_dtype(queries, bank)
    dev = queries.device
    if N == 0:
        empty = torch.empty(0, k, dtype=acc, device=dev)
        return empty, torch.empty(0, k, dtype=torch.long, device=dev)
    qa, qsq = _prepare(queries, metric, acc)
    best_d = torch.empty(N, 0, dtype=acc, device=dev)  # running top-k, grows to k columns
    best_i = torch.empty(N, 0, dtype=torch.long, device=dev)
    for s in range(0, M, BANK_TILE):
        ba, bsq = _prepare(bank[s : s + BANK_TILE], metric, acc)
        t = ba.shape[0]
        new_d, new_i = [], []
        for q0 in range(0, N, QUERY_CHUNK):
            rows = slice(q0, q0 + QUERY_CHUNK)
            d = _distances(qa[rows], None if qsq is None else qsq[rows], ba, bsq, metric)
            td, tp = _smallest(d, min(k, t))
            # Running results (lower indices) first, so position order is index order on ties.
            cand_d = torch.cat([best_d[rows], td], dim=1)
            cand_i = torch.cat([best_i[rows], tp + s], dim=1)
            md, mp = _smallest(cand_d, min(k, cand_d.shape[1]))
            new_d.append(md)
            new_i.append(cand_i.gather(1, mp))
        best_d, best_i = torch.cat(new_d), torch.cat(new_i)
    return best_d, best_i


def kth_distance(queries: torch.Tensor, bank: torch.Tensor, ks, metric: str = "l2"):
    """``[N, len(ks)]``: column j is the ks[j]-th smallest distance (1-based) of every query.

    One pass over the bank: the top max(ks), then a column pick. Equals ``knn(..., k)[0][:, k-1]``
    for each k.
    """
    ks = [int(k) for k in ks]
    d, _ = knn(queries, bank, max(ks), metric)
    cols = torch.tensor([k - 1 for k in ks], dtype=torch.long, device=d.device)
    return d.index_select(1, cols)


def prototype_scores(
    x: torch.Tensor,
    prototypes: torch.Tensor,
    reduce: str = "max",
    temperature: float = 1.0,
    metric: str = "cosine",
):
    """Per-class and overall prototype similarity scores (higher = closer to a class).

    With s[n, c, m] the similarity of x_n to prototype m of class c —
    cosine similarity (zero vectors: 0), inner product x·p, or −‖x − p‖² (``"l2"``) —

        per_class[n, c] = reduce_m ( s[n, c, m] / temperature )
            max:       max_m
            mean:      (1/M) Σ_m
            logsumexp: log Σ_m exp(·)          (no −log M term)
        overall[n] = max_c per_class[n, c]

    For ``max`` and ``mean`` the temperature only rescales; for ``logsumexp`` it sets how soft
    the maximum is.

    Args:
        x: ``[N, D]`` features.
        prototypes: ``[C, M, D]``: M prototypes for each of C classes.

    Returns:
        ``(per_class [N, C], overall [N])`` in float64 when both inputs are float64, else float32.
    """
    if metric not in PROTOTYPE_METRICS:
        raise ValueError(f"metric must be one of {PROTOTYPE_METRICS}, got {metric!r}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    C, M, D = prototypes.shape
    N = x.shape[0]
    acc = accumulation_dtype(x, prototypes)
    per_class = torch.empty(N, C, dtype=acc, device=x.device)
    xa, xsq = _prepare(x, metric, acc)
    classes_per_tile = max(1, BANK_TILE // M)
    for c0 in range(0, C, classes_per_tile):
        block = prototypes[c0 : c0 + classes_per_tile]
        cc = block.shape[0]
        pa, psq = _prepare(block.reshape(cc * M, D), metric, acc)
        for q0 in range(0, N, QUERY_CHUNK):
            rows = slice(q0, q0 + QUERY_CHUNK)
            g = xa[rows] @ pa.T  # [n, cc*M]
            if metric == "l2":
                s = (xsq[rows, None] + psq[None, :]).sub_(g, alpha=2.0).clamp_(min=0.0).neg_()
            else:
                s = g
            s = (s / temperature).view(-1, cc, M)
            if reduce == "max":
                r = s.amax(dim=2)
            elif reduce == "mean":
                r = s.mean(dim=2)
            else:
                r = torch.logsumexp(s, dim=2)
            per_class[rows, c0 : c0 + cc] = r
    return per_class, per_class.amax(dim=1)
