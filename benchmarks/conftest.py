"""pytest-benchmark setup for ood_fast's benchmarks.

    python -m pytest benchmarks -q --benchmark-only                 # default groups
    python -m pytest benchmarks -q --benchmark-only --run-slow      # + C=1000 D=2048, fit 100k×2048
    OOD_FAST_BENCH_FULL=1 python -m pytest benchmarks -q --benchmark-only   # same as --run-slow
    python -m pytest benchmarks -q --benchmark-only --save-ratios NAME   # + benchmarks/results/NAME.json

Each benchmark records in ``extra_info`` what it timed (candidate, kind, rows timed out of the
test set, accuracy vs float64; KNN benchmarks also the peak extra memory of a scoring call). At the end of the session the ratios of every peer's time to
each of our candidates' times in the same group are printed (``pytest_terminal_summary``), with
sliced peers scaled linearly to the full test set, and optionally saved as JSON.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_addoption(parser):
    g = parser.getgroup("ood_fast")
    g.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run the slow cases (C=1000 D=2048 with its peers, fit of 100k×2048); "
        "or set OOD_FAST_BENCH_FULL=1",
    )
    g.addoption(
        "--save-ratios",
        default=None,
        metavar="NAME",
        help="write the ratio summary and every timing to benchmarks/results/NAME.json",
    )
    g.addoption(
        "--bench-threads",
        type=int,
        default=None,
        metavar="N",
        help="pin torch and BLAS to N threads (default: torch's)",
    )


def run_slow(config) -> bool:
    return bool(config.getoption("--run-slow")) or os.environ.get("OOD_FAST_BENCH_FULL") == "1"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: minutes-long case; needs --run-slow or OOD_FAST_BENCH_FULL=1"
    )
    n = config.getoption("--bench-threads")
    if n:
        torch.set_num_threads(n)
        try:
            from threadpoolctl import threadpool_limits

            config._ood_fast_limits = threadpool_limits(limits=n)
        except Exception:
            pass


def pytest_collection_modifyitems(config, items):
    if run_slow(config):
        return
    skip = pytest.mark.skip(reason="slow case: pass --run-slow or set OOD_FAST_BENCH_FULL=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------------------------------------
# Ratio summary
# ---------------------------------------------------------------------------------------------


def _records(config) -> list[dict]:
    bs = getattr(config, "_benchmarksession", None)
    out = []
    for b in getattr(bs, "benchmarks", None) or []:
        info = dict(b.extra_info or {})
        if "candidate" not in info:
            continue
        try:
            median = float(b.stats.median)
        except Exception:
            continue
        scale = float(info.get("scale_to_full", 1.0))
        out.append(
            {"group": b.group, "name": b.name, "median_s": median, "time_s": median * scale, **info}
        )
    return out


def ratios(records: list[dict]) -> dict:
    """{group: {our candidate: {peer candidate: peer time / our time}}} (sliced peers scaled)."""
    groups: dict[str, dict] = {}
    for g in sorted({r["group"] for r in records}, key=str):
        rs = [r for r in records if r["group"] == g]
        ours = [r for r in rs if r.get("kind") == "ours"]
        peers = [r for r in rs if r.get("kind") == "peer"]
        groups[g] = {
            o["candidate"]: {
                p["candidate"]: p["time_s"] / o["time_s"] for p in peers if o["time_s"] > 0
            }
            for o in ours
        }
    return groups


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "-"
    return f"{v:.0f}×" if v >= 100 else f"{v:.1f}×" if v >= 10 else f"{v:.2f}×"


def _bar_lines(ours: dict, group: list[dict]) -> list[str]:
    """The issue's performance bars of one of our records (quant benchmarks: ``bars`` =
    {peer role: bar}): against the fastest peer of each role, peer time / ours, ok or MISS; and
    the same ratio timed interleaved with that peer (``interleaved``), where measured."""
    out = []
    for role, bar in (ours.get("bars") or {}).items():
        peers = [r for r in group if r.get("kind") == "peer" and r.get("role") == role]
        if not peers:
            out.append(f"    bar >= {bar:g}× {role}: no {role} peer ran")
            continue
        best = min(peers, key=lambda r: r["time_s"])
        v = best["time_s"] / ours["time_s"]
        iv = (ours.get("interleaved") or {}).get(role)
        inter = (
            f"; interleaved with it: {_fmt(iv)} {'ok' if iv >= bar else 'MISS'}"
            if isinstance(iv, float)
            else ""
        )
        out.append(
            f"    bar >= {bar:g}× {role}: {_fmt(v)} vs {best['candidate']} "
            f"{'ok' if v >= bar else 'MISS'}{inter}"
        )
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    records = _records(config)
    if not records:
        return
    table = ratios(records)
    tr = terminalreporter
    tr.section("ood_fast ratios: peer time / ours, same run")
    by_name = {(r["group"], r["candidate"]): r for r in records}
    for g, per in table.items():
        tr.write_line(f"{g}")
        for ours, vs in per.items():
            o = by_name[(g, ours)]
            acc = o.get("max_rel_diff")
            acc_s = f", max rel diff {acc:.1e}" if isinstance(acc, float) else ""
            if isinstance(o.get("max_abs_diff_f64"), float):  # KNN: scores are absolute
                acc_s += f", max |Δ| vs float64 {o['max_abs_diff_f64']:.1e}"
            if isinstance(o.get("scale_rel_diff"), float):  # quant: rotate_quantize's check
                acc_s += (
                    f", scales vs float64 {o['scale_rel_diff']:.1e}, "
                    f"max |code − y/scale| {o['max_code_err']:.3f}"
                )
            if isinstance(o.get("sqnr_db"), float):  # quant: W8A8 vs float64
                acc_s += f", SQNR vs float64 {o['sqnr_db']:.1f} dB"
            if o.get("backend_used"):
                acc_s += f", backend {o['backend_used']}"
            for unit in ("gbps", "gops"):
                if isinstance(o.get(unit), float):
                    acc_s += f", {o[unit]:.1f} {'GB/s' if unit == 'gbps' else 'GOP/s'}"
            tr.write_line(f"  {ours} ({o['time_s']:.4g} s{acc_s})")
            if o.get("scale_to_full", 1.0) != 1.0:
                tr.write_line(f"    (ours scaled from {o['rows']:,} of {o['n_total']:,} rows)")
            for peer, v in vs.items():
                p = by_name[(g, peer)]
                note = (
                    f" (scaled from {p['rows']:,} of {p['n_total']:,} rows)"
                    if p.get("scale_to_full", 1.0) != 1.0
                    else ""
                )
                for unit in ("gbps", "gops"):
                    if isinstance(p.get(unit), float):
                        note += f", {p[unit]:.1f} {'GB/s' if unit == 'gbps' else 'GOP/s'}"
                tr.write_line(f"    {_fmt(v):>8} {peer} ({p['time_s']:.4g} s){note}")
            for line in _bar_lines(o, [r for r in records if r["group"] == g]):
                tr.write_line(line)
    for r in records:  # the accuracy side of the bars, where a benchmark measured it
        extras = []
        if "delta_auroc" in r:
            extras.append(
                f"|ΔAUROC| vs fp32 {r['delta_auroc']:.1e}, median rel err vs fp32 "
                f"{r['median_rel_err_vs_fp32']:.1e}"
            )
        if "cov_rel_fro_err" in r:
            extras.append(
                f"covariance rel Frobenius err vs float64 {r['cov_rel_fro_err']:.1e} "
                f"(scale {r['cov_scale']:.6g})"
            )
        if "peak_extra_mb" in r:
            extras.append(f"peak extra memory while scoring {r['peak_extra_mb']:.0f} MB")
        if "fit_peak_extra_mb" in r:
            extras.append(f"while fitting {r['fit_peak_extra_mb']:.0f} MB")
        if extras:
            tr.write_line(f"{r['group']}: {r['candidate']}: {'; '.join(extras)}")
    name = config.getoption("--save-ratios")
    if name:
        from ood_fast.bench import environment

        path = os.path.join(HERE, "results", f"{name}.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(
                {"environment": environment(), "ratios": table, "records": records},
                f,
                indent=2,
                default=str,
            )
            f.write("\n")
        tr.write_line(f"wrote {os.path.relpath(path)}")
