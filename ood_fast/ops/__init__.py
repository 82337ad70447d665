"""Functional ops: one function per hot path. Each validates its inputs, then dispatches
through the backend registry (``ood_fast._backend``) to C++, Triton, CUDA or the torch reference.
"""

from .hadamard import HadamardRotation, hadamard, random_hadamard
from .knn import knn, kth_distance, prototype_scores
from .mahalanobis import MahalanobisPlan, MinResult, mahalanobis, mahalanobis_plan
from .quant import QuantizedTensor, dequantize, int8_linear, quantize_weight, rotate_quantize

__all__ = [
    "HadamardRotation",
    "MahalanobisPlan",
    "MinResult",
    "QuantizedTensor",
    "dequantize",
    "hadamard",
    "int8_linear",
    "knn",
    "kth_distance",
    "mahalanobis",
    "mahalanobis_plan",
    "prototype_scores",
    "quantize_weight",
    "random_hadamard",
    "rotate_quantize",
]
