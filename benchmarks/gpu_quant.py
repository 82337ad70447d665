"""GPU timings of the rotation-quantization kernels (issue 4), for a lent GPU (H100/H200).

    python benchmarks/gpu_quant.py [--json PATH] [--quick]

Rows (CUDA events; each figure the mean of ``--iters`` calls after warm-up, including Triton's
autotuning, which runs on the first call):

* ``hadamard``: fp32 rows of n (n = 256 .. 8192 and K·2^m sizes), 64 MB per call, into an
  existing out buffer, for every available backend (cuda, triton; torch = the reference's
  Kronecker GEMMs for scale) against ``out.copy_(x)`` of the same bytes. ``ratio_vs_copy`` =
  time / copy time (issue bar: <= 1.3 up to n = 8192); GB/s counts bytes read + written.
* ``rotate_quantize``: Hadamard + per-token symmetric int8 codes from 64 MB of fp32, against
  the copy of x (64 MB read + 64 MB written) and reported as bandwidth of its own bytes
  (read x, write codes + scales).
* ``int8_gemm`` at M = N = K = 4096: Triton ``int8_linear`` (int8 x int8 -> int32, fp32
  dequant epilogue) vs ``torch._int_mm`` (int32 out, no epilogue) and bf16 ``torch.mm``
  (cuBLAS); TOPS = 2·M·N·K / time. Issue bar: int8 >= 1.5x bf16 cuBLAS.

Results go to stdout and, as JSON, to ``--json`` (default ``$OUT/gpu_quant.json`` when $OUT is
set, the device tool's output folder). Nothing here asserts speed; a backend that fails is
recorded with its error and the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MB64 = 64 * 2**20
_REPORT: dict = {}  # written to _JSON after every row, so a timeout keeps what was measured
_JSON: list = []


def _events_ms(fn, iters: int, warmup: int) -> float:
    """Mean milliseconds per call of fn() on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def _backends():
    """The compiled backends this machine can run (name -> why not, or None)."""
    from ood_fast import _extensions as ext

    out = {}
    mod = ext.cuda_module()
    out["cuda"] = None if mod is not None and hasattr(mod, "hadamard") else "no ood_fast._cuda"
    why = ext.triton_unavailable()
    out["triton"] = "; ".join(why) if why else None
    return out


def _record(table, **row):
    table.append(row)
    if _JSON:
        Path(_JSON[0]).write_text(json.dumps(_REPORT, indent=1))
    keys = ("workload", "backend", "n", "ms", "GBps", "ratio_vs_copy", "TOPS", "error")
    print("  ".join(f"{k}={row[k]}" for k in keys if k in row), flush=True)


def bench_hadamard(rows, ns, backends, iters, warmup):
    ops_h = importlib.import_module("ood_fast.ops.hadamard")  # the module, not the function

    for n in ns:
        R = MB64 // (4 * n)
        x = torch.randn(R, n, device="cuda")
        out = torch.empty_like(x)
        nbytes = 2 * x.numel() * 4  # read + write
        copy_ms = _events_ms(lambda x=x, out=out: out.copy_(x), iters, warmup)
        _record(rows, workload="hadamard", backend="copy", n=n, rows=R, ms=round(copy_ms, 4),
                GBps=round(nbytes / copy_ms / 1e6, 1), ratio_vs_copy=1.0)  # fmt: skip
        for be in ("cuda", "triton", "torch"):
            if be != "torch" and backends.get(be):
                _record(rows, workload="hadamard", backend=be, n=n, error=backends[be])
                continue
            try:
                fn = lambda x=x, out=out, be=be: ops_h.hadamard(  # noqa: E731
                    x, out=out, check_finite=False, backend=be
                )
                fn()
                torch.cuda.synchronize()
                ref = ops_h.hadamard(x[:4], backend="torch")
                err = (out[:4] - ref).abs().max().item()
                ms = _events_ms(fn, iters if be != "torch" else max(2, iters // 5), warmup)
                _record(rows, workload="hadamard", backend=be, n=n, rows=R, ms=round(ms, 4),
                        GBps=round(nbytes / ms / 1e6, 1), ratio_vs_copy=round(ms / copy_ms, 3),
                        max_abs_err_vs_torch=err)  # fmt: skip
            except Exception as exc:  # record and go on
                _record(rows, workload="hadamard", backend=be, n=n, error=repr(exc)[:300])


def bench_rotate_quantize(rows, ns, backends, iters, warmup):
    ops_q = importlib.import_module("ood_fast.ops.quant")

    for n in ns:
        R = MB64 // (4 * n)
        x = torch.randn(R, n, device="cuda")
        copy_out = torch.empty_like(x)
        copy_ms = _events_ms(lambda x=x, o=copy_out: o.copy_(x), iters, warmup)
        own_bytes = x.numel() * 4 + x.numel() + R * 4  # read x, write codes + scales
        _record(rows, workload="rotate_quantize", backend="copy", n=n, rows=R,
                ms=round(copy_ms, 4), GBps=round(2 * x.numel() * 4 / copy_ms / 1e6, 1),
                ratio_vs_copy=1.0)  # fmt: skip
        q = ops_q.rotate_quantize(x[:1], rotation="hadamard", backend="torch")
        buf = type(q)(torch.empty(R, n, dtype=torch.int8, device="cuda"),
                      torch.empty(R, device="cuda"), None, 8, True)  # fmt: skip
        for be in ("cuda", "triton", "torch"):
            if be != "torch" and backends.get(be):
                _record(rows, workload="rotate_quantize", backend=be, n=n, error=backends[be])
                continue
            try:
                fn = lambda x=x, buf=buf, be=be: ops_q.rotate_quantize(  # noqa: E731
                    x, rotation="hadamard", out=buf, check_finite=False, backend=be
                )
                fn()
                torch.cuda.synchronize()
                ref = ops_q.rotate_quantize(x[:8], rotation="hadamard", backend="torch")
                mism = (buf.codes[:8].long() - ref.codes.long()).abs().max().item()
                ms = _events_ms(fn, iters if be != "torch" else max(2, iters // 5), warmup)
                _record(rows, workload="rotate_quantize", backend=be, n=n, rows=R,
                        ms=round(ms, 4), GBps=round(own_bytes / ms / 1e6, 1),
                        ratio_vs_copy=round(ms / copy_ms, 3),
                        max_code_diff_vs_torch=mism)  # fmt: skip
            except Exception as exc:
                _record(rows, workload="rotate_quantize", backend=be, n=n, error=repr(exc)[:300])


def bench_gemm(rows, size, backends, iters, warmup):
    M = N = K = size
    flops = 2 * M * N * K
    g = torch.Generator(device="cuda").manual_seed(0)
    qx = torch.randint(-127, 128, (M, K), device="cuda", generator=g, dtype=torch.int8)
    qw = torch.randint(-127, 128, (N, K), device="cuda", generator=g, dtype=torch.int8)
    sx = torch.rand(M, device="cuda") * 1e-2
    sw = torch.rand(N, device="cuda") * 1e-2
    a16 = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b16 = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
    cases = {
        "torch.mm bf16 (cuBLAS)": lambda: torch.mm(a16, b16),
        "torch._int_mm int8->int32": lambda: torch._int_mm(qx, qw.t()),
    }
    if not backends.get("triton"):
        from ood_fast.kernels import quant as tq

        cases["triton int8_linear fp32 out"] = lambda: tq.int8_linear(
            qx, sx, None, qw, sw, None, torch.float32
        )
        cases["triton int8_linear bf16 out"] = lambda: tq.int8_linear(
            qx, sx, None, qw, sw, None, torch.bfloat16
        )
    else:
        _record(rows, workload="int8_gemm", backend="triton", n=size, error=backends["triton"])
    bf16_ms = None
    for name, fn in cases.items():
        try:
            ms = _events_ms(fn, iters, warmup)
            if name.startswith("torch.mm"):
                bf16_ms = ms
            extra = {}
            if name.startswith("triton") and name.endswith("fp32 out"):
                acc = torch._int_mm(qx[:64], qw.t()).float()
                ref = (acc * sx[:64, None]) * sw[None, :]
                extra["max_rel_err_vs_int_mm"] = (
                    (fn()[:64] - ref).abs().max() / ref.abs().max()
                ).item()
            _record(rows, workload="int8_gemm", backend=name, n=size, ms=round(ms, 4),
                    TOPS=round(flops / ms / 1e9, 1),
                    speedup_vs_bf16=None if bf16_ms is None else round(bf16_ms / ms, 3),
                    **extra)  # fmt: skip
        except Exception as exc:
            _record(rows, workload="int8_gemm", backend=name, n=size, error=repr(exc)[:300])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    out_dir = os.environ.get("OUT")
    ap.add_argument("--json", default=str(Path(out_dir) / "gpu_quant.json") if out_dir else None)
    ap.add_argument("--quick", action="store_true", help="fewer sizes and iterations")
    ap.add_argument("--iters", type=int, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_quant.py: torch sees no CUDA device; nothing to time", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    iters = args.iters or (10 if args.quick else 30)
    warmup = 2 if args.quick else 3
    pow2 = [256, 1024, 4096, 8192] if args.quick else [256, 512, 1024, 2048, 4096, 8192]
    kn = [12 * 256, 20 * 256] if args.quick else [12 * 64, 12 * 256, 12 * 512, 20 * 256, 28 * 256]
    backends = _backends()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  backends: "
          f"{ {k: v or 'ok' for k, v in backends.items()} }", flush=True)  # fmt: skip
    rows: list[dict] = []
    t0 = time.time()
    _REPORT.update(device=torch.cuda.get_device_name(), torch=torch.__version__,
                   cuda=torch.version.cuda, python=platform.python_version(), iters=iters,
                   backends={k: v or "ok" for k, v in backends.items()}, rows=rows)  # fmt: skip
    if args.json:
        _JSON.append(args.json)
    for name, fn, a in (
        ("hadamard", bench_hadamard, pow2 + kn),
        ("rotate_quantize", bench_rotate_quantize, [1024, 4096, 12 * 256]),
        ("int8_gemm", bench_gemm, 4096),
    ):
        try:
            fn(rows, a, backends, iters, warmup)
        except Exception:  # a whole section failed: keep the others
            traceback.print_exc()
            _record(rows, workload=name, error=traceback.format_exc()[-500:])
    _REPORT["seconds"] = round(time.time() - t0, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(_REPORT, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
