"""Two-step patch-based baselines: "Patchbased-LR" and "Patchbased-SVM" of Li et al., "Patch
Transformer for multi-tagging whole slide histopathology images", MICCAI 2019, Table 2, after
Hou et al., "Patch-based convolutional neural network for whole slide tissue image
classification", CVPR 2016 (docs/methods.md §1.7).

Not a Lightning method: scikit-learn on feature bags. ``patch_lr`` / ``patch_svm`` are registered
:class:`~wsi_lightning.methods.base.SlideEstimator` subclasses; ``run.fit`` dispatches on that class.

1. Patch level, per tag: every patch inherits its slide's tag; a multinomial logistic regression
   on standardised patch features is fitted on at most ``max_patches`` random patches per
   training slide (the paper samples M = 32 per slide).
2. Slide level, per tag: the patch probabilities of all patches of a slide are aggregated into a
   slide descriptor (``aggregate``: ``mean`` of the probabilities, ``hist`` = normalised
   histogram of the patch argmax, as Hou et al., or ``hist_mean`` = both, 2C values), and a
   ``LogisticRegression`` (``classifier=lr``) or ``SVC`` (``classifier=svm``) per tag classifies it.

API::

    model = PatchBaseline(classifier="svm").fit(train_items, num_classes)
    ids, probs = model.predict_proba(test_items)          # probs: {tag: (S, C)}
    metrics = evaluate(PatchLR(), datamodule, run_dir)  # fit on train, write val/test CSVs
    result = run.fit(cfg)                                 # method.name: patch_lr | patch_svm

Items are what ``BagDataset[i]`` returns: ``{"features": (N, D), "labels": {tag: int},
"slide_id": str}`` (with ``data.bag_level=case``, what ``CaseBagDataset[i]`` returns: one item
per case, whose patches inherit the case's tags). ``evaluate`` writes
``{val,test}_predictions.csv`` in MILModule's format (a row per slide, or per case; so
:mod:`wsi_lightning.analysis.confusion` and the tables read them) and returns the same metric
keys (``test/f1_macro``, ``test/<tag>/f1_micro``...).

Deviations from paper:
    - Hou et al.'s patch level is a CNN trained with an EM patch selection; here it is a linear
      model on the shared patch features (the paper shares the ResNet-50 across baselines).
    - SVM "probabilities" are the softmax of the one-vs-rest decision values (no Platt scaling,
      which needs several slides per class); they rank like the decision values.
    - The slide-level classifier is trained on the patch classifier's outputs on the same
      training slides (all their patches), as a two-step method without a held-out split does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsi_lightning.methods.base import SlideEstimator, prediction_rows
from wsi_lightning.methods.base import prediction_frame as rows_frame
from wsi_lightning.registry import METHODS

log = logging.getLogger(__name__)

CLASSIFIERS = ("lr", "svm")
AGGREGATES = ("hist", "mean", "hist_mean")


def _items(items: Iterable[dict]) -> list[tuple[str, np.ndarray, dict[str, int]]]:
    out = []
    for it in items:
        f = it["features"]
        f = f.float().numpy() if hasattr(f, "numpy") else np.asarray(f, dtype=np.float32)
        out.append((str(it["slide_id"]), f.reshape(len(f), -1), {t: int(v) for t, v in it["labels"].items()}))
    return out


def _full_proba(p: np.ndarray, seen: np.ndarray, n_classes: int) -> np.ndarray:
    """(S, len(seen)) probabilities over the classes a model saw -> (S, C), 0 for unseen classes."""
    out = np.zeros((len(p), n_classes))
    out[:, seen] = p
    return out


class PatchBaseline(SlideEstimator):
    """Patch-level LR per tag, then a slide-level LR or SVM per tag on aggregated predictions.

    Args:
        classifier: slide-level classifier, ``lr`` or ``svm`` (null: the registered
            subclass's, :class:`PatchLR` / :class:`PatchSVM`).
        aggregate: slide descriptor, ``hist``, ``mean`` or ``hist_mean``.
        max_patches: random patches per training slide for the patch classifier (null: all).
        patch_C: inverse L2 strength of the patch-level logistic regression.
        C: inverse regularisation strength of the slide-level classifier.
        kernel: SVC kernel (``classifier=svm``).
        max_iter: iteration cap of the logistic regressions.
        seed: patch sampling and solver seed.
    """

    default_classifier = "lr"

    def __init__(self, classifier: str | None = None, aggregate: str = "hist_mean", max_patches: int | None = 32,
                 patch_C: float = 1.0, C: float = 1.0, kernel: str = "rbf", max_iter: int = 1000,
                 seed: int = 0) -> None:
        classifier = classifier or self.default_classifier
        if classifier not in CLASSIFIERS:
            raise ValueError(f"patch baseline: classifier={classifier!r}; expected one of {list(CLASSIFIERS)}")
        if aggregate not in AGGREGATES:
            raise ValueError(f"patch baseline: aggregate={aggregate!r}; expected one of {list(AGGREGATES)}")
        if max_patches is not None and max_patches < 1:
            raise ValueError(f"patch baseline: max_patches={max_patches}; expected >= 1 or null (all)")
        self.classifier, self.aggregate, self.max_patches = classifier, aggregate, max_patches
        self.patch_C, self.C, self.kernel, self.max_iter, self.seed = patch_C, C, kernel, max_iter, seed
        self.num_classes: dict[str, int] = {}
        self.patch_models: dict[str, Any] = {}
        self.slide_models: dict[str, Any] = {}

    def evaluate(self, datamodule: Any, run_dir: str | Path) -> dict[str, float]:
        """See :func:`evaluate` (confusion matrices included)."""
        return evaluate(self, datamodule, run_dir)

    # ----------------------------------------------------------------- step 1: patches
    def _fit_patches(self, data: list, tag: str) -> Any:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        rng = np.random.default_rng(self.seed)
        xs, ys = [], []
        for _, f, lab in data:
            if lab[tag] < 0:
                continue
            keep = f if self.max_patches is None or len(f) <= self.max_patches else \
                f[rng.choice(len(f), self.max_patches, replace=False)]
            xs.append(keep)
            ys.append(np.full(len(keep), lab[tag]))
        if not xs:
            raise ValueError(f"patch baseline: no training slide has a label for tag '{tag}'")
        y = np.concatenate(ys)
        if len(np.unique(y)) < 2:
            return _Constant(int(y[0]))
        lr = LogisticRegression(C=self.patch_C, max_iter=self.max_iter, random_state=self.seed)
        return make_pipeline(StandardScaler(), lr).fit(np.concatenate(xs), y)

    def describe(self, features: np.ndarray, tag: str) -> np.ndarray:
        """Slide descriptor of one bag for ``tag``: (N, D) patch features -> (C,) or (2C,)."""
        c = self.num_classes[tag]
        m = self.patch_models[tag]
        p = _full_proba(m.predict_proba(features), m.classes_, c)  # (N, C)
        hist = np.bincount(p.argmax(1), minlength=c) / max(len(p), 1)  # (C,)
        parts = {"hist": [hist], "mean": [p.mean(0)], "hist_mean": [hist, p.mean(0)]}[self.aggregate]
        return np.concatenate(parts)

    # ----------------------------------------------------------------- step 2: slides
    def _slide_model(self) -> Any:
        from sklearn.linear_model import LogisticRegression
        from sklearn.svm import SVC

        if self.classifier == "svm":
            return SVC(C=self.C, kernel=self.kernel, decision_function_shape="ovr", random_state=self.seed)
        return LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed)

    def fit(self, items: Iterable[dict], num_classes: dict[str, int]) -> PatchBaseline:
        """Fit both steps on training bags.

        Args:
            items: training bags (``features`` (N, D), ``labels`` {tag: int, -1 unknown}, ``slide_id``).
            num_classes: {tag: C}.
        """
        data = _items(items)
        self.num_classes = dict(num_classes)
        for tag in self.num_classes:
            self.patch_models[tag] = self._fit_patches(data, tag)
            rows = [(self.describe(f, tag), lab[tag]) for _, f, lab in data if lab[tag] >= 0]
            x, y = np.stack([r[0] for r in rows]), np.array([r[1] for r in rows])
            self.slide_models[tag] = _Constant(int(y[0])) if len(np.unique(y)) < 2 else self._slide_model().fit(x, y)
            log.info("patch baseline (%s): tag '%s' fitted on %d slides", self.classifier, tag, len(y))
        return self

    def predict_proba(self, items: Iterable[dict]) -> tuple[list[str], dict[str, np.ndarray]]:
        """Slide ids and {tag: (S, C)} class probabilities (SVM: softmax of decision values)."""
        if not self.slide_models:
            raise RuntimeError("patch baseline: call fit() before predict_proba()")
        data = _items(items)
        probs = {}
        for tag, c in self.num_classes.items():
            x = np.stack([self.describe(f, tag) for _, f, _ in data])
            probs[tag] = _slide_proba(self.slide_models[tag], x, c)
        return [sid for sid, _, _ in data], probs


class _Constant:
    """A 'classifier' for a tag with one class in training: always that class."""

    def __init__(self, label: int) -> None:
        self.classes_ = np.array([label])

    def fit(self, x: np.ndarray, y: np.ndarray) -> _Constant:
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return np.ones((len(x), 1))


def _slide_proba(model: Any, x: np.ndarray, n_classes: int) -> np.ndarray:
    """(S, C) probabilities of a fitted slide-level model (softmax of decision values for SVC)."""
    if not hasattr(model, "predict_proba"):  # SVC without Platt scaling
        d = model.decision_function(x)
        d = np.stack([np.zeros_like(d), d], 1) if d.ndim == 1 else d  # binary: (S,) -> (S, 2)
        e = np.exp(d - d.max(1, keepdims=True))
        return _full_proba(e / e.sum(1, keepdims=True), model.classes_, n_classes)
    return _full_proba(model.predict_proba(x), model.classes_, n_classes)


# --------------------------------------------------------------------- runs
def prediction_frame(ids: list[str], probs: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                     class_names: dict[str, list[str]], slides: list[list[str]] | None = None) -> pd.DataFrame:
    """:func:`~wsi_lightning.methods.base.prediction_rows` as a frame sorted by slide (by case,
    with each case's ``slides``, for patient-level bags)."""
    return rows_frame(prediction_rows(ids, probs, labels, class_names, slides))


def evaluate(estimator: PatchBaseline, datamodule: Any, run_dir: str | Path, confusion: bool = True) -> dict[str, float]:
    """Fit on the train split of a set-up BagDataModule, predict val and test.

    Writes ``<run_dir>/{val,test}_predictions.csv`` (and ``confusion_<tag>.png`` with
    ``confusion``). Returns ``{"val/...", "test/...": value}`` with TaskMetrics' keys.
    """
    import torch

    from wsi_lightning.analysis.metrics import TaskMetrics

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ds = datamodule.datasets
    model = estimator.fit(ds["train"], datamodule.num_classes)
    metrics: dict[str, float] = {}
    for stage in ("val", "test"):
        if stage not in ds or len(ds[stage]) == 0:
            continue
        items = [ds[stage][i] for i in range(len(ds[stage]))]
        ids, probs = model.predict_proba(items)
        labels = {t: np.array([it["labels"][t] for it in items]) for t in probs}
        slides = [it["slides"] for it in items] if items and "slides" in items[0] else None  # case bags
        prediction_frame(ids, probs, labels, datamodule.class_names, slides).to_csv(
            run_dir / f"{stage}_predictions.csv", index=False)
        tm = TaskMetrics(datamodule.num_classes)
        tm.update({t: torch.from_numpy(p).float() for t, p in probs.items()},
                  {t: torch.from_numpy(y) for t, y in labels.items()})
        metrics.update({k: float(v) for k, v in tm.compute(stage).items()})
    if confusion and (run_dir / "test_predictions.csv").exists():
        from wsi_lightning.analysis.confusion import confusion_matrices

        confusion_matrices(run_dir / "test_predictions.csv", run_dir, class_names=datamodule.class_names)
    return metrics


@METHODS.register("patch_lr")
class PatchLR(PatchBaseline):
    """Patchbased-LR: a slide-level logistic regression per tag."""

    default_classifier = "lr"


@METHODS.register("patch_svm")
class PatchSVM(PatchBaseline):
    """Patchbased-SVM: a slide-level SVC per tag."""

    default_classifier = "svm"
