"""Save and load quantized models without pickle: ``save_quantized`` / ``load_quantized``.

Users quantize once (calibration is slow) and deploy many times. The file is the package's
estimator format (``ood_fast._io``): a safetensors file of raw tensors plus one JSON header in
its metadata, ``{"format": "ood_fast", "format_version": 1, "kind": "quantized_model",
"settings": {...}, "sha256": {tensor: digest}}``, with

* ``settings["module"]``: the module tree, ``{"kind", "args", "training", "children":
  [[name, subtree | null], ...]}``; ``kind`` names a whitelisted class (``MODULE_KINDS``) and
  ``args`` are the plain JSON values its constructor needs (``MambaConfig`` fields,
  ``QuantLinear``'s sizes, ``nn.Linear``'s sizes...);
* ``settings["extra_state"]``: the modules' ``get_extra_state()`` values (``QuantLinear``'s
  rot_kind / w_bits / a_bits / act_granularity), plain JSON;
* ``settings["ties"]``: ``{alias: name}`` for parameters/buffers that are one tensor in the
  model (e.g. an embedding tied to an unquantized head); the file stores it once and the
  loader makes both names the same ``Parameter`` again;
* the tensors: ``model.state_dict()`` less the extra states and the aliases, each its own
  contiguous CPU copy (no shared storage in the file).

Loading never executes code: no pickle, no ``torch.load``, no ``eval``; each class comes from
the whitelist by exact name and is built from its JSON args, then the tensors are loaded with
``load_state_dict(strict=True, assign=True)`` (dtypes kept as saved). The reloaded model's
forward is bit-identical to the saved one's on the same input and backend. Every tensor's
SHA-256 is checked, so a damaged file is refused rather than run.

Not saved: forward hooks, Python attributes other than those a kind records (``MambaLM``:
``config`` and ``quant_method``), ``requires_grad`` flags (loaded parameters require grad, as
fresh ones do). Two state entries that share storage without being the same view are written
as two copies (the model runs the same; the sharing is not restored).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import _io
from .bert import BertEncoder, BertLayer, BertSelfAttention
from .linear import QuantLinear
from .mamba import MambaBlock, MambaConfig, MambaLM, MambaMixer, RMSNorm, _Backbone

__all__ = ["MODULE_KINDS", "load_quantized", "register_module_kind", "save_quantized"]

KIND = "quantized_model"
_MAX_DEPTH = 64


@dataclass(frozen=True)
class ModuleKind:
    """A whitelisted module class: ``describe(module) -> args`` (plain JSON values) and
    ``build(args) -> module`` (children are added by the loader afterwards)."""

    cls: type
    describe: Callable[[nn.Module], dict]
    build: Callable[[dict], nn.Module]


# kind name -> ModuleKind; matched by exact class (a subclass may compute something else)
MODULE_KINDS: dict[str, ModuleKind] = {}


def register_module_kind(name: str, cls: type, describe: Callable, build: Callable) -> None:
    """Add ``cls`` to the whitelist of ``save_quantized`` / ``load_quantized`` as ``name``.

    ``describe(module)`` returns the JSON args ``build(args)`` needs to construct an empty
    module of the same shape (its children are replaced by the saved ones, its parameters and
    buffers come from the file, so only non-tensor, non-child settings belong in ``args``).
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_module_kind: {cls!r} is not an nn.Module class")
    for k, v in MODULE_KINDS.items():
        if v.cls is cls and k != name:
            raise ValueError(f"register_module_kind: {cls.__name__} is already registered as {k!r}")
    MODULE_KINDS[name] = ModuleKind(cls, describe, build)


def _no_args(_m) -> dict:
    return {}


def _plain(cls):
    return lambda _a: cls()


# A Mamba config the composite modules are built with when all their children are replaced by
# the saved ones (MambaBlock, the backbone): the loader builds on the meta device, so it is free.
_STUB_CFG = dict(d_model=1, n_layer=1, vocab_size=1, d_state=1, d_conv=1, expand=1, dt_rank=1)


def _mixer_args(m: MambaMixer) -> dict:
    if m.d_inner % m.d_model:
        raise ValueError(f"d_inner={m.d_inner} is not a multiple of d_model={m.d_model}")
    return dict(
        d_model=m.d_model,
        d_state=m.d_state,
        d_conv=m.d_conv,
        expand=m.d_inner // m.d_model,
        dt_rank=m.dt_rank,
    )


def _mixer_build(a: dict) -> MambaMixer:
    return MambaMixer(MambaConfig(n_layer=1, vocab_size=1, **a))


def _lm_args(m: MambaLM) -> dict:
    if not isinstance(m.config, MambaConfig):
        raise TypeError(f"config is a {type(m.config).__name__}, not a MambaConfig")
    return {
        "config": dataclasses.asdict(m.config),
        "quant_method": getattr(m, "quant_method", None),
    }


def _lm_build(a: dict) -> MambaLM:
    cfg = a["config"]
    if not isinstance(cfg, dict):
        raise ValueError("config: expected a JSON object of MambaConfig fields")
    names = {f.name for f in dataclasses.fields(MambaConfig)}
    if set(cfg) - names:
        raise ValueError(f"config: unknown MambaConfig fields {sorted(set(cfg) - names)}")
    m = MambaLM(MambaConfig(**cfg))
    if a.get("quant_method") is not None:
        m.quant_method = a["quant_method"]
    return m


def _tuple(v):
    return tuple(v) if isinstance(v, list) else v


def _conv_args(m: nn.Conv1d) -> dict:
    return dict(
        in_channels=m.in_channels,
        out_channels=m.out_channels,
        kernel_size=list(m.kernel_size),
        stride=list(m.stride),
        padding=m.padding if isinstance(m.padding, str) else list(m.padding),
        dilation=list(m.dilation),
        groups=m.groups,
        bias=m.bias is not None,
        padding_mode=m.padding_mode,
    )


def _conv_build(a: dict) -> nn.Conv1d:
    return nn.Conv1d(**{k: _tuple(v) for k, v in a.items()})


def _embedding_args(m: nn.Embedding) -> dict:
    return dict(
        num_embeddings=m.num_embeddings,
        embedding_dim=m.embedding_dim,
        padding_idx=m.padding_idx,
        max_norm=m.max_norm,
        norm_type=m.norm_type,
        scale_grad_by_freq=m.scale_grad_by_freq,
        sparse=m.sparse,
    )


def _layernorm_args(m: nn.LayerNorm) -> dict:
    return dict(
        normalized_shape=list(m.normalized_shape),
        eps=m.eps,
        elementwise_affine=m.elementwise_affine,
        bias=getattr(m, "bias", None) is not None,
    )


def _layernorm_build(a: dict) -> nn.LayerNorm:
    return nn.LayerNorm(**{k: _tuple(v) for k, v in a.items()})


register_module_kind(
    "QuantLinear",
    QuantLinear,
    lambda m: {"in_features": m.in_features, "out_features": m.out_features},
    # the settings (bits, granularity, rotation kind) come with the state: its _extra_state
    lambda a: QuantLinear(a["in_features"], a["out_features"]),
)
register_module_kind("MambaLM", MambaLM, _lm_args, _lm_build)
register_module_kind(
    "MambaBackbone", _Backbone, _no_args, lambda a: _Backbone(MambaConfig(**_STUB_CFG))
)
register_module_kind(
    "MambaBlock", MambaBlock, _no_args, lambda a: MambaBlock(MambaConfig(**_STUB_CFG))
)
register_module_kind("MambaMixer", MambaMixer, _mixer_args, _mixer_build)
register_module_kind(
    "RMSNorm",
    RMSNorm,
    lambda m: {"dim": m.weight.shape[0], "eps": m.eps},
    lambda a: RMSNorm(a["dim"], eps=a["eps"]),
)
register_module_kind(
    "Linear",
    nn.Linear,
    lambda m: dict(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None),
    lambda a: nn.Linear(**a),
)
register_module_kind("Embedding", nn.Embedding, _embedding_args, lambda a: nn.Embedding(**a))
register_module_kind("Conv1d", nn.Conv1d, _conv_args, _conv_build)
register_module_kind("LayerNorm", nn.LayerNorm, _layernorm_args, _layernorm_build)
register_module_kind("Sequential", nn.Sequential, _no_args, _plain(nn.Sequential))
register_module_kind("ModuleList", nn.ModuleList, _no_args, _plain(nn.ModuleList))
register_module_kind("ModuleDict", nn.ModuleDict, _no_args, _plain(nn.ModuleDict))
register_module_kind("Identity", nn.Identity, _no_args, _plain(nn.Identity))
register_module_kind("ReLU", nn.ReLU, _no_args, _plain(nn.ReLU))
register_module_kind("SiLU", nn.SiLU, _no_args, _plain(nn.SiLU))
register_module_kind(
    "GELU", nn.GELU, lambda m: {"approximate": m.approximate}, lambda a: nn.GELU(**a)
)
register_module_kind("Dropout", nn.Dropout, lambda m: {"p": m.p}, lambda a: nn.Dropout(**a))
# a bare nn.Module used as a namespace of children (the HF-shaped BERT's "attention", "output")
register_module_kind("Module", nn.Module, _no_args, _plain(nn.Module))
register_module_kind(
    "BertEncoder", BertEncoder, lambda m: dict(m.config), lambda a: BertEncoder(**a)
)
register_module_kind(
    "BertLayer",
    BertLayer,
    lambda m: dict(
        hidden=m.attention.output.dense.in_features,
        heads=m.attention.self.heads,
        ffn=m.intermediate.dense.out_features,
        eps=m.output.LayerNorm.eps,
    ),
    lambda a: BertLayer(**a),
)
register_module_kind(
    "BertSelfAttention",
    BertSelfAttention,
    lambda m: dict(hidden=m.query.in_features, heads=m.heads),
    lambda a: BertSelfAttention(**a),
)


# --------------------------------------------------------------------------- saving


def _kind_of(module: nn.Module, where: str) -> str:
    for name, k in MODULE_KINDS.items():
        if type(module) is k.cls:
            return name
    known = ", ".join(sorted(MODULE_KINDS))
    raise TypeError(
        f"save_quantized: cannot save module {where or '<root>'!r} of class "
        f"{type(module).__module__}.{type(module).__qualname__}: it is not in the whitelist of "
        f"classes that load without running code ({known}); rebuild it from those (e.g. "
        "nn.Sequential) or add it with ood_fast.quant.io.register_module_kind"
    )


def _json_ok(value, what: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"save_quantized: {what} is not plain JSON ({exc})") from None


def _describe(module: nn.Module, where: str, depth: int = 0) -> dict:
    if depth > _MAX_DEPTH:
        raise ValueError(f"save_quantized: module tree deeper than {_MAX_DEPTH} at {where!r}")
    kind = _kind_of(module, where)
    try:
        args = MODULE_KINDS[kind].describe(module)
    except (TypeError, ValueError, AttributeError) as exc:
        raise TypeError(
            f"save_quantized: cannot describe module {where or '<root>'!r} ({kind}): {exc}"
        ) from None
    _json_ok(args, f"the settings of module {where or '<root>'!r} ({kind})")
    hidden = [n for n in module._non_persistent_buffers_set if module._buffers.get(n) is not None]
    if hidden:
        raise TypeError(
            f"save_quantized: module {where or '<root>'!r} has non-persistent buffers {hidden}, "
            "which a state dict (and so the file) does not hold"
        )
    children = []
    for name, child in module._modules.items():
        sub = f"{where}.{name}" if where else name
        children.append([name, None if child is None else _describe(child, sub, depth + 1)])
    return {"kind": kind, "args": args, "training": module.training, "children": children}


def _ties(model: nn.Module, names: set) -> dict:
    """``{alias: canonical}`` for state entries that are one tensor in the model: the same
    Parameter/buffer object, or the same view of the same storage, of the same category."""
    ties = {}
    for category in (
        model.named_parameters(remove_duplicate=False),
        model.named_buffers(remove_duplicate=False),
    ):
        seen: dict = {}
        for name, t in category:
            if name not in names or t is None:
                continue
            key = (
                t.device,
                t.dtype,
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                tuple(t.shape),
                t.stride(),
            )
            if t.numel() == 0:
                key = ("obj", id(t))  # empty tensors may share a null storage pointer
            if key in seen:
                ties[name] = seen[key]
            else:
                seen[key] = name
    return ties


def save_quantized(model: nn.Module, path) -> None:
    """Write a (quantized) model to ``path``: safetensors tensors + a JSON header, no pickle.

    ``model``: a ``QuantLinear``, a ``quantize_mamba`` output ``MambaLM`` (any method), or any
    tree of whitelisted modules (``MODULE_KINDS``: QuantLinear, the Mamba classes, the MiniLM
    BERT classes of ``quant.bert``, nn.Linear, nn.Embedding, nn.Conv1d, nn.LayerNorm, nn.Sequential / ModuleList / ModuleDict, a few
    activations). Tensors may live on any device (they are copied to CPU).

    Raises:
        TypeError: a module whose class is not whitelisted (the message names it), settings that
            are not plain JSON, or a non-persistent buffer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_quantized: expected an nn.Module, got {type(model).__name__}")
    spec = _describe(model, "")
    state = model.state_dict()
    extra = {}
    for prefix, mod in model.named_modules(remove_duplicate=False):
        if type(mod).get_extra_state is nn.Module.get_extra_state:
            continue
        key = f"{prefix}.{_EXTRA}" if prefix else _EXTRA
        if key in state:
            value = state.pop(key)
            _json_ok(value, f"the extra state of module {prefix or '<root>'!r}")
            extra[key] = value
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"save_quantized: state entry {name!r} is a {type(t).__name__}, not a tensor"
            )
    ties = _ties(model, set(state))
    tensors = {k: v for k, v in state.items() if k not in ties}
    settings = {"module": spec, "extra_state": extra, "ties": ties}
    _io.save_estimator(path, KIND, settings, tensors, checksum=True)


_EXTRA = "_extra_state"


# --------------------------------------------------------------------------- loading


def _build(spec, where: str, depth: int = 0) -> nn.Module:
    here = where or "<root>"
    if depth > _MAX_DEPTH:
        raise ValueError(f"module tree deeper than {_MAX_DEPTH} at {here!r}")
    if not isinstance(spec, dict) or not {"kind", "args", "children"} <= set(spec):
        raise ValueError(f"corrupt module description at {here!r}")
    kind = spec["kind"]
    if not isinstance(kind, str) or kind not in MODULE_KINDS:
        known = ", ".join(sorted(MODULE_KINDS))
        raise ValueError(
            f"unknown module kind {kind!r} at {here!r}: not in the whitelist ({known})"
        )
    if not isinstance(spec["args"], dict) or not isinstance(spec["children"], list):
        raise ValueError(f"corrupt module description at {here!r} ({kind})")
    try:
        module = MODULE_KINDS[kind].build(spec["args"])
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(
            f"cannot build module {here!r} ({kind}) from {spec['args']}: {exc}"
        ) from None
    names = []
    for item in spec["children"]:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"corrupt child list at {here!r} ({kind})")
        name, sub = item
        if not name or "." in name or name in names:
            raise ValueError(f"invalid child name {name!r} at {here!r} ({kind})")
        names.append(name)
        path = f"{where}.{name}" if where else name
        child = None if sub is None else _build(sub, path, depth + 1)
        try:
            module.add_module(name, child)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"cannot add child {name!r} to {here!r} ({kind}): {exc}") from None
    extra = [n for n in module._modules if n not in names]
    if extra:
        raise ValueError(
            f"corrupt module description at {here!r}: a {kind} has children {extra} that the "
            "file does not describe"
        )
    training = spec.get("training", False)
    if not isinstance(training, bool):
        raise ValueError(f"corrupt module description at {here!r}: training={training!r}")
    module.training = training
    return module


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, leaf = name.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), leaf


def _from_state(settings: dict, tensors: dict, source: str = "file") -> nn.Module:
    for key, typ in (("module", dict), ("extra_state", dict), ("ties", dict)):
        if not isinstance(settings.get(key), typ):
            raise ValueError(f"{source}: corrupt quantized-model header ({key!r} missing)")
    with torch.device("meta"):  # no memory and no random init for what the file overwrites
        model = _build(settings["module"], "")
    state = dict(tensors)
    for key, value in settings["extra_state"].items():
        if key in state:
            raise ValueError(f"{source}: corrupt header ({key!r} is both a tensor and a setting)")
        state[key] = value
    for alias, name in settings["ties"].items():
        if name not in tensors or alias in tensors:
            raise ValueError(f"{source}: corrupt header (tie {alias!r} -> {name!r})")
        state[alias] = tensors[name]
    try:
        nn.Module.load_state_dict(model, state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(
            f"{source}: the tensors do not fit the model its header describes: {exc}"
        ) from None
    for alias, name in settings["ties"].items():
        owner, leaf = _owner(model, name)
        a_owner, a_leaf = _owner(model, alias)
        if leaf in owner._parameters and a_leaf in a_owner._parameters:
            a_owner._parameters[a_leaf] = owner._parameters[leaf]
        elif leaf in owner._buffers and a_leaf in a_owner._buffers:
            a_owner._buffers[a_leaf] = owner._buffers[leaf]
        else:
            raise ValueError(f"{source}: corrupt header (tie {alias!r} -> {name!r})")
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{source}: the file holds no values for {left}")
    return model


def load_quantized(path, device=None) -> nn.Module:
    """Rebuild a model written by :func:`save_quantized`; nothing in the file is executed.

    Returns the module tree as saved (same classes, settings, dtypes, train/eval flags and
    tied parameters) on CPU, or moved to ``device``. Its forward is bit-identical to the saved
    model's on the same input and backend.

    Raises:
        ValueError: not an ood_fast file, a newer ``format_version``, a file of another kind
            (an estimator), an unknown module kind (whitelist miss), a truncated or corrupted
            file (checksums), or tensors that do not fit the described modules.
    """
    kind, settings, tensors = _io.load_estimator(path)
    if kind != KIND:
        raise ValueError(
            f"{os.fspath(path)}: holds a {kind!r} estimator, not a quantized model: use "
            "ood_fast.load"
        )
    model = _from_state(settings, tensors, os.fspath(path))
    return model if device is None else model.to(device)


@_io.register(KIND)
class _QuantizedModelFile:
    """``ood_fast.load`` support: a quantized-model file loads as its module."""

    @classmethod
    def _from_state(cls, settings, tensors):
        return _from_state(settings, tensors)
