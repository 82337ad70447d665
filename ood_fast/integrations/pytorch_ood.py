"""Drop-in replacements for pytorch-ood's ``Mahalanobis``, ``RMD`` and ``KNN`` detectors, on ood_fast.

::

    from ood_fast.integrations.pytorch_ood import Mahalanobis, RMD   # instead of pytorch_ood.detector
    det = Mahalanobis(encoder).fit(train_loader)     # or .fit_features(z, y)
    scores = det(x)                                  # or .predict_features(z); higher = more OOD

The classes subclass ``pytorch_ood.detector.Mahalanobis`` / ``RMD`` (so ``isinstance`` checks,
``fit(loader)``, ``predict(x)``, ``__call__``, ``to(device)``, ``n_classes`` and the metadata keep
working) and override ``fit_features`` / ``predict_features`` to run on ``ood_fast.Mahalanobis``
/ ``ood_fast.RelativeMahalanobis`` (tied covariance): one whitening GEMM and one distance GEMM per
batch instead of pytorch-ood's per-class loop.

**Same numbers, not only the same ranking.** pytorch-ood's covariance is the *sum* of the centred
outer products (not divided by N) plus 1e-6·I, and its Mahalanobis score is *half* the squared
distance: ``½ · min_c (z − μ_c)ᵀ (Σ_sum + 1e-6 I)⁻¹ (z − μ_c)``, higher = more OOD. Ours uses the
maximum-likelihood covariance Σ = Σ_sum / N, so we return ``min_c d²_c / (2N)`` (and for RMD
``min_c (d²_c − d²_0) / N``), which equals pytorch-ood's value up to its ridge: relative
differences of order 1e-6 / (N · λ_min(Σ)), far below float32 resolution unless the covariance is
(near) singular. There the two differ by design: pytorch-ood's inverse is dominated by its
ridge; ood_fast factors a singular covariance by eigendecomposition with clipped eigenvalues
and warns (use ``shrinkage=`` to regularize). Ranking (and so AUROC) is identical otherwise.

The fitted attributes of the upstream classes are provided: ``mu`` (float32 class means),
and, computed on first access because a D×D inverse is exactly what we avoid, ``cov``
(= N·Σ + 1e-6·I, pytorch-ood's definition) and ``precision`` (its inverse); for RMD also
``background_mu``, ``background_cov``, ``background_precision``.

``KNN`` subclasses ``pytorch_ood.detector.KNN`` (same constructor, same sign and values:
pytorch-ood's unsquared distance ``‖z − z_(k)‖`` of its normalized features, higher = more OOD,
float64 like pytorch-ood's) and searches with ``ood_fast.KNN`` instead of sklearn brute force:
``fit_features`` keeps the normalized bank once (the upstream ``self.knn`` NearestNeighbors is left
unfitted, so the bank is not held twice), and fitting again on the very same feature tensor (what
``pytorch_ood.utils.GridSearch`` does for every candidate k) reuses it, so a sweep over k costs
only the searches; setting ``k`` (or its alias ``n_neighbors``) on a fitted detector just changes
the k used at predict. ``predict_features_sweep(z, ks)`` scores several k in one pass.

Importing this module raises ImportError when pytorch-ood cannot be imported (pytorch-ood 0.4.0
needs a torchvision that matches the installed torch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

try:
    import pytorch_ood.detector as _pod
    from pytorch_ood.api import RequiresFittingException
except Exception as _exc:  # ImportError, or torchvision failing to load next to this torch
    raise ImportError(
        "ood_fast.integrations.pytorch_ood needs pytorch-ood (`pip install pytorch-ood`), "
        f"which could not be imported here: {type(_exc).__name__}: {_exc}. pytorch-ood imports "
        "torchvision at import time, so torchvision must be installed and match torch."
    ) from _exc

__all__ = ["Mahalanobis", "RMD", "KNN"]

_RIDGE = 1e-6  # pytorch-ood's ridge on the summed covariance


def _check_labels(y: Tensor) -> int:
    """pytorch-ood's contract: labels 0..C-1, all present, no OOD (negative) labels."""
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TypeError(f"y: class labels must be integers, got {y.dtype}")
    if y.numel() == 0:
        raise ValueError("fit_features: no samples")
    if bool((y < 0).any()):
        raise ValueError(
            "y: OOD samples (labels < 0) are not supported when fitting, as in pytorch-ood"
        )
    classes = torch.unique(y)
    C = int(classes.max()) + 1
    if classes.numel() != C:
        raise ValueError(
            f"y: classes must be contiguous 0..{C - 1} and all occur (as in pytorch-ood)"
        )
    return C


def _pool(z: Tensor) -> Tensor:
    """pytorch-ood's ``predict_features``: feature maps [B, C, ...] are averaged to [B, C]."""
    return z if z.dim() == 2 else z.reshape(z.size(0), z.size(1), -1).mean(2)


def _cached_summed_covariance(slot: str, estimator_attr: str) -> property:
    """A settable property: pytorch-ood's summed covariance ``[D, D]`` of the fitted estimator's
    ``estimator_attr``, computed on first read and kept in ``slot`` (None before fitting).
    Read through ``__dict__``: upstream ``__init__`` assigns these before ours set ``_estimator``."""

    def get(self) -> Tensor | None:
        c = self.__dict__.get(slot)
        if c is None and self.__dict__.get("_estimator") is not None:
            c = self._summed(getattr(self._estimator, estimator_attr))
            setattr(self, slot, c)
        return c

    def set_(self, value):
        setattr(self, slot, value)

    return property(get, set_)


def _cached_inverse(slot: str, cov_attr: str) -> property:
    """A settable property: the inverse ``[D, D]`` of the property ``cov_attr``, computed on
    first read (a D×D inverse: only when asked) and kept in ``slot``."""

    def get(self) -> Tensor | None:
        p = self.__dict__.get(slot)
        if p is None:
            cov = getattr(self, cov_attr)
            if cov is not None:
                p = torch.linalg.inv(cov)
                setattr(self, slot, p)
        return p

    def set_(self, value):
        setattr(self, slot, value)

    return property(get, set_)


class _OodFastMixin:
    """Shared constructor and state handling; the estimator class and the score conversion
    differ. First in the bases, before the pytorch-ood detector it stands in for."""

    _estimator_name = "Mahalanobis"

    def __init__(
        self,
        encoder: Callable[[Tensor], Tensor] | None,
        *,
        backend: str | None = None,
        precision: str = "fp32",
    ):
        super().__init__(encoder)  # the pytorch-ood detector's own state
        self._fast_backend = backend
        self._fast_precision = precision
        self._estimator = None
        self._n_train = None

    def _fit_estimator(self, z: Tensor, y: Tensor):
        import ood_fast

        device = self.device or z.device
        z = z.detach().to(device)
        y = y.to(device)
        if z.dim() != 2:
            raise ValueError(f"z: expected features of shape [N, D], got {tuple(z.shape)}")
        C = _check_labels(y)
        cls = getattr(ood_fast, self._estimator_name)
        est = cls(
            covariance="tied",
            num_classes=C,
            backend=self._fast_backend,
            precision=self._fast_precision,
        ).fit(z, y)
        self._estimator = est
        self._n_train = int(est.counts_.sum())
        self.mu = est.means_.to(device=device, dtype=torch.float32)
        self._cov = None
        self._precision = None
        return est

    # pytorch-ood's upstream attributes, computed on demand (D×D inverse: only when asked)
    cov = _cached_summed_covariance("_cov", "covariance_")
    precision = _cached_inverse("_precision", "cov")

    def _summed(self, cov64: Tensor) -> Tensor:
        """pytorch-ood's covariance from our MLE one: N·Σ + 1e-6·I, float32 on mu's device."""
        eye = torch.eye(cov64.shape[-1], dtype=cov64.dtype, device=cov64.device)
        c = cov64 * self._n_train + _RIDGE * eye
        return c.to(device=self.mu.device, dtype=torch.float32)


class Mahalanobis(_OodFastMixin, _pod.Mahalanobis):
    """``pytorch_ood.detector.Mahalanobis`` on ood_fast: same constructor, fit/predict surface and
    sign (higher = more OOD) and the same values (see the module docstring).

    :param encoder: feature encoder mapping inputs to ``[B, D]`` features; ``None`` when only
        ``fit_features`` / ``predict_features`` are used.
    :param backend: ood_fast backend (keyword only; None = automatic).
    :param precision: ``"fp32"`` or ``"bf16"`` scoring GEMMs (keyword only).
    """

    _estimator_name = "Mahalanobis"

    def fit_features(self, z: Tensor, y: Tensor):
        """Fit the class means and the shared covariance on features ``[N, D]`` and labels ``[N]``
        (contiguous 0..C−1, all present). Returns self."""
        self._fit_estimator(z, y)
        return self

    @torch.no_grad()
    def predict_features(self, z: Tensor) -> Tensor:
        """Outlier scores ``[B]`` = ½ min_c d²_c on pytorch-ood's summed-covariance scale."""
        if self.mu is None or self._estimator is None:
            raise RequiresFittingException
        s = self._estimator.score(_pool(z))  # −min d² (MLE), float32
        return s * (-0.5 / self._n_train)


class RMD(_OodFastMixin, _pod.RMD):
    """``pytorch_ood.detector.RMD`` on ood_fast: same constructor, surface, sign and values.

    Score ``min_c (d²_c − d²_0)`` on pytorch-ood's summed-covariance scale (÷N of the MLE scale),
    with the class-agnostic background Gaussian fitted on all training features.
    """

    _estimator_name = "RelativeMahalanobis"

    def fit_features(self, z: Tensor, y: Tensor):
        """Fit the class Gaussians and the background Gaussian. Returns self."""
        est = self._fit_estimator(z, y)
        self.background_mu = est.background_mean_.to(device=self.mu.device, dtype=torch.float32)
        self._bg_cov = None
        self._bg_precision = None
        return self

    background_cov = _cached_summed_covariance("_bg_cov", "background_covariance_")
    background_precision = _cached_inverse("_bg_precision", "background_cov")

    @torch.no_grad()
    def predict_features(self, z: Tensor) -> Tensor:
        """Relative Mahalanobis scores ``[B]``, higher = more OOD."""
        if self.mu is None or self._estimator is None:
            raise RequiresFittingException
        s = self._estimator.score(_pool(z))  # −(min d²_c − d²_0) (MLE), float32
        return s * (-1.0 / self._n_train)


# ---------------------------------------------------------------------------------------------
# KNN
# ---------------------------------------------------------------------------------------------


def _euclidean(knn_kwargs: dict) -> bool:
    """True when pytorch-ood's NearestNeighbors would measure plain Euclidean distances (its
    default ``metric="minkowski", p=2``): the case ood_fast computes. The neighbour-search
    options (``algorithm``, ``leaf_size``, ``n_neighbors``, ``radius``) do not change exact
    k-th distances and are accepted."""
    metric = knn_kwargs.get("metric", "minkowski")
    if knn_kwargs.get("metric_params"):
        return False
    if metric in ("euclidean", "l2"):
        return True
    return metric == "minkowski" and float(knn_kwargs.get("p", 2)) == 2.0


def _tensor_key(t: Tensor) -> tuple:
    """What identifies a tensor's current contents without reading them: the object itself (a
    weak reference), its in-place version counter, storage pointer, shape, strides, dtype."""
    import weakref

    return (
        weakref.ref(t),
        t._version,
        t.data_ptr(),
        tuple(t.shape),
        t.stride(),
        t.dtype,
        str(t.device),
    )


def _same_tensor(key, t: Tensor) -> bool:
    return key is not None and key[0]() is t and key[1:] == _tensor_key(t)[1:]


class KNN(_pod.KNN):
    """``pytorch_ood.detector.KNN`` on ood_fast: same constructor, fit/predict surface, sign
    (higher = more OOD) and values (the unsquared Euclidean distance of the normalized feature to
    its k-th nearest normalized training feature, float64), with an exact search by
    ``ood_fast.KNN`` (fused distance + top-k kernels where built) instead of sklearn's.

    :param encoder: feature encoder; ``None`` when only ``fit_features`` / ``predict_features``
        are used.
    :param k: the neighbour whose distance is the score; may be changed after fitting (also as
        ``n_neighbors``) without re-fitting.
    :param normalize: pytorch-ood's normalization ``z / max(‖z‖, 1e-12)`` (applied here exactly
        as upstream, before the bank is handed to ood_fast).
    :param knn_kwargs: pytorch-ood's ``NearestNeighbors`` options. With a non-Euclidean
        ``metric`` (or ``p`` ≠ 2, ``metric_params``) the detector falls back to pytorch-ood's
        own sklearn search (``uses_ood_fast`` is then False).
    :param backend: ood_fast backend (keyword only; None = automatic).
    :param bank_dtype: ``torch.bfloat16``/``torch.float16`` store the bank at half the memory;
        scores stay exact (keyword only; None = float32).
    """

    def __init__(
        self,
        encoder: Callable[[Tensor], Tensor] | None,
        k: int = 50,
        normalize: bool = True,
        *,
        backend: str | None = None,
        bank_dtype=None,
        **knn_kwargs,
    ):
        super().__init__(encoder, k=k, normalize=normalize, **knn_kwargs)
        self.uses_ood_fast = _euclidean(knn_kwargs)
        self._fast_backend = backend
        self._fast_bank_dtype = bank_dtype
        self._fast = None  # ood_fast.KNN holding the normalized bank
        self._fit_key = None  # (features key, labels key, normalize) of the last fit

    # pytorch-ood reads ``self.k``; sklearn users know the same knob as ``n_neighbors``
    @property
    def n_neighbors(self) -> int:
        return self.k

    @n_neighbors.setter
    def n_neighbors(self, value: int):
        self.k = value

    @property
    def n_samples_fit_(self) -> int | None:
        """Rows of the bank (ID samples of the last fit), or None before fitting."""
        return None if self._fast is None else self._fast.n_samples_

    def fit_features(self, z: Tensor, labels: Tensor):
        """Keep the ID features (labels >= 0), normalized, as the bank. Fitting again on the same
        ``z`` and ``labels`` tensors, unchanged since (same objects, no in-place edits), reuses
        the bank. Returns self.

        :raises ValueError: no ID samples, or fewer than ``k`` of them (as pytorch-ood)
        """
        if not self.uses_ood_fast:
            return super().fit_features(z, labels)
        from pytorch_ood.utils import is_known

        import ood_fast

        labels = torch.as_tensor(labels)
        key = (
            (_tensor_key(z), _tensor_key(labels), self.normalize) if isinstance(z, Tensor) else None
        )
        if (
            key is not None
            and self._fit_key is not None
            and self._fast is not None
            and _same_tensor(self._fit_key[0], z)
            and _same_tensor(self._fit_key[1], labels)
            and self._fit_key[2] == self.normalize
        ):
            n_known = self._fast.n_samples_
            if n_known < self.k:
                raise ValueError(f"k={self.k} exceeds the number of ID samples ({n_known})")
            self._is_fitted = True
            return self
        known = is_known(labels)
        if not known.any():
            raise ValueError("No ID samples")
        n_known = int(known.sum())
        if n_known < self.k:
            raise ValueError(f"k={self.k} exceeds the number of ID samples ({n_known})")
        z = torch.as_tensor(z).detach()
        bank = self._prepare(z[known.to(z.device)])  # boolean indexing copies: no aliasing
        device = self.device or bank.device
        est = ood_fast.KNN(
            k=min(self.k, n_known),
            normalize=False,
            squared=False,
            backend=self._fast_backend,
            bank_dtype=self._fast_bank_dtype,
        ).fit(bank.to(device))
        self._fast, self._fit_key = est, key
        self._is_fitted = True
        return self

    def _search(self, z: Tensor, ks) -> Tensor:
        if not self._is_fitted:
            raise RequiresFittingException()
        q = self._prepare(torch.as_tensor(z).detach())
        return self._fast.score_sweep(q, ks)  # −‖q − b_(k)‖, [B, len(ks)] float32

    @torch.no_grad()
    def predict_features(self, z: Tensor) -> Tensor:
        """
        :param z: features of shape :math:`B \\times D`
        :return: outlier scores of shape :math:`B` (float64): the distance to the k-th nearest
            normalized training feature, higher = more OOD
        :raises RequiresFittingException: if the detector was not fitted
        """
        if not self.uses_ood_fast:
            return super().predict_features(z)
        device = self.device or z.device
        d = -self._search(z, [int(self.k)])[:, 0]
        return d.to(device=device, dtype=torch.float64)

    @torch.no_grad()
    def predict_features_sweep(self, z: Tensor, ks) -> Tensor:
        """Outlier scores ``[B, len(ks)]`` (float64) for several k at once, in one pass over the
        bank: column j equals ``predict_features(z)`` with ``k = ks[j]``."""
        ks = [int(k) for k in ks]
        if not self.uses_ood_fast:
            old = self.k
            try:
                cols = []
                for k in ks:
                    self.k = k
                    cols.append(super().predict_features(z))
                return torch.stack(cols, dim=1)
            finally:
                self.k = old
        device = self.device or z.device
        return (-self._search(z, ks)).to(device=device, dtype=torch.float64)

    def to(self, device):
        """Move the encoder (as pytorch-ood) and the bank to ``device``. Returns self."""
        super().to(device)
        if self._fast is not None:
            self._fast.to(device)
        return self

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fit_key"] = None  # weak references do not pickle; a reload re-fits on demand
        return state
