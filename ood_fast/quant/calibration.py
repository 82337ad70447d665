"""Calibration statistics for rotation quantization: covariance, KLT rotations, observers, smoothing.

* ``CovarianceAccumulator(dim)``: streaming float64 mean and centred scatter, mergeable across
  batches and workers (Chan et al.'s pairwise update: no catastrophic cancellation from
  ``E[xxᵀ] − μμᵀ`` on data with a large mean).
* ``klt_rotation(cov, seed)``: ``R = V · diag(s) H_n / sqrt(n)`` in float64, V the eigenvectors of
  Σ (descending eigenvalues). Applied as ``x ↦ x R``: ``Rᵀ Σ R = Hᵀ Λ H / n`` whose diagonal is
  ``Σ_i H[i, j]² λ_i / n = tr(Σ) / n`` for every j (exact variance equalisation; the Hadamard
  alone leaves the spread of a spiked covariance).
* ``AbsMaxObserver`` / ``PercentileObserver(q)``: per-channel and per-tensor clipping ranges.
* ``smooth_scales(act_absmax, weight, alpha)``: SmoothQuant migration scales
  ``s_j = max(a_j^α / max_i |W_ij|^(1−α), min_scale)``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .._validate import as_tensor
from ..reference.hadamard import random_hadamard


def _rows(x, dim: int, name: str = "x") -> torch.Tensor:
    """x ``[..., dim]`` (finite floating) as float64 ``[rows, dim]``."""
    x = as_tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected floating values, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != dim:
        raise ValueError(f"{name}: expected shape [..., {dim}], got {tuple(x.shape)}")
    x = x.detach().reshape(-1, dim).to(torch.float64)
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN/Inf values")
    return x


def _check_dim(dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    return int(dim)


class CovarianceAccumulator:
    """Streaming mean and covariance of rows of ``[..., dim]`` in float64.

    State: ``count``, ``mean [dim]``, ``m2 [dim, dim] = Σ (x − mean)ᵀ (x − mean)``. A batch is
    reduced to its own (count, mean, m2) and merged with Chan's update
    ``m2 = m2_a + m2_b + δ δᵀ · n_a n_b / n`` (δ = mean_b − mean_a), which is exact algebra and
    numerically sound: no large-mean cancellation, and merging per-worker accumulators gives the
    same result as one pass over all the data (up to rounding).

    The state lives on the device of the first update (``device=`` overrides); later batches and
    merged accumulators are moved there.
    """

    def __init__(self, dim: int, device=None):
        self.dim = _check_dim(dim)
        self.count = 0
        self._device = None if device is None else torch.device(device)
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None

    def _absorb(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if n == 0:
            return
        if self._device is None:
            self._device = mean.device
        mean, m2 = mean.to(self._device), m2.to(self._device)
        if self.count == 0:
            self.count, self._mean, self._m2 = n, mean.clone(), m2.clone()
            return
        total = self.count + n
        delta = mean - self._mean
        self._mean = self._mean + delta * (n / total)
        self._m2 = self._m2 + m2 + torch.outer(delta, delta) * (self.count * n / total)
        self.count = total

    def update(self, x) -> CovarianceAccumulator:
        """Add the rows of ``x [..., dim]`` (any float dtype; NaN/Inf rejected). Returns self."""
        rows = _rows(x, self.dim)
        n = rows.shape[0]
        if n:
            mean = rows.mean(dim=0)
            centred = rows - mean
            self._absorb(n, mean, centred.T @ centred)
        return self

    def merge(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """Fold another accumulator (e.g. another worker's) into this one. Returns self."""
        if not isinstance(other, CovarianceAccumulator):
            raise TypeError(f"merge: expected a CovarianceAccumulator, got {type(other).__name__}")
        if other.dim != self.dim:
            raise ValueError(f"merge: dimension mismatch ({self.dim} vs {other.dim})")
        if other.count:
            self._absorb(other.count, other._mean, other._m2)
        return self

    def _need(self) -> None:
        if self.count == 0:
            raise ValueError("CovarianceAccumulator has no samples yet: call update() first")

    @property
    def mean(self) -> torch.Tensor:
        """float64 ``[dim]``."""
        self._need()
        return self._mean.clone()

    @property
    def covariance(self) -> torch.Tensor:
        """Centred covariance ``m2 / count`` (the maximum-likelihood, biased estimate), fp64."""
        self._need()
        return self._m2 / self.count

    @property
    def second_moment(self) -> torch.Tensor:
        """Uncentred ``E[xᵀ x] = covariance + mean meanᵀ``, float64 ``[dim, dim]``."""
        self._need()
        return self._m2 / self.count + torch.outer(self._mean, self._mean)

    def state_dict(self) -> dict:
        """``{"dim", "count", "mean", "m2"}`` (for saving or sending between workers)."""
        return {"dim": self.dim, "count": self.count, "mean": self._mean, "m2": self._m2}

    @classmethod
    def from_state_dict(cls, state: dict) -> CovarianceAccumulator:
        acc = cls(state["dim"])
        if state["count"]:
            acc._absorb(int(state["count"]), state["mean"], state["m2"])
        return acc

    def __repr__(self) -> str:
        return f"CovarianceAccumulator(dim={self.dim}, count={self.count})"


def klt_rotation(cov, seed: int = 0) -> torch.Tensor:
    """The KLT-enhanced Hadamard rotation ``R = V · diag(s) H_n / sqrt(n)``, float64 ``[n, n]``.

    Args:
        cov: ``[n, n]`` covariance (symmetric; symmetrised here against rounding), n a supported
            Hadamard size.
        seed: seed of the random signs s (``random_hadamard(n, seed)``).

    Returns:
        Orthonormal R (``R Rᵀ = I``), applied as ``x ↦ x R``; the rotated covariance ``Rᵀ Σ R``
        has every diagonal entry equal to ``tr(Σ) / n``. V: eigenvectors of Σ in descending
        eigenvalue order (float64 ``eigh``).
    """
    cov = as_tensor(cov, "cov")
    if not cov.is_floating_point():
        raise TypeError(f"cov: expected a floating matrix, got {cov.dtype}")
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov: expected a square [n, n] matrix, got {tuple(cov.shape)}")
    n = cov.shape[0]
    H = random_hadamard(n, seed).matrix(torch.float64).to(cov.device)  # ValueError for bad n
    c = cov.detach().to(torch.float64)
    if not bool(torch.isfinite(c).all()):
        raise ValueError("cov: contains NaN/Inf values")
    c = 0.5 * (c + c.T)
    _, V = torch.linalg.eigh(c)  # ascending eigenvalues
    V = V.flip(-1)
    return V @ H


def _quantile(v: torch.Tensor, q: float, dim: int | None = None) -> torch.Tensor:
    """The q-quantile along ``dim`` (None: over everything), linear interpolation (numpy's)."""
    if dim is None:
        v, dim = v.reshape(-1), 0
    size = v.shape[dim]
    pos = q * (size - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, size - 1)
    frac = pos - lo
    a = torch.kthvalue(v, lo + 1, dim=dim).values  # kthvalue is O(size): no full sort
    if frac == 0 or hi == lo:
        return a
    b = torch.kthvalue(v, hi + 1, dim=dim).values
    return a + (b - a) * frac


def _infer_dim(obs, x) -> torch.Tensor:
    """x as a tensor; fixes ``obs.dim`` from x's last dimension on the first batch."""
    x = as_tensor(x, "x")
    if obs.dim is None:
        if x.dim() == 0:
            raise ValueError("x: expected shape [..., dim], got a scalar")
        obs.dim = _check_dim(int(x.shape[-1]))
    return x


class AbsMaxObserver:
    """Running max of |x| per channel (last dimension) over every observed batch, float32.

    ``dim`` may be left None: the first batch fixes it.
    """

    def __init__(self, dim: int | None = None):
        self.dim = None if dim is None else _check_dim(dim)
        self.count = 0
        self._absmax: torch.Tensor | None = None

    def update(self, x) -> AbsMaxObserver:
        """Observe ``x [..., dim]``. Returns self."""
        rows = _rows(_infer_dim(self, x), self.dim)
        if rows.shape[0]:
            m = rows.abs().amax(dim=0).to(torch.float32)
            self._absmax = (
                m
                if self._absmax is None
                else torch.maximum(self._absmax, m.to(self._absmax.device))
            )
            self.count += rows.shape[0]
        return self

    def per_channel(self) -> torch.Tensor:
        """float32 ``[dim]``: max |x_j| over all observed rows."""
        if self._absmax is None:
            raise ValueError("the observer has seen no data yet: call update() first")
        return self._absmax.clone()

    def per_tensor(self) -> float:
        """max |x| over everything observed."""
        return float(self.per_channel().max())

    @property
    def absmax(self) -> torch.Tensor:
        return self.per_channel()


class PercentileObserver:
    """The q-quantile of |x| per channel and over the whole tensor (q a fraction in (0, 1]).

    Keeps the observed rows (float32, on CPU) up to ``max_rows``; beyond that a uniform
    reservoir sample of rows (seeded), so the quantiles become estimates. Quantiles use linear
    interpolation between order statistics (numpy's default).
    """

    def __init__(self, q: float = 0.999, dim: int | None = None, max_rows: int = 16384, seed=0):
        if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0 < float(q) <= 1:
            raise ValueError(f"q must be a fraction in (0, 1], got {q!r}")
        self.q = float(q)
        self.dim = None if dim is None else _check_dim(dim)
        self.max_rows = int(max_rows)
        self.count = 0
        self._rows: list[torch.Tensor] = []
        self._kept = 0
        self._gen = torch.Generator().manual_seed(int(seed))

    def update(self, x) -> PercentileObserver:
        """Observe ``x [..., dim]`` (dim fixed by the first batch when not given). Returns self."""
        rows = _rows(_infer_dim(self, x), self.dim).abs().to("cpu", torch.float32)
        n = rows.shape[0]
        if n == 0:
            return self
        room = self.max_rows - self._kept
        if room > 0:
            take = rows[:room]
            self._rows.append(take)
            self._kept += take.shape[0]
            rows = rows[room:]
            self.count += take.shape[0]
        if rows.shape[0]:
            # Reservoir sampling (algorithm R), vectorised: row number t (1-based, t > max_rows)
            # replaces a uniformly chosen kept row with probability max_rows / t.
            kept = torch.cat(self._rows) if len(self._rows) > 1 else self._rows[0]
            t = self.count + 1 + torch.arange(rows.shape[0], dtype=torch.float64)
            u = torch.rand(rows.shape[0], generator=self._gen, dtype=torch.float64)
            slot = torch.floor(u * t).to(torch.int64)
            hit = (slot < self.max_rows).nonzero().flatten()
            # Sequentially a later row overwrites an earlier one in the same slot: keep, per
            # slot, the last hit (the first in reversed order).
            rev = hit.flip(0)
            _, first = np.unique(slot[rev].numpy(), return_index=True)
            winners = rev[torch.from_numpy(first)]
            kept[slot[winners]] = rows[winners]
            self._rows = [kept]
            self.count += rows.shape[0]
        return self

    def _all(self) -> torch.Tensor:
        if not self._rows:
            raise ValueError("the observer has seen no data yet: call update() first")
        if len(self._rows) > 1:
            self._rows = [torch.cat(self._rows)]
        return self._rows[0]

    def per_channel(self) -> torch.Tensor:
        """float32 ``[dim]``: the q-quantile of |x_j| per channel."""
        return _quantile(self._all(), self.q, dim=0)

    def per_tensor(self) -> float:
        """The q-quantile of |x| over every kept value."""
        return float(_quantile(self._all(), self.q))


def smooth_scales(act_absmax, weight, alpha: float = 0.5, min_scale: float = 1e-2) -> torch.Tensor:
    """SmoothQuant scales ``s_j = max(a_j^α / max_i |W_ij|^(1−α), min_scale)``, float32 ``[n]``.

    Args:
        act_absmax: ``[n]`` per-input-channel activation absmax (≥ 0).
        weight: ``[out, n]`` weight of the linear consuming the activations (or several stacked).
        alpha: migration strength in [0, 1].
        min_scale: floor of the scales (> 0), so a dead channel never divides by ~0.

    Computed in float64. A weight column that is all zero has its max |W| floored at 1e-5 (the
    SmoothQuant convention) so the ratio stays finite. Usage: ``x / s`` and ``W · s`` (columns).
    """
    a = as_tensor(act_absmax, "act_absmax").detach().to(torch.float64)
    w = as_tensor(weight, "weight").detach()
    if a.dim() != 1:
        raise ValueError(f"act_absmax: expected [n], got {tuple(a.shape)}")
    if w.dim() != 2 or w.shape[1] != a.shape[0]:
        raise ValueError(f"weight: expected [out, n={a.shape[0]}], got {tuple(w.shape)}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if not float(min_scale) > 0:
        raise ValueError(f"min_scale must be > 0, got {min_scale}")
    if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
        raise ValueError("act_absmax: values must be finite and >= 0")
    wmax = w.to(torch.float64).abs().amax(dim=0).to(a.device)
    if not bool(torch.isfinite(wmax).all()):
        raise ValueError("weight: contains NaN/Inf values")
    s = a.pow(float(alpha)) / wmax.clamp(min=1e-5).pow(1.0 - float(alpha))
    return s.clamp(min=float(min_scale)).to(torch.float32)
