"""The Mahalanobis family: class-conditional Gaussian scores with streaming float64 statistics.

Estimators (sklearn-like; ``score`` higher = more in-distribution):

* ``Mahalanobis``          score = −min_c d²_c                      (Lee et al. 2018)
* ``RelativeMahalanobis``  score = −(min_c d²_c − d²_0), background Gaussian 0 (Ren et al. 2021)
* ``GaussianLikelihood``   score = log Σ_c π_c N(x; μ_c, Σ_c)        (GDA / GMM score)
* ``MultiLayerMahalanobis`` score = Σ_l w_l score_l                  (Lee et al.'s feature ensemble)

Statistics (``GaussianStats``) are float64 per-class counts, sums and scatter, about a fixed
reference point; they stream (``partial_fit``) and merge across workers (``merge``), so the
training bank never has to sit in memory. Scoring goes through ``ood_fast.ops.mahalanobis``.
"""

from __future__ import annotations

import math
import warnings

import torch

from .. import _io
from .._validate import as_tensor, check_features
from ..ops.mahalanobis import PRECISIONS, MahalanobisPlan, mahalanobis, mahalanobis_plan

__all__ = [
    "GaussianLikelihood",
    "GaussianStats",
    "Mahalanobis",
    "MultiLayerMahalanobis",
    "NotFittedError",
    "RelativeMahalanobis",
    "SingularCovarianceWarning",
]

COVARIANCES = ("tied", "per_class", "diagonal")
SHRINKAGES = ("ledoit_wolf", "oas")
EIG_EPS = 1e-10  # eigenvalues (or variances) below EIG_EPS · max are clipped up to it
F64 = torch.float64


class NotFittedError(RuntimeError, AttributeError):
    """Raised when an estimator is used before ``fit``."""


class SingularCovarianceWarning(UserWarning):
    """A covariance was singular: eigenvalues were clipped (use shrinkage= to regularize)."""


def _check_labels(y, n: int) -> torch.Tensor:
    """Integer labels of any value (negative too): ``[n]`` int64 on CPU."""
    y = as_tensor(y, "y")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dtype.is_complex:
        raise TypeError(
            f"y: class labels must be integers, got {y.dtype} (convert with y.long() / "
            "y.astype(int) if they are whole numbers)"
        )
    if y.dim() == 2 and 1 in y.shape:
        y = y.reshape(-1)
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"y: expected {n} labels of shape [{n}], got shape {tuple(y.shape)}")
    return y.to(device="cpu", dtype=torch.int64)


def _sym(m: torch.Tensor) -> torch.Tensor:
    """Full symmetric matrix (batched) from the upper triangle of ``m``."""
    up = torch.triu(m)
    return up + torch.triu(m, diagonal=1).mT


def _gram_upper(z: torch.Tensor) -> torch.Tensor:
    """zᵀz in z's dtype; only the upper triangle is guaranteed.

    Measured here (8192 rows): at D=512 torch's GEMM is ~4.5x faster than scipy's BLAS syrk; at
    D=2048 syrk's halved flops win (~1.2x) over blocked upper-triangle GEMMs.
    """
    D = z.shape[1]
    if D < 1024:
        return z.T @ z
    if z.device.type == "cpu" and z.dtype == torch.float32:
        try:
            from scipy.linalg import blas  # optional (a test extra): syrk does half the flops
        except ImportError:  # pragma: no cover
            blas = None
        if blas is not None:
            return torch.from_numpy(blas.ssyrk(1.0, z.numpy().T, trans=0, lower=0))
    out = torch.zeros(D, D, dtype=z.dtype, device=z.device)
    block = 512
    for i in range(0, D, block):
        out[i : i + block, i:] = z[:, i : i + block].T @ z[:, i:]
    return out


def _shift_fourth(F, T, A, s, n, mz_delta, dmd, delta):
    """Fourth-moment sums of z + δ from those of z (batched over a leading class axis).

    F = Σ‖z‖⁴, T = Σ‖z‖² z, A = Σ‖z‖², s = Σ z, n = count; mz_delta = (Σ z zᵀ) δ and
    dmd = δᵀ (Σ z zᵀ) δ. Returns (F', T', A').
    """
    c = (delta * delta).sum(-1)
    ds = (delta * s).sum(-1)
    F2 = F + 4 * dmd + n * c * c + 4 * (delta * T).sum(-1) + 2 * c * A + 4 * c * ds
    T2 = (
        T
        + 2 * mz_delta
        + c[..., None] * s
        + delta * A[..., None]
        + 2 * delta * ds[..., None]
        + (n * c)[..., None] * delta
    )
    A2 = A + 2 * ds + n * c
    return F2, T2, A2


def ledoit_wolf_shrinkage(emp: torch.Tensor, n, fourth) -> torch.Tensor:
    """sklearn's ``ledoit_wolf_shrinkage`` from sufficient statistics (batched).

    emp: ``[..., D, D]`` ML covariance of centred data; n: sample counts; fourth: Σ_i ‖x̃_i‖⁴.
    """
    p = emp.shape[-1]
    n = torch.as_tensor(n, dtype=F64, device=emp.device)
    fourth = torch.as_tensor(fourth, dtype=F64, device=emp.device)
    if p == 1:
        return torch.zeros_like(fourth)
    tr = torch.diagonal(emp, dim1=-2, dim2=-1).sum(-1)
    mu = tr / p
    fro2 = emp.square().sum((-2, -1))
    beta = (fourth / n - fro2) / (p * n)
    delta = (fro2 - 2 * mu * tr + p * mu * mu) / p
    beta = torch.minimum(beta, delta)
    return torch.where(beta == 0, torch.zeros_like(beta), beta / delta)


def oas_shrinkage(emp: torch.Tensor, n) -> torch.Tensor:
    """sklearn's OAS shrinkage from the ML covariance and the sample count (batched)."""
    p = emp.shape[-1]
    n = torch.as_tensor(n, dtype=F64, device=emp.device)
    if p == 1:
        return torch.zeros(emp.shape[:-2], dtype=F64, device=emp.device)
    alpha = emp.square().mean((-2, -1))
    mu = torch.diagonal(emp, dim1=-2, dim2=-1).sum(-1) / p
    num = alpha + mu * mu
    den = (n + 1) * (alpha - mu * mu / p)
    return torch.where(den == 0, torch.ones_like(num), torch.clamp(num / den, max=1.0))


# ---------------------------------------------------------------------------------------------
# Streaming statistics
# ---------------------------------------------------------------------------------------------


class GaussianStats:
    """Mergeable float64 sufficient statistics of labelled features.

    Each class c keeps its own fixed reference point ``crefs[c]`` (the float32 mean of its
    rows in the first chunk it appears in) and, about it, float64 counts, sums Σ(x − ref_c)
    and scatter Σ(x − ref_c)(x − ref_c)ᵀ: ONE pooled ``[D, D]`` for ``tied``, ``[C, D, D]`` for
    ``per_class``, per-class sums of squares ``[C, D]`` for ``diagonal``. Shifting each row by
    a point near its class mean removes both the global offset and the between-class spread
    from the heavy product, which therefore runs as float32 GEMMs (BLAS syrk, upper triangle)
    on row chunks of ``chunk`` rows, each accumulated into float64, and still reaches ~1e-7
    relative accuracy (float64 features use float64 products). The global (background)
    covariance is exact from these: pooled within-class scatter + between-class scatter of
    the float64 means.

    ``fourth=True`` also tracks what Ledoit–Wolf needs: per class Σ‖z‖⁴, Σ‖z‖² z, Σ‖z‖² about
    the class references, and the same about one global reference ``ref`` for all data.

    Labels are any integers: ``labels`` (sorted) grows as new ones appear; with
    ``num_classes=K`` the classes are fixed to 0..K−1.
    """

    def __init__(
        self,
        mode: str = "tied",
        *,
        num_classes: int | None = None,
        fourth: bool = False,
        chunk: int = 8192,
        gemm_dtype: torch.dtype = torch.float32,
    ):
        if mode not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, got {mode!r}")
        if num_classes is not None and (int(num_classes) != num_classes or num_classes < 1):
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.mode = mode
        self.num_classes = None if num_classes is None else int(num_classes)
        self.fourth = bool(fourth)
        self.chunk = int(chunk)
        self.gemm_dtype = gemm_dtype
        self.reset()

    _TENSORS = (
        "labels",
        "counts",
        "crefs",
        "sums",
        "scatter",
        "ref",
        "c_f",
        "c_t",
        "c_a",
        "g_f",
        "g_t",
        "g_a",
    )

    def reset(self) -> GaussianStats:
        for name in self._TENSORS:
            setattr(self, name, None)
        self.dim = None
        return self

    # -- shape bookkeeping ---------------------------------------------------------------------

    @property
    def empty(self) -> bool:
        return self.counts is None or int(self.counts.sum()) == 0

    @property
    def device(self) -> torch.device:
        return self.crefs.device if self.crefs is not None else torch.device("cpu")

    @property
    def n_total(self) -> int:
        return 0 if self.counts is None else int(self.counts.sum())

    def _alloc(self, D: int, device) -> None:
        self.dim = D
        C = 0 if self.num_classes is None else self.num_classes
        z = dict(dtype=F64, device=device)
        self.labels = torch.arange(C, dtype=torch.int64)
        self.counts = torch.zeros(C, dtype=torch.int64, device=device)
        self.crefs = torch.zeros(C, D, **z)
        self.sums = torch.zeros(C, D, **z)
        self.scatter = {
            "tied": lambda: torch.zeros(D, D, **z),
            "per_class": lambda: torch.zeros(C, D, D, **z),
            "diagonal": lambda: torch.zeros(C, D, **z),
        }[self.mode]()
        if self.fourth:
            self.c_f, self.c_a = torch.zeros(C, **z), torch.zeros(C, **z)
            self.c_t = torch.zeros(C, D, **z)
            self.g_f, self.g_a = torch.zeros((), **z), torch.zeros((), **z)
            self.g_t = torch.zeros(D, **z)

    def _class_tensors(self):
        names = ["counts", "crefs", "sums"] + (["scatter"] if self.mode != "tied" else [])
        return names + (["c_f", "c_t", "c_a"] if self.fourth else [])

    def _grow(self, new_labels: torch.Tensor) -> None:
        """Add classes (sorted merge); existing statistics move to their new rows."""
        labels = torch.cat([self.labels, new_labels]).unique(sorted=True)
        pos = torch.searchsorted(labels, self.labels).to(self.device)
        C = labels.shape[0]
        for name in self._class_tensors():
            old = getattr(self, name)
            new = torch.zeros((C, *old.shape[1:]), dtype=old.dtype, device=old.device)
            new[pos] = old
            setattr(self, name, new)
        self.labels = labels

    def _index(self, y: torch.Tensor) -> torch.Tensor:
        """Row of each label in the statistics (adds unseen labels unless num_classes is fixed)."""
        if self.num_classes is not None:
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
                raise ValueError(
                    f"y: label {bad} out of range for num_classes={self.num_classes} "
                    f"[0, {self.num_classes})"
                )
            return y
        uniq = y.unique()
        new = uniq[~torch.isin(uniq, self.labels)]
        if new.numel():
            self._grow(new)
        return torch.searchsorted(self.labels, y)

    # -- accumulation --------------------------------------------------------------------------

    def update(self, X, y) -> GaussianStats:
        """Add a batch: X ``[N, D]`` features (any float dtype, any device), y ``[N]`` integers."""
        X = check_features(X, "X", dim=self.dim, finite=False)
        y = _check_labels(y, X.shape[0])
        if X.shape[0] == 0:
            return self
        X = X.detach()
        # one cheap pass: a float64 sum of float32/16 values is finite iff every value is
        # (it cannot overflow); only then pay for the full check that counts and locates them
        if not bool(torch.isfinite(X.sum(dtype=F64))):
            check_features(X, "X")
        if self.crefs is None:
            if self.num_classes is not None:
                self._index(y)  # range check before allocating anything
            self._alloc(X.shape[1], X.device)
            # global reference (fourth moments only): mean of the first rows, float32-rounded
            head = X[: self.chunk]
            self.ref = (head.sum(0, dtype=F64) / head.shape[0]).to(self.gemm_dtype).to(F64)
        X = X.to(self.device)
        idx = self._index(y).to(self.device)
        C = self.labels.shape[0]
        # float64 features keep float64 products; others run fp32 GEMMs accumulated in float64
        gd = F64 if X.dtype == F64 else self.gemm_dtype
        has_ref = torch.zeros(C, dtype=torch.bool, device=X.device)
        if self.fourth:
            # Ledoit-Wolf's fourth moments are exact when a class's reference is its mean over
            # the whole batch (one extra pass, paid only with shrinkage="ledoit_wolf")
            fresh = (self.counts == 0) & (torch.bincount(idx, minlength=C) > 0)
            if bool(fresh.any()):
                tot = torch.zeros(C, X.shape[1], dtype=F64, device=X.device)
                for s in range(0, X.shape[0], self.chunk):
                    tot.index_add_(0, idx[s : s + self.chunk], X[s : s + self.chunk].to(F64))
                cnt = torch.bincount(idx, minlength=C).clamp(min=1).to(F64)
                m = (tot / cnt[:, None]).to(self.gemm_dtype).to(F64)
                self.crefs[fresh] = m[fresh]
                has_ref = fresh
        crefs = self.crefs.to(gd)
        for s in range(0, X.shape[0], self.chunk):
            xi, yi = X[s : s + self.chunk].to(gd), idx[s : s + self.chunk]
            cnt = torch.bincount(yi, minlength=C)
            fresh = (cnt > 0) & (self.counts == 0)
            if self.fourth:
                fresh &= ~has_ref
            if bool(fresh.any()):  # new classes: reference = their mean in this chunk
                m = torch.zeros(C, xi.shape[1], dtype=gd, device=xi.device).index_add_(0, yi, xi)
                m = (m / cnt.clamp(min=1)[:, None].to(gd)).to(self.gemm_dtype).to(F64)
                self.crefs[fresh] = m[fresh]
                crefs = self.crefs.to(gd)
            self.counts += cnt
            z = xi - crefs[yi]  # [K, D] about each row's class reference
            part = torch.zeros(C, z.shape[1], dtype=gd, device=z.device).index_add_(0, yi, z)
            self.sums += part.to(F64)
            if self.mode == "tied":
                self.scatter += _gram_upper(z).to(F64)
            elif self.mode == "diagonal":
                sq = torch.zeros(C, z.shape[1], dtype=gd, device=z.device)
                self.scatter += sq.index_add_(0, yi, z * z).to(F64)
            else:
                order = torch.argsort(yi, stable=True)
                ys, zs = yi[order], z[order]
                cls, num = torch.unique_consecutive(ys, return_counts=True)
                start = 0
                for c, k in zip(cls.tolist(), num.tolist(), strict=False):
                    zc = zs[start : start + k]
                    self.scatter[c] += (zc.T @ zc).to(F64)
                    start += k
            if self.fourth:
                z64 = z.to(F64)
                a = z64.square().sum(1)
                self.c_f.index_add_(0, yi, a.square())
                self.c_a.index_add_(0, yi, a)
                self.c_t.index_add_(0, yi, a[:, None] * z64)
                zg = (xi - self.ref.to(gd)).to(F64)
                a = zg.square().sum(1)
                self.g_f += a.square().sum()
                self.g_a += a.sum()
                self.g_t += (a[:, None] * zg).sum(0)
        return self

    # -- derived quantities --------------------------------------------------------------------

    def _d(self) -> torch.Tensor:
        """Class means minus class references, ``[C, D]`` (classes without samples: 0)."""
        n = self.counts.clamp(min=1).to(F64)
        return self.sums / n[:, None]

    def class_means(self) -> torch.Tensor:
        return self.crefs + self._d()

    def global_mean(self) -> torch.Tensor:
        n = self.counts.to(F64)
        return (n[:, None] * self.class_means()).sum(0) / n.sum()

    def _within_scatter(self) -> torch.Tensor:
        """Σ_c Σ_{i∈c} (x_i − μ_c)(x_i − μ_c)ᵀ, ``[D, D]`` (tied and per_class)."""
        n = self.counts.to(F64)
        d = self._d()
        if self.mode == "diagonal":
            raise ValueError("a dense covariance needs tied or per_class statistics")
        M = self.scatter if self.mode == "tied" else self.scatter.sum(0)
        # Σ_c n_c d_c d_cᵀ is a small correction (d_c = mean − reference ~ σ/√n_c): float32
        # products suffice for it when large (≤ 1e-7 · C/N relative), float64 otherwise
        dn = d * n[:, None]
        if d.shape[0] * d.shape[1] ** 2 > 1e8:
            corr = (d.T.float() @ dn.float()).to(F64)
        else:
            corr = d.T @ dn
        return _sym(M - corr)

    def _between_scatter(self) -> torch.Tensor:
        n = self.counts.to(F64)
        b = self.class_means() - self.global_mean()
        return b.T @ (b * n[:, None])

    def covariance(self, mode: str | None = None) -> torch.Tensor:
        """Maximum-likelihood covariance (divides by N), float64, before any shrinkage.

        mode: ``"tied"`` → pooled within-class ``[D, D]`` (÷ total count); ``"per_class"`` →
        ``[C, D, D]`` (÷ n_c); ``"diagonal"`` → per-class variances ``[C, D]``; ``"global"`` →
        covariance of all data about the global mean, ``[D, D]`` (``[D]`` in diagonal mode).
        Classes with no samples get zeros.
        """
        mode = mode or self.mode
        if self.empty:
            raise ValueError("no statistics yet: update() with at least one sample first")
        n = self.counts.to(F64)
        N = n.sum()
        d = self._d()
        if mode == "global":
            if self.mode == "diagonal":
                b = self.class_means() - self.global_mean()
                within = (self.scatter - n[:, None] * d * d).sum(0)
                return ((within + (n[:, None] * b * b).sum(0)) / N).clamp(min=0)
            return _sym(self._within_scatter() + self._between_scatter()) / N
        if mode == "tied":
            return self._within_scatter() / N
        nc = n.clamp(min=1)
        if mode == "per_class" and self.mode == "per_class":
            W = _sym(self.scatter) - n[:, None, None] * (d[:, :, None] * d[:, None, :])
            return W / nc[:, None, None]
        if mode == "diagonal" and self.mode != "tied":
            M = self.scatter if self.mode == "diagonal" else torch.diagonal(self.scatter, 0, -2, -1)
            return (M / nc[:, None] - d * d).clamp(min=0)
        raise ValueError(f"covariance {mode!r} is not available from {self.mode!r} statistics")

    def _class_scatter_apply(self, delta, pooled_cov=None):
        """(M_c δ_c, δ_cᵀ M_c δ_c) for M_c = Σ_{i∈c} z zᵀ, z about the class reference.

        Exact for per_class statistics; for tied, M_c is approximated by
        n_c (Σ_pooled + d_c d_cᵀ) (d_c = mean − reference): only per-class scatters could
        make it exact, and tied mode deliberately never stores them.
        """
        if self.mode == "per_class":
            Md = torch.einsum("cij,cj->ci", _sym(self.scatter), delta)
        else:
            n = self.counts.to(F64)
            d = self._d()
            cov = self.covariance("tied") if pooled_cov is None else pooled_cov
            Md = n[:, None] * (delta @ cov + d * (d * delta).sum(1)[:, None])
        return Md, (Md * delta).sum(1)

    def _global_about_ref_apply(self, delta):
        """(M_g δ, δᵀ M_g δ) for M_g = Σ_i (x_i − ref)(x_i − ref)ᵀ over all data (exact)."""
        N = float(self.n_total)
        e = self.global_mean() - self.ref
        Wt = self._within_scatter() + self._between_scatter()
        Md = Wt @ delta + N * e * (e @ delta)
        return Md, (Md * delta).sum()

    def fourth_central(self, pooled_cov=None):
        """(Σ_{i∈c} ‖x_i − μ_c‖⁴ per class ``[C]``, Σ_i ‖x_i − μ‖⁴ over all data about the
        global mean) for Ledoit–Wolf; needs ``fourth=True`` and dense statistics."""
        if not self.fourth:
            raise ValueError("fourth moments were not tracked: GaussianStats(fourth=True)")
        if self.mode == "diagonal":
            raise ValueError("Ledoit-Wolf needs a dense covariance (tied or per_class)")
        n = self.counts.to(F64)
        d = self._d()
        Md, dMd = self._class_scatter_apply(-d, pooled_cov)
        fc, _, _ = _shift_fourth(self.c_f, self.c_t, self.c_a, self.sums, n, Md, dMd, -d)
        N = n.sum()
        e = self.global_mean() - self.ref
        Mg, dMg = self._global_about_ref_apply(-e)
        fg, _, _ = _shift_fourth(self.g_f, self.g_t, self.g_a, N * e, N, Mg, dMg, -e)
        return fc, fg

    # -- merging -------------------------------------------------------------------------------

    def merge(self, other: GaussianStats) -> GaussianStats:
        """Add ``other``'s statistics (from another worker or chunk) into these."""
        if not isinstance(other, GaussianStats):
            raise TypeError(f"merge: expected GaussianStats, got {type(other).__name__}")
        if (other.mode, other.fourth) != (self.mode, self.fourth):
            raise ValueError(
                f"merge: statistics differ (covariance {self.mode!r} vs {other.mode!r}, "
                f"fourth moments {self.fourth} vs {other.fourth})"
            )
        if self.num_classes != other.num_classes:
            raise ValueError(
                f"merge: num_classes differ ({self.num_classes} vs {other.num_classes})"
            )
        if other.empty:
            return self
        if self.dim is not None and other.dim != self.dim:
            raise ValueError(
                f"merge: feature dimension mismatch: expected D={self.dim}, got D={other.dim}"
            )
        if self.crefs is None:
            self._alloc(other.dim, other.device)
            self.ref = other.ref.clone()
        dev = self.device
        idx = self._index(other.labels).to(dev)

        def g(t):
            return t.to(dev)

        n_o, s_o = g(other.counts).to(F64), g(other.sums)
        had = (self.counts > 0)[idx]
        crefs_o = g(other.crefs)
        target = torch.where((had | (n_o == 0))[:, None], self.crefs[idx], crefs_o)
        delta = crefs_o - target  # other's z + δ = z about our class references
        delta = torch.where((n_o > 0)[:, None], delta, torch.zeros_like(delta))
        if self.fourth:
            Md, dMd = other._class_scatter_apply(delta.to(other.device))
            cf, ct, ca = _shift_fourth(
                g(other.c_f), g(other.c_t), g(other.c_a), s_o, n_o, g(Md), g(dMd), delta
            )
            dg = other.ref.to(dev) - self.ref
            Mg, dMg = other._global_about_ref_apply(dg.to(other.device))
            N_o = n_o.sum()
            sg = N_o * (other.global_mean().to(dev) - other.ref.to(dev))
            gf, gt, ga = _shift_fourth(
                g(other.g_f), g(other.g_t), g(other.g_a), sg, N_o, g(Mg), g(dMg), dg
            )
            self.g_f, self.g_t, self.g_a = self.g_f + gf, self.g_t + gt, self.g_a + ga
            self.c_f.index_add_(0, idx, cf)
            self.c_t.index_add_(0, idx, ct)
            self.c_a.index_add_(0, idx, ca)
        if self.mode == "tied":
            cross = delta.T @ s_o
            self.scatter += g(other.scatter) + cross + cross.T + delta.T @ (delta * n_o[:, None])
        elif self.mode == "per_class":
            add = (
                g(other.scatter)
                + delta[:, :, None] * s_o[:, None, :]
                + s_o[:, :, None] * delta[:, None, :]
                + n_o[:, None, None] * delta[:, :, None] * delta[:, None, :]
            )
            self.scatter.index_add_(0, idx, add)
        else:
            add = g(other.scatter) + 2 * delta * s_o + n_o[:, None] * delta * delta
            self.scatter.index_add_(0, idx, add)
        self.crefs[idx] = target
        self.counts.index_add_(0, idx, g(other.counts))
        self.sums.index_add_(0, idx, s_o + n_o[:, None] * delta)
        return self

    # -- persistence ---------------------------------------------------------------------------

    def settings(self) -> dict:
        return {
            "mode": self.mode,
            "num_classes": self.num_classes,
            "fourth": self.fourth,
            "chunk": self.chunk,
            "gemm_dtype": str(self.gemm_dtype).replace("torch.", ""),
        }

    def tensors(self, prefix: str = "stats.") -> dict[str, torch.Tensor]:
        if self.crefs is None:
            return {}
        return {prefix + k: getattr(self, k) for k in self._TENSORS if getattr(self, k) is not None}

    @classmethod
    def from_state(cls, settings: dict, tensors: dict, prefix: str = "stats.", device=None):
        dt = {"float32": torch.float32, "float64": F64}.get(
            settings.get("gemm_dtype"), torch.float32
        )
        st = cls(
            settings["mode"],
            num_classes=settings.get("num_classes"),
            fourth=settings.get("fourth", False),
            chunk=settings.get("chunk", 8192),
            gemm_dtype=dt,
        )
        if prefix + "crefs" in tensors:
            for k in cls._TENSORS:
                if prefix + k in tensors:
                    t = tensors[prefix + k]
                    setattr(st, k, t if k == "labels" else t.to(device or "cpu"))
            st.dim = st.crefs.shape[1]
        return st


# ---------------------------------------------------------------------------------------------
# Covariance → factor
# ---------------------------------------------------------------------------------------------


def _shrink_dense(cov: torch.Tensor, alpha) -> torch.Tensor:
    """(1 − α) Σ + α (tr Σ / D) I, batched; α a float or ``[C]``."""
    alpha = torch.as_tensor(alpha, dtype=F64, device=cov.device)
    mu = torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1)
    out = (1 - alpha)[..., None, None] * cov
    eye = torch.eye(cov.shape[-1], dtype=F64, device=cov.device)
    return out + (alpha * mu)[..., None, None] * eye


def _factor(cov: torch.Tensor, what: list[str], shrink_hint: str):
    """Whitening factors W (P = W Wᵀ) and log-determinants of ``[G, D, D]`` covariances.

    Cholesky (W = L⁻ᵀ, upper triangular); a covariance that is not numerically positive
    definite (Cholesky fails, or a pivot below EIG_EPS · the largest) falls back to an
    eigendecomposition with eigenvalues clipped at EIG_EPS · max λ, with a warning.
    """
    G, D, _ = cov.shape
    L, info = torch.linalg.cholesky_ex(cov)
    piv = torch.diagonal(L, dim1=-2, dim2=-1).square()
    bad = (info != 0) | ~(piv.min(-1).values > EIG_EPS * piv.max(-1).values)
    eye = torch.eye(D, dtype=F64, device=cov.device).expand(G, D, D)
    W = torch.linalg.solve_triangular(L, eye, upper=False).mT.contiguous()
    logdet = torch.log(piv.clamp(min=1e-300)).sum(-1)
    chol = L
    bad_idx = bad.nonzero().flatten().tolist()
    for g in bad_idx:
        lam, V = torch.linalg.eigh(cov[g])
        top = float(lam.max())
        if not top > 0:
            raise ValueError(
                f"{what[g]}: the covariance is zero (every feature constant within classes): "
                "nothing to whiten; check the features"
            )
        floor = EIG_EPS * top
        n_clip = int((lam < floor).sum())
        lam = lam.clamp(min=floor)
        W[g] = V * lam.rsqrt()
        logdet[g] = torch.log(lam).sum()
        warnings.warn(
            f"{what[g]}: covariance is singular or ill-conditioned ({n_clip} of {D} eigenvalues "
            f"below {EIG_EPS:g}·max clipped up to it); regularize with shrinkage={shrink_hint}",
            SingularCovarianceWarning,
            stacklevel=4,
        )
    return W, logdet, (chol if not bad_idx else None)


_PLAN_FIELDS = ("means", "factors", "inv_var", "group", "shift", "center", "proj", "const")


def _plan_tensors(plan: MahalanobisPlan, prefix: str) -> dict:
    return {prefix + k: getattr(plan, k) for k in _PLAN_FIELDS if getattr(plan, k) is not None}


def _plan_from(tensors: dict, prefix: str, triangular: bool) -> MahalanobisPlan:
    return MahalanobisPlan(
        **{k: tensors.get(prefix + k) for k in _PLAN_FIELDS}, triangular=triangular
    )


# ---------------------------------------------------------------------------------------------
# Estimators
# ---------------------------------------------------------------------------------------------

_FITTED = frozenset(
    {
        "means_",
        "covariance_",
        "plan_",
        "classes_",
        "num_classes_",
        "counts_",
        "n_features_in_",
        "shrinkage_",
        "logdet_",
        "bias_",
        "background_mean_",
        "background_covariance_",
        "background_plan_",
        "background_shrinkage_",
        "priors_",
    }
)


@_io.register("mahalanobis")
class Mahalanobis:
    """Class-conditional Gaussians with a shared (or per-class, or diagonal) covariance.

    ``score(X) = −min_c d²_c(X)`` (higher = more in-distribution), d²_c the squared Mahalanobis
    distance to class c.

    Args:
        covariance: ``"tied"`` (one pooled within-class covariance ``[D, D]``, Lee et al.),
            ``"per_class"`` (``[C, D, D]``; every class needs ≥ 2 samples) or ``"diagonal"``
            (per-class variances ``[C, D]``; ≥ 2 samples per class).
        shrinkage: None; a float α in [0, 1] → (1 − α) Σ + α (tr Σ / D) I; ``"ledoit_wolf"`` or
            ``"oas"`` → α from sklearn's formulas (per class for ``per_class``; dense modes
            only). The value used is ``shrinkage_`` after fit.
        num_classes: fix the classes to 0..K−1 (labels outside raise). Default: classes are the
            sorted unique labels seen so far (any integers; they grow with ``partial_fit``);
            ``predict`` returns these labels.
        backend: ``ood_fast.ops`` backend for scoring (None = automatic).
        precision: ``"fp32"`` or ``"bf16"`` scoring GEMMs.

    Covariance convention: maximum likelihood, dividing by N (for ``tied``, the total count of
    the pooled class-centred data), as sklearn's ``EmpiricalCovariance`` and OpenOOD's MDS.
    We state it because changing N to N − 1 rescales every distance and, with a ridge or
    shrinkage, changes the ranking: pytorch-ood #81 changed it silently and AUROC moved. It
    will not change without a new major version. No ridge is added: a singular covariance
    is factored by eigendecomposition with eigenvalues clipped at 1e-10 · max λ (with a
    ``SingularCovarianceWarning`` suggesting ``shrinkage=``).

    Statistics are float64 (``GaussianStats``); ``partial_fit`` only accumulates, and the
    covariance is factored lazily at the first use afterwards (or ``finalize()``), so errors
    about classes with too few samples surface there. Scores are float32 torch tensors on X's
    device, differentiable w.r.t. X. Tied ``ledoit_wolf`` with ``partial_fit``/``merge`` over
    batches that split a class uses an approximation (pooled covariance) in the fourth-moment
    term of the shrinkage intensity only; a single ``fit`` call is exact.
    """

    def __init__(
        self,
        covariance: str = "tied",
        shrinkage=None,
        *,
        num_classes: int | None = None,
        backend: str | None = None,
        precision: str = "fp32",
    ):
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
        if isinstance(shrinkage, str):
            if shrinkage not in SHRINKAGES:
                raise ValueError(
                    f"shrinkage must be None, a float in [0, 1] or one of {SHRINKAGES}, got {shrinkage!r}"
                )
            if covariance == "diagonal":
                raise ValueError(
                    f"shrinkage={shrinkage!r} needs a dense covariance (tied or per_class); "
                    "use a float for diagonal"
                )
        elif shrinkage is not None:
            if (
                isinstance(shrinkage, bool)
                or not isinstance(shrinkage, (int, float))
                or not 0 <= shrinkage <= 1
            ):
                raise ValueError(
                    f"shrinkage must be None, a float in [0, 1] or one of {SHRINKAGES}, got {shrinkage!r}"
                )
            shrinkage = float(shrinkage)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.covariance = covariance
        self.shrinkage = shrinkage
        self.num_classes = num_classes
        self.backend = backend
        self.precision = precision
        self._stats = self._new_stats()
        self._stale = False

    # -- lazy fitted attributes ----------------------------------------------------------------

    def __getattr__(self, name):
        if name in _FITTED:
            d = self.__dict__
            if d.get("_stale") and "_stats" in d and not d["_stats"].empty:
                self.finalize()
                if name in self.__dict__:
                    return self.__dict__[name]
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit first")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _new_stats(self) -> GaussianStats:
        return GaussianStats(
            self.covariance, num_classes=self.num_classes, fourth=self.shrinkage == "ledoit_wolf"
        )

    def _clear_fitted(self):
        for k in _FITTED:
            self.__dict__.pop(k, None)

    # -- fitting -------------------------------------------------------------------------------

    def fit(self, X, y) -> Mahalanobis:
        """Reset, accumulate (X, y) and fit. X ``[N, D]``, y ``[N]`` integer labels."""
        X = check_features(X, "X", finite=False)  # update() scans for NaN/Inf, once
        if X.shape[0] == 0:
            raise ValueError("X: empty input: fit needs at least one sample")
        self._stats = self._new_stats()
        self.partial_fit(X, y)
        return self.finalize()

    def partial_fit(self, X, y) -> Mahalanobis:
        """Accumulate a batch into the float64 statistics; the fit refreshes at first use."""
        self._stats.update(X, y)
        if not self._stats.empty:
            self._clear_fitted()
            self._stale = True
        return self

    def merge(self, other: Mahalanobis) -> Mahalanobis:
        """Add the statistics of ``other`` (same class and settings, e.g. another worker's)."""
        if type(other) is not type(self):
            raise TypeError(f"merge: expected {type(self).__name__}, got {type(other).__name__}")
        self._stats.merge(other._stats)
        if not self._stats.empty:
            self._clear_fitted()
            self._stale = True
        return self

    @property
    def stats_(self) -> GaussianStats:
        return self._stats

    def finalize(self) -> Mahalanobis:
        """Fit from the accumulated statistics (done automatically at first use)."""
        st = self._stats
        if st.empty:
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit first")
        counts = st.counts.cpu()
        labels = st.labels
        if self.num_classes is not None and bool((counts == 0).any()):
            missing = labels[counts == 0].tolist()
            raise ValueError(
                f"num_classes={self.num_classes} but classes {missing[:10]} have no samples"
            )
        if self.covariance != "tied":
            few = (counts < 2).nonzero().flatten().tolist()
            if few:
                c = few[0]
                raise ValueError(
                    f"class {int(labels[c])} has {int(counts[c])} sample(s): covariance="
                    f"{self.covariance!r} needs at least 2 per class ({len(few)} such classes); "
                    "use covariance='tied' or collect more samples"
                )
        self._clear_fitted()
        d = self.__dict__
        d["classes_"] = labels.clone()
        d["num_classes_"] = int(labels.shape[0])
        d["counts_"] = counts.clone()
        d["n_features_in_"] = int(st.dim)
        d["means_"] = st.class_means()
        cov, alpha = self._shrunk(st, self.covariance)
        d["covariance_"], d["shrinkage_"] = cov, alpha
        d["plan_"], d["logdet_"] = self._make_plan(d["means_"], cov, self.covariance, "class")
        self._finalize_extra(st)
        self._stale = False
        return self

    def _finalize_extra(self, st):
        pass

    def _shrunk(self, st: GaussianStats, which: str):
        """(covariance after shrinkage, shrinkage used) for ``which`` in tied/per_class/
        diagonal/global."""
        mode = which
        cov = st.covariance(mode)
        s = self.shrinkage
        if s is None:
            return cov, 0.0
        if isinstance(s, float):
            alpha = s
        elif s == "oas":
            n = st.counts.to(F64)
            alpha = oas_shrinkage(cov, n if which == "per_class" else n.sum())
        else:
            pooled = st.covariance("tied") if st.mode == "tied" else None
            fc, fg = st.fourth_central(pooled)
            n = st.counts.to(F64)
            if which == "per_class":
                alpha = ledoit_wolf_shrinkage(cov, n, fc)
            elif which == "tied":
                alpha = ledoit_wolf_shrinkage(cov, n.sum(), fc.sum())
            else:  # global
                alpha = ledoit_wolf_shrinkage(cov, n.sum(), fg)
        if cov.dim() == 1 or (which == "diagonal") or (which == "global" and st.mode == "diagonal"):
            a = torch.as_tensor(alpha, dtype=F64, device=cov.device)
            mu = cov.mean(-1, keepdim=True)
            cov = (1 - a) * cov + a * mu
        else:
            cov = _shrink_dense(cov, alpha)
        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha) if alpha.dim() == 0 else alpha
        return cov, alpha

    def _make_plan(self, means, cov, which, label):
        """(plan, logdet) for Gaussians with ``means`` and covariance(s) ``cov``."""
        hint = "0.01" if self.shrinkage is None else "a larger value"
        if which == "diagonal":
            var = cov if cov.dim() == 2 else cov[None]
            top = var.max(-1, keepdim=True).values
            if not bool((top > 0).all()):
                c = int((top[:, 0] <= 0).nonzero()[0, 0])
                raise ValueError(
                    f"{label} {self._label_name(c, label)}: every variance is zero: "
                    "nothing to whiten; check the features"
                )
            floor = EIG_EPS * top
            clipped = var < floor
            if bool(clipped.any()):
                rows = clipped.any(-1).nonzero().flatten().tolist()
                warnings.warn(
                    f"{int(clipped.sum())} zero or near-zero variances (in {len(rows)} "
                    f"Gaussian(s), e.g. {label} {self._label_name(rows[0], label)}) clipped up to "
                    f"{EIG_EPS:g}·max; regularize with shrinkage={hint}",
                    SingularCovarianceWarning,
                    stacklevel=3,
                )
            var = torch.maximum(var, floor)
            plan = mahalanobis_plan(means, inv_var=1.0 / var)
            return plan, torch.log(var).sum(-1)
        covs = cov if cov.dim() == 3 else cov[None]
        what = [
            f"{label} {self._label_name(g, label)}"
            if covs.shape[0] > 1
            else ("background" if label == "background" else "pooled within-class")
            for g in range(covs.shape[0])
        ]
        W, logdet, chol = _factor(covs, what, hint)
        return mahalanobis_plan(means, W, triangular=chol is not None), logdet

    def _label_name(self, g, label):
        if label == "class" and "classes_" in self.__dict__:
            return int(self.__dict__["classes_"][g])
        return g

    # -- scoring -------------------------------------------------------------------------------

    def _ensure_fitted(self):
        if self._stale:
            self.finalize()
        if "plan_" not in self.__dict__:
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit first")

    def _prep(self, X):
        self._ensure_fitted()
        X = check_features(X, "X", dim=self.n_features_in_)
        if X.dtype == F64:
            X = X.float()  # the kernels take fp32/fp16/bf16; .float() keeps the autograd graph
        return X

    def _plan(self, plan, X):
        return plan.to(X.device)

    def _min(self, X, plan):
        return mahalanobis(
            X, self._plan(plan, X), "min", backend=self.backend, precision=self.precision
        )

    def _dist(self, X, plan):
        return mahalanobis(
            X, self._plan(plan, X), "none", backend=self.backend, precision=self.precision
        )

    def score(self, X) -> torch.Tensor:
        """``[N]`` float32: −min_c d²_c (higher = more in-distribution)."""
        X = self._prep(X)
        if X.shape[0] == 0:
            return torch.empty(0, dtype=torch.float32, device=X.device)
        return -self._min(X, self.plan_).values

    def distances(self, X) -> torch.Tensor:
        """``[N, C]`` float32 squared Mahalanobis distances to each class (order of classes_)."""
        X = self._prep(X)
        if X.shape[0] == 0:
            return torch.empty(0, self.num_classes_, dtype=torch.float32, device=X.device)
        return self._dist(X, self.plan_)

    def predict(self, X) -> torch.Tensor:
        """``[N]`` int64: the label (from classes_) of the nearest class."""
        X = self._prep(X)
        if X.shape[0] == 0:
            return torch.empty(0, dtype=torch.int64, device=X.device)
        with torch.no_grad():
            idx = self._min(X, self.plan_).indices
        return self.classes_.to(idx.device)[idx]

    # -- persistence ---------------------------------------------------------------------------

    def _settings(self) -> dict:
        return {
            "covariance": self.covariance,
            "shrinkage": self.shrinkage,
            "num_classes": self.num_classes,
            "backend": self.backend,
            "precision": self.precision,
        }

    def _state(self, prefix: str = ""):
        """(settings, tensors) of this estimator: statistics + fitted parameters."""
        self._ensure_fitted()
        st = self._stats
        settings = {
            "params": self._settings(),
            "stats": st.settings(),
            "shrinkage_": self._json_shrink(self.shrinkage_),
            "triangular": self.plan_.triangular,
        }
        tensors = st.tensors(prefix + "stats.")
        d = self.__dict__
        for k in ("means_", "covariance_", "logdet_", "counts_", "classes_"):
            tensors[prefix + "fit." + k] = d[k]
        if isinstance(d["shrinkage_"], torch.Tensor):
            tensors[prefix + "fit.shrinkage_"] = d["shrinkage_"]
        tensors.update(_plan_tensors(self.plan_, prefix + "plan."))
        self._state_extra(settings, tensors, prefix)
        return settings, tensors

    def _state_extra(self, settings, tensors, prefix):
        pass

    @staticmethod
    def _json_shrink(a):
        return "tensor" if isinstance(a, torch.Tensor) else float(a)

    def save(self, path) -> None:
        """Write statistics and fitted parameters to ``path`` (safetensors + JSON header)."""
        settings, tensors = self._state()
        _io.save_estimator(path, self._kind, settings, tensors)

    @classmethod
    def load(cls, path):
        """Load an estimator of this class saved with ``save`` (no code is executed)."""
        return _io.load_as(cls, path)

    @classmethod
    def _from_state(cls, settings: dict, tensors: dict, prefix: str = ""):
        est = cls(**settings["params"])
        est._restore(settings, tensors, prefix)
        return est

    def _restore(self, settings, tensors, prefix):
        self._stats = GaussianStats.from_state(settings["stats"], tensors, prefix + "stats.")
        d = self.__dict__
        for k in ("means_", "covariance_", "logdet_", "counts_", "classes_"):
            d[k] = tensors[prefix + "fit." + k]
        s = settings["shrinkage_"]
        d["shrinkage_"] = tensors[prefix + "fit.shrinkage_"] if s == "tensor" else s
        d["num_classes_"] = int(d["classes_"].shape[0])
        d["n_features_in_"] = int(d["means_"].shape[1])
        d["plan_"] = _plan_from(tensors, prefix + "plan.", settings["triangular"])
        self._restore_extra(settings, tensors, prefix)
        self._stale = False

    def _restore_extra(self, settings, tensors, prefix):
        pass

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._settings().items())
        return f"{type(self).__name__}({args})"


@_io.register("relative_mahalanobis")
class RelativeMahalanobis(Mahalanobis):
    """Relative Mahalanobis distance (Ren et al. 2021): score = −(min_c d²_c − d²_0).

    d²_0 is the distance to a class-agnostic background Gaussian: the global mean and the global
    covariance of all training data (not class-pooled; derived exactly from the same streaming
    statistics: pooled within-class scatter + between-class scatter), with the same
    ``shrinkage`` rule (``background_shrinkage_``) and factoring. In ``diagonal`` mode the
    background is diagonal too. ``distances`` returns d²_c − d²_0 ``[N, C]``; ``predict`` the
    nearest class (d²_0 does not depend on the class). Same constructor as ``Mahalanobis``.
    """

    def _finalize_extra(self, st):
        d = self.__dict__
        cov, alpha = self._shrunk(st, "global")
        d["background_mean_"] = st.global_mean()
        d["background_covariance_"] = cov
        d["background_shrinkage_"] = alpha
        bg_cov = cov if cov.dim() == 2 else cov[None]
        which = "global" if cov.dim() == 2 else "diagonal"
        d["background_plan_"], _ = self._make_plan(
            d["background_mean_"][None], bg_cov, which, "background"
        )

    def score(self, X) -> torch.Tensor:
        """``[N]`` float32: −(min_c d²_c − d²_0)."""
        X = self._prep(X)
        if X.shape[0] == 0:
            return torch.empty(0, dtype=torch.float32, device=X.device)
        d0 = self._min(X, self.background_plan_).values
        return d0 - self._min(X, self.plan_).values

    def distances(self, X) -> torch.Tensor:
        """``[N, C]`` float32 relative distances d²_c − d²_0."""
        X = self._prep(X)
        if X.shape[0] == 0:
            return torch.empty(0, self.num_classes_, dtype=torch.float32, device=X.device)
        d0 = self._min(X, self.background_plan_).values
        return self._dist(X, self.plan_) - d0[:, None]

    def _state_extra(self, settings, tensors, prefix):
        d = self.__dict__
        settings["background_shrinkage_"] = self._json_shrink(d["background_shrinkage_"])
        settings["background_triangular"] = d["background_plan_"].triangular
        tensors[prefix + "fit.background_mean_"] = d["background_mean_"]
        tensors[prefix + "fit.background_covariance_"] = d["background_covariance_"]
        tensors.update(_plan_tensors(d["background_plan_"], prefix + "bgplan."))

    def _restore_extra(self, settings, tensors, prefix):
        d = self.__dict__
        d["background_shrinkage_"] = settings["background_shrinkage_"]
        d["background_mean_"] = tensors[prefix + "fit.background_mean_"]
        d["background_covariance_"] = tensors[prefix + "fit.background_covariance_"]
        d["background_plan_"] = _plan_from(
            tensors, prefix + "bgplan.", settings["background_triangular"]
        )


@_io.register("gaussian_likelihood")
class GaussianLikelihood(Mahalanobis):
    """Gaussian mixture / GDA log-likelihood: score = log Σ_c π_c N(x; μ_c, Σ_c).

    = logsumexp_c(log π_c − ½ log det Σ_c − D/2 · log 2π − ½ d²_c), computed by the fused op
    (one whitening per covariance group, scored in batches: never K × D × D per sample).
    log det Σ_c comes from the float64 Cholesky factor (or the clipped eigenvalues).

    Args:
        covariance: ``"per_class"`` (default), ``"tied"`` or ``"diagonal"``.
        priors: ``"empirical"`` (class frequencies), ``"uniform"``, or an array ``[C]`` of
            positive weights (normalized to sum 1; order of ``classes_``).
        shrinkage, num_classes, backend, precision: as ``Mahalanobis``.

    ``predict`` returns the class of highest posterior, ``distances`` the d²_c.
    """

    def __init__(
        self,
        covariance: str = "per_class",
        priors="empirical",
        shrinkage=None,
        *,
        num_classes: int | None = None,
        backend: str | None = None,
        precision: str = "fp32",
    ):
        super().__init__(
            covariance, shrinkage, num_classes=num_classes, backend=backend, precision=precision
        )
        if isinstance(priors, str):
            if priors not in ("empirical", "uniform"):
                raise ValueError(
                    f"priors must be 'empirical', 'uniform' or an array, got {priors!r}"
                )
        else:
            p = as_tensor(priors, "priors").to(F64).reshape(-1)
            if p.numel() == 0 or not bool(torch.isfinite(p).all()) or bool((p <= 0).any()):
                raise ValueError("priors: expected finite positive weights, one per class")
            priors = p
        self.priors = priors

    def _finalize_extra(self, st):
        d = self.__dict__
        C, D = d["means_"].shape
        dev = d["means_"].device
        if isinstance(self.priors, torch.Tensor):
            if self.priors.shape[0] != C:
                raise ValueError(
                    f"priors: expected {C} weights (one per class), got {self.priors.shape[0]}"
                )
            pri = self.priors.to(dev)
        elif self.priors == "uniform":
            pri = torch.ones(C, dtype=F64, device=dev)
        else:
            pri = st.counts.to(F64)
        pri = pri / pri.sum()
        logdet = d["logdet_"].to(dev).expand(C)
        d["priors_"] = pri
        d["bias_"] = torch.log(pri) - 0.5 * logdet - 0.5 * D * math.log(2 * math.pi)

    def score(self, X) -> torch.Tensor:
        """``[N]`` float32 log-likelihood log p(x) under the fitted mixture."""
        X = self._prep(X)
        if X.shape[0] == 0:
            return torch.empty(0, dtype=torch.float32, device=X.device)
        bias = self.bias_
        k = float(bias.max())  # keep the kernel's values O(d²); add the constant back after
        b = (bias - k).to(device=X.device, dtype=torch.float32)
        out = mahalanobis(
            X,
            self._plan(self.plan_, X),
            "logsumexp",
            bias=b,
            backend=self.backend,
            precision=self.precision,
        )
        return out + k

    def predict(self, X) -> torch.Tensor:
        """``[N]`` int64: the label of the class with the highest posterior."""
        X = self._prep(X)
        if X.shape[0] == 0:
            return torch.empty(0, dtype=torch.int64, device=X.device)
        with torch.no_grad():
            d2 = self._dist(X, self.plan_)
            logit = self.bias_.to(device=X.device, dtype=torch.float32) - 0.5 * d2
            idx = logit.argmax(1)
        return self.classes_.to(idx.device)[idx]

    def _settings(self):
        s = super()._settings()
        s["priors"] = "array" if isinstance(self.priors, torch.Tensor) else self.priors
        return s

    def _state_extra(self, settings, tensors, prefix):
        d = self.__dict__
        tensors[prefix + "fit.priors_"] = d["priors_"]
        tensors[prefix + "fit.bias_"] = d["bias_"]
        if isinstance(self.priors, torch.Tensor):
            tensors[prefix + "priors"] = self.priors

    @classmethod
    def _from_state(cls, settings, tensors, prefix=""):
        params = dict(settings["params"])
        if params.get("priors") == "array":
            params["priors"] = tensors[prefix + "priors"]
        est = cls(**params)
        est._restore(settings, tensors, prefix)
        return est

    def _restore_extra(self, settings, tensors, prefix):
        self.__dict__["priors_"] = tensors[prefix + "fit.priors_"]
        self.__dict__["bias_"] = tensors[prefix + "fit.bias_"]


@_io.register("multi_layer_mahalanobis")
class MultiLayerMahalanobis:
    """Lee et al.'s feature ensemble: one ``Mahalanobis`` per layer, scores summed with weights.

    ``fit([X_1, ..., X_L], y)``; ``score([X_1, ..., X_L]) = Σ_l w_l · score_l`` with
    ``layer_weights`` w (default: all 1, the plain sum, as OpenOOD's MDS ensemble before any
    tuning; Lee et al. fit the weights by logistic regression on validation data: pass them
    here). ``layer_scores`` returns the per-layer scores ``[N, L]``. Other arguments are shared
    by every layer's ``Mahalanobis``.
    """

    def __init__(
        self,
        covariance: str = "tied",
        layer_weights=None,
        shrinkage=None,
        *,
        num_classes: int | None = None,
        backend: str | None = None,
        precision: str = "fp32",
    ):
        self.covariance = covariance
        self.shrinkage = shrinkage
        self.num_classes = num_classes
        self.backend = backend
        self.precision = precision
        if layer_weights is not None:
            w = as_tensor(layer_weights, "layer_weights").to(torch.float32).reshape(-1)
            if not bool(torch.isfinite(w).all()):
                raise ValueError("layer_weights: must be finite")
            layer_weights = w
        self.layer_weights = layer_weights
        Mahalanobis(
            covariance, shrinkage, num_classes=num_classes, backend=backend, precision=precision
        )  # validates the shared arguments
        self.layers_: list[Mahalanobis] = []

    def _new_layer(self):
        return Mahalanobis(
            self.covariance,
            self.shrinkage,
            num_classes=self.num_classes,
            backend=self.backend,
            precision=self.precision,
        )

    def _check_list(self, Xs, fitting=False):
        if isinstance(Xs, torch.Tensor) or not isinstance(Xs, (list, tuple)) or not Xs:
            raise TypeError("expected a non-empty list of per-layer feature matrices [N, D_l]")
        if not fitting or self.layers_:
            if not self.layers_:
                raise NotFittedError("MultiLayerMahalanobis is not fitted: call fit first")
            if len(Xs) != len(self.layers_):
                raise ValueError(f"expected {len(self.layers_)} layers, got {len(Xs)}")
        if self.layer_weights is not None and self.layer_weights.numel() != len(Xs):
            raise ValueError(
                f"layer_weights has {self.layer_weights.numel()} entries for {len(Xs)} layers"
            )
        return list(Xs)

    def fit(self, Xs, y) -> MultiLayerMahalanobis:
        self.layers_ = []
        Xs = self._check_list(Xs, fitting=True)
        self.layers_ = [self._new_layer().fit(X, y) for X in Xs]
        return self

    def partial_fit(self, Xs, y) -> MultiLayerMahalanobis:
        Xs = self._check_list(Xs, fitting=True)
        if not self.layers_:
            self.layers_ = [self._new_layer() for _ in Xs]
        for layer, X in zip(self.layers_, Xs, strict=False):
            layer.partial_fit(X, y)
        return self

    def merge(self, other: MultiLayerMahalanobis) -> MultiLayerMahalanobis:
        if len(other.layers_) != len(self.layers_):
            raise ValueError("merge: the estimators have different numbers of layers")
        for a, b in zip(self.layers_, other.layers_, strict=False):
            a.merge(b)
        return self

    def layer_scores(self, Xs) -> torch.Tensor:
        """``[N, L]`` float32 per-layer scores."""
        Xs = self._check_list(Xs)
        return torch.stack(
            [layer.score(X) for layer, X in zip(self.layers_, Xs, strict=False)], dim=1
        )

    def score(self, Xs) -> torch.Tensor:
        """``[N]`` float32: Σ_l w_l · score_l."""
        s = self.layer_scores(Xs)
        if self.layer_weights is None:
            return s.sum(1)
        return s @ self.layer_weights.to(s.device)

    def _settings(self):
        return {
            "covariance": self.covariance,
            "shrinkage": self.shrinkage,
            "num_classes": self.num_classes,
            "backend": self.backend,
            "precision": self.precision,
        }

    def save(self, path) -> None:
        if not self.layers_:
            raise NotFittedError("MultiLayerMahalanobis is not fitted: call fit first")
        layers, tensors = [], {}
        for i, layer in enumerate(self.layers_):
            s, t = layer._state(prefix=f"layer{i}.")
            layers.append(s)
            tensors.update(t)
        if self.layer_weights is not None:
            tensors["layer_weights"] = self.layer_weights
        settings = {
            "params": self._settings(),
            "layers": layers,
            "weighted": self.layer_weights is not None,
        }
        _io.save_estimator(path, self._kind, settings, tensors)

    @classmethod
    def load(cls, path):
        return _io.load_as(cls, path)

    @classmethod
    def _from_state(cls, settings, tensors):
        w = tensors["layer_weights"] if settings.get("weighted") else None
        est = cls(layer_weights=w, **settings["params"])
        est.layers_ = [
            Mahalanobis._from_state(s, tensors, prefix=f"layer{i}.")
            for i, s in enumerate(settings["layers"])
        ]
        return est
