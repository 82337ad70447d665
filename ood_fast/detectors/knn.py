"""Deep nearest-neighbour OOD scores (Sun et al. 2022) over an exact k-NN search of a feature bank.

``KNN`` keeps a bank of training features and scores a query by its distance to the k-th
nearest bank row (higher score = more in-distribution):

    OpenOOD (default: ``normalize=True, metric="l2", squared=True``)
        ẑ = z / (‖z‖ + 1e-10)              OpenOOD's normalizer, replicated exactly: the 1e-10
                                           is added to the norm (a zero row stays zero)
        score = −‖q̂ − b̂_(k)‖²              squared L2 to the k-th nearest normalized bank row,
                                           as faiss IndexFlatL2 returns it (conf = −D[:, k−1])
    pytorch-ood (``squared=False``)
        score = −‖q̂ − b̂_(k)‖               the unsquared distance (sklearn NearestNeighbors,
                                           ``dist[:, -1]``), negated so that higher = ID.
                                           pytorch-ood normalizes with z / max(‖z‖, 1e-12)
                                           instead; the two normalizers differ only for rows
                                           with ‖z‖ ≲ 1e-4 (relative difference 1e-10/‖z‖) and
                                           both keep a zero row at zero. We use OpenOOD's.
    ``metric="ip"``      score = q̂·b̂_(k)         (the k-th largest inner product)
    ``metric="cosine"``  score = −(1 − cos(q, b_(k)))

In general ``score = −d_k`` with d_k the k-th smallest distance of ``ood_fast.ops.knn`` (square
root taken for ``squared=False``). The search always goes through ``ood_fast.ops`` (``knn``,
``kth_distance``), so it runs on whichever backend is selected (C++, Triton, CUDA, torch).

Banks (``fit`` replaces, ``add`` appends; indices count rows in the order they were added):

* torch tensors and numpy arrays live in memory. They are normalized once, at ``fit``/``add``,
  and stored as ``bank_dtype`` (default float32; float16/bfloat16 halve the memory, and scores
  stay exact: ``ops.knn`` re-ranks the reduced-precision candidates in float32, so the result
  equals the float32 search over the rounded bank). With ``normalize=False`` and a float32 bank
  the stored bank may share memory with the input.
* a path to a ``.npy`` file or an ``np.memmap`` (e.g. ``np.load(path, mmap_mode="r")``) is NOT
  loaded: it is kept on disk and streamed at every search, ``CHUNK_ROWS`` rows at a time (fewer
  when a chunk would exceed ``CHUNK_BYTES`` as float32), each chunk normalized on the fly and
  searched with ``ops.knn``; the per-chunk top-k's are merged into a running top-k (exact ties:
  lower bank index first, as in ``ops.knn``). Memory: one chunk plus the ``[N, k]`` state. A
  read-only, C-contiguous memmap is read with plain file reads (not through the mapping), so
  the file's pages do not accumulate in the process's resident memory. ``fit`` makes one pass
  over the file to reject NaN/Inf. A memory-mapped bank stays valid only while its file is
  unchanged.

``subsample`` keeps a seeded random subset of each ``fit``/``add`` batch (a fraction in (0, 1]
or a row count), as the KNN+ variants of OpenOOD/Sun et al. do on ImageNet; the kept rows keep
their order. A subsampled memory-mapped bank is read into memory (only the kept rows).

Queries are moved to the bank's device for the search and the scores returned on the queries'
device; a memory-mapped bank is streamed to the queries' device. Scores are float32 and not
differentiable.

``save(path)`` copies the bank into the safetensors file (in-memory banks as stored, i.e.
normalized and in ``bank_dtype``; memory-mapped banks as their raw rows, which needs them to fit
in memory once); ``save(path, bank="reference")`` stores only the file name and position of a
memory-mapped bank (the file must still be there, unchanged, at ``load``). Reloaded estimators
score bit-identically.
"""

from __future__ import annotations

import mmap
import numbers
import os
import warnings

import numpy as np
import torch

from .. import _io, ops
from .._backend import BACKENDS
from .._validate import check_features
from .mahalanobis import NotFittedError

__all__ = ["KNN", "openood_normalize"]

CHUNK_ROWS = 65536  # bank rows per streamed chunk (tests shrink it)
CHUNK_BYTES = 64 << 20  # ... and at most this many bytes per chunk as float32
NORM_EPS = 1e-10  # OpenOOD's normalizer: x / (‖x‖ + 1e-10)
METRICS = ("l2", "ip", "cosine")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NP_FLOATS = (np.float16, np.float32, np.float64)


def openood_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (as float32) divided by ``‖row‖ + 1e-10``: OpenOOD's KNN normalizer."""
    x = x.to(torch.float32)
    return x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + NORM_EPS)


def _check_int(value, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if int(value) < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _bank_dtype(value) -> torch.dtype:
    if value is None:
        return torch.float32
    if isinstance(value, str) and value.lower() in _DTYPES:
        return _DTYPES[value.lower()]
    if isinstance(value, torch.dtype) and value in _DTYPE_NAMES:
        return value
    raise ValueError(
        f"bank_dtype must be None (float32), torch.float32, torch.float16 or torch.bfloat16, "
        f"got {value!r}"
    )


def _chunk_rows(D: int) -> int:
    return max(1, min(CHUNK_ROWS, CHUNK_BYTES // max(1, 4 * D)))


# ---------------------------------------------------------------------------------------------
# Bank segments
# ---------------------------------------------------------------------------------------------


class _Memory:
    """An in-memory segment: rows already prepared (normalized, in bank_dtype)."""

    kind = "memory"

    def __init__(self, t: torch.Tensor):
        self.t = t

    @property
    def rows(self) -> int:
        return self.t.shape[0]


def _file_region(a: np.ndarray):
    """``(filename, byte position of a[0, 0])`` when ``a`` is a C-contiguous shared (not
    copy-on-write) memmap view whose bytes can be read straight from its file; else None."""
    if not isinstance(a, np.memmap) or not a.flags.c_contiguous or a.size == 0:
        return None
    fname, mp, mode = getattr(a, "filename", None), getattr(a, "_mmap", None), a.mode
    if fname is None or mp is None or mode not in ("r", "r+", "w+"):
        return None
    try:
        base = np.frombuffer(mp, dtype=np.uint8).ctypes.data
        start = a.offset - a.offset % mmap.ALLOCATIONGRANULARITY
        pos = start + (a.ctypes.data - base)
        row = a.shape[1] * a.itemsize
        if pos < 0 or os.path.getsize(fname) < pos + a.nbytes:
            return None
        with open(fname, "rb", buffering=0) as f:
            f.seek(pos)
            first = f.read(row)
        if first != a[0].tobytes():  # the position must really be that of row 0
            return None
    except (OSError, ValueError, TypeError, BufferError):
        return None
    return os.fspath(fname), int(pos)


class _Stream:
    """A segment read chunk by chunk at every search: a memmap (or, after ``load`` of a copied
    memmap bank, a tensor of its raw rows). Rows are prepared per chunk."""

    kind = "stream"

    def __init__(self, source, region=None):
        self.source = source  # np.ndarray (memmap) or torch.Tensor [M, D], raw values
        self.region = region  # (filename, position of row 0) for direct file reads, or None

    @property
    def rows(self) -> int:
        return self.source.shape[0]

    @property
    def dim(self) -> int:
        return self.source.shape[1]

    def chunks(self, n: int):
        """Yield ``(start, raw rows [r, D] CPU tensor)`` for consecutive chunks of ``n`` rows."""
        M = self.rows
        if isinstance(self.source, torch.Tensor):
            for s in range(0, M, n):
                yield s, self.source[s : s + n]
            return
        if self.region is None:
            for s in range(0, M, n):
                yield s, torch.from_numpy(np.array(self.source[s : s + n], copy=True))
            return
        fname, pos = self.region
        D, dt = self.dim, self.source.dtype
        rowbytes = D * dt.itemsize
        buf = np.empty((min(n, M), D), dtype=dt)
        with open(fname, "rb", buffering=0) as f:
            for s in range(0, M, n):
                r = min(n, M - s)
                view = memoryview(buf[:r].reshape(-1).view(np.uint8))
                f.seek(pos + s * rowbytes)
                got = 0
                while got < r * rowbytes:
                    k = f.readinto(view[got:])
                    if not k:
                        raise OSError(
                            f"{fname}: file ended early (truncated after fit?): needed "
                            f"{r * rowbytes} bytes at offset {pos + s * rowbytes}, got {got}"
                        )
                    got += k
                yield s, torch.from_numpy(buf[:r])

    def raw_tensor(self) -> torch.Tensor:
        if isinstance(self.source, torch.Tensor):
            return self.source
        with warnings.catch_warnings():  # read-only memmap: only read (and copied by _io)
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.ascontiguousarray(self.source))


def _open_bank(bank):
    """A path / memmap -> 2-D floating memmap; anything else -> None."""
    if isinstance(bank, str | os.PathLike):
        path = os.fspath(bank)
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise ValueError(f"bank: {path!r} is not a readable .npy file ({exc})") from exc
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"bank: {path!r} holds no single array (.npz is not supported)")
        return arr
    if isinstance(bank, np.memmap):
        return bank
    return None


def _check_memmap(a: np.ndarray, dim: int | None) -> None:
    if a.dtype.type not in _NP_FLOATS:
        raise TypeError(f"bank: expected a floating memmap (float16/32/64), got {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"bank: expected a 2-D [M, D] matrix, got shape {tuple(a.shape)}")
    if dim is not None and a.shape[1] != dim:
        raise ValueError(
            f"bank: feature dimension mismatch: expected D={dim}, got D={a.shape[1]} "
            f"(shape {tuple(a.shape)})"
        )


# ---------------------------------------------------------------------------------------------
# Estimator
# ---------------------------------------------------------------------------------------------


@_io.register("knn")
class KNN:
    """k-th nearest-neighbour distance OOD score over a (possibly disk-resident) feature bank.

    Args:
        k: the neighbour whose distance is the score (1 <= k <= bank size at score time).
        normalize: L2-normalize bank and queries with OpenOOD's ``x / (‖x‖ + 1e-10)``.
        metric: ``"l2"`` (squared Euclidean), ``"ip"`` (inner product) or ``"cosine"``.
        squared: with ``"l2"``: True → −‖q̂ − b̂_(k)‖² (OpenOOD), False → −‖q̂ − b̂_(k)‖
            (pytorch-ood). Only ``"l2"`` accepts False.
        subsample: None (keep every row), a fraction in (0, 1] or a row count >= 1, applied to
            each ``fit``/``add`` batch with a generator seeded from ``seed`` and the call number
            (a fraction keeps ``max(1, round(fraction · rows))`` rows; a count larger than the
            batch keeps it all).
        seed: integer seed of the subsampling.
        backend: ``ood_fast.ops`` backend (None = automatic).
        bank_dtype: storage of in-memory banks and of streamed chunks: None/float32, float16,
            bfloat16 (also as strings "fp16", "bf16", ...). Scores stay exact (see the module
            docstring); with ``normalize=False`` values beyond float16's range raise.

    Fitted attributes: ``n_samples_`` (bank rows), ``n_features_in_``, ``bank_`` (the stored
    bank as one tensor; materializes a memory-mapped bank).

    See the module docstring for the formulas, the bank kinds and persistence.
    """

    def __init__(
        self,
        k: int = 50,
        normalize: bool = True,
        metric: str = "l2",
        squared: bool = True,
        subsample=None,
        seed: int = 0,
        backend: str | None = None,
        bank_dtype=None,
    ):
        self.k = _check_int(k, "k")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be True or False, got {normalize!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if not isinstance(squared, bool):
            raise TypeError(f"squared must be True or False, got {squared!r}")
        if not squared and metric != "l2":
            raise ValueError(
                f"squared=False (unsquared distance) applies to metric='l2' only, got "
                f"metric={metric!r}"
            )
        if subsample is not None:
            if isinstance(subsample, bool) or not isinstance(subsample, numbers.Real):
                raise TypeError(
                    f"subsample must be None, a fraction in (0, 1] or a row count, got {subsample!r}"
                )
            if isinstance(subsample, numbers.Integral):
                subsample = _check_int(subsample, "subsample")
            else:
                subsample = float(subsample)
                if not 0.0 < subsample <= 1.0:
                    raise ValueError(
                        f"subsample: a fraction must be in (0, 1], got {subsample} (give an int "
                        "for a row count)"
                    )
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
        self.normalize = normalize
        self.metric = metric
        self.squared = squared
        self.subsample = subsample
        self.seed = _check_int(seed, "seed", low=-(2**63))
        self.backend = backend
        self.bank_dtype = _bank_dtype(bank_dtype)
        self._segments: list = []
        self._dim: int | None = None
        self._calls = 0  # fit/add batches seen (seeds the subsampling of each)

    # -- fitted attributes ---------------------------------------------------------------------

    def _ensure_fitted(self):
        if not self._segments:
            raise NotFittedError("KNN is not fitted: call fit(bank) first")

    @property
    def n_samples_(self) -> int:
        self._ensure_fitted()
        return sum(s.rows for s in self._segments)

    @property
    def n_features_in_(self) -> int:
        self._ensure_fitted()
        return self._dim

    @property
    def bank_(self) -> torch.Tensor:
        """The stored bank ``[M, D]`` (prepared: normalized, bank_dtype). A memory-mapped bank is
        read and prepared in full: only for banks that fit in memory."""
        self._ensure_fitted()
        if len(self._segments) == 1 and self._segments[0].kind == "memory":
            return self._segments[0].t
        parts = []
        for seg in self._segments:
            if seg.kind == "memory":
                parts.append(seg.t.cpu())
            else:
                n = _chunk_rows(seg.dim)  # chunks may share one read buffer: copy each
                parts.extend(self._prepare(c).clone() for _, c in seg.chunks(n))
        return torch.cat(parts)

    # -- fitting -------------------------------------------------------------------------------

    def fit(self, bank) -> KNN:
        """Replace the bank: a tensor/array ``[M, D]``, a ``.npy`` path or an ``np.memmap``."""
        self._segments, self._dim, self._calls = [], None, 0
        try:
            return self._append(bank, fitting=True)
        except BaseException:
            self._segments, self._dim, self._calls = [], None, 0
            raise

    def add(self, bank) -> KNN:
        """Append rows to the bank (indices continue after the current rows); an empty batch is
        a no-op. Same inputs as ``fit``; on an unfitted estimator this is ``fit``."""
        if not self._segments:
            return self.fit(bank)
        return self._append(bank, fitting=False)

    def _subsample_rows(self, M: int):
        """Sorted kept row indices for a batch of M rows, or None to keep all."""
        s = self.subsample
        if s is None:
            return None
        m = min(M, s) if isinstance(s, int) else max(1, min(M, int(round(s * M))))
        if m >= M:
            return None
        g = torch.Generator().manual_seed((self.seed + 0x9E3779B9 * self._calls) % (2**63))
        return torch.randperm(M, generator=g)[:m].sort().values

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Raw rows -> stored form: float32, normalized (if normalize), cast to bank_dtype."""
        x = openood_normalize(x) if self.normalize else x.to(torch.float32)
        out = x.to(self.bank_dtype)
        if self.bank_dtype == torch.float16 and not self.normalize and out.numel():
            if not bool(torch.isfinite(out.sum(dtype=torch.float32))) and not bool(
                torch.isfinite(out).all()
            ):
                raise ValueError(
                    "bank: values exceed float16's range (|x| > 65504) and would become Inf: "
                    "use bank_dtype=torch.bfloat16 or float32, or normalize=True"
                )
        return out

    def _append(self, bank, fitting: bool) -> KNN:
        mm = _open_bank(bank)
        if mm is not None:
            _check_memmap(mm, self._dim)
            M = mm.shape[0]
            if M == 0:
                if fitting:
                    raise ValueError(f"bank is empty (shape {tuple(mm.shape)}): need >= 1 row")
                return self
            keep = self._subsample_rows(M)
            self._calls += 1
            if keep is not None:  # only the kept rows, read into memory
                rows = torch.from_numpy(np.ascontiguousarray(mm[keep.numpy()]))
                return self._append_memory(rows, fitting)
            seg = _Stream(mm, _file_region(mm))
            n = _chunk_rows(mm.shape[1])
            for s, chunk in seg.chunks(n):  # one validation pass over the file
                if not bool(torch.isfinite(chunk.sum(dtype=torch.float64))):
                    bad = ~torch.isfinite(chunk)
                    if bool(bad.any()):
                        first = s + int(bad.any(dim=1).nonzero()[0, 0])
                        raise ValueError(
                            f"bank: non-finite values (NaN/Inf) in the memory-mapped bank; "
                            f"first at row {first}"
                        )
                if self.bank_dtype == torch.float16 and not self.normalize:
                    self._prepare(chunk)  # float16 overflow check
            self._dim = mm.shape[1]
            self._segments.append(seg)
            return self
        x = check_features(bank, "bank", dim=self._dim, finite=False)
        if x.shape[0] == 0:
            if fitting:
                raise ValueError(f"bank is empty (shape {tuple(x.shape)}): need >= 1 row")
            return self
        keep = self._subsample_rows(x.shape[0])
        self._calls += 1
        if keep is not None:
            x = x.index_select(0, keep.to(x.device))
        return self._append_memory(x, fitting)

    def _append_memory(self, x: torch.Tensor, fitting: bool) -> KNN:
        x = check_features(x.detach(), "bank", dim=self._dim)
        M, D = x.shape
        if self.normalize or x.dtype != self.bank_dtype:
            prepared = torch.empty(M, D, dtype=self.bank_dtype, device=x.device)
            n = _chunk_rows(D)
            for s in range(0, M, n):  # bounded temporaries: one chunk at a time
                prepared[s : s + n] = self._prepare(x[s : s + n])
        else:
            prepared = x.contiguous()
        last = self._segments[-1] if self._segments else None
        if last is not None and last.kind == "memory":
            last.t = torch.cat([last.t, prepared.to(last.t.device)])
        elif last is not None:
            device = next((s.t.device for s in self._segments if s.kind == "memory"), None)
            self._segments.append(_Memory(prepared if device is None else prepared.to(device)))
        else:
            self._segments.append(_Memory(prepared))
        self._dim = D
        return self

    def to(self, device) -> KNN:
        """Move the in-memory bank to ``device`` (a memory-mapped bank streams to the queries'
        device anyway)."""
        for seg in self._segments:
            if seg.kind == "memory":
                seg.t = seg.t.to(device)
        return self

    # -- searching -----------------------------------------------------------------------------

    def _check_k(self, k, name="k") -> int:
        k = _check_int(k, name)
        M = self.n_samples_
        if k > M:
            raise ValueError(
                f"{name}={k} exceeds the bank size: the bank has M={M} rows"
                f"{' (after subsampling)' if self.subsample is not None else ''}; use "
                f"{name} <= {M} or add more rows"
            )
        return k

    def _queries(self, X) -> torch.Tensor:
        X = check_features(X, "X", dim=self._dim)
        X = X.detach()
        return openood_normalize(X) if self.normalize else X.to(torch.float32)

    def _chunks(self, seg, device):
        """``(start, prepared rows)`` of a segment: an in-memory one whole, a stream in chunks."""
        if seg.kind == "memory":
            yield 0, seg.t
            return
        for s, chunk in seg.chunks(_chunk_rows(seg.dim)):
            yield s, self._prepare(chunk.to(device, non_blocking=False))

    def _search(self, q: torch.Tensor, k: int):
        """Exact top-k ``(distances [N, k], indices [N, k])`` over every segment and chunk."""
        dev = q.device
        best_d = best_i = None
        offset = 0
        for seg in self._segments:
            for start, rows in self._chunks(seg, dev):
                kk = min(k, rows.shape[0])
                d, i = ops.knn(
                    q.to(rows.device), rows, kk, self.metric, check_bank=False, backend=self.backend
                )
                d, i = d.to(dev), i.to(dev) + (offset + start)
                if best_d is None:
                    best_d, best_i = d, i
                else:
                    # running results hold lower indices: a stable sort keeps index order on ties
                    cd, ci = torch.cat([best_d, d], dim=1), torch.cat([best_i, i], dim=1)
                    cd, order = torch.sort(cd, dim=1, stable=True)
                    best_d, best_i = cd[:, :k], ci.gather(1, order[:, :k])
            offset += seg.rows
        return best_d, best_i

    def _kth(self, q: torch.Tensor, ks: list[int]) -> torch.Tensor:
        """``[N, len(ks)]`` k-th smallest distances, one pass over the bank."""
        segs = self._segments
        if len(segs) == 1 and segs[0].kind == "memory":
            bank = segs[0].t
            d = ops.kth_distance(
                q.to(bank.device), bank, ks, self.metric, check_bank=False, backend=self.backend
            )
            return d.to(q.device)
        d, _ = self._search(q, max(ks))
        return d[:, [k - 1 for k in ks]]

    def _to_score(self, d: torch.Tensor) -> torch.Tensor:
        if self.metric == "l2" and not self.squared:
            d = d.clamp(min=0).sqrt()
        return (-d).to(torch.float32)

    def score(self, X) -> torch.Tensor:
        """``[N]`` float32: −d_k (see the module docstring); higher = more in-distribution."""
        self._ensure_fitted()
        k = self._check_k(self.k)
        q = self._queries(X)
        if q.shape[0] == 0:
            return torch.empty(0, dtype=torch.float32, device=q.device)
        return self._to_score(self._kth(q, [k])[:, 0])

    def score_sweep(self, X, ks) -> torch.Tensor:
        """``[N, len(ks)]`` float32: column j is the score with ``k = ks[j]``, all in one pass
        over the bank (``ops.kth_distance``)."""
        self._ensure_fitted()
        if isinstance(ks, torch.Tensor | np.ndarray):
            ks = ks.tolist()
        if isinstance(ks, str | bytes) or not hasattr(ks, "__iter__"):
            raise TypeError(f"ks must be a sequence of integers, got {type(ks).__name__} {ks!r}")
        ks = [self._check_k(k, "ks entry") for k in ks]
        if not ks:
            raise ValueError("ks is empty: give at least one k")
        q = self._queries(X)
        if q.shape[0] == 0:
            return torch.empty(0, len(ks), dtype=torch.float32, device=q.device)
        return self._to_score(self._kth(q, ks))

    def kneighbors(self, X, k: int | None = None):
        """``(distances [N, k], indices [N, k] int64)``, nearest first: distances as the score
        uses them (squared L2, L2 when ``squared=False``, −q̂·b̂ for "ip", 1 − cos for
        "cosine"); indices count rows of the stored bank in fit/add order (after subsampling)."""
        self._ensure_fitted()
        k = self._check_k(self.k if k is None else k)
        q = self._queries(X)
        if q.shape[0] == 0:
            return (
                torch.empty(0, k, dtype=torch.float32, device=q.device),
                torch.empty(0, k, dtype=torch.int64, device=q.device),
            )
        d, i = self._search(q, k)
        if self.metric == "l2" and not self.squared:
            d = d.clamp(min=0).sqrt()
        return d.to(torch.float32), i

    # -- persistence ---------------------------------------------------------------------------

    def _settings(self) -> dict:
        return {
            "k": self.k,
            "normalize": self.normalize,
            "metric": self.metric,
            "squared": self.squared,
            "subsample": self.subsample,
            "seed": self.seed,
            "backend": self.backend,
            "bank_dtype": _DTYPE_NAMES[self.bank_dtype],
        }

    def save(self, path, bank: str = "copy") -> None:
        """Write settings and bank to ``path`` (safetensors + JSON header).

        ``bank="copy"`` (default) stores every row in the file; ``bank="reference"`` stores a
        memory-mapped bank as its file name and position instead (in-memory parts are still
        copied; a memmap that cannot be located in its file raises).
        """
        if bank not in ("copy", "reference"):
            raise ValueError(f"bank must be 'copy' or 'reference', got {bank!r}")
        self._ensure_fitted()
        segments, tensors = [], {}
        for j, seg in enumerate(self._segments):
            if seg.kind == "memory":
                segments.append({"kind": "memory"})
                tensors[f"bank.{j}"] = seg.t
            elif bank == "reference" and seg.region is not None:
                fname, pos = seg.region
                segments.append(
                    {
                        "kind": "file",
                        "file": os.path.abspath(fname),
                        "position": pos,
                        "shape": list(seg.source.shape),
                        "dtype": np.dtype(seg.source.dtype).str,
                    }
                )
            elif bank == "reference" and not isinstance(seg.source, torch.Tensor):
                raise ValueError(
                    "save(bank='reference'): this memory-mapped bank is not a C-contiguous "
                    "read-only view of its file, so it cannot be referenced; use bank='copy'"
                )
            else:
                segments.append({"kind": "stream"})
                tensors[f"bank.{j}"] = seg.raw_tensor()
        settings = {
            "params": self._settings(),
            "dim": self._dim,
            "calls": self._calls,
            "segments": segments,
        }
        _io.save_estimator(path, self._kind, settings, tensors)

    @classmethod
    def load(cls, path):
        """Load a ``KNN`` saved with ``save`` (no code is executed)."""
        return _io.load_as(cls, path)

    @classmethod
    def _from_state(cls, settings: dict, tensors: dict):
        est = cls(**settings["params"])
        for j, s in enumerate(settings["segments"]):
            if s["kind"] == "memory":
                est._segments.append(_Memory(tensors[f"bank.{j}"]))
            elif s["kind"] == "stream":
                est._segments.append(_Stream(tensors[f"bank.{j}"]))
            else:
                mm = np.memmap(
                    s["file"],
                    dtype=np.dtype(s["dtype"]),
                    mode="r",
                    offset=int(s["position"]),
                    shape=tuple(s["shape"]),
                )
                est._segments.append(_Stream(mm, (s["file"], int(s["position"]))))
        est._dim = int(settings["dim"])
        est._calls = int(settings["calls"])
        return est

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._settings().items())
        return f"{type(self).__name__}({args})"
