"""ood_fast.integrations.pytorch_ood: drop-in Mahalanobis / RMD against pytorch-ood's own.

Every test here needs pytorch-ood; where it cannot import (pytorch-ood 0.4.0 imports torchvision,
which does not import beside the CPU torch of the main CI environment) the module skips with the
import error as the reason. .ci/peers_env.sh runs it in an environment where it imports.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from ood_fast import metrics, peers

pytestmark = pytest.mark.pytorch_ood

_ok = peers.pytorch_ood_available()
if _ok is not True:
    pytest.skip(_ok, allow_module_level=True)

import pytorch_ood.detector as pod  # noqa: E402
from pytorch_ood.api import RequiresFittingException  # noqa: E402

from ood_fast.data import synthetic_features  # noqa: E402
from ood_fast.integrations import pytorch_ood as fast  # noqa: E402


@pytest.fixture(scope="module")
def feats():
    d = synthetic_features(n_train=3000, n_test=1000, dim=48, num_classes=6, seed=3)
    return d["train_x"], d["train_y"], d["test_x"], d["test_is_ood"]


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", ["Mahalanobis", "RMD"])
def test_same_values_ranking_and_auroc(feats, name):
    x, y, t, ood = feats
    theirs = getattr(pod, name)(None).fit_features(x, y)
    ours = getattr(fast, name)(None).fit_features(x, y)
    assert isinstance(ours, getattr(pod, name))
    a, b = ours.predict_features(t), theirs.predict_features(t)
    assert a.shape == b.shape == (t.shape[0],) and a.dtype == torch.float32
    # values equal up to pytorch-ood's 1e-6 ridge on the summed covariance and float32 rounding
    assert rel_err(a, b) < 2e-4
    # same ranking: AUROC identical to float32 resolution, Spearman-like check on the order
    conf_a, conf_b = -a, -b  # metrics take higher = ID
    au_a = metrics.auroc(conf_a[~ood], conf_a[ood])
    au_b = metrics.auroc(conf_b[~ood], conf_b[ood])
    assert abs(au_a - au_b) < 1e-4
    assert 0.6 < au_a < 1.0
    ra, rb = torch.argsort(torch.argsort(a)), torch.argsort(torch.argsort(b))
    assert float((ra - rb).abs().double().mean()) < 1.0


def test_matches_ood_fast_estimators(feats):
    """The drop-in's numbers are ood_fast's scores rescaled to pytorch-ood's convention."""
    import ood_fast

    x, y, t, _ = feats
    n = x.shape[0]
    m = ood_fast.Mahalanobis().fit(x, y).score(t)
    r = ood_fast.RelativeMahalanobis().fit(x, y).score(t)
    torch.testing.assert_close(
        fast.Mahalanobis(None).fit_features(x, y).predict_features(t),
        -m / (2 * n),
        rtol=1e-5,
        atol=0,
    )
    torch.testing.assert_close(
        fast.RMD(None).fit_features(x, y).predict_features(t), -r / n, rtol=1e-5, atol=1e-7
    )


def test_upstream_attributes(feats):
    x, y, _, _ = feats
    theirs = pod.Mahalanobis(None).fit_features(x, y)
    ours = fast.Mahalanobis(None).fit_features(x, y)
    assert ours.n_classes == theirs.n_classes == 6
    torch.testing.assert_close(ours.mu, theirs.mu, rtol=1e-5, atol=1e-5)
    assert rel_err(ours.cov, theirs.cov) < 1e-5
    assert rel_err(ours.precision, theirs.precision) < 1e-3
    r_theirs = pod.RMD(None).fit_features(x, y)
    r_ours = fast.RMD(None).fit_features(x, y)
    torch.testing.assert_close(r_ours.background_mu, r_theirs.background_mu, rtol=1e-5, atol=1e-5)
    assert rel_err(r_ours.background_cov, r_theirs.background_cov) < 1e-5
    assert rel_err(r_ours.background_precision, r_theirs.background_precision) < 1e-3


def test_fit_and_predict_with_encoder_and_loader(feats):
    x, y, t, _ = feats
    enc = torch.nn.Linear(48, 48)
    with torch.no_grad():
        enc.weight.copy_(torch.eye(48) * 2.0)
        enc.bias.zero_()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=512)
    for name in ("Mahalanobis", "RMD"):
        theirs = getattr(pod, name)(enc).fit(loader)
        ours = getattr(fast, name)(enc).fit(loader)
        assert rel_err(ours(t), theirs(t)) < 2e-4  # __call__ -> predict -> encoder
        assert rel_err(ours.predict(t), theirs.predict_features(2.0 * t)) < 2e-4


def test_feature_maps_are_pooled(feats):
    x, y, t, _ = feats
    ours = fast.Mahalanobis(None).fit_features(x, y)
    theirs = pod.Mahalanobis(None).fit_features(x, y)
    maps = t[:, :, None, None].expand(-1, -1, 2, 3)  # [B, D, 2, 3], mean = t
    assert rel_err(ours.predict_features(maps), theirs.predict_features(maps)) < 2e-4


def test_errors_and_surface():
    det = fast.Mahalanobis(None)
    with pytest.raises(RequiresFittingException):
        det.predict_features(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="contiguous"):
        det.fit_features(torch.randn(10, 3), torch.tensor([0, 2] * 5))
    with pytest.raises(ValueError, match="OOD samples"):
        det.fit_features(torch.randn(10, 3), torch.tensor([0, -1] * 5))
    assert fast.RMD(None, backend="torch").requires_fit
    x = torch.randn(40, 3)
    y = torch.arange(40) % 2
    det = fast.RMD(None, backend="torch").fit_features(x, y)
    assert det.predict_features(x).shape == (40,)
    assert det.to("cpu") is det and det.device == torch.device("cpu")


def test_import_error_when_pytorch_ood_is_missing(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pytorch_ood", None)  # makes `import pytorch_ood` fail
    monkeypatch.setitem(sys.modules, "pytorch_ood.detector", None)
    monkeypatch.delitem(sys.modules, "ood_fast.integrations.pytorch_ood", raising=False)
    with pytest.raises(ImportError, match="needs pytorch-ood"):
        importlib.import_module("ood_fast.integrations.pytorch_ood")
    monkeypatch.undo()
    importlib.import_module("ood_fast.integrations.pytorch_ood")


def test_peer_rmd_and_integration_agree(feats):
    x, y, t, _ = feats
    p = peers.pytorch_ood_rmd(x, y, t)
    r = fast.RMD(None).fit_features(x, y).predict_features(t) * -x.shape[0]
    assert rel_err(r, p) < 2e-4
    assert np.isfinite(p.numpy()).all()


# ---------------------------------------------------------------------------------------------
# KNN: the drop-in against pytorch-ood's own (sklearn brute force) on the same features
# ---------------------------------------------------------------------------------------------


def abs_err(a, b):
    return float((a.double() - b.double()).abs().max())


@pytest.mark.parametrize("k", [1, 50, 1000])
def test_knn_same_values_and_auroc(feats, k):
    x, y, t, ood = feats
    theirs = pod.KNN(None, k=k).fit_features(x, y)
    ours = fast.KNN(None, k=k).fit_features(x, y)
    assert isinstance(ours, pod.KNN) and ours.uses_ood_fast
    a, b = ours.predict_features(t), theirs.predict_features(t)
    assert a.shape == b.shape == (t.shape[0],) and a.dtype == b.dtype == torch.float64
    assert abs_err(a, b) < 5e-6  # unsquared distances of unit vectors, fp32 search
    au_a = metrics.auroc(-a[~ood], -a[ood])
    au_b = metrics.auroc(-b[~ood], -b[ood])
    assert abs(au_a - au_b) < 1e-4 and 0.6 < au_a <= 1.0


def test_knn_normalize_false_and_ood_labels_ignored(feats):
    x, y, t, _ = feats
    y = y.clone()
    y[::7] = -1  # OOD samples in the fitting data are dropped, as pytorch-ood does
    for normalize in (True, False):
        theirs = pod.KNN(None, k=20, normalize=normalize).fit_features(x, y)
        ours = fast.KNN(None, k=20, normalize=normalize).fit_features(x, y)
        assert ours.n_samples_fit_ == int((y >= 0).sum())
        a, b = ours.predict_features(t), theirs.predict_features(t)
        assert float(((a - b).abs() / b.abs()).max()) < 1e-5


def test_knn_k_changes_without_refit(feats, monkeypatch):
    import ood_fast

    x, y, t, _ = feats
    fits = []
    orig = ood_fast.KNN.fit
    monkeypatch.setattr(ood_fast.KNN, "fit", lambda self, b: fits.append(1) or orig(self, b))
    det = fast.KNN(None, k=50).fit_features(x, y)
    for k in (5, 200, 50):
        det.k = k
        det.fit_features(x, y)  # same tensors, unchanged: the bank is reused
        want = pod.KNN(None, k=k).fit_features(x, y).predict_features(t)
        assert abs_err(det.predict_features(t), want) < 5e-6
    det.n_neighbors = 7  # sklearn's name for the same knob
    assert det.k == 7
    want = pod.KNN(None, k=7).fit_features(x, y).predict_features(t)
    assert abs_err(det.predict_features(t), want) < 5e-6
    assert len(fits) == 1
    sweep = det.predict_features_sweep(t, [7, 50, 1000])
    assert sweep.shape == (t.shape[0], 3) and sweep.dtype == torch.float64
    det.k = 1000
    assert abs_err(sweep[:, 2], det.predict_features(t)) == 0.0
    # other tensors, or the same tensor edited in place, are fitted again
    det.fit_features(x.clone(), y)
    x2 = x.clone()
    det.fit_features(x2, y)
    x2.mul_(-1.0)
    det.fit_features(x2, y)
    assert len(fits) == 4
    det.k = 50
    want = pod.KNN(None, k=50).fit_features(x2, y).predict_features(t)
    assert abs_err(det.predict_features(t), want) < 5e-6


def test_knn_grid_search_fits_once(feats, monkeypatch):
    """pytorch-ood's GridSearch over k: same choice and AUROCs as upstream, one fit of the bank."""
    from pytorch_ood.utils import GridSearch

    import ood_fast

    x, y, t, ood = feats
    fits = []
    orig = ood_fast.KNN.fit
    monkeypatch.setattr(ood_fast.KNN, "fit", lambda self, b: fits.append(1) or orig(self, b))
    enc = torch.nn.Identity()
    fit_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=500)
    val_y = torch.where(
        ood, torch.full_like(ood, -1, dtype=torch.long), torch.zeros_like(ood, dtype=torch.long)
    )
    val_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(t, val_y), batch_size=500
    )
    space = {"k": [1, 10, 50, 200]}
    results = {}
    for name, mod in (("theirs", pod), ("ours", fast)):
        det = mod.KNN(enc)
        search = GridSearch(det, fit_loader, val_loader, hyperparameter_space=space)
        best = search.run()
        results[name] = (best, [r["score"] for r in search.results_], det)
    assert results["ours"][0] == results["theirs"][0]
    np.testing.assert_allclose(results["ours"][1], results["theirs"][1], atol=1e-4)
    assert len(fits) == 1  # 4 candidates + the final re-fit, one bank
    det = results["ours"][2]
    assert det.k == results["ours"][0]["k"]
    assert abs_err(det(t), results["theirs"][2](t)) < 5e-6  # __call__ -> encoder -> predict


def test_knn_errors_fallback_and_surface(feats):
    x, y, t, _ = feats
    det = fast.KNN(None)
    with pytest.raises(RequiresFittingException):
        det.predict_features(t)
    with pytest.raises(ValueError, match="No ID samples"):
        det.fit_features(x[:10], torch.full((10,), -1))
    with pytest.raises(ValueError, match="exceeds the number of ID samples"):
        fast.KNN(None, k=11).fit_features(x[:10], y[:10])
    det = fast.KNN(None, k=3000).fit_features(x, y)
    det.k = 3001
    with pytest.raises(ValueError):
        det.predict_features(t)
    # a non-Euclidean metric: pytorch-ood's own sklearn search, same numbers as upstream
    man = fast.KNN(None, k=5, metric="manhattan").fit_features(x, y)
    assert not man.uses_ood_fast
    want = pod.KNN(None, k=5, metric="manhattan").fit_features(x, y).predict_features(t)
    assert abs_err(man.predict_features(t), want) == 0.0
    assert fast.KNN(None, metric="euclidean").uses_ood_fast
    assert fast.KNN(None, p=2).uses_ood_fast and not fast.KNN(None, p=1).uses_ood_fast
    # bf16 bank: exact search over the rounded bank, close to upstream, same ranking quality
    half = fast.KNN(None, k=50, bank_dtype=torch.bfloat16).fit_features(x, y)
    full = pod.KNN(None, k=50).fit_features(x, y).predict_features(t)
    assert abs_err(half.predict_features(t), full) < 1e-2
    det = fast.KNN(None, backend="torch").fit_features(x, y)
    assert det.to("cpu") is det and det.device == torch.device("cpu")
    assert det.predict_features(t).device == torch.device("cpu")
    import pickle

    again = pickle.loads(pickle.dumps(det))
    assert abs_err(again.predict_features(t), det.predict_features(t)) == 0.0
