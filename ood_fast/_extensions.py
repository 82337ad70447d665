"""Guarded, lazy loading of the compiled extensions and of Triton.

``import ood_fast`` never imports these: each is loaded on first use, and a missing or broken
one becomes a reason string that ``ood-fast info`` and backend errors show, never an
ImportError at package import.
"""

from __future__ import annotations

import functools
import importlib
import os


@functools.cache
def _load(name: str):
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # ImportError, OSError from a missing shared library, ...
        return None, f"{type(exc).__name__}: {exc}"


def cpu_module():
    """The C++ extension ``ood_fast._C``, or None."""
    return _load("ood_fast._C")[0]


def cpu_unavailable() -> list[str]:
    err = _load("ood_fast._C")[1]
    if err:
        return [
            f"the C++ extension ood_fast._C did not load ({err}); reinstall with `pip install .`"
        ]
    return []


def cuda_module():
    """The CUDA extension ``ood_fast._cuda``, or None."""
    return _load("ood_fast._cuda")[0]


def cuda_unavailable() -> list[str]:
    reasons = []
    err = _load("ood_fast._cuda")[1]
    if err:
        reasons.append(
            "the CUDA extension ood_fast._cuda is not built "
            f"({err}); reinstall with OOD_FAST_BUILD_CUDA=1 where nvcc exists"
        )
    import torch

    if not torch.cuda.is_available():
        reasons.append("torch sees no CUDA device")
    return reasons


def triton_interpreted() -> bool:
    """True when Triton kernels run in its CPU interpreter (a test tool, never auto-chosen)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable() -> list[str]:
    err = _load("triton")[1]
    if err:
        return [f"triton is not importable ({err}); `pip install triton`"]
    import torch

    if not torch.cuda.is_available() and not triton_interpreted():
        return [
            "no GPU for Triton (set TRITON_INTERPRET=1 before importing triton to run it on CPU)"
        ]
    return []


def num_threads() -> int:
    """Threads for C++ kernels: torch's setting, so the two OpenMP runtimes never oversubscribe."""
    import torch

    return max(1, torch.get_num_threads())


def missing_symbol(backend: str, symbol: str) -> list[str]:
    """A reason when ``backend``'s compiled module (or Triton kernel module) lacks ``symbol``.

    Guards against a stale build: an extension compiled before a kernel existed loads fine but
    cannot run that kernel, and must say so instead of failing with an AttributeError.
    """
    if backend == "cpu":
        mod, name = cpu_module(), "ood_fast._C"
    elif backend == "cuda":
        mod, name = cuda_module(), "ood_fast._cuda"
    else:
        import importlib.util

        module = f"ood_fast.kernels.{symbol}"
        if importlib.util.find_spec(module) is None:
            return [f"there is no Triton kernel module {module}"]
        return []
    if mod is not None and not hasattr(mod, symbol):
        return [f"this build of {name} has no {symbol!r} kernel; rebuild with `pip install -e .`"]
    return []
