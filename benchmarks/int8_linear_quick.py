"""Quick timing of the C++ CPU int8 GEMM (``ood_fast._C.Int8Weight``) against torch's peers.

    PYTHONPATH=. python benchmarks/int8_linear_quick.py [M K N] [--threads 2] [--reps 7] [--isas amx,vnni]

Rows: every int8 kernel this processor offers (int8 activations -> fp32 out, and uint8 +
zero point -> bf16 out), torch fp32 ``F.linear``, and torch's own dynamic int8 ``Linear``
(``quantize_dynamic`` with the fbgemm, onednn and x86 engines; note that it also quantizes its
fp32 input, which ours receives already quantized). Best of ``--reps`` after a warm-up; GOP/s =
2 M N K / time. (PYTHONPATH=. makes the worktree's ood_fast the one imported.) Absolute numbers move with the machine's load (printed): compare ratios.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
import torch.nn.functional as F

from ood_fast import _C


def best(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", nargs="*", type=int, default=[2048, 4096, 4096], help="M K N")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--isas", default="amx,vnni", help="kernels to time (generic: slow, ~20 s)")
    args = ap.parse_args()
    M, K, N = args.shape
    T = args.threads
    torch.set_num_threads(T)
    g = torch.Generator().manual_seed(0)
    qw = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    qx = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    qxu = torch.randint(0, 256, (M, K), dtype=torch.uint8, generator=g)
    zx = torch.randint(0, 256, (M,), dtype=torch.int32, generator=g)
    sx, sw, bias = torch.rand(M) + 0.5, torch.rand(N) + 0.5, torch.randn(N)
    out, outb = torch.empty(M, N), torch.empty(M, N, dtype=torch.bfloat16)
    rows = {}
    for isa in [i for i in args.isas.split(",") if i in _C.int8_linear_isas()]:
        w = _C.Int8Weight(qw.data_ptr(), N, K, isa)
        reps = 1 if isa == "generic" else args.reps
        p = (sx.data_ptr(), 0, sw.data_ptr(), bias.data_ptr(), out.data_ptr(), False, T)
        rows[f"ood_fast {isa}: int8 -> fp32"] = best(
            lambda w=w, p=p: w.forward(qx.data_ptr(), False, M, *p), reps
        )
        p = (sx.data_ptr(), zx.data_ptr(), sw.data_ptr(), bias.data_ptr(), outb.data_ptr(), True, T)
        rows[f"ood_fast {isa}: uint8+zp -> bf16"] = best(
            lambda w=w, p=p: w.forward(qxu.data_ptr(), True, M, *p), reps
        )
    x, wf = torch.randn(M, K), torch.randn(N, K)
    rows["torch fp32 F.linear"] = best(lambda: F.linear(x, wf, bias), args.reps)
    lin = torch.nn.Sequential(torch.nn.Linear(K, N))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for eng in ("fbgemm", "onednn", "x86"):
            if eng not in torch.backends.quantized.supported_engines:
                continue
            torch.backends.quantized.engine = eng
            q = torch.ao.quantization.quantize_dynamic(lin, {torch.nn.Linear}, dtype=torch.qint8)
            with torch.no_grad():
                rows[f"torch dynamic int8 ({eng})"] = best(lambda q=q: q(x), args.reps)
    ops = 2.0 * M * N * K
    fp32 = rows["torch fp32 F.linear"]
    int8 = min(t for k, t in rows.items() if k.startswith("torch dynamic"))
    print(f"M={M} K={K} N={N} threads={T} load={os.getloadavg()[0]:.2f}")
    print(f"{'':36s} {'ms':>9s} {'GOP/s':>8s} {'vs fp32':>8s} {'vs best torch int8':>19s}")
    for k, t in rows.items():
        print(f"{k:36s} {t * 1e3:9.2f} {ops / t / 1e9:8.0f} {fp32 / t:8.2f} {int8 / t:19.2f}")


if __name__ == "__main__":
    main()
