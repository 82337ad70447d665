"""Feature data: a synthetic generator with a realistic spectrum, presets, and a safe loader.

``synthetic_features`` draws class-conditional Gaussians that look like penultimate-layer features
of a trained classifier, at any scale, in seconds:

* **Within-class covariance** (shared by all classes) Σ = Q diag(λ) Qᵀ with power-law
  eigenvalues λ_i ∝ (i + 1)^(−decay) (``decay=1`` by default, normalised so that the mean
  eigenvalue is 1) and a random orthogonal Q. For D ≤ 512 Q is dense Haar-random; above,
  Q = (A ⊗ I_b)·blockdiag(B_1..B_G) with Haar-random A (G×G) and B_g (b×b, b ≈ 128, D = G·b):
  exactly orthogonal, every coordinate mixes all D inputs, and it costs 2·(b + G) flops per
  entry instead of 2·D, so 100k×2048 takes a couple of seconds.
* **Class means** μ_c = μ₀ + Q(√λ ⊙ w_c), w_c ~ N(0, Δ²/(2D)·I): in the whitened space the means
  are random points with pairwise distance ≈ Δ (``separation``), so between-class scatter follows
  the within-class spectrum (it sits mostly in the leading directions, as in real features), and
  μ₀ is a shared positive offset (real features are far from centred; this exercises the
  centring numerics of fp32 kernels). By default Δ = −2 Φ⁻¹(0.05 / (C − 1)): the Bayes
  nearest-mean accuracy is about 95 % (high, not perfect) for any number of classes.
* **OOD samples** come from a different mixture: ``num_ood_classes`` novel classes whose means are
  drawn like the ID means (so they sit at ≈ Δ from every ID class, "near OOD") and whose
  covariance is widened by ``ood_scale`` (default 1 + 2/√D in variance, so the ID/OOD gap in
  squared Mahalanobis distance grows like √D, as the chi-square spread does). A Mahalanobis
  detector fitted on the training split reaches an AUROC of roughly 0.85–0.95, not 1.0.

Everything is drawn in float32 chunks of 4096 rows, each half-chunk from its own generator
seeded from ``(seed, split, chunk, half)`` (so the result does not depend on thread count or
timing; the two halves are drawn in two threads), then transformed by GEMMs on torch's threads.

``load_features`` reads user features from .npy / .npz / .pt / .safetensors without ever
executing code from the file (``allow_pickle=False``; ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from statistics import NormalDist

import numpy as np
import torch

__all__ = ["PRESETS", "synthetic_features", "load_features"]

PRESETS: dict[str, dict] = {
    # seconds on a 2-core machine: for smoke tests and `ood-fast bench --quick`
    "quick": dict(n_train=5_000, n_test=2_000, dim=128, num_classes=10, ood_fraction=0.5),
    # CIFAR-10 with a ResNet-18: 50k×512 bank, 10 classes; 10k test points, half OOD
    "cifar10": dict(n_train=50_000, n_test=10_000, dim=512, num_classes=10, ood_fraction=0.5),
    # ImageNet-1K with a ResNet-50 (a 100k subset of the bank): 1000 classes × 2048
    "imagenet": dict(n_train=100_000, n_test=10_000, dim=2048, num_classes=1000, ood_fraction=0.5),
}

_BLOCK = 128  # rotation block size
_CHUNK = 4096  # rows per generation step


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    table = {
        "float32": torch.float32,
        "float64": torch.float64,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
    }
    if name not in table:
        raise ValueError(f"dtype must be float16/bfloat16/float32/float64, got {dtype!r}")
    return table[name]


def _seed(seed: int, *key: int) -> int:
    """An independent 63-bit seed for one stream (numpy's SeedSequence does the mixing)."""
    ss = np.random.SeedSequence(entropy=int(seed), spawn_key=tuple(int(k) for k in key))
    return int(ss.generate_state(1, np.uint64)[0] & np.uint64(2**63 - 1))


def _gen(seed: int, *key: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(seed, *key))


def _block_size(dim: int) -> int:
    """Block size for the factored rotation, or 0 for a dense one."""
    if dim <= 4 * _BLOCK:
        return 0
    for b in sorted(range(64, 257), key=lambda b: (abs(b - _BLOCK), b)):
        if dim % b == 0:
            return b
    return 0


class _Rotation:
    """Random orthogonal Q; ``transform`` maps noise z to Q diag(√λ) z (rows), fast.

    D ≤ 512, or no block size in [64, 256] divides D: a dense Haar-random Q (one GEMM).
    Otherwise D = G·b and Q = (A ⊗ I_b) · blockdiag(B_1..B_G) with Haar-random A (G×G) and
    B_g (b×b): every output coordinate mixes all D inputs, at 2·(b + G) flops per entry instead
    of 2·D, and with the noise laid out as [G, n, b] both factors are plain (batched) GEMMs.
    """

    def __init__(self, dim: int, sqrt_lam: torch.Tensor, g: torch.Generator):
        self.dim = dim
        self.b = _block_size(dim)
        if not self.b:
            q = self._orth(dim, 1, g)[0]
            self.w = (sqrt_lam[:, None] * q.T).contiguous()  # rows: z ↦ z diag(√λ) Qᵀ
            return
        self.G = dim // self.b
        blocks = self._orth(self.b, self.G, g)  # [G, b, b]
        # right-multiplication factors diag(√λ_g) B_gᵀ
        self.wb = (sqrt_lam.view(self.G, self.b, 1) * blocks.transpose(1, 2)).contiguous()
        self.a = self._orth(self.G, 1, g)[0].contiguous()

    @staticmethod
    def _orth(b: int, count: int, g: torch.Generator) -> torch.Tensor:
        a = torch.randn(count, b, b, generator=g, dtype=torch.float64)
        # small LAPACK calls: one thread (multi-threaded QR of small matrices is slower, and
        # pathologically so on a busy machine)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            q, r = torch.linalg.qr(a)
        finally:
            torch.set_num_threads(threads)
        d = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
        d[d == 0] = 1.0  # Haar-distributed Q: fix the signs of QR's factor
        return (q * d[:, None, :]).to(torch.float32)

    def noise_shape(self, n: int) -> tuple[int, ...]:
        return (n, self.dim) if not self.b else (self.G, n, self.b)

    def transform(
        self,
        z: torch.Tensor,
        out: torch.Tensor,
        add: torch.Tensor | None = None,
        work: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """out [n, D] = rows of Q diag(√λ) z (+ add), z of shape ``noise_shape(n)``.

        ``work``: two reusable buffers of at least G·n·b floats each for the factored form
        (fresh allocations would page-fault on every chunk).
        """
        if not self.b:
            if add is None:
                return torch.mm(z, self.w, out=out)
            return torch.addmm(add, z, self.w, out=out)
        G, n, b = z.shape
        if work is None:
            work = (torch.empty(G * n * b), torch.empty(G * n * b))
        t1 = work[0][: G * n * b].view(G, n, b)
        t2 = work[1][: G * n * b].view(G, n * b)
        torch.bmm(z, self.wb, out=t1)  # block rotations
        torch.mm(self.a, t1.view(G, n * b), out=t2)  # mix across blocks
        t = t2.view(G, n, b).transpose(0, 1)
        dst = out.view(n, G, b)
        if add is None:
            dst.copy_(t)
        else:
            torch.add(t, add.view(n, G, b), out=dst)
        return out

    def rows_to_noise(self, x: torch.Tensor) -> torch.Tensor:
        """Lay out row vectors [n, D] as noise (for means and the dense matrix)."""
        if not self.b:
            return x
        return x.view(x.shape[0], self.G, self.b).transpose(0, 1).contiguous()

    def matrix(self, sqrt_lam: torch.Tensor) -> torch.Tensor:
        """Dense Q (float64), for tests and for the true covariance."""
        eye = self.rows_to_noise(torch.diag(1.0 / sqrt_lam.to(torch.float32)))
        return self.transform(eye, torch.empty(self.dim, self.dim)).T.to(torch.float64)


def _default_separation(num_classes: int) -> float:
    if num_classes <= 1:
        return 0.0
    return -2.0 * NormalDist().inv_cdf(0.05 / (num_classes - 1))


def synthetic_features(
    n_train: int,
    n_test: int,
    dim: int,
    num_classes: int,
    ood_fraction: float = 0.5,
    seed: int = 0,
    dtype=torch.float32,
    *,
    decay: float = 1.0,
    separation: float | None = None,
    num_ood_classes: int | None = None,
    ood_scale: float | None = None,
    return_params: bool = False,
) -> dict:
    """Synthetic penultimate-layer-like features with in- and out-of-distribution test points.

    Args:
        n_train: training (bank) samples, classes balanced (``n_train // num_classes`` or one
            more each), in random order.
        n_test: test samples; ``round(n_test * ood_fraction)`` of them are OOD, shuffled in.
        dim: feature dimension D.
        num_classes: C.
        ood_fraction: share of OOD samples in the test split, in [0, 1].
        seed: everything is a deterministic function of the arguments and the seed.
        dtype: output dtype (torch or numpy float type); generation is always float32.
        decay: power-law exponent of the within-class spectrum, λ_i ∝ (i + 1)^(−decay).
        separation: typical whitened distance Δ between class means (default: ≈95 % Bayes
            accuracy for ``num_classes``).
        num_ood_classes: number of OOD mixture components (default ``max(2, C // 2)``).
        ood_scale: variance multiplier of the OOD components (default 1 + 2/√D).
        return_params: also return the generating parameters under ``"params"``
            (``means`` [C, D], ``covariance`` [D, D], ``ood_means``, ``ood_scale``, float64).

    Returns:
        dict with CPU tensors ``train_x`` [n_train, D], ``train_y`` [n_train] int64,
        ``test_x`` [n_test, D], ``test_is_ood`` [n_test] bool and ``test_y`` [n_test] int64
        (the ID class, −1 for OOD samples).
    """
    for name, v in (("n_train", n_train), ("n_test", n_test)):
        if int(v) < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if int(dim) < 1 or int(num_classes) < 1:
        raise ValueError(f"dim and num_classes must be >= 1, got dim={dim}, C={num_classes}")
    if not 0.0 <= float(ood_fraction) <= 1.0:
        raise ValueError(f"ood_fraction must be in [0, 1], got {ood_fraction}")
    n_train, n_test, D, C = int(n_train), int(n_test), int(dim), int(num_classes)
    out_dtype = _resolve_dtype(dtype)
    delta = _default_separation(C) if separation is None else float(separation)
    K = max(2, C // 2) if num_ood_classes is None else int(num_ood_classes)
    if K < 1:
        raise ValueError(f"num_ood_classes must be >= 1, got {K}")
    s2 = 1.0 + 2.0 / math.sqrt(D) if ood_scale is None else float(ood_scale)

    g = _gen(seed, 0)
    lam = torch.arange(1, D + 1, dtype=torch.float64).pow(-float(decay))
    lam = lam / lam.mean()
    sqrt_lam = lam.sqrt().to(torch.float32)
    rot = _Rotation(D, sqrt_lam, g)
    sigma_w = delta / math.sqrt(2.0 * D)
    offset = torch.randn(D, generator=g).abs() * 0.5 * float(lam[0].sqrt())
    w = rot.rows_to_noise(torch.randn(C + K, D, generator=g) * sigma_w)
    all_means = rot.transform(w, torch.empty(C + K, D), offset.expand(C + K, D).contiguous())
    means, ood_means = all_means[:C], all_means[C:]

    train_y = (torch.arange(n_train) % C)[torch.randperm(n_train, generator=g)]
    n_ood = int(round(n_test * float(ood_fraction)))
    test_is_ood = torch.zeros(n_test, dtype=torch.bool)
    test_is_ood[:n_ood] = True
    test_is_ood = test_is_ood[torch.randperm(n_test, generator=g)]
    test_comp = torch.randint(0, C, (n_test,), generator=g)
    ood_comp = torch.randint(0, K, (n_test,), generator=g)
    test_y = torch.where(test_is_ood, torch.full_like(test_comp, -1), test_comp)

    ood_std = math.sqrt(s2)
    train_x = _draw(n_train, D, seed, 1, rot, means, train_y, None)
    comp = torch.where(test_is_ood, C + ood_comp, test_comp)  # rows of all_means
    scale = torch.where(test_is_ood, torch.full((n_test,), ood_std), torch.ones(n_test))
    test_x = _draw(n_test, D, seed, 2, rot, all_means, comp, scale)

    out = {
        "train_x": train_x.to(out_dtype),
        "train_y": train_y,
        "test_x": test_x.to(out_dtype),
        "test_is_ood": test_is_ood,
        "test_y": test_y,
    }
    if return_params:
        Q = rot.matrix(sqrt_lam)
        out["params"] = {
            "means": means.to(torch.float64),
            "covariance": (Q * lam) @ Q.T,
            "ood_means": ood_means.to(torch.float64),
            "ood_scale": s2,
        }
    return out


def _draw(n, D, seed, stream, rot, table, comp, scale):
    """Rows ``table[comp[i]] + scale[i] · Q(√λ ⊙ z_i)``, z ~ N(0, I), float32, in chunks.

    Per chunk: the normal draws first, the two halves of the chunk in two threads (torch's
    ``normal_`` is single-threaded and releases the GIL), each half from its own generator (so
    the result does not depend on the scheduling); then the GEMMs on torch's own threads.
    Never both at once: a helper thread next to torch's OpenMP pool oversubscribes the cores and
    stalls the GEMMs. All work buffers are allocated once.
    """
    x = torch.empty(n, D, dtype=torch.float32)
    starts = list(range(0, n, _CHUNK))
    if not starts:
        return x
    rows = min(_CHUNK, n)
    noise_buf = torch.empty(rows * D)
    work = (torch.empty(rows * D), torch.empty(rows * D)) if rot.b else None
    centers = torch.empty(rows, D)

    with ThreadPoolExecutor(2) as ex:
        for i, s in enumerate(starts):
            e = min(s + _CHUNK, n)
            z = noise_buf[: (e - s) * D].view(rot.noise_shape(e - s))
            halves = z.view(2, -1) if z.numel() % 2 == 0 else z.view(1, -1)
            jobs = [(halves[h], _gen(seed, stream, i, h)) for h in range(halves.shape[0])]
            list(ex.map(lambda job: job[0].normal_(generator=job[1]), jobs))
            if scale is not None:
                z *= scale[s:e, None] if z.dim() == 2 else scale[None, s:e, None]
            c = torch.index_select(table, 0, comp[s:e], out=centers[: e - s])
            rot.transform(z, x[s:e], c, work)
    return x


# ----------------------------------------------------------------------------- loading

_X_KEYS = ("x", "features")
_Y_KEYS = ("y", "labels")
_OOD_KEYS = ("is_ood", "ood")
_SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")


def _pick(store: dict, keys: tuple[str, ...], what: str, path, required: bool):
    found = [k for k in keys if k in store]
    if len(found) > 1:
        raise ValueError(
            f"{path}: ambiguous {what}: both {found[0]!r} and {found[1]!r} present; keep one"
        )
    if not found:
        if required:
            raise KeyError(
                f"{path}: no {what} found: expected key {' or '.join(repr(k) for k in keys)}, "
                f"file has keys {sorted(store)}"
            )
        return None
    return store[found[0]]


def _to_tensor(v, what: str, path) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, np.ndarray):
        if v.dtype == object:
            raise TypeError(f"{path}: {what} is an object array; store a numeric array")
        return torch.from_numpy(v)
    raise TypeError(f"{path}: {what} must be an array or tensor, got {type(v).__name__}")


def load_features(path) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Read features (and optionally labels and OOD flags) from a file, never executing code.

    Formats, by suffix:

    * ``.npy``: the feature matrix only (``np.load(allow_pickle=False)``).
    * ``.npz`` / ``.safetensors``: arrays by name: features ``x`` or ``features`` (required),
      class labels ``y`` or ``labels``, OOD flags ``is_ood`` or ``ood`` (both optional).
    * ``.pt`` / ``.pth``: ``torch.load(weights_only=True)`` of a tensor (features only), a dict
      with the keys above, or a tuple/list ``(x[, y[, is_ood]])``.

    Returns:
        ``(x [N, D], y [N] or None, is_ood [N] bool or None)`` as CPU torch tensors (numpy data is
        wrapped without a copy).

    Raises:
        FileNotFoundError, ValueError (unknown suffix, wrong shapes, ambiguous keys, non-binary
        OOD flags), KeyError (no features key: lists the keys found), TypeError (object arrays).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"feature file not found: {path}")
    suffix = os.path.splitext(path)[1].lower()
    x = y = ood = None
    if suffix == ".npy":
        try:
            x = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"{path}: cannot load without pickle (object array?): {exc}") from exc
    elif suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                store = {k: z[k] for k in z.files}
        except ValueError as exc:
            raise ValueError(f"{path}: cannot load without pickle (object array?): {exc}") from exc
        x = _pick(store, _X_KEYS, "features", path, True)
        y = _pick(store, _Y_KEYS, "labels", path, False)
        ood = _pick(store, _OOD_KEYS, "OOD flags", path, False)
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        store = load_file(path, device="cpu")
        x = _pick(store, _X_KEYS, "features", path, True)
        y = _pick(store, _Y_KEYS, "labels", path, False)
        ood = _pick(store, _OOD_KEYS, "OOD flags", path, False)
    elif suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for anything beyond tensors and containers
            raise ValueError(
                f"{path}: not loadable with torch.load(weights_only=True) (only tensors, arrays "
                f"and plain containers are accepted; code is never executed): {exc}"
            ) from exc
        if isinstance(obj, (torch.Tensor, np.ndarray)):
            x = obj
        elif isinstance(obj, dict):
            x = _pick(obj, _X_KEYS, "features", path, True)
            y = _pick(obj, _Y_KEYS, "labels", path, False)
            ood = _pick(obj, _OOD_KEYS, "OOD flags", path, False)
        elif isinstance(obj, (tuple, list)) and 1 <= len(obj) <= 3:
            x, y, ood = (list(obj) + [None, None])[:3]
        else:
            raise ValueError(
                f"{path}: expected a tensor, a dict with 'x'/'features' (+ 'y'/'labels', "
                f"'is_ood'/'ood') or a tuple (x, y, is_ood); got {type(obj).__name__}"
            )
    else:
        raise ValueError(
            f"{path}: unsupported feature file suffix {suffix!r}; use one of {', '.join(_SUFFIXES)}"
        )

    x = _to_tensor(x, "features", path)
    if x.dim() != 2:
        raise ValueError(f"{path}: features must be a 2-D [N, D] array, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if y is not None:
        y = _to_tensor(y, "labels", path)
        if y.dim() == 2 and 1 in y.shape:
            y = y.reshape(-1)
        if y.dim() != 1 or y.shape[0] != n:
            raise ValueError(f"{path}: labels must have shape [{n}], got {tuple(y.shape)}")
    if ood is not None:
        ood = _to_tensor(ood, "OOD flags", path).reshape(-1) if ood is not None else None
        if ood.shape[0] != n:
            raise ValueError(f"{path}: OOD flags must have shape [{n}], got {tuple(ood.shape)}")
        if ood.dtype != torch.bool:
            if ood.numel() and not bool(((ood == 0) | (ood == 1)).all()):
                raise ValueError(f"{path}: OOD flags must be boolean or 0/1")
            ood = ood != 0
    return x, y, ood
