"""Class-prototype OOD scores: class means or a seeded k-means mixture of prototypes per class.

``Prototypes`` summarizes each class c by M prototypes p_{c,1..M} and scores a feature x by its
similarity to them (``ood_fast.ops.prototype_scores``; higher = more in-distribution):

    s[c, m]      = cos(x, p_{c,m})  ("cosine", default; prototypes stored L2-normalized),
                   x·p_{c,m} ("ip") or −‖x − p_{c,m}‖² ("l2")
    class_scores = reduce_m s[c, m] / temperature     "max" | "mean" | "logsumexp" (no −log M)
    score        = max_c class_scores

* M = 1 (``prototypes_per_class=1``): the class means (accumulated in float64), as in SSD-style
  and CIDER-style prototype scores; with ``"cosine"`` the score is the maximum cosine similarity
  to a class mean.
* M > 1: a mixture of prototypes per class (CIDER/PALM style) by k-means on the class's
  features: k-means++ initialization (D² sampling, seeded by ``seed``), then Lloyd iterations
  (at most ``iters``, stopping when no assignment changes) in float64 on the features' device.
  An empty cluster is re-seeded at the point farthest from its current centre. At convergence
  each prototype is the mean of the points assigned to it (nearest centre, ties to the lower
  index). The clustering is Euclidean on the features as given (for hyperspherical embeddings
  pass normalized features); for ``"cosine"`` the resulting centres are then L2-normalized.

A class with fewer samples than M raises ``ValueError`` (we do not duplicate prototypes: with
``reduce="mean"``/``"logsumexp"`` duplicates would silently re-weight the class); lower
``prototypes_per_class`` or collect more samples. A class with fewer *distinct* points than M
gets coinciding prototypes. A prototype that is exactly zero has cosine similarity 0 to
everything.

Labels are any integers; ``classes_`` holds them sorted and ``predict`` returns them.
``save``/``load`` store the prototypes (safetensors + JSON) and reload bit-identically.
"""

from __future__ import annotations

import math
import numbers

import torch

from .. import _io, ops
from .._backend import BACKENDS
from .._validate import check_features
from .mahalanobis import NotFittedError, _check_labels

__all__ = ["Prototypes", "kmeans"]

METRICS = ("cosine", "ip", "l2")
REDUCTIONS = ("max", "mean", "logsumexp")
F64 = torch.float64
_FITTED = ("classes_", "prototypes_", "centers_", "counts_", "n_iter_")


def _sqdist(X: torch.Tensor, xsq: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``[n, m]`` squared Euclidean distances (expanded form, clamped at 0)."""
    return (xsq[:, None] + C.square().sum(1)[None, :] - 2.0 * (X @ C.T)).clamp_(min=0.0)


def kmeans(X: torch.Tensor, m: int, iters: int = 50, generator: torch.Generator | None = None):
    """Seeded k-means (k-means++ init, Lloyd iterations, empty-cluster re-seeding).

    Args:
        X: ``[n, D]`` points (computed in float64), n >= m.
        m: number of clusters.
        iters: at most this many Lloyd iterations (stops early when no assignment changes).
        generator: a CPU ``torch.Generator`` for the k-means++ draws.

    Returns:
        ``(centers [m, D] float64, assign [n] int64, n_iter)``. When converged (n_iter < iters
        or the last iteration changed nothing), ``centers[j]`` is the mean of ``X[assign == j]``
        and ``assign`` is the nearest centre of every point (ties: lower index).
    """
    X = X.to(F64)
    n = X.shape[0]
    if not 1 <= m <= n:
        raise ValueError(f"kmeans: need 1 <= m <= n points, got m={m}, n={n}")
    dev = X.device
    xsq = X.square().sum(1)
    if m == 1:
        return X.mean(0, keepdim=True), torch.zeros(n, dtype=torch.int64, device=dev), 0
    # k-means++: first centre uniform, then each with probability ∝ D² to the nearest chosen one
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    closest = _sqdist(X, xsq, X[first : first + 1])[:, 0]
    for _ in range(1, m):
        w = closest.cpu()
        if float(w.sum()) > 0:
            i = int(torch.multinomial(w, 1, generator=generator))
        else:  # every point coincides with a chosen centre: any point will do
            i = int(torch.randint(n, (1,), generator=generator))
        chosen.append(i)
        closest = torch.minimum(closest, _sqdist(X, xsq, X[i : i + 1])[:, 0])
    centers = X[chosen].clone()
    assign = _sqdist(X, xsq, centers).argmin(1)
    n_iter = 0
    for it in range(iters):
        n_iter = it + 1
        counts = torch.bincount(assign, minlength=m)
        sums = torch.zeros(m, X.shape[1], dtype=F64, device=dev).index_add_(0, assign, X)
        new = sums / counts.clamp(min=1)[:, None].to(F64)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:  # re-seed at the points farthest from their current centres
            own = _sqdist(X, xsq, centers).gather(1, assign[:, None])[:, 0]
            far = torch.argsort(own, descending=True, stable=True)
            for j, e in enumerate(empty):
                new[e] = X[far[j]]
        centers = new
        new_assign = _sqdist(X, xsq, centers).argmin(1)
        if torch.equal(new_assign, assign) and not empty:
            break
        assign = new_assign
    return centers, assign, n_iter


@_io.register("prototypes")
class Prototypes:
    """Prototype similarity OOD score: class means (M = 1) or M k-means prototypes per class.

    Args:
        prototypes_per_class: M >= 1.
        metric: ``"cosine"`` (prototypes L2-normalized), ``"ip"`` or ``"l2"`` (−‖x − p‖²).
        reduce: over a class's M prototypes: ``"max"``, ``"mean"`` or ``"logsumexp"``.
        temperature: similarities are divided by it (finite, > 0) before the reduction.
        iters: maximum Lloyd iterations of the k-means (M > 1).
        seed: integer seed of the k-means++ initialization.
        backend: ``ood_fast.ops`` backend (None = automatic).

    Fitted attributes: ``classes_`` [C] int64 (sorted labels), ``prototypes_`` [C, M, D]
    float32 (what is scored), ``centers_`` [C, M, D] float32 (the unnormalized means),
    ``counts_`` [C] samples per class, ``n_iter_`` [C] Lloyd iterations run per class,
    ``n_features_in_``. See the module docstring for the formulas.
    """

    def __init__(
        self,
        prototypes_per_class: int = 1,
        metric: str = "cosine",
        reduce: str = "max",
        temperature: float = 1.0,
        iters: int = 50,
        seed: int = 0,
        backend: str | None = None,
    ):
        for name, value, low in (
            ("prototypes_per_class", prototypes_per_class, 1),
            ("iters", iters, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an integer, got {value!r}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise TypeError(f"temperature must be a number, got {temperature!r}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
        self.prototypes_per_class = int(prototypes_per_class)
        self.metric = metric
        self.reduce = reduce
        self.temperature = float(temperature)
        self.iters = int(iters)
        self.seed = int(seed)
        self.backend = backend

    def __getattr__(self, name):
        if name in _FITTED or name in ("n_features_in_", "num_classes_"):
            raise NotFittedError("Prototypes is not fitted: call fit(X, y) first")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- fitting -------------------------------------------------------------------------------

    def fit(self, X, y) -> Prototypes:
        """X ``[N, D]`` features, y ``[N]`` integer labels (any values)."""
        X = check_features(X, "X")
        if X.shape[0] == 0:
            raise ValueError("X: empty input: fit needs at least one sample")
        y = _check_labels(y, X.shape[0]).to(X.device)
        X = X.detach()
        M = self.prototypes_per_class
        classes, counts = torch.unique(y, sorted=True, return_counts=True)
        few = (counts < M).nonzero().flatten().tolist()
        if few:
            c = few[0]
            raise ValueError(
                f"class {int(classes[c])} has {int(counts[c])} sample(s) but "
                f"prototypes_per_class={M} ({len(few)} such classes): lower "
                "prototypes_per_class or collect more samples"
            )
        order = torch.argsort(y, stable=True)
        gen = torch.Generator().manual_seed(self.seed)
        centers, n_iter = [], []
        start = 0
        for n in counts.tolist():
            Xc = X[order[start : start + n]]
            start += n
            if M == 1:
                centers.append((Xc.sum(0, dtype=F64) / n)[None])
                n_iter.append(0)
            else:
                c, _, it = kmeans(Xc, M, self.iters, gen)
                centers.append(c)
                n_iter.append(it)
        centers = torch.stack(centers).to(torch.float32)  # [C, M, D]
        if self.metric == "cosine":
            norm = torch.linalg.vector_norm(centers, dim=2, keepdim=True)
            protos = centers / torch.where(norm > 0, norm, torch.ones_like(norm))
        else:
            protos = centers
        d = self.__dict__
        d["classes_"] = classes.cpu()
        d["counts_"] = counts.cpu()
        d["centers_"] = centers
        d["prototypes_"] = protos.contiguous()
        d["n_iter_"] = torch.tensor(n_iter, dtype=torch.int64)
        return self

    @property
    def n_features_in_(self) -> int:
        return int(self.prototypes_.shape[2])

    @property
    def num_classes_(self) -> int:
        return int(self.classes_.shape[0])

    # -- scoring -------------------------------------------------------------------------------

    def _scores(self, X):
        P = self.prototypes_
        X = check_features(X, "X", dim=P.shape[2]).detach()
        if X.shape[0] == 0:
            empty = torch.empty(0, P.shape[0], dtype=torch.float32, device=X.device)
            return empty, empty[:, 0]
        per_class, overall = ops.prototype_scores(
            X,
            P.to(X.device),
            self.reduce,
            self.temperature,
            self.metric,
            backend=self.backend,
        )
        return per_class.to(torch.float32), overall.to(torch.float32)

    def score(self, X) -> torch.Tensor:
        """``[N]`` float32: max over classes of the reduced prototype similarity (higher = ID)."""
        return self._scores(X)[1]

    def class_scores(self, X) -> torch.Tensor:
        """``[N, C]`` float32 per-class scores (columns in the order of ``classes_``)."""
        return self._scores(X)[0]

    def predict(self, X) -> torch.Tensor:
        """``[N]`` int64: the label (from ``classes_``) of the best-scoring class."""
        per_class = self._scores(X)[0]
        if per_class.shape[0] == 0:
            return torch.empty(0, dtype=torch.int64, device=per_class.device)
        return self.classes_.to(per_class.device)[per_class.argmax(1)]

    # -- persistence ---------------------------------------------------------------------------

    def _settings(self) -> dict:
        return {
            "prototypes_per_class": self.prototypes_per_class,
            "metric": self.metric,
            "reduce": self.reduce,
            "temperature": self.temperature,
            "iters": self.iters,
            "seed": self.seed,
            "backend": self.backend,
        }

    def save(self, path) -> None:
        """Write settings and fitted prototypes to ``path`` (safetensors + JSON header)."""
        tensors = {k: getattr(self, k) for k in _FITTED}
        _io.save_estimator(path, self._kind, {"params": self._settings()}, tensors)

    @classmethod
    def load(cls, path):
        """Load a ``Prototypes`` saved with ``save`` (no code is executed)."""
        return _io.load_as(cls, path)

    @classmethod
    def _from_state(cls, settings: dict, tensors: dict):
        est = cls(**settings["params"])
        for k in _FITTED:
            est.__dict__[k] = tensors[k]
        return est

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._settings().items())
        return f"{type(self).__name__}({args})"
