"""OOD evaluation metrics: AUROC, FPR at a TPR, AUPR-In and AUPR-Out, with OpenOOD's conventions.

Inputs are two 1-D score arrays, ``scores_id`` (in-distribution test samples) and ``scores_ood``
(out-of-distribution samples), in **our** convention: *higher = more in-distribution* (what
``Mahalanobis.score`` returns, sklearn's ``score_samples`` convention). They may be numpy arrays,
lists or torch tensors on any device (CPU or CUDA); the computation runs in torch on the inputs'
device in float64 and returns Python floats.

Conventions (those of OpenOOD v1.5, ``openood/evaluators/metrics.py``, ``auc_and_fpr_recall``):

* **OOD is the positive class.** OpenOOD calls ``sklearn.metrics.roc_curve(ood_indicator, -conf)``
  where ``conf`` is our score. So the "detector output" is ``-score`` and OOD samples are the
  positives.
* **AUROC** = ``sklearn.metrics.auc(fpr, tpr)`` of that curve: the probability that a random OOD
  sample gets a lower score than a random ID sample, ties counting 1/2 (it is symmetric: swapping
  the positive class and negating the scores gives the same number).
* **FPR@95** (``fpr_at_tpr(..., tpr=0.95)``) = ``fpr[argmax(tpr >= 0.95)]`` on that same
  ``roc_curve`` output, i.e. the fraction of **ID** samples flagged as OOD at the first threshold
  (from the strictest) where at least 95 % of the **OOD** samples are flagged. Note that many
  papers define FPR95 the other way round (ID positive: fraction of OOD accepted when 95 % of ID
  is kept); the two differ in general. We follow OpenOOD exactly, including the consequence of
  ``roc_curve``'s default ``drop_intermediate=True``: points that lie on a straight segment of
  the curve are removed before the ``argmax``. This only matters with tied scores (a run of tie
  groups with the same ID/OOD counts, a diagonal segment), where the first threshold reaching the
  TPR can be a removed point and OpenOOD then reports the FPR of the segment's end.
* **AUPR-In** = ``auc(recall, precision)`` of ``precision_recall_curve(1 - ood_indicator, conf)``:
  ID is the positive class, ranked by our score.
  **AUPR-Out** = ``auc(recall, precision)`` of ``precision_recall_curve(ood_indicator, -conf)``:
  OOD is the positive class, ranked by the negated score.
  Both are the *trapezoidal* area under the precision-recall curve (including sklearn's extra
  point ``(recall=0, precision=1)``), **not** ``average_precision_score`` (a step-wise sum); the
  two differ slightly. ``precision_recall_curve`` keeps every distinct threshold
  (its ``drop_intermediate`` defaults to False).
* Values are fractions in ``[0, 1]``; OpenOOD prints them ×100.

Tie handling matches sklearn's ``_binary_clf_curve``: samples with equal scores form one
threshold (one point of the curve). The implementation is a single stable sort of the pooled
scores, a cumulative count of positives and a gather at the last index of each group of equal
scores; counts are exact integers, so AUROC is computed exactly as
``Σ Δfp·(tp_k + tp_{k-1}) / (2·P·N)``.

Errors: empty inputs and NaN scores raise ``ValueError`` (the metric is undefined). ``±inf``
scores are accepted (their ranks are well defined; sklearn itself rejects them).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["auroc", "fpr_at_tpr", "aupr_in", "aupr_out", "evaluate"]


def _as_scores(x, name: str, device: torch.device | None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        arr = np.asarray(x)
        if arr.dtype == object or arr.dtype.kind not in "fiub":
            raise TypeError(f"{name}: expected numeric scores, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))
        if device is not None:
            t = t.to(device)
    if t.is_complex():
        raise TypeError(f"{name}: complex scores are not supported")
    if t.dim() == 2 and 1 in t.shape:
        t = t.reshape(-1)
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D array of scores, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name}: empty; at least one ID and one OOD score are needed")
    t = t.to(torch.float64)
    nan = torch.isnan(t)
    if bool(nan.any()):
        raise ValueError(
            f"{name}: {int(nan.sum())} NaN scores (first at index {int(nan.nonzero()[0, 0])}); "
            "the metric is undefined"
        )
    return t


def _prepare(scores_id, scores_ood):
    """Both score vectors as float64 tensors on one device."""
    dev = None
    for s in (scores_id, scores_ood):
        if isinstance(s, torch.Tensor):
            dev = s.device
            break
    sid = _as_scores(scores_id, "scores_id", dev)
    sood = _as_scores(scores_ood, "scores_ood", dev)
    if sid.device != sood.device:
        raise ValueError(
            f"scores_id is on {sid.device} but scores_ood is on {sood.device}; "
            "move them to one device"
        )
    return sid, sood


def _curve(pos: torch.Tensor, neg: torch.Tensor):
    """Counts at each distinct threshold, strictest first (sklearn's ``_binary_clf_curve``).

    ``pos`` and ``neg`` are the detector outputs of the positive and negative samples, where a
    higher output means "more positive". Returns int64 tensors ``(tps, fps)`` of length K = number
    of distinct values: the number of positives / negatives with output >= the k-th largest
    distinct value.
    """
    s = torch.cat([pos, neg])
    label = torch.cat(
        [torch.ones_like(pos, dtype=torch.int64), torch.zeros_like(neg, dtype=torch.int64)]
    )
    s_sorted, order = torch.sort(s, descending=True, stable=True)
    label = label[order]
    # last index of each group of equal scores (the threshold index set of sklearn)
    last = torch.ones_like(s_sorted, dtype=torch.bool)
    last[:-1] = s_sorted[1:] != s_sorted[:-1]
    idx = last.nonzero().reshape(-1)
    tps = torch.cumsum(label, 0)[idx]
    fps = idx + 1 - tps
    return tps, fps


def _auroc(tps: torch.Tensor, fps: torch.Tensor) -> float:
    P, N = int(tps[-1]), int(fps[-1])
    z = tps.new_zeros(1)
    tp = torch.cat([z, tps]).to(torch.float64)
    fp = torch.cat([z, fps]).to(torch.float64)
    # exact in float64 while 2·P·N < 2**53 (N·P up to ~4.5e15)
    area2 = ((fp[1:] - fp[:-1]) * (tp[1:] + tp[:-1])).sum()
    return float(area2) / (2.0 * P * N)


def _fpr_at_tpr(tps: torch.Tensor, fps: torch.Tensor, tpr: float) -> float:
    P, N = tps[-1], fps[-1]
    if tps.numel() > 2:  # sklearn roc_curve(drop_intermediate=True)
        keep = torch.ones_like(tps, dtype=torch.bool)
        keep[1:-1] = (torch.diff(fps, n=2) != 0) | (torch.diff(tps, n=2) != 0)
        tps, fps = tps[keep], fps[keep]
    z = tps.new_zeros(1)
    tpr_list = torch.cat([z, tps]).to(torch.float64) / P.to(torch.float64)
    fpr_list = torch.cat([z, fps]).to(torch.float64) / N.to(torch.float64)
    hit = tpr_list >= tpr
    # np.argmax of an all-False mask is 0, as OpenOOD gets it (only possible for tpr > 1)
    i = int(hit.to(torch.int8).argmax()) if bool(hit.any()) else 0
    return float(fpr_list[i])


def _aupr(tps: torch.Tensor, fps: torch.Tensor) -> float:
    """Trapezoidal area under sklearn's precision_recall_curve (with its (0, 1) end point)."""
    tp = tps.to(torch.float64)
    precision = tp / (tps + fps).to(torch.float64)  # tps + fps >= 1 at every threshold
    recall = tp / tp[-1]
    one = precision.new_ones(1)
    p = torch.cat([one, precision])
    r = torch.cat([one.new_zeros(1), recall])
    return float(((r[1:] - r[:-1]) * (p[1:] + p[:-1])).sum() * 0.5)


def _check_tpr(tpr: float) -> float:
    tpr = float(tpr)
    if not 0.0 <= tpr <= 1.0:
        raise ValueError(f"tpr must be in [0, 1], got {tpr}")
    return tpr


def auroc(scores_id, scores_ood) -> float:
    """Area under the ROC curve, OOD positive (symmetric, ties count 1/2). Higher = better."""
    sid, sood = _prepare(scores_id, scores_ood)
    return _auroc(*_curve(-sood, -sid))


def fpr_at_tpr(scores_id, scores_ood, tpr: float = 0.95) -> float:
    """OpenOOD's FPR@TPR: fraction of ID samples flagged OOD once ``tpr`` of OOD is flagged.

    ``fpr[argmax(tpr_curve >= tpr)]`` on ``sklearn.metrics.roc_curve(is_ood, -score)`` (with its
    default ``drop_intermediate=True``). Lower = better.
    """
    tpr = _check_tpr(tpr)
    sid, sood = _prepare(scores_id, scores_ood)
    return _fpr_at_tpr(*_curve(-sood, -sid), tpr)


def aupr_in(scores_id, scores_ood) -> float:
    """Trapezoidal area under the precision-recall curve with ID positive, ranked by score."""
    sid, sood = _prepare(scores_id, scores_ood)
    return _aupr(*_curve(sid, sood))


def aupr_out(scores_id, scores_ood) -> float:
    """Trapezoidal area under the precision-recall curve with OOD positive, ranked by -score."""
    sid, sood = _prepare(scores_id, scores_ood)
    return _aupr(*_curve(-sood, -sid))


def evaluate(scores_id, scores_ood, tpr: float = 0.95) -> dict:
    """All four metrics at once (two sorts instead of four).

    Returns ``{"auroc", "fpr95", "aupr_in", "aupr_out"}`` as fractions in [0, 1]; ``fpr95`` is the
    FPR at ``tpr`` (0.95 by default; the key keeps its name).
    """
    tpr = _check_tpr(tpr)
    sid, sood = _prepare(scores_id, scores_ood)
    tps_o, fps_o = _curve(-sood, -sid)
    return {
        "auroc": _auroc(tps_o, fps_o),
        "fpr95": _fpr_at_tpr(tps_o, fps_o, tpr),
        "aupr_in": _aupr(*_curve(sid, sood)),
        "aupr_out": _aupr(tps_o, fps_o),
    }
