"""Saving and loading quantized models (ood_fast.quant.io): QuantLinear state dicts, files of
whole models, bit-identical forward after reload, safe loading (no pickle, whitelist) and
clear errors for damaged or foreign files."""

import json

import pytest
import torch
from _quant_helpers import outlier_x, seeded_linear
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import ood_fast
from ood_fast.quant import (
    MambaConfig,
    QuantLinear,
    load_quantized,
    quantize_linear,
    quantize_mamba,
    random_mamba,
    save_quantized,
)
from ood_fast.reference.hadamard import random_hadamard

CFG = dict(d_model=48, n_layer=2, vocab_size=96, d_state=8)  # d_inner 96 = 12·8, dt_rank 3
METHODS = ("mambaquant", "quarot", "smoothquant", "rtn")


def _x(m=33, k=96, seed=1):
    return outlier_x(m, k, seed, gain=30.0)


def _rotation(kind, k=96):
    if kind == "signed":
        return random_hadamard(k, seed=3)
    if kind == "dense":
        q, _ = torch.linalg.qr(torch.randn(k, k, generator=torch.Generator().manual_seed(4)))
        return q
    return kind  # None | "hadamard"


# every rotation kind × smoothing × bias, plus the settings that change which buffers exist
QL_CASES = [
    dict(rotation=rot, smooth=smooth, bias=bias)
    for rot in (None, "hadamard", "signed", "dense")
    for smooth in (False, True)
    for bias in (False, True)
] + [
    dict(rotation="signed", act_granularity="per_tensor", static_scale=0.37),
    dict(rotation="hadamard", act_granularity="per_tensor"),
    dict(rotation="dense", smooth=True, w_bits=None),
    dict(rotation="signed", w_bits=None, a_bits=None, bias=True),
    dict(rotation=None, w_bits=4, a_bits=6),
]


def _make_ql(case) -> QuantLinear:
    case = dict(case)
    lin = seeded_linear(bias=case.pop("bias", True))
    smooth = case.pop("smooth", False)
    s = torch.rand(96, generator=torch.Generator().manual_seed(5)) + 0.5 if smooth else None
    return quantize_linear(lin, rotation=_rotation(case.pop("rotation")), smooth=s, **case)


def _case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


def _settings(q: QuantLinear) -> tuple:
    return (q.rot_kind, q.w_bits, q.a_bits, q.act_granularity, q.in_features, q.out_features)


def _assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
        else:
            assert sa[k] == sb[k], k


# ------------------------------------------------------------------ QuantLinear state dict


@pytest.mark.parametrize("case", QL_CASES, ids=_case_id)
def test_quant_linear_state_dict_and_file_round_trip(tmp_path, case):
    q = _make_ql(case)
    x = _x()
    ref = q(x)
    # a copy: state_dict() tensors share q's storage, and this test writes into them below
    sd = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in q.state_dict().items()}
    json.dumps(sd["_extra_state"])  # the settings are plain JSON values
    fresh = QuantLinear(96, 64)  # default settings, no buffers at all
    fresh.load_state_dict(sd)
    assert _settings(fresh) == _settings(q)
    assert torch.equal(fresh(x), ref)
    _assert_same_state(fresh, q)
    # the loaded buffers are copies: changing the source dict later does not reach the layer
    for t in sd.values():
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
            t.mul_(2.0)
    assert torch.equal(fresh(x), ref)

    path = tmp_path / "q.safetensors"
    save_quantized(q, path)
    for loaded in (load_quantized(path), ood_fast.load(path)):
        assert type(loaded) is QuantLinear and _settings(loaded) == _settings(q)
        assert torch.equal(loaded(x), ref)
        assert torch.equal(loaded(x[:1].double()), q(x[:1].double()))
        _assert_same_state(loaded, q)


def test_state_dict_replaces_a_differently_configured_layer():
    """Loading into an existing layer replaces its settings and buffers, and drops its caches
    (the HadamardRotation of the old signs, the Python float of the old static scale)."""
    x = _x()
    src = _make_ql(dict(rotation="dense", act_granularity="per_tensor", static_scale=0.5))
    dst = _make_ql(dict(rotation="signed", smooth=True, act_granularity="per_tensor"))
    dst.act_scale = torch.tensor(0.1)
    dst(x)  # fills the caches
    dst.load_state_dict(src.state_dict())
    assert dst.smooth is None and dst.rot_kind == "dense" and float(dst.act_scale) == 0.5
    assert torch.equal(dst(x), src(x))
    # and back: a signed Hadamard with smoothing
    other = _make_ql(dict(rotation="signed", smooth=True))
    dst.load_state_dict(other.state_dict())
    assert dst.act_scale is None and dst.rot.shape == (96,)
    assert torch.equal(dst(x), other(x))


def test_state_dict_survives_torch_save_weights_only(tmp_path):
    """For users who do keep torch.save: the settings are plain values, so the safe
    ``torch.load(weights_only=True)`` reads them."""
    q = _make_ql(dict(rotation="signed", smooth=True))
    torch.save(q.state_dict(), tmp_path / "sd.pt")
    sd = torch.load(tmp_path / "sd.pt", weights_only=True)
    fresh = QuantLinear(96, 64)
    fresh.load_state_dict(sd)
    x = _x()
    assert torch.equal(fresh(x), q(x))


DROP = object()


def _bad(sd, **changes):
    """``sd`` with entries replaced (``name=tensor``) or removed (``name=DROP``), or settings
    changed (``x_<setting>=value``, ``x_<setting>=DROP`` removes it); ``no_extra=True`` drops
    the settings entry."""
    out = dict(sd)
    extra = dict(out["_extra_state"])
    for k, v in changes.items():
        if k == "no_extra":
            continue
        target, k = (extra, k[2:]) if k.startswith("x_") else (out, k)
        if v is DROP:
            target.pop(k)
        else:
            target[k] = v
    out["_extra_state"] = extra
    if changes.get("no_extra"):
        out.pop("_extra_state")
    return out


def test_quant_linear_state_dict_errors():
    q = _make_ql(dict(rotation="signed", smooth=True, act_granularity="per_tensor"))
    q.act_scale = torch.tensor(0.25)
    sd = q.state_dict()
    x = _x()
    ref = q(x)
    cases = [
        (dict(qweight=torch.zeros(64, 95, dtype=torch.int8)), r"qweight: shape \(64, 95\)"),
        (dict(qweight=DROP), r"Missing key.*qweight"),
        (dict(qweight=q.qweight.float()), "qweight: dtype torch.float32, expected torch.int8"),
        (dict(wscale=torch.full((64,), float("nan"))), "wscale: has NaN"),
        (dict(weight=torch.zeros(64, 96)), "weight: not expected with w_bits=8"),
        (dict(rot=torch.full((96,), 0.5)), r"\+1 or -1"),
        (dict(smooth=-torch.ones(96)), "smooth: must be > 0"),
        (dict(act_scale=torch.tensor([0.1, 0.2])), r"act_scale: shape \(2,\), expected \(\)"),
        (dict(bias=torch.zeros(64, dtype=torch.int64)), "bias: dtype torch.int64"),
        (dict(stray=torch.zeros(1)), r"Unexpected key.*stray"),
        (dict(no_extra=True), r"Missing key.*_extra_state"),
        (dict(x_in_features=48), "in_features=48"),
        (dict(x_version=99), "newer than this ood_fast"),
        (dict(x_rot_kind="givens"), "rot_kind must be one of"),
        (dict(x_w_bits=16), "w_bits must be an int in 2..8"),
        (dict(x_act_granularity="per_channel"), "act_granularity must be one of"),
        (dict(x_colour="red"), r"unknown settings \['colour'\]"),
        (dict(x_a_bits=DROP, x_rot_kind=DROP), r"missing settings \['a_bits', 'rot_kind'\]"),
        (dict(x_w_bits=None), "qweight: not expected with w_bits=None"),
    ]
    for changes, match in cases:
        bad = _bad(sd, **changes)
        with pytest.raises(RuntimeError, match=match):
            QuantLinear(96, 64).load_state_dict(bad)
        with pytest.raises(RuntimeError, match=match):
            q.load_state_dict(bad)
        # q is intact: an invalid state changes nothing (the others only repeat q's own values)
        _assert_same_state(q, _make_ql_copy(sd))
        assert torch.equal(q(x), ref), changes
    # non-strict without settings: the layer keeps its own (here the defaults, which match)
    plain = _make_ql(dict(rotation=None, smooth=True))
    fresh = QuantLinear(96, 64)
    res = fresh.load_state_dict(_bad(plain.state_dict(), no_extra=True), strict=False)
    assert res.missing_keys == ["_extra_state"] and torch.equal(fresh(x), plain(x))
    # ... and a rotation the kept settings do not have is refused even then
    with pytest.raises(RuntimeError, match="rot: not expected with w_bits=8, rot_kind='none'"):
        QuantLinear(96, 64).load_state_dict(_bad(sd, no_extra=True), strict=False)
    # a fresh layer that is missing qweight after a non-strict load says so
    with pytest.raises(RuntimeError, match="qweight: missing"):
        QuantLinear(96, 64).load_state_dict(_bad(sd, qweight=DROP), strict=False)
    # a Hadamard rotation on a size with no Hadamard factorization
    q50 = quantize_linear(seeded_linear(k=50), rotation=None)
    bad = dict(q50.state_dict())
    bad["_extra_state"] = dict(bad["_extra_state"], rot_kind="hadamard")
    with pytest.raises(RuntimeError, match="supported"):
        QuantLinear(50, 64).load_state_dict(bad)


def _make_ql_copy(sd):
    c = QuantLinear(96, 64)
    c.load_state_dict(sd)
    return c


# ------------------------------------------------------------------ whole models


@pytest.fixture(scope="module")
def lm():
    cfg = MambaConfig(**CFG)
    model = random_mamba(cfg, seed=0)
    calib = [
        torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(i))
        for i in range(2)
    ]
    test = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(9))
    return model, calib, test


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


def _check_model_round_trip(tmp_path, q, test):
    path = tmp_path / "m.safetensors"
    save_quantized(q, path)
    r = load_quantized(path)
    assert type(r) is type(q)
    assert torch.equal(_logits(r, test), _logits(q, test))
    _assert_same_state(r, q)
    kinds = [type(m) for m in q.modules()]
    assert [type(m) for m in r.modules()] == kinds
    for (name, a), b in zip(q.named_modules(), r.modules(), strict=True):
        assert a.training == b.training, name
        if isinstance(a, QuantLinear):
            assert _settings(a) == _settings(b), name
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["ood_fast"])
        names = set(f.keys())
    assert header["kind"] == "quantized_model" and header["format_version"] == 1
    assert names == {k for k in q.state_dict() if not k.endswith("_extra_state")} - set(
        header["settings"]["ties"]
    )
    return r, path


@pytest.mark.parametrize("method", METHODS)
def test_quantized_mamba_round_trip_bit_identical(tmp_path, lm, method):
    model, calib, test = lm
    q = quantize_mamba(model, calib, method)
    r, path = _check_model_round_trip(tmp_path, q, test)
    assert r.quant_method == method and r.config == q.config
    mixer = r.backbone.layers[1].mixer
    assert (mixer.gate_scale is not None) == (method in ("smoothquant", "mambaquant"))
    assert mixer.x_proj.act_scale is not None  # static per-tensor scales survive
    assert torch.equal(_logits(ood_fast.load(path), test), _logits(q, test))
    # the model owns its memory (not a memory map of the file): overwriting the file in place
    # does not reach it (compared on the tensors: the int8 kernel caches packed weights)
    with open(path, "r+b") as f:
        f.seek(-4096, 2)
        f.write(bytes(4096))
    _assert_same_state(r, q)


@pytest.mark.parametrize(
    "method,kw",
    [
        ("quarot", dict(act_granularity="per_token", quantize_head=False)),
        ("mambaquant", dict(online_klt=True)),  # dense online rotations
        ("mambaquant", dict(w_bits=None, a_bits=None)),  # transformed, unquantized
        ("smoothquant", dict(w_bits=4, a_bits=8)),
    ],
)
def test_quantized_mamba_options_round_trip(tmp_path, lm, method, kw):
    model, calib, test = lm
    q = quantize_mamba(model, calib[:1], method, **kw)
    r, _ = _check_model_round_trip(tmp_path, q, test)
    if kw.get("online_klt"):
        assert r.backbone.layers[0].mixer.x_proj.rot_kind == "dense"
    if kw.get("quantize_head") is False:
        assert type(r.lm_head) is nn.Linear


def test_quantized_mamba_state_dict_into_other_quantized_model(lm):
    """A state dict of one quantized model loads into another of the same layout (here a
    mambaquant state, with gate scales and rotations, into an rtn model that has neither)."""
    model, calib, test = lm
    src = quantize_mamba(model, calib[:1], "mambaquant")
    dst = quantize_mamba(model, calib[:1], "rtn")
    assert dst.backbone.layers[0].mixer.gate_scale is None
    dst.load_state_dict(src.state_dict())
    assert torch.equal(_logits(dst, test), _logits(src, test))


def test_tied_embedding_and_head_stay_tied(tmp_path, lm):
    """MambaLM keeps lm_head its own parameter (a copy when a checkpoint ties them, and every
    rotating transform unties them); a tie the user makes survives an unquantized head's
    quantize_mamba and the file: stored once, one Parameter again after reload."""
    model, calib, test = lm
    tied = random_mamba(MambaConfig(**CFG), seed=1)
    tied.lm_head.weight = tied.backbone.embedding.weight
    q = quantize_mamba(tied, calib[:1], "rtn", quantize_head=False)
    assert q.lm_head.weight is q.backbone.embedding.weight
    r, path = _check_model_round_trip(tmp_path, q, test)
    assert r.lm_head.weight is r.backbone.embedding.weight
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["ood_fast"])
        assert "lm_head.weight" not in set(f.keys())
    assert header["settings"]["ties"] == {"lm_head.weight": "backbone.embedding.weight"}
    # a float model (nothing quantized) is a tree of whitelisted modules too
    _check_model_round_trip(tmp_path, model, test)


@pytest.mark.parametrize("rotation", ["hadamard", None])
def test_quantized_bert_round_trip_bit_identical(tmp_path, rotation):
    from ood_fast.quant.bert import BertEncoder, quantize_bert_w8a8

    torch.manual_seed(0)
    # hidden 48 = 12·4 and FFN 96 = 12·8: Hadamard sizes, as MiniLM's 384 / 1536
    model = BertEncoder(vocab_size=100, hidden=48, layers=2, heads=4, ffn=96, max_positions=32)
    qmodel = quantize_bert_w8a8(model.eval(), rotation)
    ids = torch.randint(0, 100, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    path = tmp_path / "bert.safetensors"
    save_quantized(qmodel, path)
    back = load_quantized(path)
    assert type(back) is BertEncoder and back.config == qmodel.config
    assert sum(isinstance(m, QuantLinear) for m in back.modules()) == 12  # 6 linears per layer
    with torch.no_grad():
        assert torch.equal(back(ids, mask), qmodel(ids, mask))


def test_module_trees_round_trip(tmp_path):
    x = _x(k=96)
    seq = nn.Sequential(
        _make_ql(dict(rotation="signed", smooth=True)),
        nn.GELU(approximate="tanh"),
        nn.LayerNorm(64),
        nn.ModuleDict(
            {
                "head": quantize_linear(seeded_linear(k=64, n=12), rotation="hadamard"),
                "id": nn.Identity(),
            }
        ),
        nn.ModuleList([nn.ReLU(), nn.Dropout(0.25), nn.Linear(12, 5, bias=False)]),
    ).eval()
    seq[1].train()  # train/eval flags are kept per module

    def fwd(m, x):
        h = m[2](m[1](m[0](x)))
        h = m[3]["id"](m[3]["head"](h))
        return m[4][2](m[4][1](m[4][0](h)))

    path = tmp_path / "seq.safetensors"
    save_quantized(seq, path)
    r = load_quantized(path, device="cpu")
    assert [type(m) for m in r.modules()] == [type(m) for m in seq.modules()]
    assert [m.training for m in r.modules()] == [m.training for m in seq.modules()]
    assert r[1].approximate == "tanh" and r[4][1].p == 0.25
    assert torch.equal(fwd(r, x), fwd(seq, x))
    _assert_same_state(r, seq)
    # bf16 parameters stay bf16 (dtypes are kept as saved, not cast to a fresh module's)
    half = nn.Sequential(nn.Linear(8, 4)).to(torch.bfloat16)
    save_quantized(half, path)
    h = load_quantized(path)
    assert h[0].weight.dtype == torch.bfloat16 and torch.equal(h[0].weight, half[0].weight)


# ------------------------------------------------------------------ safety and errors


def _rewrite(src, dst, edit):
    """Copy the file at ``src`` to ``dst`` with its JSON header changed by ``edit(header)``."""
    with safe_open(str(src), framework="pt") as f:
        header = json.loads(f.metadata()["ood_fast"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(header)
    save_file(tensors, str(dst), metadata={"ood_fast": json.dumps(header)})
    return dst


def test_loader_never_unpickles_or_evaluates(tmp_path, lm, monkeypatch):
    import builtins
    import pickle

    model, calib, test = lm
    q = quantize_mamba(model, calib[:1], "mambaquant")
    path = tmp_path / "m.safetensors"
    save_quantized(q, path)
    load_quantized(path)  # warm: every lazy import done before the traps are set

    def trap(*a, **k):
        raise AssertionError("the loader must not unpickle or evaluate code")

    for mod, name in (
        (pickle, "loads"),
        (pickle, "load"),
        (pickle, "Unpickler"),
        (torch, "load"),
        (builtins, "eval"),
        (builtins, "exec"),
    ):
        monkeypatch.setattr(mod, name, trap)
    r = load_quantized(path)
    s = ood_fast.load(path)
    monkeypatch.undo()
    assert torch.equal(_logits(r, test), _logits(q, test))
    assert torch.equal(_logits(s, test), _logits(q, test))


def test_foreign_and_damaged_files(tmp_path):
    q = _make_ql(dict(rotation="signed", smooth=True))
    path = tmp_path / "q.safetensors"
    save_quantized(q, path)

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not an ood_fast estimator file"):
        load_quantized(other)
    pkl = tmp_path / "evil.pt"
    torch.save(q.state_dict(), pkl)  # a pickle: refused, never unpickled
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_quantized(pkl)
    with pytest.raises(FileNotFoundError):
        load_quantized(tmp_path / "missing.safetensors")

    def version(v):
        return lambda h: h.update(format_version=v)

    with pytest.raises(ValueError, match="newer ood_fast"):
        load_quantized(_rewrite(path, tmp_path / "v.safetensors", version(2)))
    with pytest.raises(ValueError, match="invalid format_version"):
        load_quantized(_rewrite(path, tmp_path / "v.safetensors", version(0)))

    def kind(k):
        return lambda h: h["settings"]["module"].update(kind=k)

    with pytest.raises(ValueError, match=r"unknown module kind 'os\.system' at '<root>'"):
        load_quantized(_rewrite(path, tmp_path / "k.safetensors", kind("os.system")))

    def outf(h):
        h["settings"]["module"]["args"]["out_features"] = 65

    with pytest.raises(ValueError, match="do not fit the model"):
        load_quantized(_rewrite(path, tmp_path / "o.safetensors", outf))

    def drop_module(h):
        del h["settings"]["module"]

    with pytest.raises(ValueError, match="corrupt quantized-model header"):
        load_quantized(_rewrite(path, tmp_path / "d.safetensors", drop_module))

    # an estimator file is not a model (and ood_fast.load still loads it as an estimator)
    est = tmp_path / "est.safetensors"
    ood_fast.Mahalanobis().fit(torch.randn(40, 3), torch.arange(40) % 2).save(est)
    with pytest.raises(ValueError, match="holds a 'mahalanobis' estimator, not a quantized"):
        load_quantized(est)

    raw = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) - 50])
    with pytest.raises(ValueError, match="truncated"):
        load_quantized(cut)
    flipped = bytearray(raw)
    flipped[-3] ^= 0x10  # one bit of tensor data (the file ends with tensor bytes)
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="does not match its SHA-256"):
        load_quantized(bad)


def test_unknown_kind_deep_in_a_model(tmp_path, lm):
    model, calib, _ = lm
    q = quantize_mamba(model, calib[:1], "rtn")
    path = tmp_path / "m.safetensors"
    save_quantized(q, path)

    def edit(h):
        backbone = dict(h["settings"]["module"]["children"])["backbone"]
        layers = dict(backbone["children"])["layers"]
        dict(layers["children"])["1"]["kind"] = "subprocess.Popen"

    with pytest.raises(ValueError, match=r"'subprocess\.Popen' at 'backbone\.layers\.1'"):
        load_quantized(_rewrite(path, tmp_path / "k.safetensors", edit))


def test_saving_unsupported_modules_says_which_and_why(tmp_path):
    class MyAct(nn.Module):
        def forward(self, x):
            return x.clamp(min=0)

    path = tmp_path / "x.safetensors"
    with pytest.raises(TypeError, match=r"module '1' of class .*MyAct.*not in the whitelist"):
        save_quantized(nn.Sequential(_make_ql(dict(rotation=None)), MyAct()), path)
    with pytest.raises(TypeError, match=r"'<root>' of class .*MyAct"):
        save_quantized(MyAct(), path)
    with pytest.raises(TypeError, match="expected an nn.Module"):
        save_quantized({"w": torch.zeros(2)}, path)
    # a subclass of a whitelisted class is not that class (its forward may differ)
    sub = type("SubLinear", (nn.Linear,), {})(3, 3)
    with pytest.raises(TypeError, match="SubLinear"):
        save_quantized(sub, path)
    lin = nn.Linear(3, 3)
    lin.register_buffer("tmp", torch.zeros(2), persistent=False)
    with pytest.raises(TypeError, match="non-persistent buffers"):
        save_quantized(lin, path)
    assert not path.exists()


def test_whitelist_is_open_to_explicit_registration(tmp_path):
    from ood_fast.quant import io as qio

    class Scale(nn.Module):
        def __init__(self, factor: float):
            super().__init__()
            self.factor = factor

        def forward(self, x):
            return x * self.factor

    path = tmp_path / "s.safetensors"
    model = nn.Sequential(_make_ql(dict(rotation="signed")), Scale(0.5))
    with pytest.raises(TypeError, match="Scale"):
        save_quantized(model, path)
    qio.register_module_kind(
        "test.Scale", Scale, lambda m: {"f": m.factor}, lambda a: Scale(a["f"])
    )
    try:
        with pytest.raises(ValueError, match="already registered"):
            qio.register_module_kind("test.Scale2", Scale, lambda m: {}, lambda a: Scale(1.0))
        save_quantized(model, path)
        r = load_quantized(path)
        x = _x()
        assert type(r[1]) is Scale and r[1].factor == 0.5 and torch.equal(r(x), model(x))
    finally:
        qio.MODULE_KINDS.pop("test.Scale")
    with pytest.raises(ValueError, match="unknown module kind 'test.Scale' at '1'"):
        load_quantized(path)
