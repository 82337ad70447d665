"""The implementations a user would otherwise pick: the peers of our benchmarks and tests.

Mahalanobis peers first, KNN peers (faiss, torch, sklearn) at the end of the module (see the
"KNN" section below for their conventions).

Each peer is re-implemented here from the upstream's math and code structure (nothing is copied;
the docstring of each says which upstream code it mirrors and how faithfully), as a pair of
plain functions::

    fitted = <peer>_fit(train_x, train_y)        # train_x [N, D], train_y [N] ints in 0..C-1
    scores = <peer>_score(fitted, test_x)        # [M] float tensor

and, for convenience, ``<peer>_...(train_x, train_y, test_x)`` one-shot functions.
Inputs may be torch tensors (CPU, or CUDA where the peer runs on torch) or numpy arrays.

**Every ``*_score`` returns OUR convention and scale**: higher = more in-distribution, equal to
``−min_c d²_c`` where d² is the squared Mahalanobis distance under the maximum-likelihood
(divide-by-N) tied covariance — the same number ``ood_fast.Mahalanobis().fit(X, y).score(X')``
returns. The conversion is exact arithmetic on the peer's own output and is noted for each:

==================  ===========================  =============================================
peer                native sign                  native scale
==================  ===========================  =============================================
OpenOOD MDS         conf, higher = ID            −min d² (MLE covariance; ``pinvh`` precision)
pytorch-ood Maha.   higher = OOD                 +½·min d² / N: its covariance is the SUM of
                                                 centred outer products (not ÷N) + 1e-6·I
pytorch-ood RMD     higher = OOD                 min_c (d²_c − d²_0) / N (summed covariances,
                                                 each + 1e-6·I)
sklearn per class   distances (higher = OOD)     d² (``EmpiricalCovariance`` is MLE)
torch expression    ours                         ours (MLE, no ridge)
==================  ===========================  =============================================

(pytorch-ood's 1e-6 ridge on the summed covariance is 1e-6/N on the MLE scale: invisible unless
the covariance is singular, where pytorch-ood's numbers are dominated by it.)

``pytorch_ood_*`` return ``None`` when pytorch-ood cannot be imported (pytorch-ood 0.4.0 imports
torchvision at import time); ``pytorch_ood_available()`` returns True or the reason string.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "openood_fit",
    "openood_score",
    "openood_mahalanobis_score",
    "torch_expression_fit",
    "torch_expression_score",
    "torch_expression",
    "pytorch_ood_available",
    "pytorch_ood_fit",
    "pytorch_ood_score",
    "pytorch_ood_mahalanobis",
    "pytorch_ood_rmd",
    "sklearn_fit",
    "sklearn_score",
    "sklearn_per_class",
    "KNN_PEERS",
    "faiss_available",
    "faiss_l2_fit",
    "faiss_l2_score",
    "faiss_l2_sweep",
    "faiss_ip_fit",
    "faiss_ip_score",
    "torch_knn_fit",
    "torch_knn_score",
    "sklearn_knn_fit",
    "sklearn_knn_score",
    "pytorch_ood_knn",
    "quantized_engines",
    "torch_dynamic_int8_linear",
    "torch_int_mm_linear",
    "dense_hadamard_matrix",
]


# ----------------------------------------------------------------------------- helpers


def _tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise TypeError(f"{name}: expected a numeric array, got an object array")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _features(x, name: str) -> torch.Tensor:
    t = _tensor(x, name)
    if t.dim() != 2:
        raise ValueError(f"{name}: expected [N, D] features, got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        t = t.to(torch.float32)
    return t


def _labels(y, n: int, device) -> tuple[torch.Tensor, int]:
    y = _tensor(y, "train_y").reshape(-1)
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TypeError(f"train_y: class labels must be integers, got {y.dtype}")
    if y.shape[0] != n:
        raise ValueError(f"train_y: expected {n} labels, got {y.shape[0]}")
    y = y.to(device=device, dtype=torch.int64)
    if n == 0:
        raise ValueError("train_x: no training samples")
    if int(y.min()) < 0:
        raise ValueError(f"train_y: labels must be >= 0, got {int(y.min())}")
    C = int(y.max()) + 1
    counts = torch.bincount(y, minlength=C)
    if bool((counts == 0).any()):
        missing = (counts == 0).nonzero().reshape(-1)[:5].tolist()
        raise ValueError(f"train_y: classes must be contiguous 0..{C - 1}; missing {missing}")
    return y, C


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _whitener(cov: torch.Tensor) -> torch.Tensor:
    """W with W Wᵀ = cov⁻¹ (float64): W = L⁻ᵀ from a Cholesky, else V diag(λ^-½) (pinv-like).

    Works batched ([..., D, D]).
    """
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    L, info = torch.linalg.cholesky_ex(cov)
    if not bool((info != 0).any()):
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device).expand_as(cov)
        return torch.linalg.solve_triangular(L, eye, upper=False).transpose(-1, -2)
    lam, V = torch.linalg.eigh(cov)
    cut = 1e-10 * lam.amax(dim=-1, keepdim=True).clamp(min=1e-300)
    inv_sqrt = torch.where(lam > cut, lam.clamp(min=1e-300).rsqrt(), torch.zeros_like(lam))
    return V * inv_sqrt[..., None, :]


# ----------------------------------------------------------------------------- OpenOOD


@dataclass
class OpenOODFit:
    class_mean: torch.Tensor  # [C, D] float32
    precision: torch.Tensor  # [D, D] float32


def openood_fit(train_x, train_y) -> OpenOODFit:
    """OpenOOD's MDS ``setup``: per-class means + sklearn ``EmpiricalCovariance`` precision.

    Mirrors ``openood/postprocessors/mds_postprocessor.py`` (OpenOOD v1.5, ``MDSPostprocessor
    .setup``): a Python loop over classes takes ``class_samples.mean(0)`` and collects the
    class-centred samples; ``sklearn.covariance.EmpiricalCovariance(assume_centered=False)`` is
    fitted on all centred samples (as float32 numpy) and ``precision_`` (``scipy.linalg.pinvh``
    of the float64 MLE covariance) is kept as a float32 torch tensor.
    """
    from sklearn.covariance import EmpiricalCovariance

    x = _features(train_x, "train_x").float()
    y, C = _labels(train_y, x.shape[0], x.device)
    class_mean, centered = [], []
    for c in range(C):
        samples = x[y == c]
        class_mean.append(samples.mean(0))
        centered.append(samples - class_mean[c].view(1, -1))
    class_mean = torch.stack(class_mean)
    group_lasso = EmpiricalCovariance(assume_centered=False)
    group_lasso.fit(torch.cat(centered).cpu().numpy().astype(np.float32))
    precision = torch.from_numpy(group_lasso.precision_).float().to(x.device)
    return OpenOODFit(class_mean=class_mean, precision=precision)


@torch.no_grad()
def openood_score(fitted: OpenOODFit, test_x, batch: int = 200) -> torch.Tensor:
    """OpenOOD's MDS ``postprocess``, batch by batch: conf = max_c −diag(t P tᵀ), t = x − μ_c.

    Mirrors ``MDSPostprocessor.postprocess``: for every class, ``-torch.matmul(torch.matmul(
    tensor, self.precision), tensor.t()).diag()``, which builds a B×B matrix per class and keeps
    its diagonal (the quadratic cost in the batch size is the upstream's; it is the point of this
    peer). ``batch`` is the test loader's batch size (OpenOOD's default 200). OpenOOD moves the
    features to the CPU; here the computation stays on ``test_x``'s device (the formula is what
    is measured). Native scale and sign = ours (−min d², higher = ID), float32.
    """
    x = _features(test_x, "test_x").float()
    mean = fitted.class_mean.to(x.device)
    P = fitted.precision.to(x.device)
    C = mean.shape[0]
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], batch):
        features = x[s : s + batch]
        class_scores = torch.zeros((features.shape[0], C), device=x.device)
        for c in range(C):
            tensor = features - mean[c].view(1, -1)
            class_scores[:, c] = -torch.matmul(torch.matmul(tensor, P), tensor.t()).diag()
        out[s : s + batch] = torch.max(class_scores, dim=1)[0]
    return out


def openood_mahalanobis_score(train_x, train_y, test_x, batch: int = 200) -> torch.Tensor:
    """``openood_fit`` then ``openood_score``: OpenOOD's MDS conf (higher = ID, = −min d²)."""
    return openood_score(openood_fit(train_x, train_y), test_x, batch=batch)


# ----------------------------------------------------------------------------- plain torch


@dataclass
class TorchFit:
    covariance: str
    means: torch.Tensor  # [C, D]
    center: torch.Tensor  # [D] mean of the class means (keeps fp32 well conditioned)
    W: torch.Tensor | None  # [D, D] tied or [C, D, D] per class: W Wᵀ = Σ⁻¹
    inv_var: torch.Tensor | None  # [C, D] diagonal
    proj: torch.Tensor  # cross-term weights
    const: torch.Tensor  # [C]


def torch_expression_fit(train_x, train_y, covariance: str = "tied") -> TorchFit:
    """The best plain-torch fit a practitioner would write (no per-class Python loop).

    tied: class sums by ``index_add_``, one ``Xcᵀ Xc`` GEMM of the class-centred features (÷N,
    MLE), Cholesky in float64 (eigendecomposition with pinv-like clipping if singular), and
    the whitening factor W = L⁻ᵀ (so Σ⁻¹ = W Wᵀ). per_class: batched ``[C, D, D]`` scatter from
    class-sorted features, batched Cholesky. diagonal: per-class variances (÷n_c).
    Works in float32 (float64 for float64 input) on the input's device; factoring in float64.
    """
    if covariance not in ("tied", "per_class", "diagonal"):
        raise ValueError(
            f"covariance must be 'tied', 'per_class' or 'diagonal', got {covariance!r}"
        )
    x = _features(train_x, "train_x")
    dt = _work_dtype(x)
    x = x.to(dt)
    y, C = _labels(train_y, x.shape[0], x.device)
    N, D = x.shape
    counts = torch.bincount(y, minlength=C).to(dt)
    means = torch.zeros(C, D, dtype=dt, device=x.device).index_add_(0, y, x) / counts[:, None]
    center = means.mean(0)
    xc = x - means[y]
    m = means - center
    W = inv_var = None
    if covariance == "tied":
        cov = (xc.T @ xc).double() / N
        W = _whitener(cov).to(dt)
        mw = m @ W  # whitened centred means
        proj = (mw @ W.T).T  # [D, C] = Σ⁻¹ m_cᵀ
        const = (mw * mw).sum(1)
    elif covariance == "per_class":
        order = torch.argsort(y, stable=True)
        cov = torch.empty(C, D, D, dtype=torch.float64, device=x.device)
        start = 0
        for c, n_c in enumerate(counts.long().tolist()):  # contiguous slices, one GEMM each
            xs = xc[order[start : start + n_c]]
            cov[c] = (xs.T @ xs).double() / n_c
            start += n_c
        W = _whitener(cov).to(dt)  # [C, D, D]
        mw = torch.bmm(m[:, None, :], W)[:, 0]  # [C, D]
        proj = torch.bmm(mw[:, None, :], W.transpose(1, 2))[:, 0].T  # [D, C]
        const = (mw * mw).sum(1)
    else:
        var = torch.zeros(C, D, dtype=dt, device=x.device).index_add_(0, y, xc * xc)
        var = var / counts[:, None]
        inv_var = torch.where(var > 0, 1.0 / var.clamp(min=1e-300), torch.zeros_like(var))
        proj = (m * inv_var).T
        const = (m * m * inv_var).sum(1)
    return TorchFit(covariance, means, center, W, inv_var, proj.contiguous(), const)


@torch.no_grad()
def torch_expression_score(fitted: TorchFit, test_x, chunk: int = 4096) -> torch.Tensor:
    """−min_c d²_c by the expanded form: whitening GEMM, one ``addmm`` for all classes, ``min``.

    d²_c = ‖x̃ W‖² − 2 x̃·(Σ⁻¹ m_c) + m_cᵀ Σ⁻¹ m_c with x̃ = x − center (tied); per_class whitens
    with each class's W (batched matmul, bounded by chunking rows); diagonal needs no
    whitening. Native scale and sign = ours.
    """
    f = fitted
    x = _features(test_x, "test_x")
    dt = f.means.dtype
    dev = x.device
    center, proj, const = f.center.to(dev), f.proj.to(dev), f.const.to(dev)
    W = f.W.to(dev) if f.W is not None else None
    iv = f.inv_var.to(dev) if f.inv_var is not None else None
    C = const.shape[0]
    if f.covariance == "per_class":  # rows per step so that C·rows·D stays ~32M floats
        chunk = max(1, min(chunk, (1 << 25) // max(1, C * x.shape[1])))
    out = torch.empty(x.shape[0], dtype=dt, device=dev)
    for s in range(0, x.shape[0], chunk):
        xt = x[s : s + chunk].to(dt) - center
        d2 = torch.addmm(const, xt, proj, alpha=-2.0)
        if f.covariance == "tied":
            z = xt @ W
            d2 += (z * z).sum(1, keepdim=True)
        elif f.covariance == "per_class":
            z = torch.matmul(xt, W)  # [C, n, D]
            d2 += (z * z).sum(2).T
        else:
            d2 += (xt * xt) @ iv.T
        out[s : s + chunk] = -d2.clamp_(min=0).min(1).values
    return out


def torch_expression(train_x, train_y, test_x, covariance: str = "tied") -> torch.Tensor:
    """``torch_expression_fit`` then ``torch_expression_score``."""
    return torch_expression_score(torch_expression_fit(train_x, train_y, covariance), test_x)


# ----------------------------------------------------------------------------- pytorch-ood


@functools.lru_cache(maxsize=1)
def _pytorch_ood_import_error() -> str | None:
    try:
        import pytorch_ood.detector  # noqa: F401
    except Exception as exc:  # ImportError, or torchvision failing to load its ops
        hint = ""
        if "torchvision" in f"{exc!r}":
            hint = (
                " (pytorch-ood imports torchvision at import time; torchvision must match "
                "the installed torch: see .ci/peers_env.sh)"
            )
        return f"pytorch-ood cannot import: {type(exc).__name__}: {exc}{hint}"
    return None


def pytorch_ood_available() -> bool | str:
    """True when ``pytorch_ood`` imports here, else the reason (a string)."""
    err = _pytorch_ood_import_error()
    return True if err is None else err


@dataclass
class PytorchOODFit:
    detector: object  # pytorch_ood.detector.Mahalanobis or RMD
    n_train: int
    relative: bool


def pytorch_ood_fit(train_x, train_y, relative: bool = False) -> PytorchOODFit | None:
    """``pytorch_ood.detector.Mahalanobis(None).fit_features(x, y)`` (``RMD`` if ``relative``).

    Runs pytorch-ood 0.4.0 itself (not a re-implementation): its fit loops over classes,
    SUMS the centred outer products (no ÷N), adds 1e-6·I and inverts with
    ``torch.linalg.inv``, in float32. Returns None when pytorch-ood cannot import
    (``pytorch_ood_available()`` says why).
    """
    if _pytorch_ood_import_error() is not None:
        return None
    from pytorch_ood.detector import RMD, Mahalanobis

    x = _features(train_x, "train_x").float()
    y, _ = _labels(train_y, x.shape[0], x.device)
    det = (RMD if relative else Mahalanobis)(None)
    det.fit_features(x, y)
    return PytorchOODFit(detector=det, n_train=int(x.shape[0]), relative=relative)


@torch.no_grad()
def pytorch_ood_score(fitted: PytorchOODFit, test_x) -> torch.Tensor:
    """``detector.predict_features(x)``, converted to our sign and scale.

    pytorch-ood's Mahalanobis returns ``−max_c(−½ (z−μ_c) P (z−μ_c))`` = ½·min d²_sum with
    P = (Σ_sum + 1e-6 I)⁻¹ ≈ P_MLE / N, higher = OOD; we return −2N × that. Its RMD returns
    min_c (d²_c − d²_0) on the same summed scale, higher = OOD; we return −N × that
    (= ``RelativeMahalanobis.score``).
    """
    x = _features(test_x, "test_x").float()
    native = fitted.detector.predict_features(x)
    factor = -float(fitted.n_train) * (1.0 if fitted.relative else 2.0)
    return native * factor


def pytorch_ood_mahalanobis(train_x, train_y, test_x) -> torch.Tensor | None:
    """pytorch-ood's Mahalanobis scores in our convention, or None where it cannot import."""
    f = pytorch_ood_fit(train_x, train_y)
    return None if f is None else pytorch_ood_score(f, test_x)


def pytorch_ood_rmd(train_x, train_y, test_x) -> torch.Tensor | None:
    """pytorch-ood's RMD scores in our convention, or None where it cannot import."""
    f = pytorch_ood_fit(train_x, train_y, relative=True)
    return None if f is None else pytorch_ood_score(f, test_x)


# ----------------------------------------------------------------------------- sklearn


@dataclass
class SklearnFit:
    estimator: object  # sklearn.covariance.EmpiricalCovariance fitted on class-centred features
    means: np.ndarray  # [C, D] float64


def sklearn_fit(train_x, train_y) -> SklearnFit:
    """A tied ``sklearn.covariance.EmpiricalCovariance`` on class-centred features + class means.

    What a scikit-learn user writes: class means with numpy, one ``EmpiricalCovariance().fit``
    on the class-centred training features (MLE covariance, ``pinvh`` precision), float64.
    """
    from sklearn.covariance import EmpiricalCovariance

    x = _features(train_x, "train_x").cpu().numpy().astype(np.float64, copy=False)
    y, C = _labels(train_y, x.shape[0], "cpu")
    y = y.numpy()
    means = np.stack([x[y == c].mean(0) for c in range(C)])
    est = EmpiricalCovariance(assume_centered=False).fit(x - means[y])
    return SklearnFit(estimator=est, means=means)


def sklearn_score(fitted: SklearnFit, test_x) -> torch.Tensor:
    """Per class: set ``location_`` to the class mean and call ``EmpiricalCovariance.mahalanobis``.

    sklearn's ``mahalanobis`` returns squared distances (through
    ``pairwise_distances(metric="mahalanobis")``, i.e. scipy's ``cdist``), higher = OOD; the
    minimum over classes, negated, is ours. float64.
    """
    x = _features(test_x, "test_x").cpu().numpy().astype(np.float64, copy=False)
    est = fitted.estimator
    saved = est.location_
    d2 = np.empty((x.shape[0], fitted.means.shape[0]))
    try:
        for c in range(fitted.means.shape[0]):
            est.location_ = fitted.means[c]
            d2[:, c] = est.mahalanobis(x)
    finally:
        est.location_ = saved
    return torch.from_numpy(-d2.min(axis=1))


def sklearn_per_class(train_x, train_y, test_x) -> torch.Tensor:
    """``sklearn_fit`` then ``sklearn_score``."""
    return sklearn_score(sklearn_fit(train_x, train_y), test_x)


# ============================================================================= KNN
#
# Deep nearest-neighbour scores (Sun et al. 2022). Every KNN peer is a pair
#
#     fitted = <peer>_fit(bank)                  # bank [M, D] raw features (tensor or array)
#     scores = <peer>_score(fitted, queries, k)  # [N] float32 tensor on the CPU
#
# and EVERY ``*_score`` returns OUR convention: higher = more in-distribution, equal to
# OpenOOD's ``−‖q̂ − b̂_(k)‖²`` (squared L2 from the normalized query to its k-th nearest
# normalized bank row) — the number ``ood_fast.KNN(k).fit(bank).score(queries)`` returns.
#
# ==================  ==============================  =========================================
# peer                native output                   conversion to ours
# ==================  ==============================  =========================================
# faiss IndexFlatL2   D = squared L2, ascending        −D[:, k−1] (exactly OpenOOD's conf)
# faiss IndexFlatIP   D = q̂·b̂, descending             −(‖q̂‖² + ‖b̂_i‖² − 2 D[:, k−1]) with i
#                                                     the k-th index (the L2 of that neighbour)
# torch mm + topk     d² by addmm, k smallest          −(k-th smallest d²)
# sklearn brute       unsquared L2 (pytorch-ood's      −dist[:, −1]²
#                     score, higher = OOD)
# ==================  ==============================  =========================================
#
# Normalizers: OpenOOD's ``x / (‖x‖ + 1e-10)`` for the faiss and torch peers (what OpenOOD
# runs), pytorch-ood's ``x / max(‖x‖, 1e-12)`` for the sklearn peer (what pytorch-ood runs);
# they differ by ~1e-10 relative for ‖x‖ ≈ 1. faiss runs on as many OpenMP threads as torch
# uses (``faiss.omp_set_num_threads(torch.get_num_threads())`` before each call) unless
# ``threads=`` says otherwise, so that a benchmark pinning torch pins faiss too.

KNN_PEERS = ("faiss_l2", "faiss_ip", "torch", "sklearn")
KNN_NORM_EPS = 1e-10  # OpenOOD's KNNPostprocessor normalizer: x / (‖x‖ + 1e-10)


def _knn_features(x, name: str) -> np.ndarray:
    """float32 C-contiguous numpy ``[N, D]`` (what faiss takes)."""
    t = _features(x, name)
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)


def _openood_normalize_np(x: np.ndarray) -> np.ndarray:
    """OpenOOD's ``normalizer = lambda x: x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-10)``."""
    return (x / (np.linalg.norm(x, axis=-1, keepdims=True) + KNN_NORM_EPS)).astype(
        np.float32, copy=False
    )


def _check_k_bank(k, M: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise TypeError(f"k must be an integer, got {k!r}")
    if not 1 <= int(k) <= M:
        raise ValueError(f"k={k} out of range: need 1 <= k <= bank size M={M}")
    return int(k)


@functools.lru_cache(maxsize=1)
def _faiss_import_error() -> str | None:
    try:
        import faiss  # noqa: F401
    except Exception as exc:
        return f"faiss cannot import: {type(exc).__name__}: {exc} (`pip install faiss-cpu`)"
    return None


def faiss_available() -> bool | str:
    """True when ``faiss`` imports here, else the reason (a string)."""
    err = _faiss_import_error()
    return True if err is None else err


def _faiss_threads(threads: int | None):
    import faiss

    faiss.omp_set_num_threads(int(threads) if threads else max(1, torch.get_num_threads()))


@dataclass
class FaissFit:
    index: object  # faiss.IndexFlatL2 / IndexFlatIP holding the normalized bank
    metric: str  # "l2" or "ip"
    bank_sq: np.ndarray | None  # [M] squared norms of the normalized bank rows (ip only)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)


def _faiss_fit(bank, metric: str, threads: int | None) -> FaissFit:
    import faiss

    b = _openood_normalize_np(_knn_features(bank, "bank"))
    if b.shape[0] == 0:
        raise ValueError("bank is empty: need >= 1 row")
    _faiss_threads(threads)
    index = (faiss.IndexFlatL2 if metric == "l2" else faiss.IndexFlatIP)(b.shape[1])
    index.add(b)
    sq = np.einsum("md,md->m", b, b, dtype=np.float64) if metric == "ip" else None
    return FaissFit(index=index, metric=metric, bank_sq=sq)


def faiss_l2_fit(bank, threads: int | None = None) -> FaissFit:
    """OpenOOD's KNN ``setup``: normalize the bank, ``faiss.IndexFlatL2(D)``, ``index.add(bank)``.

    Mirrors ``openood/postprocessors/knn_postprocessor.py`` (OpenOOD v1.5, ``KNNPostprocessor
    .setup``): ``normalizer(x) = x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-10)`` on the
    float32 penultimate features, then an exact flat L2 index holding all of them (faiss keeps
    its own copy of the bank).
    """
    return _faiss_fit(bank, "l2", threads)


def _faiss_search(fitted: FaissFit, queries, k: int, threads: int | None):
    q = _openood_normalize_np(_knn_features(queries, "queries"))
    k = _check_k_bank(k, fitted.ntotal)
    _faiss_threads(threads)
    D, idx = fitted.index.search(q, k)
    return q, D, idx


def faiss_l2_score(fitted: FaissFit, queries, k: int = 50, threads: int | None = None):
    """OpenOOD's KNN ``postprocess``: ``D, _ = index.search(normalizer(feature), K)``,
    ``conf = -D[:, -1]`` — already our convention (higher = ID, −squared L2). float32 [N]."""
    if fitted.metric != "l2":
        raise ValueError("faiss_l2_score needs a faiss_l2_fit index")
    if _features(queries, "queries").shape[0] == 0:
        return torch.empty(0, dtype=torch.float32)
    _, D, _ = _faiss_search(fitted, queries, k, threads)
    return torch.from_numpy(-D[:, -1].copy())


def faiss_l2_sweep(fitted: FaissFit, queries, ks, threads: int | None = None):
    """OpenOOD's hyperparameter sweep (APS) over K: one full ``index.search`` per k, as OpenOOD
    re-runs its postprocessor for every K of ``[50, 100, 200, 500, 1000]``. ``[N, len(ks)]``."""
    ks = list(ks)
    if not ks:
        raise ValueError("ks is empty: give at least one k")
    n = _features(queries, "queries").shape[0]
    out = torch.empty(n, len(ks), dtype=torch.float32)
    for j, k in enumerate(ks):
        out[:, j] = faiss_l2_score(fitted, queries, k, threads)
    return out


def faiss_ip_fit(bank, threads: int | None = None) -> FaissFit:
    """``faiss.IndexFlatIP`` over the OpenOOD-normalized bank: the inner-product variant many
    KNN-OOD codebases use (cosine similarity on unit vectors; e.g. the NNGuide and CIDER code),
    plus the bank's squared norms to turn the k-th similarity into our squared-L2 score."""
    return _faiss_fit(bank, "ip", threads)


def faiss_ip_score(fitted: FaissFit, queries, k: int = 50, threads: int | None = None):
    """The k-th largest inner product q̂·b̂ from ``index.search``, as the squared L2 of that
    neighbour: −(‖q̂‖² + ‖b̂_i‖² − 2 q̂·b̂_i) (float64 arithmetic on faiss's output). For unit
    vectors this is −(2 − 2 cos); the same neighbour as IndexFlatL2 finds up to ties. float32."""
    if fitted.metric != "ip":
        raise ValueError("faiss_ip_score needs a faiss_ip_fit index")
    if _features(queries, "queries").shape[0] == 0:
        return torch.empty(0, dtype=torch.float32)
    q, D, idx = _faiss_search(fitted, queries, k, threads)
    qsq = np.einsum("nd,nd->n", q, q, dtype=np.float64)
    d2 = qsq + fitted.bank_sq[idx[:, -1]] - 2.0 * D[:, -1].astype(np.float64)
    return torch.from_numpy(-np.maximum(d2, 0.0)).to(torch.float32)


@dataclass
class TorchKNNFit:
    bank: torch.Tensor  # [M, D] normalized, float32
    bank_sq: torch.Tensor  # [M] squared norms


def torch_knn_fit(bank) -> TorchKNNFit:
    """The normalized bank (OpenOOD's normalizer) and its squared norms, float32, on the bank's
    device (a CUDA bank stays on the GPU: this is the cuBLAS peer there)."""
    b = _features(bank, "bank").detach().to(torch.float32)
    if b.shape[0] == 0:
        raise ValueError("bank is empty: need >= 1 row")
    b = b / (torch.linalg.vector_norm(b, dim=1, keepdim=True) + KNN_NORM_EPS)
    return TorchKNNFit(bank=b.contiguous(), bank_sq=b.square().sum(1))


@torch.no_grad()
def torch_knn_score(fitted: TorchKNNFit, queries, k: int = 50, chunk: int = 2048):
    """The plain-torch search a practitioner writes: for chunks of ``chunk`` queries,
    ``d² = ‖q‖² + ‖b‖² − 2 q bᵀ`` (one ``addmm`` against the whole bank) and
    ``topk(k, largest=False)``; score = −(k-th smallest d²). Holds a ``chunk × M`` distance
    matrix (2048 × 50k floats = 400 MB) — exactly what a fused kernel avoids."""
    f = fitted
    q = _features(queries, "queries").detach().to(f.bank.device, torch.float32)
    k = _check_k_bank(k, f.bank.shape[0])
    q = q / (torch.linalg.vector_norm(q, dim=1, keepdim=True) + KNN_NORM_EPS)
    out = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    for s in range(0, q.shape[0], chunk):
        qc = q[s : s + chunk]
        d2 = torch.addmm(f.bank_sq[None, :], qc, f.bank.T, alpha=-2.0)
        d2 += qc.square().sum(1, keepdim=True)
        kth = d2.topk(k, dim=1, largest=False, sorted=True).values[:, -1]
        out[s : s + chunk] = -kth.clamp_(min=0.0)
    return out


@dataclass
class SklearnKNNFit:
    nn: object  # sklearn.neighbors.NearestNeighbors fitted on the normalized bank
    ntotal: int


def _pytorch_ood_normalize(z: torch.Tensor) -> torch.Tensor:
    """pytorch-ood's ``KNN._prepare``: ``z / z.norm(dim=1, keepdim=True).clamp(min=1e-12)``."""
    return z / z.norm(dim=1, keepdim=True).clamp(min=1e-12)


def sklearn_knn_fit(bank, n_jobs: int | None = -1) -> SklearnKNNFit:
    """pytorch-ood's ``KNN.fit_features``: its normalizer, then
    ``sklearn.neighbors.NearestNeighbors(n_jobs=-1).fit(bank)`` — here with
    ``algorithm="brute"`` (exact, what sklearn's "auto" picks for dense high-D features;
    pytorch-ood 0.4.0 passes no algorithm). float32 as pytorch-ood hands it over."""
    from sklearn.neighbors import NearestNeighbors

    b = _features(bank, "bank").detach().cpu().to(torch.float32)
    if b.shape[0] == 0:
        raise ValueError("bank is empty: need >= 1 row")
    nn = NearestNeighbors(algorithm="brute", n_jobs=n_jobs)
    nn.fit(_pytorch_ood_normalize(b).numpy())
    return SklearnKNNFit(nn=nn, ntotal=int(b.shape[0]))


def sklearn_knn_score(fitted: SklearnKNNFit, queries, k: int = 50) -> torch.Tensor:
    """pytorch-ood's ``KNN.predict_features``: ``dist, _ = knn.kneighbors(normalized, k)``,
    outlier score ``dist[:, -1]`` (unsquared, higher = OOD); ours is −dist². float32 [N]."""
    q = _features(queries, "queries").detach().cpu().to(torch.float32)
    k = _check_k_bank(k, fitted.ntotal)
    if q.shape[0] == 0:
        return torch.empty(0, dtype=torch.float32)
    dist, _ = fitted.nn.kneighbors(
        _pytorch_ood_normalize(q).numpy(), n_neighbors=k, return_distance=True
    )
    d = dist[:, -1].astype(np.float64)
    return torch.from_numpy(-(d * d)).to(torch.float32)


def pytorch_ood_knn(bank, queries, k: int = 50) -> torch.Tensor | None:
    """pytorch-ood's own ``KNN(None, k).fit_features(bank, zeros).predict_features(queries)``
    (sklearn brute force under the hood), converted to ours: −score². None where pytorch-ood
    cannot import."""
    if _pytorch_ood_import_error() is not None:
        return None
    from pytorch_ood.detector import KNN

    b = _features(bank, "bank").detach().cpu().to(torch.float32)
    det = KNN(None, k=int(k)).fit_features(b, torch.zeros(b.shape[0], dtype=torch.long))
    native = det.predict_features(_features(queries, "queries").detach().cpu().to(torch.float32))
    return (-(native.double() ** 2)).to(torch.float32)


# ============================================================================ quantization peers
#
# What a user would pick instead of our rotation-quantization kernels on a CPU (benchmarks only;
# none of these rotates):
#
# * torch's own int8 inference path: a dynamically quantized ``Linear``
#   (``torch.ao.quantization.quantize_dynamic``: int8 weights per tensor by default,
#   activations quantized per tensor on the fly, int32 GEMM by fbgemm or oneDNN) — fp32 in,
#   fp32 out, like our W8A8 ``QuantLinear``;
# * ``torch._int_mm`` (int8 × int8 -> int32, no dequantization epilogue);
# * a dense ``x @ H`` for the Hadamard transform.


def quantized_engines() -> tuple[str, ...]:
    """The quantized engines this torch build can run dynamic int8 Linear on (of fbgemm,
    onednn), in that order."""
    have = set(torch.backends.quantized.supported_engines)
    return tuple(e for e in ("fbgemm", "onednn") if e in have)


class _DynamicInt8Linear:
    """A dynamically quantized ``Linear`` bound to one quantized engine (the engine is a global
    setting in torch: it is set for each call and restored)."""

    def __init__(self, module, engine: str):
        self.module = module
        self.engine = engine

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        old = torch.backends.quantized.engine
        if old != self.engine:
            torch.backends.quantized.engine = self.engine
        try:
            return self.module(x)
        finally:
            if old != self.engine:
                torch.backends.quantized.engine = old


def torch_dynamic_int8_linear(weight, bias=None, engine: str = "fbgemm"):
    """torch's CPU int8 path for ``y = x Wᵀ + b`` (weight ``[N, K]``, bias ``[N]`` or None):
    ``torch.ao.quantization.quantize_dynamic`` of an ``nn.Linear`` with ``engine`` set while it
    quantizes (its weight packing is engine specific) and while it runs. Returns a callable
    ``f(x [M, K] fp32) -> [M, N] fp32``, or the reason string when the engine is missing.
    torch's defaults: weights int8 per tensor, activations quantized per tensor on the fly."""
    import warnings

    if engine not in torch.backends.quantized.supported_engines:
        return (
            f"torch {torch.__version__} has no quantized engine {engine!r} "
            f"(supported: {', '.join(torch.backends.quantized.supported_engines)})"
        )
    w = torch.as_tensor(weight).detach().to(torch.float32).cpu()
    if w.ndim != 2:
        raise ValueError(f"weight must be [N, K], got shape {tuple(w.shape)}")
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(torch.as_tensor(bias).to(torch.float32))
    old = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = engine
        with warnings.catch_warnings():  # torch.ao.quantization warns it is deprecated
            warnings.simplefilter("ignore")
            q = torch.ao.quantization.quantize_dynamic(
                torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8
            )
    except Exception as exc:
        return f"quantize_dynamic with engine {engine!r} failed ({type(exc).__name__}: {exc})"
    finally:
        torch.backends.quantized.engine = old
    return _DynamicInt8Linear(q[0], engine)


def torch_int_mm_linear(qw: torch.Tensor):
    """``torch._int_mm`` peer of an int8 GEMM: ``qx [M, K] int8 -> int32 [M, N]`` against int8
    weights ``qw [N, K]`` (transposed once here). No dequantization: a lower bound on what a
    torch user gets from the int8 GEMM alone. Returns the callable or the reason string."""
    if not hasattr(torch, "_int_mm"):
        return f"torch {torch.__version__} has no torch._int_mm"
    wt = qw.detach().t().contiguous()
    try:
        torch._int_mm(torch.zeros(32, wt.shape[0], dtype=torch.int8), wt[:, :8].contiguous())
    except Exception as exc:
        return f"torch._int_mm does not run on this device ({type(exc).__name__}: {exc})"
    return lambda qx: torch._int_mm(qx, wt)


def dense_hadamard_matrix(n: int, signs=None) -> torch.Tensor:
    """The dense orthonormal Hadamard ``diag(signs) H / sqrt(n)`` as fp32 ``[n, n]`` (from the
    one definition in ``ood_fast.reference.hadamard``): the ``x @ H`` a user without a fast
    transform writes (``torch.matmul(x, H, out=...)``)."""
    from .reference.hadamard import hadamard_matrix

    h = hadamard_matrix(n, dtype=torch.float64) / math.sqrt(n)
    if signs is not None:
        h = torch.as_tensor(signs).to(torch.float64)[:, None] * h
    return h.to(torch.float32).contiguous()
