"""Two-step patch baselines (Patchbased-LR / -SVM): fit on train bags, predict test bags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import feature_cfg_overrides
from wsi_lightning import build, config, run
from wsi_lightning.analysis.confusion import read_predictions
from wsi_lightning.methods.patch_baselines import PatchBaseline, PatchSVM, prediction_frame

TAGS = {"stain": 3, "organ": 4}


def bags(n: int, seed: int, d: int = 10) -> list[dict]:
    """Bag of 20-40 patches; a third of the patches carry the stain (axis c) and organ (axis 3 + c) signal."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        lab = {"stain": i % 3, "organ": (i // 3) % 4}
        f = rng.normal(size=(int(rng.integers(20, 40)), d)).astype(np.float32)
        k = len(f) // 3
        f[:k, lab["stain"]] += 3.0
        f[-k:, 3 + lab["organ"]] += 3.0
        out.append({"features": torch.from_numpy(f), "labels": lab, "slide_id": f"s{seed}_{i:02d}",
                    "coords": torch.zeros(len(f), 2, dtype=torch.long)})
    return out


@pytest.mark.parametrize("classifier", ["lr", "svm"])
def test_two_step_baseline_learns_each_tag(classifier: str):
    model = PatchBaseline(classifier, max_patches=16).fit(bags(36, 0), TAGS)
    test = bags(24, 1)
    ids, probs = model.predict_proba(test)
    assert ids == [b["slide_id"] for b in test]
    for t, c in TAGS.items():
        assert probs[t].shape == (24, c)
        np.testing.assert_allclose(probs[t].sum(1), 1.0, rtol=1e-6)
        acc = (probs[t].argmax(1) == np.array([b["labels"][t] for b in test])).mean()
        assert acc >= 0.9, (t, acc)


def test_descriptor_unseen_classes_and_unknown_labels():
    train = bags(18, 0)
    for b in train[:3]:
        b["labels"] = {**b["labels"], "organ": -1}  # unknown organ: left out for that tag only
    model = PatchBaseline("lr", aggregate="hist_mean").fit(train, {"stain": 3, "organ": 5})  # class 4 never seen
    assert model.describe(train[0]["features"].numpy(), "organ").shape == (10,)
    _, probs = model.predict_proba(bags(4, 2))
    assert probs["organ"].shape == (4, 5) and (probs["organ"][:, 4] == 0).all()
    h = PatchBaseline("lr", aggregate="hist").fit(train, TAGS).describe(train[0]["features"].numpy(), "stain")
    assert h.shape == (3,) and np.isclose(h.sum(), 1.0)
    with pytest.raises(ValueError, match="classifier"):
        PatchBaseline("knn")
    with pytest.raises(RuntimeError, match="fit"):
        PatchBaseline().predict_proba(train)


def test_prediction_rows_match_the_module_format():
    probs = {"stain": np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]), "organ": np.eye(4)[:2]}
    labels = {"stain": np.array([0, -1]), "organ": np.array([1, 1])}
    names = {"stain": ["he", "ihc", "special"], "organ": ["a", "b", "c", "d"]}
    df = prediction_frame(["x", "y"], probs, labels, names)
    assert list(df.columns[:5]) == ["slide_id", "stain_label", "stain_pred", "stain_prob_he", "stain_prob_ihc"]
    assert df["stain_pred"].tolist() == ["he", "special"] and df["stain_label"].tolist() == ["he", ""]
    parsed = read_predictions(df.fillna(""))
    assert parsed["stain"][0] == names["stain"] and parsed["stain"][1].tolist() == [0]  # unknown dropped


def test_fit_dispatches_on_the_estimator_class_and_writes_predictions_metrics_confusion(bag_data: Path, tmp_path: Path):
    over = feature_cfg_overrides(bag_data, tmp_path / "runs")
    cfg = config.load("abmil", [*over, "method.name=patch_svm", "method.max_patches=8", "method.C=2.0"])
    assert build.method_kwargs(cfg)[0] is PatchSVM
    res = run.fit(cfg, run_dir=tmp_path / "run")
    df = pd.read_csv(tmp_path / "run" / "test_predictions.csv")
    assert {"slide_id", "label", "pred", "prob_class0", "prob_class1"} <= set(df.columns)
    assert 0.0 <= res.metrics["test/auroc"] <= 1.0 and "test/f1_macro" in res.metrics
    assert (tmp_path / "run" / "metrics.json").exists() and (tmp_path / "run" / "config.resolved.yaml").exists()
    assert (tmp_path / "run" / "confusion_label.png").exists()


def test_case_bags_give_one_row_per_case(tmp_path: Path):
    """data.bag_level=case: the patches of every slide of a case inherit the case's label; the
    predictions CSVs and metrics are per case."""
    from tests.conftest import make_case_bags

    manifest = make_case_bags(tmp_path / "cases", n_cases=12)
    over = feature_cfg_overrides(manifest, tmp_path / "runs", **{"data.bag_level": "case"})
    res = run.fit(config.load("abmil", [*over, "method.name=patch_lr", "method.max_patches=8"]), run_dir=tmp_path / "run")
    df = pd.read_csv(tmp_path / "run" / "test_predictions.csv", dtype=str)
    assert list(df.columns[:4]) == ["case_id", "slide_ids", "label", "pred"]
    cases = pd.read_csv(manifest, dtype=str).groupby("case_id")["slide_id"].apply(";".join)
    assert df["case_id"].is_unique and list(df["slide_ids"]) == list(cases[df["case_id"]])
    assert 0.0 <= res.metrics["test/auroc"] <= 1.0
