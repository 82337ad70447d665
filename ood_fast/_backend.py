"""Backend registry: op name -> {backend name -> implementation}.

Each implementation registers with a ``check`` returning the reasons it cannot run a given call
(extension missing, dtype, device, ...). ``call`` picks one:

1. the ``backend=`` argument of the op,
2. else the innermost ``with ood_fast.use_backend(...)``,
3. else the environment variable ``OOD_FAST_BACKEND``,
4. else the first usable backend in the device's order (CUDA tensors: cuda, triton, torch;
   CPU tensors: cpu, torch). The Triton interpreter is never chosen automatically.

An explicitly requested backend that cannot run raises ``BackendUnavailable`` listing every
reason; auto selection falls through to the reference (``torch``), which always runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import _extensions as ext

BACKENDS = ("cpu", "triton", "cuda", "torch")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
_BASE_CHECKS: dict[str, Callable[[], list[str]]] = {
    "cpu": ext.cpu_unavailable,
    "cuda": ext.cuda_unavailable,
    "triton": ext.triton_unavailable,
    "torch": lambda: [],
}
_DEVICE_OK = {"cpu": {"cpu"}, "cuda": {"cuda"}, "torch": {"cpu", "cuda"}}

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "ood_fast_backend", default=None
)


class BackendUnavailable(RuntimeError):
    """Raised when an explicitly requested backend cannot run a call."""


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    check: Callable[..., list[str]] | None


_REGISTRY: dict[str, dict[str, _Impl]] = {}


def register(op: str, backend: str, check: Callable[..., list[str]] | None = None):
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``.

    ``check(*args, **kwargs)`` gets the call's arguments and returns the reasons this
    implementation cannot run them (empty list: it can).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend] = _Impl(fn, check)
        return fn

    return deco


@contextlib.contextmanager
def use_backend(name: str | None):
    """Run the block with ``name`` as the default backend (``None``: automatic)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    token = _current.set(name)
    try:
        yield
    finally:
        _current.reset(token)


def requested_backend(backend: str | None = None) -> str | None:
    """The backend asked for by argument, context or environment, or None for automatic."""
    name = backend or _current.get() or os.environ.get("OOD_FAST_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS} (or unset)")
    return name


def _device_of(args, kwargs) -> torch.device:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cpu")


def reasons(op: str, backend: str, *args, **kwargs) -> list[str]:
    """Every reason ``backend`` cannot run ``op`` on these arguments (empty: it can)."""
    impls = _REGISTRY.get(op, {})
    if backend not in impls:
        return [f"{backend!r} has no implementation of {op!r}"]
    why = list(_BASE_CHECKS[backend]())
    device = _device_of(args, kwargs)
    allowed = _DEVICE_OK.get(backend)
    if allowed is not None and device.type not in allowed:
        why.append(f"{backend!r} runs on {'/'.join(sorted(allowed))} tensors, got {device.type}")
    if backend == "triton" and device.type == "cpu" and not ext.triton_interpreted():
        why.append("triton needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    impl = impls[backend]
    if not why and impl.check is not None:
        why.extend(impl.check(*args, **kwargs))
    return why


def select(op: str, *args, backend: str | None = None, **kwargs) -> str:
    """Name of the backend that ``call`` would use for these arguments."""
    name = requested_backend(backend)
    if name is not None:
        why = reasons(op, name, *args, **kwargs)
        if why:
            raise BackendUnavailable(
                f"backend {name!r} cannot run {op!r}:\n  - " + "\n  - ".join(why)
            )
        return name
    device = _device_of(args, kwargs)
    for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
        if candidate in _REGISTRY.get(op, {}) and not reasons(op, candidate, *args, **kwargs):
            return candidate
    raise BackendUnavailable(f"no backend can run {op!r} on {device.type} tensors")


def call(op: str, *args, backend: str | None = None, **kwargs):
    """Run ``op`` on the selected backend."""
    name = select(op, *args, backend=backend, **kwargs)
    return _REGISTRY[op][name].fn(*args, **kwargs)


def registered_ops() -> dict[str, tuple[str, ...]]:
    return {op: tuple(impls) for op, impls in sorted(_REGISTRY.items())}


def availability() -> dict[str, list[str]]:
    """Backend -> reasons it is unavailable on this machine (empty list: available)."""
    return {name: list(check()) for name, check in _BASE_CHECKS.items()}
