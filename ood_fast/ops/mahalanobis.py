"""Batched Mahalanobis distances with a fused reduction: the op behind every Gaussian score.

Math (all backends; ``reference.mahalanobis.fused`` is the readable version)::

    x̃ = x − center                          # center = mean of the class means
    d²[n, c] = ‖x̃_n W_g(c)‖² − 2 x̃_n · proj[:, c] + const[c]

The quadratic term depends only on the covariance group g (one group for a tied covariance),
so a tied score costs one triangular whitening GEMM (N·D² flops, W is triangular) plus one
N·D·C GEMM, and nothing of size N×N or C×N×D is ever built. Diagonal covariances need no
whitening at all: d² is one GEMM of [x̃², x̃] ([N, 2D]) against [C, 2D] weights.

Public entry points: ``mahalanobis_plan`` (precompute once, float64) and ``mahalanobis``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .. import _backend
from .. import _extensions as ext
from .._validate import check_features
from ..reference import mahalanobis as ref

OP = "mahalanobis_fused"
REDUCTIONS = ("none", "min", "logsumexp")
PRECISIONS = ("fp32", "bf16")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class MinResult(NamedTuple):
    values: torch.Tensor  # [N] min_c d²
    indices: torch.Tensor  # [N] argmin_c d², int64


@dataclass(frozen=True, eq=False)
class MahalanobisPlan:
    """Precomputed, device-resident parameters of a set of Gaussians (build with ``mahalanobis_plan``).

    Natural parameters (for references, gradients and persistence):
        means ``[C, D]``; factors ``[G, D, D]`` (precision P_g = W_g W_gᵀ) or None;
        inv_var ``[C, D]`` (diagonal covariance) or None; group ``[C]`` int64.
        shift ``[D]``: the mean of the means, subtracted from features first.
    Kernel parameters (the expanded form; for diagonal plans E = 2D, else E = D):
        center ``[E]``, proj ``[E, C]``, const ``[C]``, kernel_factors ``[G, E, E]`` or None.
    """

    means: torch.Tensor
    factors: torch.Tensor | None
    inv_var: torch.Tensor | None
    group: torch.Tensor
    shift: torch.Tensor
    center: torch.Tensor
    proj: torch.Tensor
    const: torch.Tensor
    triangular: bool
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def diagonal(self) -> bool:
        return self.inv_var is not None

    @property
    def device(self) -> torch.device:
        return self.means.device

    def to(self, device) -> MahalanobisPlan:
        """This plan on ``device`` (cached, so repeated calls cost nothing)."""
        device = torch.device(device)
        if device == self.device:
            return self
        key = ("device", str(device))
        if key not in self._cache:

            def mv(t):
                return None if t is None else t.to(device)

            self._cache[key] = MahalanobisPlan(
                mv(self.means),
                mv(self.factors),
                mv(self.inv_var),
                mv(self.group),
                mv(self.shift),
                mv(self.center),
                mv(self.proj),
                mv(self.const),
                self.triangular,
            )
        return self._cache[key]

    @property
    def kernel_factors(self) -> torch.Tensor | None:
        return None if self.diagonal else self.factors


def mahalanobis_plan(
    means: torch.Tensor,
    factors: torch.Tensor | None = None,
    *,
    inv_var: torch.Tensor | None = None,
    group: torch.Tensor | None = None,
    triangular: bool = False,
    dtype: torch.dtype = torch.float32,
) -> MahalanobisPlan:
    """Precompute the expanded-form parameters once, in float64.

    Args:
        means: ``[C, D]`` class means.
        factors: ``[G, D, D]`` (or ``[D, D]``) whitening factors W_g with precision P_g = W_g W_gᵀ,
            e.g. W = L⁻ᵀ for the Cholesky factor L of the covariance (upper triangular: pass
            ``triangular=True`` so kernels can skip the zero half).
        inv_var: ``[C, D]`` (or ``[D]``) inverse variances, for diagonal covariances.
        group: ``[C]`` factor index per class; default all 0 (tied) when G = 1, else ``arange(C)``.
        dtype: storage dtype of the plan (float32 for the kernels; float64 for exact references).
    """
    means = torch.as_tensor(means)
    if means.dim() != 2 or means.shape[0] < 1:
        raise ValueError(f"means: expected [C, D] with C >= 1, got {tuple(means.shape)}")
    C, D = means.shape
    if (factors is None) == (inv_var is None):
        raise ValueError("give exactly one of factors= (dense covariance) or inv_var= (diagonal)")
    dev = means.device
    m64 = means.to(torch.float64)
    center = m64.mean(dim=0)
    mc = m64 - center  # [C, D]
    if factors is not None:
        factors = torch.as_tensor(factors).to(dev)
        if factors.dim() == 2:
            factors = factors[None]
        if factors.dim() != 3 or factors.shape[1:] != (D, D):
            raise ValueError(f"factors: expected [G, {D}, {D}], got {tuple(factors.shape)}")
        G = factors.shape[0]
        if group is None:
            if G not in (1, C):
                raise ValueError(f"factors has G={G} groups for C={C} classes: pass group=")
            group = torch.zeros(C, dtype=torch.long) if G == 1 else torch.arange(C)
        group = torch.as_tensor(group, dtype=torch.long).to(dev)
        if group.shape != (C,) or int(group.min()) < 0 or int(group.max()) >= G:
            raise ValueError(
                f"group: expected [C={C}] indices in [0, {G}), got {group.tolist()[:8]}"
            )
        w64 = factors.to(torch.float64)
        # One group at a time, so a tied plan never expands W to [C, D, D].
        mw = torch.empty_like(mc)  # [C, D] whitened means m_c W_g
        proj_t = torch.empty_like(mc)  # [C, D] P_g m_c
        for g in torch.unique(group).tolist():
            members = (group == g).nonzero().flatten()
            mw[members] = mc[members] @ w64[g]
            proj_t[members] = mw[members] @ w64[g].T
        proj = proj_t.T
        const = mw.square().sum(dim=1)
        kernel_center = center
        inv = None
    else:
        inv = torch.as_tensor(inv_var).to(dev, torch.float64)
        if inv.dim() == 1:
            inv = inv.expand(C, D)
        if inv.shape != (C, D):
            raise ValueError(f"inv_var: expected [{C}, {D}] or [{D}], got {tuple(inv.shape)}")
        if bool((inv < 0).any()) or not bool(torch.isfinite(inv).all()):
            raise ValueError("inv_var: inverse variances must be finite and >= 0")
        # d² = Σ_j x̃_j² a_cj − 2 x̃_j m_cj a_cj + Σ_j m_cj² a_cj, as one GEMM over u = [x̃², x̃]
        proj = torch.cat([-0.5 * inv, mc * inv], dim=1).T.contiguous()  # [2D, C]
        const = (mc.square() * inv).sum(dim=1)
        kernel_center = torch.zeros(2 * D, dtype=torch.float64, device=dev)
        group = torch.zeros(C, dtype=torch.long, device=dev)
        inv = inv.to(dtype).contiguous()
        factors = None

    def cast(t):
        return t.to(dtype).contiguous()

    return MahalanobisPlan(
        means=cast(means.to(torch.float64)),
        factors=None if factors is None else cast(factors),
        inv_var=inv,
        group=group.contiguous(),
        shift=cast(center),
        center=cast(kernel_center),
        proj=cast(proj),
        const=cast(const),
        triangular=bool(triangular) and factors is not None,
    )


# ---------------------------------------------------------------------------------------------
# The fused kernel call, with an analytic backward
# ---------------------------------------------------------------------------------------------


def _kernel_args(plan: MahalanobisPlan):
    return plan.center, plan.kernel_factors, plan.proj, plan.const, plan.group


def _run(u, plan, reduce, bias, precision, backend):
    center, factors, proj, const, group = _kernel_args(plan)
    return _backend.call(
        OP,
        u,
        center,
        factors,
        proj,
        const,
        group,
        reduce,
        bias,
        plan.triangular,
        precision,
        backend=backend,
    )


class _Fused(torch.autograd.Function):
    """d/du of the fused distances: ∂d²_c/∂u = 2 P_g(c) ũ − 2 proj[:, c]."""

    @staticmethod
    def forward(ctx, u, plan, reduce, bias, precision, backend):
        out = _run(u, plan, reduce, bias, precision, backend)
        ctx.plan, ctx.reduce, ctx.bias, ctx.precision, ctx.backend = (
            plan,
            reduce,
            bias,
            precision,
            backend,
        )
        ctx.save_for_backward(u, out[1] if reduce == "min" else None)
        if reduce == "min":
            ctx.mark_non_differentiable(out[1])
            return out
        return out

    @staticmethod
    def backward(ctx, *grads):
        u, idx = ctx.saved_tensors
        plan = ctx.plan
        center, factors, proj, _, group = _kernel_args(plan)
        N, C = u.shape[0], proj.shape[1]
        acc = torch.float64 if u.dtype == torch.float64 else torch.float32
        g = grads[0].to(acc)
        if ctx.reduce == "none":
            gd2 = g
        elif ctx.reduce == "min":
            gd2 = torch.zeros(N, C, dtype=acc, device=u.device)
            gd2.scatter_(1, idx[:, None], g[:, None])
        else:  # logsumexp: ∂/∂d²_c = −½ softmax_c(bias − d²/2)
            d2 = _run(u.detach(), plan, "none", None, ctx.precision, ctx.backend).to(acc)
            bias = (
                ctx.bias.to(acc)
                if ctx.bias is not None
                else torch.zeros(C, dtype=acc, device=u.device)
            )
            gd2 = -0.5 * torch.softmax(bias - 0.5 * d2, dim=1) * g[:, None]
        ut = u.detach().to(acc) - center.to(acc)
        grad = -2.0 * gd2 @ proj.to(acc).T
        if factors is not None:
            weight = torch.zeros(N, factors.shape[0], dtype=acc, device=u.device)
            weight.index_add_(1, group, gd2)
            for gi in torch.nonzero(weight.abs().sum(0)).flatten().tolist():
                w_g = factors[gi].to(acc)
                grad += 2.0 * weight[:, gi : gi + 1] * ((ut @ w_g) @ w_g.T)
        return grad.to(u.dtype), None, None, None, None, None


def mahalanobis(
    x: torch.Tensor,
    plan: MahalanobisPlan,
    reduce: str = "min",
    *,
    bias: torch.Tensor | None = None,
    precision: str = "fp32",
    backend: str | None = None,
):
    """Squared Mahalanobis distances of ``x`` to every Gaussian in ``plan``, reduced over classes.

    Args:
        x: ``[N, D]`` features, float32/float16/bfloat16 (float64: torch backend only).
        plan: from ``mahalanobis_plan``, on x's device.
        reduce: ``"none"`` → d² ``[N, C]``; ``"min"`` → ``MinResult(values [N], indices [N])``;
            ``"logsumexp"`` → ``[N]`` logsumexp_c(bias_c − d²_c / 2).
        bias: ``[C]`` per-class additive term for ``"logsumexp"`` (log prior − ½ log det Σ_c ...).
        precision: ``"fp32"``, or ``"bf16"`` to round GEMM operands to bfloat16 with fp32
            accumulation (median relative error ~1e-4). The C++ kernel runs it on AMX where the
            CPU has it (~6x its fp32 speed here), else on AVX512-BF16 or the fp32 kernel,
            whichever it measures faster.
        backend: ``"cpu"``, ``"triton"``, ``"cuda"``, ``"torch"`` or None (automatic).

    Differentiable with respect to ``x`` (analytic backward), for input preprocessing.
    Memory beyond the output: O(tile × (D + C)) per thread; nothing N×N or C×N×D.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not isinstance(plan, MahalanobisPlan):
        raise TypeError("plan: expected a MahalanobisPlan from ood_fast.ops.mahalanobis_plan")
    x = check_features(x, "x", dim=plan.dim)
    if x.device != plan.device:
        raise ValueError(
            f"x is on {x.device} but the plan is on {plan.device}: use plan.to(x.device)"
        )
    if bias is not None:
        bias = torch.as_tensor(bias, device=x.device)
        if bias.shape != (plan.num_classes,):
            raise ValueError(f"bias: expected [{plan.num_classes}], got {tuple(bias.shape)}")
    x = x.contiguous()
    if plan.diagonal:
        xt = x.float() if x.dtype != torch.float64 else x
        xt = xt - plan.shift.to(xt.dtype)
        u = torch.cat([xt.square(), xt], dim=1)
    else:
        u = x
    if torch.is_grad_enabled() and u.requires_grad:
        out = _Fused.apply(u, plan, reduce, bias, precision, backend)
    else:
        out = _run(u, plan, reduce, bias, precision, backend)
    return MinResult(*out) if reduce == "min" else out


# ---------------------------------------------------------------------------------------------
# Backends. Each gets (u, center, factors, proj, const, group, reduce, bias, triangular,
# precision) with u [N, E] contiguous, parameters float32 on u's device (the torch reference
# also accepts float64), and returns what reference.fused returns.
# ---------------------------------------------------------------------------------------------


def _compiled_check(backend: str, symbol: str):
    def check(u, center, factors, proj, *args) -> list[str]:
        return ext.missing_symbol(backend, symbol) + _dtype_reasons(u, proj)

    return check


def _dtype_reasons(u, proj) -> list[str]:
    why = []
    if u.dtype not in _KERNEL_DTYPES:
        why.append(f"compiled kernels take float32/float16/bfloat16 features, got {u.dtype}")
    if proj.dtype != torch.float32:
        why.append(f"compiled kernels take a float32 plan, got {proj.dtype}")
    return why


_backend.register(OP, "torch")(ref.fused)


def _alloc(u, C, reduce):
    N = u.shape[0]
    if reduce == "none":
        return torch.empty(N, C, dtype=torch.float32, device=u.device), None
    idx = torch.empty(N, dtype=torch.long, device=u.device) if reduce == "min" else None
    return torch.empty(N, dtype=torch.float32, device=u.device), idx


_DTYPE_CODE = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_REDUCE_CODE = {"none": 0, "min": 1, "logsumexp": 2}


@_backend.register(OP, "cpu", check=_compiled_check("cpu", "FusedDistance"))
def _cpu(u, center, factors, proj, const, group, reduce, bias, triangular, precision):
    C = proj.shape[1]
    out, idx = _alloc(u, C, reduce)
    if u.shape[0] == 0:
        return (out, idx) if reduce == "min" else out
    key = ("cpu", precision)
    cache = _owner_cache(proj)
    if key not in cache:
        cache[key] = ext.cpu_module().FusedDistance(
            center.data_ptr(),
            0 if factors is None else factors.data_ptr(),
            0 if factors is None else factors.shape[0],
            proj.data_ptr(),
            const.data_ptr(),
            group.data_ptr(),
            proj.shape[0],
            C,
            bool(triangular),
            precision == "bf16",
        )
    cache[key].run(
        u.data_ptr(),
        _DTYPE_CODE[u.dtype],
        u.shape[0],
        _REDUCE_CODE[reduce],
        0 if bias is None else bias.float().contiguous().data_ptr(),
        out.data_ptr(),
        0 if idx is None else idx.data_ptr(),
        ext.num_threads(),
    )
    return (out, idx) if reduce == "min" else out


@_backend.register(OP, "cuda", check=_compiled_check("cuda", "mahalanobis_fused"))
def _cuda(u, center, factors, proj, const, group, reduce, bias, triangular, precision):
    C = proj.shape[1]
    out, idx = _alloc(u, C, reduce)
    if u.shape[0] == 0:
        return (out, idx) if reduce == "min" else out
    bias_ = None if bias is None else bias.float().contiguous()
    ext.cuda_module().mahalanobis_fused(
        u.data_ptr(),
        _DTYPE_CODE[u.dtype],
        u.shape[0],
        u.shape[1],
        center.data_ptr(),
        0 if factors is None else factors.data_ptr(),
        0 if factors is None else factors.shape[0],
        proj.data_ptr(),
        const.data_ptr(),
        group.data_ptr(),
        C,
        _REDUCE_CODE[reduce],
        0 if bias_ is None else bias_.data_ptr(),
        out.data_ptr(),
        0 if idx is None else idx.data_ptr(),
        bool(triangular),
        precision == "bf16",
        torch.cuda.current_stream(u.device).cuda_stream,
    )
    return (out, idx) if reduce == "min" else out


@_backend.register(OP, "triton", check=_compiled_check("triton", "mahalanobis"))
def _triton(u, center, factors, proj, const, group, reduce, bias, triangular, precision):
    from ..kernels import mahalanobis as tk  # imports triton: only when this backend runs

    return tk.mahalanobis_fused(
        u, center, factors, proj, const, group, reduce, bias, triangular, precision
    )


# Packed per-backend parameters live with the plan tensors they were built from. The C++ object
# copies what it needs at construction, so keying on the proj tensor's identity is safe.
_PACKED: dict[int, tuple[torch.Tensor, dict]] = {}


def _owner_cache(proj: torch.Tensor) -> dict:
    entry = _PACKED.get(id(proj))
    if entry is None or entry[0] is not proj:
        if len(_PACKED) > 64:  # plans come and go; keep the cache bounded
            _PACKED.clear()
        entry = (proj, {})
        _PACKED[id(proj)] = entry
    return entry[1]
