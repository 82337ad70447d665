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
