"""Metrics checked against scikit-learn on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score

from wsi_lightning.analysis.metrics import TaskMetrics


@pytest.mark.parametrize("c", [2, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_against_sklearn(c: int, seed: int):
    rng = np.random.default_rng(seed)
    n = 200
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[y]
    p = torch.tensor(logits).softmax(-1).numpy()
    m = TaskMetrics({"t": c})
    for chunk in np.array_split(np.arange(n), 7):  # several updates, like batches
        m.update({"t": torch.tensor(p[chunk])}, {"t": torch.tensor(y[chunk])})
    got = {k: float(v) for k, v in m.compute("test").items()}
    pred = p.argmax(1)
    if c == 2:
        auc, ap = roc_auc_score(y, p[:, 1]), average_precision_score(y, p[:, 1])
        pred = (p[:, 1] >= 0.5).astype(int)
    else:
        auc = roc_auc_score(y, p, multi_class="ovr", average="macro")
        ap = average_precision_score(np.eye(c)[y], p, average="macro")
    assert got["test/auroc"] == pytest.approx(auc, abs=1e-5)
    assert got["test/ap"] == pytest.approx(ap, abs=1e-4)
    assert got["test/acc"] == pytest.approx(accuracy_score(y, pred), abs=1e-6)
    assert got["test/f1_macro"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"), abs=1e-5)
    assert got["test/f1_micro"] == pytest.approx(f1_score(y, p.argmax(1), average="micro"), abs=1e-5)


def test_multitag_keys_average_and_unknown_labels():
    rng = np.random.default_rng(0)
    m = TaskMetrics({"a": 2, "b": 3})
    ya, yb = rng.integers(0, 2, 50), rng.integers(0, 3, 50)
    yb[:5] = -1  # unknown labels are skipped
    pa, pb = rng.dirichlet([1, 1], 50), rng.dirichlet([1, 1, 1], 50)
    m.update({"a": torch.tensor(pa), "b": torch.tensor(pb)}, {"a": torch.tensor(ya), "b": torch.tensor(yb)})
    got = {k: float(v) for k, v in m.compute("val").items()}
    assert got["val/b/f1_macro"] == pytest.approx(f1_score(yb[5:], pb[5:].argmax(1), average="macro"), abs=1e-5)
    assert got["val/auroc"] == pytest.approx((got["val/a/auroc"] + got["val/b/auroc"]) / 2, abs=1e-6)
