"""Reference Mahalanobis distances, two ways.

``squared_distances`` follows the definition literally, d²[n, c] = ‖(x_n − μ_c) W_g(c)‖², with
precision P_g = W_g W_gᵀ. It is the independent truth (tested against scipy and sklearn).

``fused`` is the expanded form every backend computes, in plain torch; it is also the ``torch``
backend of ``ops.mahalanobis``:

    x̃ = x − center
    d²[n, c] = q[n, g(c)] − 2 x̃_n · proj[:, c] + const[c],    q[n, g] = ‖x̃_n W_g‖²

with proj[:, c] = P_g(c) m_c and const[c] = m_cᵀ P_g(c) m_c for centered means m_c = μ_c − center.
d² is clamped at 0 (rounding can push a near-zero distance below it).
"""

from __future__ import annotations

import torch

CHUNK = 4096  # rows per step: bounds memory at CHUNK × (D + C) floats


def squared_distances(
    x: torch.Tensor,
    means: torch.Tensor,
    factors: torch.Tensor | None = None,
    group: torch.Tensor | None = None,
    inv_var: torch.Tensor | None = None,
) -> torch.Tensor:
    """Literal squared Mahalanobis distances.

    Args:
        x: ``[N, D]`` features.
        means: ``[C, D]`` class means.
        factors: ``[G, D, D]`` whitening factors W_g (precision P_g = W_g W_gᵀ), dense covariance.
        group: ``[C]`` index into ``factors`` for each class (default: all 0, tied covariance).
        inv_var: ``[C, D]`` inverse variances, diagonal covariance (instead of ``factors``).

    Returns:
        ``[N, C]`` squared distances in the promoted dtype of the inputs.
    """
    C = means.shape[0]
    out = torch.empty(
        x.shape[0], C, dtype=torch.promote_types(x.dtype, means.dtype), device=x.device
    )
    if group is None:
        group = torch.zeros(C, dtype=torch.long, device=means.device)
    for c in range(C):
        diff = x.to(out.dtype) - means[c].to(out.dtype)  # [N, D]
        if inv_var is not None:
            out[:, c] = (diff * diff * inv_var[c].to(out.dtype)).sum(dim=1)
        else:
            z = diff @ factors[int(group[c])].to(out.dtype)
            out[:, c] = (z * z).sum(dim=1)
    return out


def _quadratic_terms(xt: torch.Tensor, factors: torch.Tensor | None) -> torch.Tensor | None:
    """q[n, g] = ‖x̃_n W_g‖², ``[N, G]``."""
    if factors is None:
        return None
    return torch.stack([(xt @ w).square().sum(dim=1) for w in factors], dim=1)


def fused(
    x: torch.Tensor,
    center: torch.Tensor,
    factors: torch.Tensor | None,
    proj: torch.Tensor,
    const: torch.Tensor,
    group: torch.Tensor,
    reduce: str = "min",
    bias: torch.Tensor | None = None,
    triangular: bool = False,
    precision: str = "fp32",
):
    """Expanded-form distances with a fused reduction (the contract of every backend).

    Args:
        x: ``[N, E]`` features (fp16/bf16/fp32; fp64 computes in fp64).
        center: ``[E]`` subtracted first (the mean of the class means; keeps fp32 well conditioned).
        factors: ``[G, E, E]`` whitening factors, or None for no quadratic term (G = 0).
        proj: ``[E, C]`` cross-term weights.
        const: ``[C]`` per-class constants.
        group: ``[C]`` int64 factor index per class (ignored when ``factors`` is None).
        reduce: ``"none"`` → d² ``[N, C]``; ``"min"`` → (min d² ``[N]``, argmin ``[N]`` int64);
            ``"logsumexp"`` → ``[N]`` logsumexp_c(bias_c − d²_c / 2).
        bias: ``[C]`` log-prior + log-normaliser per class, for ``"logsumexp"`` (default 0).
        triangular: factors are upper triangular (a hint; the result is the same).
        precision: ``"fp32"`` or ``"bf16"`` (GEMM inputs rounded to bf16, fp32 accumulation).
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32

    def gemm_in(t):  # GEMM operand: bf16-rounded values in the accumulation dtype
        return t.to(torch.bfloat16).to(acc) if precision == "bf16" else t.to(acc)

    N, C = x.shape[0], proj.shape[1]
    dev = x.device
    if reduce == "none":
        out = torch.empty(N, C, dtype=acc, device=dev)
    elif reduce == "min":
        out = (torch.empty(N, dtype=acc, device=dev), torch.empty(N, dtype=torch.long, device=dev))
    elif reduce == "logsumexp":
        out = torch.empty(N, dtype=acc, device=dev)
    else:
        raise ValueError(f"reduce must be 'none', 'min' or 'logsumexp', got {reduce!r}")
    center_, proj_, const_ = center.to(acc), gemm_in(proj), const.to(acc)
    factors_ = gemm_in(factors) if factors is not None else None
    bias_ = bias.to(acc) if bias is not None else torch.zeros(C, dtype=acc, device=dev)
    for s in range(0, N, CHUNK):
        xt = gemm_in(x[s : s + CHUNK].to(acc) - center_)
        d2 = (xt @ proj_).mul_(-2.0).add_(const_)
        q = _quadratic_terms(xt, factors_)
        if q is not None:
            d2 += q[:, group]
        d2.clamp_(min=0.0)
        if reduce == "none":
            out[s : s + CHUNK] = d2
        elif reduce == "min":
            v, i = d2.min(dim=1)
            out[0][s : s + CHUNK], out[1][s : s + CHUNK] = v, i
        else:
            out[s : s + CHUNK] = torch.logsumexp(bias_ - 0.5 * d2, dim=1)
    return out
