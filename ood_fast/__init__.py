"""ood_fast: compiled kernels for the hot paths of feature-space OOD detection.

Importing this package never imports a compiled extension or Triton; they load on first use.
"""

from . import ops
from ._backend import BACKENDS, BackendUnavailable, use_backend
from ._io import load
from .detectors.knn import KNN
from .detectors.mahalanobis import (
    GaussianLikelihood,
    Mahalanobis,
    MultiLayerMahalanobis,
    RelativeMahalanobis,
)
from .detectors.prototypes import Prototypes

__version__ = "0.1.0"
__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "GaussianLikelihood",
    "KNN",
    "Mahalanobis",
    "MultiLayerMahalanobis",
    "Prototypes",
    "RelativeMahalanobis",
    "load",
    "ops",
    "use_backend",
    "__version__",
]
