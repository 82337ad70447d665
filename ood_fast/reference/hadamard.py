"""Hadamard matrices and the reference Hadamard transform: the ONE definition in the package.

Every H_K used anywhere (offline weight fusion, calibration, the C++/Triton/CUDA kernels) comes
from ``hadamard_factor`` here, so an offline-fused rotation and an online kernel can never use
two different 12×12 matrices (a known source of silent error between Hadamard libraries).

Sizes: ``n = K · 2^p`` with ``K ∈ {1, 12, 20, 28}`` (``factorize``). 40·2^m is covered as
20·2^(m+1), so every Mamba / Vim / BERT width of these forms is supported.

Matrices (unnormalised, entries ±1):

* ``S_{2^p}``: Sylvester, natural order, ``S_1 = [1]``, ``S_{2m} = [[S_m, S_m], [S_m, −S_m]]``
  (``S_{2^p} = S_2 ⊗ … ⊗ S_2``; symmetric).
* ``H_K`` for K = 12, 20 (Paley I, q = 11, 19 ≡ 3 mod 4) and K = 28 (Paley II, q = 13 ≡ 1 mod 4),
  built from quadratic residues (see ``hadamard_factor``). ``H_12`` and ``H_20`` are NOT
  symmetric: the transform uses ``H_K`` as written, so mind the transpose.
* ``H_n = H_K ⊗ S_{2^p}`` (``hadamard_matrix``).

Convention: ROW vectors. ``hadamard(x)[..., j] = scale · Σ_i x[..., i] · H_n[i, j]``, i.e.
``x @ H_n``. With x viewed as ``X [K, 2^p]`` (row-major, i = a·2^p + b) this is
``scale · H_Kᵀ · X · S``: a Walsh–Hadamard transform along each row of length 2^p, then the K
rows mixed with ``H_Kᵀ`` (``y[c, :] = Σ_a H_K[a, c] · fwht(X[a, :])``).
"""

from __future__ import annotations

import functools
import math
import operator
import weakref

import torch

# Sign vectors already checked to be ±1 (those a HadamardRotation holds), by identity, so the op
# need not re-scan them per call (on a GPU that scan would be a device sync).
_VALIDATED_SIGNS: dict[int, weakref.ref] = {}


def _mark_valid_signs(t: torch.Tensor) -> None:
    key = id(t)
    _VALIDATED_SIGNS[key] = weakref.ref(t, lambda _, key=key: _VALIDATED_SIGNS.pop(key, None))


def is_validated_signs(t: torch.Tensor) -> bool:
    """True when ``t`` is a sign vector a ``HadamardRotation`` checked (and holds)."""
    ref = _VALIDATED_SIGNS.get(id(t))
    return ref is not None and ref() is t


SUPPORTED_K = (1, 12, 20, 28)
FORMS = "2^m, 12·2^m, 20·2^m, 28·2^m, 40·2^m (= 20·2^(m+1))"

# Largest dense Sylvester factor the reference multiplies by at once: S_{2^p} is applied as a
# Kronecker product of factors of at most this size (one small GEMM per factor), so n = 32768
# never builds an n × n matrix.
_MAX_FACTOR = 64


def factorize(n: int) -> tuple[int, int]:
    """``(K, p)`` with ``n = K · 2^p`` and K the first of ``(1, 12, 20, 28)`` that fits.

    Raises:
        ValueError: n has no such form (the message lists the supported forms).
    """
    if isinstance(n, bool):
        raise TypeError(f"n must be an integer, got {n!r}")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n must be an integer, got {type(n).__name__} {n!r}") from None
    if n >= 1:
        for K in SUPPORTED_K:
            if n % K == 0:
                m = n // K
                if m & (m - 1) == 0:
                    return K, m.bit_length() - 1
    raise ValueError(
        f"no Hadamard transform of size n={n}: supported sizes are {FORMS} "
        "(m >= 0); pad the dimension or use a dense rotation matrix"
    )


def _legendre(a: int, q: int) -> int:
    """Quadratic character χ(a) mod the odd prime q: 0, +1 (a residue) or −1 (a non-residue)."""
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = χ(j − i)`` for i, j in GF(q) (q an odd prime), int64 ``[q, q]``.

    Q Qᵀ = q I − J and Q J = J Q = 0; Q is skew-symmetric when q ≡ 3 (mod 4) (χ(−1) = −1) and
    symmetric when q ≡ 1 (mod 4).
    """
    chi = torch.tensor([_legendre(d, q) for d in range(q)], dtype=torch.int64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley1(q: int) -> torch.Tensor:
    """Paley construction I, q ≡ 3 (mod 4) prime: order q + 1.

    ``C = [[0, 1ᵀ], [−1, Q]]`` is a skew conference matrix (C Cᵀ = q I, from Q Qᵀ = q I − J and
    Q 1 = 0; Cᵀ = −C), so
    ``H = I + C`` has ``H Hᵀ = I + C Cᵀ = (q + 1) I`` (the cross terms C + Cᵀ cancel).
    """
    Q = _jacobsthal(q)
    C = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    C[0, 1:] = 1
    C[1:, 0] = -1
    C[1:, 1:] = Q
    return torch.eye(q + 1, dtype=torch.int64) + C


def _paley2(q: int) -> torch.Tensor:
    """Paley construction II, q ≡ 1 (mod 4) prime: order 2(q + 1).

    ``C = [[0, 1ᵀ], [1, Q]]`` is a symmetric conference matrix (C Cᵀ = q I). Each 0 entry of C
    becomes ``A = [[1, −1], [−1, −1]]`` and each ±1 becomes ``±B``, ``B = [[1, 1], [1, −1]]``:
    ``H = I ⊗ A + C ⊗ B``. Since A Aᵀ = B Bᵀ = 2 I, A Bᵀ + B Aᵀ = 0 and C = Cᵀ,
    ``H Hᵀ = I ⊗ A Aᵀ + C ⊗ (A Bᵀ + B Aᵀ) + C Cᵀ ⊗ B Bᵀ = 2 I + 0 + 2q I = 2(q + 1) I``.
    """
    Q = _jacobsthal(q)
    C = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    A = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    B = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    return torch.kron(torch.eye(q + 1, dtype=torch.int64), A) + torch.kron(C, B)


@functools.cache
def _factor_int(K: int) -> torch.Tensor:
    if K == 1:
        H = torch.ones(1, 1, dtype=torch.int64)
    elif K == 12:
        H = _paley1(11)
    elif K == 20:
        H = _paley1(19)
    elif K == 28:
        H = _paley2(13)
    else:
        raise ValueError(f"no Hadamard factor of order K={K}: supported K are {SUPPORTED_K}")
    # The constructions are proved above; this guards the code that implements them.
    if not torch.equal(H @ H.T, K * torch.eye(K, dtype=torch.int64)):
        raise AssertionError(f"internal error: H_{K} is not a Hadamard matrix")
    return H


def hadamard_factor(K: int) -> torch.Tensor:
    """The ±1 Hadamard matrix ``H_K``, float64 ``[K, K]``, ``H_K H_Kᵀ = K I``.

    K = 1: ``[[1.]]``; K = 12, 20: Paley I (q = 11, 19); K = 28: Paley II (q = 13). A fresh tensor
    every call (callers may modify it).
    """
    return _factor_int(int(K)).to(torch.float64)


@functools.cache
def _sylvester_int(size: int) -> torch.Tensor:
    if size < 1 or size & (size - 1):
        raise ValueError(f"Sylvester matrices exist for powers of two, got {size}")
    S = torch.ones(1, 1, dtype=torch.int64)
    S2 = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    while S.shape[0] < size:
        S = torch.kron(S2, S)  # S_{2m} = S_2 ⊗ S_m = [[S_m, S_m], [S_m, −S_m]]
    return S


def sylvester(size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The natural-order Sylvester matrix ``S_size`` (size a power of two), entries ±1."""
    return _sylvester_int(int(size)).to(dtype)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The unnormalised Hadamard matrix ``H_n = H_K ⊗ S_{2^p}`` ``[n, n]`` (entries ±1).

    ``H_n H_nᵀ = n I``. Raises ValueError for a size without a supported factorization.
    """
    K, p = factorize(n)
    return torch.kron(_factor_int(K), _sylvester_int(1 << p)).to(dtype)


def _sylvester_split(p: int) -> list[int]:
    """Sizes of the Sylvester factors S_{2^p} is applied as (each ≤ _MAX_FACTOR, product 2^p),
    the remainder first so that the last (one plain GEMM over all rows) is the largest."""
    sizes = []
    while p > 0:
        step = min(p, _MAX_FACTOR.bit_length() - 1)
        sizes.append(1 << step)
        p -= step
    return sizes[::-1]


def hadamard(
    x: torch.Tensor, scale: float | None = None, signs: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference Hadamard transform along the last dimension: ``scale · (x · signs) @ H_n``.

    Args:
        x: ``[..., n]`` floating tensor; n of a supported form (``factorize``).
        scale: multiplier; ``None`` means ``1/sqrt(n)`` (orthonormal).
        signs: ``[n]`` (±1, any float dtype) multiplied into x first, or None.

    Returns:
        ``[..., n]`` in x's dtype, computed in float32 (float64 for float64 input).

    How: ``H_n = H_K ⊗ S_{f1} ⊗ … ⊗ S_{fr}`` with every f ≤ 64, so x is viewed as a tensor
    ``[rows, K, f1, …, fr]`` and each axis is contracted with its small dense factor (one GEMM
    per factor, ``y_axis = Fᵀ x_axis``, i.e. row-vector ``x @ F`` along that axis; the last axis
    is one plain ``[rows·n/f, f] @ [f, f]`` GEMM, and carries the scale). This is exact Kronecker
    algebra, costs O(n·(K + Σ f)) per row and never builds ``H_n``.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension [..., n]")
    n = x.shape[-1]
    K, p = factorize(n)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(n) if scale is None else float(scale)
    shape = x.shape
    y = x.reshape(-1, n).to(acc)
    if signs is not None:
        y = y * signs.to(device=x.device, dtype=acc)
    rows = y.shape[0]
    factors = ([(K, _factor_int(K))] if K > 1 else []) + [
        (f, _sylvester_int(f)) for f in _sylvester_split(p)
    ]
    if not factors:  # n = 1
        return (y * scale).reshape(shape).to(x.dtype)
    # Contract the axes one by one. View as [rows·pre, f, post] for the current axis of size f;
    # the result along that axis is Σ_a F[a, c] · y[.., a, ..] = (Fᵀ @ y_view).
    pre = rows
    post = n
    for i, (f, F) in enumerate(factors):
        post //= f
        F = F.to(device=x.device, dtype=acc)
        if i == len(factors) - 1:
            y = y.reshape(-1, f) @ (F * scale)  # post == 1: one GEMM over every row
        else:
            y = torch.matmul(F.T.contiguous(), y.reshape(pre, f, post))
        pre *= f
    return y.reshape(shape).to(x.dtype)


class HadamardRotation:
    """The orthonormal rotation ``x ↦ hadamard(x · signs) = x @ (diag(signs) H_n / sqrt(n))``.

    Args:
        n: the size (a supported form, see ``factorize``).
        signs: float ``[n]`` of ±1 (stored as float32 on CPU), or None for the plain Hadamard.

    ``matrix(dtype)`` gives the dense ``[n, n]`` rotation R (float64 by default) for offline
    fusion into weights (``W ← Rᵀ W`` etc.); ``apply(x)`` runs the fast op (``ood_fast.ops``).
    """

    def __init__(self, n: int, signs: torch.Tensor | None = None):
        self.K, self.p = factorize(n)
        self.n = int(n)
        if signs is not None:
            signs = torch.as_tensor(signs)
            if signs.shape != (self.n,):
                raise ValueError(f"signs: expected shape [{self.n}], got {tuple(signs.shape)}")
            signs = signs.detach().to("cpu", torch.float32).contiguous()
            if not bool((signs.abs() == 1).all()):
                raise ValueError("signs: every entry must be +1 or -1")
        self.signs = signs
        if signs is not None:
            _mark_valid_signs(signs)
        self._on_device: dict[str, torch.Tensor] = {}

    def signs_on(self, device) -> torch.Tensor | None:
        """``signs`` as float32 on ``device`` (cached), or None."""
        if self.signs is None:
            return None
        key = str(torch.device(device))
        if key not in self._on_device:
            on = self.signs.to(device)
            _mark_valid_signs(on)
            self._on_device[key] = on
        return self._on_device[key]

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense ``R = diag(signs) H_n / sqrt(n)`` ``[n, n]`` (orthonormal; ``x ↦ x @ R``)."""
        H = hadamard_matrix(self.n, torch.float64) / math.sqrt(self.n)
        if self.signs is not None:
            H = self.signs.to(torch.float64)[:, None] * H
        return H.to(dtype)

    def apply(self, x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
        """``x @ R`` along the last dimension, through ``ood_fast.ops.hadamard``."""
        from ..ops.hadamard import hadamard as op  # lazy: ops imports this module

        signs = None if self.signs is None else self.signs_on(x.device)
        return op(x, signs=signs, backend=backend)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x)

    def __repr__(self) -> str:
        kind = "plain" if self.signs is None else "random signs"
        return f"HadamardRotation(n={self.n} = {self.K}·2^{self.p}, {kind})"


def random_hadamard(n: int, seed: int = 0) -> HadamardRotation:
    """``HadamardRotation(n, signs)`` with signs ±1 drawn from ``torch.Generator().manual_seed(seed)``."""
    factorize(n)  # the error for an unsupported n before any work
    g = torch.Generator().manual_seed(int(seed))
    signs = torch.randint(0, 2, (int(n),), generator=g).to(torch.float32) * 2 - 1
    return HadamardRotation(n, signs)
