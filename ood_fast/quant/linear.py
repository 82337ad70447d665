"""W8A8 linear layer with an optional online rotation and smoothing of its input.

``QuantLinear`` computes ``y = x Wᵀ + b`` (``x [..., K]``, ``W [N, K]``) as

    x' = (x / smooth) @ R                    # online, fused into ops.rotate_quantize
    qx, sx = quantize(x')                    # int8 symmetric, per token or per tensor
    y = sx * sw * (qx @ qwᵀ) + b             # ops.int8_linear, int32 accumulation

with the weight prepared offline, in float64, as ``W' = W diag(smooth) R`` and then quantized
per output channel (``qw int8 [N, K]``, ``sw fp32 [N]``). Since R is orthogonal,
``x' W'ᵀ = (x / s) R Rᵀ diag(s) Wᵀ = x Wᵀ``: without quantization the float function is unchanged
(this is what the computational-invariance tests check, with ``w_bits=a_bits=None``).

``R`` is None, a :class:`~ood_fast.reference.hadamard.HadamardRotation` (applied by the fast
Walsh-Hadamard kernels, ``O(K log K)`` per token) or a dense orthogonal ``[K, K]`` matrix (a
torch matmul, ``O(K²)`` per token, before the quantize-only kernel).

Either quantization can be switched off (``w_bits=None`` keeps the fp32 ``W'``,
``a_bits=None`` keeps the rotated activation in fp32): the transforms use that to calibrate
static activation scales on the rotated float model and the tests to check invariance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops

__all__ = ["QuantLinear", "quantize_linear", "rotation_matrix"]

_GRANULARITIES = ("per_token", "per_tensor")
_ROT_KINDS = ("none", "hadamard", "dense")
_BUFFER_NAMES = ("qweight", "wscale", "weight", "bias", "smooth", "rot", "act_scale")
_STATE_VERSION = 1  # of QuantLinear.get_extra_state


def _check_buffer(name: str, t, shape: tuple, kind: str, settings: dict) -> str | None:
    """Why the state tensor ``t`` cannot be QuantLinear's buffer ``name``, or None."""
    if not isinstance(t, torch.Tensor):
        return f"expected a tensor, got {type(t).__name__}"
    if tuple(t.shape) != shape:
        return f"shape {tuple(t.shape)}, expected {shape}"
    if kind == "int8":
        if t.dtype != torch.int8:
            return f"dtype {t.dtype}, expected torch.int8 codes"
        return None
    if not t.dtype.is_floating_point:
        return f"dtype {t.dtype}, expected a floating dtype"
    if t.is_meta:
        return None
    if not bool(torch.isfinite(t).all()):
        return "has NaN/Inf entries"
    if name == "rot" and settings["rot_kind"] == "hadamard" and not bool((t.abs() == 1).all()):
        return "Hadamard signs must all be +1 or -1"
    if name in ("smooth", "act_scale") and not bool((t > 0).all()):
        return "must be > 0"
    return None


def _hadamard_rotation_cls():
    from ..reference.hadamard import HadamardRotation

    return HadamardRotation


def _check_bits(bits, name):
    if bits is None:
        return None
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{name} must be an int in 2..8 or None (no quantization), got {bits!r}")
    return bits


def rotation_matrix(rotation, n: int) -> torch.Tensor | None:
    """The fp64 ``[n, n]`` matrix R of a rotation spec (applied ``x ↦ x R``), or None.

    ``rotation``: None, ``"hadamard"`` (orthonormal Hadamard without signs), a
    ``HadamardRotation`` or a dense ``[n, n]`` float tensor (checked to be orthogonal to 1e-4:
    a non-orthogonal R would change the float function).
    """
    if rotation is None:
        return None
    hr = _hadamard_rotation_cls()
    if isinstance(rotation, str):
        if rotation != "hadamard":
            raise ValueError(f"rotation: unknown spec {rotation!r}; expected 'hadamard'")
        from ..reference.hadamard import hadamard_matrix

        return hadamard_matrix(n, dtype=torch.float64) / math.sqrt(n)
    if isinstance(rotation, hr):
        m = rotation.matrix(dtype=torch.float64)
        if m.shape != (n, n):
            raise ValueError(
                f"rotation: HadamardRotation of size {m.shape[0]} for {n} input features"
            )
        return m
    if isinstance(rotation, torch.Tensor):
        if not rotation.dtype.is_floating_point:
            raise TypeError(f"rotation: dense rotation must be floating, got {rotation.dtype}")
        if rotation.shape != (n, n):
            raise ValueError(
                f"rotation: dense rotation must be [{n}, {n}], got {tuple(rotation.shape)}"
            )
        m = rotation.detach().to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(m).all()):
            raise ValueError("rotation: dense rotation has NaN/Inf entries")
        err = float((m @ m.T - torch.eye(n, dtype=torch.float64)).abs().max())
        if err > 1e-4:
            raise ValueError(
                f"rotation: dense rotation is not orthogonal (max |R Rᵀ - I| = {err:.3g}); the "
                "weight fusion W R relies on R Rᵀ = I"
            )
        return m
    raise TypeError(
        "rotation: expected None, 'hadamard', a HadamardRotation or a dense [n, n] tensor, got "
        f"{type(rotation).__name__}"
    )


class QuantLinear(nn.Module):
    """W8A8 replacement for ``nn.Linear`` (build it with :func:`quantize_linear`).

    ``forward(x [..., in_features]) -> [..., out_features]`` in x's dtype (fp32 arithmetic).

    Buffers: ``qweight`` int8 ``[N, K]`` + ``wscale`` fp32 ``[N]`` (or ``weight`` fp32 ``[N, K]``
    when ``w_bits`` is None), ``bias`` fp32 ``[N]`` or None, ``smooth`` fp32 ``[K]`` or None,
    ``rot`` (the HadamardRotation's signs fp32 ``[K]``, or the dense fp32 ``[K, K]``, or None),
    ``act_scale`` fp32 scalar (static per-tensor activation scale) or None.

    State: ``state_dict()`` holds the buffers that are not None plus ``"_extra_state"``, the
    settings as plain JSON values (``get_extra_state``: in/out features, w_bits, a_bits,
    act_granularity, rot_kind). It loads into a fresh ``QuantLinear(in_features,
    out_features)``: the settings come from the state, missing buffers are created and absent
    ones dropped, dtypes kept; wrong shapes/dtypes, NaN/Inf, a missing ``qweight`` or settings
    that do not fit raise with the key and the reason, and leave the layer unchanged.
    ``ood_fast.quant.save_quantized`` / ``load_quantized`` write and read whole models.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        w_bits: int | None = 8,
        a_bits: int | None = 8,
        act_granularity: str = "per_token",
    ):
        super().__init__()
        if act_granularity not in _GRANULARITIES:
            raise ValueError(
                f"act_granularity must be one of {_GRANULARITIES}, got {act_granularity!r}"
            )
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.w_bits = _check_bits(w_bits, "w_bits")
        self.a_bits = _check_bits(a_bits, "a_bits")
        self.act_granularity = act_granularity
        self.rot_kind = "none"  # "none" | "hadamard" (rot = signs or None) | "dense"
        self._hr = None  # cached HadamardRotation (it caches its signs per device)
        self._static = None  # float(act_scale), cached
        for name in ("qweight", "wscale", "weight", "bias", "smooth", "rot", "act_scale"):
            self.register_buffer(name, None)

    # ------------------------------------------------------------------ state

    def get_extra_state(self) -> dict:
        """The non-tensor settings, as plain JSON values (saved in ``state_dict()`` under
        ``"_extra_state"``; ``ood_fast.quant.save_quantized`` writes them to its JSON header)."""
        return {
            "version": _STATE_VERSION,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "act_granularity": self.act_granularity,
            "rot_kind": self.rot_kind,
        }

    def set_extra_state(self, state) -> None:
        """Apply settings from :meth:`get_extra_state` (validated; the buffers must follow)."""
        self._apply_settings(self._checked_settings(state))

    def _checked_settings(self, state) -> dict:
        if not isinstance(state, dict):
            raise TypeError(f"expected a dict of settings, got {type(state).__name__}")
        version = state.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"invalid settings version {version!r}")
        if version > _STATE_VERSION:
            raise ValueError(
                f"settings version {version} is newer than this ood_fast ({_STATE_VERSION}): "
                "upgrade ood_fast to load it"
            )
        unknown = sorted(set(state) - set(self.get_extra_state()))
        if unknown:
            raise ValueError(f"unknown settings {unknown}")
        missing = sorted(set(self.get_extra_state()) - set(state))
        if missing:
            raise ValueError(f"missing settings {missing}")
        shape = (state["in_features"], state["out_features"])
        if shape != (self.in_features, self.out_features):
            raise ValueError(
                f"the state is for in_features={shape[0]}, out_features={shape[1]}; this layer "
                f"has in_features={self.in_features}, out_features={self.out_features}"
            )
        if state["act_granularity"] not in _GRANULARITIES:
            raise ValueError(
                f"act_granularity must be one of {_GRANULARITIES}, got {state['act_granularity']!r}"
            )
        if state["rot_kind"] not in _ROT_KINDS:
            raise ValueError(f"rot_kind must be one of {_ROT_KINDS}, got {state['rot_kind']!r}")
        if state["rot_kind"] == "hadamard":
            from ..reference.hadamard import factorize

            factorize(self.in_features)  # raises, listing the supported sizes
        return dict(
            state,
            w_bits=_check_bits(state["w_bits"], "w_bits"),
            a_bits=_check_bits(state["a_bits"], "a_bits"),
        )

    def _apply_settings(self, s: dict) -> None:
        self.w_bits, self.a_bits = s["w_bits"], s["a_bits"]
        self.act_granularity, self.rot_kind = s["act_granularity"], s["rot_kind"]
        self._hr = self._static = None  # caches of the old buffers

    def _buffer_specs(self, s: dict) -> dict:
        """name -> (required, shape, kind) for the settings ``s``; names not listed must be
        absent. kind: "int8" or "float" (any floating dtype, kept as given)."""
        k, n = self.in_features, self.out_features
        specs = {"bias": (False, (n,), "float"), "smooth": (False, (k,), "float")}
        specs["act_scale"] = (False, (), "float")
        if s["w_bits"] is None:
            specs["weight"] = (True, (n, k), "float")
        else:
            specs["qweight"] = (True, (n, k), "int8")
            specs["wscale"] = (True, (n,), "float")
        if s["rot_kind"] == "hadamard":
            specs["rot"] = (False, (k,), "float")  # the random signs, or None: plain Hadamard
        elif s["rot_kind"] == "dense":
            specs["rot"] = (True, (k, k), "float")
        return specs

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Load settings (``_extra_state``) and the buffers they call for into this layer.

        Unlike ``nn.Module``'s default it creates buffers that are None here (a fresh
        ``QuantLinear(in, out)`` has none) and removes those the state does not have (a None
        buffer is absent from a state dict); dtypes are kept as stored (``qweight`` must be
        int8). Nothing is changed unless the whole state is valid.
        """
        key = prefix + "_extra_state"
        if key in state_dict:
            try:
                settings = self._checked_settings(state_dict[key])
            except (TypeError, ValueError) as exc:
                error_msgs.append(f"{key}: {exc}")
                return
        else:
            missing_keys.append(key)  # non-strict: keep this layer's own settings
            settings = self.get_extra_state()
        specs = self._buffer_specs(settings)
        current = [b for b in self._buffers.values() if b is not None and not b.is_meta]
        new, errors = {}, []
        for name in _BUFFER_NAMES:
            bkey = prefix + name
            if bkey not in state_dict:
                if name in specs and specs[name][0]:
                    missing_keys.append(bkey)
                    if getattr(self, name) is None:
                        errors.append(f"{bkey}: missing (needed with {self._describe(settings)})")
                    new[name] = getattr(self, name)
                else:
                    new[name] = None
                continue
            t = state_dict[bkey]
            if name not in specs:
                errors.append(f"{bkey}: not expected with {self._describe(settings)}")
                continue
            _, shape, kind = specs[name]
            msg = _check_buffer(name, t, shape, kind, settings)
            if msg:
                errors.append(f"{bkey}: {msg}")
                continue
            t = t.detach()
            if local_metadata.get("assign_to_params_buffers", False):
                new[name] = t
            else:
                dev = current[0].device if current else t.device
                new[name] = t.to(dev, copy=True)
        if strict:
            allowed = {prefix + n for n in _BUFFER_NAMES} | {key}
            unexpected_keys.extend(
                k for k in state_dict if k.startswith(prefix) and k not in allowed
            )
        if errors:
            error_msgs.extend(errors)
            return
        self._apply_settings(settings)
        for name, t in new.items():
            self._buffers[name] = t

    @staticmethod
    def _describe(s: dict) -> str:
        return f"w_bits={s['w_bits']}, rot_kind={s['rot_kind']!r}"

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"w_bits={self.w_bits}, a_bits={self.a_bits}, act={self.act_granularity}"
            f"{' static' if self.act_scale is not None else ''}, rotation={self.rot_kind}, "
            f"smooth={self.smooth is not None}, bias={self.bias is not None}"
        )

    # ------------------------------------------------------------------ pieces

    def rotation_spec(self):
        """The rotation argument for ``ops.rotate_quantize``: None, ``"hadamard"``, a
        ``HadamardRotation`` or the dense fp32 matrix."""
        if self.rot_kind == "none":
            return None
        if self.rot_kind == "dense":
            return self.rot
        if self.rot is None:
            return "hadamard"
        key = (self.rot.data_ptr(), str(self.rot.device))
        if self._hr is None or self._hr[0] != key:
            self._hr = (key, _hadamard_rotation_cls()(self.in_features, self.rot))
        return self._hr[1]

    def dequantized_weight(self) -> torch.Tensor:
        """The effective fp32 weight ``W' [N, K]`` the layer multiplies the rotated input by."""
        if self.w_bits is None:
            return self.weight
        return self.qweight.float() * self.wscale[:, None]

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """``(x / smooth) @ R`` in fp32, unquantized (``x [M, K]``); for calibration and tests."""
        x = x.float()
        if self.smooth is not None:
            x = x / self.smooth
        if self.rot_kind == "dense":
            return x @ self.rot
        if self.rot_kind == "hadamard":
            return ops.hadamard(x, 1.0 / math.sqrt(self.in_features), signs=self.rot)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError("QuantLinear: input must be a floating tensor")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"QuantLinear: expected [..., {self.in_features}] input, got {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.a_bits is None:
            out = F.linear(self.transform_input(x2), self.dequantized_weight(), self.bias)
        else:
            # a Python float (the op's static_scale); cached so a CUDA forward does not sync
            if self.act_scale is None:
                static = None
            else:
                if self._static is None:
                    self._static = float(self.act_scale)
                static = self._static
            # float64 is converted by the op; NaN/Inf are caught by the op's check_finite (on
            # the cpu backend inside the kernel's own pass: no extra read of x)
            q = ops.rotate_quantize(
                x2,
                rotation=self.rotation_spec(),
                smooth=self.smooth,
                granularity=self.act_granularity,
                symmetric=True,
                static_scale=static,
                bits=self.a_bits,
            )
            if self.w_bits is None:
                out = F.linear(ops.dequantize(q), self.weight, self.bias)
            else:
                # fp32 / bf16 inputs get their dtype straight from the epilogue (bf16: fp32
                # rounded to nearest even, as .to() would), not an fp32 [M, N] then a copy
                odt = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
                out = ops.int8_linear(
                    q.codes, q.scale, self.qweight, self.wscale, self.bias, out_dtype=odt
                )
        return out.reshape(*lead, self.out_features).to(x.dtype)


def quantize_linear(
    linear: nn.Linear,
    *,
    rotation=None,
    smooth: torch.Tensor | None = None,
    act_granularity: str = "per_token",
    static_scale: float | None = None,
    w_bits: int | None = 8,
    a_bits: int | None = 8,
    w_percentile: float | None = None,
) -> QuantLinear:
    """Build a :class:`QuantLinear` computing the same float function as ``linear``.

    The effective weight ``W diag(smooth) R`` is formed in float64 from ``linear``'s weight
    (any float dtype), then quantized symmetric per output channel with
    ``ops.quantize_weight(bits=w_bits, percentile=w_percentile)`` (kept fp32 when ``w_bits`` is
    None). ``static_scale`` (float > 0) fixes a per-tensor activation scale (needs
    ``act_granularity="per_tensor"``); without it the scale is dynamic (per token or per tensor).
    """
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"quantize_linear: expected an nn.Linear, got {type(linear).__name__}")
    if act_granularity not in _GRANULARITIES:
        raise ValueError(
            f"act_granularity must be one of {_GRANULARITIES}, got {act_granularity!r}"
        )
    w_bits = _check_bits(w_bits, "w_bits")
    a_bits = _check_bits(a_bits, "a_bits")
    n_out, n_in = linear.weight.shape
    w = linear.weight.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_linear: the weight has NaN/Inf entries")
    if static_scale is not None:
        if act_granularity != "per_tensor":
            raise ValueError("static_scale needs act_granularity='per_tensor'")
        static_scale = float(static_scale)
        if not math.isfinite(static_scale) or static_scale <= 0:
            raise ValueError(f"static_scale must be a finite float > 0, got {static_scale}")
    if smooth is not None:
        smooth = torch.as_tensor(smooth).detach().to(device="cpu", dtype=torch.float64)
        if smooth.shape != (n_in,):
            raise ValueError(f"smooth must be [{n_in}], got {tuple(smooth.shape)}")
        if not bool(torch.isfinite(smooth).all()) or not bool((smooth > 0).all()):
            raise ValueError("smooth must be finite and > 0 (it divides the activation)")
        w = w * smooth[None, :]
    rmat = rotation_matrix(rotation, n_in)
    if rmat is not None:
        w = w @ rmat

    device = linear.weight.device
    q = QuantLinear(n_in, n_out, w_bits=w_bits, a_bits=a_bits, act_granularity=act_granularity)
    if w_bits is None:
        q.weight = w.to(torch.float32)
    else:
        qw, sw = ops.quantize_weight(w.to(torch.float32), bits=w_bits, percentile=w_percentile)
        q.qweight, q.wscale = qw, sw.to(torch.float32)
    if linear.bias is not None:
        q.bias = linear.bias.detach().to(device="cpu", dtype=torch.float32).clone()
    if smooth is not None:
        q.smooth = smooth.to(torch.float32)
    if rotation is not None:
        if isinstance(rotation, str):
            q.rot_kind, q.rot = "hadamard", None
        elif isinstance(rotation, torch.Tensor):
            q.rot_kind, q.rot = "dense", rmat.to(torch.float32)
        else:
            signs = getattr(rotation, "signs", None)
            q.rot_kind = "hadamard"
            q.rot = None if signs is None else signs.detach().to("cpu", torch.float32).clone()
    if static_scale is not None:
        q.act_scale = torch.tensor(static_scale, dtype=torch.float32)
    return q.to(device)
