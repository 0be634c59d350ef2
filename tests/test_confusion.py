"""Confusion matrices from predictions CSVs, checked against scikit-learn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion

from wsi_lightning.analysis.confusion import confusion_matrices, confusion_matrix, read_predictions


@pytest.mark.parametrize("normalize", ["true", "pred", "all", "none"])
def test_matches_sklearn_on_random_labels(normalize: str):
    rng = np.random.default_rng(0)
    for c in (2, 3, 16):
        y, p = rng.integers(0, c, 200), rng.integers(0, c, 200)
        y[y == c - 1] = 0  # one class never occurs as truth: an all-zero row
        ref = sk_confusion(y, p, labels=list(range(c)), normalize=None if normalize == "none" else normalize)
        np.testing.assert_allclose(confusion_matrix(y, p, c, normalize), ref, atol=1e-12)
    with pytest.raises(ValueError, match="normalize"):
        confusion_matrix(y, p, c, "rows")


def multitag_csv(path: Path, n: int = 60, seed: int = 0) -> tuple[Path, dict[str, list[str]]]:
    rng = np.random.default_rng(seed)
    names = {"stain": ["HE", "IHC", "Special"], "organ": ["Liver", "Lung", "Bone", "Brain"]}
    df = pd.DataFrame({"slide_id": [f"s{i:03d}" for i in range(n)]})
    for t, cls in names.items():
        y, p = rng.integers(0, len(cls), n), rng.integers(0, len(cls), n)
        df[f"{t}_label"] = [cls[i] for i in y]
        df[f"{t}_pred"] = [cls[i] for i in p]
        for c in cls:  # the module's class order (not sorted)
            df[f"{t}_prob_{c}"] = rng.random(n)
    df.loc[3, "organ_label"] = ""  # unknown organ: left out of the organ matrix
    df.to_csv(path, index=False)
    return path, names


def test_per_tag_matrices_and_pngs_from_the_module_csv(tmp_path: Path):
    csv, names = multitag_csv(tmp_path / "test_predictions.csv")
    mats = confusion_matrices(csv)
    df = pd.read_csv(csv, keep_default_na=False)
    assert set(mats) == {"stain", "organ"}
    for t, cls in names.items():
        keep = df[f"{t}_label"] != ""
        ref = sk_confusion(df.loc[keep, f"{t}_label"], df.loc[keep, f"{t}_pred"], labels=cls, normalize="true")
        np.testing.assert_allclose(mats[t], ref)
        assert (tmp_path / f"confusion_{t}.png").stat().st_size > 1000
    assert read_predictions(csv)["organ"][1].shape == (59,)


def test_single_target_csv_and_errors(tmp_path: Path):
    df = pd.DataFrame({"slide_id": ["a", "b", "c"], "label": ["0", "1", "1"], "pred": ["0", "0", "1"],
                       "prob_0": [0.9, 0.6, 0.2], "prob_1": [0.1, 0.4, 0.8]})
    df.to_csv(tmp_path / "p.csv", index=False)
    m = confusion_matrices(tmp_path / "p.csv", tmp_path / "out", class_names={"tumour": ["0", "1"]})
    np.testing.assert_allclose(m["tumour"], [[1.0, 0.0], [0.5, 0.5]])
    assert (tmp_path / "out" / "confusion_tumour.png").exists()
    with pytest.raises(ValueError, match="_label"):
        confusion_matrices(df.drop(columns=["pred"]))
    with pytest.raises(ValueError, match="not in its classes"):
        confusion_matrices(df, class_names={"tumour": ["0", "2"]})
