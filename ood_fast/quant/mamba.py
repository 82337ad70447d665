"""A plain-torch Mamba-1 language model whose parameters load from real checkpoints.

The structure and the parameter names follow the state-spaces ``mamba_ssm`` layout
(``MambaLMHeadModel``): ``backbone.embedding``, ``backbone.layers.{i}.norm.weight``,
``backbone.layers.{i}.mixer.{in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj}``,
``backbone.norm_f.weight``, ``lm_head.weight``. :meth:`MambaLM.from_pretrained` also takes the
Hugging Face ``MambaForCausalLM`` names (``backbone.embeddings.weight``) and a missing
``lm_head.weight`` (tied embeddings), from a dict, a ``.safetensors`` file or a ``.bin`` file
(read with ``torch.load(weights_only=True)``, so no pickled code runs). Nothing is downloaded.

The mixer (one Mamba-1 layer, all shapes ``[B, L, ...]``)::

    xz = in_proj(u)                           # [B, L, 2*d_inner]; x = xz[..., :d_inner], z = rest
    x = silu(causal_depthwise_conv1d(x))      # kernel d_conv, left zero padding d_conv - 1
    dt, Bm, Cm = split(x_proj(x), [dt_rank, d_state, d_state])
    delta = softplus(dt_proj(dt))             # [B, L, d_inner] (dt_proj has the bias)
    A = -exp(A_log)                           # [d_inner, d_state]
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * Bm_t * x_t     # h: [B, d_inner, d_state]
    y_t = h_t @ Cm_t + D * x_t
    out = out_proj(y * gate(z))               # gate = silu, or the scaled SiLU below

The scan here is the reference: sequential over time, fp32 state, no fused kernel. It is slow
for long sequences (one Python step per token) and meant for calibration, tests and evaluation
of the quantized transforms, not for serving.

``gate_scale`` (``s``, fp32 ``[d_inner]``, None by default) turns the gate into the scaled SiLU
``z * sigmoid(z * s)`` used by the smoothing transform (see ``transforms.py``); with ``s = 1`` it
is the plain SiLU. The block is pre-norm with a residual stream, as ``mamba_ssm.Block`` without
the fused add+norm: ``residual = hidden + residual; hidden = mixer(norm(residual))``; the
residual is kept in fp32.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MambaBlock",
    "MambaConfig",
    "MambaLM",
    "MambaMixer",
    "RMSNorm",
    "random_mamba",
    "selective_scan",
]


@dataclass
class MambaConfig:
    """Shape of a Mamba-1 LM. ``dt_rank="auto"`` is ``ceil(d_model / 16)``.

    ``pad_vocab_size_multiple``: the embedding has ``vocab_size`` rounded up to this multiple,
    as state-spaces does (8 in its released configs; the HF port stores the padded size).
    """

    d_model: int
    n_layer: int
    vocab_size: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    bias: bool = False
    conv_bias: bool = True
    norm_eps: float = 1e-5
    pad_vocab_size_multiple: int = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"MambaConfig.{name} must be a positive int, got {v!r}")
        if self.dt_rank == "auto":
            self.dt_rank = math.ceil(self.d_model / 16)
        if not isinstance(self.dt_rank, int) or self.dt_rank < 1:
            raise ValueError(
                f"MambaConfig.dt_rank must be 'auto' or a positive int, got {self.dt_rank!r}"
            )
        if self.norm_eps <= 0:
            raise ValueError(f"MambaConfig.norm_eps must be > 0, got {self.norm_eps}")
        m = self.pad_vocab_size_multiple
        if m > 1 and self.vocab_size % m:
            self.vocab_size += m - self.vocab_size % m

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x², -1) + eps) * weight``, computed in fp32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


_SCAN_CHUNK = 64  # time steps whose [Bt, T, Di, N] discretisation is materialised at once


def selective_scan(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Mamba-1 selective scan, sequential over time in fp32 (the reference).

    x, delta: ``[Bt, L, Di]`` (delta already softplus'ed); A: ``[Di, N]``; B, C: ``[Bt, L, N]``;
    D: ``[Di]`` or None. Returns y ``[Bt, L, Di]`` fp32 with
    ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t`` (h_0 = 0), ``y_t = h_t C_t + D x_t``.
    """
    x, delta, A, B, C = (t.float() for t in (x, delta, A, B, C))
    bt, length, di = x.shape
    n = A.shape[1]
    h = x.new_zeros(bt, di, n)
    ys = []
    # Discretisation and the readout are batched over chunks of time steps (few large kernels
    # instead of many tiny ones); only the recurrence itself is a Python loop.
    for c0 in range(0, length, _SCAN_CHUNK):
        sl = slice(c0, min(c0 + _SCAN_CHUNK, length))
        d = delta[:, sl, :, None]  # [Bt, T, Di, 1]
        da = torch.exp(d * A)  # [Bt, T, Di, N]
        dbx = (d * x[:, sl, :, None]) * B[:, sl, None, :]  # [Bt, T, Di, N]
        hs = torch.empty_like(da)
        for t in range(da.shape[1]):
            h = da[:, t] * h + dbx[:, t]
            hs[:, t] = h
        ys.append((hs * C[:, sl, None, :]).sum(-1))  # [Bt, T, Di]
    y = torch.cat(ys, dim=1) if ys else x.new_zeros(bt, 0, di)
    if D is not None:
        y = y + x * D.float()
    return y


class MambaMixer(nn.Module):
    """One Mamba-1 mixer; ``forward(u [B, L, d_model]) -> [B, L, d_model]`` in u's dtype."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.d_model, self.d_inner = cfg.d_model, cfg.d_inner
        self.d_state, self.d_conv, self.dt_rank = cfg.d_state, cfg.d_conv, cfg.dt_rank
        di = cfg.d_inner
        self.in_proj = nn.Linear(cfg.d_model, 2 * di, bias=cfg.bias)
        self.conv1d = nn.Conv1d(
            di, di, kernel_size=cfg.d_conv, groups=di, padding=cfg.d_conv - 1, bias=cfg.conv_bias
        )
        self.x_proj = nn.Linear(di, cfg.dt_rank + 2 * cfg.d_state, bias=False)
        self.dt_proj = nn.Linear(cfg.dt_rank, di, bias=True)
        # S4D-real initialisation A = -[1..N], as state-spaces; checkpoints overwrite it.
        a = torch.arange(1, cfg.d_state + 1, dtype=torch.float32).repeat(di, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, cfg.d_model, bias=cfg.bias)
        # Scaled-SiLU gate z * sigmoid(z * s); None = plain SiLU. A buffer so it saves with
        # the transformed model; it is not in a float checkpoint.
        self.register_buffer("gate_scale", None, persistent=True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # gate_scale is None in a fresh mixer: make room for a transformed model's [d_inner]
        # so that its state dict loads (nn.Module's default would call it unexpected).
        t = state_dict.get(prefix + "gate_scale")
        if self.gate_scale is None and isinstance(t, torch.Tensor):
            if tuple(t.shape) == (self.d_inner,) and t.dtype.is_floating_point:
                self.gate_scale = torch.empty_like(t, device=self.D.device)
            # else: left to the default, which reports the key
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def gate(self, z: torch.Tensor) -> torch.Tensor:
        if self.gate_scale is None:
            return F.silu(z)
        return z * torch.sigmoid(z * self.gate_scale)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(
                f"MambaMixer: expected [B, L, {self.d_model}] input, got shape {tuple(u.shape)}"
            )
        length = u.shape[1]
        xz = self.in_proj(u)
        x, z = xz.split(self.d_inner, dim=-1)
        x = self.conv1d(x.transpose(1, 2).to(self.conv1d.weight.dtype))[..., :length]
        x = F.silu(x).transpose(1, 2)  # [B, L, Di]
        dbc = self.x_proj(x)
        dt, bm, cm = dbc.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt).float())
        a = -torch.exp(self.A_log.float())
        y = selective_scan(x, delta, a, bm, cm, self.D)
        y = y * self.gate(z.float())
        return self.out_proj(y.to(u.dtype)).to(u.dtype)


class MambaBlock(nn.Module):
    """Pre-norm residual block: ``residual = h + residual; h = mixer(norm(residual))``."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.mixer = MambaMixer(cfg)
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None):
        residual = hidden.float() if residual is None else residual + hidden.float()
        hidden = self.mixer(self.norm(residual.to(self.norm.weight.dtype)))
        return hidden, residual


class _Backbone(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(MambaBlock(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embedding(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        residual = hidden.float() if residual is None else residual + hidden.float()
        return self.norm_f(residual.to(self.norm_f.weight.dtype))


class MambaLM(nn.Module):
    """Embedding, ``n_layer`` Mamba blocks, final RMSNorm and the LM head.

    ``forward(input_ids [B, L] int) -> logits [B, L, vocab_size]`` (a ``[L]`` input gives
    ``[L, vocab_size]``). ``lm_head`` is its own parameter (a copy of the embedding when the
    checkpoint ties them), so that transforms may change one without the other.
    """

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.config = cfg
        self.backbone = _Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point:
            raise TypeError("MambaLM: input_ids must be an integer tensor of token ids")
        if input_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise TypeError(f"MambaLM: input_ids must be integer token ids, got {input_ids.dtype}")
        squeeze = input_ids.dim() == 1
        if squeeze:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(
                f"MambaLM: input_ids must be [B, L] or [L], got {tuple(input_ids.shape)}"
            )
        if input_ids.numel() and (
            int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size
        ):
            raise ValueError(
                f"MambaLM: token ids must be in [0, {self.config.vocab_size}), got range "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]"
            )
        logits = self.lm_head(self.backbone(input_ids))
        return logits[0] if squeeze else logits

    # ---------------------------------------------------------------- checkpoints

    @staticmethod
    def normalize_state_dict(state_dict: dict, tie_head: bool = True) -> dict:
        """Map HF ``MambaForCausalLM`` / state-spaces names onto this module's names.

        ``backbone.embeddings.weight`` (HF) becomes ``backbone.embedding.weight``; a leading
        ``model.`` is dropped; a missing ``lm_head.weight`` is the embedding (tied weights)
        when ``tie_head``.
        """
        out = {}
        for k, v in state_dict.items():
            if k.startswith("model."):
                k = k[len("model.") :]
            if k.startswith("backbone.embeddings."):
                k = "backbone.embedding." + k[len("backbone.embeddings.") :]
            out[k] = v
        if tie_head and "lm_head.weight" not in out and "backbone.embedding.weight" in out:
            out["lm_head.weight"] = out["backbone.embedding.weight"]
        return out

    @staticmethod
    def config_from_state_dict(state_dict: dict, **overrides) -> MambaConfig:
        """Infer the shapes of a :class:`MambaConfig` from (normalized) checkpoint tensors."""
        sd = MambaLM.normalize_state_dict(state_dict)
        try:
            vocab, d_model = sd["backbone.embedding.weight"].shape
            layer_ids = {int(k.split(".")[2]) for k in sd if k.startswith("backbone.layers.")}
            n_layer = max(layer_ids) + 1 if layer_ids else 0
            p = "backbone.layers.0.mixer."
            d_inner = sd[p + "in_proj.weight"].shape[0] // 2
            d_state = sd[p + "A_log"].shape[1]
            d_conv = sd[p + "conv1d.weight"].shape[-1]
            dt_rank = sd[p + "dt_proj.weight"].shape[1]
        except KeyError as exc:
            raise KeyError(
                f"not a Mamba-1 LM checkpoint: missing {exc.args[0]!r} (expected state-spaces "
                "'backbone.embedding.weight' / 'backbone.layers.{i}.mixer.*' or HF "
                "'backbone.embeddings.weight' names)"
            ) from None
        if d_inner % d_model:
            raise ValueError(f"d_inner={d_inner} is not a multiple of d_model={d_model}")
        kw = dict(
            d_model=d_model,
            n_layer=n_layer,
            vocab_size=vocab,
            d_state=d_state,
            d_conv=d_conv,
            expand=d_inner // d_model,
            dt_rank=dt_rank,
            bias=p + "in_proj.bias" in sd,
            conv_bias=p + "conv1d.bias" in sd,
        )
        kw.update(overrides)
        return MambaConfig(**kw)

    @classmethod
    def from_pretrained(cls, source, config: MambaConfig | None = None, strict: bool = True):
        """Build and load a model from a state dict, a ``.safetensors`` or a ``.bin`` file.

        The config is inferred from the tensor shapes unless given (the RMSNorm eps is not in
        a checkpoint: pass a config to change it from 1e-5). No network access.
        """
        sd = cls._read(source)
        cfg = config if config is not None else cls.config_from_state_dict(sd)
        model = cls(cfg)
        model.load_state_dict(sd, strict=strict)
        return model

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` after :meth:`normalize_state_dict` (both layouts).

        A quantized head (a ``QuantLinear``, no ``lm_head.weight``) is not tied to the
        embedding: its state dict loads into a model of the same structure as is.
        """
        sd = self.normalize_state_dict(
            dict(state_dict), tie_head=isinstance(self.lm_head, nn.Linear)
        )
        return super().load_state_dict(sd, strict=strict, assign=assign)

    @staticmethod
    def _read(source) -> dict:
        if isinstance(source, dict):
            return source
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"expected a state dict or a file path, got {type(source).__name__}")
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no checkpoint at {path!r}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        # weights_only: tensors and plain containers only, no pickled code.
        return torch.load(path, map_location="cpu", weights_only=True)


def random_mamba(
    cfg: MambaConfig,
    seed: int = 0,
    *,
    outlier_channels: int = 4,
    outlier_scale: float = 20.0,
    spikes: tuple = (400.0, 200.0, 100.0, 50.0),
) -> MambaLM:
    """A randomly initialised :class:`MambaLM` with the activation outliers of real Mamba LMs.

    Deterministic for a seed (its own ``torch.Generator``). Initialisation as state-spaces
    (dt bias = softplus⁻¹ of a log-uniform dt in [1e-3, 1e-1], ``A = -[1..N]``, ``D = 1``),
    weights Gaussian with ``1/sqrt(fan_in)`` std. With ``outlier_channels > 0`` it injects, in
    ``outlier_channels`` fixed channels each: residual-stream channels ``outlier_scale`` times
    larger (embedding columns) and large RMSNorm gains, x rows and gate (z) rows of in_proj
    scaled by ``sqrt(outlier_scale)`` (outliers at the x_proj and out_proj inputs), and out_proj
    weight rows ``outlier_scale / 4`` times larger. ``spikes``: variances (relative to the
    unit-variance embedding) of a few dense random directions added to every embedding row with
    heavy-tailed (Student-t, ν = 3) coefficients, so the residual stream has a spiked covariance
    spread over all channels (what a Hadamard rotation cannot equalise and KLT can). With
    ``outlier_channels=0`` and ``spikes=()`` it is a plain random model.
    """
    g = torch.Generator().manual_seed(int(seed))
    model = MambaLM(cfg)
    di, k = cfg.d_inner, int(outlier_channels)
    if not 0 <= k <= min(cfg.d_model, di):
        raise ValueError(f"outlier_channels must be in [0, {min(cfg.d_model, di)}], got {k}")

    def gauss(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    with torch.no_grad():
        bb = model.backbone
        bb.embedding.weight.copy_(gauss(cfg.vocab_size, cfg.d_model))
        for layer in bb.layers:
            mx = layer.mixer
            for lin in (mx.in_proj, mx.x_proj, mx.dt_proj, mx.out_proj):
                lin.weight.copy_(gauss(*lin.weight.shape, std=lin.in_features**-0.5))
                if lin.bias is not None:
                    lin.bias.zero_()
            mx.out_proj.weight.mul_(1.0 / math.sqrt(2 * cfg.n_layer))
            mx.conv1d.weight.copy_(gauss(*mx.conv1d.weight.shape, std=cfg.d_conv**-0.5))
            if mx.conv1d.bias is not None:
                mx.conv1d.bias.copy_(gauss(di, std=0.1))
            dt = torch.exp(
                torch.rand(di, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)
            )
            mx.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
            layer.norm.weight.copy_(1.0 + gauss(cfg.d_model, std=0.1))
        bb.norm_f.weight.copy_(1.0 + gauss(cfg.d_model, std=0.1))
        model.lm_head.weight.copy_(gauss(cfg.vocab_size, cfg.d_model, std=cfg.d_model**-0.5))
        if spikes:
            lam = torch.tensor([float(v) for v in spikes])
            dirs, _ = torch.linalg.qr(gauss(cfg.d_model, len(spikes)))  # orthonormal columns
            # Student-t(3) = N / sqrt(χ²₃ / 3), from the generator (scaled to unit variance)
            nrm = gauss(cfg.vocab_size, len(spikes))
            chi2 = gauss(cfg.vocab_size, len(spikes), 3).pow(2).sum(-1)
            coef = nrm / torch.sqrt(chi2 / 3) / math.sqrt(3.0)
            bb.embedding.weight.add_((coef * lam.sqrt()) @ dirs.T)
        if k:
            res_ch = torch.randperm(cfg.d_model, generator=g)[:k]
            bb.embedding.weight[:, res_ch] *= outlier_scale
            for layer in bb.layers:
                mx = layer.mixer
                layer.norm.weight[torch.randperm(cfg.d_model, generator=g)[:k]] *= 4.0
                x_ch = torch.randperm(di, generator=g)[:k]
                z_ch = torch.randperm(di, generator=g)[:k]
                mx.in_proj.weight[x_ch] *= math.sqrt(outlier_scale)
                mx.in_proj.weight[di + z_ch] *= math.sqrt(outlier_scale)
                rows = torch.randperm(cfg.d_model, generator=g)[:k]
                mx.out_proj.weight[rows] *= outlier_scale / 4
    return model
