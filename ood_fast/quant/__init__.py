"""Rotation quantization of models: calibration statistics, rotations, quantized layers.

Calibration (``ood_fast.quant.calibration``): ``CovarianceAccumulator``, ``klt_rotation``,
``AbsMaxObserver``, ``PercentileObserver``, ``smooth_scales``.
Layers and models: ``QuantLinear`` / ``quantize_linear`` (``linear``), the plain-torch Mamba-1
LM (``mamba``: ``MambaConfig``, ``MambaLM``, ``MambaMixer``, ``MambaBlock``, ``RMSNorm``,
``selective_scan``, ``random_mamba``) and ``quantize_mamba`` (``transforms``).
Persistence (``io``): ``save_quantized(model, path)`` / ``load_quantized(path)``, safetensors
plus a JSON header, no pickle, bit-identical forward after reload.
"""

from .calibration import (
    AbsMaxObserver,
    CovarianceAccumulator,
    PercentileObserver,
    klt_rotation,
    smooth_scales,
)
from .io import load_quantized, save_quantized
from .linear import QuantLinear, quantize_linear
from .mamba import (
    MambaBlock,
    MambaConfig,
    MambaLM,
    MambaMixer,
    RMSNorm,
    random_mamba,
    selective_scan,
)
from .transforms import METHODS, quantize_mamba

__all__ = [
    "AbsMaxObserver",
    "CovarianceAccumulator",
    "METHODS",
    "MambaBlock",
    "MambaConfig",
    "MambaLM",
    "MambaMixer",
    "PercentileObserver",
    "QuantLinear",
    "RMSNorm",
    "klt_rotation",
    "load_quantized",
    "quantize_linear",
    "quantize_mamba",
    "random_mamba",
    "save_quantized",
    "selective_scan",
    "smooth_scales",
]
