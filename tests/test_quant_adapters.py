"""The compiled-backend adapters of hadamard / rotate_quantize / int8_linear, checked before the
kernels exist: fake ``ood_fast._C`` bindings and a fake Triton kernel module, written to the
contract (docs/QUANT_CONTRACT.md) on top of the torch reference, are swapped in. Every pointer is
read back through ctypes, so a wrong argument order, dtype code, buffer size or missing H_K in an
adapter fails here, not later in a kernel engineer's debugger. (The CUDA adapters differ from
the CPU ones only by the stream argument; they run only where a GPU is.)
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.machinery
import sys
import types

import numpy as np
import pytest
import torch

from ood_fast import _extensions as ext
from ood_fast import ops as public_ops

href = importlib.import_module("ood_fast.reference.hadamard")
qref = importlib.import_module("ood_fast.reference.quant")

_CT = {
    torch.float32: ctypes.c_float,
    torch.float16: ctypes.c_uint16,
    torch.bfloat16: ctypes.c_uint16,
    torch.int8: ctypes.c_int8,
    torch.uint8: ctypes.c_uint8,
    torch.int32: ctypes.c_int32,
}
_CODE = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def at(ptr: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """A tensor aliasing ``count`` elements of ``dtype`` at the raw address ``ptr``."""
    assert ptr, "null pointer where the contract wants a buffer"
    raw = np.ctypeslib.as_array((_CT[dtype] * count).from_address(ptr))
    t = torch.from_numpy(raw)
    return t.view(dtype) if dtype in (torch.float16, torch.bfloat16) else t


class FakeC:
    """``ood_fast._C``'s quant bindings as the contract states them, done by the reference."""

    def __init__(self):
        self.calls = []
        self.report = False  # True: report "may be non-finite" for every call (finite overflow)

    def hadamard(self, x_ptr, dtype, rows, n, K, hk_ptr, signs_ptr, scale, out_ptr, num_threads):
        assert isinstance(num_threads, int) and num_threads >= 1
        dt = _CODE[dtype]
        K_expect, _ = href.factorize(n)
        assert K == K_expect
        assert torch.equal(at(hk_ptr, K * K, torch.float32).view(K, K).double(),
                           href.hadamard_factor(K))  # fmt: skip
        x = at(x_ptr, rows * n, dt).view(rows, n).clone()  # may alias out
        signs = at(signs_ptr, n, torch.float32).clone() if signs_ptr else None
        at(out_ptr, rows * n, dt).copy_(href.hadamard(x, scale, signs).view(-1))
        self.calls.append(("hadamard", dtype, rows, n, scale, signs_ptr != 0))
        # the contract's report: True when some x value may be NaN/Inf (here: exactly)
        return self.report or not bool(torch.isfinite(x).all())

    def rotate_quantize(self, x_ptr, dtype, rows, n, K, hk_ptr, signs_ptr, smooth_ptr, per_token,
                        symmetric, static_scale, bits, codes_ptr, scales_ptr, zeros_ptr,
                        num_threads):  # fmt: skip
        assert isinstance(per_token, bool) and isinstance(symmetric, bool)
        assert isinstance(static_scale, float) and isinstance(bits, int)
        x = at(x_ptr, rows * n, _CODE[dtype]).view(rows, n).float()
        report = self.report or not bool(torch.isfinite(x).all())
        if K:
            assert K == href.factorize(n)[0]
            hk = at(hk_ptr, K * K, torch.float32).view(K, K).double()
            assert torch.equal(hk, href.hadamard_factor(K))
        else:
            assert hk_ptr == 0 and signs_ptr == 0
        if smooth_ptr:
            x = x / at(smooth_ptr, n, torch.float32)
        if K:
            signs = at(signs_ptr, n, torch.float32).clone() if signs_ptr else None
            x = href.hadamard(x, signs=signs)
        q = qref.quantize(x, per_token, symmetric, static_scale if static_scale > 0 else None, bits)
        ns = rows if per_token else 1
        at(codes_ptr, rows * n, torch.int8 if symmetric else torch.uint8).copy_(q.codes.view(-1))
        at(scales_ptr, ns, torch.float32).copy_(q.scale.reshape(-1))
        if symmetric:
            assert zeros_ptr == 0
        else:
            at(zeros_ptr, ns, torch.int32).copy_(q.zero_point.reshape(-1))
        self.calls.append(("rotate_quantize", K, per_token, symmetric, static_scale, bits))
        return report

    def Int8Weight(self, qw_ptr, N, K):  # noqa: N802 (the binding's name)
        fake = self
        weight = at(qw_ptr, N * K, torch.int8).view(N, K).clone()  # packed: a private copy
        self.calls.append(("pack", N, K))

        class Packed:
            def forward(self, qx_ptr, qx_is_u8, M, sx_ptr, zx_ptr, sw_ptr, bias_ptr, out_ptr,
                        out_is_bf16, num_threads):  # fmt: skip
                qx = at(qx_ptr, M * K, torch.uint8 if qx_is_u8 else torch.int8).view(M, K)
                zx = at(zx_ptr, M, torch.int32) if zx_ptr else None
                assert (zx is not None) == qx_is_u8
                sx, sw = at(sx_ptr, M, torch.float32), at(sw_ptr, N, torch.float32)
                bias = at(bias_ptr, N, torch.float32) if bias_ptr else None
                dt = torch.bfloat16 if out_is_bf16 else torch.float32
                res = qref.int8_linear(qx, sx, weight, sw, bias, zx, dt)
                at(out_ptr, M * N, dt).copy_(res.view(-1))
                fake.calls.append(("forward", M, qx_is_u8, out_is_bf16))

        return Packed()


@pytest.fixture
def fake_cpu(monkeypatch):
    fake = FakeC()
    monkeypatch.setattr(ext, "cpu_module", lambda: fake)
    monkeypatch.setattr(ext, "cpu_unavailable", lambda: [])
    from ood_fast import _backend

    monkeypatch.setitem(_backend._BASE_CHECKS, "cpu", lambda: [])
    return fake


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 16, 24, 40, 112])
def test_cpu_hadamard_adapter(fake_cpu, dtype, n):
    x = torch.randn(3, 2, n).to(dtype)
    s = public_ops.random_hadamard(n, seed=1).signs
    got = public_ops.hadamard(x, 0.3, signs=s, backend="cpu")
    assert torch.equal(got, public_ops.hadamard(x, 0.3, signs=s, backend="torch"))
    y = x.clone()
    public_ops.hadamard(y, out=y, backend="cpu")  # in place: out_ptr == x_ptr
    assert torch.equal(y, public_ops.hadamard(x, backend="torch"))
    assert fake_cpu.calls[0][:4] == ("hadamard", {torch.float32: "f32", torch.float16: "f16",
                                                  torch.bfloat16: "bf16"}[dtype], 6, n)  # fmt: skip


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"rotation": "hadamard"},
        {"rotation": "random", "smooth": True},
        {"rotation": "hadamard", "granularity": "per_tensor", "symmetric": False},
        {"rotation": "random", "static_scale": 0.01, "bits": 4},
        {"rotation": "dense", "symmetric": False, "smooth": True},
    ],
    ids=str,
)
def test_cpu_rotate_quantize_adapter(fake_cpu, kw):
    kw = dict(kw)
    n = 48
    x = torch.randn(2, 5, n) * 3
    rot = kw.pop("rotation", None)
    kw["rotation"] = {
        None: None,
        "hadamard": "hadamard",
        "random": public_ops.random_hadamard(n, seed=4),
        "dense": torch.linalg.qr(torch.randn(n, n))[0],
    }[rot]
    if kw.pop("smooth", False):
        kw["smooth"] = torch.rand(n) + 0.5
    got = public_ops.rotate_quantize(x, backend="cpu", **kw)
    expect = public_ops.rotate_quantize(x, backend="torch", **kw)
    for a, b in zip(got, expect, strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert a == b
    call = fake_cpu.calls[-1]
    assert call[0] == "rotate_quantize"
    assert call[1] == (0 if rot in (None, "dense") else 12)  # 48 = 12·4: K = 12


def test_cpu_adapters_check_finite_after_the_call(fake_cpu):
    """cpu reports NaN/Inf itself: x is scanned after the call, only when it reports some."""
    x = torch.randn(3, 24)
    bad = x.clone()
    bad[1, 5] = float("nan")
    msg = r"x: 1 non-finite values \(NaN/Inf\); first at index \(1, 5\)"
    with pytest.raises(ValueError, match=msg):
        public_ops.hadamard(bad, backend="cpu")
    assert fake_cpu.calls[-1][0] == "hadamard"  # the kernel ran first: no pre-scan
    with pytest.raises(ValueError, match=msg):
        public_ops.rotate_quantize(bad, "hadamard", backend="cpu")
    assert fake_cpu.calls[-1][0] == "rotate_quantize"
    # check_finite=False: the report is ignored
    public_ops.hadamard(bad, backend="cpu", check_finite=False)
    public_ops.rotate_quantize(bad, backend="cpu", check_finite=False)
    # in place (x is overwritten) and a dense rotation: scanned before, the kernel never runs
    calls = len(fake_cpu.calls)
    with pytest.raises(ValueError, match=msg):
        public_ops.hadamard(bad, out=bad, backend="cpu")
    with pytest.raises(ValueError, match=msg):
        public_ops.rotate_quantize(bad, torch.eye(24), backend="cpu")
    assert len(fake_cpu.calls) == calls
    # a report for finite x (a row that overflowed): the scan finds nothing, no error
    fake_cpu.report = True
    got = public_ops.hadamard(x, backend="cpu")
    assert torch.equal(got, public_ops.hadamard(x, backend="torch"))
    q = public_ops.rotate_quantize(x, "hadamard", backend="cpu")
    assert torch.equal(q.codes, public_ops.rotate_quantize(x, "hadamard", backend="torch").codes)


def test_cpu_int8_linear_adapter_packs_once(fake_cpu):
    g = torch.Generator().manual_seed(0)
    qw = torch.randint(-127, 128, (6, 40), generator=g).to(torch.int8)
    sw = torch.rand(6, generator=g)
    for unsigned in (False, True):
        for dt in (torch.float32, torch.bfloat16):
            if unsigned:
                qx = torch.randint(0, 256, (3, 4, 40), generator=g).to(torch.uint8)
                zx = torch.randint(0, 256, (3, 4), generator=g, dtype=torch.int32)
            else:
                qx = torch.randint(-127, 128, (3, 4, 40), generator=g).to(torch.int8)
                zx = None
            sx, bias = torch.rand(3, 4, generator=g), torch.randn(6, generator=g)
            got = public_ops.int8_linear(qx, sx, qw, sw, bias, zx=zx, out_dtype=dt, backend="cpu")
            expect = public_ops.int8_linear(qx, sx, qw, sw, bias, zx=zx, out_dtype=dt,
                                            backend="torch")  # fmt: skip
            assert got.shape == (3, 4, 6) and torch.equal(got, expect)
    assert [c for c in fake_cpu.calls if c[0] == "pack"] == [("pack", 6, 40)]  # cached
    qw.add_(0)  # an in-place edit bumps the version: the weight is packed again
    public_ops.int8_linear(qx, sx, qw, sw, zx=zx, backend="cpu")
    assert len([c for c in fake_cpu.calls if c[0] == "pack"]) == 2


# --- Triton adapter ---------------------------------------------------------------------------


@pytest.fixture
def fake_triton(monkeypatch):
    if ext.triton_unavailable():
        pytest.skip("; ".join(ext.triton_unavailable()))
    calls = []

    # Like the real kernels, the fakes write into the op's `out=` buffers.
    def hadamard(x, K, hk, signs, scale, out):
        assert torch.equal(hk.double(), href.hadamard_factor(K))
        calls.append(("hadamard", K))
        return out.copy_(href.hadamard(x, scale, signs))

    def rotate_quantize(x, K, hk, signs, smooth, per_token, symmetric, static_scale, bits, out):
        y = x.float() if smooth is None else x.float() / smooth
        if K:
            assert torch.equal(hk.double(), href.hadamard_factor(K))
            y = href.hadamard(y, signs=signs)
        q = qref.quantize(y, per_token, symmetric, static_scale if static_scale > 0 else None, bits)
        calls.append(("rotate_quantize", K))
        codes, scales, zeros = out
        codes.copy_(q.codes)
        scales.copy_(q.scale.reshape(-1))
        if zeros is not None:
            zeros.copy_(q.zero_point.reshape(-1))
        return out

    def int8_linear(qx, sx, zx, qw, sw, bias, out_dtype, out):
        assert sx.shape == (qx.shape[0],) and (zx is None or zx.dtype == torch.int32)
        calls.append(("int8_linear",))
        return out.copy_(qref.int8_linear(qx, sx, qw, sw, bias, zx, out_dtype))

    for name, fns in (
        ("hadamard", {"hadamard": hadamard}),
        ("quant", {"rotate_quantize": rotate_quantize, "int8_linear": int8_linear}),
    ):
        full = f"ood_fast.kernels.{name}"
        mod = types.ModuleType(full)
        mod.__spec__ = importlib.machinery.ModuleSpec(full, None)
        for k, v in fns.items():
            setattr(mod, k, v)
        monkeypatch.setitem(sys.modules, full, mod)
        import ood_fast.kernels as kpkg

        monkeypatch.setattr(kpkg, name, mod, raising=False)
    return calls


def test_triton_adapters(fake_triton):
    x = torch.randn(4, 24)
    s = public_ops.random_hadamard(24, seed=2).signs
    assert torch.equal(
        public_ops.hadamard(x, signs=s, backend="triton"),
        public_ops.hadamard(x, signs=s, backend="torch"),
    )
    for kw in ({"rotation": "hadamard"}, {"symmetric": False, "granularity": "per_tensor"}):
        got = public_ops.rotate_quantize(x, backend="triton", **kw)
        expect = public_ops.rotate_quantize(x, backend="torch", **kw)
        assert torch.equal(got.codes, expect.codes) and torch.equal(got.scale, expect.scale)
    qw = torch.randint(-127, 128, (5, 24)).to(torch.int8)
    q = public_ops.rotate_quantize(x, "hadamard", symmetric=False)
    got = public_ops.int8_linear(q.codes, q.scale, qw, torch.rand(5), zx=q.zero_point,
                                 out_dtype=torch.float16, backend="triton")  # fmt: skip
    assert got.dtype == torch.float16 and got.shape == (4, 5)
    assert [c[0] for c in fake_triton] == [
        "hadamard", "rotate_quantize", "rotate_quantize", "int8_linear"
    ]  # fmt: skip
