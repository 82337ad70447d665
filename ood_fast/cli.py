"""The ``ood-fast`` command line (also ``python -m ood_fast``).

    ood-fast bench [--workload mahalanobis|knn|quant] [--preset cifar10|imagenet|quick] [--quick]
                   [--covariance tied|per_class|diagonal] [--backends cpu,torch,...]
                   [--peers openood,pytorch_ood,torch,sklearn | faiss_l2,faiss_ip,torch,sklearn]
                   [--precisions fp32,bf16] [--k K] [--threads N] [--json PATH] [--gpu]
    ood-fast score --train train.npz --test test.npz
                   --method mahalanobis|relative_mahalanobis|gaussian|knn
                   [--covariance ...] [--shrinkage ...] [--k K] [--backend ...] --out scores.npy
                   [--save model.safetensors]
    ood-fast info

Errors a user can fix (a missing file or key, a bad option, an unavailable backend, bad
features) print one ``ood-fast: error: ...`` line and exit with status 2; ``--traceback`` shows
the full trace instead.
"""

from __future__ import annotations

import argparse
import os
import sys

METHODS = {
    "mahalanobis": "Mahalanobis",
    "relative_mahalanobis": "RelativeMahalanobis",
    "gaussian": "GaussianLikelihood",
    "knn": "KNN",  # deep nearest neighbours: needs no class labels
}
ENV_VARS = {
    "OOD_FAST_BACKEND": "default backend for every op (cpu, triton, cuda, torch); unset: automatic",
    "OOD_FAST_BUILD_CUDA": "at install: 1 builds the CUDA extension, 0 never; unset: if nvcc + GPU",
    "OOD_FAST_CUDA_ARCHS": "at install: CUDA architectures to compile for, e.g. 90 or 80;90",
    "OOD_FAST_CUDA_SYNC": "1: synchronize after every CUDA kernel, so a fault is reported where it happens",
    "OOD_FAST_BENCH_FULL": "1: run the slow ImageNet-scale benchmark groups (same as --run-slow)",
    "OOD_FAST_KNN_BF16_PASS": "0: no AMX pass for bf16 banks in the C++ knn (same results, slower)",
    "OOD_FAST_KNN_BF16_BLOCK": "tests: queries per block of the bf16 pass (256 MiB of candidates)",
    "OOD_FAST_KNN_CHUNK_BYTES": "tests: bytes of packed bank per chunk in the C++ knn (64 MiB)",
    "OOD_FAST_KNN_MARGIN": "tests: extra candidates of the bf16 pass (default max(64, k/2))",
    "OOD_FAST_HADAMARD_ISA": "tests: generic forces the portable C++ hadamard / rotate_quantize",
    "OOD_FAST_HADAMARD_STREAM": "0/1: non-temporal stores off/on in the C++ hadamard (default: >= 8 MiB)",
    "OOD_FAST_INT8_ISA": "amx | vnni | generic: force the C++ int8_linear kernel (default: fastest)",
}


class UserError(Exception):
    """An error the user can fix: printed as one line, no traceback."""


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------


def _report(res: dict, args) -> int:
    """Print a bench result, write its JSON if asked; exit 0 when at least one of ours ran."""
    from . import bench

    print(res["table"])
    if args.json:
        bench.write_json(res, args.json)
        print(f"\nwrote {args.json}")
    ok = [r for r in res["rows"] if r["kind"] == "ours" and r.get("status") == "ok"]
    return 0 if ok else 1


def _csv(value: str, allowed, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise UserError(
            f"--{what}: unknown {', '.join(bad)}; expected a comma list of {', '.join(allowed)}"
        )
    return items


def _peers(args, allowed: tuple[str, ...]) -> list[str] | tuple[str, ...]:
    """--peers as a checked list; all of ``allowed`` when it is not given (``--peers ""``: none)."""
    return _csv(args.peers, allowed, "peers") if args.peers is not None else allowed


def _repeats_budget(args) -> tuple[int, float]:
    """--repeats and --budget (seconds per candidate); --quick lowers their defaults."""
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    budget = args.budget if args.budget is not None else (0.5 if args.quick else 5.0)
    return repeats, budget


def _workload_preset(args, presets, default: str, workload: str) -> str:
    """--preset of ``--workload {workload}``, checked against ``presets``; when it is not given,
    "quick" with --quick, else ``default``."""
    preset = args.preset or ("quick" if args.quick else default)
    if preset not in presets:
        raise UserError(
            f"--preset: unknown {preset!r} for --workload {workload}; expected one of "
            f"{', '.join(sorted(presets))}"
        )
    return preset


def cmd_bench(args) -> int:
    from . import bench

    if args.workload == "knn":
        return _bench_knn(args)
    if args.workload == "quant":
        return _bench_quant(args)
    if args.k is not None:
        raise UserError("--k applies to --workload knn only")
    if args.gpu:
        res = bench.gpu_benchmark(args.json, progress=not args.no_progress)
        print(res["table"])
        if args.json:
            print(f"\nwrote {args.json}")
        return 0
    from . import _backend

    preset = args.preset or ("quick" if args.quick else "cifar10")
    backends = _csv(args.backends, _backend.BACKENDS, "backends") if args.backends else None
    peers = _peers(args, bench.PEERS)
    precisions = _csv(args.precisions, bench.PRECISIONS, "precisions")
    repeats, budget = _repeats_budget(args)
    try:
        from . import data

        presets = sorted(data.PRESETS)
    except ImportError as exc:
        raise UserError(f"ood_fast.data is not available ({exc})") from exc
    if preset not in presets:
        raise UserError(f"--preset: unknown {preset!r}; expected one of {', '.join(presets)}")
    res = bench.run(
        preset,
        covariance=args.covariance,
        backends=backends,
        precisions=precisions,
        peers=peers,
        threads=args.threads,
        repeats=repeats,
        budget=budget,
        progress=not args.no_progress,
    )
    return _report(res, args)


def _bench_knn(args) -> int:
    from . import _backend, bench

    if args.gpu:
        raise UserError(
            "--gpu runs the Mahalanobis GPU benchmark only; for KNN on a GPU pass "
            "--workload knn --backends cuda,triton,torch on a CUDA machine"
        )
    if args.covariance != "tied":
        raise UserError("--covariance applies to --workload mahalanobis only")
    preset = _workload_preset(args, bench.KNN_PRESETS, "cifar10", "knn")
    backends = _csv(args.backends, _backend.BACKENDS, "backends") if args.backends else None
    peers = _peers(args, bench.KNN_PEERS)
    precisions = _csv(args.precisions, tuple(bench.KNN_BANK_DTYPES), "precisions")
    repeats, budget = _repeats_budget(args)
    spec = bench.KNN_PRESETS[preset]
    if args.k is not None and not 1 <= args.k <= spec["n_bank"]:
        raise UserError(f"--k: need 1 <= k <= the bank size {spec['n_bank']:,}, got {args.k}")
    if preset == "imagenet" and not args.no_progress:
        print(
            "knn imagenet: a 256,000×2048 float32 bank (2.1 GB); each candidate holds its own "
            "copy while it runs (~6 GB at the peak); minutes on 2 cores",
            file=sys.stderr,
        )
    res = bench.run_knn(
        preset,
        backends=backends,
        precisions=precisions,
        peers=peers,
        threads=args.threads,
        repeats=repeats,
        budget=budget,
        batch1_repeats=50 if args.quick else 200,
        k=args.k,
        progress=not args.no_progress,
    )
    return _report(res, args)


def _bench_quant(args) -> int:
    from . import _backend, bench

    if args.gpu:
        raise UserError("--gpu runs the Mahalanobis GPU benchmark only")
    if args.covariance != "tied":
        raise UserError("--covariance applies to --workload mahalanobis only")
    if args.k is not None:
        raise UserError("--k applies to --workload knn only")
    preset = _workload_preset(args, bench.QUANT_PRESETS, "default", "quant")
    backends = None
    if args.backends:
        names = _csv(args.backends, ("auto", *_backend.BACKENDS), "backends")
        backends = [None if b == "auto" else b for b in names]
    peers = _peers(args, bench.QUANT_PEERS)
    repeats, budget = _repeats_budget(args)
    res = bench.run_quant(
        preset,
        backends=backends,
        peers=peers,
        threads=args.threads,
        repeats=repeats,
        budget=budget,
        sqnr=not args.no_sqnr,
        progress=not args.no_progress,
    )
    return _report(res, args)


# ---------------------------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------------------------


def _shrinkage(value: str | None):
    if value is None or value.lower() == "none":
        return None
    if value in ("ledoit_wolf", "oas"):
        return value
    try:
        v = float(value)
    except ValueError:
        raise UserError(
            f"--shrinkage: expected none, a number in [0, 1], ledoit_wolf or oas; got {value!r}"
        ) from None
    if not 0.0 <= v <= 1.0:
        raise UserError(f"--shrinkage: a number must lie in [0, 1], got {v}")
    return v


def _load(path: str, what: str):
    from . import data

    if not os.path.exists(path):
        raise UserError(f"--{what}: no such file: {path}")
    if os.path.isdir(path):
        raise UserError(
            f"--{what}: {path} is a directory, expected a features file "
            f"(.npy, .npz, .pt, .safetensors)"
        )
    try:
        return data.load_features(path)
    except KeyError as exc:
        msg = exc.args[0] if exc.args else str(exc)
        raise UserError(f"--{what} {path}: {msg}") from exc
    except (ValueError, TypeError, OSError) as exc:
        raise UserError(f"--{what} {path}: {exc}") from exc


def cmd_score(args) -> int:
    import numpy as np
    import torch

    import ood_fast

    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise UserError(f"--out: directory {out_dir} does not exist")
    if args.method == "knn":
        return _score_knn(args)
    if args.k is not None:
        raise UserError("--k applies to --method knn only")
    train_x, train_y, _ = _load(args.train, "train")
    if train_y is None:
        raise UserError(
            f"--train {args.train}: no class labels found; the training file needs "
            "labels (e.g. an .npz with arrays 'x' and 'y')"
        )
    test_x, _, test_is_ood = _load(args.test, "test")
    cls = getattr(ood_fast, METHODS[args.method])
    kwargs = {
        "shrinkage": _shrinkage(args.shrinkage),
        "backend": args.backend,
        "precision": args.precision,
    }
    if args.covariance is not None:
        kwargs["covariance"] = args.covariance
    if args.backend in ("cuda", "triton") and torch.cuda.is_available():
        train_x, test_x = train_x.to("cuda"), test_x.to("cuda")  # GPU backends take GPU tensors
    with _threads(args.threads):
        est = cls(**kwargs).fit(train_x, train_y)
        scores = est.score(test_x)
    scores = (
        scores.detach().cpu().float().numpy()
        if isinstance(scores, torch.Tensor)
        else np.asarray(scores, dtype=np.float32)
    )
    summary = (
        f"{args.method}: fitted on {len(train_y):,} rows, {getattr(est, 'num_classes_', '?')} "
        f"classes, D={test_x.shape[1]}; scored {len(scores):,} rows -> {args.out}"
    )
    return _write_scores(args, est, scores, summary, test_is_ood)


def _write_scores(args, est, scores, summary: str, test_is_ood) -> int:
    """The end of a score command: the scores [N] to --out, ``summary`` printed, the fitted
    estimator to --save when given, and the metrics when the test file has OOD labels."""
    import numpy as np

    np.save(args.out, scores)
    print(summary)
    if args.save:
        est.save(args.save)
        print(f"model saved to {args.save}")
    _print_metrics(scores, test_is_ood)
    return 0


def _print_metrics(scores, test_is_ood) -> None:
    if test_is_ood is None:
        return
    import numpy as np
    import torch

    from . import metrics

    ood = torch.as_tensor(np.asarray(test_is_ood)).bool().numpy()
    if ood.all() or not ood.any():
        print("OOD labels hold a single class: AUROC/FPR95 undefined")
    else:
        m = metrics.evaluate(scores[~ood], scores[ood])
        print(
            f"AUROC {m['auroc']:.4f}  FPR95 {m['fpr95']:.4f}  "
            f"AUPR-In {m['aupr_in']:.4f}  AUPR-Out {m['aupr_out']:.4f}  "
            f"({int((~ood).sum()):,} ID, {int(ood.sum()):,} OOD; OOD positive)"
        )


def _score_knn(args) -> int:
    """``--method knn``: ``ood_fast.KNN(k)`` with the training features as the bank (labels, if
    the file has them, are not used); scores −‖q̂ − b̂_(k)‖² (OpenOOD), higher = ID."""
    import torch

    import ood_fast

    if args.covariance is not None or args.shrinkage is not None:
        raise UserError("--covariance and --shrinkage apply to the Mahalanobis methods, not knn")
    k = 50 if args.k is None else args.k
    if k < 1:
        raise UserError(f"--k: must be >= 1, got {k}")
    train_x, _, _ = _load(args.train, "train")
    test_x, _, test_is_ood = _load(args.test, "test")
    if k > train_x.shape[0]:
        raise UserError(
            f"--k {k} exceeds the bank: --train {args.train} has {train_x.shape[0]:,} rows"
        )
    if args.backend in ("cuda", "triton") and torch.cuda.is_available():
        train_x, test_x = train_x.to("cuda"), test_x.to("cuda")
    bank_dtype = torch.bfloat16 if args.precision == "bf16" else None
    with _threads(args.threads):
        est = ood_fast.KNN(k=k, backend=args.backend, bank_dtype=bank_dtype).fit(train_x)
        scores = est.score(test_x)
    scores = scores.detach().cpu().float().numpy()
    summary = (
        f"knn (k={k}): bank of {est.n_samples_:,} rows, D={est.n_features_in_}"
        f"{', bf16 bank (exact re-rank)' if bank_dtype is not None else ''}; "
        f"scored {len(scores):,} rows -> {args.out}"
    )
    return _write_scores(args, est, scores, summary, test_is_ood)


class _threads:
    def __init__(self, n):
        self.n = n

    def __enter__(self):
        import torch

        self.old = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.old)


# ---------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------


def cmd_info(args) -> int:
    import torch

    import ood_fast

    from . import _backend, _extensions
    from .bench import cpu_model, package_version, table

    avail = _backend.availability()
    print(f"ood_fast {ood_fast.__version__}  ({os.path.dirname(ood_fast.__file__)})")
    print()
    print("backends")
    print(
        table(
            ["backend", "available", "why not"],
            [
                [b, "yes" if not why else "no", "; ".join(why) if why else "-"]
                for b, why in avail.items()
            ],
            right=set(),
        )
    )
    print()
    feats = "-"
    mod = _extensions.cpu_module()
    if mod is not None and hasattr(mod, "cpu_features"):
        try:
            f = mod.cpu_features()
            feats = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in dict(f).items())
        except Exception as exc:
            feats = f"cpu_features() failed: {exc}"
    elif mod is None:
        feats = "unknown (ood_fast._C did not load)"
    print(f"cpu          {cpu_model()} ({os.cpu_count()} logical CPUs)")
    print(f"cpu features {feats}")
    print(f"threads      torch {torch.get_num_threads()} (C++ kernels use the same count)")
    if torch.cuda.is_available():
        print(f"gpu          {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})")
    print()
    print("versions")
    versions = [
        ("python", sys.version.split()[0]),
        ("torch", torch.__version__),
        ("numpy", package_version("numpy")),
        ("triton", package_version("triton")),
        ("faiss", package_version("faiss-cpu", "faiss-gpu", "faiss")),
        ("pytorch-ood", package_version("pytorch-ood")),
        ("scikit-learn", package_version("scikit-learn")),
        ("safetensors", package_version("safetensors")),
    ]
    print(
        table(["package", "version"], [[k, v or "not installed"] for k, v in versions], right=set())
    )
    print()
    print("registered ops")
    ops = _backend.registered_ops()
    print(
        table(
            ["op", "backends"],
            [[op, ", ".join(bs)] for op, bs in ops.items()] or [["(none)", "-"]],
            right=set(),
        )
    )
    print()
    print("environment")
    names = list(ENV_VARS) + sorted(
        k for k in os.environ if k.startswith("OOD_FAST_") and k not in ENV_VARS
    )
    print(
        table(
            ["variable", "value", "meaning"],
            [
                [k, os.environ.get(k, "(unset)"), ENV_VARS.get(k, "(not a known variable)")]
                for k in names
            ],
            right=set(),
        )
    )
    return 0


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ood-fast",
        description="Compiled kernels for feature-space OOD detection: benchmark, score, inspect.",
    )
    p.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="{bench,score,info}")

    b = sub.add_parser(
        "bench",
        help="fit and score with every backend and the installed peers",
        description="Fit and score a synthetic workload with every available "
        "backend and the installed peers; print times, speedups, accuracy.",
    )
    b.add_argument(
        "--workload",
        default="mahalanobis",
        choices=("mahalanobis", "knn", "quant"),
        help="mahalanobis (default): class-conditional Gaussian scoring; knn: k-th nearest "
        "neighbour distance to a normalized feature bank vs faiss, torch and sklearn; quant: "
        "the rotation-quantization kernels (hadamard, rotate_quantize, int8_linear) vs a "
        "copy, dense x@H, F.linear and torch's int8 Linear, and a W8A8 SQNR table per method",
    )
    b.add_argument(
        "--preset",
        default=None,
        help="mahalanobis: cifar10 (default; 50k×512 train, 10 classes, 10k test), "
        "imagenet (1000 classes × 2048), quick. knn: cifar10 (default; 50k×512 bank, 10k "
        "queries, k=50), imagenet (256k×2048 bank, 2k queries, k=1000; the bank alone needs "
        "~2 GB, ~6 GB at the peak), quick. quant: default (64 MB per Hadamard call, "
        "M=2048 K=N=4096 linear), quick",
    )
    b.add_argument(
        "--quick",
        action="store_true",
        help="a run of seconds: the quick preset and short time budgets",
    )
    b.add_argument("--covariance", default="tied", choices=("tied", "per_class", "diagonal"))
    b.add_argument(
        "--backends",
        default=None,
        help="comma list of cpu,triton,cuda,torch (default: every available one; quant: the "
        "automatic selection, 'auto' in the list)",
    )
    b.add_argument(
        "--peers",
        default=None,
        help="comma list of openood,pytorch_ood,torch,sklearn; with --workload knn of "
        "faiss_l2,faiss_ip,torch,sklearn; with --workload quant of "
        "copy,dense,torch_fp32,torch_int8,int_mm (default: all; '' none)",
    )
    b.add_argument(
        "--precisions",
        default="fp32,bf16",
        help="comma list of fp32,bf16 (knn: the bank's storage; bf16 re-ranks exactly in fp32)",
    )
    b.add_argument(
        "--k",
        type=int,
        default=None,
        help="knn: the neighbour whose distance scores (default: the preset's, 50 or 1000)",
    )
    b.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for torch and BLAS pools (default: torch's)",
    )
    b.add_argument("--repeats", type=int, default=None, help="timed runs after the warm-up")
    b.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds per candidate and phase (slow peers are sliced to fit)",
    )
    b.add_argument("--json", default=None, metavar="PATH", help="write rows and metadata here")
    b.add_argument(
        "--gpu",
        action="store_true",
        help="the GPU benchmark instead: triton and cuda vs cuBLAS, fp32 and bf16",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument(
        "--no-sqnr", action="store_true", help="quant: the kernel timings only, no SQNR table"
    )
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser(
        "score",
        help="fit on your training features and score your test features",
        description="Fit on labelled training features (knn: any training features, used as "
        "the bank) and score test features (.npy/.npz/.pt/.safetensors); prints AUROC/FPR95 "
        "when the test file carries OOD labels.",
    )
    s.add_argument(
        "--train",
        required=True,
        help="training features with class labels (knn: labels not needed)",
    )
    s.add_argument("--test", required=True, help="test features (optionally with OOD labels)")
    s.add_argument("--method", default="mahalanobis", choices=tuple(METHODS))
    s.add_argument(
        "--covariance",
        default=None,
        choices=("tied", "per_class", "diagonal"),
        help="default: the method's (tied; per_class for gaussian)",
    )
    s.add_argument("--shrinkage", default=None, help="none, a number in [0, 1], ledoit_wolf or oas")
    s.add_argument(
        "--k",
        type=int,
        default=None,
        help="knn: score by the distance to the k-th nearest training feature (default 50)",
    )
    s.add_argument("--backend", default=None, choices=("cpu", "triton", "cuda", "torch"))
    s.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16"),
        help="scoring precision (knn: the bank's storage; bf16 stays exact by an fp32 re-rank)",
    )
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--out", required=True, help="where to write the scores (.npy, float32)")
    s.add_argument("--save", default=None, help="also save the fitted model (.safetensors)")
    s.set_defaults(func=cmd_score)

    i = sub.add_parser("info", help="backends, CPU features, versions, ops, OOD_FAST_* variables")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("ood-fast: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.traceback:
            raise
        print(f"ood-fast {args.command}: error: {_message(exc)}", file=sys.stderr)
        return 2


def _message(exc: BaseException) -> str:
    if isinstance(exc, UserError):
        return str(exc)
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return f"{msg} ({type(exc).__name__}; --traceback for details)"


if __name__ == "__main__":
    sys.exit(main())
