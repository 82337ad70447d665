"""Exact k-nearest-neighbour search and prototype scores: the ops behind KNN-style OOD scores.

Math (all backends; ``reference.knn`` is the readable version). For a query q and bank row b:

    "l2"      d = ‖q − b‖²                    squared, as faiss IndexFlatL2
    "ip"      d = −q·b                         negated, so ascending = most similar first
                                               (faiss IndexFlatIP returns +q·b, descending)
    "cosine"  d = 1 − q·b / (‖q‖ ‖b‖) ∈ [0, 2]  a zero vector has cosine similarity 0 to
                                               everything, i.e. cosine distance 1

The bank is streamed tile by tile; each tile's distances are reduced to a running top-k per
query, so the N × M distance matrix never exists. Ties are broken by bank index (lower first).

Dtypes: queries and bank may each be float16, bfloat16, float32 or float64, independently.
Everything is computed in float32 (distances come back float32) unless both are float64, which
computes and returns float64.

Exact search over a reduced-precision bank (``exact=True``, the default): the result equals the
float32 search over the bank's values upcast to float32 (an exact conversion). A compiled
backend may run a fast low-precision pass (e.g. bf16 queries × bf16 bank with fp32 accumulation)
to collect k + margin candidates per query, then recompute their distances in float32 and
re-rank them. The margin is sufficient when every row that could belong to the exact top k is a
candidate: with δ a bound on |d_low − d_fp32| for one query (for the query rounding to a format
with unit roundoff u: δ ≤ 2u‖q‖·max‖b‖ for "l2", u‖q‖·max‖b‖ for "ip", u for "cosine", plus the
accumulation error), the set is certified when the (k + margin)-th low-precision distance
exceeds the k-th one by more than 2δ; a backend that cannot certify a query must widen its
candidate set or fall back to the full fp32 computation for it. The C++ backend does this for a bf16
bank on processors with AMX-BF16 (64+ queries, k <= 512): fp32 queries split into bf16 hi + lo
parts (δ then holds 2^-16‖q‖·max‖b‖ plus the fp32 accumulation bounds), k + max(64, k/2)
candidates, and a full fp32 search for any query it cannot certify (csrc/cpu/knn.cpp states the
bound in full). ``exact=False`` returns the low-precision pass directly. The torch reference always computes in float32 (or float64), so for
it ``exact`` changes nothing.

Public entry points: ``knn``, ``kth_distance``, ``prototype_scores``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .. import _backend
from .._validate import as_tensor, check_features, check_same_device
from ..reference import knn as ref

METRICS = ref.METRICS
PROTOTYPE_METRICS = ref.PROTOTYPE_METRICS
REDUCTIONS = ref.REDUCTIONS


def _check_k(k, M: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(k).__name__} {k!r}")
    k = int(k)
    if not 1 <= k <= M:
        raise ValueError(f"{name}={k} out of range: need 1 <= {name} <= bank size M={M}")
    return k


def _check_metric(metric, allowed) -> str:
    if metric not in allowed:
        raise ValueError(f"metric must be one of {allowed}, got {metric!r}")
    return metric


def _check_query_bank(queries, bank, check_bank: bool = True):
    """Both as tensors on one device, ``[N, D]`` and ``[M, D]``, floating, finite, M >= 1."""
    queries, bank = as_tensor(queries, "queries"), as_tensor(bank, "bank")
    check_same_device(queries=queries, bank=bank)  # before any value is read
    bank = check_features(bank, "bank", finite=check_bank)
    queries = check_features(queries, "queries")
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(
            f"dimension mismatch: queries have D={queries.shape[1]} "
            f"(shape {tuple(queries.shape)}) but bank has D={bank.shape[1]} "
            f"(shape {tuple(bank.shape)})"
        )
    if bank.shape[0] == 0:
        raise ValueError(f"bank is empty (shape {tuple(bank.shape)}): add at least one row")
    return queries.contiguous(), bank.contiguous()


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def knn(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    metric: str = "l2",
    *,
    exact: bool = True,
    check_bank: bool = True,
    backend: str | None = None,
):
    """The k nearest bank rows of every query, exactly.

    Args:
        queries: ``[N, D]`` float16/bfloat16/float32/float64 (a tensor or numpy array); N may be 0.
        bank: ``[M, D]`` float16/bfloat16/float32/float64 on the queries' device, M >= 1.
        k: ``1 <= k <= M``.
        metric: ``"l2"`` (squared Euclidean), ``"ip"`` (negated inner product) or ``"cosine"``
            (1 − cosine similarity; zero vectors at distance 1 from everything).
        exact: for a float16/bfloat16 bank, re-rank the low-precision candidates in float32 so
            the result equals the float32 search (see the module docstring); ``False`` lets a
            compiled backend skip the re-rank.
        check_bank: scan the bank for NaN/Inf (one pass over it). ``False`` skips that scan,
            for callers that validated the bank once (an estimator's ``fit``): a full pass over
            a large bank on every call would dominate small query batches. Shapes, dtypes and
            devices are always checked; queries are always scanned.
        backend: ``"cpu"``, ``"triton"``, ``"cuda"``, ``"torch"`` or None (automatic).

    Returns:
        ``(distances [N, k], indices [N, k] int64)``: distances ascending, float32 (float64 when
        queries and bank are both float64); ties in bank-index order.

    Raises:
        ValueError: k out of range, empty bank, NaN/Inf values, wrong rank, dimension mismatch,
            queries and bank on different devices, unknown metric.
        TypeError: non-floating features, non-integer k.
    """
    _check_metric(metric, METRICS)
    _check_bool(exact, "exact")
    _check_bool(check_bank, "check_bank")
    queries, bank = _check_query_bank(queries, bank, check_bank)
    k = _check_k(k, bank.shape[0])
    return _backend.call("knn", queries, bank, k, metric, exact, backend=backend)


def kth_distance(
    queries: torch.Tensor,
    bank: torch.Tensor,
    ks,
    metric: str = "l2",
    *,
    exact: bool = True,
    check_bank: bool = True,
    backend: str | None = None,
):
    """The k-th nearest distance for several k at once, in one pass over the bank.

    Column j is ``knn(queries, bank, ks[j], metric)[0][:, ks[j] - 1]``: a whole hyperparameter
    sweep (e.g. ks = [50, 100, 200, 500, 1000]) costs one search with k = max(ks).

    Args:
        queries: ``[N, D]``; bank: ``[M, D]`` (as for ``knn``).
        ks: a non-empty sequence of integers in ``[1, M]`` (any order, repeats allowed).
        metric, exact, check_bank, backend: as for ``knn``.

    Returns:
        ``[N, len(ks)]`` distances (float32, or float64 when both inputs are float64).
    """
    _check_metric(metric, METRICS)
    _check_bool(exact, "exact")
    _check_bool(check_bank, "check_bank")
    queries, bank = _check_query_bank(queries, bank, check_bank)
    if isinstance(ks, str | bytes) or not hasattr(ks, "__iter__"):
        raise TypeError(f"ks must be a sequence of integers, got {type(ks).__name__} {ks!r}")
    if isinstance(ks, torch.Tensor | np.ndarray):
        ks = ks.tolist()
    ks = list(ks)
    if not ks:
        raise ValueError("ks is empty: give at least one k")
    ks = [_check_k(k, bank.shape[0], name="ks entry") for k in ks]
    return _backend.call("kth_distance", queries, bank, ks, metric, exact, backend=backend)


def prototype_scores(
    x: torch.Tensor,
    prototypes: torch.Tensor,
    reduce: str = "max",
    temperature: float = 1.0,
    metric: str = "cosine",
    *,
    backend: str | None = None,
):
    """Similarity of every feature to every class's prototypes, reduced per class and overall.

    With s[n, c, m] the similarity of x_n to prototype m of class c — ``"cosine"``: cosine
    similarity (a zero vector has similarity 0 to everything); ``"ip"``: x·p; ``"l2"``: −‖x − p‖² —

        per_class[n, c] = reduce_m ( s[n, c, m] / temperature )
            "max": max over m;  "mean": average over m;  "logsumexp": log Σ_m exp(·) (no −log M)
        overall[n] = max_c per_class[n, c]

    Higher = closer to the class. For ``"max"``/``"mean"`` the temperature only rescales.

    Args:
        x: ``[N, D]`` features (float16/bfloat16/float32/float64); N may be 0.
        prototypes: ``[C, M, D]`` (C, M >= 1), or ``[C, D]`` for one prototype per class; on
            x's device.
        reduce: ``"max"``, ``"mean"`` or ``"logsumexp"``.
        temperature: a finite number > 0.
        metric: ``"cosine"``, ``"ip"`` or ``"l2"``.
        backend: ``"cpu"``, ``"triton"``, ``"cuda"``, ``"torch"`` or None (automatic).

    Returns:
        ``(per_class [N, C], overall [N])``, float32 (float64 when both inputs are float64).
    """
    _check_metric(metric, PROTOTYPE_METRICS)
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number, got {temperature!r}")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    x, prototypes = as_tensor(x, "x"), as_tensor(prototypes, "prototypes")
    check_same_device(x=x, prototypes=prototypes)
    if prototypes.dim() == 2:
        prototypes = prototypes[:, None, :]
    if prototypes.dim() != 3:
        raise ValueError(
            f"prototypes: expected [C, M, D] (or [C, D]), got shape {tuple(prototypes.shape)}"
        )
    C, M, D = prototypes.shape
    if C == 0 or M == 0:
        raise ValueError(
            f"prototypes is empty (shape {tuple(prototypes.shape)}): need C >= 1 classes "
            "with M >= 1 prototypes each"
        )
    check_features(prototypes.reshape(C * M, D), "prototypes")
    x = check_features(x, "x")
    if x.shape[1] != D:
        raise ValueError(
            f"dimension mismatch: x has D={x.shape[1]} (shape {tuple(x.shape)}) but prototypes "
            f"have D={D} (shape {tuple(prototypes.shape)})"
        )
    return _backend.call(
        "prototype_scores",
        x.contiguous(),
        prototypes.contiguous(),
        reduce,
        temperature,
        metric,
        backend=backend,
    )


# ---------------------------------------------------------------------------------------------
# Backends. Contracts (inputs validated, contiguous, on one device):
#   knn(queries [N, D], bank [M, D], k, metric, exact) -> (distances [N, k], indices [N, k])
#   kth_distance(queries, bank, ks: list[int], metric, exact) -> [N, len(ks)]
#   prototype_scores(x [N, D], prototypes [C, M, D], reduce, temperature, metric)
#       -> (per_class [N, C], overall [N])
# The torch reference computes in float32/float64 throughout, so it is exact for every bank
# dtype and ignores ``exact``.
# ---------------------------------------------------------------------------------------------


@_backend.register("knn", "torch")
def _torch_knn(queries, bank, k, metric, exact):
    return ref.knn(queries, bank, k, metric)


@_backend.register("kth_distance", "torch")
def _torch_kth_distance(queries, bank, ks, metric, exact):
    return ref.kth_distance(queries, bank, ks, metric)


_backend.register("prototype_scores", "torch")(ref.prototype_scores)


# Compiled backends share one contract: knn over float32/float16/bfloat16 queries and bank,
# metrics "l2" and "ip" natively; "cosine" is "ip" over unit vectors, d = 1 + (−q̂·b̂), with zero
# vectors left at zero (similarity 0, distance 1, as the reference defines). kth_distance is one
# knn with the largest k, then a gather: one pass over the bank for the whole sweep.

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_CODE = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_METRIC_CODE = {"l2": 0, "ip": 1}


def _compiled_checks(backend: str):
    from .. import _extensions as ext

    def knn_check(queries, bank, k, metric, exact) -> list[str]:
        why = ext.missing_symbol(backend, "knn")
        for name, t in (("queries", queries), ("bank", bank)):
            if t.dtype not in _KERNEL_DTYPES:
                why.append(
                    f"compiled KNN kernels take float32/float16/bfloat16 {name}, got {t.dtype}"
                )
        return why

    def kth_check(queries, bank, ks, metric, exact) -> list[str]:
        return knn_check(queries, bank, max(ks), metric, exact)

    return knn_check, kth_check


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm in float32; zero rows stay zero."""
    x = x.float()
    norm = x.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, x / norm.clamp(min=torch.finfo(torch.float32).tiny), x)


def _compiled_knn(run):
    """Wrap ``run(queries, bank, k, metric_code, exact) -> (d, i)`` with the cosine rule."""

    def knn_impl(queries, bank, k, metric, exact):
        if metric == "cosine":
            d, i = run(_unit_rows(queries), _unit_rows(bank), k, _METRIC_CODE["ip"], exact)
            return d.add_(1.0).clamp_(0.0, 2.0), i
        return run(queries, bank, k, _METRIC_CODE[metric], exact)

    def kth_impl(queries, bank, ks, metric, exact):
        d, _ = knn_impl(queries, bank, max(ks), metric, exact)
        return d[:, [k - 1 for k in ks]]

    return knn_impl, kth_impl


def _run_cpu(queries, bank, k, metric_code, exact):
    from .. import _extensions as ext

    N = queries.shape[0]
    d = torch.empty(N, k, dtype=torch.float32)
    i = torch.empty(N, k, dtype=torch.int64)
    if N:
        ext.cpu_module().knn(
            queries.data_ptr(), _DTYPE_CODE[queries.dtype], N,
            bank.data_ptr(), _DTYPE_CODE[bank.dtype], bank.shape[0], bank.shape[1],
            k, metric_code, exact, d.data_ptr(), i.data_ptr(), ext.num_threads(),
        )  # fmt: skip
    return d, i


def _run_cuda(queries, bank, k, metric_code, exact):
    from .. import _extensions as ext

    N = queries.shape[0]
    d = torch.empty(N, k, dtype=torch.float32, device=queries.device)
    i = torch.empty(N, k, dtype=torch.int64, device=queries.device)
    if N:
        ext.cuda_module().knn(
            queries.data_ptr(), _DTYPE_CODE[queries.dtype], N,
            bank.data_ptr(), _DTYPE_CODE[bank.dtype], bank.shape[0], bank.shape[1],
            k, metric_code, exact, d.data_ptr(), i.data_ptr(),
            torch.cuda.current_stream(queries.device).cuda_stream,
        )  # fmt: skip
    return d, i


def _run_triton(queries, bank, k, metric_code, exact):
    from ..kernels import knn as tk  # imports triton: only when this backend runs

    return tk.knn(queries, bank, k, metric_code, exact)


for _name, _run in (("cpu", _run_cpu), ("cuda", _run_cuda), ("triton", _run_triton)):
    _knn_impl, _kth_impl = _compiled_knn(_run)
    _knn_check, _kth_check = _compiled_checks(_name)
    _backend.register("knn", _name, check=_knn_check)(_knn_impl)
    _backend.register("kth_distance", _name, check=_kth_check)(_kth_impl)
