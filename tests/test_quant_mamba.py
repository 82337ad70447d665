"""Mamba-1 model, QuantLinear and the W8A8 model transforms (ood_fast.quant).

The float model is checked against an independent numpy float64 implementation (conv, scan,
gate, norms, written from the equations); the transforms against the float model.
"""

import numpy as np
import pytest
import torch
from _quant_helpers import outlier_x, seeded_linear
from torch import nn

from ood_fast.quant import QuantLinear, quantize_linear, quantize_mamba
from ood_fast.quant.mamba import (
    MambaConfig,
    MambaLM,
    random_mamba,
    selective_scan,
)
from ood_fast.reference.hadamard import HadamardRotation, random_hadamard

CFG = dict(d_model=48, n_layer=2, vocab_size=96, d_state=8)  # d_inner 96 = 12·8, dt_rank 3


def _sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.double(), x.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum()))


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ------------------------------------------------------------------ independent float64 model


def _np_softplus(x):
    return np.logaddexp(0.0, x)


def _np_silu(x):
    return x / (1.0 + np.exp(-x))


def _np_scan(x, delta, A, B, C, D):
    """Slow float64 loop, one (batch, time) step at a time: h ← exp(δA)h + δBx; y = hC + Dx."""
    bt, length, di = x.shape
    y = np.zeros((bt, length, di))
    for b in range(bt):
        h = np.zeros(A.shape)
        for t in range(length):
            for d in range(di):
                h[d] = np.exp(delta[b, t, d] * A[d]) * h[d] + delta[b, t, d] * B[b, t] * x[b, t, d]
                y[b, t, d] = h[d] @ C[b, t] + D[d] * x[b, t, d]
    return y


def _np_mixer(u, sd, p, cfg):
    w = {k[len(p) :]: v.double().numpy() for k, v in sd.items() if k.startswith(p)}
    di, r, n = cfg.d_inner, cfg.dt_rank, cfg.d_state
    xz = u @ w["in_proj.weight"].T
    x, z = xz[..., :di], xz[..., di:]
    # causal depthwise conv: out[t] = b + Σ_j w[j] x[t - (K-1) + j], zero before t=0
    kw = w["conv1d.weight"][:, 0, :]  # [di, K]
    k = kw.shape[1]
    xc = np.zeros_like(x)
    for t in range(x.shape[1]):
        for j in range(k):
            s = t - (k - 1) + j
            if s >= 0:
                xc[:, t] += kw[:, j] * x[:, s]
    xc = _np_silu(xc + w["conv1d.bias"])
    dbc = xc @ w["x_proj.weight"].T
    dt, bm, cm = dbc[..., :r], dbc[..., r : r + n], dbc[..., r + n :]
    delta = _np_softplus(dt @ w["dt_proj.weight"].T + w["dt_proj.bias"])
    y = _np_scan(xc, delta, -np.exp(w["A_log"]), bm, cm, w["D"])
    return (y * _np_silu(z)) @ w["out_proj.weight"].T


def _np_rmsnorm(h, weight, eps):
    return h / np.sqrt((h**2).mean(-1, keepdims=True) + eps) * weight


def _np_lm(ids, model):
    cfg = model.config
    sd = model.state_dict()
    h = sd["backbone.embedding.weight"].double().numpy()[ids.numpy()]
    res = np.zeros_like(h)
    for i in range(cfg.n_layer):
        res = res + h
        p = f"backbone.layers.{i}."
        u = _np_rmsnorm(res, sd[p + "norm.weight"].double().numpy(), cfg.norm_eps)
        h = _np_mixer(u, sd, p + "mixer.", cfg)
    res = res + h
    hf = _np_rmsnorm(res, sd["backbone.norm_f.weight"].double().numpy(), cfg.norm_eps)
    return hf @ sd["lm_head.weight"].double().numpy().T


# ------------------------------------------------------------------ the float model


def test_selective_scan_matches_float64_loop():
    g = torch.Generator().manual_seed(0)
    bt, length, di, n = 2, 70, 5, 4  # crosses a scan chunk (64 steps)
    x = torch.randn(bt, length, di, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(bt, length, di, generator=g))
    A = -torch.rand(di, n, generator=g) * 3
    B = torch.randn(bt, length, n, generator=g)
    C = torch.randn(bt, length, n, generator=g)
    D = torch.randn(di, generator=g)
    y = selective_scan(x, delta, A, B, C, D)
    ref = _np_scan(*(t.double().numpy() for t in (x, delta, A, B, C, D)))
    assert y.dtype == torch.float32 and y.shape == (bt, length, di)
    np.testing.assert_allclose(y.double().numpy(), ref, rtol=1e-5, atol=1e-5)
    # D=None drops the skip term only
    y0 = selective_scan(x, delta, A, B, C, None)
    np.testing.assert_allclose((y - y0).numpy(), (x * D).numpy(), rtol=1e-5, atol=1e-5)


def test_lm_matches_independent_float64_model():
    cfg = MambaConfig(**CFG)
    model = random_mamba(cfg, seed=1)
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        logits = model(ids)
    ref = _np_lm(ids, model)
    assert logits.shape == (2, 7, cfg.vocab_size) and logits.dtype == torch.float32
    assert _rel(logits, torch.from_numpy(ref)) < 2e-5
    # a [L] input gives [L, V]; causality: a later token never changes earlier logits
    with torch.no_grad():
        one = model(ids[0])
        ids2 = ids.clone()
        ids2[:, -1] = (ids2[:, -1] + 1) % cfg.vocab_size
        l2 = model(ids2)
    torch.testing.assert_close(one, logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l2[:, :-1], logits[:, :-1], rtol=0, atol=0)
    assert not torch.equal(l2[:, -1], logits[:, -1])


def test_config_defaults_and_bad_config():
    cfg = MambaConfig(d_model=768, n_layer=24, vocab_size=50277, pad_vocab_size_multiple=8)
    assert cfg.dt_rank == 48 and cfg.d_inner == 1536 and cfg.vocab_size == 50280
    assert MambaConfig(d_model=40, n_layer=1, vocab_size=10).dt_rank == 3  # ceil(40/16)
    with pytest.raises(ValueError, match="d_model"):
        MambaConfig(d_model=0, n_layer=1, vocab_size=10)
    with pytest.raises(ValueError, match="dt_rank"):
        MambaConfig(d_model=16, n_layer=1, vocab_size=10, dt_rank="big")


def _names(model):
    return set(model.state_dict())


def test_state_dict_names_are_state_spaces_layout():
    model = MambaLM(MambaConfig(**CFG))
    names = _names(model)
    expected = {"backbone.embedding.weight", "backbone.norm_f.weight", "lm_head.weight"}
    for i in range(2):
        p = f"backbone.layers.{i}."
        expected |= {p + "norm.weight"} | {
            p + "mixer." + k
            for k in (
                "A_log",
                "D",
                "in_proj.weight",
                "conv1d.weight",
                "conv1d.bias",
                "x_proj.weight",
                "dt_proj.weight",
                "dt_proj.bias",
                "out_proj.weight",
            )
        }
    assert names == expected


def test_loads_state_spaces_and_hf_layouts(tmp_path):
    from safetensors.torch import save_file

    cfg = MambaConfig(**CFG)
    src = random_mamba(cfg, seed=2)
    ids = torch.randint(0, cfg.vocab_size, (1, 6))
    with torch.no_grad():
        ref = src(ids)
    sd = {k: v.clone() for k, v in src.state_dict().items()}

    # state-spaces layout, from a dict, config inferred from the shapes
    a = MambaLM.from_pretrained(sd)
    assert a.config.d_inner == cfg.d_inner and a.config.dt_rank == cfg.dt_rank
    assert a.config.n_layer == 2 and a.config.d_state == 8 and a.config.d_conv == 4
    # HF MambaForCausalLM layout: "embeddings", tied head (no lm_head.weight), safetensors file
    hf = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in sd.items()}
    hf.pop("lm_head.weight")
    path = tmp_path / "model.safetensors"
    save_file(hf, str(path))
    b = MambaLM.from_pretrained(path)
    # .bin through torch.load(weights_only=True)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    c = MambaLM.from_pretrained(str(tmp_path / "pytorch_model.bin"))
    with torch.no_grad():
        torch.testing.assert_close(a(ids), ref, rtol=0, atol=0)
        torch.testing.assert_close(c(ids), ref, rtol=0, atol=0)
        # the HF file has the head tied to the embedding
        tied = nn.functional.linear(
            src.backbone.norm_f(_hidden(src, ids)), sd["backbone.embedding.weight"]
        )
        torch.testing.assert_close(b(ids), tied, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.lm_head.weight, sd["backbone.embedding.weight"])
    # load_state_dict of an existing model takes the HF names too
    d = MambaLM(cfg)
    d.load_state_dict({**hf, "lm_head.weight": sd["lm_head.weight"]})
    with torch.no_grad():
        torch.testing.assert_close(d(ids), ref, rtol=0, atol=0)


def _hidden(model, ids):
    """The residual stream before norm_f."""
    bb = model.backbone
    with torch.no_grad():
        h, res = bb.embedding(ids), None
        for layer in bb.layers:
            h, res = layer(h, res)
        return res + h


def test_checkpoint_errors(tmp_path):
    with pytest.raises(KeyError, match="not a Mamba-1 LM checkpoint"):
        MambaLM.from_pretrained({"foo.weight": torch.zeros(2)})
    with pytest.raises(FileNotFoundError):
        MambaLM.from_pretrained(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError):
        MambaLM.from_pretrained(42)
    model = MambaLM(MambaConfig(**CFG))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[0, 96]]))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        model(torch.zeros(1, 1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="MambaMixer"):
        model.backbone.layers[0].mixer(torch.zeros(1, 3, 5))


def test_gate_scale_is_scaled_silu():
    mx = MambaLM(MambaConfig(**CFG)).backbone.layers[0].mixer
    z = torch.randn(3, 96)
    torch.testing.assert_close(mx.gate(z), nn.functional.silu(z))
    s = torch.rand(96) + 0.5
    mx.gate_scale = s
    # SSiLU_s(z / s) = SiLU(z) / s  (the identity the S-SiLU fold relies on)
    torch.testing.assert_close(mx.gate(z / s), nn.functional.silu(z) / s, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ QuantLinear


def _emulate(x, q: QuantLinear):
    """Independent float64 emulation of the W8A8 forward (per-token, symmetric, bits=8)."""
    xd = x.double()
    if q.smooth is not None:
        xd = xd / q.smooth.double()
    r = None
    if q.rot_kind == "dense":
        r = q.rot.double()
    elif q.rot_kind == "hadamard":
        r = HadamardRotation(q.in_features, q.rot).matrix()
    if r is not None:
        xd = xd @ r
    y = xd.numpy()
    scale = np.abs(y).max(1, keepdims=True) / 127.0
    codes = np.clip(np.rint(y / scale), -127, 127)
    acc = codes @ q.qweight.double().numpy().T
    out = acc * scale * q.wscale.double().numpy()[None, :]
    if q.bias is not None:
        out = out + q.bias.double().numpy()
    return torch.from_numpy(out)


@pytest.mark.parametrize("rotation", [None, "hadamard", "signed", "dense"])
def test_quant_linear_matches_emulation_and_float(rotation):
    lin = seeded_linear()
    x = outlier_x()
    rot = {
        None: None,
        "hadamard": "hadamard",
        "signed": random_hadamard(96, seed=3),
        "dense": torch.linalg.qr(torch.randn(96, 96, dtype=torch.float64))[0],
    }[rotation]
    smooth = torch.rand(96) + 0.5
    q = quantize_linear(lin, rotation=rot, smooth=smooth, act_granularity="per_token")
    assert q.qweight.dtype == torch.int8 and q.wscale.shape == (64,)
    out = q(x)
    assert out.shape == (256, 64) and out.dtype == torch.float32
    # the kernels' result is the emulated int8 computation (a code may differ by one at a
    # rounding tie between the two float paths: far above 60 dB either way)
    assert _sqnr_db(_emulate(x, q), out) > 60
    with torch.no_grad():
        ref = lin(x)
    s = _sqnr_db(ref, out)
    assert s > (30 if rotation is None else 35), s
    # unquantized: the same float function (W diag(s) R and (x / s) R cancel)
    f = quantize_linear(lin, rotation=rot, smooth=smooth, w_bits=None, a_bits=None)
    with torch.no_grad():
        assert _rel(f(x), ref) < 1e-5


def test_quant_linear_rotation_beats_plain_per_tensor():
    """W8A8 with a dynamic per-tensor scale on activations with massive channels: the online
    Hadamard spreads them (SQNR gain of many dB)."""
    lin, x = seeded_linear(), outlier_x()
    with torch.no_grad():
        ref = lin(x)
    plain = _sqnr_db(ref, quantize_linear(lin, act_granularity="per_tensor")(x))
    rot = _sqnr_db(
        ref,
        quantize_linear(lin, rotation=random_hadamard(96, 1), act_granularity="per_tensor")(x),
    )
    assert rot > plain + 6, (plain, rot)
    # static scale: absmax/127 of the rotated calibration input reproduces the dynamic result
    h = random_hadamard(96, 1)
    amax = float(h.apply(x).abs().max())
    st = quantize_linear(lin, rotation=h, act_granularity="per_tensor", static_scale=amax / 127)
    assert _sqnr_db(ref, st(x)) == pytest.approx(rot, abs=0.05)


def test_quant_linear_keeps_leading_dims_and_dtype():
    lin = seeded_linear(bias=False)
    q = quantize_linear(lin, rotation="hadamard")
    x = torch.randn(2, 3, 5, 96)
    out = q(x)
    assert out.shape == (2, 3, 5, 64) and lin.bias is None and q.bias is None
    torch.testing.assert_close(out, q(x.reshape(-1, 96)).reshape(2, 3, 5, 64))
    ob = q(x.to(torch.bfloat16))
    assert ob.dtype == torch.bfloat16 and ob.shape == (2, 3, 5, 64)
    # 4-bit weights and activations still run (codes within ±7) and are worse than 8-bit
    with torch.no_grad():
        ref = lin(x)
    q4 = quantize_linear(lin, rotation="hadamard", w_bits=4, a_bits=4)
    assert int(q4.qweight.abs().max()) <= 7
    assert _sqnr_db(ref, q4(x)) < _sqnr_db(ref, out) - 10


def test_quant_linear_bad_input():
    lin = seeded_linear()
    with pytest.raises(TypeError, match="nn.Linear"):
        quantize_linear(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="act_granularity"):
        quantize_linear(lin, act_granularity="per_channel")
    with pytest.raises(ValueError, match="static_scale needs"):
        quantize_linear(lin, static_scale=0.1)
    with pytest.raises(ValueError, match="static_scale must be"):
        quantize_linear(lin, act_granularity="per_tensor", static_scale=-1.0)
    with pytest.raises(ValueError, match="w_bits"):
        quantize_linear(lin, w_bits=9)
    with pytest.raises(ValueError, match="smooth must be"):
        quantize_linear(lin, smooth=torch.ones(5))
    with pytest.raises(ValueError, match="smooth must be finite and > 0"):
        quantize_linear(lin, smooth=-torch.ones(96))
    with pytest.raises(ValueError, match="not orthogonal"):
        quantize_linear(lin, rotation=2 * torch.eye(96))
    with pytest.raises(ValueError, match=r"\[96, 96\]"):
        quantize_linear(lin, rotation=torch.eye(5))
    with pytest.raises(ValueError, match="Hadamard|supported|factor"):
        quantize_linear(seeded_linear(k=97), rotation="hadamard")
    with torch.no_grad():
        bad = seeded_linear()
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_linear(bad)
    q = quantize_linear(lin)
    with pytest.raises(ValueError, match=r"\[\.\.\., 96\]"):
        q(torch.randn(4, 95))
    with pytest.raises(TypeError, match="floating"):
        q(torch.ones(4, 96, dtype=torch.int32))
    x = torch.randn(4, 96)
    x[1, 2] = float("inf")
    with pytest.raises(ValueError):
        q(x)


# ------------------------------------------------------------------ quantize_mamba


@pytest.fixture(scope="module")
def outlier_lm():
    cfg = MambaConfig(**CFG)
    model = random_mamba(cfg, seed=0)
    calib = [
        torch.randint(0, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(i))
        for i in range(2)
    ]
    test = torch.randint(0, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        ref = model(test)
    return model, calib, test, ref


@pytest.mark.parametrize("method", ["rtn", "smoothquant", "quarot", "mambaquant"])
def test_transforms_are_computationally_invariant(outlier_lm, method):
    model, calib, test, ref = outlier_lm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    f = quantize_mamba(model, calib, method, w_bits=None, a_bits=None)
    with torch.no_grad():
        out = f(test)
    assert _rel(out, ref) < 1e-5, method
    # the input model is untouched, and the transformed one really is transformed
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    mixer = f.backbone.layers[0].mixer
    assert isinstance(mixer.in_proj, QuantLinear) and isinstance(f.lm_head, QuantLinear)
    changed = not torch.allclose(f.backbone.embedding.weight, model.backbone.embedding.weight)
    assert changed == (method in ("quarot", "mambaquant"))
    assert (mixer.gate_scale is not None) == (method in ("smoothquant", "mambaquant"))
    assert (mixer.out_proj.rot_kind == "hadamard") == (method in ("quarot", "mambaquant"))
    if method in ("quarot", "mambaquant"):
        torch.testing.assert_close(f.backbone.layers[1].norm.weight, torch.ones(48))


def test_mambaquant_klt_equalizes_channel_variance(outlier_lm):
    """R1 (pooled over every norm) and R5 (per layer) are KLT-H: on the calibration data each
    rotated channel has the same variance tr(Σ)/n."""
    from ood_fast.quant import CovarianceAccumulator

    model, calib, _, _ = outlier_lm
    f = quantize_mamba(model, calib, "mambaquant", w_bits=None, a_bits=None)

    def out_hook(acc):
        def hook(_m, _a, o):
            acc.update(o.double())  # returns the accumulator: a hook must return None

        return hook

    def in_hook(acc):
        def hook(_m, a):
            acc.update(a[0].double())

        return hook

    res = CovarianceAccumulator(48)
    dts = [CovarianceAccumulator(3) for _ in range(2)]
    hooks = [f.backbone.norm_f.register_forward_hook(out_hook(res))]
    for i, layer in enumerate(f.backbone.layers):
        hooks.append(layer.norm.register_forward_hook(out_hook(res)))
        hooks.append(layer.mixer.dt_proj.register_forward_pre_hook(in_hook(dts[i])))
    with torch.no_grad():
        for b in calib:
            f(b)
    for h in hooks:
        h.remove()
    for acc in [res, *dts]:
        var = torch.diagonal(acc.covariance)
        assert float(var.max() / var.min()) < 1.001, var
    # the float model's own in_proj input is far from equalised
    plain = CovarianceAccumulator(48)
    h = model.backbone.layers[0].mixer.in_proj.register_forward_pre_hook(in_hook(plain))
    with torch.no_grad():
        model(calib[0])
    h.remove()
    var = torch.diagonal(plain.covariance)
    assert float(var.max() / var.min()) > 100


def test_mambaquant_beats_quarot_and_rtn(outlier_lm, capsys):
    """W8A8 static per-tensor on the random LM with injected outliers (channel outliers,
    dense spiked residual covariance, outlier weight rows): logits SQNR vs the float model."""
    model, calib, test, ref = outlier_lm
    sq = {}
    for method in ("rtn", "smoothquant", "quarot", "mambaquant"):
        q = quantize_mamba(model, calib, method)
        lin = q.backbone.layers[0].mixer.x_proj
        assert lin.act_scale is not None and lin.qweight.dtype == torch.int8
        with torch.no_grad():
            sq[method] = _sqnr_db(ref, q(test))
    with capsys.disabled():
        print("\nW8A8 per-tensor logits SQNR dB:", {k: round(v, 2) for k, v in sq.items()})
    assert sq["quarot"] > sq["rtn"] + 3, sq
    assert sq["smoothquant"] > sq["rtn"], sq
    assert sq["mambaquant"] > sq["quarot"] + 2, sq
    assert sq["mambaquant"] > sq["smoothquant"] + 2, sq


def test_quantize_mamba_options(outlier_lm):
    model, calib, test, ref = outlier_lm
    q = quantize_mamba(model, calib[:1], "quarot", act_granularity="per_token", quantize_head=False)
    assert isinstance(q.lm_head, nn.Linear) and not isinstance(q.lm_head, QuantLinear)
    assert q.backbone.layers[0].mixer.in_proj.act_scale is None
    with torch.no_grad():
        assert _sqnr_db(ref, q(test)) > 30
    # online KLT (dense rotations) and a single [B, L] tensor as the calibration set
    q = quantize_mamba(model, calib[0], "mambaquant", online_klt=True, w_bits=None, a_bits=None)
    assert q.backbone.layers[0].mixer.x_proj.rot_kind == "dense"
    with torch.no_grad():
        assert _rel(q(test), ref) < 1e-5


def test_quantize_mamba_progress_bar(outlier_lm, capsys):
    model, calib, test, _ = outlier_lm
    quiet = quantize_mamba(model, calib[:2], "mambaquant")
    assert capsys.readouterr().err == ""
    shown = quantize_mamba(model, calib[:2], "mambaquant", progress=True)
    err = capsys.readouterr().err
    assert "quantize_mamba: statistics" in err and "quantize_mamba: activation scales" in err
    with torch.no_grad():
        assert torch.equal(shown(test), quiet(test))  # the bar changes nothing else


def test_quantize_mamba_bad_input(outlier_lm):
    model, calib, _, _ = outlier_lm
    with pytest.raises(ValueError, match="method"):
        quantize_mamba(model, calib, "gptq")
    with pytest.raises(TypeError, match="MambaLM"):
        quantize_mamba(nn.Linear(3, 3), calib)
    with pytest.raises(ValueError, match="no calibration"):
        quantize_mamba(model, [])
    with pytest.raises(TypeError, match="integer"):
        quantize_mamba(model, [torch.randn(2, 4)])
    with pytest.raises(ValueError, match="outside"):
        quantize_mamba(model, [torch.full((2, 4), 500)])
    with pytest.raises(ValueError, match="act_granularity"):
        quantize_mamba(model, calib, act_granularity="per_channel")
    with pytest.raises(ValueError, match="a_bits"):
        quantize_mamba(model, calib, a_bits=16)
    q = quantize_mamba(model, calib[:1], "rtn")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_mamba(q, calib)
    bad = random_mamba(MambaConfig(**CFG), seed=0)
    with torch.no_grad():
        bad.backbone.layers[0].mixer.D[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_mamba(bad, calib)


@pytest.mark.parametrize("n", [3, 5, 17])
def test_equalizing_rotation_for_non_hadamard_sizes(n):
    from ood_fast.quant.transforms import _equalizing_rotation

    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    a[:, 0] *= 30.0  # one dominant direction
    cov = a @ a.T
    q = _equalizing_rotation(cov)
    torch.testing.assert_close(q.T @ q, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    d = torch.diagonal(q.T @ cov @ q)
    torch.testing.assert_close(d, torch.full((n,), float(cov.trace()) / n, dtype=torch.float64))


@pytest.mark.gpu
def test_quantize_mamba_on_cuda_matches_cpu(outlier_lm):
    """The same transforms on a CUDA model (calibration on the GPU, fusion on the CPU in fp64)."""
    model, calib, test, ref = outlier_lm
    cpu = quantize_mamba(model, calib, "mambaquant")
    gpu = quantize_mamba(model.cuda(), [b.cuda() for b in calib], "mambaquant")
    model.cpu()
    assert gpu.lm_head.qweight.is_cuda
    with torch.no_grad():
        a, b = cpu(test), gpu(test.cuda()).cpu()
    assert _sqnr_db(a, b) > 30 and _sqnr_db(ref, b) > _sqnr_db(ref, a) - 1
