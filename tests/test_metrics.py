"""ood_fast.metrics against sklearn, computed the way OpenOOD's evaluator computes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

sk = pytest.importorskip("sklearn.metrics")

from ood_fast import metrics  # noqa: E402


def openood_reference(scores_id, scores_ood, tpr=0.95):
    """OpenOOD v1.5 ``auc_and_fpr_recall`` (conf = our score, higher = ID; OOD positive)."""
    conf = np.concatenate([scores_id, scores_ood]).astype(np.float64)
    ood = np.concatenate([np.zeros(len(scores_id)), np.ones(len(scores_ood))]).astype(int)
    fpr_list, tpr_list, _ = sk.roc_curve(ood, -conf)
    fpr = fpr_list[np.argmax(tpr_list >= tpr)]
    p_in, r_in, _ = sk.precision_recall_curve(1 - ood, conf)
    p_out, r_out, _ = sk.precision_recall_curve(ood, -conf)
    return {
        "auroc": sk.auc(fpr_list, tpr_list),
        "fpr95": fpr,
        "aupr_in": sk.auc(r_in, p_in),
        "aupr_out": sk.auc(r_out, p_out),
        "roc_auc_score": sk.roc_auc_score(ood, -conf),
    }


def check_all(sid, sood, tpr=0.95, atol=1e-9):
    ref = openood_reference(np.asarray(sid), np.asarray(sood), tpr)
    got = metrics.evaluate(sid, sood, tpr=tpr)
    assert set(got) == {"auroc", "fpr95", "aupr_in", "aupr_out"}
    for k in got:
        assert abs(got[k] - ref[k]) <= atol, (k, got[k], ref[k])
    assert abs(got["auroc"] - ref["roc_auc_score"]) <= atol
    # the single-metric functions agree with evaluate
    assert metrics.auroc(sid, sood) == got["auroc"]
    assert metrics.fpr_at_tpr(sid, sood, tpr) == got["fpr95"]
    assert metrics.aupr_in(sid, sood) == got["aupr_in"]
    assert metrics.aupr_out(sid, sood) == got["aupr_out"]
    return got


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [None, 2, 1, 0])
def test_matches_openood_sklearn(seed, decimals):
    rng = np.random.default_rng(seed)
    n_id, n_ood = rng.integers(50, 400, size=2)
    sid = rng.normal(1.0, 1.0, n_id)
    sood = rng.normal(0.0, 1.3, n_ood)
    if decimals is not None:  # ties-heavy: few distinct values
        sid, sood = np.round(sid, decimals), np.round(sood, decimals)
    check_all(sid, sood)
    for tpr in (0.0, 0.5, 0.8, 0.9, 0.99, 1.0):
        check_all(sid, sood, tpr=tpr)


@pytest.mark.parametrize("seed", range(20))
def test_tiny_and_integer_ties(seed):
    rng = np.random.default_rng(100 + seed)
    n_id, n_ood = rng.integers(1, 6, size=2)
    sid = rng.integers(0, 3, n_id).astype(np.float64)
    sood = rng.integers(0, 3, n_ood).astype(np.float64)
    check_all(sid, sood)
    check_all(sid, sood, tpr=0.5)


def test_drop_intermediate_diagonal_ties():
    """A run of tie groups with one ID and one OOD each: sklearn's roc_curve drops the collinear
    interior points, and OpenOOD's FPR95 then lands at the end of the diagonal segment."""
    sood = np.arange(1.0, 21.0)
    sid = np.concatenate([sood, np.full(20, 100.0)])
    got = check_all(sid, sood)
    assert got["fpr95"] == 0.5  # the first threshold with tpr >= .95 would give 19/40
    check_all(sid, sood, tpr=0.3)


def test_all_equal_scores():
    got = check_all(np.full(7, 0.3), np.full(5, 0.3))
    assert got["auroc"] == 0.5 and got["fpr95"] == 1.0


def test_perfect_and_inverted():
    got = metrics.evaluate([2.0, 3.0, 4.0], [0.0, 1.0])
    assert got == {"auroc": 1.0, "fpr95": 0.0, "aupr_in": 1.0, "aupr_out": 1.0}
    assert metrics.auroc([0.0, 1.0], [2.0, 3.0]) == 0.0
    check_all(np.array([0.0, 1.0]), np.array([2.0, 3.0]))


def test_single_samples():
    check_all(np.array([1.0]), np.array([0.0]))
    check_all(np.array([0.0]), np.array([0.0]))


def test_large_continuous():
    rng = np.random.default_rng(7)
    sid, sood = rng.normal(0.5, 1, 20000), rng.normal(0, 1, 15000)
    check_all(sid, sood)


def test_torch_inputs_and_dtypes():
    rng = np.random.default_rng(3)
    sid, sood = np.round(rng.normal(1, 1, 300), 1), np.round(rng.normal(0, 1, 200), 1)
    ref = metrics.evaluate(sid, sood)
    for dt in (torch.float32, torch.float64):
        # float32 rounding keeps the order and the ties of these 1-decimal values
        got = metrics.evaluate(torch.tensor(sid, dtype=dt), torch.tensor(sood, dtype=dt))
        for k in ref:
            assert abs(got[k] - ref[k]) < 1e-12, k
    # mixed: numpy + tensor, lists, column vectors, float16/bf16 tensors run
    assert metrics.auroc(torch.tensor(sid), sood) == ref["auroc"]
    assert metrics.auroc(list(sid), list(sood)) == ref["auroc"]
    assert metrics.auroc(sid[:, None], torch.tensor(sood)[:, None]) == ref["auroc"]
    assert 0.0 <= metrics.auroc(torch.tensor(sid).half(), torch.tensor(sood).bfloat16()) <= 1.0
    # integer scores
    assert metrics.auroc(np.array([2, 3]), np.array([1])) == 1.0
    # gradients are not needed: tensors requiring grad are accepted
    assert metrics.auroc(torch.tensor(sid, requires_grad=True), sood) == ref["auroc"]


def test_infinite_scores_rank():
    got = metrics.evaluate([np.inf, 1.0, 2.0], [-np.inf, 0.0])
    assert got["auroc"] == 1.0
    assert metrics.auroc([np.inf], [np.inf]) == 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors():
    rng = np.random.default_rng(5)
    sid, sood = np.round(rng.normal(1, 1, 3000), 1), np.round(rng.normal(0, 1, 2000), 1)
    ref = metrics.evaluate(sid, sood)
    got = metrics.evaluate(torch.tensor(sid, device="cuda"), torch.tensor(sood, device="cuda"))
    for k in ref:
        assert abs(got[k] - ref[k]) < 1e-12, k
    # numpy partner follows the tensor's device
    assert metrics.auroc(torch.tensor(sid, device="cuda"), sood) == ref["auroc"]


def test_errors():
    with pytest.raises(ValueError, match="scores_id: empty"):
        metrics.auroc([], [1.0])
    with pytest.raises(ValueError, match="scores_ood: empty"):
        metrics.evaluate(np.array([1.0]), np.array([]))
    with pytest.raises(ValueError, match="NaN"):
        metrics.auroc([1.0, np.nan], [0.0])
    with pytest.raises(ValueError, match=r"scores_ood: 2 NaN scores \(first at index 1\)"):
        metrics.fpr_at_tpr(torch.tensor([1.0]), torch.tensor([0.0, np.nan, np.nan]))
    with pytest.raises(ValueError, match="1-D"):
        metrics.aupr_in(np.ones((3, 2)), [0.0])
    with pytest.raises(ValueError, match="tpr must be in"):
        metrics.fpr_at_tpr([1.0], [0.0], tpr=95)
    with pytest.raises(TypeError, match="numeric"):
        metrics.auroc(["a"], [0.0])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="one device"):
            metrics.auroc(torch.ones(2), torch.zeros(2, device="cuda"))
