"""Rotation quantization of models: calibration statistics, rotations, quantized layers.

Calibration (``ood_fast.quant.calibration``): ``CovarianceAccumulator``, ``klt_rotation``,
``AbsMaxObserver``, ``PercentileObserver``, ``smooth_scales``.
"""

from .calibration import (
    AbsMaxObserver,
    CovarianceAccumulator,
    PercentileObserver,
    klt_rotation,
    smooth_scales,
)

__all__ = [
    "AbsMaxObserver",
    "CovarianceAccumulator",
    "PercentileObserver",
    "klt_rotation",
    "smooth_scales",
]
