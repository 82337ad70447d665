"""The Hadamard matrices, the torch reference transform, the ``hadamard`` op and its backends.

The reference is checked against independent computations: ``scipy.linalg.hadamard`` (powers of
two), an explicit float64 numpy ``x @ H``, the contract's Kronecker form ``H_Kᵀ · X · S`` written
with numpy einsum, and orthogonality ``H Hᵀ = n I`` for every supported n up to 5120. The
compiled backends (cpu / triton / cuda) are checked against the reference; each test is skipped,
with the backend's own reason, while that backend cannot run (e.g. before its kernel exists).

``run_backend`` is shared with the quant tests.
"""

from __future__ import annotations

import functools
import importlib
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from ood_fast import _backend
from ood_fast import ops as public_ops

ref = importlib.import_module("ood_fast.reference.hadamard")
hops = importlib.import_module("ood_fast.ops.hadamard")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def supported_sizes(limit: int) -> list[int]:
    """Every n = K·2^p <= limit of a supported form (40·2^m included as 20·2^(m+1))."""
    out = set()
    for K in (1, 12, 20, 28, 40):
        m = K
        while m <= limit:
            out.add(m)
            m *= 2
    return sorted(out)


def backend_device(backend: str) -> torch.device:
    """Where ``backend``'s test tensors live; skips the test when that is a missing GPU."""
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("backend 'cuda': " + "; ".join(_backend.availability()["cuda"]))
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def run_backend(backend: str, fn, *args, **kwargs):
    """``fn(*args, backend=backend, **kwargs)``, skipping the test with the backend's reasons
    when it cannot run (no GPU, extension not built, kernel not written yet)."""
    try:
        return fn(*args, backend=backend, **kwargs)
    except _backend.BackendUnavailable as exc:
        pytest.skip(str(exc))


@functools.lru_cache(maxsize=1)  # one at a time: H_5120 is 200 MB
def dense_h(n: int) -> np.ndarray:
    """float64 numpy H_n from hadamard_matrix (which is checked on its own above)."""
    return ref.hadamard_matrix(n).numpy()


def dense_numpy(x: torch.Tensor, n: int, scale: float, signs=None) -> np.ndarray:
    """float64 numpy ``scale · (x · signs) @ H_n``."""
    H = dense_h(n)
    xs = x.detach().cpu().double().numpy()
    if signs is not None:
        xs = xs * signs.cpu().double().numpy()
    return scale * (xs @ H)


# ---------------------------------------------------------------------------------------------
# Matrices
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 12, 20, 28])
def test_factor_is_hadamard(K):
    H = ref.hadamard_factor(K)
    assert H.dtype == torch.float64 and H.shape == (K, K)
    assert bool((H.abs() == 1).all())
    assert torch.equal(H @ H.T, K * torch.eye(K, dtype=torch.float64))
    assert torch.equal(H.T @ H, K * torch.eye(K, dtype=torch.float64))


@pytest.mark.parametrize("K", [12, 20])
def test_paley1_structure(K):
    """Paley I: H = I + C with C a skew conference matrix (so H is not symmetric), first row 1."""
    H = ref.hadamard_factor(K)
    C = H - torch.eye(K, dtype=torch.float64)
    assert torch.equal(C, -C.T)
    assert not torch.equal(H, H.T)
    assert bool((H[0] == 1).all())
    # the core is the Jacobsthal matrix of the quadratic residues mod q = K - 1
    q = K - 1
    residues = {(i * i) % q for i in range(1, q)}
    for j in range(1, K):
        d = (j - 1) % q
        assert H[1, j] == (1 if j == 1 else (1 if d in residues else -1))


def test_paley2_structure():
    """Paley II (q = 13): symmetric, built from 2×2 blocks ±[[1, 1], [1, −1]] and [[1, −1], [−1, −1]]."""
    H = ref.hadamard_factor(28)
    assert torch.equal(H, H.T)
    A = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    B = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    for i in range(14):
        for j in range(14):
            blk = H[2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
            if i == j:
                assert torch.equal(blk, A)
            else:
                assert torch.equal(blk, B) or torch.equal(blk, -B)


def test_factor_returns_fresh_tensor():
    H = ref.hadamard_factor(12)
    H.zero_()
    assert bool((ref.hadamard_factor(12).abs() == 1).all())


@pytest.mark.parametrize("n", supported_sizes(5120))
def test_every_supported_matrix_is_hadamard(n):
    """H Hᵀ = n I: in full (exact fp32 integer GEMM) up to n = 1024, beyond that 48 rows
    (first, last, random) against every row."""
    H = ref.hadamard_matrix(n, torch.float32)
    assert H.shape == (n, n) and bool((H.abs() == 1).all())
    K, p = ref.factorize(n)
    assert K * 2**p == n and K in (1, 12, 20, 28)
    if n <= 1024:
        assert torch.equal(H @ H.T, n * torch.eye(n))
    else:
        g = torch.Generator().manual_seed(n)
        idx = torch.cat([torch.tensor([0, n - 1]), torch.randint(0, n, (46,), generator=g)])
        assert torch.equal(H[idx] @ H.T, n * torch.eye(n)[idx])


@pytest.mark.parametrize("m", range(0, 11))
def test_powers_of_two_match_scipy(m):
    n = 2**m
    expect = torch.from_numpy(scipy.linalg.hadamard(n).astype(np.float64))
    assert torch.equal(ref.hadamard_matrix(n), expect)


@pytest.mark.parametrize("n", [24, 40, 56, 80, 96])
def test_matrix_is_kron_of_factor_and_sylvester(n):
    K, p = ref.factorize(n)
    S = scipy.linalg.hadamard(2**p).astype(np.float64)
    expect = np.kron(ref.hadamard_factor(K).numpy(), S)
    np.testing.assert_array_equal(ref.hadamard_matrix(n).numpy(), expect)


def test_factorize():
    assert ref.factorize(1) == (1, 0)
    assert ref.factorize(1024) == (1, 10)
    assert ref.factorize(12) == (12, 0)
    assert ref.factorize(384) == (12, 5)
    assert ref.factorize(1536) == (12, 7)
    assert ref.factorize(5120) == (20, 8)
    assert ref.factorize(40) == (20, 1)  # 40·2^m is 20·2^(m+1)
    assert ref.factorize(28 * 64) == (28, 6)
    for bad in (0, -4, 3, 6, 36, 60, 100, 1000, 24 * 3):
        with pytest.raises(ValueError, match=r"12·2\^m.*20·2\^m.*28·2\^m.*40·2\^m"):
            ref.factorize(bad)
    with pytest.raises(TypeError):
        ref.factorize(12.0)
    with pytest.raises(TypeError):
        ref.factorize(True)


# ---------------------------------------------------------------------------------------------
# Reference transform
# ---------------------------------------------------------------------------------------------

REF_SIZES = [1, 2, 4, 8, 12, 24, 40, 48, 56, 64, 384, 1024, 1536, 5120]


def numpy_fwht(x: np.ndarray) -> np.ndarray:
    """Unnormalised Walsh–Hadamard transform (natural order) along the last axis, float64:
    the textbook butterfly (a, b) -> (a + b, a - b) over strides 1, 2, 4, ..."""
    y = np.array(x, dtype=np.float64)
    n = y.shape[-1]
    h = 1
    while h < n:
        y = y.reshape(*y.shape[:-1], n // (2 * h), 2, h)
        a, b = y[..., 0, :].copy(), y[..., 1, :].copy()
        y[..., 0, :], y[..., 1, :] = a + b, a - b
        y = y.reshape(*y.shape[:-3], n)
        h *= 2
    return y


@pytest.mark.parametrize("n", [2, 64, 8192, 32768])
def test_reference_matches_numpy_butterfly(n):
    x = torch.randn(3, n, dtype=torch.float64)
    np.testing.assert_allclose(
        ref.hadamard(x, scale=1.0).numpy(), numpy_fwht(x.numpy()), atol=1e-9 * math.sqrt(n)
    )
    if n <= 64:  # the butterfly itself against scipy
        np.testing.assert_allclose(numpy_fwht(x.numpy()), x.numpy() @ scipy.linalg.hadamard(n))


@pytest.mark.parametrize("n", REF_SIZES)
@pytest.mark.parametrize("lead", [(3,), (2, 5), ()], ids=["3", "2x5", "vector"])
def test_reference_matches_dense_numpy(n, lead):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(*lead, n, generator=g, dtype=torch.float64)
    y = ref.hadamard(x)
    assert y.dtype == torch.float64 and y.shape == x.shape
    np.testing.assert_allclose(y.numpy(), dense_numpy(x, n, 1 / math.sqrt(n)), atol=1e-12)
    y32 = ref.hadamard(x.float())
    assert y32.dtype == torch.float32
    np.testing.assert_allclose(y32.double().numpy(), y.numpy(), atol=2e-6 * math.log2(2 * n))


@pytest.mark.parametrize("n", [12, 20, 28, 24, 80, 28 * 16])
def test_reference_is_contract_kronecker_form(n):
    """x @ H = H_Kᵀ · X · S with X = x viewed [K, 2^p]: FWHT of each row, then mix with H_Kᵀ."""
    K, p = ref.factorize(n)
    x = torch.randn(5, n, dtype=torch.float64)
    X = x.numpy().reshape(5, K, 2**p)
    S = scipy.linalg.hadamard(2**p).astype(np.float64)
    HK = ref.hadamard_factor(K).numpy()
    expect = np.einsum("ac,rab,bd->rcd", HK, X, S).reshape(5, n)
    np.testing.assert_allclose(ref.hadamard(x, scale=1.0).numpy(), expect, atol=1e-10)


def test_reference_scale_signs_and_orthonormality():
    n = 48
    x = torch.randn(7, n, dtype=torch.float64)
    s = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
    np.testing.assert_allclose(
        ref.hadamard(x, 2.5, s).numpy(), dense_numpy(x, n, 2.5, s), atol=1e-11
    )
    y = ref.hadamard(x)
    np.testing.assert_allclose(y.norm(dim=1).numpy(), x.norm(dim=1).numpy(), rtol=1e-12)
    # the inverse of x ↦ x H / sqrt(n) is y ↦ y Hᵀ / sqrt(n) (H_12 is not symmetric)
    back = y @ ref.hadamard_matrix(n).T / math.sqrt(n)
    np.testing.assert_allclose(back.numpy(), x.numpy(), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Rotations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [16, 12, 20, 28, 40, 384])
def test_random_hadamard_orthonormal_and_seeded(n):
    r = public_ops.random_hadamard(n, seed=3)
    R = r.matrix()
    assert R.dtype == torch.float64 and R.shape == (n, n)
    np.testing.assert_allclose((R @ R.T).numpy(), np.eye(n), atol=1e-13)
    np.testing.assert_allclose((R.T @ R).numpy(), np.eye(n), atol=1e-13)
    assert bool((r.signs.abs() == 1).all()) and r.signs.dtype == torch.float32
    assert torch.equal(public_ops.random_hadamard(n, seed=3).signs, r.signs)
    g = torch.Generator().manual_seed(3)
    expect = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    assert torch.equal(r.signs, expect)
    if n >= 16:
        assert not torch.equal(public_ops.random_hadamard(n, seed=4).signs, r.signs)
    # matrix = diag(signs) H / sqrt(n); apply(x) = x @ matrix
    H = ref.hadamard_matrix(n) / math.sqrt(n)
    np.testing.assert_allclose(R.numpy(), (r.signs.double()[:, None] * H).numpy(), atol=1e-15)
    x = torch.randn(3, 2, n)
    np.testing.assert_allclose(r.apply(x).double().numpy(), (x.double() @ R).numpy(), atol=1e-5)
    assert r.matrix(torch.float32).dtype == torch.float32


def test_hadamard_rotation_validation():
    with pytest.raises(ValueError, match="supported sizes"):
        public_ops.HadamardRotation(36)
    with pytest.raises(ValueError, match="shape"):
        public_ops.HadamardRotation(16, torch.ones(8))
    with pytest.raises(ValueError, match=r"\+1 or -1"):
        public_ops.HadamardRotation(4, torch.tensor([1.0, 0.5, 1.0, -1.0]))
    with pytest.raises(ValueError, match="supported sizes"):
        public_ops.random_hadamard(100)
    plain = public_ops.HadamardRotation(24)
    np.testing.assert_allclose(
        plain.matrix().numpy(), (ref.hadamard_matrix(24) / math.sqrt(24)).numpy()
    )


# ---------------------------------------------------------------------------------------------
# The op (torch backend and validation)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "fp64"])
def test_op_dtypes(dtype):
    dt = {**DTYPES, "fp64": torch.float64}[dtype]
    x = torch.randn(5, 3, 96).to(dt)
    y = public_ops.hadamard(x, backend="torch")
    assert y.dtype == dt and y.shape == x.shape
    expect = dense_numpy(x, 96, 1 / math.sqrt(96))
    tol = {"fp32": 1e-5, "fp64": 1e-12, "fp16": 4e-3, "bf16": 3e-2}[dtype]
    np.testing.assert_allclose(y.double().numpy(), expect, atol=tol, rtol=tol)


def test_op_out_and_in_place():
    x = torch.randn(4, 6, 40)
    expect = public_ops.hadamard(x, 0.5)
    out = torch.empty_like(x)
    assert public_ops.hadamard(x, 0.5, out=out) is out
    assert torch.equal(out, expect)
    y = x.clone()
    assert public_ops.hadamard(y, 0.5, out=y) is y
    assert torch.equal(y, expect)


def test_op_non_contiguous_and_empty():
    x = torch.randn(24, 6).T  # [6, 24], not contiguous
    np.testing.assert_allclose(
        public_ops.hadamard(x).double().numpy(), dense_numpy(x, 24, 24**-0.5), atol=1e-5
    )
    e = torch.empty(0, 3, 16)
    assert public_ops.hadamard(e).shape == (0, 3, 16)


def test_op_bad_input():
    with pytest.raises(ValueError, match=r"n=36.*2\^m, 12·2\^m, 20·2\^m, 28·2\^m, 40·2\^m"):
        public_ops.hadamard(torch.randn(2, 36))
    with pytest.raises(TypeError, match="float"):
        public_ops.hadamard(torch.ones(2, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="scalar"):
        public_ops.hadamard(torch.tensor(1.0))
    x = torch.randn(3, 16)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        public_ops.hadamard(x)
    x[1, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        public_ops.hadamard(x)
    y = public_ops.hadamard(x, check_finite=False)  # the scan skipped: Inf propagates
    assert not bool(torch.isfinite(y[1]).any()) and bool(torch.isfinite(y[0]).all())
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match="signs"):
        public_ops.hadamard(x, signs=torch.ones(8))
    with pytest.raises(ValueError, match=r"\+1 or -1"):
        public_ops.hadamard(x, signs=torch.full((16,), 2.0))
    with pytest.raises(ValueError, match="finite"):
        public_ops.hadamard(x, scale=float("inf"))
    with pytest.raises(TypeError, match="scale"):
        public_ops.hadamard(x, scale="1")
    with pytest.raises(ValueError, match="out"):
        public_ops.hadamard(x, out=torch.empty(3, 8))
    with pytest.raises(ValueError, match="out"):
        public_ops.hadamard(x, out=torch.empty(3, 16, dtype=torch.float16))
    with pytest.raises(ValueError, match="contiguous"):
        public_ops.hadamard(x, out=torch.empty(16, 3).T)
    with pytest.raises(ValueError, match="device"):
        public_ops.hadamard(x, signs=torch.ones(16, device="meta"))
    with pytest.raises(ValueError, match="unknown backend"):
        public_ops.hadamard(x, backend="numpy")


def test_compiled_backends_reject_fp64():
    x = torch.randn(2, 16, dtype=torch.float64)
    for name in ("cpu", "triton", "cuda"):
        why = _backend.reasons("hadamard", name, x, 0.25, None, torch.empty_like(x))
        assert why, name
    with pytest.raises(_backend.BackendUnavailable, match="float64|float32/float16/bfloat16"):
        public_ops.hadamard(x, backend="cpu")


# ---------------------------------------------------------------------------------------------
# Compiled backends against the reference (skipped, with the reason, while they cannot run)
# ---------------------------------------------------------------------------------------------

CPU_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
             12, 24, 48, 96, 384, 1536, 3072, 20, 40, 80, 160, 640, 5120, 28, 56, 112, 3584]  # fmt: skip
TRITON_SIZES = [1, 2, 16, 64, 12, 24, 48, 20, 40, 28, 56, 384]
LEADS = [(1,), (7,), (3, 5)]


def _tol(dtype):
    return {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}[
        dtype
    ]


def _check_backend(backend, n, lead, dtype, signs, seed=0):
    device = backend_device(backend)
    g = torch.Generator().manual_seed(seed + n)
    x = torch.randn(*lead, n, generator=g).to(dtype).to(device)
    s = None
    if signs:
        s = (torch.randint(0, 2, (n,), generator=g).float() * 2 - 1).to(device)
    got = run_backend(backend, public_ops.hadamard, x, signs=s)
    expect = public_ops.hadamard(x, signs=s, backend="torch")
    assert got.dtype == dtype and got.shape == x.shape and got.device == x.device
    rtol, atol = _tol(dtype)
    torch.testing.assert_close(got.cpu().float(), expect.cpu().float(), rtol=rtol, atol=atol)
    return x, s


@pytest.mark.parametrize("n", CPU_SIZES)
@pytest.mark.parametrize("lead", LEADS, ids=lambda s: "x".join(map(str, s)))
def test_cpu_backend_matches_reference(n, lead):
    _check_backend("cpu", n, lead, torch.float32, signs=n % 3 == 0)


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("n", [12, 24, 48, 384, 1536, 5120, 256, 4096])
def test_compiled_dtypes_and_signs(backend, dtype, n):
    _check_backend(backend, n, (5, 3), DTYPES[dtype], signs=True, seed=1)


@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton"])
def test_compiled_scale_in_place_and_out(backend):
    device = backend_device(backend)
    n = 48 if backend == "triton" else 1536
    x = torch.randn(9, n, device=device)
    expect = public_ops.hadamard(x, 0.125, backend="torch")
    y = x.clone()
    got = run_backend(backend, public_ops.hadamard, y, 0.125, out=y)
    assert got is y
    torch.testing.assert_close(y, expect, rtol=2e-5, atol=2e-5)
    out = torch.empty_like(x)
    run_backend(backend, public_ops.hadamard, x, 0.125, out=out)
    torch.testing.assert_close(out, expect, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("n", TRITON_SIZES)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_triton_backend_matches_reference(n, dtype):
    _check_backend("triton", n, (3, 1), DTYPES[dtype], signs=n % 2 == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("n", CPU_SIZES + [32768, 20 * 1024, 28 * 512])
@pytest.mark.parametrize("lead", LEADS, ids=lambda s: "x".join(map(str, s)))
def test_cuda_backend_matches_reference(n, lead):
    _check_backend("cuda", n, lead, torch.float32, signs=n % 3 == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("n", TRITON_SIZES + [1024, 4096, 5120, 1536])
def test_triton_gpu_sizes(n):
    _check_backend("triton", n, (33,), torch.float32, signs=True)


def test_rotation_apply_dispatches_through_the_op():
    r = public_ops.random_hadamard(24, seed=1)
    x = torch.randn(4, 24)
    expect = public_ops.hadamard(x, signs=r.signs, backend="torch")
    assert torch.equal(r.apply(x, backend="torch"), expect)
    assert torch.equal(r(x), public_ops.hadamard(x, signs=r.signs))  # automatic backend
    assert torch.equal(r(x), r.apply(x))
