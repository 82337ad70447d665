"""The ``ood-fast`` command line, end to end, as a user runs it (``python -m ood_fast ...``)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ood_fast(*args, timeout=120, env=None):
    e = dict(os.environ)
    e.pop("OOD_FAST_BACKEND", None)
    e.setdefault("OMP_NUM_THREADS", "2")
    if env:
        e.update(env)
    return subprocess.run(
        [sys.executable, "-m", "ood_fast", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=e,
    )


def assert_clean_error(r):
    assert r.returncode != 0, r.stdout
    assert "error" in r.stderr.lower(), r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def test_info_lists_the_four_backends():
    r = ood_fast("info", env={"OOD_FAST_BACKEND": "torch"})
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for b in ("cpu", "triton", "cuda", "torch"):
        assert any(line.split()[:1] == [b] for line in out.splitlines()), (b, out)
    for v in ("OOD_FAST_BACKEND", "OOD_FAST_BUILD_CUDA", "OOD_FAST_CUDA_ARCHS"):
        assert v in out
    assert "mahalanobis_fused" in out  # registered ops
    assert "torch" in out and "numpy" in out


def test_bench_quick_json(tmp_path):
    path = tmp_path / "bench.json"
    r = ood_fast("bench", "--quick", "--json", str(path), "--no-progress", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "candidate" in r.stdout and "AUROC" in r.stdout
    res = json.loads(path.read_text())
    env = res["meta"]["environment"]
    assert env["threads"] >= 1 and env["torch"] and env["cpu_model"]
    ours = [row for row in res["rows"] if row["kind"] == "ours" and row["status"] == "ok"]
    assert ours, res["rows"]
    assert {row["backend"] for row in ours} >= {"torch"}
    for row in ours:
        assert math.isfinite(row["auroc"]) and 0.5 < row["auroc"] <= 1.0, row
        assert row["score_s"] > 0 and row["fit_s"] > 0
        if row["precision"] == "fp32":
            assert row["max_rel_diff"] < 1e-3, row


def test_bench_rejects_unknown_options():
    assert_clean_error(ood_fast("bench", "--quick", "--backends", "gpu9"))
    assert_clean_error(ood_fast("bench", "--preset", "mnist"))


@pytest.fixture
def feature_files(tmp_path):
    from ood_fast import data

    d = data.synthetic_features(n_train=600, n_test=200, dim=16, num_classes=3, seed=1)
    train = tmp_path / "train.npz"
    test = tmp_path / "test.npz"
    np.savez(train, x=np.asarray(d["train_x"]), y=np.asarray(d["train_y"]))
    np.savez(test, x=np.asarray(d["test_x"]), is_ood=np.asarray(d["test_is_ood"]))
    return train, test


@pytest.mark.parametrize("method", ["mahalanobis", "relative_mahalanobis", "gaussian"])
def test_score_writes_scores(tmp_path, feature_files, method):
    train, test = feature_files
    out = tmp_path / "scores.npy"
    model = tmp_path / "model.safetensors"
    args = [
        "score",
        "--train",
        str(train),
        "--test",
        str(test),
        "--method",
        method,
        "--out",
        str(out),
    ]
    if method == "mahalanobis":
        args += ["--save", str(model)]
    r = ood_fast(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    scores = np.load(out)
    assert scores.shape == (200,) and np.all(np.isfinite(scores))
    assert "AUROC" in r.stdout and "FPR95" in r.stdout
    if method == "mahalanobis":
        assert model.exists()


def test_score_bad_paths_and_keys(tmp_path, feature_files):
    train, test = feature_files
    out = str(tmp_path / "s.npy")
    r = ood_fast(
        "score", "--train", str(tmp_path / "missing.npz"), "--test", str(test), "--out", out
    )
    assert_clean_error(r)
    assert "missing.npz" in r.stderr
    # a training file without labels, and a file without a features key
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((10, 4), np.float32))
    r = ood_fast(
        "score", "--train", str(tmp_path / "nolabels.npz"), "--test", str(test), "--out", out
    )
    assert_clean_error(r)
    assert "label" in r.stderr
    np.savez(tmp_path / "nokey.npz", feats=np.zeros((10, 4), np.float32))
    r = ood_fast(
        "score", "--train", str(train), "--test", str(tmp_path / "nokey.npz"), "--out", out
    )
    assert_clean_error(r)
    assert "nokey.npz" in r.stderr
    r = ood_fast(
        "score",
        "--train",
        str(train),
        "--test",
        str(test),
        "--out",
        str(tmp_path / "no_such_dir" / "s.npy"),
    )
    assert_clean_error(r)


def bench_quick_json(tmp_path, workload: str, *extra: str) -> tuple[str, dict]:
    """``ood-fast bench --workload {workload} --quick`` (one timed run per candidate, 0.2 s
    budget) as a user runs it: asserts it succeeds and that its JSON names the workload and the
    threads; returns (the printed table, the JSON result)."""
    path = tmp_path / f"{workload}.json"
    r = ood_fast(
        "bench",
        "--workload",
        workload,
        "--quick",
        *extra,
        "--repeats",
        "1",
        "--budget",
        "0.2",
        "--json",
        str(path),
        "--no-progress",
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(path.read_text())
    assert res["meta"]["workload"]["workload"] == workload
    assert res["meta"]["environment"]["threads"] >= 1
    return r.stdout, res


def test_bench_knn_quick_json(tmp_path):
    out, res = bench_quick_json(tmp_path, "knn", "--peers", "faiss_l2,faiss_ip,torch")
    assert "search" in out and "batch of 1" in out and "vs faiss" in out
    rows = res["rows"]
    ours = [row for row in rows if row["kind"] == "ours" and row["status"] == "ok"]
    assert {row["case"] for row in ours} == {"search", "sweep", "batch1"}, rows
    assert any(row["backend"] == "torch" and row["precision"] == "bf16" for row in ours)
    for row in ours:
        assert row["score_s"] > 0 and row["max_abs_diff_f64"] < 1e-5, row
        if row["case"] != "batch1":
            assert 0.5 < row["auroc"] <= 1.0, row
    try:
        import faiss  # noqa: F401
    except ImportError:
        return
    faiss_rows = [row for row in rows if (row["peer"] or "").startswith("faiss")]
    assert {row["case"] for row in faiss_rows} == {"search", "sweep", "batch1"}
    assert all(row["status"] == "ok" for row in faiss_rows), faiss_rows
    assert {row["threads"] for row in faiss_rows if row["case"] == "batch1"} >= {1}
    for row in ours:
        assert "faiss" in row["speedup"], row
        if row["precision"] == "fp32":
            assert row["max_abs_diff_faiss"] < 1e-5, row
    # backends that cannot run are listed with their reasons
    skipped = dict(map(tuple, res["skipped"]))
    assert "ours cuda" in skipped and skipped["ours cuda"]


def main_in_process(capsys, *args) -> tuple[int, str, str]:
    """``ood_fast.cli.main`` in this process (no interpreter start-up): (status, out, err)."""
    from ood_fast import cli

    capsys.readouterr()
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean_error_in_process(capsys, *args, match=None):
    rc, out, err = main_in_process(capsys, *args)
    assert rc == 2, out + err
    assert "error" in err.lower() and "Traceback" not in err, err
    if match:
        assert match in err, err


def test_bench_knn_rejects_bad_options(capsys):
    bad = [
        (("--workload", "knn", "--peers", "openood"), "faiss_l2"),
        (("--workload", "knn", "--preset", "mnist"), "mnist"),
        (("--workload", "knn", "--quick", "--k", "0"), "--k"),
        (("--workload", "knn", "--quick", "--covariance", "per_class"), "--covariance"),
        (("--workload", "knn", "--gpu"), "--gpu"),
        (("--quick", "--k", "5"), "--k"),  # --k is for knn
    ]
    for args, match in bad:
        assert_clean_error_in_process(capsys, "bench", *args, match=match)


def test_score_knn(tmp_path, feature_files, capsys):
    import torch

    import ood_fast as of

    train, test = feature_files
    np.save(tmp_path / "bank.npy", np.load(train)["x"])  # no labels: fine for knn
    out = tmp_path / "knn.npy"
    model = tmp_path / "knn.safetensors"
    r = ood_fast(
        "score",
        "--train",
        str(tmp_path / "bank.npy"),
        "--test",
        str(test),
        "--method",
        "knn",
        "--k",
        "10",
        "--out",
        str(out),
        "--save",
        str(model),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "knn (k=10)" in r.stdout and "AUROC" in r.stdout
    scores = np.load(out)
    assert scores.shape == (200,) and np.all(np.isfinite(scores)) and np.all(scores <= 0)
    t = torch.from_numpy(np.load(test)["x"])
    want = of.KNN(k=10).fit(torch.from_numpy(np.load(train)["x"])).score(t).numpy()
    np.testing.assert_allclose(scores, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(of.load(str(model)).score(t).numpy(), want, rtol=0, atol=1e-6)
    # the default k is 50 (a labelled training file works too); bf16 bank stays close
    base = ["score", "--train", str(train), "--test", str(test), "--method", "knn"]
    rc, so, se = main_in_process(capsys, *base, "--out", str(out))
    assert rc == 0 and "knn (k=50)" in so, se
    want50 = of.KNN(k=50).fit(torch.from_numpy(np.load(train)["x"])).score(t).numpy()
    np.testing.assert_allclose(np.load(out), want50, rtol=0, atol=1e-6)
    rc, so, se = main_in_process(capsys, *base, "--precision", "bf16", "--out", str(out))
    assert rc == 0 and "bf16 bank" in so, se
    np.testing.assert_allclose(np.load(out), want50, rtol=0, atol=1e-2)
    # a k beyond the bank, Mahalanobis-only options, --k without knn: clean errors
    assert_clean_error_in_process(capsys, *base, "--k", "601", "--out", str(out), match="600")
    assert_clean_error_in_process(capsys, *base, "--covariance", "tied", "--out", str(out))
    assert_clean_error_in_process(
        capsys, "score", "--train", str(train), "--test", str(test), "--k", "5", "--out", str(out)
    )


def test_bench_quant_quick_json(tmp_path):
    """``bench --workload quant --quick``: the kernel table (ours and the peers of every op,
    with the backend that ran and the bars) and the SQNR tables, text and JSON. Structure, not
    speed."""
    from ood_fast import bench

    out, res = bench_quick_json(tmp_path, "quant")
    for title in ("hadamard", "rotate_quantize", "int8_linear", "performance bars", "SQNR dB"):
        assert title in out, out
    for col in ("vs copy", "vs dense", "vs F.linear", "vs torch int8", "GB/s", "GOP/s"):
        assert col in out, out
    rows = res["rows"]
    failed = [row for row in rows if row["status"] != "ok"]
    assert not failed, failed
    quick = bench.QUANT_PRESETS["quick"]
    want_cases = {c.name for c in bench.quant_cases("quick")}
    assert {row["case"] for row in rows} == want_cases
    assert len(want_cases) == len(quick["hadamard_ns"]) + len(quick["rq_ns"]) + 1
    for case in want_cases:
        rs = [row for row in rows if row["case"] == case]
        ours = [row for row in rs if row["kind"] == "ours"]
        peers = {row["role"] for row in rs if row["kind"] == "peer"}
        assert ours and peers, rs
        for row in ours:
            assert row["backend_used"] in ("cpu", "torch") or "=" in row["backend_used"], row
            assert set(row["speedup"]) == peers, row
            if row["role"] in ("op", "w8a8"):  # the bars, judged against peers that ran
                assert row["bars"], row
                assert all(b["ok"] in (True, False) for b in row["bars"].values()), row
            else:  # the default-scan rows: no bar
                assert row["role"] == "scan" and row["bars"] == {}, row
            assert row["time_s"] > 0
        if case.startswith("int8_linear"):
            assert {"torch_fp32", "int_mm"} <= peers
            assert {row["role"] for row in ours} == {"op", "w8a8"}
            assert any("QuantLinear" in row["candidate"] for row in ours)
            for row in rs:
                assert row["gops"] > 0
                if "sqnr_db" in row:
                    assert row["sqnr_db"] > 20, row
                else:
                    assert row["max_rel_diff"] < 1e-4, row
        else:
            assert "copy" in peers
            assert {row["role"] for row in ours} == {"op", "scan"}
            for row in rs:
                assert row["gbps"] > 0
    # SQNR: both sources (synthetic outlier layer, Mamba block linears), every method ×
    # granularity, finite, and the rotations help where outliers are
    sq = res["sqnr"]
    assert sq and all(s["status"] == "ok" for s in sq), sq
    sources = {s["source"].split(" ")[0] for s in sq}
    assert {"synthetic", "mamba"} <= sources, sources
    for s in sq:
        for m in bench.QUANT_METHODS:
            for g in bench.QUANT_GRANULARITIES:
                assert math.isfinite(s["sqnr"][m][g]), s
    syn = next(s for s in sq if s["source"].startswith("synthetic"))
    assert syn["sqnr"]["smooth+KLT+H"]["per_tensor"] > syn["sqnr"]["none"]["per_tensor"], syn


def test_bench_quant_rejects_bad_options(capsys):
    bad = [
        (("--workload", "quant", "--peers", "faiss_l2"), "copy"),
        (("--workload", "quant", "--preset", "cifar10"), "cifar10"),
        (("--workload", "quant", "--quick", "--backends", "gpu9"), "gpu9"),
        (("--workload", "quant", "--quick", "--k", "5"), "--k"),
        (("--workload", "quant", "--gpu"), "--gpu"),
    ]
    for args, match in bad:
        assert_clean_error_in_process(capsys, "bench", *args, match=match)
