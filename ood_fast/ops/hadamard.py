"""The Hadamard transform along the last dimension: the online rotation of rotation quantization.

Math (all backends; ``reference.hadamard`` holds the one definition of every matrix):
``hadamard(x)[..., j] = scale · Σ_i (x[..., i] · signs[i]) · H_n[i, j]``, i.e. ``x @ H_n`` with
row vectors, ``H_n = H_K ⊗ S_{2^p}``, ``n = K · 2^p``, ``K ∈ {1, 12, 20, 28}`` (40·2^m runs as
20·2^(m+1)). ``scale=None`` means ``1/sqrt(n)``: an orthonormal, self-inverse-up-to-transpose
rotation. Arithmetic in fp32 (fp64 input: torch backend, fp64 arithmetic).

Public entry points: ``hadamard``, ``random_hadamard``, ``HadamardRotation``.
"""

from __future__ import annotations

import math
import numbers

import torch

from .. import _backend
from .. import _extensions as ext
from .._validate import as_tensor
from ..reference import hadamard as ref
from ..reference.hadamard import FORMS, HadamardRotation, factorize, random_hadamard

__all__ = ["FORMS", "HadamardRotation", "factorize", "hadamard", "random_hadamard"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_CODE = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def scan_finite(x: torch.Tensor, name: str) -> None:
    """ValueError when x holds NaN/Inf (one cheap reduction; a closer look only on failure)."""
    if not x.numel():
        return
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(x.sum(dtype=acc))):
        return
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name}: {int(bad.sum())} non-finite values (NaN/Inf); first at index {first}"
        )


def check_rows(x, name: str, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """x as a tensor ``[..., n]`` (at least 1-D) of one of ``dtypes``."""
    x = as_tensor(x, name)
    if x.dtype not in dtypes:
        listing = "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected a {listing} tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name}: expected shape [..., n] (at least 1-D), got a scalar")
    return x


def check_signs(signs, n: int, device) -> torch.Tensor | None:
    """signs as float32 ``[n]`` of ±1 on ``device``, or None."""
    if signs is None:
        return None
    signs = as_tensor(signs, "signs")
    if signs.shape != (n,):
        raise ValueError(f"signs: expected shape [{n}], got {tuple(signs.shape)}")
    if signs.device != torch.device(device):
        raise ValueError(f"signs is on {signs.device} but x is on {device}; move it to x's device")
    if ref.is_validated_signs(signs):  # a HadamardRotation's own (fp32, contiguous, ±1)
        return signs
    signs = signs.to(torch.float32).contiguous()
    if not bool((signs.abs() == 1).all()):
        raise ValueError("signs: every entry must be +1 or -1")
    return signs


def check_out(out, like_shape, dtype, device, name: str = "out") -> torch.Tensor:
    """An output buffer: a contiguous tensor of the given shape, dtype and device."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(like_shape) or out.dtype != dtype:
        raise ValueError(
            f"{name}: expected shape {tuple(like_shape)} and dtype {dtype}, "
            f"got {tuple(out.shape)} {out.dtype}"
        )
    if out.device != torch.device(device):
        raise ValueError(f"{name} is on {out.device}, expected {device}")
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return out


def hadamard(
    x: torch.Tensor,
    scale: float | None = None,
    *,
    signs: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    check_finite: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """``scale · (x · signs) @ H_n`` along the last dimension.

    Args:
        x: ``[..., n]`` float32/float16/bfloat16 (float64: torch backend only), n one of
            2^m, 12·2^m, 20·2^m, 28·2^m, 40·2^m. Any leading shape (flattened to rows).
        scale: a finite number, or None for ``1/sqrt(n)`` (orthonormal).
        signs: ``[n]`` ±1 on x's device (a random-sign rotation), or None.
        out: a contiguous tensor of x's shape, dtype and device to write into (may be x itself:
            in place); None allocates.
        check_finite: raise ValueError when x holds NaN/Inf. The cpu backend detects them
            during its own pass (no extra read; see ``reports_nonfinite``) and x is scanned only
            when it reports some, *after* the call: ``out`` then holds garbage. Other backends,
            and an in-place call (``out`` is x: x is gone after the call), scan x first (one
            extra read). False skips the check: NaN/Inf then simply propagate.
        backend: ``"cpu"``, ``"triton"``, ``"cuda"``, ``"torch"`` or None (automatic).

    Returns:
        ``[..., n]`` in x's dtype (``out`` when given).

    Raises:
        ValueError: unsupported n (the message lists the forms), NaN/Inf, bad signs / out.
        TypeError: non-floating x.
    """
    x = check_rows(x, "x")
    n = x.shape[-1]
    factorize(n)
    if scale is None:
        scale = 1.0 / math.sqrt(n)
    else:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a number or None, got {scale!r}")
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    signs = check_signs(signs, n, x.device)
    if out is not None:
        out = check_out(out, x.shape, x.dtype, x.device)
    rows = x.reshape(-1, n) if x.is_contiguous() else x.contiguous().reshape(-1, n)
    out2 = out.view(-1, n) if out is not None else torch.empty_like(rows)
    if rows.shape[0]:
        args = (rows, scale, signs, out2)
        name = _backend.select("hadamard", *args, backend=backend)
        after = check_finite and name in reports_nonfinite and out2.data_ptr() != rows.data_ptr()
        if check_finite and not after:
            scan_finite(x, "x")
        maybe_bad = _backend.call("hadamard", *args, backend=name)
        if after and maybe_bad:  # NaN/Inf, or a finite row that overflowed: the scan decides
            scan_finite(x, "x")
    return out if out is not None else out2.view(x.shape)


# ---------------------------------------------------------------------------------------------
# Backends. Contract (inputs validated): hadamard(x [R, n] contiguous, scale: float,
# signs fp32 [n] | None, out [R, n] contiguous, x's dtype, may alias x) -> R >= 1. Returns
# anything, except the backends in ``reports_nonfinite``: they return a bool, True when some
# x value may be NaN/Inf (always when one is), False when every value is finite.
# ---------------------------------------------------------------------------------------------

# Backends whose hadamard / rotate_quantize detect NaN/Inf in their own pass (ops then skip the
# pre-scan of x): the CPU kernels (see csrc/cpu/hadamard.cpp, ``hadamard``).
reports_nonfinite = frozenset({"cpu"})


@_backend.register("hadamard", "torch")
def _torch(x, scale, signs, out):
    out.copy_(ref.hadamard(x, scale, signs))
    return out


_HK: dict[tuple[int, str], torch.Tensor] = {}


def hk_on(K: int, device) -> torch.Tensor:
    """The reference ``H_K`` as float32 ``[K, K]`` on ``device`` (cached): what kernels get."""
    key = (K, str(torch.device(device)))
    if key not in _HK:
        _HK[key] = ref.hadamard_factor(K).to(device=device, dtype=torch.float32).contiguous()
    return _HK[key]


def _check(backend: str, symbol: str):
    def check(x, *args) -> list[str]:
        why = ext.missing_symbol(backend, symbol)
        if x.dtype not in KERNEL_DTYPES:
            why.append(f"compiled Hadamard kernels take float32/float16/bfloat16, got {x.dtype}")
        return why

    return check


@_backend.register("hadamard", "cpu", check=_check("cpu", "hadamard"))
def _cpu(x, scale, signs, out):
    R, n = x.shape
    K, _ = factorize(n)
    hk = hk_on(K, x.device)
    return bool(ext.cpu_module().hadamard(
        x.data_ptr(), DTYPE_CODE[x.dtype], R, n, K, hk.data_ptr(),
        0 if signs is None else signs.data_ptr(), scale, out.data_ptr(), ext.num_threads(),
    ))  # fmt: skip


@_backend.register("hadamard", "cuda", check=_check("cuda", "hadamard"))
def _cuda(x, scale, signs, out):
    R, n = x.shape
    K, _ = factorize(n)
    hk = hk_on(K, x.device)
    ext.cuda_module().hadamard(
        x.data_ptr(), DTYPE_CODE[x.dtype], R, n, K, hk.data_ptr(),
        0 if signs is None else signs.data_ptr(), scale, out.data_ptr(),
        torch.cuda.current_stream(x.device).cuda_stream,
    )  # fmt: skip
    return out


@_backend.register("hadamard", "triton", check=_check("triton", "hadamard"))
def _triton(x, scale, signs, out):
    from ..kernels import hadamard as tk  # imports triton: only when this backend runs

    K, _ = factorize(x.shape[1])
    return tk.hadamard(x, K, hk_on(K, x.device), signs, scale, out=out)  # writes into out
