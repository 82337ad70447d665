"""Reference rotate-and-quantize, dequantize, weight quantization and int8 linear.

This is the truth the compiled backends of ``ood_fast.ops.rotate_quantize`` / ``int8_linear``
are tested against, and their ``torch`` backend. Formulas (docs/QUANT_CONTRACT.md):

* rotation: ``x' = x / smooth`` (fp32), ``y = hadamard(x' · signs) / sqrt(n)`` (fp32), or
  ``y = x' @ R`` for a dense R (fp32 matmul), or ``y = x'``.
* symmetric, ``qmax = 2^(bits−1) − 1``: ``scale = absmax(y) / qmax`` (fp32 division; absmax over
  a token row or the whole tensor), ``codes = clamp(rint(y / scale), −qmax, qmax)`` int8, where
  ``/`` is the IEEE fp32 division and rint rounds half to even; ``scale == 0`` gives codes 0.
  A static scale replaces ``absmax / qmax``; the codes saturate at ±qmax.
* asymmetric, ``levels = 2^bits − 1``: ``lo = min(min y, 0)``, ``hi = max(max y, 0)``,
  ``scale = (hi − lo) / levels``, ``zero = clamp(rint(−lo / scale), 0, levels)`` int32,
  ``codes = clamp(rint(y / scale) + zero, 0, levels)`` uint8; ``scale == 0`` gives codes 0 and
  zero 0.
* ``int8_linear``: ``out[m, n] = sx[m] · sw[n] · Σ_k (qx[m, k] − zx[m]) · qw[n, k] + bias[n]``
  with the sum exact (here a float64 GEMM of integers: |terms| ≤ 255·127 and K < 2^37 keep every
  partial sum an exact integer) and the dequantization in fp32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .hadamard import HadamardRotation, hadamard

GRANULARITIES = ("per_token", "per_tensor")


class QuantizedTensor(NamedTuple):
    """Quantized activations from ``rotate_quantize``.

    codes: int8 (symmetric) or uint8 (asymmetric) ``[..., n]``.
    scale: float32, ``[...]`` (the leading shape; per token) or ``[]`` (per tensor).
    zero_point: int32 shaped like ``scale``, or None when symmetric.
    bits: code width (2..8); symmetric: whether codes are signed around 0.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    symmetric: bool


def qmax_of(bits: int, symmetric: bool) -> int:
    """Largest code: ``2^(bits−1) − 1`` (symmetric) or ``2^bits − 1`` (asymmetric)."""
    return (1 << (bits - 1)) - 1 if symmetric else (1 << bits) - 1


def rotate(
    x: torch.Tensor,
    rotation: HadamardRotation | str | torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y`` (float32, x's shape) before quantization: smoothing, then the rotation."""
    y = x.to(torch.float32)
    if smooth is not None:
        y = y / smooth.to(device=x.device, dtype=torch.float32)
    if rotation is None:
        return y
    if isinstance(rotation, str):
        if rotation != "hadamard":
            raise ValueError(f"rotation: unknown spec {rotation!r}; expected 'hadamard'")
        return hadamard(y)
    if isinstance(rotation, HadamardRotation):
        return hadamard(y, signs=rotation.signs)
    return y @ rotation.to(device=x.device, dtype=torch.float32)


def quantize(
    y: torch.Tensor,
    per_token: bool = True,
    symmetric: bool = True,
    static_scale: float | None = None,
    bits: int = 8,
) -> QuantizedTensor:
    """Quantize float32 ``y [..., n]`` by the formulas in the module docstring."""
    y = y.to(torch.float32)
    lead = y.shape[:-1]
    if per_token:
        rows = y.reshape(-1, y.shape[-1]) if y.dim() else y.reshape(1, 1)
        if rows.shape[-1] == 0:
            ymin = ymax = torch.zeros(rows.shape[0], dtype=torch.float32, device=y.device)
        else:
            ymin, ymax = rows.amin(dim=1), rows.amax(dim=1)
        ymin, ymax = ymin.reshape(lead), ymax.reshape(lead)
        bcast = (..., None)  # scale [...] against y [..., n]
    else:
        if y.numel() == 0:
            ymin = ymax = torch.zeros((), dtype=torch.float32, device=y.device)
        else:
            ymin, ymax = y.amin(), y.amax()
        bcast = (...,)
    if symmetric:
        qmax = qmax_of(bits, True)
        if static_scale is not None:
            scale = torch.full_like(ymax, float(static_scale))
        else:
            absmax = torch.maximum(ymax.abs(), ymin.abs())
            scale = absmax / qmax
        s = scale[bcast]
        q = torch.round(y / torch.where(s == 0, torch.ones_like(s), s)).clamp_(-qmax, qmax)
        q = torch.where(s == 0, torch.zeros_like(q), q)
        return QuantizedTensor(q.to(torch.int8), scale, None, bits, True)
    levels = qmax_of(bits, False)
    lo = torch.clamp(ymin, max=0.0)
    hi = torch.clamp(ymax, min=0.0)
    scale = (hi - lo) / levels
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.round(-lo / safe).clamp_(0, levels)
    zero = torch.where(scale == 0, torch.zeros_like(zero), zero)
    s, z = safe[bcast], zero[bcast]
    q = (torch.round(y / s) + z).clamp_(0, levels)
    q = torch.where(scale[bcast] == 0, torch.zeros_like(q), q)
    return QuantizedTensor(q.to(torch.uint8), scale, zero.to(torch.int32), bits, False)


def rotate_quantize(
    x: torch.Tensor,
    rotation: HadamardRotation | str | torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    granularity: str = "per_token",
    symmetric: bool = True,
    static_scale: float | None = None,
    bits: int = 8,
) -> QuantizedTensor:
    """Reference of ``ood_fast.ops.rotate_quantize`` (no validation; see the module docstring)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    y = rotate(x, rotation, smooth)
    return quantize(y, granularity == "per_token", symmetric, static_scale, bits)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """``(codes − zero_point) · scale`` in float32, ``[..., n]``."""
    codes = q.codes.to(torch.float32)
    scale = q.scale.to(torch.float32)
    if q.zero_point is not None:
        zero = q.zero_point.to(torch.float32)
        codes = codes - (zero[..., None] if scale.dim() else zero)
    return codes * (scale[..., None] if scale.dim() else scale)


def _row_quantile(a: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of each row of ``a [N, K]`` (linear interpolation, as numpy's default)."""
    K = a.shape[1]
    pos = q * (K - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, K - 1)
    frac = pos - lo
    s = torch.sort(a, dim=1).values
    return s[:, lo] + (s[:, hi] - s[:, lo]) * frac


def quantize_weight(
    w: torch.Tensor, bits: int = 8, percentile: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel weight quantization.

    Args:
        w: ``[N, K]`` floating weights (quantized in float32).
        bits: 2..8; ``qmax = 2^(bits−1) − 1``.
        percentile: None (clip at the row's absmax) or a fraction in (0, 1]: clip at that
            quantile of the row's |w| (linear interpolation), values beyond saturate.

    Returns:
        ``(qw int8 [N, K], sw float32 [N])`` with ``w ≈ qw · sw[:, None]``; all-zero rows give
        sw = 0 and codes 0.
    """
    w = w.to(torch.float32)
    qmax = qmax_of(bits, True)
    a = w.abs()
    if w.shape[1] == 0:
        clip = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
    elif percentile is None:
        clip = a.amax(dim=1)
    else:
        clip = _row_quantile(a, float(percentile))
    sw = clip / qmax
    s = sw[:, None]
    qw = torch.round(w / torch.where(s == 0, torch.ones_like(s), s)).clamp_(-qmax, qmax)
    qw = torch.where(s == 0, torch.zeros_like(qw), qw)
    return qw.to(torch.int8), sw


def int8_linear(
    qx: torch.Tensor,
    sx: torch.Tensor,
    qw: torch.Tensor,
    sw: torch.Tensor,
    bias: torch.Tensor | None = None,
    zx: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``sx[m] · sw[n] · Σ_k (qx[m, k] − zx[m]) · qw[n, k] + bias[n]`` → ``[M, N]`` out_dtype.

    qx ``[M, K]`` int8/uint8, sx fp32 ``[M]``, zx int32 ``[M]`` or None, qw int8 ``[N, K]``,
    sw fp32 ``[N]``, bias ``[N]`` or None. The integer sum is exact (float64 GEMM of integers);
    the epilogue is fp32: ``(acc · sx[m]) · sw[n] + bias[n]``.
    """
    a = qx.to(torch.float64)
    if zx is not None:
        a = a - zx.to(device=qx.device, dtype=torch.float64)[:, None]
    acc = a @ qw.to(torch.float64).T  # exact: every partial sum is an integer below 2^53
    out = acc.to(torch.float32) * sx.to(torch.float32)[:, None] * sw.to(torch.float32)[None, :]
    if bias is not None:
        out = out + bias.to(torch.float32)[None, :]
    return out.to(out_dtype)
