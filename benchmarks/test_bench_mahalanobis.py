"""Mahalanobis scoring and fitting, ours vs the peers a user would pick, side by side in one run.

Groups (pytest-benchmark ``group=``), one per case; see benchmarks/README.md:

* ``tied C=10 D=512 N=10k``       CIFAR-10 scale: ours (cpu, torch backends), torch expression,
                                   OpenOOD formula, pytorch-ood, sklearn per class (sliced peers)
* ``tied C=1000 D=2048 N=10k``    ImageNet scale (slow: --run-slow); OpenOOD and pytorch-ood on
                                   200 rows, scaled
* ``per_class C=100 D=512 N=10k`` per-class covariances: ours vs the batched torch expression
* ``bf16 tied C=1000 D=2048 N=10k`` ours fp32 and bf16 vs the fp32 torch expression
* ``fit 100k×2048 C=1000``        fitting (slow): ours fit and streaming partial_fit vs
                                   OpenOOD's fit, pytorch-ood's fit_features, torch

Every candidate is checked against a float64 evaluation (``ood_fast.bench.Reference``) before it
is timed; the check's numbers go into ``extra_info`` with the rows timed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from ood_fast import bench

# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    group: str
    covariance: str
    num_classes: int
    dim: int
    n_train: int
    n_test: int = 10_000
    slices: dict = field(default_factory=dict)  # peer -> rows timed (scaled to n_test)
    rounds: int = 5
    slow_rounds: int = 1  # rounds for sliced peers (each round is seconds)
    check_rows: int | None = None  # rows of the float64 check (None: all)


C10 = Case(
    "tied C=10 D=512 N=10k",
    "tied",
    10,
    512,
    50_000,
    slices={"openood": 2000, "pytorch_ood": 2000, "sklearn": 500},
    slow_rounds=3,
)
C1000 = Case(
    "tied C=1000 D=2048 N=10k",
    "tied",
    1000,
    2048,
    20_000,
    slices={"openood": 200, "pytorch_ood": 200, "sklearn": 20},
    rounds=3,
    check_rows=2000,
)
PER_CLASS = Case(
    "per_class C=100 D=512 N=10k", "per_class", 100, 512, 100_000, rounds=3, check_rows=1000
)
BF16 = Case("bf16 tied C=1000 D=2048 N=10k", "tied", 1000, 2048, 20_000, rounds=3, check_rows=2000)


class Prepared:
    """One case's data, float64 reference and fitted models, built once per session."""

    def __init__(self, case: Case):
        self.case = case
        self.wl = bench.Workload(
            case.group,
            case.n_train,
            case.n_test,
            case.dim,
            case.num_classes,
            covariance=case.covariance,
        )
        d = self.wl.data
        self.ref = bench.Reference(d["train_x"], d["train_y"], case.covariance, case.num_classes)
        N = case.n_test
        self.check_idx = bench.slice_rows(N, case.check_rows or N)
        self.ref_scores = self.ref.score(d["test_x"][self.check_idx])
        self.models: dict[str, object] = {}


_PREPARED: dict[tuple, Prepared] = {}


def prepared(case: Case) -> Prepared:
    """Cases with the same data (C1000 and BF16) share it, and their fitted models."""
    key = (case.covariance, case.num_classes, case.dim, case.n_train, case.n_test, case.check_rows)
    if key not in _PREPARED:
        _PREPARED.clear()  # one case's arrays at a time (the C=1000 ones are large)
        _PREPARED[key] = Prepared(case)
    return _PREPARED[key]


def make_candidate(spec: str, covariance: str) -> bench.Candidate:
    """'ours:cpu:fp32' or 'peer:openood' -> Candidate (skips the test with the reason)."""
    kind, *rest = spec.split(":")
    if kind == "ours":
        backend, precision = rest
        why = bench.available_backends().get(backend)
        if why:
            pytest.skip(f"backend {backend} unavailable: {'; '.join(why)}")
        return bench.ours(backend, precision, covariance)
    c = bench.peer(rest[0], covariance)
    if isinstance(c, str):
        pytest.skip(f"{bench.PEER_LABELS[rest[0]]}: {c}")
    return c


def bench_score(benchmark, case: Case, spec: str) -> None:
    """Fit (untimed, cached), check against float64, then time scoring (sliced for slow peers)."""
    p = prepared(case)
    cand = make_candidate(spec, case.covariance)
    d = p.wl.data
    if spec not in p.models:
        try:
            p.models[spec] = cand.fit(d["train_x"], d["train_y"])
        except NotImplementedError as exc:
            pytest.skip(f"{cand.name}: {exc}")
    model = p.models[spec]
    N = case.n_test
    rows = case.slices.get(cand.peer, N) if cand.sliced else N
    idx = bench.slice_rows(N, rows)
    x = d["test_x"] if rows >= N else d["test_x"][idx]
    # check before timing: on the check rows (ours) or the timed slice (sliced peers)
    if rows >= N:
        scores = bench._numpy64(cand.score(model, d["test_x"][p.check_idx]))
        ref = p.ref_scores
    else:
        scores = bench._numpy64(cand.score(model, x))
        ref = p.ref.score(x)
    cmp = bench.compare(scores, ref)
    assert cmp["max_rel_diff"] < (5e-2 if cand.precision == "bf16" else 1e-3), (
        f"{cand.name} disagrees with the float64 evaluation: max rel diff {cmp['max_rel_diff']:.2e}"
    )
    benchmark.group = case.group
    benchmark.extra_info.update(
        cand.info(),
        rows=int(x.shape[0]),
        n_total=N,
        scale_to_full=N / x.shape[0],
        max_rel_diff=cmp["max_rel_diff"],
        median_rel_diff=cmp["median_rel_diff"],
        gflops_needed=bench.score_flops(N, case.dim, case.num_classes, case.covariance) / 1e9,
    )
    slow = rows < N
    benchmark.pedantic(
        cand.score,
        args=(model, x),
        rounds=case.slow_rounds if slow else case.rounds,
        warmup_rounds=0 if slow else 1,
        iterations=1,
    )


OURS_FP32 = ["ours:cpu:fp32", "ours:torch:fp32"]
PEERS_TIED = ["peer:torch", "peer:openood", "peer:pytorch_ood"]


# ---------------------------------------------------------------------------------------------
# Scoring groups
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", OURS_FP32 + PEERS_TIED + ["peer:sklearn"])
def test_tied_c10_d512(benchmark, spec):
    bench_score(benchmark, C10, spec)


@pytest.mark.parametrize("spec", OURS_FP32 + ["peer:torch"])
def test_per_class_c100_d512(benchmark, spec):
    bench_score(benchmark, PER_CLASS, spec)


@pytest.mark.slow
@pytest.mark.parametrize("spec", OURS_FP32 + PEERS_TIED)
def test_tied_c1000_d2048(benchmark, spec):
    bench_score(benchmark, C1000, spec)


@pytest.mark.parametrize("spec", ["ours:cpu:fp32", "ours:cpu:bf16", "peer:torch"])
def test_bf16_vs_fp32(benchmark, spec):
    bench_score(benchmark, BF16, spec)
    if spec == "ours:cpu:bf16":  # the precision bar: |ΔAUROC| and median relative error
        p = prepared(BF16)
        d = p.wl.data
        f32 = bench.ours("cpu", "fp32", "tied").fit(d["train_x"], d["train_y"])
        s32 = bench._numpy64(f32.score(d["test_x"]))
        s16 = bench._numpy64(p.models[spec].score(d["test_x"]))
        a32 = bench.ood_metrics(s32, d["test_is_ood"])["auroc"]
        a16 = bench.ood_metrics(s16, d["test_is_ood"])["auroc"]
        benchmark.extra_info.update(
            auroc_fp32=a32,
            auroc_bf16=a16,
            delta_auroc=abs(a16 - a32),
            median_rel_err_vs_fp32=float(np.median(np.abs(s16 - s32) / np.abs(s32))),
        )


# ---------------------------------------------------------------------------------------------
# Fit group (slow): 100k×2048, C=1000
# ---------------------------------------------------------------------------------------------

FIT_GROUP = "fit 100k×2048 C=1000"


@pytest.fixture(scope="module")
def fit_data():
    _PREPARED.clear()
    wl = bench.Workload("fit", 100_000, 1, 2048, 1000)
    d = wl.data
    return d["train_x"], d["train_y"]


def _cov_error(cov, ref_cov) -> dict:
    """Relative Frobenius error of a fitted covariance vs float64, after matching the
    normalisation (N, N−1, N−C or pytorch-ood's plain sum differ by a scale)."""
    cov = torch.as_tensor(cov, dtype=torch.float64)
    if cov.dim() == 3:
        cov = cov[0]
    a = float((cov * ref_cov).sum() / (cov * cov).sum())
    return {
        "cov_scale": a,
        "cov_rel_fro_err": float(torch.linalg.norm(a * cov - ref_cov) / torch.linalg.norm(ref_cov)),
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec", ["ours:cpu:fp32", "ours:partial_fit", "peer:torch", "peer:openood", "peer:pytorch_ood"]
)
def test_fit_100k_d2048(benchmark, fit_data, spec):
    x, y = fit_data
    if spec == "ours:partial_fit":  # streaming: 10 chunks of 10k rows
        base = make_candidate("ours:cpu:fp32", "tied")

        def fit(x, y):
            import ood_fast

            m = ood_fast.Mahalanobis(covariance="tied", backend="cpu")
            for s in range(0, x.shape[0], 10_000):
                m.partial_fit(x[s : s + 10_000], y[s : s + 10_000])
            return m.finalize()  # partial_fit defers the factorization to first use

        cand = bench.Candidate(
            "ours partial_fit (10 chunks)", "ours", fit, base.score, backend="cpu"
        )
    else:
        cand = make_candidate(spec, "tied")
    benchmark.group = FIT_GROUP
    benchmark.extra_info.update(cand.info(), rows=x.shape[0], n_total=x.shape[0], scale_to_full=1.0)
    model = benchmark.pedantic(
        cand.fit, args=(x, y), rounds=1 if cand.kind == "peer" else 2, warmup_rounds=0, iterations=1
    )
    if cand.kind == "ours" and hasattr(model, "covariance_"):
        x64 = x.to(torch.float64)
        means = torch.zeros(1000, x.shape[1], dtype=torch.float64).index_add_(0, y, x64)
        means /= torch.bincount(y, minlength=1000).to(torch.float64)[:, None]
        xc = x64 - means[y]
        ref_cov = xc.T @ xc / x.shape[0]
        benchmark.extra_info.update(_cov_error(model.covariance_, ref_cov))
