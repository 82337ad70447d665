"""Mamba-1 model, QuantLinear and the W8A8 model transforms (ood_fast.quant).

The float model is checked against an independent numpy float64 implementation (conv, scan,
gate, norms, written from the equations); the transforms against the float model.
"""


import numpy as np
import pytest
import torch
from torch import nn

from ood_fast.quant.mamba import (
    MambaConfig,
    MambaLM,
    random_mamba,
    selective_scan,
)

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
    bt, length, di, n = 2, 9, 5, 4
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
