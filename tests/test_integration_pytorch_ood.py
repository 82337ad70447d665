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
