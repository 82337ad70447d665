"""Test-session setup.

Triton kernels run on CPU only under its interpreter, and TRITON_INTERPRET must be set before
triton is first imported, so it is set here, before any test module loads. On a GPU machine
the kernels run natively.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"{type(exc).__name__}: {exc}"
    return None


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests without a CUDA device and `triton` tests where triton cannot import."""
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    if any(item.get_closest_marker("triton") for item in items):
        err = _triton_import_error()
        if err:
            skip = pytest.mark.skip(reason=f"triton cannot be imported ({err})")
            for item in items:
                if item.get_closest_marker("triton"):
                    item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)
