"""The benchmark harness shared by ``ood-fast bench`` and the pytest-benchmark suite (benchmarks/).

One run = one ``Workload`` (synthetic class-conditional features from ``ood_fast.data``) and a
list of ``Candidate``s: our estimator on every available backend × precision, and the peers a
user would otherwise pick (``ood_fast.peers``: the OpenOOD formula, pytorch-ood, the best plain
torch expression, sklearn per class). For each candidate ``run_candidate``:

1. fits on the training set and times it (warm-up once, then the median of repeats within a
   time budget; a fit slower than the budget is timed once, that first run),
2. scores the test set and times it the same way. Slow peers (``Candidate.sliced``) are timed on
   an evenly spaced slice of the test rows, sized to the budget, and their time is scaled
   linearly to the full test set; the row then says ``(scaled from n rows)``,
3. checks the scores against a float64 evaluation of the same model (``Reference``): the max
   relative difference after normalizing sign and scale (pytorch-ood's scores are ``+N·d²``,
   ours ``−d²``), and AUROC / FPR95 (``ood_fast.metrics``) of the normalized scores.

``run`` returns the rows (dicts, JSON-ready) and ``render`` the table. Threads are pinned for
torch and for every BLAS/OpenMP pool threadpoolctl finds, and recorded with the CPU model and the
library versions (``environment``). Absolute times on small machines drift; the speedup columns
(peer time / our time, same run) are the figures to compare.

``run_knn`` is the KNN workload (``ood-fast bench --workload knn``): a normalized feature bank
(``KNNWorkload``; presets ``KNN_PRESETS``), our ``ood_fast.KNN`` on every backend that can run
the ``knn``/``kth_distance`` ops (the others are listed with their reasons) with an fp32 and a
bf16 bank, against faiss IndexFlatL2 (OpenOOD) / IndexFlatIP, torch mm+topk and sklearn brute
force (pytorch-ood) from ``ood_fast.peers``; three cases (all queries at one k, a sweep over k,
a batch of one query); speedups vs faiss and torch, GFLOP/s, max |Δscore| vs faiss and vs a
float64 evaluation, AUROC/FPR95. See the section comment above ``KNN_OPS``.

``gpu_benchmark`` is the device check run by benchmarks/gpu_check.sh: the fused op on the
``triton`` and ``cuda`` backends against the best cuBLAS expression, fp32 and bf16, timed with
CUDA events.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

OP = "mahalanobis_fused"
COVARIANCES = ("tied", "per_class", "diagonal")
PRECISIONS = ("fp32", "bf16")
PEERS = ("openood", "pytorch_ood", "torch", "sklearn")
PEER_LABELS = {
    "openood": "OpenOOD formula",
    "pytorch_ood": "pytorch-ood",
    "torch": "torch expression",
    "sklearn": "sklearn per class",
}
# Which covariance modes each peer computes (the others are left out with a reason).
PEER_COVARIANCES = {
    "openood": ("tied",),
    "pytorch_ood": ("tied",),
    "torch": ("tied", "per_class", "diagonal"),
    "sklearn": ("tied",),
}

# ---------------------------------------------------------------------------------------------
# Environment: threads, machine, versions
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "cpu model", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def package_version(*dists: str) -> str | None:
    """Installed version of the first distribution found among ``dists`` (never imports it)."""
    for d in dists:
        try:
            return importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@contextlib.contextmanager
def pinned_threads(n: int | None):
    """Run the block with ``n`` threads in torch and in every BLAS/OpenMP pool (None: as is)."""
    if n is None:
        yield torch.get_num_threads()
        return
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    limiter = contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(limits=n)
    except Exception:  # threadpoolctl is optional: torch's pool is the one that matters most
        pass
    try:
        with limiter:
            yield n
    finally:
        torch.set_num_threads(old)


def environment() -> dict:
    """What a benchmark figure depends on: machine, threads, versions (recorded in the JSON)."""
    import ood_fast

    env = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "ood_fast": ood_fast.__version__,
        "triton": package_version("triton"),
        "scikit-learn": package_version("scikit-learn"),
        "pytorch-ood": package_version("pytorch-ood"),
        "faiss": package_version("faiss-cpu", "faiss-gpu", "faiss"),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        env["loadavg"] = list(os.getloadavg())
    except OSError:
        pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    env["OOD_FAST_env"] = {k: v for k, v in os.environ.items() if k.startswith("OOD_FAST_")}
    return env


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------

_SYNTH_KEYS = ("n_train", "n_test", "dim", "num_classes", "ood_fraction", "seed")


@dataclass
class Workload:
    """A synthetic feature set: shapes here, arrays generated on first use (``data``)."""

    name: str
    n_train: int
    n_test: int
    dim: int
    num_classes: int
    covariance: str = "tied"
    seed: int = 0
    extra: dict = field(default_factory=dict)  # further synthetic_features keyword arguments
    _data: dict | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_preset(
        cls, preset: str = "cifar10", covariance: str = "tied", **overrides
    ) -> Workload:
        """The workload of ``ood_fast.data.PRESETS[preset]`` (overrides replace its fields)."""
        from . import data

        if preset not in data.PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(data.PRESETS)}")
        spec = _as_dict(data.PRESETS[preset])
        spec.update(overrides)
        kw = {
            k: spec.pop(k) for k in ("n_train", "n_test", "dim", "num_classes", "seed") if k in spec
        }
        missing = {"n_train", "n_test", "dim", "num_classes"} - set(kw)
        if missing:
            raise ValueError(f"preset {preset!r} lacks {sorted(missing)}")
        for k in ("name", "covariance", "extra"):
            spec.pop(k, None)
        return cls(name=preset, covariance=covariance, extra=spec, **kw)

    @property
    def data(self) -> dict:
        """dict(train_x [n_train, D] f32, train_y [n_train] i64, test_x [n_test, D] f32,
        test_is_ood [n_test] bool), CPU torch tensors, generated once."""
        if self._data is None:
            from . import data

            extra = {k: v for k, v in self.extra.items() if k in _SYNTH_KEYS}
            d = data.synthetic_features(
                n_train=self.n_train,
                n_test=self.n_test,
                dim=self.dim,
                num_classes=self.num_classes,
                seed=self.seed,
                **extra,
            )
            self._data = {
                "train_x": _tensor(d["train_x"], torch.float32),
                "train_y": _tensor(d["train_y"], torch.int64),
                "test_x": _tensor(d["test_x"], torch.float32),
                "test_is_ood": _tensor(d["test_is_ood"], torch.bool),
            }
        return self._data

    def describe(self) -> str:
        return (
            f"{self.name}: {self.covariance} covariance, C={self.num_classes}, D={self.dim}, "
            f"train {self.n_train:,}, test {self.n_test:,}"
        )

    def meta(self) -> dict:
        return {
            "name": self.name,
            "covariance": self.covariance,
            "num_classes": self.num_classes,
            "dim": self.dim,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "seed": self.seed,
        }


def _as_dict(spec) -> dict:
    if isinstance(spec, dict):
        return dict(spec)
    if dataclasses.is_dataclass(spec):
        return dataclasses.asdict(spec)
    if hasattr(spec, "_asdict"):
        return dict(spec._asdict())
    return dict(vars(spec))


def _tensor(a, dtype) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    return t.to(dtype).contiguous()


def score_flops(n: int, dim: int, num_classes: int, covariance: str) -> float:
    """FLOPs the scoring needs (GEMMs only): triangular whitening + the distance GEMM."""
    if covariance == "tied":
        return n * dim * dim + 2.0 * n * dim * num_classes
    if covariance == "per_class":
        return num_classes * n * dim * dim + 2.0 * n * dim * num_classes
    return 2.0 * n * (2 * dim) * num_classes  # diagonal: [x², x] @ [2D, C]


# ---------------------------------------------------------------------------------------------
# The float64 reference evaluation
# ---------------------------------------------------------------------------------------------


class Reference:
    """A float64 Gaussian model fitted independently of every candidate, evaluated in float64.

    Maximum-likelihood statistics (covariance normalised by the sample count N, as sklearn's
    EmpiricalCovariance and OpenOOD; a candidate with N−1 or pytorch-ood's sum differs by a
    scale, which the comparison removes). Tied: one covariance of the class-centred features;
    per_class: one per class; diagonal: per-class variances. Score: −min_c d²_c.
    """

    def __init__(
        self,
        train_x,
        train_y,
        covariance: str = "tied",
        num_classes: int | None = None,
        ridge: float = 0.0,
    ):
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
        x = torch.as_tensor(train_x).to(torch.float64)
        y = torch.as_tensor(train_y).to(x.device, torch.long)
        C = int(num_classes if num_classes is not None else int(y.max()) + 1)
        D = x.shape[1]
        counts = torch.bincount(y, minlength=C).to(torch.float64)
        if bool((counts == 0).any()):
            raise ValueError("reference: a class has no training samples")
        means = torch.zeros(C, D, dtype=torch.float64, device=x.device).index_add_(0, y, x)
        means /= counts[:, None]
        self.covariance = covariance
        self.means = means
        self.center = means.mean(0)
        eye = torch.eye(D, dtype=torch.float64, device=x.device)
        xc = x - means[y]
        if covariance == "tied":
            cov = (xc.T @ xc) / x.shape[0] + ridge * eye
            self.factors = self._whitener(cov)[None]  # [1, D, D]
            self.group = torch.zeros(C, dtype=torch.long, device=x.device)
        elif covariance == "per_class":
            ws = []
            for c in range(C):
                xs = xc[y == c]
                ws.append(self._whitener((xs.T @ xs) / xs.shape[0] + ridge * eye))
            self.factors = torch.stack(ws)
            self.group = torch.arange(C, device=x.device)
        else:
            var = torch.zeros(C, D, dtype=torch.float64, device=x.device).index_add_(0, y, xc * xc)
            var = var / counts[:, None] + ridge
            self.inv_var = 1.0 / var.clamp_min(torch.finfo(torch.float64).tiny)
            self.factors = None

    @staticmethod
    def _whitener(cov: torch.Tensor) -> torch.Tensor:
        """W with W Wᵀ = cov⁻¹: W = L⁻ᵀ from the Cholesky factor (pseudo-inverse if singular)."""
        L, info = torch.linalg.cholesky_ex(cov)
        if int(info) == 0:
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            return torch.linalg.solve_triangular(L, eye, upper=False).T
        vals, vecs = torch.linalg.eigh(cov)
        keep = vals > vals.max() * cov.shape[0] * torch.finfo(torch.float64).eps
        return vecs[:, keep] / vals[keep].sqrt()  # [D, r]

    def distances(self, x, chunk: int = 2048) -> torch.Tensor:
        """[N, C] float64 squared distances."""
        x = torch.as_tensor(x).to(self.means.device, torch.float64)
        out = torch.empty(x.shape[0], self.means.shape[0], dtype=torch.float64, device=x.device)
        mc = self.means - self.center
        for s in range(0, x.shape[0], chunk):
            xt = x[s : s + chunk] - self.center
            if self.factors is None:
                d2 = (xt * xt) @ self.inv_var.T - 2.0 * xt @ (mc * self.inv_var).T
                d2 += (mc * mc * self.inv_var).sum(1)
            elif self.factors.shape[0] == 1:
                w = self.factors[0]
                z, mw = xt @ w, mc @ w
                d2 = (z * z).sum(1, keepdim=True) - 2.0 * z @ mw.T + (mw * mw).sum(1)
            else:
                d2 = torch.empty(xt.shape[0], mc.shape[0], dtype=torch.float64, device=x.device)
                for c in range(mc.shape[0]):
                    d2[:, c] = ((xt - mc[c]) @ self.factors[c]).square().sum(1)
            out[s : s + chunk] = d2.clamp_min_(0.0)
        return out

    def score(self, x) -> np.ndarray:
        """float64 scores −min_c d²_c (higher = more in-distribution), as numpy."""
        if torch.as_tensor(x).shape[0] == 0:
            return np.zeros(0)
        return (-self.distances(x).min(dim=1).values).cpu().numpy()


def compare(scores, ref: np.ndarray) -> dict:
    """Sign/scale-normalize ``scores`` against ``ref`` (least squares ``a·scores ≈ ref``).

    Returns dict(scale=a, max_rel_diff, median_rel_diff, normalized=a·scores as float64 numpy).
    The relative difference of element i is |a·s_i − r_i| / |r_i| (|r_i| floored at 1e-12 of
    max |r| so a score of exactly 0 cannot divide by zero).
    """
    s = _numpy64(scores)
    r = np.asarray(ref, dtype=np.float64)
    if s.shape != r.shape:
        raise ValueError(f"scores have shape {s.shape}, reference {r.shape}")
    if s.size == 0:
        return {"scale": 1.0, "max_rel_diff": 0.0, "median_rel_diff": 0.0, "normalized": s}
    ss = float(s @ s)
    a = float(s @ r) / ss if ss > 0 else 1.0
    if not math.isfinite(a) or a == 0.0:
        a = 1.0
    n = a * s
    denom = np.maximum(np.abs(r), 1e-12 * max(float(np.abs(r).max()), 1e-300))
    rel = np.abs(n - r) / denom
    if not np.all(np.isfinite(rel)):
        return {
            "scale": a,
            "max_rel_diff": float("inf"),
            "median_rel_diff": float("inf"),
            "normalized": n,
        }
    return {
        "scale": a,
        "max_rel_diff": float(rel.max()),
        "median_rel_diff": float(np.median(rel)),
        "normalized": n,
    }


def _numpy64(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64).numpy()
    if isinstance(a, tuple) and len(a) == 2 and hasattr(a, "values"):  # a MinResult
        return _numpy64(a.values)
    return np.asarray(a, dtype=np.float64)


def ood_metrics(scores, is_ood) -> dict:
    """AUROC / FPR95 / AUPR (ood_fast.metrics, OOD positive) of scores where higher = ID."""
    from . import metrics

    s = _numpy64(scores)
    o = np.asarray(torch.as_tensor(is_ood).cpu().numpy(), dtype=bool)
    if o.all() or not o.any():
        return {"auroc": float("nan"), "fpr95": float("nan")}
    return metrics.evaluate(s[~o], s[o])


# ---------------------------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------------------------


@dataclass
class _Candidate:
    """What every benchmark's candidate has (Candidate, KNNCandidate, QuantCandidate): a
    ``name`` and ``kind`` ("ours" or "peer") given first, and by keyword ``backend`` (ours: the
    one requested), ``peer`` (its name), ``sliced`` (may be timed on a slice of the rows, scaled
    linearly: the slow ones), ``device`` (where its inputs live, "cpu" or "cuda"; the harness
    moves them, untimed). ``info()``: the row's description, ``candidate`` (the name) then the
    class's INFO_FIELDS in that order."""

    name: str
    kind: str
    _: KW_ONLY
    backend: str | None = None
    peer: str | None = None
    sliced: bool = False
    device: str = "cpu"

    INFO_FIELDS: ClassVar[tuple[str, ...]] = ("kind", "backend", "peer", "device")

    def info(self) -> dict:
        return {"candidate": self.name, **{f: getattr(self, f) for f in self.INFO_FIELDS}}


@dataclass
class Candidate(_Candidate):
    """Something to time: ``fit(train_x, train_y) -> model``, ``score(model, x) -> [N] scores``.
    ``min_rows``: smallest representative slice (e.g. one batch)."""

    fit: Callable[[Any, Any], Any]
    score: Callable[[Any, Any], Any]
    _: KW_ONLY
    precision: str = "fp32"
    min_rows: int = 64

    INFO_FIELDS = ("kind", "backend", "precision", "peer", "device")


def _device_for(backend: str) -> str:
    return "cuda" if backend in ("cuda", "triton") else "cpu"


def available_backends() -> dict[str, list[str]]:
    """Backend -> reasons it cannot run the Mahalanobis op here (empty: it can).

    The Triton interpreter (TRITON_INTERPRET=1) is a test tool, never timed: without a GPU
    triton counts as unavailable here even when the interpreter is on.
    """
    from . import (
        _backend,
        ops,  # noqa: F401  (registers the op's implementations)
    )

    out = {}
    for b, why in _backend.availability().items():
        why = list(why)
        if b not in _backend.registered_ops().get(OP, ()):
            why.append(f"no {b!r} implementation of {OP!r} is registered")
        if b == "triton" and not torch.cuda.is_available() and not why:
            why.append("only the Triton CPU interpreter is on (a test tool, not timed)")
        out[b] = why
    return out


def ours(
    backend: str,
    precision: str = "fp32",
    covariance: str = "tied",
    shrinkage=None,
    method: str = "mahalanobis",
) -> Candidate:
    """Our estimator, pinned to ``backend`` and ``precision``."""
    cls_name = {
        "mahalanobis": "Mahalanobis",
        "relative_mahalanobis": "RelativeMahalanobis",
        "gaussian": "GaussianLikelihood",
    }[method]

    def fit(x, y):
        from .detectors import mahalanobis as det

        return getattr(det, cls_name)(
            covariance=covariance, shrinkage=shrinkage, backend=backend, precision=precision
        ).fit(x, y)

    return Candidate(
        name=f"ours {backend} {precision}",
        kind="ours",
        fit=fit,
        score=lambda m, x: m.score(x),
        backend=backend,
        precision=precision,
        device=_device_for(backend),
    )


def peer(name: str, covariance: str = "tied") -> Candidate | str:
    """The peer ``name`` as a Candidate, or a string saying why it cannot run here."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; expected one of {PEERS}")
    if covariance not in PEER_COVARIANCES[name]:
        return f"computes a tied covariance only (workload: {covariance})"
    try:
        from . import peers as P
    except Exception as exc:  # the module is optional to the harness
        return f"ood_fast.peers did not import ({type(exc).__name__}: {exc})"
    label = PEER_LABELS[name]
    try:
        if name == "openood":
            return Candidate(
                name=label,
                kind="peer",
                peer=name,
                sliced=True,
                min_rows=200,
                fit=P.openood_fit,
                score=P.openood_score,
            )
        if name == "torch":
            return Candidate(
                name=label,
                kind="peer",
                peer=name,
                fit=lambda x, y: P.torch_expression_fit(x, y, covariance=covariance),
                score=P.torch_expression_score,
            )
        if name == "pytorch_ood":
            why = _pytorch_ood_unavailable(P)
            if why:
                return why
            return Candidate(
                name=label,
                kind="peer",
                peer=name,
                sliced=True,
                fit=P.pytorch_ood_fit,
                score=P.pytorch_ood_score,
            )
        if name == "sklearn":
            try:
                import sklearn  # noqa: F401
            except Exception as exc:
                return f"scikit-learn does not import ({type(exc).__name__}: {exc})"
            return Candidate(
                name=label,
                kind="peer",
                peer=name,
                sliced=True,
                fit=P.sklearn_fit,
                score=P.sklearn_score,
            )
    except AttributeError as exc:
        return f"ood_fast.peers lacks {exc.name if hasattr(exc, 'name') else exc}"
    raise AssertionError(name)


def _pytorch_ood_unavailable(P) -> str | None:
    ok = P.pytorch_ood_available()
    return None if ok is True else str(ok)


def candidates(
    covariance: str = "tied",
    backends: Sequence[str] | None = None,
    precisions: Sequence[str] = PRECISIONS,
    peers: Sequence[str] = PEERS,
    shrinkage=None,
) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """Our estimator on each requested (default: every available) backend × precision, then the
    requested peers. Returns (candidates, skipped) with skipped = [(name, reason)]."""
    avail = available_backends()
    out: list[Candidate] = []
    skipped: list[tuple[str, str]] = []
    for b in backends if backends is not None else list(avail):
        if b not in avail:
            raise ValueError(f"unknown backend {b!r}; expected one of {tuple(avail)}")
        if avail[b]:
            skipped.append((f"ours {b}", "; ".join(avail[b])))
            continue
        for p in precisions:
            out.append(ours(b, p, covariance, shrinkage))
    for name in peers:
        c = peer(name, covariance)
        if isinstance(c, str):
            skipped.append((PEER_LABELS[name], c))
        else:
            out.append(c)
    return out, skipped


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass
class Timing:
    median: float
    min: float
    runs: int
    warmup: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(
    fn: Callable[[], Any], *, repeats: int = 5, budget: float = 5.0, device: str = "cpu"
) -> tuple[Timing, Any]:
    """Warm up once, then time up to ``repeats`` runs while the timed total stays under
    ``budget`` seconds (at least one timed run, unless the warm-up alone took longer than the
    budget: then that run is the measurement). CUDA work is timed with CUDA events.
    Returns (Timing, the last result)."""
    cuda = device == "cuda"

    def once():
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            r = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, r
        t0 = time.perf_counter()
        r = fn()
        return time.perf_counter() - t0, r

    _sync(device)
    t_warm, result = once()
    if t_warm > budget:
        return Timing(t_warm, t_warm, 1, t_warm), result
    times: list[float] = []
    while len(times) < max(1, repeats):
        t, result = once()
        times.append(t)
        if sum(times) + statistics.median(times) > budget:
            break
    return Timing(statistics.median(times), min(times), len(times), t_warm), result


def slice_rows(n_total: int, n: int) -> torch.Tensor:
    """``n`` evenly spaced row indices of ``n_total`` (so a slice keeps both ID and OOD rows)."""
    n = max(1, min(n, n_total))
    if n == n_total:
        return torch.arange(n_total)
    return torch.from_numpy(np.unique(np.linspace(0, n_total - 1, n).round().astype(np.int64)))


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def run_candidate(
    cand: Candidate,
    wl: Workload,
    reference: Reference | None = None,
    *,
    repeats: int = 5,
    budget: float = 5.0,
    check_rows: int | None = None,
) -> dict:
    """Fit, score and check one candidate on one workload; returns its row (never raises)."""
    row = cand.info()
    d = wl.data
    dev = cand.device
    try:
        train_x, train_y = d["train_x"].to(dev), d["train_y"].to(dev)
        test_x = d["test_x"].to(dev)
        N = test_x.shape[0]
        fit_t, model = time_call(
            lambda: cand.fit(train_x, train_y), repeats=repeats, budget=budget, device=dev
        )
        row["fit_s"] = fit_t.median
        row["fit_timing"] = fit_t.as_dict()
        score_t, scores, rows_idx = _time_scoring(
            cand, model, test_x, repeats=repeats, budget=budget, dev=dev
        )
        n_rows = N if rows_idx is None else len(rows_idx)
        scale = N / n_rows
        row["score_s"] = score_t.median * scale
        row["score_timing"] = score_t.as_dict()
        row["scored_rows"] = n_rows
        row["scaled_from_rows"] = n_rows if rows_idx is not None else None
        row["gflops"] = score_flops(N, wl.dim, wl.num_classes, wl.covariance) / row["score_s"] / 1e9
        scores = _numpy64(scores)
        if scores.shape != (n_rows,):
            raise ValueError(f"score returned shape {scores.shape}, expected ({n_rows},)")
        is_ood = d["test_is_ood"] if rows_idx is None else d["test_is_ood"][rows_idx]
        if reference is not None:
            idx = rows_idx
            if idx is None and check_rows is not None and check_rows < N:
                idx = slice_rows(N, check_rows)
            sub = scores if idx is None or rows_idx is not None else scores[idx.numpy()]
            ref = reference.score(d["test_x"] if idx is None else d["test_x"][idx])
            cmp = compare(sub, ref)
            row["scale"] = cmp["scale"]
            row["max_rel_diff"] = cmp["max_rel_diff"]
            row["median_rel_diff"] = cmp["median_rel_diff"]
            row["checked_rows"] = len(ref)
            sign = 1.0 if cmp["scale"] >= 0 else -1.0
        else:
            sign = 1.0
        row.update(ood_metrics(sign * scores, is_ood))
        row["status"] = "ok"
    except Exception as exc:  # a failing candidate is a row with its error, not a dead run
        row["status"] = "error"
        row["error"] = _error(exc)
    return row


def _error(exc: BaseException) -> str:
    """An exception as a row's one-line error: its type and the first line of its message."""
    return f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]


def _progress_bar(total: int, desc: str, enabled: bool):
    """The benchmarks' progress bar: on stderr, and gone when done (the table follows)."""
    from tqdm import tqdm

    return tqdm(
        total=total, file=sys.stderr, disable=not enabled, desc=desc, unit="step", leave=False
    )


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def add_speedups(rows: list[dict]) -> None:
    """For each of our rows: speedup_<peer> = peer score time / our score time (same run), and
    fit_speedup_<peer> likewise for fit."""
    peers_ok = {r["peer"]: r for r in rows if r["kind"] == "peer" and r.get("status") == "ok"}
    for r in rows:
        if r["kind"] != "ours" or r.get("status") != "ok":
            continue
        r["speedup"] = {p: pr["score_s"] / r["score_s"] for p, pr in peers_ok.items()}
        r["fit_speedup"] = {p: pr["fit_s"] / r["fit_s"] for p, pr in peers_ok.items()}


def run(
    preset: str = "cifar10",
    *,
    covariance: str = "tied",
    backends: Sequence[str] | None = None,
    precisions: Sequence[str] = PRECISIONS,
    peers: Sequence[str] = PEERS,
    threads: int | None = None,
    repeats: int = 5,
    budget: float = 5.0,
    progress: bool = True,
    workload: Workload | None = None,
    check_rows: int | None = None,
    log=None,
) -> dict:
    """The whole benchmark: returns dict(meta, rows, skipped, table)."""

    wl = workload or Workload.from_preset(preset, covariance=covariance)
    load_before = _loadavg()
    with pinned_threads(threads):
        cands, skipped = candidates(
            covariance=wl.covariance, backends=backends, precisions=precisions, peers=peers
        )
        bar = _progress_bar(len(cands) + 2, "ood-fast bench", progress)
        bar.set_postfix_str(f"generating {wl.name} data")
        d = wl.data
        bar.update()
        bar.set_postfix_str("float64 reference")
        reference = Reference(d["train_x"], d["train_y"], wl.covariance, wl.num_classes)
        if check_rows is None and wl.covariance == "per_class":
            check_rows = 2000  # the per-class float64 reference costs C·N·D² flops
        bar.update()
        rows = []
        for c in cands:
            bar.set_postfix_str(c.name)
            rows.append(
                run_candidate(
                    c, wl, reference, repeats=repeats, budget=budget, check_rows=check_rows
                )
            )
            bar.update()
        bar.close()
        add_speedups(rows)
        meta = {
            "workload": wl.meta(),
            "environment": environment(),
            "repeats": repeats,
            "budget_s": budget,
            "loadavg_before": load_before,
        }
    result = {"meta": meta, "rows": rows, "skipped": [list(s) for s in skipped]}
    result["table"] = render(result)
    return result


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def fmt_s(t: float | None) -> str:
    if t is None or not math.isfinite(t):
        return "-"
    if t >= 100:
        return f"{t:.0f}"
    if t >= 1:
        return f"{t:.2f}"
    return f"{t:.3g}"


def _fmt_x(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:.0f}×" if v >= 100 else f"{v:.1f}×" if v >= 10 else f"{v:.2f}×"


def _fmt_f(v, digits=4) -> str:
    return (
        "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"
    )


def _fmt_e(v) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.1e}"


def table(headers: list[str], body: list[list[str]], right: set[int] | None = None) -> str:
    """A plain monospace table (no dependencies)."""
    right = right if right is not None else set(range(1, len(headers)))
    widths = [
        max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)
    ]

    def line(cells):
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, body)])


def _footer(result: dict) -> list[str]:
    """The last lines under a benchmark's tables: a warning when the machine was busy before the
    run, then each candidate that did not run, with the reason."""
    out = []
    load = result["meta"].get("loadavg_before")
    if load is not None and load > 1.0:
        out.append(
            f"note: load average {load:.1f} before the run on "
            f"{result['meta']['environment']['cpu_count']} CPUs: "
            "other processes were using the CPU; times are noisy (ratios less so)"
        )
    out += [f"not run: {name}: {why}" for name, why in result.get("skipped", [])]
    return out


def render(result: dict) -> str:
    """The table of one ``run``: candidate, fit s, score s, GFLOP/s, score speedup of ours vs
    each peer, max relative difference vs float64, AUROC, FPR95; notes underneath."""
    rows = result["rows"]
    meta = result["meta"]
    wl, env = meta["workload"], meta["environment"]
    peer_cols = [r["peer"] for r in rows if r["kind"] == "peer" and r.get("status") == "ok"]
    headers = [
        "candidate",
        "fit s",
        "score s",
        "GFLOP/s",
        *[f"vs {PEER_LABELS[p].split()[0]}" for p in peer_cols],
        "max rel diff",
        "AUROC",
        "FPR95",
    ]
    body, notes = [], []
    for r in rows:
        name = r["candidate"]
        if r.get("status") != "ok":
            notes.append(f"{name}: failed: {r.get('error')}")
            body.append([name, "failed", *["-"] * (len(headers) - 2)])
            continue
        score = fmt_s(r["score_s"])
        if r.get("scaled_from_rows"):
            mark = "*" * (1 + sum(1 for n in notes if n.startswith("*")))
            score += mark
            notes.append(
                f"{mark} {name}: score time (scaled from {r['scaled_from_rows']:,} rows; "
                "its accuracy and AUROC/FPR95 on those rows)"
            )
        sp = r.get("speedup", {})
        scale_flag = ""
        if r["kind"] == "ours" and "scale" in r and abs(r["scale"] - 1.0) > 1e-3:
            scale_flag = " (scale!)"
            notes.append(f"{name}: scores differ from float64 by a scale {r['scale']:.6g}")
        body.append(
            [
                name,
                fmt_s(r["fit_s"]),
                score,
                f"{r['gflops']:.1f}",
                *[_fmt_x(sp.get(p)) if r["kind"] == "ours" else "" for p in peer_cols],
                _fmt_e(r.get("max_rel_diff")) + scale_flag,
                _fmt_f(r.get("auroc")),
                _fmt_f(r.get("fpr95")),
            ]
        )
    out = [
        f"ood-fast bench — {wl['name']}: {wl['covariance']} covariance, C={wl['num_classes']}, "
        f"D={wl['dim']}, train {wl['n_train']:,} × test {wl['n_test']:,}",
        f"{env['cpu_model']}, {env['threads']} threads, torch {env['torch']}"
        + (f", {env['gpu']}" if env.get("gpu") else ""),
        "",
        table(headers, body),
        "",
        "vs <peer>: that peer's score time / ours (same run); max rel diff: vs a float64 "
        "evaluation, after normalizing sign and scale; AUROC/FPR95: OOD positive.",
    ]
    for n in notes:
        out.append(n)
    out += _footer(result)
    return "\n".join(out)


def write_json(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=_json_default, allow_nan=True)
        f.write("\n")


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


# ---------------------------------------------------------------------------------------------
# KNN workload (`ood-fast bench --workload knn`, benchmarks/test_bench_knn.py)
# ---------------------------------------------------------------------------------------------
#
# Deep-nearest-neighbour scoring: a bank of L2-normalized training features, queries scored by
# −(squared L2 to the k-th nearest bank row) (OpenOOD's convention; every peer is converted to
# it by ood_fast.peers). Three cases, each its own table:
#
#   search   all queries, one k: ours on every backend that can run the "knn"/"kth_distance"
#            ops × bank dtype (fp32; bf16 with the exact fp32 re-rank), faiss IndexFlatL2
#            (OpenOOD), faiss IndexFlatIP, torch mm + topk (chunks of 2048), sklearn brute
#            (pytorch-ood; sliced and scaled like the slow Mahalanobis peers)
#   sweep    all queries, k ∈ ks: ours ``score_sweep`` (one pass) vs faiss IndexFlatL2 searched
#            once per k (OpenOOD's hyperparameter sweep)
#   batch1   one query, median over many calls: ours, faiss with 1 thread and with the pinned
#            count, torch
#
# Each model is fitted once (fit timed) and used for every case, then freed before the next
# one is fitted, so that at most one extra copy of the bank is alive (the ImageNet-scale bank
# is 2.1 GB). Every score is compared with faiss IndexFlatL2's (max |Δscore|) and, on a slice
# of the queries, with a float64 evaluation.

KNN_OPS = ("knn", "kth_distance")
KNN_PEERS = ("faiss_l2", "faiss_ip", "torch", "sklearn")
KNN_PEER_LABELS = {
    "faiss_l2": "faiss IndexFlatL2",
    "faiss_ip": "faiss IndexFlatIP",
    "torch": "torch mm+topk",
    "sklearn": "sklearn brute",
}
KNN_CASES = ("search", "sweep", "batch1")
KNN_SWEEP = (50, 100, 200, 500, 1000)
KNN_BANK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KNN_PRESETS: dict[str, dict] = {
    # seconds: smoke tests and `ood-fast bench --workload knn --quick`
    "quick": dict(n_bank=5_000, n_test=1_000, dim=128, num_classes=10, k=50),
    # the embedded default: a CIFAR-10/ResNet-18 bank (50k×512), 10k queries (half OOD)
    "cifar10": dict(n_bank=50_000, n_test=10_000, dim=512, num_classes=10, k=50),
    # ImageNet/ResNet-50 scale: a 256k×2048 bank (2.1 GB as float32: each candidate holds its
    # own copy while it runs, so ~6 GB at the peak), 2k queries, OpenOOD's ImageNet k=1000
    "imagenet": dict(n_bank=256_000, n_test=2_000, dim=2048, num_classes=1000, k=1000),
}
KNN_F64_CHECK_ROWS = 256  # queries of the float64 check


@dataclass
class KNNWorkload:
    """A normalized feature bank (the train split of ``ood_fast.data.synthetic_features``,
    L2-normalized with OpenOOD's ``x / (‖x‖ + 1e-10)``) and raw test queries, half OOD."""

    name: str
    n_bank: int
    n_test: int
    dim: int
    num_classes: int = 10
    k: int = 50
    ks: tuple = KNN_SWEEP
    seed: int = 0
    ood_fraction: float = 0.5
    _data: dict | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_preset(cls, preset: str = "cifar10", **overrides) -> KNNWorkload:
        if preset not in KNN_PRESETS:
            raise ValueError(
                f"unknown KNN preset {preset!r}; expected one of {sorted(KNN_PRESETS)}"
            )
        spec = dict(KNN_PRESETS[preset])
        spec.update({k: v for k, v in overrides.items() if v is not None})
        return cls(name=preset, **spec)

    def __post_init__(self):
        if self.k < 1 or self.k > self.n_bank:
            raise ValueError(f"k={self.k} out of range: need 1 <= k <= bank size {self.n_bank}")
        self.ks = tuple(int(k) for k in self.ks if 1 <= int(k) <= self.n_bank)

    @property
    def data(self) -> dict:
        """dict(bank [M, D] f32 normalized, test_x [N, D] f32 raw, test_is_ood [N] bool)."""
        if self._data is None:
            from . import data

            d = data.synthetic_features(
                n_train=self.n_bank,
                n_test=self.n_test,
                dim=self.dim,
                num_classes=self.num_classes,
                ood_fraction=self.ood_fraction,
                seed=self.seed,
            )
            bank = _tensor(d.pop("train_x"), torch.float32)
            for s in range(0, bank.shape[0], 65536):  # in place: no second copy of the bank
                b = bank[s : s + 65536]
                b /= torch.linalg.vector_norm(b, dim=1, keepdim=True) + 1e-10
            self._data = {
                "bank": bank,
                "test_x": _tensor(d["test_x"], torch.float32),
                "test_is_ood": _tensor(d["test_is_ood"], torch.bool),
            }
        return self._data

    @property
    def bank_bytes(self) -> int:
        return 4 * self.n_bank * self.dim

    def flops(self, n_queries: int) -> float:
        """The distance GEMM of one exact search: 2·N·M·D."""
        return 2.0 * n_queries * self.n_bank * self.dim

    def describe(self) -> str:
        return (
            f"{self.name}: bank {self.n_bank:,}×{self.dim} ({self.bank_bytes / 1e9:.2g} GB fp32), "
            f"{self.n_test:,} queries, k={self.k}"
        )

    def meta(self) -> dict:
        return {
            "workload": "knn",
            "name": self.name,
            "n_bank": self.n_bank,
            "n_test": self.n_test,
            "dim": self.dim,
            "num_classes": self.num_classes,
            "k": self.k,
            "ks": list(self.ks),
            "seed": self.seed,
            "bank_bytes": self.bank_bytes,
        }


def knn_reference(
    bank: torch.Tensor, queries: torch.Tensor, ks, tile: int = 16384, normalize_bank: bool = True
) -> np.ndarray:
    """float64 ``[n, len(ks)]`` scores −‖q̂ − b̂_(k)‖² (OpenOOD's normalizer, float64 throughout),
    streaming the bank in tiles of ``tile`` rows with a running top-max(ks). ``normalize_bank=
    False`` takes the bank rows as given (e.g. already normalized and rounded to bf16)."""
    ks = list(ks)
    kmax = max(ks)
    q = queries.to(torch.float64)
    q = q / (torch.linalg.vector_norm(q, dim=1, keepdim=True) + 1e-10)
    qsq = q.square().sum(1, keepdim=True)
    best = None
    for s in range(0, bank.shape[0], tile):
        b = bank[s : s + tile].to(torch.float64)
        if normalize_bank:
            b = b / (torch.linalg.vector_norm(b, dim=1, keepdim=True) + 1e-10)
        d = (qsq + b.square().sum(1)[None, :]).sub_(q @ b.T, alpha=2.0).clamp_(min=0.0)
        if best is not None:
            d = torch.cat([best, d], dim=1)
        best = d.topk(min(kmax, d.shape[1]), dim=1, largest=False, sorted=True).values
    return (-best[:, [k - 1 for k in ks]]).numpy()


@dataclass
class KNNCandidate(_Candidate):
    """One row of the KNN benchmark: ``fit(bank) -> model`` (shared by every candidate with the
    same ``fit_key``), ``score(model, queries)`` -> ``[N]`` (``[N, len(ks)]`` for the sweep)."""

    case: str  # "search", "sweep" or "batch1"
    fit_key: str
    fit: Callable[[Any], Any]
    score: Callable[[Any, Any], Any]
    _: KW_ONLY
    precision: str = "fp32"  # bank dtype of ours
    threads: int | None = None
    min_rows: int = 64

    INFO_FIELDS = ("kind", "case", "backend", "precision", "peer", "threads", "device")


def available_knn_backends() -> dict[str, list[str]]:
    """Backend -> reasons it cannot run the KNN ops (``knn`` and ``kth_distance``) here (empty:
    it can). Asks the registry with a tiny probe on the backend's device, so a build without the
    kernel ("this build of ood_fast._C has no 'knn' kernel") is listed with that reason."""
    from . import _backend, ops  # noqa: F401  (registers the ops' implementations)

    out = {}
    registered = _backend.registered_ops()
    for b, why in _backend.availability().items():
        why = list(why)
        for op in KNN_OPS:
            if b not in registered.get(op, ()):
                why.append(f"no {b!r} implementation of {op!r} is registered")
        if b == "triton" and not torch.cuda.is_available() and not why:
            why.append("only the Triton CPU interpreter is on (a test tool, not timed)")
        if not why:
            dev = _device_for(b)
            q, bank = torch.zeros(2, 8, device=dev), torch.ones(4, 8, device=dev)
            for op, arg in (("knn", 1), ("kth_distance", [1])):
                try:
                    r = _backend.reasons(op, b, q, bank, arg, "l2", True)
                except Exception as exc:  # a broken check is a reason too
                    r = [f"{op}: availability check failed ({type(exc).__name__}: {exc})"]
                why.extend(x for x in r if x not in why)
        out[b] = why
    return out


def _knn_ours(backend: str, precision: str, k: int, ks, case: str) -> KNNCandidate:
    dtype = KNN_BANK_DTYPES[precision]

    def fit(bank):
        import ood_fast

        return ood_fast.KNN(k=k, backend=backend, bank_dtype=dtype).fit(bank)

    if case == "sweep":
        name = f"ours {backend} {precision} score_sweep"
        score = lambda m, x: m.score_sweep(x, list(ks))  # noqa: E731
    else:
        name = f"ours {backend} {precision}" + (" bank" if precision != "fp32" else "")
        score = lambda m, x: m.score(x)  # noqa: E731
    return KNNCandidate(
        name=name,
        kind="ours",
        case=case,
        fit_key=f"ours:{backend}:{precision}:k{k}",  # the model carries its k
        fit=fit,
        score=score,
        backend=backend,
        precision=precision,
        device=_device_for(backend),
    )


def _knn_peer(name: str, k: int, ks, case: str, threads: int | None = None) -> KNNCandidate | str:
    """The KNN peer ``name`` for ``case`` as a candidate, or the reason it cannot run here."""
    if name not in KNN_PEERS:
        raise ValueError(f"unknown KNN peer {name!r}; expected one of {KNN_PEERS}")
    from . import peers as P

    label = KNN_PEER_LABELS[name]
    if name.startswith("faiss"):
        ok = P.faiss_available()
        if ok is not True:
            return str(ok)
        metric = name.split("_")[1]
        fit = P.faiss_l2_fit if metric == "l2" else P.faiss_ip_fit
        one = P.faiss_l2_score if metric == "l2" else P.faiss_ip_score
        if case == "sweep":
            return KNNCandidate(
                name=f"{label} ×{len(ks)} searches",
                kind="peer",
                case=case,
                fit_key=f"peer:{name}",
                fit=fit,
                score=lambda m, x: P.faiss_l2_sweep(m, x, list(ks)),
                peer=name,
            )
        t = threads
        return KNNCandidate(
            name=label + (f" ({t} thread{'s' if t != 1 else ''})" if t else ""),
            kind="peer",
            case=case,
            fit_key=f"peer:{name}",
            fit=fit,
            score=lambda m, x: one(m, x, k, threads=t),
            peer=name,
            threads=t,
        )
    if name == "torch":
        return KNNCandidate(
            name=label,
            kind="peer",
            case=case,
            fit_key="peer:torch",
            fit=P.torch_knn_fit,
            score=lambda m, x: P.torch_knn_score(m, x, k),
            peer=name,
        )
    try:
        import sklearn  # noqa: F401
    except Exception as exc:
        return f"scikit-learn does not import ({type(exc).__name__}: {exc})"
    return KNNCandidate(
        name=label,
        kind="peer",
        case=case,
        fit_key="peer:sklearn",
        fit=P.sklearn_knn_fit,
        score=lambda m, x: P.sklearn_knn_score(m, x, k),
        peer=name,
        sliced=True,
    )


def knn_candidates(
    wl: KNNWorkload,
    backends: Sequence[str] | None = None,
    precisions: Sequence[str] = PRECISIONS,
    peers: Sequence[str] = KNN_PEERS,
    cases: Sequence[str] = KNN_CASES,
) -> tuple[list[KNNCandidate], list[tuple[str, str]]]:
    """Every candidate of the requested cases, and [(name, why it does not run)]."""
    avail = available_knn_backends()
    bad = [c for c in cases if c not in KNN_CASES]
    if bad:
        raise ValueError(f"unknown KNN cases {bad}; expected some of {KNN_CASES}")
    for p in precisions:
        if p not in KNN_BANK_DTYPES:
            raise ValueError(f"unknown precision {p!r}; expected one of {tuple(KNN_BANK_DTYPES)}")
    ok_backends, skipped = [], []
    for b in backends if backends is not None else list(avail):
        if b not in avail:
            raise ValueError(f"unknown backend {b!r}; expected one of {tuple(avail)}")
        if avail[b]:
            skipped.append((f"ours {b}", "; ".join(avail[b])))
        else:
            ok_backends.append(b)
    peer_why = {}
    for p in peers:
        c = _knn_peer(p, wl.k, wl.ks, "search")
        if isinstance(c, str):
            peer_why[p] = c
            skipped.append((KNN_PEER_LABELS[p], c))
    usable = [p for p in peers if p not in peer_why]
    threads = max(1, torch.get_num_threads())
    out: list[KNNCandidate] = []
    if "search" in cases:
        out += [_knn_ours(b, p, wl.k, wl.ks, "search") for b in ok_backends for p in precisions]
        out += [_knn_peer(p, wl.k, wl.ks, "search") for p in usable]
    if "sweep" in cases:
        if len(wl.ks) < 2:
            skipped.append(("sweep", f"needs >= 2 values of k <= bank size {wl.n_bank}"))
        else:
            out += [_knn_ours(b, "fp32", wl.k, wl.ks, "sweep") for b in ok_backends]
            if "faiss_l2" in usable:
                out.append(_knn_peer("faiss_l2", wl.k, wl.ks, "sweep"))
    if "batch1" in cases:
        out += [_knn_ours(b, p, wl.k, wl.ks, "batch1") for b in ok_backends for p in precisions]
        if "faiss_l2" in usable:
            for t in sorted({1, threads}):
                out.append(_knn_peer("faiss_l2", wl.k, wl.ks, "batch1", threads=t))
        if "torch" in usable:
            out.append(_knn_peer("torch", wl.k, wl.ks, "batch1"))
    return out, skipped


def _time_scoring(cand, model, x, *, repeats: int, budget: float, dev: str):
    """(Timing, scores, row indices timed or None): time ``cand.score(model, x)``; a sliced
    candidate is probed on ``min_rows`` rows and timed on a slice sized to the budget."""
    N = x.shape[0]
    rows_idx = None
    if cand.sliced:
        probe = slice_rows(N, cand.min_rows)
        px = x[probe.to(dev)]
        _sync(dev)
        t0 = time.perf_counter()
        cand.score(model, px)
        _sync(dev)
        per_row = max(time.perf_counter() - t0, 1e-9) / len(probe)
        runs = max(1, min(repeats, 3)) + 1
        n = int(budget / runs / per_row)
        n = max(len(probe), (n // cand.min_rows) * cand.min_rows)
        if n < N:
            rows_idx = slice_rows(N, n)
    xt = x if rows_idx is None else x[rows_idx.to(dev)]
    t, scores = time_call(lambda: cand.score(model, xt), repeats=repeats, budget=budget, device=dev)
    return t, scores, rows_idx


def run_knn_candidate(
    cand: KNNCandidate,
    model,
    wl: KNNWorkload,
    *,
    repeats: int = 5,
    budget: float = 5.0,
    batch1_repeats: int = 200,
) -> tuple[dict, np.ndarray | None, torch.Tensor | None]:
    """Score and time one candidate with a fitted model: (row, float64 scores, rows timed)."""
    row = cand.info()
    d = wl.data
    dev = cand.device
    try:
        x = d["test_x"].to(dev)
        if cand.case == "batch1":
            x = x[:1]
            t, scores, idx = _time_scoring(
                cand, model, x, repeats=batch1_repeats, budget=budget, dev=dev
            )
        else:
            t, scores, idx = _time_scoring(cand, model, x, repeats=repeats, budget=budget, dev=dev)
        n_rows = x.shape[0] if idx is None else len(idx)
        scale = x.shape[0] / n_rows
        row["score_s"] = t.median * scale
        row["score_min_s"] = t.min * scale
        row["score_timing"] = t.as_dict()
        row["queries"] = int(x.shape[0])
        row["scored_rows"] = n_rows
        row["scaled_from_rows"] = n_rows if idx is not None else None
        row["gflops"] = wl.flops(x.shape[0]) / row["score_s"] / 1e9
        row["bank_gbps"] = wl.bank_bytes / row["score_s"] / 1e9 if cand.case == "batch1" else None
        s = _numpy64(scores)
        want = (n_rows, len(wl.ks)) if cand.case == "sweep" else (n_rows,)
        if s.shape != want:
            raise ValueError(f"score returned shape {s.shape}, expected {want}")
        if not np.all(np.isfinite(s)):
            raise ValueError("non-finite scores")
        if cand.case != "batch1":
            is_ood = d["test_is_ood"] if idx is None else d["test_is_ood"][idx]
            if cand.case == "sweep":
                per_k = [ood_metrics(s[:, j], is_ood) for j in range(s.shape[1])]
                j = int(np.nanargmax([m["auroc"] for m in per_k]))
                row["auroc_per_k"] = {int(k): m["auroc"] for k, m in zip(wl.ks, per_k, strict=True)}
                row["best_k"] = int(wl.ks[j])
                row.update(per_k[j])
            else:
                row.update(ood_metrics(s, is_ood))
        row["status"] = "ok"
        return row, s, idx
    except Exception as exc:  # a failing candidate is a row with its error, not a dead run
        row["status"] = "error"
        row["error"] = _error(exc)
        return row, None, None


def _knn_checks(rows, scores, wl: KNNWorkload) -> None:
    """max |Δscore| vs faiss IndexFlatL2 (per case, on the rows both scored) and vs a float64
    evaluation on up to KNN_F64_CHECK_ROWS evenly spaced queries (and on the single query of the
    batch-of-1 case). A reduced-precision bank is checked against the float64 search over the
    bank as ``ood_fast.KNN`` stores it (normalized in float32, then rounded): its "exact" mode
    promises the float32 search over those values, and the gap to faiss is the rounding."""
    d = wl.data
    f64_idx = slice_rows(wl.n_test, KNN_F64_CHECK_ROWS)
    ks_all = sorted(set(wl.ks) | {wl.k})
    refs: dict[str, dict] = {}

    def ref_for(precision: str) -> dict:
        if precision not in refs:
            from .detectors.knn import openood_normalize

            dt = KNN_BANK_DTYPES.get(precision, torch.float32)
            if dt == torch.float32:
                bank, norm = d["bank"], True
            else:  # as KNN stores it: normalized in float32, rounded; chunked to bound memory
                bank = torch.cat(
                    [
                        openood_normalize(d["bank"][s : s + 65536]).to(dt)
                        for s in range(0, d["bank"].shape[0], 65536)
                    ]
                )
                norm = False
            a = knn_reference(bank, d["test_x"][f64_idx], ks_all, normalize_bank=norm)
            col = {k: j for j, k in enumerate(ks_all)}
            refs[precision] = {
                "search": a[:, col[wl.k]],
                "sweep": a[:, [col[k] for k in wl.ks]],
                "batch1": knn_reference(bank, d["test_x"][:1], [wl.k], normalize_bank=norm)[:, 0],
            }
        return refs[precision]

    pos = {int(v): j for j, v in enumerate(f64_idx.tolist())}
    for case in KNN_CASES:
        in_case = [r for r in rows if r["case"] == case]
        base = next(
            (
                r
                for r in in_case
                if r.get("peer") == "faiss_l2"
                and r.get("status") == "ok"
                and (case != "batch1" or r.get("threads") == 1)
            ),
            None,
        )
        for r in in_case:
            r["diff_reference"] = base["candidate"] if base is not None else None
            if r.get("status") != "ok":
                continue
            s, idx = scores[id(r)]
            if base is not None:
                bs, bidx = scores[id(base)]
                if idx is None and bidx is None:
                    r["max_abs_diff_faiss"] = float(np.abs(s - bs).max())
                elif bidx is None:  # this row is a slice; faiss scored everything
                    r["max_abs_diff_faiss"] = float(np.abs(s - bs[idx.numpy()]).max())
            ref = ref_for(r["precision"] if r["kind"] == "ours" else "fp32")[case]
            if case == "batch1":
                r["max_abs_diff_f64"] = float(np.abs(s - ref).max())
            elif idx is None:
                r["max_abs_diff_f64"] = float(np.abs(s[f64_idx.numpy()] - ref).max())
            else:  # a sliced peer: on the rows it scored that the check has
                common = [(i, pos[int(v)]) for i, v in enumerate(idx.tolist()) if int(v) in pos]
                if common:
                    a, b = zip(*common, strict=True)
                    r["max_abs_diff_f64"] = float(np.abs(s[list(a)] - ref[list(b)]).max())
            r["f64_reference"] = (
                "float64 search over the stored (rounded) bank"
                if r["kind"] == "ours" and r["precision"] != "fp32"
                else "float64 search"
            )


def add_knn_speedups(rows: list[dict]) -> None:
    """Per case: speedup["faiss"] = faiss IndexFlatL2's time / this row's (batch1: faiss's best
    latency over its thread counts), speedup["torch"] = torch mm+topk's time / this row's."""
    for case in KNN_CASES:
        rs = [r for r in rows if r["case"] == case and r.get("status") == "ok"]
        faiss_t = [r["score_s"] for r in rs if r.get("peer") == "faiss_l2"]
        torch_t = [r["score_s"] for r in rs if r.get("peer") == "torch"]
        for r in rs:
            sp = {}
            if faiss_t:
                sp["faiss"] = min(faiss_t) / r["score_s"]
            if torch_t:
                sp["torch"] = min(torch_t) / r["score_s"]
            r["speedup"] = sp


def run_knn(
    preset: str = "cifar10",
    *,
    backends: Sequence[str] | None = None,
    precisions: Sequence[str] = PRECISIONS,
    peers: Sequence[str] = KNN_PEERS,
    cases: Sequence[str] = KNN_CASES,
    threads: int | None = None,
    repeats: int = 5,
    budget: float = 5.0,
    batch1_repeats: int = 200,
    k: int | None = None,
    progress: bool = True,
    workload: KNNWorkload | None = None,
) -> dict:
    """The KNN benchmark: returns dict(meta, rows, skipped, table) (see the section comment)."""
    import gc

    wl = workload or KNNWorkload.from_preset(preset, k=k)
    load_before = _loadavg()
    with pinned_threads(threads):
        cands, skipped = knn_candidates(wl, backends, precisions, peers, cases)
        groups: dict[str, list[KNNCandidate]] = {}
        for c in cands:
            groups.setdefault(c.fit_key, []).append(c)
        bar = _progress_bar(len(cands) + 2, "ood-fast bench knn", progress)
        bar.set_postfix_str(f"generating {wl.name} bank")
        d = wl.data
        bar.update()
        rows: list[dict] = []
        scores: dict[int, tuple] = {}
        fits: dict[str, dict] = {}
        for key, group in groups.items():
            first = group[0]
            dev = first.device
            bar.set_postfix_str(f"fit {first.name}")
            model, fit_row = None, {}
            try:
                bank = d["bank"].to(dev)
                fit_t, model = time_call(
                    lambda first=first, bank=bank: first.fit(bank),
                    repeats=min(repeats, 3),
                    budget=budget,
                    device=dev,
                )
                fit_row = {"fit_s": fit_t.median, "fit_timing": fit_t.as_dict()}
                del bank
            except Exception as exc:
                fit_row = {"fit_error": _error(exc)}
            fits[key] = fit_row
            for c in group:
                bar.set_postfix_str(c.name)
                if model is None:
                    row = {**c.info(), "status": "error", "error": f"fit: {fit_row['fit_error']}"}
                    s = idx = None
                else:
                    row, s, idx = run_knn_candidate(
                        c,
                        model,
                        wl,
                        repeats=repeats,
                        budget=budget,
                        batch1_repeats=batch1_repeats,
                    )
                    row.update(fit_row)
                rows.append(row)
                if s is not None:
                    scores[id(row)] = (s, idx)
                bar.update()
            del model
            gc.collect()
        bar.set_postfix_str("float64 check")
        order = {c: i for i, c in enumerate(KNN_CASES)}
        rows.sort(key=lambda r: order[r["case"]])  # stable: candidate order within a case
        _knn_checks(rows, scores, wl)
        bar.update()
        bar.close()
        add_knn_speedups(rows)
        meta = {
            "workload": wl.meta(),
            "environment": environment(),
            "repeats": repeats,
            "batch1_repeats": batch1_repeats,
            "budget_s": budget,
            "loadavg_before": load_before,
        }
    result = {"meta": meta, "rows": rows, "skipped": [list(s) for s in skipped]}
    result["table"] = render_knn(result)
    return result


def render_knn(result: dict) -> str:
    """The KNN tables: one per case (search, sweep, batch of 1), notes underneath."""
    rows, meta = result["rows"], result["meta"]
    wl, env = meta["workload"], meta["environment"]
    out = [
        f"ood-fast bench — knn {wl['name']}: bank {wl['n_bank']:,}×{wl['dim']} "
        f"({wl['bank_bytes'] / 1e9:.2g} GB fp32, L2-normalized), {wl['n_test']:,} queries "
        f"(half OOD), k={wl['k']}",
        f"{env['cpu_model']}, {env['threads']} threads, torch {env['torch']}"
        + (f", faiss {env['faiss']}" if env.get("faiss") else "")
        + (f", {env['gpu']}" if env.get("gpu") else ""),
    ]
    notes: list[str] = []
    titles = {
        "search": f"search: {wl['n_test']:,} queries, k={wl['k']}",
        "sweep": f"sweep: k ∈ {{{', '.join(map(str, wl['ks']))}}} ({wl['n_test']:,} queries)",
        "batch1": "batch of 1 query (median over many calls)",
    }
    for case in KNN_CASES:
        rs = [r for r in rows if r["case"] == case]
        if not rs:
            continue
        b1 = case == "batch1"
        ref = next((r.get("diff_reference") for r in rs if r.get("diff_reference")), None)
        headers = [
            "candidate",
            "fit s",
            "score ms" if b1 else "score s",
            "GB/s" if b1 else "GFLOP/s",
            "vs faiss",
            "vs torch",
            "max |Δ| faiss",
            "max |Δ| f64",
        ]
        if not b1:
            headers += ["AUROC", "FPR95"]
        if case == "sweep":
            headers.append("best k")
        body = []
        for r in rs:
            name = r["candidate"]
            if r.get("status") != "ok":
                notes.append(f"{name} ({case}): failed: {r.get('error')}")
                body.append([name, "failed", *["-"] * (len(headers) - 2)])
                continue
            score = f"{r['score_s'] * 1e3:.3g}" if b1 else fmt_s(r["score_s"])
            if r.get("scaled_from_rows"):
                mark = "*" * (1 + sum(1 for n in notes if n.startswith("*")))
                score += mark
                notes.append(
                    f"{mark} {name}: score time scaled from {r['scaled_from_rows']:,} of "
                    f"{r['queries']:,} queries (its AUROC/FPR95 on those)"
                )
            sp = r.get("speedup", {})
            cells = [
                name,
                fmt_s(r.get("fit_s")),
                score,
                f"{r['bank_gbps']:.1f}" if b1 else f"{r['gflops']:.1f}",
                _fmt_x(sp.get("faiss")),
                _fmt_x(sp.get("torch")),
                _fmt_e(r.get("max_abs_diff_faiss")),
                _fmt_e(r.get("max_abs_diff_f64")),
            ]
            if not b1:
                cells += [_fmt_f(r.get("auroc")), _fmt_f(r.get("fpr95"))]
            if case == "sweep":
                cells.append(str(r.get("best_k", "-")))
            body.append(cells)
        out += ["", titles[case], table(headers, body)]
        if ref is None:
            notes.append(f"{case}: no faiss IndexFlatL2 row: max |Δ| faiss not computed")
    out += [
        "",
        "score: median time; vs faiss / vs torch: that peer's time / this row's (same run; "
        "batch of 1: faiss's best thread count); GFLOP/s: 2·N·M·D / time (sweep: one search's "
        "flops); GB/s: bank bytes / time; max |Δ| faiss: vs faiss IndexFlatL2's scores "
        "(batch of 1: its 1-thread row); max |Δ| f64: vs a float64 evaluation on "
        f"{KNN_F64_CHECK_ROWS} queries (bf16 bank: over the bank as stored, rounded to bf16 — "
        "exact re-ranking makes it equal the fp32 search over those values, so its |Δ| faiss is "
        "the bank's rounding); scores are −squared L2 to the k-th neighbour (OpenOOD), "
        "AUROC/FPR95 with OOD positive (sweep: at its best k).",
        *notes,
    ]
    out += _footer(result)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# GPU benchmark (benchmarks/gpu_check.sh runs this on a lent GPU)
# ---------------------------------------------------------------------------------------------

GPU_CASES = (
    {
        "name": "tied C=1000 D=2048 N=10k",
        "num_classes": 1000,
        "dim": 2048,
        "n_train": 50_000,
        "n_test": 10_000,
    },
    {
        "name": "tied C=10 D=512 N=10k",
        "num_classes": 10,
        "dim": 512,
        "n_train": 50_000,
        "n_test": 10_000,
    },
)


def torch_expression(
    xc: torch.Tensor,
    w: torch.Tensor,
    mw: torch.Tensor,
    mnorm: torch.Tensor,
    dtype: torch.dtype = torch.float32,
):
    """The best plain torch (cuBLAS) expression of tied Mahalanobis scoring:
    z = x̃ W (one GEMM), d² = ‖z‖² − 2 z·mw + ‖mw‖² (one addmm), min over classes.
    ``dtype``: GEMM input dtype (float32, or bfloat16 with fp32 accumulation in cuBLAS)."""
    if dtype == torch.float32:
        z = xc @ w
        d2 = torch.addmm(mnorm[None, :], z, mw.T, alpha=-2.0)
    else:  # bf16 GEMMs (fp32 accumulation inside cuBLAS, bf16 outputs), the rest in fp32
        z = xc.to(dtype) @ w.to(dtype)
        d2 = mnorm[None, :] - 2.0 * (z @ mw.T.to(dtype)).float()
        z = z.float()
    d2 += (z * z).sum(1, keepdim=True)
    return -d2.min(dim=1).values


def gpu_benchmark(
    out_path: str | None = None,
    *,
    repeats: int = 20,
    budget: float = 10.0,
    cases: Sequence[dict] = GPU_CASES,
    progress: bool = True,
    device: str = "cuda",
) -> dict:
    """Time ``ood_fast.ops.mahalanobis`` (reduce="min") on the ``triton`` and ``cuda`` backends
    (and the torch reference backend) against the best torch/cuBLAS expression in fp32, TF32 and
    bf16, on GPU-resident data, with CUDA events (warm-up, then the median of up to ``repeats``
    runs within ``budget`` seconds). Every candidate is checked against a float64 evaluation and
    gets AUROC/FPR95. Writes JSON (rows + environment) to ``out_path``; returns the dict, whose
    "table" is the rendered text. ``device="cpu"`` is a dry run of the same code on the CPU
    (backends cpu and torch), for testing the harness without a GPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("gpu_benchmark needs a CUDA device; torch sees none")
    backends = ("triton", "cuda", "torch") if device == "cuda" else ("cpu", "torch")
    results = {
        "meta": {"environment": environment(), "repeats": repeats, "budget_s": budget},
        "cases": [],
        "skipped": [],
    }
    avail = available_backends()
    for b in backends:
        if avail.get(b):
            results["skipped"].append([f"ours {b}", "; ".join(avail[b])])
    for case in cases:
        results["cases"].append(_gpu_case(case, backends, avail, repeats, budget, progress, device))
        if device == "cuda":
            torch.cuda.empty_cache()
    results["table"] = render_gpu(results)
    if out_path:
        write_json(results, out_path)
    return results


def _gpu_case(
    case: dict, backends, avail: dict, repeats: int, budget: float, progress: bool, device: str
) -> dict:
    from tqdm import tqdm

    from . import data, ops

    dev = torch.device(device)
    d = data.synthetic_features(
        n_train=case["n_train"],
        n_test=case["n_test"],
        dim=case["dim"],
        num_classes=case["num_classes"],
        seed=0,
    )
    train_x = _tensor(d["train_x"], torch.float32).to(dev)
    train_y = _tensor(d["train_y"], torch.int64).to(dev)
    test_x = _tensor(d["test_x"], torch.float32).to(dev)
    is_ood = _tensor(d["test_is_ood"], torch.bool)
    ref = Reference(train_x, train_y, "tied", case["num_classes"])
    ref_scores = ref.score(test_x)
    w64 = ref.factors[0]  # upper triangular L⁻ᵀ
    plan = ops.mahalanobis_plan(ref.means, w64, triangular=True)
    w32, center32 = w64.float(), ref.center.float()
    mw64 = (ref.means - ref.center) @ w64
    mw, mnorm = mw64.float(), (mw64 * mw64).sum(1).float()
    del train_x, train_y, ref
    N, D, C = test_x.shape[0], case["dim"], case["num_classes"]
    flops = score_flops(N, D, C, "tied")

    def ours_fn(b, p):
        return lambda: ops.mahalanobis(test_x, plan, "min", precision=p, backend=b).values.neg()

    def torch_fn(dt, tf32):
        return lambda: _with_tf32(
            tf32, lambda: torch_expression(test_x - center32, w32, mw, mnorm, dt)
        )

    cands: list[tuple[str, Callable[[], Any], dict]] = []
    for b in backends:
        if not avail.get(b):
            for p in PRECISIONS:
                cands.append(
                    (f"ours {b} {p}", ours_fn(b, p), {"kind": "ours", "backend": b, "precision": p})
                )
    for label, dt, tf32 in (
        ("torch fp32", torch.float32, False),
        ("torch tf32", torch.float32, True),
        ("torch bf16", torch.bfloat16, False),
    ):
        cands.append((label, torch_fn(dt, tf32), {"kind": "peer", "peer": label}))
    rows = []
    for label, fn, info in tqdm(
        cands, file=sys.stderr, disable=not progress, desc=case["name"], leave=False
    ):
        row = {"candidate": label, **info}
        try:
            t, scores = time_call(fn, repeats=repeats, budget=budget, device=device)
            row.update(
                score_s=t.median,
                score_min_s=t.min,
                runs=t.runs,
                warmup_s=t.warmup,
                tflops=flops / t.median / 1e12,
            )
            cmp = compare(scores, ref_scores)
            row.update(
                scale=cmp["scale"],
                max_rel_diff=cmp["max_rel_diff"],
                median_rel_diff=cmp["median_rel_diff"],
            )
            row.update(ood_metrics(cmp["normalized"], is_ood))
            row["status"] = "ok"
        except Exception as exc:
            row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:300])
        rows.append(row)
    by = {r["candidate"]: r for r in rows if r.get("status") == "ok"}
    for r in rows:
        if r["kind"] == "ours" and r.get("status") == "ok":
            r["speedup"] = {
                k: by[k]["score_s"] / r["score_s"]
                for k in ("torch fp32", "torch tf32", "torch bf16")
                if k in by
            }
    return {**case, "flops": flops, "rows": rows}


def _with_tf32(on: bool, fn):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        return fn()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def render_gpu(results: dict) -> str:
    env = results["meta"]["environment"]
    out = [
        f"ood-fast GPU bench — {env.get('gpu', '?')}, torch {env['torch']}, CUDA {env.get('cuda')}"
    ]
    for case in results["cases"]:
        headers = [
            "candidate",
            "score ms",
            "TFLOP/s",
            "vs torch fp32",
            "vs torch tf32",
            "vs torch bf16",
            "max rel diff",
            "AUROC",
            "FPR95",
        ]
        body = []
        for r in case["rows"]:
            if r.get("status") != "ok":
                body.append([r["candidate"], "failed", *["-"] * 7])
                continue
            sp = r.get("speedup", {})
            body.append(
                [
                    r["candidate"],
                    f"{r['score_s'] * 1e3:.3f}",
                    f"{r['tflops']:.1f}",
                    *[
                        _fmt_x(sp.get(k)) if sp else ""
                        for k in ("torch fp32", "torch tf32", "torch bf16")
                    ],
                    _fmt_e(r["max_rel_diff"]),
                    _fmt_f(r.get("auroc")),
                    _fmt_f(r.get("fpr95")),
                ]
            )
        out += ["", case["name"], table(headers, body)]
        out += [
            f"{r['candidate']}: failed: {r['error']}"
            for r in case["rows"]
            if r.get("status") != "ok"
        ]
    for name, why in results.get("skipped", []):
        out.append(f"not run: {name}: {why}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Quantization workload (`ood-fast bench --workload quant`, benchmarks/test_bench_quant.py)
# ---------------------------------------------------------------------------------------------
#
# Two halves:
#
# kernel speed   one ``QuantCase`` per op and size, ours (the op on the backend that auto-selects,
#                or each of ``backends``; the row says which backend ran, recorded at the
#                registry, per op) against the peers of ``ood_fast.peers``:
#                  hadamard fp32, rows of n, 64 MB per call: vs ``dst.copy_(src)`` of the same
#                    bytes (the memory-bound limit: one read + one write) and a dense
#                    ``torch.matmul(x, H, out=)``; GB/s = bytes read + written / time
#                  rotate_quantize (random Hadamard, per token, fp32 -> int8): vs a copy moving
#                    the same total bytes (fp32 in + int8 codes + fp32 scales out)
#                  int8_linear M×K×N: ours on pre-quantized int8 inputs, ours rotated W8A8
#                    (rotate_quantize + int8_linear chained on ``out=`` buffers; and a
#                    ``QuantLinear`` forward where ood_fast.quant has one) vs fp32 ``F.linear``,
#                    torch's dynamic int8 ``Linear`` on each quantized engine (fbgemm, onednn;
#                    the faster is "torch int8") and ``torch._int_mm`` (int32, no epilogue)
#                The candidates of a case are timed round-robin (``time_round_robin``: one call
#                of each per round, so that on a shared machine they see the same load). Each
#                candidate is checked before it is timed on its first QUANT_CHECK_ROWS rows (against float64; int GEMMs exactly against int64) and a slow one (the
#                torch reference backend, a dense x@H) is timed on its first rows, sized to
#                the budget, and scaled linearly (the row says so).
# SQNR           W8A8 (weights int8 per output channel; activations int8 static per tensor —
#                scale calibrated on a calibration split — or dynamic per token) of a linear
#                layer y = x Wᵀ under each method of QUANT_METHODS, on the synthetic outlier
#                activations (``ood_fast.quant.synthetic``) and on the inputs of the linears of
#                a randomly initialised Mamba block with injected outliers (``ood_fast.quant``):
#                SQNR = 10 log10(Σ y² / Σ (ŷ − y)²), y in float64, ŷ from our ops
#                (rotate_quantize + int8_linear), measured by quant.synthetic's
#                evaluate_linear_w8a8 (one definition for the bench and the SQNR gate tests).

QUANT_OPS = ("hadamard", "rotate_quantize", "int8_linear")
QUANT_PEERS = ("copy", "dense", "torch_fp32", "torch_int8", "int_mm")
QUANT_PEER_LABELS = {
    "copy": "copy (dst.copy_(src))",
    "dense": "dense x@H (matmul out=)",
    "torch_fp32": "torch F.linear fp32",
    "torch_int8": "torch int8 dynamic Linear",
    "int_mm": "torch._int_mm (int32, no dequant)",
}
QUANT_METHODS = ("none", "H", "KLT+H", "smooth+H", "smooth+KLT+H")
QUANT_GRANULARITIES = ("per_tensor", "per_token")
QUANT_CHECK_ROWS = 64
MB = 1 << 20
QUANT_PRESETS: dict[str, dict] = {
    # seconds: smoke tests and `ood-fast bench --workload quant --quick`
    "quick": dict(
        hadamard_ns=(256, 1536),
        hadamard_bytes=2 * MB,
        dense_ns=(256,),
        rq_ns=(1024,),
        rq_bytes=2 * MB,
        linear=(128, 512, 512),
        sqnr_synthetic=dict(dim=256, n_calib=4096, n_test=1024),
        sqnr_mamba=dict(d_model=64, tokens=256),
    ),
    # the issue's bars: 64 MB per Hadamard call, M=2048 K=N=4096 linear
    "default": dict(
        hadamard_ns=(256, 1024, 4096, 8192, 1536, 3584, 5120),
        hadamard_bytes=64 * MB,
        dense_ns=(4096,),
        rq_ns=(4096,),
        rq_bytes=64 * MB,
        # the same rotate_quantize case beyond the last-level cache: on a VM whose L3 holds the
        # 64 MB case (and its 80 MB copy peer) this is the memory-bandwidth regime
        rq_dram_bytes=512 * MB,
        linear=(2048, 4096, 4096),
        sqnr_synthetic=dict(dim=256, n_calib=16384, n_test=4096),
        sqnr_mamba=dict(d_model=256, tokens=1024),
    ),
}
# The issue's performance bars: our time ratio (peer time / ours, same run) must reach these.
# hadamard K·2^m sizes (K in 12, 20, 28) have the lower copy bar.
QUANT_BARS = {
    "hadamard": {"copy": 0.8, "dense": 50.0},
    "hadamard_k": {"copy": 0.5, "dense": 50.0},
    "rotate_quantize": {"copy": 0.7},
    "int8_linear": {"torch_fp32": 2.0, "torch_int8": 1.0},
    "w8a8_linear": {"torch_int8": 0.9},
}


def _hadamard_k(n: int) -> int:
    """K of n = K·2^m (1 for a power of two); mirrors ood_fast.reference.hadamard.factorize
    without needing it (the bench must run before the ops exist, saying why they cannot)."""
    for k in (1, 12, 20, 28):
        if n % k == 0 and (n // k) & (n // k - 1) == 0:
            return k
    return 0


@dataclass
class QuantCase:
    """One kernel case: ``op`` on ``rows`` rows of ``n`` (int8_linear: x [rows, n] against
    weights [n_out, n]); inputs generated once, deterministic in ``seed``."""

    op: str
    rows: int
    n: int
    n_out: int = 0
    seed: int = 0
    _inputs: dict | None = field(default=None, repr=False, compare=False)

    @classmethod
    def for_bytes(cls, op: str, n: int, nbytes: int, seed: int = 0) -> QuantCase:
        """Rows of fp32 n sized so that the input is ``nbytes`` (64 MB per call)."""
        return cls(op, max(1, nbytes // (4 * n)), n, seed=seed)

    @property
    def name(self) -> str:
        if self.op == "int8_linear":
            return f"int8_linear M={self.rows} K={self.n} N={self.n_out}"
        mb = 4 * self.rows * self.n / MB
        size = f"{mb:.0f} MB" if mb >= 1 else f"{mb * 1024:.0f} KB"
        k = _hadamard_k(self.n)
        form = (
            f"{k}·2^{(self.n // k).bit_length() - 1}" if k > 1 else f"2^{self.n.bit_length() - 1}"
        )
        if self.op == "hadamard":
            return f"hadamard n={self.n} ({form}) fp32 {size}"
        return f"rotate_quantize n={self.n} H per-token fp32->int8 {size}"

    @property
    def bytes(self) -> int:
        """Bytes read + written by one call (hadamard: fp32 in and out; rotate_quantize: fp32
        in, int8 codes and one fp32 scale per row out; int8_linear: int8 x and W in, fp32 out)."""
        r, n = self.rows, self.n
        if self.op == "hadamard":
            return 8 * r * n
        if self.op == "rotate_quantize":
            return 4 * r * n + r * n + 4 * r
        return r * n + self.n_out * n + 4 * r * self.n_out

    @property
    def ops(self) -> float:
        """int8_linear: 2·M·N·K multiply-adds counted as two ops; else 0."""
        return 2.0 * self.rows * self.n * self.n_out if self.op == "int8_linear" else 0.0

    @property
    def unit(self) -> str:
        return "GOP/s" if self.op == "int8_linear" else "GB/s"

    def bars(self, role: str) -> dict:
        """{peer role: bar} for our candidate of this role ("op" or "w8a8"; others: none)."""
        if role not in ("op", "w8a8"):
            return {}
        if self.op == "int8_linear":
            return dict(QUANT_BARS["w8a8_linear" if role == "w8a8" else "int8_linear"])
        if self.op == "hadamard":
            bars = dict(QUANT_BARS["hadamard" if _hadamard_k(self.n) == 1 else "hadamard_k"])
            return bars
        return dict(QUANT_BARS["rotate_quantize"])

    @property
    def inputs(self) -> dict:
        """hadamard / rotate_quantize: dict(x fp32 [rows, n]); int8_linear: dict(x fp32 [M, K],
        w fp32 [N, K], b fp32 [N], qx int8 [M, K], sx fp32 [M] (symmetric per token), qw int8
        [N, K], sw fp32 [N] (symmetric per output channel))."""
        if self._inputs is None:
            g = torch.Generator().manual_seed(self.seed)
            x = torch.randn(self.rows, self.n, generator=g)
            d = {"x": x}
            if self.op == "int8_linear":
                w = torch.randn(self.n_out, self.n, generator=g) / math.sqrt(self.n)
                d["w"] = w
                d["b"] = 0.1 * torch.randn(self.n_out, generator=g)
                d["qx"], d["sx"] = _symmetric_int8_rows(x)
                d["qw"], d["sw"] = _symmetric_int8_rows(w)
            self._inputs = d
        return self._inputs

    def meta(self) -> dict:
        return {
            "op": self.op,
            "name": self.name,
            "rows": self.rows,
            "n": self.n,
            "n_out": self.n_out,
            "bytes": self.bytes,
            "ops": self.ops,
        }


def _symmetric_int8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (the contract's formula: scale = absmax/127, codes = clamp(rint(
    t/scale), ±127), a zero row gets scale 0 and codes 0): the benchmark's own inputs, so the
    int8 GEMM cases do not depend on the quantize op."""
    s = t.abs().amax(dim=1) / 127.0
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(t / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), s.to(torch.float32).contiguous()


def peers_quantized_engines() -> tuple[str, ...]:
    """The quantized engines the torch int8 peer runs on here (``peers.quantized_engines``)."""
    from . import peers as P

    return P.quantized_engines()


def quant_cases(preset: str = "default", ops_: Sequence[str] = QUANT_OPS) -> list[QuantCase]:
    """The kernel cases of a preset (QUANT_PRESETS), in order."""
    if preset not in QUANT_PRESETS:
        raise ValueError(
            f"unknown quant preset {preset!r}; expected one of {sorted(QUANT_PRESETS)}"
        )
    bad = [o for o in ops_ if o not in QUANT_OPS]
    if bad:
        raise ValueError(f"unknown quant ops {bad}; expected some of {QUANT_OPS}")
    p = QUANT_PRESETS[preset]
    out: list[QuantCase] = []
    if "hadamard" in ops_:
        out += [QuantCase.for_bytes("hadamard", n, p["hadamard_bytes"]) for n in p["hadamard_ns"]]
    if "rotate_quantize" in ops_:
        out += [QuantCase.for_bytes("rotate_quantize", n, p["rq_bytes"]) for n in p["rq_ns"]]
        if p.get("rq_dram_bytes"):
            out += [
                QuantCase.for_bytes("rotate_quantize", n, p["rq_dram_bytes"]) for n in p["rq_ns"]
            ]
    if "int8_linear" in ops_:
        m, k, n = p["linear"]
        out.append(QuantCase("int8_linear", m, k, n))
    return out


@dataclass
class QuantCandidate(_Candidate):
    """One timed row: ``prepare(inputs) -> state`` (buffers, packed weights: untimed),
    ``score(state, x) -> result`` (timed; x = ``inputs[input_key]`` or its first rows),
    ``check(state, inputs) -> dict`` (untimed accuracy on the first QUANT_CHECK_ROWS rows;
    raises when wrong). ``backend`` None: the automatic selection; ``sliced``: the first rows
    are probed against the budget."""

    case: str  # QuantCase.name
    op: str
    prepare: Callable[[dict], Any]
    score: Callable[[Any, torch.Tensor], Any]
    check: Callable[[Any, dict], dict] | None = None
    _: KW_ONLY
    input_key: str = "x"
    role: str = "op"  # ours: "op" | "w8a8"; peers: a QUANT_PEERS name
    engine: str | None = None
    fixed_bytes: bool = False  # ignores x: always moves the case's bytes (the copy peers)

    INFO_FIELDS = ("kind", "case", "op", "role", "backend", "peer", "engine", "device")


@contextlib.contextmanager
def record_backends():
    """Within the block, every call that goes through the backend registry appends
    ``(op, backend)`` to the yielded list: which backend really ran (automatic selection
    included), whatever the op's arguments."""
    from . import _backend

    used: list[tuple[str, str]] = []
    saved = []
    for op, impls in _backend._REGISTRY.items():
        for b, impl in list(impls.items()):

            def wrap(*a, _fn=impl.fn, _op=op, _b=b, **k):
                used.append((_op, _b))
                return _fn(*a, **k)

            saved.append((impls, b, impl))
            impls[b] = _backend._Impl(wrap, impl.check)
    try:
        yield used
    finally:
        for impls, b, impl in saved:
            impls[b] = impl


def _used_str(used: list[tuple[str, str]]) -> str | None:
    """'cpu' when every op ran on one backend, else 'rotate_quantize=cpu, int8_linear=torch'."""
    seen: dict[str, str] = {}
    for op, b in used:
        seen.setdefault(op, b)
    if not seen:
        return None
    if len(set(seen.values())) == 1:
        return next(iter(seen.values()))
    return ", ".join(f"{op}={b}" for op, b in seen.items())


def _ops_or_reason() -> tuple[Any, str | None]:
    """(ood_fast.ops, None) when it has the quantization ops of the contract, else (None, why)."""
    try:
        from . import ops
    except Exception as exc:
        return None, f"ood_fast.ops does not import ({type(exc).__name__}: {exc})"
    missing = [
        f
        for f in (
            "hadamard",
            "rotate_quantize",
            "int8_linear",
            "random_hadamard",
            "QuantizedTensor",
        )
        if not hasattr(ops, f)
    ]
    if missing:
        return None, (
            f"ood_fast.ops has no {', '.join(missing)} (the quant-py branch is not merged)"
        )
    return ops, None


def _no_scan(ops) -> dict:
    """``{"check_finite": False}`` where the ops take it (they do since quant-py), else {}."""
    import inspect

    ok = "check_finite" in inspect.signature(ops.rotate_quantize).parameters
    return {"check_finite": False} if ok else {}


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got − ref| / max |ref| (float64)."""
    ref = ref.to(torch.float64)
    den = float(ref.abs().max()) or 1.0
    return float((got.to(torch.float64) - ref).abs().max()) / den


def sqnr_db(got: torch.Tensor, ref: torch.Tensor) -> float:
    """10 log10(Σ ref² / Σ (got − ref)²) in float64 (inf when equal)."""
    ref = ref.to(torch.float64)
    noise = float((got.to(torch.float64) - ref).square().sum())
    sig = float(ref.square().sum())
    return math.inf if noise == 0 else 10.0 * math.log10(sig / noise)


def _hadamard_ref(x: torch.Tensor, signs: torch.Tensor | None = None) -> torch.Tensor:
    """float64 orthonormal Hadamard of the rows of x: ``(x·signs) @ kron(H_K, S_{2^p}) / sqrt(n)``
    evaluated in its factored form (a float64 butterfly along 2^p, then H_K mixing the K
    blocks), so n = 8192 needs no 512 MB dense matrix. H_K from ood_fast.reference.hadamard."""
    from .reference.hadamard import factorize, hadamard_factor

    n = x.shape[-1]
    k, p = factorize(n)
    y = x.to(torch.float64).reshape(-1, n)
    if signs is not None:
        y = y * torch.as_tensor(signs).to(torch.float64)
    r, m, h = y.shape[0], 1 << p, 1
    y = y.reshape(r, k, m)
    while h < m:  # Sylvester order: pairs (i, i + h) within blocks of 2h
        v = y.reshape(r, k, m // (2 * h), 2, h)
        y = torch.stack((v[..., 0, :] + v[..., 1, :], v[..., 0, :] - v[..., 1, :]), dim=-2)
        h *= 2
    y = y.reshape(r, k, m)
    if k > 1:  # y[c] = Σ_a H_K[a, c] · fwht(x[a])
        y = torch.einsum("rab,ac->rcb", y, hadamard_factor(k).to(torch.float64))
    return (y.reshape(r, n) / math.sqrt(n)).reshape(x.shape)


def _quant_peer_candidate(
    case: QuantCase, peer: str, prepare, score, check=None, *, label: str | None = None, **kw
) -> QuantCandidate:
    """The row of peer ``peer`` (a QUANT_PEERS name, also its role: the ratio our rows take
    against it) in ``case``; ``label`` defaults to QUANT_PEER_LABELS[peer]."""
    return QuantCandidate(
        label or QUANT_PEER_LABELS[peer],
        "peer",
        case.name,
        case.op,
        prepare,
        score,
        check,
        role=peer,
        peer=peer,
        **kw,
    )


def _agrees(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> dict:
    """``{"max_rel_diff": _rel(got, ref)}`` for a check; raises naming ``what`` above ``tol``."""
    err = _rel(got, ref)
    if not err < tol:
        raise AssertionError(f"{what}: max rel diff {err:.2e}")
    return {"max_rel_diff": err}


def _sqnr_over_20db(got: torch.Tensor, ref: torch.Tensor, what: str) -> dict:
    """``{"sqnr_db": sqnr_db(got, ref)}`` for the check of an int8 linear with fp32 output;
    raises naming ``what`` at 20 dB or less."""
    s = sqnr_db(got, ref)
    if not s > 20.0:
        raise AssertionError(f"{what} SQNR vs float64 only {s:.1f} dB (want > 20)")
    return {"sqnr_db": s}


def _linear_ref(inp: dict) -> torch.Tensor:
    """float64 ``x Wᵀ + b`` of the case's first QUANT_CHECK_ROWS rows ``[rows, N]``."""
    x = inp["x"][:QUANT_CHECK_ROWS].to(torch.float64)
    return x @ inp["w"].to(torch.float64).T + inp["b"]


def _int_gemm_ref(inp: dict) -> torch.Tensor:
    """int64 ``qx qwᵀ`` of the case's first QUANT_CHECK_ROWS rows ``[rows, N]``: exact."""
    return inp["qx"][:QUANT_CHECK_ROWS].to(torch.int64) @ inp["qw"].to(torch.int64).T


def _int8_rows_buffer(ops, rows: int, n: int):
    """A QuantizedTensor ``out=`` buffer: int8 codes ``[rows, n]``, one fp32 scale per row."""
    return ops.QuantizedTensor(
        codes=torch.empty(rows, n, dtype=torch.int8),
        scale=torch.empty(rows, dtype=torch.float32),
        zero_point=None,
        bits=8,
        symmetric=True,
    )


def _first_rows(q, r: int):
    """The first ``r`` rows of a per-token QuantizedTensor buffer (views: the kernel writes
    into the preallocated buffer when timed on fewer rows)."""
    return q._replace(codes=q.codes[:r], scale=q.scale[:r])


def _copy_candidate(case: QuantCase) -> QuantCandidate:
    """``dst.copy_(src)`` into a preallocated buffer, moving the case's bytes (read + write)."""
    if case.op == "hadamard":

        def prepare(inp):
            return {"dst": torch.empty_like(inp["x"])}

        def score(st, x):
            return st["dst"][: x.shape[0]].copy_(x)

        return _quant_peer_candidate(case, "copy", prepare, score)

    half = max(1, case.bytes // 2 // 4)  # fp32 elements: a copy of B/2 bytes moves B bytes

    def prepare_b(inp):
        return {"src": torch.randn(half), "dst": torch.empty(half)}

    def score_b(st, x):
        return st["dst"].copy_(st["src"])

    return _quant_peer_candidate(
        case,
        "copy",
        prepare_b,
        score_b,
        label=f"copy of the same bytes ({case.bytes / 2 / MB:.0f} MB)",
        fixed_bytes=True,
    )


def _quant_ours(case: QuantCase, backend: str | None, role: str = "op") -> QuantCandidate | str:
    """Our candidate for ``case`` (``role`` "w8a8": the rotated W8A8 linear chained from the
    ops; "quantlinear": an ood_fast.quant QuantLinear forward), or the reason it cannot run."""
    ops, why = _ops_or_reason()
    if why:
        return why
    label = f"ours {backend}" if backend else "ours (auto)"
    n = case.n
    # The kernel rows skip the ops' NaN/Inf scan of the input (``check_finite=False``: one
    # extra read of x, which the bandwidth bars are not about); role "scan" times the default.
    fin = {} if role == "scan" else _no_scan(ops)
    if role == "scan":
        label += " + NaN scan (default)"

    def ours(what: str, prepare, score, check, *, row_role: str = role, **kw) -> QuantCandidate:
        """Our row ``label + what``, on ``backend``, sliceable (timed on its first rows)."""
        return QuantCandidate(
            label + what,
            "ours",
            case.name,
            case.op,
            prepare,
            score,
            check,
            role=row_role,
            backend=backend,
            sliced=True,
            **kw,
        )

    if case.op == "hadamard":

        def prepare(inp):
            return {"out": torch.empty_like(inp["x"])}

        def score(st, x):
            return ops.hadamard(x, out=st["out"][: x.shape[0]], backend=backend, **fin)

        def check(st, inp):
            x = inp["x"][:QUANT_CHECK_ROWS]
            return _agrees(
                score(st, x), _hadamard_ref(x), 1e-4, "hadamard disagrees with float64 x@H"
            )

        return ours("", prepare, score, check)

    if case.op == "rotate_quantize":

        def prepare(inp):
            rot = ops.random_hadamard(n, seed=0)
            return {"rot": rot, "out": _int8_rows_buffer(ops, inp["x"].shape[0], n)}

        def score(st, x):
            buf = _first_rows(st["out"], x.shape[0])
            return ops.rotate_quantize(
                x, st["rot"], granularity="per_token", out=buf, backend=backend, **fin
            )

        def check(st, inp):
            x = inp["x"][:QUANT_CHECK_ROWS]
            q = score(st, x)
            signs = getattr(st["rot"], "signs", None)
            y = _hadamard_ref(x, signs)
            s_ref = y.abs().amax(dim=1) / 127.0
            s_err = _rel(q.scale, s_ref)
            steps = float((q.codes.to(torch.float64) - y / s_ref[:, None]).abs().max())
            if not (s_err < 1e-5 and steps <= 0.5 + 1e-3):
                raise AssertionError(
                    f"rotate_quantize disagrees with float64: scale rel diff {s_err:.2e}, "
                    f"max |code − y/scale| {steps:.3f} (want <= 0.5)"
                )
            return {"scale_rel_diff": s_err, "max_code_err": steps}

        return ours(" random H", prepare, score, check)

    # int8_linear: our rows on fp32 x are judged by their SQNR against the float64 linear
    def fp_check(score):
        return lambda st, inp: _sqnr_over_20db(
            score(st, inp["x"][:QUANT_CHECK_ROWS]), _linear_ref(inp), "W8A8 linear"
        )

    if role == "op":

        def prepare(inp):
            return {"out": torch.empty(case.rows, case.n_out)}

        def score(st, qx):
            inp, r = case.inputs, qx.shape[0]
            return ops.int8_linear(
                qx,
                inp["sx"][:r],
                inp["qw"],
                inp["sw"],
                inp["b"],
                out=st["out"][:r],
                backend=backend,
            )

        def check(st, inp):
            r = QUANT_CHECK_ROWS
            ref = _int_gemm_ref(inp).to(torch.float64) * inp["sx"][:r].to(torch.float64)[:, None]
            ref = ref * inp["sw"].to(torch.float64)[None, :] + inp["b"].to(torch.float64)
            got = score(st, inp["qx"][:r])
            return _agrees(got, ref, 1e-5, "int8_linear disagrees with the int64 GEMM")

        return ours(" int8_linear (int8 in)", prepare, score, check, input_key="qx")

    if role == "w8a8":

        def prepare(inp):
            rot = ops.random_hadamard(n, seed=0)
            w_rot = (inp["w"].to(torch.float64) @ rot.matrix(torch.float64)).to(torch.float32)
            qw, sw = ops.quantize_weight(w_rot)
            return {
                "rot": rot,
                "qw": qw,
                "sw": sw,
                "q": _int8_rows_buffer(ops, case.rows, n),
                "out": torch.empty(case.rows, case.n_out),
            }

        def score(st, x):
            r = x.shape[0]
            q = ops.rotate_quantize(
                x, st["rot"], out=_first_rows(st["q"], r), backend=backend, **fin
            )
            return ops.int8_linear(
                q.codes,
                q.scale,
                st["qw"],
                st["sw"],
                case.inputs["b"],
                out=st["out"][:r],
                backend=backend,
            )

        return ours(
            " W8A8 linear (H + quantize + int8 GEMM, fp32 in/out)", prepare, score, fp_check(score)
        )

    # role == "quantlinear": the model layer, as a user calls it
    try:
        from .quant.linear import quantize_linear
    except Exception as exc:
        return (
            f"ood_fast.quant.linear.quantize_linear is not available ({type(exc).__name__}: {exc})"
        )

    def prepare(inp):
        lin = torch.nn.Linear(n, case.n_out)
        with torch.no_grad():
            lin.weight.copy_(inp["w"])
            lin.bias.copy_(inp["b"])
        return {"layer": quantize_linear(lin, rotation=ops.random_hadamard(n, seed=0))}

    def score(st, x):
        with torch.no_grad():
            if backend is None:
                return st["layer"](x)
            from . import _backend

            with _backend.use_backend(backend):
                return st["layer"](x)

    # its row is a W8A8 linear like the chained ops: the same bars and ratios
    return ours(
        " QuantLinear(rotation=H) forward", prepare, score, fp_check(score), row_role="w8a8"
    )


def _quant_peer(case: QuantCase, name: str, engine: str | None = None) -> QuantCandidate | str:
    """Peer ``name`` of ``case`` (QUANT_PEERS), or the reason it cannot run."""
    from . import peers as P

    if name == "copy":
        return _copy_candidate(case)
    if name == "dense":
        if case.op != "hadamard":
            return "a dense x@H peer only for the hadamard cases"
        if _hadamard_k(case.n) == 0:
            return f"n={case.n} has no Hadamard matrix"

        def prepare(inp):
            return {"H": P.dense_hadamard_matrix(case.n), "out": torch.empty_like(inp["x"])}

        def score(st, x):
            return torch.matmul(x, st["H"], out=st["out"][: x.shape[0]])

        def check(st, inp):
            x = inp["x"][:QUANT_CHECK_ROWS]
            return _agrees(score(st, x), _hadamard_ref(x), 1e-4, "dense x@H disagrees with float64")

        return _quant_peer_candidate(case, name, prepare, score, check, sliced=True)
    if case.op != "int8_linear":
        return f"{QUANT_PEER_LABELS[name]}: only for the int8_linear case"

    if name == "torch_fp32":
        import torch.nn.functional as F

        def score(st, x):
            return F.linear(x, st["w"], st["b"])

        def check(st, inp):
            got = score(st, inp["x"][:QUANT_CHECK_ROWS])
            return _agrees(got, _linear_ref(inp), 1e-4, "F.linear disagrees with float64")

        return _quant_peer_candidate(
            case, name, lambda inp: {"w": inp["w"], "b": inp["b"]}, score, check
        )
    if name == "torch_int8":
        engine = engine or "fbgemm"
        inp0 = case.inputs
        f = P.torch_dynamic_int8_linear(inp0["w"], inp0["b"], engine=engine)
        if isinstance(f, str):
            return f

        def check(st, inp):
            got = st(inp["x"][:QUANT_CHECK_ROWS])
            return _sqnr_over_20db(got, _linear_ref(inp), "torch int8 Linear")

        return _quant_peer_candidate(
            case,
            name,
            lambda inp: f,
            lambda st, x: st(x),
            check,
            label=f"{QUANT_PEER_LABELS[name]} ({engine})",
            engine=engine,
        )
    if name == "int_mm":
        f = P.torch_int_mm_linear(case.inputs["qw"])
        if isinstance(f, str):
            return f

        def check(st, inp):
            got = st(inp["qx"][:QUANT_CHECK_ROWS]).to(torch.int64)
            if not torch.equal(got, _int_gemm_ref(inp)):
                raise AssertionError("torch._int_mm disagrees with the int64 GEMM")
            return {"max_rel_diff": 0.0}

        return _quant_peer_candidate(
            case, name, lambda inp: f, lambda st, x: st(x), check, input_key="qx"
        )
    raise ValueError(f"unknown quant peer {name!r}; expected one of {QUANT_PEERS}")


def quant_candidates(
    case: QuantCase,
    backends: Sequence[str | None] | None = None,
    peers: Sequence[str] = QUANT_PEERS,
    dense_ns: Sequence[int] = (4096,),
    quantlinear: bool = True,
) -> tuple[list[QuantCandidate], list[tuple[str, str]]]:
    """Every candidate of ``case`` and [(name, why it does not run)]. ``backends``: ours on
    each (None in the list, or ``backends=None``: the automatic selection); ``dense_ns``: the
    Hadamard sizes that get the (slow) dense x@H peer; ``quantlinear``: also time a QuantLinear
    forward when ood_fast.quant has one."""
    bad = [p for p in peers if p not in QUANT_PEERS]
    if bad:
        raise ValueError(f"unknown quant peers {bad}; expected some of {QUANT_PEERS}")
    out: list[QuantCandidate] = []
    skipped: list[tuple[str, str]] = []

    def add(c, what):
        if isinstance(c, str):
            skipped.append((f"{case.name}: {what}", c))
        else:
            out.append(c)

    roles = ["op"]
    if case.op == "int8_linear":
        roles += ["w8a8"] + (["quantlinear"] if quantlinear else [])
    else:
        roles.append("scan")
    for b in list(backends) if backends is not None else [None]:
        for role in roles:
            c = _quant_ours(case, b, role)
            if role == "quantlinear" and isinstance(c, str):
                skipped.append((f"{case.name}: QuantLinear forward", c))
                continue
            add(c, f"ours {b or '(auto)'}" + (f" {role}" if role != "op" else ""))
    for p in peers:
        if (p in ("torch_fp32", "torch_int8", "int_mm")) != (case.op == "int8_linear"):
            continue
        if p == "dense" and (case.op != "hadamard" or case.n not in dense_ns):
            continue
        if p == "torch_int8":
            from . import peers as P

            engines = P.quantized_engines()
            if not engines:
                skipped.append((f"{case.name}: torch int8", "no fbgemm/onednn quantized engine"))
            for e in engines:
                add(_quant_peer(case, p, e), f"torch int8 ({e})")
            continue
        add(_quant_peer(case, p), QUANT_PEER_LABELS[p])
    return out, skipped


def quant_rows_for_budget(
    cand: QuantCandidate, state, x: torch.Tensor, budget: float, runs: int
) -> int:
    """Rows of x to time ``cand`` on: all of them, unless ``cand.sliced`` and ``runs`` calls on
    all rows would overrun ``budget`` seconds; then the first rows that fit (the time is scaled
    linearly, like the slow Mahalanobis and KNN peers). Estimated from a call on the first
    rows; when that says one full call would fit the budget, a full call decides (a small
    probe overstates the per-row cost of a fast kernel)."""
    N = x.shape[0]
    if not cand.sliced or cand.fixed_bytes:
        return N
    runs = max(1, runs)
    p = min(N, max(QUANT_CHECK_ROWS, N // 16))
    t0 = time.perf_counter()
    cand.score(state, x[:p])
    per_row = max(time.perf_counter() - t0, 1e-9) / p
    if per_row * N * runs <= budget:
        return N
    if p < N and per_row * N <= budget:
        t0 = time.perf_counter()
        cand.score(state, x)
        per_row = max(time.perf_counter() - t0, 1e-9) / N
    n = int(budget / runs / per_row)
    return N if n >= N else max(min(p, N), n)


def setup_quant_candidate(
    cand: QuantCandidate, case: QuantCase, *, repeats: int = 5, budget: float = 5.0
) -> tuple[dict, Any, torch.Tensor | None]:
    """Prepare and check (untimed) one candidate, and choose the rows to time it on:
    (row, state, x to time on); state None when it failed (the row says why)."""
    row = cand.info()
    try:
        inp = case.inputs
        state = cand.prepare(inp)
        with record_backends() as used:
            if cand.check is not None:
                row.update(cand.check(state, inp))
        row["backend_used"] = _used_str(used)
        x = inp[cand.input_key]
        N = x.shape[0]
        rows = quant_rows_for_budget(cand, state, x, budget, max(1, min(repeats, 3)) + 1)
        row["rows"] = rows
        row["n_total"] = N
        row["scale_to_full"] = 1.0 if cand.fixed_bytes else N / rows
        row["scaled_from_rows"] = rows if rows < N else None
        return row, state, x[:rows]
    except Exception as exc:  # a failing candidate is a row with its error, not a dead run
        row["status"] = "error"
        row["error"] = _error(exc)
        return row, None, None


def _finish_row(row: dict, t: Timing, case: QuantCase) -> None:
    scale = row["scale_to_full"]
    row["time_s"] = t.median * scale
    row["min_s"] = t.min * scale
    row["timing"] = t.as_dict()
    _add_rates(row, case)
    row["status"] = "ok"


def run_quant_candidate(
    cand: QuantCandidate, case: QuantCase, *, repeats: int = 5, budget: float = 5.0
) -> dict:
    """Prepare, check (untimed), time one candidate alone; its row (never raises)."""
    row, state, xt = setup_quant_candidate(cand, case, repeats=repeats, budget=budget)
    if state is None:
        return row
    try:
        t, _ = time_call(lambda: cand.score(state, xt), repeats=repeats, budget=budget)
        _finish_row(row, t, case)
    except Exception as exc:
        row["status"] = "error"
        row["error"] = _error(exc)
    return row


def time_round_robin(
    fns: Sequence[Callable[[], Any]], *, repeats: int = 5, budget: float = 5.0
) -> list[Timing | BaseException]:
    """Time several calls interleaved: a warm-up of each, then rounds of one call of each, until
    every one has ``repeats`` runs or the timed total passes ``budget`` × their number (each
    gets at least one run; one whose warm-up alone passed ``budget`` keeps that as its
    measurement and sits out the rounds). On a machine shared with other jobs the candidates
    of a case then see the same load, so their ratios hold better than with back-to-back
    timing. A call that raises gets its exception in its slot."""
    out: list[Timing | BaseException | None] = [None] * len(fns)
    warm: dict[int, float] = {}
    times: dict[int, list[float]] = {}
    for i, f in enumerate(fns):
        try:
            t0 = time.perf_counter()
            f()
            warm[i] = time.perf_counter() - t0
        except Exception as exc:
            out[i] = exc
            continue
        if warm[i] > budget:
            out[i] = Timing(warm[i], warm[i], 1, warm[i])
        else:
            times[i] = []
    total, limit = 0.0, budget * max(1, len(times))
    while times:
        active = [i for i, ts in times.items() if len(ts) < max(1, repeats)]
        if not active:
            break
        for i in active:
            try:
                t0 = time.perf_counter()
                fns[i]()
                dt = time.perf_counter() - t0
            except Exception as exc:
                out[i] = exc
                times.pop(i)
                continue
            times[i].append(dt)
            total += dt
        if total > limit and all(len(ts) >= 1 for ts in times.values()):
            break
    for i, ts in times.items():
        out[i] = Timing(statistics.median(ts), min(ts), len(ts), warm[i])
    return out  # type: ignore[return-value]


def run_quant_case(
    case: QuantCase,
    cands: Sequence[QuantCandidate],
    *,
    repeats: int = 5,
    budget: float = 5.0,
    progress=None,
) -> list[dict]:
    """Every candidate of one case: set up and checked one by one, then timed round-robin
    (``time_round_robin``); rows in the candidates' order (never raises)."""
    rows, ready = [], []
    for c in cands:
        if progress is not None:
            progress.set_postfix_str(f"{case.name}: {c.name}")
        row, state, xt = setup_quant_candidate(c, case, repeats=repeats, budget=budget)
        rows.append(row)
        if state is not None:
            ready.append((row, lambda c=c, state=state, xt=xt: c.score(state, xt)))
        if progress is not None:
            progress.update()
    if progress is not None:
        progress.set_postfix_str(f"{case.name}: timing")
    timings = time_round_robin([f for _, f in ready], repeats=repeats, budget=budget)
    for (row, _), t in zip(ready, timings, strict=True):
        if isinstance(t, BaseException):
            row["status"] = "error"
            row["error"] = _error(t)
        else:
            _finish_row(row, t, case)
    return rows


def _add_rates(row: dict, case: QuantCase) -> None:
    t = row["time_s"]
    row["bytes"] = case.bytes
    if case.op == "int8_linear":
        row["gops"] = case.ops / t / 1e9
    else:
        row["gbps"] = case.bytes / t / 1e9


def add_quant_speedups(rows: list[dict], cases: Sequence[QuantCase]) -> None:
    """Per case, on our rows: speedup[role] = the fastest peer of that role's time / ours (same
    run; "torch_int8": the faster quantized engine) and bars[role] = {bar, ratio, ok} for the
    issue's performance bars (QUANT_BARS)."""
    by_name = {c.name: c for c in cases}
    for cname in dict.fromkeys(r["case"] for r in rows):
        rs = [r for r in rows if r["case"] == cname and r.get("status") == "ok"]
        best: dict[str, float] = {}
        for r in rs:
            if r["kind"] == "peer":
                best[r["role"]] = min(best.get(r["role"], math.inf), r["time_s"])
        for r in rs:
            if r["kind"] != "ours":
                continue
            r["speedup"] = {p: t / r["time_s"] for p, t in best.items()}
            case = by_name.get(cname)
            if case is not None:
                r["bars"] = {  # the bars whose peer ran in this case (dense: n = 4096 only)
                    p: {"bar": bar, "ratio": r["speedup"][p], "ok": r["speedup"][p] >= bar}
                    for p, bar in case.bars(r["role"]).items()
                    if p in r["speedup"]
                }


# --------------------------------------------------------------------------------- SQNR part


def sqnr_linear(
    x_cal: torch.Tensor,
    x_test: torch.Tensor,
    weight: torch.Tensor,
    *,
    methods: Sequence[str] = QUANT_METHODS,
    granularities: Sequence[str] = QUANT_GRANULARITIES,
    alpha: float = 0.5,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """W8A8 SQNR (dB) of ``y = x Wᵀ`` on ``x_test [T, n]`` for every method × granularity:
    {method: {granularity: dB}}, measured by the one definition,
    ``ood_fast.quant.synthetic.evaluate_linear_w8a8`` (calibrated on ``x_cal``: covariance,
    smoothing scales, the static per-tensor scale; weights int8 per output channel through
    ``ops.quantize_weight``, activations through ``ops.rotate_quantize``, ŷ by
    ``ops.int8_linear``, y in float64). Methods QUANT_METHODS, granularities "per_tensor"
    (static) and "per_token" (dynamic)."""
    from .quant.synthetic import evaluate_linear_w8a8

    bad = [m for m in methods if m not in QUANT_METHODS]
    bad += [g for g in granularities if g not in QUANT_GRANULARITIES]
    if bad:
        raise ValueError(f"unknown methods/granularities {bad}")
    return {
        m: {
            g: evaluate_linear_w8a8(x_cal, x_test, weight, m, g, alpha=alpha, seed=seed)
            for g in granularities
        }
        for m in methods
    }


def quant_sqnr_sources(preset: str = "default") -> tuple[list[dict], list[tuple[str, str]]]:
    """The SQNR data: [dict(name, x_cal, x_test, weight, bias)] and [(source, why missing)]:
    the synthetic outlier layer (ood_fast.quant.synthetic) and the linears of a random Mamba
    block with injected outliers (ood_fast.quant)."""
    p = QUANT_PRESETS[preset]
    sources: list[dict] = []
    skipped: list[tuple[str, str]] = []
    for name, fn, spec in (
        ("synthetic", _synthetic_sources, p["sqnr_synthetic"]),
        ("mamba", _mamba_sources, p["sqnr_mamba"]),
    ):
        try:
            sources += fn(**spec)
        except Exception as exc:
            skipped.append((f"SQNR {name}", _error(exc)))
    return sources, skipped


def _synthetic_sources(dim: int, n_calib: int, n_test: int, seed: int = 0) -> list[dict]:
    """The synthetic outlier layer of ``ood_fast.quant.synthetic.make_synthetic_linear``
    (Student-t ν = 3 tokens, spiked covariance (400, 200, 100, 50) spread over all channels by
    a Haar rotation, 4 weight rows ×20)."""
    from .quant.synthetic import make_synthetic_linear

    p = make_synthetic_linear(dim=dim, n_calib=n_calib, n_test=n_test, seed=seed)
    return [
        {
            "name": f"synthetic outliers (n={dim})",
            "x_cal": p.x_calib,
            "x_test": p.x_test,
            "weight": p.weight,
            "bias": None,
        }
    ]


def _mamba_sources(d_model: int, tokens: int, seed: int = 0) -> list[dict]:
    """The inputs of the linears of the last block of ``ood_fast.quant.mamba.random_mamba`` (2
    layers, its default outliers: 4 channels ×20 in the residual stream and the in_proj x/z
    rows, a spiked heavy-tailed residual covariance), captured with forward hooks on random
    token ids: 4·``tokens`` calibration tokens (the first sequences) and ``tokens`` test tokens
    (later sequences), for in_proj (n = d_model), x_proj and out_proj
    (n = 2·d_model, out_proj's input is the gated SSM output)."""
    from .quant.mamba import MambaConfig, random_mamba

    cfg = MambaConfig(d_model=d_model, n_layer=2, vocab_size=512)
    model = random_mamba(cfg, seed=seed, outlier_channels=4, outlier_scale=20.0).eval()
    mixer = model.backbone.layers[-1].mixer
    seq = 128
    n_test = max(1, tokens // seq)
    batch = 5 * n_test  # calibration 4× the test tokens, as the synthetic layer (ν = 3 tails)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(mixer, name).register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, args[0].detach())
        )
        for name in ("in_proj", "x_proj", "out_proj")
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for name in ("in_proj", "x_proj", "out_proj"):
        x = seen[name].reshape(batch, seq, -1).float()
        half = batch - n_test
        lin = getattr(mixer, name)
        out.append(
            {
                "name": f"mamba block {name} (d_model={d_model})",
                "x_cal": x[:half].reshape(-1, x.shape[-1]),
                "x_test": x[half:].reshape(-1, x.shape[-1]),
                "weight": lin.weight.detach().float(),
                "bias": None if lin.bias is None else lin.bias.detach().float(),
            }
        )
    return out


def run_quant_sqnr(preset: str = "default", progress: bool = True) -> tuple[list[dict], list]:
    """[dict(source, n, tokens, sqnr={method: {granularity: dB}})] and the skipped sources."""
    sources, skipped = quant_sqnr_sources(preset)
    rows = []
    for s in sources:
        try:
            if s.get("bias") is not None:  # the measurement is of x Wᵀ: a bias adds nothing
                raise ValueError("a linear with a bias: not measured")
            t = sqnr_linear(s["x_cal"], s["x_test"], s["weight"])
            rows.append(
                {
                    "source": s["name"],
                    "n": int(s["weight"].shape[1]),
                    "n_out": int(s["weight"].shape[0]),
                    "tokens": int(s["x_test"].shape[0]),
                    "sqnr": t,
                    "status": "ok",
                }
            )
        except Exception as exc:
            rows.append(
                {
                    "source": s["name"],
                    "status": "error",
                    "error": _error(exc),
                }
            )
    return rows, skipped


def run_quant(
    preset: str = "default",
    *,
    backends: Sequence[str | None] | None = None,
    peers: Sequence[str] = QUANT_PEERS,
    ops_: Sequence[str] = QUANT_OPS,
    threads: int | None = None,
    repeats: int = 5,
    budget: float = 5.0,
    sqnr: bool = True,
    progress: bool = True,
) -> dict:
    """The quantization benchmark: dict(meta, rows, sqnr, skipped, table) (see the section
    comment). ``backends``: ours on each (default: the automatic selection only)."""
    import gc

    cases = quant_cases(preset, ops_)
    load_before = _loadavg()
    dense_ns = QUANT_PRESETS[preset]["dense_ns"]
    with pinned_threads(threads):
        plan, skipped = [], []
        for case in cases:
            cs, sk = quant_candidates(case, backends, peers, dense_ns)
            plan.append((case, cs))
            skipped += sk
        bar = _progress_bar(
            sum(len(cs) for _, cs in plan) + (1 if sqnr else 0), "ood-fast bench quant", progress
        )
        rows: list[dict] = []
        for case, cs in plan:
            rows += run_quant_case(case, cs, repeats=repeats, budget=budget, progress=bar)
            case._inputs = None  # 64 MB inputs: one case alive at a time
            gc.collect()
        add_quant_speedups(rows, cases)
        sqnr_rows: list[dict] = []
        if sqnr:
            bar.set_postfix_str("SQNR")
            sqnr_rows, sk = run_quant_sqnr(preset, progress)
            skipped += sk
            bar.update()
        bar.close()
        meta = {
            "workload": {"workload": "quant", "name": preset, "cases": [c.meta() for c in cases]},
            "environment": environment(),
            "repeats": repeats,
            "budget_s": budget,
            "loadavg_before": load_before,
            "bars": QUANT_BARS,
        }
    result = {
        "meta": meta,
        "rows": rows,
        "sqnr": sqnr_rows,
        "skipped": [list(s) for s in skipped],
    }
    result["table"] = render_quant(result)
    return result


_QUANT_VS = (
    ("copy", "vs copy"),
    ("dense", "vs dense"),
    ("torch_fp32", "vs F.linear"),
    ("torch_int8", "vs torch int8"),
    ("int_mm", "vs _int_mm"),
)


def render_quant(result: dict) -> str:
    """The kernel speed table (one per op: ours and the peers per case, GB/s or GOP/s, ratios
    peer time / ours, the bars) and the SQNR tables (one per granularity)."""
    rows, meta = result["rows"], result["meta"]
    env = meta["environment"]
    out = [
        f"ood-fast bench — quant ({meta['workload']['name']}): rotation-quantization kernels "
        "and W8A8 SQNR",
        f"{env['cpu_model']}, {env['threads']} threads, torch {env['torch']}"
        + (f", {env['gpu']}" if env.get("gpu") else ""),
    ]
    notes: list[str] = []
    titles = {
        "hadamard": "hadamard (fp32, out= buffer): GB/s = bytes read + written / time",
        "rotate_quantize": "rotate_quantize (random Hadamard, per token, fp32 -> int8 + fp32 "
        "scales, out= buffers): GB/s = bytes read + written / time",
        "int8_linear": "int8_linear: GOP/s = 2·M·N·K / time (ours on int8 inputs; W8A8 and the "
        "torch peers: fp32 in, fp32 out)",
    }
    bar_lines: list[str] = []
    for op in QUANT_OPS:
        rs = [r for r in rows if r["op"] == op]
        if not rs:
            continue
        unit = "GOP/s" if op == "int8_linear" else "GB/s"
        vs = [(k, h) for k, h in _QUANT_VS if any(r.get("role") == k for r in rs)]
        headers = ["case", "candidate", "backend", "ms", unit, *[h for _, h in vs], "check"]
        body = []
        for r in rs:
            case = r["case"].split(" fp32")[0].split(" H per")[0]
            name = r["candidate"]
            if r.get("status") != "ok":
                notes.append(f"{r['case']}: {name}: failed: {r.get('error')}")
                body.append([case, name, "-", "failed", *["-"] * (len(headers) - 4)])
                continue
            ms = f"{r['time_s'] * 1e3:.3g}"
            if r.get("scaled_from_rows"):
                mark = "*" * (1 + sum(1 for x in notes if x.startswith("*")))
                ms += mark
                notes.append(
                    f"{mark} {name} ({r['case']}): timed on {r['rows']:,} of {r['n_total']:,} "
                    "rows, scaled linearly"
                )
            rate = r.get("gops") if op == "int8_linear" else r.get("gbps")
            sp = r.get("speedup", {})
            check = (
                f"SQNR {r['sqnr_db']:.1f} dB"
                if "sqnr_db" in r
                else _fmt_e(r.get("max_rel_diff", r.get("scale_rel_diff")))
            )
            body.append(
                [
                    case,
                    name,
                    r.get("backend_used") or r.get("engine") or "-",
                    ms,
                    f"{rate:.3g}" if rate is not None else "-",
                    *[_fmt_x(sp.get(k)) if r["kind"] == "ours" else "" for k, _ in vs],
                    check,
                ]
            )
            for p, b in (r.get("bars") or {}).items():
                if b["ratio"] is None:
                    continue
                label = dict(_QUANT_VS)[p].removeprefix("vs ")
                bar_lines.append(
                    f"  {'ok  ' if b['ok'] else 'MISS'} {r['case']}: {name} "
                    f"{_fmt_x(b['ratio'])} {label} (bar >= {b['bar']:g}×)"
                )
        out += ["", titles[op], table(headers, body, right=set(range(3, len(headers) - 1)))]
    if bar_lines:
        out += ["", "performance bars (peer time / ours, same run):", *bar_lines]
    sq = result.get("sqnr") or []
    if sq:
        for g, title in (
            ("per_tensor", "static per-tensor activations (scale calibrated)"),
            ("per_token", "dynamic per-token activations"),
        ):
            headers = ["layer", "n", *QUANT_METHODS]
            body = []
            for s in sq:
                if s.get("status") != "ok":
                    continue
                body.append(
                    [
                        s["source"],
                        str(s["n"]),
                        *[_fmt_f(s["sqnr"].get(m, {}).get(g), 1) for m in QUANT_METHODS],
                    ]
                )
            out += ["", f"SQNR dB, W8A8 (weights int8 per channel), {title}", table(headers, body)]
        notes += [
            f"SQNR {s['source']}: failed: {s['error']}" for s in sq if s.get("status") != "ok"
        ]
    out += [
        "",
        "ms: median time (a warm-up, then rounds of one call of each candidate of the case, up "
        "to the repeats within the budget); vs <peer>: that "
        "peer's time / ours (same run; torch int8: its faster quantized engine); backend: the "
        "one that ran, per op; check: max rel diff vs float64 (int GEMMs: vs an int64 GEMM) or "
        "SQNR vs float64, on the first rows.",
        *notes,
    ]
    out += _footer(result)
    return "\n".join(out)
