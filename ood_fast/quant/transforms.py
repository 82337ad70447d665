"""W8A8 post-training quantization of a Mamba-1 LM: RTN, SmoothQuant, QuaRot and MambaQuant.

``quantize_mamba(model, calib_batches, method)`` returns a new :class:`~.mamba.MambaLM` whose
linear layers (``in_proj``, ``x_proj``, ``dt_proj``, ``out_proj`` of every layer, and
``lm_head`` unless ``quantize_head=False``) are :class:`~.linear.QuantLinear`. The embedding,
the RMSNorms, the depthwise conv, the SSM parameters and the scan stay fp32: only the linear
layers run in int8 (the paper also quantizes the SSM's matmul inputs with rotations R4/S4 on the
state dimension; this package has no quantized scan, so those are not implemented).

Notation: row vectors, ``Linear(x) = x Wᵀ + b`` with ``W [out, in]``; every rotation R is
orthogonal and applied ``x ↦ x R``; all offline algebra runs in float64.

Transforms (the float function of the model is unchanged by each of them; the tests check this
with quantization disabled, ``w_bits=a_bits=None``, to ~1e-6 relative in fp32):

* **Norm fusion** (quarot, mambaquant): ``RMSNorm(h) = n(h) · γ`` with ``n(h) = h / rms(h)``, so
  ``W_in ← W_in diag(γ)``, ``γ ← 1``; likewise ``W_head ← W_head diag(γ_f)``, ``γ_f ← 1``.
* **Residual rotation R1** ``[d_model, d_model]`` (quarot: random Hadamard; mambaquant: KLT-H
  of the covariance of ``n(h)`` pooled over every norm of the model, since the residual stream
  is shared by all layers): the residual becomes ``h R1``. ``rms(h R1) = rms(h)``, so
  ``n(h R1) = n(h) R1``; then ``E ← E R1`` (embedding rows), ``W_in ← W_in R1``,
  ``W_out ← R1ᵀ W_out`` and ``b_out ← b_out R1`` (every mixer writes ``o R1`` into the
  residual), ``W_head ← W_head R1``. The embedding and the head are no longer tied.
* **dt path R5** ``[dt_rank, dt_rank]`` (quarot: random Hadamard; mambaquant: KLT-H of the
  covariance of the low-rank dt, per layer): ``dt ← dt R5`` via the dt rows of x_proj,
  ``W_x[:dt_rank] ← R5ᵀ W_x[:dt_rank]``, and ``W_dt ← W_dt R5``. Offline, free at run time.
  smoothquant instead divides dt by ``s``: ``W_x[:dt_rank] ← diag(1/s) W_x[:dt_rank]``,
  ``W_dt ← W_dt diag(s)``.
* **out_proj input** ``g = y ⊙ SiLU(z)`` (``d_inner``; ``z = u W_zᵀ (+ b_z)`` from the second
  half of in_proj's rows). Scaled SiLU ("S-SiLU", smoothquant and mambaquant): to feed
  out_proj ``g / s`` with ``W_out ← W_out diag(s)`` and no extra online work, write
  ``z = s ⊙ z'`` with ``z' = z / s``, i.e. ``W_z ← diag(1/s) W_z`` and ``b_z ← b_z / s``. Then
  ``SiLU(z) / s = (s z') σ(s z') / s = z' σ(s z') =: SSiLU_s(z')``, so
  ``g / s = y ⊙ SSiLU_s(z')``: the mixer's gate becomes ``z' · sigmoid(z' · s)``
  (``MambaMixer.gate_scale = s``). Scaling rows of W_z does not change its per-output-channel
  weight quantization. After the smoothing: quarot and mambaquant rotate online with a random
  Hadamard (FWHT kernel); ``online_klt=True`` makes mambaquant use the dense KLT-H of the
  covariance of ``g / s`` instead (an ``O(d_inner²)`` matmul per token, about the cost of
  out_proj itself, so it is off by default).
* **x_proj input** ``x = SiLU(conv(...))`` (``d_inner``): no linear precedes it that could
  absorb a rotation (conv1d is depthwise, then a SiLU), so the rotation is online: quarot a
  random Hadamard; mambaquant the smoothing ``x / s`` (applied by ``rotate_quantize`` in the
  same pass that quantizes, ``W_x ← W_x diag(s)``) then a random Hadamard (or the dense KLT-H
  of ``cov(x / s)`` with ``online_klt=True``); smoothquant the smoothing alone.
* **smoothquant in_proj / lm_head**: ``s`` folded into the norm weight (``γ ← γ / s``,
  ``W ← W diag(s)``); no rotations at all.
* **rtn**: none of the above; plain per-channel weights and per-tensor/per-token activations.

Smoothing scales ``s_j = max(a_j^α / max_i |W_ij|^(1-α), 1e-2)`` (``smooth_scales``, α = 0.5),
``a_j`` the calibration absmax of input channel j. KLT-H rotations are ``klt_rotation(Σ)`` =
``V diag(±1) H / sqrt(n)``: every channel of ``x R`` then has variance ``tr(Σ)/n``. A size
without a Hadamard factorization (e.g. ``dt_rank = 3``): the KLT is followed by an orthogonal
variance equaliser built by Givens rotations (constructive Schur-Horn), which gives the same
equal channel variances; quarot's rotations of such a size are seeded random orthogonal
matrices (QR of a Gaussian), and online rotations of such a size are dense matmuls.

Activation scales: ``act_granularity="per_tensor"`` (default) calibrates one static scale per
QuantLinear, ``absmax / qmax`` of its rotated, smoothed input over the calibration batches run
through the transformed float model (a second calibration pass); ``"per_token"`` is dynamic.

What the paper intends vs the reference code (xzktx003/mambaquant @2a7887c) vs this module:

* KLT-H per layer from the layer's own calibration covariance, in float64, ``R = K H``: as
  the paper; the reference code builds R1 in fp16 and lets rotations accumulate across layers,
  which is not what the paper states; here every matrix is built fresh in float64 and R1 is
  one matrix for the shared residual (pooled statistics of every layer's norm input).
* dt path: the reference code applies R5's two factors in the reversed order; only the pair
  ``W_x[:dt_rank] ← R5ᵀ W_x[:dt_rank]``, ``W_dt ← W_dt R5`` leaves the function unchanged, and
  that is what is done here (the invariance test checks it).
* The reference code only simulates quantization (quantize-dequantize in float, asymmetric
  activations, weights clipped at the 0.999999 quantile per row); here the linears run real
  int8 (``ops.rotate_quantize`` + ``ops.int8_linear``), symmetric codes, weights at their row
  absmax unless ``w_percentile`` is given.
* The Vim variant of the reference calibrates KLT from a single image; here any number of
  calibration batches stream through ``CovarianceAccumulator`` (float64, mergeable).
* Not implemented: R4/S4 on the SSM state dimension and quantized SSM inputs (see above).

Measured (``tests/test_quant_mamba.py::test_mambaquant_beats_quarot_and_rtn``: ``random_mamba``
with d_model 48, 2 layers, channel outliers + dense spiked residual, 2×[4, 32] calibration
tokens, W8A8 static per-tensor, logits SQNR vs fp32): rtn 30.2 dB, smoothquant 33.4, quarot
36.4, mambaquant 41.2 (``online_klt=True``: 37.1, so the dense online KLT is not the default).
Other seeds of the same generator: 13.7 / 22.2 / 19.9 / 27.1 and 34.2 / 41.0 / 41.1 / 41.2; the
margin of mambaquant over quarot depends on the model, it was never below quarot here. At
d_model 768 (d_inner 1536 = 12·128, dt_rank 48 = 12·4; 2 layers, 2×[2, 64] calibration
tokens): 23.4 / 33.2 / 38.0 / 38.7 dB; invariance with quantization off 5e-7 relative.

Calibration memory: mambaquant keeps one float64 covariance per rotated site
(``d_model²`` pooled, ``dt_rank²`` per layer, and ``d_inner²`` per site and layer with
``online_klt=True``).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .linear import QuantLinear, quantize_linear
from .mamba import MambaLM

__all__ = ["METHODS", "quantize_mamba"]

METHODS = ("mambaquant", "quarot", "smoothquant", "rtn")
_SITES = ("in_proj", "x_proj", "dt_proj", "out_proj")


# --------------------------------------------------------------------------- helpers


def _factorizable(n: int) -> bool:
    from ..reference.hadamard import factorize

    try:
        factorize(n)
    except ValueError:
        return False
    return True


def _random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A seeded Haar-random orthogonal ``[n, n]`` fp64 matrix (QR with the sign fix)."""
    g = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def _offline_hadamard(n: int, seed: int) -> torch.Tensor:
    """fp64 ``[n, n]``: a random Hadamard where n factorizes, else a random orthogonal."""
    if _factorizable(n):
        from ..reference.hadamard import random_hadamard

        return random_hadamard(n, seed=seed).matrix(torch.float64)
    return _random_orthogonal(n, seed)


def _online_hadamard(n: int, seed: int):
    """The rotation spec for an online Hadamard: HadamardRotation, or dense if n has none."""
    if _factorizable(n):
        from ..reference.hadamard import random_hadamard

        return random_hadamard(n, seed=seed)
    return _random_orthogonal(n, seed).float()


def _equalizing_rotation(cov: torch.Tensor) -> torch.Tensor:
    """Orthogonal fp64 ``[n, n]`` Q with ``diag(Qᵀ Σ Q) = tr(Σ)/n`` for any n (no Hadamard).

    KLT first (``V``, descending eigenvalues), then the constructive Schur-Horn step: take the
    largest and the smallest not-yet-fixed diagonal entries of ``M = Qᵀ Σ Q`` (one above the
    mean t, one below) and rotate their plane by the angle θ ∈ [0, π/2] at which the larger one
    becomes exactly t (it moves continuously from M_ii to M_jj); fix it; n - 1 such steps.
    """
    c = 0.5 * (cov + cov.T).to(torch.float64)
    n = c.shape[0]
    evals, evecs = torch.linalg.eigh(c)
    q = evecs.flip(-1).clone()
    m = torch.diag(evals.flip(0))
    t = float(evals.sum()) / n
    free = list(range(n))
    for _ in range(n - 1):
        d = m.diagonal().tolist()
        i = max(free, key=d.__getitem__)
        j = min(free, key=d.__getitem__)
        if d[i] - t <= 1e-12 * max(abs(t), 1e-300):
            break
        a, b, cc = 0.5 * (d[i] + d[j]), 0.5 * (d[i] - d[j]), float(m[i, j])
        lo, hi = 0.0, 0.5 * math.pi  # f(lo) = M_ii > t >= M_jj = f(hi)
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            if a + b * math.cos(2 * mid) + cc * math.sin(2 * mid) > t:
                lo = mid
            else:
                hi = mid
        th = 0.5 * (lo + hi)
        g = torch.tensor(
            [[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=torch.float64
        )
        idx = [i, j]
        q[:, idx] = q[:, idx] @ g
        m[:, idx] = m[:, idx] @ g
        m[idx, :] = g.T @ m[idx, :]
        free.remove(i)
    return q


def _klt(cov: torch.Tensor, seed: int) -> torch.Tensor:
    """KLT-H rotation fp64 ``[n, n]`` of a covariance; where n has no Hadamard factorization,
    the KLT followed by the Schur-Horn equaliser (same property: equal channel variances)."""
    n = cov.shape[0]
    if _factorizable(n):
        from .calibration import klt_rotation

        return klt_rotation(cov, seed=seed).to(torch.float64)
    return _equalizing_rotation(cov)


def _smooth(absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """fp64 smoothing scales ``[n]``; channels with a zero weight column or activation get a
    finite, positive scale (``smooth_scales`` clamps at 1e-2; 0-columns would give inf)."""
    from .calibration import smooth_scales

    s = smooth_scales(absmax.float(), weight.float(), alpha=alpha).to(torch.float64)
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))


class _Stats:
    """Per-site calibration statistics: per-channel absmax, optionally a covariance."""

    def __init__(self, dim: int, cov: bool):
        from .calibration import CovarianceAccumulator

        self.absmax = torch.zeros(dim, dtype=torch.float64)
        self.cov = CovarianceAccumulator(dim) if cov else None

    def update(self, x: torch.Tensor):
        x = x.detach().reshape(-1, x.shape[-1])
        if not bool(torch.isfinite(x).all()):
            raise ValueError("calibration: the model produced NaN/Inf activations")
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0).to("cpu", torch.float64))
        if self.cov is not None:
            self.cov.update(x.to("cpu"))


def _as_batches(calib_batches, vocab: int) -> list[torch.Tensor]:
    if isinstance(calib_batches, torch.Tensor):
        calib_batches = [calib_batches]
    try:
        batches = list(calib_batches)
    except TypeError:
        raise TypeError(
            "calib_batches: expected a [B, L] tensor of token ids or an iterable of them"
        ) from None
    if not batches:
        raise ValueError("calib_batches: no calibration batches given")
    for i, b in enumerate(batches):
        if not isinstance(b, torch.Tensor) or b.dtype.is_floating_point or b.dtype == torch.bool:
            raise TypeError(f"calib_batches[{i}]: expected an integer tensor of token ids")
        if b.dim() not in (1, 2) or b.numel() == 0:
            raise ValueError(
                f"calib_batches[{i}]: expected a non-empty [B, L] or [L], got {tuple(b.shape)}"
            )
        if int(b.min()) < 0 or int(b.max()) >= vocab:
            raise ValueError(f"calib_batches[{i}]: token ids outside [0, {vocab})")
    return batches


def _run(model: nn.Module, batches, progress: bool = False, desc: str = "calibration"):
    """Every batch through ``model`` (no grad); a tqdm bar on stderr when ``progress``."""
    from tqdm import tqdm

    device = model.backbone.embedding.weight.device
    with torch.no_grad():
        for b in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            model(b.to(device))


# --------------------------------------------------------------------------- calibration pass 1


def _collect(model: MambaLM, batches, method: str, online_klt: bool, progress: bool = False):
    """Statistics of the float model's activations at every site the method transforms."""
    klt = method == "mambaquant"
    eps = model.config.norm_eps
    stats: dict = {}
    hooks = []

    def pre(key, dim, cov, fn=None):
        stats[key] = _Stats(dim, cov)

        def hook(_mod, args):
            x = args[0]
            stats[key].update(x if fn is None else fn(x))

        return hook

    def normalized(h):
        hf = h.double()
        return hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)

    cfg = model.config
    res = _Stats(cfg.d_model, klt)  # n(h) pooled over all norms (R1's covariance)

    def res_hook(_mod, args):
        res.update(normalized(args[0]))

    for i, layer in enumerate(model.backbone.layers):
        mx = layer.mixer
        hooks.append(layer.norm.register_forward_pre_hook(res_hook))
        hooks.append(mx.in_proj.register_forward_pre_hook(pre((i, "in_proj"), cfg.d_model, False)))
        hooks.append(
            mx.x_proj.register_forward_pre_hook(pre((i, "x_proj"), cfg.d_inner, klt and online_klt))
        )
        hooks.append(mx.dt_proj.register_forward_pre_hook(pre((i, "dt_proj"), cfg.dt_rank, klt)))
        hooks.append(
            mx.out_proj.register_forward_pre_hook(
                pre((i, "out_proj"), cfg.d_inner, klt and online_klt)
            )
        )
    hooks.append(model.backbone.norm_f.register_forward_pre_hook(res_hook))
    hooks.append(model.lm_head.register_forward_pre_hook(pre("lm_head", cfg.d_model, False)))
    try:
        _run(model, batches, progress, "quantize_mamba: statistics")
    finally:
        for h in hooks:
            h.remove()
    stats["residual"] = res
    return stats


# --------------------------------------------------------------------------- offline fusion


def _scale_cols(lin: nn.Linear, s: torch.Tensor):
    lin.weight.data.mul_(s[None, :])


def _online_rotation(method: str, online_klt: bool, site_stats, smooth, n: int, seed: int):
    """The online rotation of an ``n``-wide input (out_proj's, x_proj's): a random Hadamard for
    QuaRot and for MambaQuant without ``online_klt``, else for MambaQuant the KLT of the
    covariance of what the rotation sees, x / s (``smooth`` [n]); None for the other methods."""
    if method == "quarot" or (method == "mambaquant" and not online_klt):
        return _online_hadamard(n, seed)
    if method == "mambaquant":
        cov = site_stats.cov.covariance
        return _klt(cov / smooth[:, None] / smooth[None, :], seed).float()
    return None


def _fuse(m: MambaLM, stats, method: str, seed: int, alpha: float, online_klt: bool):
    """Rewrite the float64 copy ``m`` in place; return ``{(i, site) | "lm_head": (rot, smooth)}``
    (the online rotation spec and online smoothing of each linear)."""
    cfg = m.config
    di, r = cfg.d_inner, cfg.dt_rank
    plans: dict = {}
    for i in range(cfg.n_layer):
        for site in _SITES:
            plans[(i, site)] = (None, None)
    plans["lm_head"] = (None, None)
    if method == "rtn":
        return plans

    layers = list(m.backbone.layers)
    if method in ("quarot", "mambaquant"):
        # Norm fusion: W ← W diag(γ), γ ← 1.
        for layer in layers:
            _scale_cols(layer.mixer.in_proj, layer.norm.weight.data)
            layer.norm.weight.data.fill_(1.0)
        _scale_cols(m.lm_head, m.backbone.norm_f.weight.data)
        m.backbone.norm_f.weight.data.fill_(1.0)
        # Residual rotation R1.
        if method == "quarot":
            r1 = _offline_hadamard(cfg.d_model, seed)
        else:
            r1 = _klt(stats["residual"].cov.covariance, seed)
        m.backbone.embedding.weight.data = m.backbone.embedding.weight.data @ r1
        for layer in layers:
            mx = layer.mixer
            mx.in_proj.weight.data = mx.in_proj.weight.data @ r1
            mx.out_proj.weight.data = r1.T @ mx.out_proj.weight.data
            if mx.out_proj.bias is not None:
                mx.out_proj.bias.data = mx.out_proj.bias.data @ r1
        m.lm_head.weight.data = m.lm_head.weight.data @ r1

    for i, layer in enumerate(layers):
        mx = layer.mixer
        base = seed + 1 + 3 * i
        wx = mx.x_proj.weight.data
        # ---- dt path (offline)
        if method == "smoothquant":
            s = _smooth(stats[(i, "dt_proj")].absmax, mx.dt_proj.weight.data, alpha)
            wx[:r] /= s[:, None]
            _scale_cols(mx.dt_proj, s)
        else:
            if method == "quarot":
                r5 = _offline_hadamard(r, base)
            else:
                r5 = _klt(stats[(i, "dt_proj")].cov.covariance, base)
            wx[:r] = r5.T @ wx[:r]
            mx.dt_proj.weight.data = mx.dt_proj.weight.data @ r5
        # ---- out_proj input: S-SiLU smoothing folded into the gate rows, then online rotation
        rot_g = smooth_g = None
        if method in ("smoothquant", "mambaquant"):
            s = _smooth(stats[(i, "out_proj")].absmax, mx.out_proj.weight.data, alpha)
            mx.in_proj.weight.data[di:] /= s[:, None]
            if mx.in_proj.bias is not None:
                mx.in_proj.bias.data[di:] /= s
            mx.gate_scale = s.clone()
            _scale_cols(mx.out_proj, s)
            smooth_g = s
        rot_g = _online_rotation(method, online_klt, stats[(i, "out_proj")], smooth_g, di, base + 1)
        plans[(i, "out_proj")] = (rot_g, None)
        # ---- x_proj input: online smoothing (in the quantize pass) and rotation
        rot_x = smooth_x = None
        if method in ("smoothquant", "mambaquant"):
            smooth_x = _smooth(stats[(i, "x_proj")].absmax, wx, alpha)
        rot_x = _online_rotation(method, online_klt, stats[(i, "x_proj")], smooth_x, di, base + 2)
        plans[(i, "x_proj")] = (rot_x, smooth_x)
        # ---- smoothquant in_proj: s folded into the norm weight
        if method == "smoothquant":
            # u = n(h)·γ is in_proj's float input; W_in (z rows already S-SiLU scaled) its weight
            s = _smooth(stats[(i, "in_proj")].absmax, mx.in_proj.weight.data, alpha)
            layer.norm.weight.data /= s
            _scale_cols(mx.in_proj, s)
    if method == "smoothquant":
        s = _smooth(stats["lm_head"].absmax, m.lm_head.weight.data, alpha)
        m.backbone.norm_f.weight.data /= s
        _scale_cols(m.lm_head, s)
    return plans


# --------------------------------------------------------------------------- public entry


def _get(m: MambaLM, key):
    if key == "lm_head":
        return m, "lm_head"
    i, site = key
    return m.backbone.layers[i].mixer, site


def quantize_mamba(
    model: MambaLM,
    calib_batches,
    method: str = "mambaquant",
    *,
    w_bits: int | None = 8,
    a_bits: int | None = 8,
    seed: int = 0,
    act_granularity: str = "per_tensor",
    alpha: float = 0.5,
    w_percentile: float | None = None,
    quantize_head: bool = True,
    online_klt: bool = False,
    progress: bool = False,
) -> MambaLM:
    """Quantize a :class:`MambaLM` to W{w_bits}A{a_bits}; returns a new model (``model`` is
    left untouched).

    Args:
        calib_batches: a ``[B, L]`` tensor of token ids or an iterable of them (run twice: once
            for the statistics of the float model, once through the transformed float model for
            static activation scales when ``act_granularity="per_tensor"``).
        method: ``"mambaquant"`` | ``"quarot"`` | ``"smoothquant"`` | ``"rtn"`` (module docs).
        w_bits, a_bits: 2..8, or None to keep that side in fp32 (both None: the transformed,
            unquantized model, which computes the same function as ``model``).
        act_granularity: ``"per_tensor"`` (static, calibrated) or ``"per_token"`` (dynamic).
        alpha: SmoothQuant migration strength. w_percentile: weight clipping quantile per row.
        quantize_head: quantize ``lm_head`` too (it is rotated/smoothed either way).
        online_klt: mambaquant's online rotations as dense KLT-H instead of random Hadamard.
        progress: a progress bar (stderr) over the calibration batches of each pass.
    """
    if not isinstance(model, MambaLM):
        raise TypeError(f"quantize_mamba: expected a MambaLM, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"quantize_mamba: method must be one of {METHODS}, got {method!r}")
    if act_granularity not in ("per_tensor", "per_token"):
        raise ValueError(
            f"act_granularity must be 'per_tensor' (static) or 'per_token', got {act_granularity!r}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    for name, bits in (("w_bits", w_bits), ("a_bits", a_bits)):
        if bits is not None and (
            isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8
        ):
            raise ValueError(f"{name} must be an int in 2..8 or None, got {bits!r}")
    if any(isinstance(mod, QuantLinear) for mod in model.modules()):
        raise ValueError("quantize_mamba: the model is already quantized")
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"quantize_mamba: parameter {name} has NaN/Inf entries")
    batches = _as_batches(calib_batches, model.config.vocab_size)
    device = next(model.parameters()).device

    was_training = model.training
    model.eval()
    try:
        stats = _collect(model, batches, method, online_klt, progress)
    finally:
        model.train(was_training)

    m64 = copy.deepcopy(model).to("cpu", torch.float64).eval()
    plans = _fuse(m64, stats, method, seed, alpha, online_klt)
    if not quantize_head:
        plans.pop("lm_head")

    def build(static: dict, **kw) -> MambaLM:
        """A copy of the fused float64 model with every planned linear a QuantLinear (``kw``
        and ``static[key]``, its static activation scale, to quantize_linear), float32 on
        ``device``, in eval mode."""
        mm = copy.deepcopy(m64)
        for key, (rot, smooth) in plans.items():
            parent, name = _get(mm, key)
            lin = quantize_linear(
                getattr(parent, name),
                rotation=rot,
                smooth=smooth,
                static_scale=static.get(key),
                **kw,
            )
            setattr(parent, name, lin)
        return mm.to(torch.float32).to(device).eval()

    static = {}
    if a_bits is not None and act_granularity == "per_tensor":
        # Pass 2: absmax of every QuantLinear's transformed input in the float transformed model.
        flt = build({}, w_bits=None, a_bits=None, act_granularity="per_tensor")
        absmax = {key: 0.0 for key in plans}
        hooks = []
        for key in plans:
            parent, name = _get(flt, key)
            mod = getattr(parent, name)

            def hook(mod, args, key=key):
                x = mod.transform_input(args[0].reshape(-1, mod.in_features))
                absmax[key] = max(absmax[key], float(x.abs().max()))

            hooks.append(mod.register_forward_pre_hook(hook))
        try:
            _run(flt, batches, progress, "quantize_mamba: activation scales")
        finally:
            for h in hooks:
                h.remove()
        qmax = 2 ** (a_bits - 1) - 1
        static = {key: max(a / qmax, 1e-12) for key, a in absmax.items()}
        del flt

    out = build(
        static,
        act_granularity=act_granularity,
        w_bits=w_bits,
        a_bits=a_bits,
        w_percentile=w_percentile,
    )
    out.quant_method = method
    return out
