"""Fit/score estimators, one module per family; they call ``ood_fast.ops``, never a backend."""

from .mahalanobis import (
    GaussianLikelihood,
    GaussianStats,
    Mahalanobis,
    MultiLayerMahalanobis,
    NotFittedError,
    RelativeMahalanobis,
)

__all__ = [
    "GaussianLikelihood",
    "GaussianStats",
    "Mahalanobis",
    "MultiLayerMahalanobis",
    "NotFittedError",
    "RelativeMahalanobis",
]
