"""Input checks shared by ops and estimators: every message names the problem and the fix."""

from __future__ import annotations

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_tensor(x, name: str = "x") -> torch.Tensor:
    """Accept a torch tensor, numpy array (memory-mapped too) or nested list; never copies a tensor."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype == np.float16 or x.dtype.kind in "fiub":
            return torch.from_numpy(np.ascontiguousarray(x))
        raise TypeError(f"{name}: unsupported numpy dtype {x.dtype}")
    try:
        return torch.as_tensor(x)
    except Exception as exc:
        raise TypeError(f"{name}: expected a tensor or array, got {type(x).__name__}") from exc


def check_features(x, name: str = "x", dim: int | None = None, finite: bool = True) -> torch.Tensor:
    """Validate a ``[N, D]`` floating feature matrix and return it as a tensor.

    Raises ValueError for a wrong rank or feature dimension and for NaN/Inf values (saying how
    many and the first offending row), TypeError for a non-floating dtype.
    """
    x = as_tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected floating features (float16/bfloat16/float32/float64), got {x.dtype}"
        )
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [N, D] matrix, got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(
            f"{name}: feature dimension mismatch: expected D={dim}, got D={x.shape[1]} "
            f"(shape {tuple(x.shape)})"
        )
    # A NaN/Inf anywhere makes the sum non-finite; the sum is ~6x cheaper than isfinite(x), and
    # only when it is not finite (NaN/Inf, or an overflow of large finite values) do we look closer.
    if (
        finite
        and x.numel()
        and not bool(
            torch.isfinite(
                x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
            )
        )
    ):
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            rows = bad.any(dim=1)
            first = int(rows.nonzero()[0, 0])
            raise ValueError(
                f"{name}: {int(bad.sum())} non-finite values (NaN/Inf) in {int(rows.sum())} rows; "
                f"first at row {first}"
            )
    return x


def check_labels(y, n: int, num_classes: int | None = None, name: str = "y") -> torch.Tensor:
    """Validate integer class labels ``[N]`` in ``[0, num_classes)``; returns int64 on CPU."""
    y = as_tensor(y, name)
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dtype.is_complex:
        raise TypeError(f"{name}: class labels must be integers, got {y.dtype}")
    y = y.reshape(-1) if y.dim() == 2 and 1 in y.shape else y
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{name}: expected {n} labels of shape [{n}], got shape {tuple(y.shape)}")
    y = y.to(torch.int64)
    if n and int(y.min()) < 0:
        raise ValueError(f"{name}: labels must be >= 0, got {int(y.min())}")
    if num_classes is not None and n and int(y.max()) >= num_classes:
        raise ValueError(
            f"{name}: label {int(y.max())} out of range for {num_classes} classes [0, {num_classes})"
        )
    return y


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {k: t.device for k, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"tensors on different devices: {listing}; move them to one device")
    return next(iter(devices.values()), torch.device("cpu"))
