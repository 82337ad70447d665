"""Persistence of fitted estimators: safetensors tensors plus one JSON header, never pickle.

File layout: a safetensors file whose metadata holds a single key ``"ood_fast"`` with the JSON
string ``{"format": "ood_fast", "format_version": 1, "kind": ..., "settings": {...}}``. The
tensors are the estimator's float64 statistics and its fitted parameters (plan tensors), so a
reloaded estimator scores bit-identically and can continue ``partial_fit``.

Loading never executes code: safetensors holds raw tensors only, the header is JSON, and the
estimator class comes from a whitelist (``REGISTRY``: kind -> class) that estimator modules add
themselves to with ``register``. Quantized models (``ood_fast.quant.save_quantized``) use the
same layout, kind ``"quantized_model"``, with a SHA-256 of every tensor in the header
(``"sha256"``, checked on load when present) so that a damaged file is refused, not run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

import torch

FORMAT = "ood_fast"
FORMAT_VERSION = 1
_META_KEY = "ood_fast"

# kind -> estimator class with a ``_from_state(settings, tensors)`` class method
REGISTRY: dict[str, type] = {}


def register(kind: str) -> Callable[[type], type]:
    """Class decorator: make ``kind`` loadable by ``ood_fast.load`` (the whitelist)."""

    def deco(cls: type) -> type:
        REGISTRY[kind] = cls
        cls._kind = kind
        return cls

    return deco


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 (hex) of a CPU tensor's dtype, shape and raw bytes."""
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


def save_estimator(
    path,
    kind: str,
    settings: dict,
    tensors: dict[str, torch.Tensor],
    *,
    checksum: bool = False,
) -> None:
    """Write ``tensors`` (moved to CPU, made contiguous) and a JSON header to ``path``.

    ``checksum``: also store the SHA-256 of every tensor (header key ``"sha256"``), which
    :func:`load_estimator` then verifies.
    """
    from safetensors.torch import save_file

    out = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r}: expected a torch.Tensor, got {type(t).__name__}")
        out[name] = t.detach().to("cpu").contiguous().clone()  # no shared storage in the file
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "settings": settings,
    }
    if checksum:
        header["sha256"] = {name: tensor_digest(t) for name, t in out.items()}
    try:
        meta = json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"estimator settings must be plain JSON values: {exc}") from exc
    save_file(out, os.fspath(path), metadata={_META_KEY: meta})


def read_header(path) -> dict:
    """The JSON header of an ood_fast file (validated: format and version)."""
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{path}: not a safetensors file, or truncated ({exc})") from exc
    if _META_KEY not in meta:
        raise ValueError(f"{path}: not an ood_fast estimator file (no {_META_KEY!r} header)")
    try:
        header = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt ood_fast header ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not an ood_fast estimator file (format {header.get('format')!r})"
        )
    version = header.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: written by a newer ood_fast (format_version {version} > {FORMAT_VERSION} "
            "supported here): upgrade ood_fast to load it"
        )
    if not isinstance(header.get("kind"), str) or not isinstance(header.get("settings"), dict):
        raise ValueError(f"{path}: corrupt ood_fast header (kind/settings missing)")
    return header


def load_estimator(path) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """Read ``path``: returns ``(kind, settings, tensors)`` (tensors on CPU)."""
    from safetensors.torch import load_file

    header = read_header(path)
    try:
        # load_file's tensors are views of a memory map of the file: copy them, so that what
        # the checksums verify is what the caller keeps, and a later write to (or truncation
        # of) the file cannot change (or crash) the loaded object
        tensors = {k: v.clone() for k, v in load_file(os.fspath(path), device="cpu").items()}
    except Exception as exc:
        raise ValueError(f"{os.fspath(path)}: corrupt safetensors data ({exc})") from exc
    sums = header.get("sha256")
    if sums is not None:
        if not isinstance(sums, dict) or set(sums) != set(tensors):
            raise ValueError(
                f"{os.fspath(path)}: corrupt ood_fast file (the checksummed tensors are not the "
                "tensors in the file)"
            )
        for name, t in tensors.items():
            if tensor_digest(t) != sums[name]:
                raise ValueError(
                    f"{os.fspath(path)}: tensor {name!r} does not match its SHA-256 in the header "
                    "(the file is corrupted)"
                )
    return header["kind"], header["settings"], tensors


def _ensure_registered() -> None:
    # estimator modules register themselves on import; import the families we ship
    from .detectors import knn, mahalanobis, prototypes  # noqa: F401
    from .quant import io  # noqa: F401  (kind "quantized_model")


def load(path):
    """Load any estimator saved with ``.save(path)``, or a quantized model saved with
    ``ood_fast.quant.save_quantized``; the class comes from a whitelist."""
    _ensure_registered()
    kind, settings, tensors = load_estimator(path)
    cls = REGISTRY.get(kind)
    if cls is None:
        known = ", ".join(sorted(REGISTRY)) or "none"
        raise ValueError(f"{os.fspath(path)}: unknown estimator kind {kind!r} (known: {known})")
    return cls._from_state(settings, tensors)


def load_as(cls, path):
    """``cls.load(path)``: read ``path`` and rebuild it as ``cls``, which must be its kind."""
    kind, settings, tensors = load_estimator(path)
    if kind != getattr(cls, "_kind", None):
        raise ValueError(
            f"{os.fspath(path)}: holds a {kind!r} estimator, not {cls._kind!r}: use ood_fast.load"
        )
    return cls._from_state(settings, tensors)
