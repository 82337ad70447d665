"""Functional ops: one function per hot path. Each validates its inputs, then dispatches
through the backend registry (``ood_fast._backend``) to C++, Triton, CUDA or the torch reference.
"""

from .knn import knn, kth_distance, prototype_scores
from .mahalanobis import MahalanobisPlan, MinResult, mahalanobis, mahalanobis_plan

__all__ = [
    "MahalanobisPlan",
    "MinResult",
    "knn",
    "kth_distance",
    "mahalanobis",
    "mahalanobis_plan",
    "prototype_scores",
]
