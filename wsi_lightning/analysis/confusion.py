"""Normalised confusion matrices per tag from a run's ``test_predictions.csv`` (Patch
Transformer, Li et al. 2019, Figure 2).

The CSV is MILModule's: ``slide_id`` and, per target, ``label``, ``pred`` and ``prob_<class>``
columns (prefixed ``<tag>_`` for multi-tag tasks). The class order is the order of the
``prob_`` columns (the model's class order); slides with an unknown label are left out.
Row i of a matrix is true class i; with ``normalize="true"`` each row sums to 1 (a class with no
slide is a row of zeros), as ``sklearn.metrics.confusion_matrix(normalize="true")``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

NORMALIZE = ("true", "pred", "all", "none")
PNG_NAME = "confusion_{tag}.png"


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, normalize: str = "true") -> np.ndarray:
    """Confusion matrix of class indices.

    Args:
        y_true: (S,) int true classes in [0, n_classes).
        y_pred: (S,) int predicted classes.
        n_classes: C.
        normalize: ``true`` (rows sum to 1), ``pred`` (columns), ``all`` or ``none`` (counts).

    Returns:
        (C, C) float64 matrix, row = true class, column = predicted class.
    """
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize={normalize!r}; expected one of {list(NORMALIZE)}")
    cm = np.zeros((n_classes, n_classes))
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1.0)
    denom = {"true": cm.sum(1, keepdims=True), "pred": cm.sum(0, keepdims=True), "all": cm.sum(),
             "none": np.ones(1)}[normalize]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num(cm / denom)


def read_predictions(predictions: str | Path | pd.DataFrame,
                     class_names: dict[str, list[str]] | None = None) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
    """Per target: (class names, true indices (S,), predicted indices (S,)) of the labelled slides.

    Args:
        predictions: a ``*_predictions.csv`` path or its DataFrame.
        class_names: {target: classes}; default: from the ``prob_`` columns. For a single-target
            CSV (no prefix) the target is named after this mapping's only key, else ``label``.
    """
    df = predictions if isinstance(predictions, pd.DataFrame) else pd.read_csv(predictions, dtype=str, keep_default_na=False)
    prefixes = [c[: -len("label")] for c in df.columns if c.endswith("label") and f"{c[:-len('label')]}pred" in df.columns]
    if not prefixes:
        raise ValueError(f"{predictions if not isinstance(predictions, pd.DataFrame) else 'predictions'}: no "
                         "'<tag>_label' / '<tag>_pred' (or 'label' / 'pred') columns; is it a MILModule predictions CSV?")
    out = {}
    for pre in prefixes:
        tag = pre[:-1] if pre else (next(iter(class_names)) if class_names and len(class_names) == 1 else "label")
        names = (class_names or {}).get(tag) or [c[len(pre) + 5:] for c in df.columns if c.startswith(f"{pre}prob_")]
        lab, pred = df[f"{pre}label"].astype(str), df[f"{pre}pred"].astype(str)
        known = (lab != "") & (lab.str.lower() != "nan")
        if not names:
            names = sorted(set(lab[known]) | set(pred[known]))
        index = {n: i for i, n in enumerate(map(str, names))}
        bad = sorted((set(lab[known]) | set(pred[known])) - set(index))
        if bad:
            raise ValueError(f"predictions for '{tag}' hold class(es) {bad} not in its classes {list(index)}")
        out[tag] = (list(map(str, names)), lab[known].map(index).to_numpy(np.int64), pred[known].map(index).to_numpy(np.int64))
    return out


def plot_confusion(matrix: np.ndarray, names: list[str], title: str, path: str | Path, cmap: str = "Blues",
                   support: np.ndarray | None = None, fmt: str = ".2f") -> Path:
    """Draw a (C, C) matrix with its values in the cells (``fmt``) and save it as PNG; ``support``
    (C,) slide counts per true class are added to the row names."""
    from matplotlib.figure import Figure

    from wsi_lightning.analysis.viz import save_figure

    c = len(names)
    size = max(4.0, 0.55 * c + 2.5)
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(matrix, cmap=cmap, vmin=0.0, vmax=max(1.0, float(matrix.max())) if matrix.size else 1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    rows = [f"{n} ({int(s)})" for n, s in zip(names, support, strict=True)] if support is not None else names
    ax.set_xticks(range(c), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(c), rows, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true (slides)", title=title)
    font = 8 if c <= 8 else 6
    for i in range(c):
        for j in range(c):
            v = matrix[i, j]
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=font,
                    color="white" if v > 0.5 * max(float(matrix.max()), 1e-12) else "black")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def confusion_matrices(predictions: str | Path | pd.DataFrame, out_dir: str | Path | None = None,
                       class_names: dict[str, list[str]] | None = None, normalize: str = "true",
                       cmap: str = "Blues") -> dict[str, np.ndarray]:
    """Normalised confusion matrix of every target of a predictions CSV, saved as PNGs.

    Args:
        predictions: ``test_predictions.csv`` (path or DataFrame).
        out_dir: where ``confusion_<tag>.png`` are written (default: the CSV's folder; no
            images when ``predictions`` is a DataFrame and ``out_dir`` is None).
        class_names: {target: classes}; default: from the CSV (see :func:`read_predictions`).
        normalize: ``true`` | ``pred`` | ``all`` | ``none``.
        cmap: matplotlib colormap.

    Returns:
        {tag: (C, C) matrix}, row = true class.
    """
    if out_dir is None and not isinstance(predictions, pd.DataFrame):
        out_dir = Path(predictions).parent
    out: dict[str, np.ndarray] = {}
    for tag, (names, y, p) in read_predictions(predictions, class_names).items():
        out[tag] = confusion_matrix(y, p, len(names), normalize)
        if out_dir is not None:
            support = np.bincount(y, minlength=len(names))
            how = {"true": "rows normalised", "pred": "columns normalised", "all": "normalised", "none": "counts"}[normalize]
            title = f"{tag}: {how} ({len(y)} slides)"
            plot_confusion(out[tag], names, title, Path(out_dir) / PNG_NAME.format(tag=tag), cmap, support,
                           ".0f" if normalize == "none" else ".2f")
    return out
