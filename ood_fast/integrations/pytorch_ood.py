"""Drop-in replacements for pytorch-ood's ``Mahalanobis`` and ``RMD`` detectors, on ood_fast.

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

__all__ = ["Mahalanobis", "RMD"]

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


class _OodFastMixin:
    """Shared state handling; the estimator class and the score conversion differ."""

    _estimator_name = "Mahalanobis"

    def _init_fast(self, backend, precision):
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
    @property
    def cov(self) -> Tensor | None:
        c = self.__dict__.get("_cov")
        if c is None and self.__dict__.get("_estimator") is not None:
            est = self._estimator
            c = self._summed(est.covariance_)
            self._cov = c
        return c

    @cov.setter
    def cov(self, value):
        self._cov = value

    @property
    def precision(self) -> Tensor | None:
        p = self.__dict__.get("_precision")
        if p is None and self.cov is not None:
            p = torch.linalg.inv(self.cov)
            self._precision = p
        return p

    @precision.setter
    def precision(self, value):
        self._precision = value

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

    def __init__(
        self,
        encoder: Callable[[Tensor], Tensor] | None,
        *,
        backend: str | None = None,
        precision: str = "fp32",
    ):
        super().__init__(encoder)
        self._init_fast(backend, precision)

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

    def __init__(
        self,
        encoder: Callable[[Tensor], Tensor] | None,
        *,
        backend: str | None = None,
        precision: str = "fp32",
    ):
        super().__init__(encoder)
        self._init_fast(backend, precision)

    def fit_features(self, z: Tensor, y: Tensor):
        """Fit the class Gaussians and the background Gaussian. Returns self."""
        est = self._fit_estimator(z, y)
        self.background_mu = est.background_mean_.to(device=self.mu.device, dtype=torch.float32)
        self._bg_cov = None
        self._bg_precision = None
        return self

    @property
    def background_cov(self) -> Tensor | None:
        c = self.__dict__.get("_bg_cov")
        if c is None and self.__dict__.get("_estimator") is not None:
            c = self._summed(self._estimator.background_covariance_)
            self._bg_cov = c
        return c

    @background_cov.setter
    def background_cov(self, value):
        self._bg_cov = value

    @property
    def background_precision(self) -> Tensor | None:
        p = self.__dict__.get("_bg_precision")
        if p is None and self.background_cov is not None:
            p = torch.linalg.inv(self.background_cov)
            self._bg_precision = p
        return p

    @background_precision.setter
    def background_precision(self, value):
        self._bg_precision = value

    @torch.no_grad()
    def predict_features(self, z: Tensor) -> Tensor:
        """Relative Mahalanobis scores ``[B]``, higher = more OOD."""
        if self.mu is None or self._estimator is None:
            raise RequiresFittingException
        s = self._estimator.score(_pool(z))  # −(min d²_c − d²_0) (MLE), float32
        return s * (-1.0 / self._n_train)
