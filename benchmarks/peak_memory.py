"""Peak extra memory of scoring, measured by the kernel's own high-water mark.

Linux keeps a per-process peak RSS (VmHWM); writing 5 to /proc/self/clear_refs resets it. So:
build the inputs, reset the mark, score, read the mark: what scoring added beyond its inputs.

    python benchmarks/peak_memory.py            # prints a table, --json PATH to keep it
"""

from __future__ import annotations

import argparse
import json

import torch

import ood_fast
from ood_fast import ops


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra(fn, warm: bool) -> int:
    """Bytes by which ``fn()`` raised the peak RSS above the RSS before it.

    ``warm``: call once first, so one-time work (packing the plan's weights for the C++
    kernel, thread pools) is excluded and the figure is the per-call cost.
    """
    if warm:
        fn()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


def mahalanobis_case(n=10_000, d=2048, c=1000, backend="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    means = torch.randn(c, d, generator=g)
    w = torch.triu(torch.randn(d, d, generator=g)) / d**0.5 + torch.eye(d)
    plan = ops.mahalanobis_plan(means, w, triangular=True)
    return {
        warm: peak_extra(lambda: ops.mahalanobis(x, plan, "min", backend=backend), warm)
        for warm in (False, True)
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = []
    for backend in ("cpu", "torch"):
        extra = mahalanobis_case(backend=backend)
        rows.append({"case": "mahalanobis tied N=10k D=2048 C=1000", "backend": backend,
                     "first_call_MB": round(extra[False] / 2**20, 1),
                     "per_call_MB": round(extra[True] / 2**20, 1)})  # fmt: skip
    print(f"{'case':<40} {'backend':<7} {'first call':>10} {'per call':>10}")
    for r in rows:
        print(f"{r['case']:<40} {r['backend']:<7} {r['first_call_MB']:>7.1f} MB "
              f"{r['per_call_MB']:>7.1f} MB")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "version": ood_fast.__version__,
                       "rows": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
