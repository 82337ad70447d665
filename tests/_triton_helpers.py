"""What the Triton kernel tests (test_hadamard_triton.py, test_quant_triton.py) share: the
device, the Hadamard sizes they sweep, the skip where the triton backend cannot run, and the
numpy float64 Hadamard matrix their references build (independent of ood_fast.reference).

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
before triton is first imported), hence the tiny sizes; on a GPU machine they run natively.
"""

import numpy as np
import pytest
import torch

from ood_fast import _extensions as _ext

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NS = (1, 2, 8, 12, 24, 48, 64, 80, 112)  # n = K·2^p with K = 1, 12, 20, 28


@pytest.fixture(autouse=True)
def need_triton_backend():
    """Autouse in every test module that imports it: skips where the triton backend cannot run
    (conftest's ``triton`` marker skip covers only triton failing to import; this also covers
    no GPU and no interpreter)."""
    why = _ext.triton_unavailable()
    if why:
        pytest.skip("triton backend unavailable: " + "; ".join(why))


def hadamard_factors(n: int) -> tuple[int, int]:
    """(K, p) with n = K·2^p, K in (1, 12, 20, 28); ValueError for other n."""
    for K in (1, 12, 20, 28):
        q = n // K
        if n % K == 0 and q & (q - 1) == 0:
            return K, q.bit_length() - 1
    raise ValueError(n)


def sylvester(p: int) -> np.ndarray:
    """The unnormalized Sylvester Hadamard matrix S_{2^p} [2^p, 2^p] of ±1 (float64)."""
    S = np.ones((1, 1))
    for _ in range(p):
        S = np.block([[S, S], [S, -S]])
    return S


def dense_hadamard(n: int, hk: np.ndarray | None) -> np.ndarray:
    """kron(H_K, S_{2^p}) [n, n] float64, unnormalized; ``hk`` [K, K] is used only when K > 1."""
    K, p = hadamard_factors(n)
    return np.kron(hk if K > 1 else np.ones((1, 1)), sylvester(p))
