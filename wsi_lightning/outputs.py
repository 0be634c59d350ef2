"""What a finished run or prediction folder holds, read back in one place: for ``wsi export-qupath``,
``wsi view`` and ``wsi runs``.

A **fit** folder (``runs/<exp>/<timestamp>``, from ``wsi fit``) and a **predict** folder (from
``wsi predict``) share the layout below; only the predictions' file name differs:

    config.resolved.yaml          the run's config (a predict folder: with its manifest and store)
    test_predictions.csv          fit: slide_id, label, pred, prob_<class>, ... (the test split)
    predictions.csv               predict: the same columns plus ``checkpoint``
    attention/attention.csv       slide_id, map, tile, x, y, extent, attention, normalised
                                  (the attention logger; x, y, extent in level-0 pixels)
    attribution/tiles.csv         feature attribution (CHOWDER / attention MIL), when run

:func:`load_outputs` finds the manifest (the demo's generated one for demo runs) and the
feature store the run used, so a reader can open each slide and its tile geometry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from wsi_lightning.errors import WSIError
from wsi_lightning.manifest import Manifest

PREDICTIONS = ("predictions.csv", "test_predictions.csv")  # predict folder first
ATTENTION = Path("attention") / "attention.csv"
ATTRIBUTION = Path("attribution") / "tiles.csv"  # slide_id, tile, x, y, gt, H, H_oriented, tile_score


@dataclass
class RunOutputs:
    """A run's outputs (see the module docstring).

    Attributes:
        folder: the fit or predict folder.
        cfg: its resolved config.
        manifest: the manifest its slides came from (paths resolved; labels may be empty).
        store: the feature store folder (None for methods that read slides on the fly).
        predictions: one row per slide (``slide_id``, ``pred``, ``prob_<class>``, ...; a
            patient-level run's case rows are repeated for each of the case's slides).
        attention: one row per (slide, map, tile), or None when the run logged no maps.
        class_names: {target: class names}, in the model's output order.
        attribution: feature attribution per tile (``attribution/tiles.csv``: ``slide_id, tile,
            x, y, gt, H, H_oriented, tile_score``), or None when it was not run.
    """

    folder: Path
    cfg: DictConfig
    manifest: Manifest
    store: Path | None
    predictions: pd.DataFrame
    attention: pd.DataFrame | None
    class_names: dict[str, list[str]]
    attribution: pd.DataFrame | None = None

    @property
    def slide_ids(self) -> list[str]:
        return sorted(self.predictions["slide_id"].astype(str))

    def slide_row(self, slide_id: str) -> pd.Series:
        """The manifest row of ``slide_id`` (``path``, ``mpp``, optional ``annotation``, ...)."""
        rows = self.manifest.df[self.manifest.df["slide_id"] == slide_id]
        if rows.empty:
            raise WSIError(f"{self.folder}: slide '{slide_id}' is in the predictions but not in the "
                           f"manifest {self.manifest.source}")
        return rows.iloc[0]

    def tiles(self, slide_id: str) -> pd.DataFrame:
        """The attention rows of one slide (every map), empty when there are none."""
        if self.attention is None:
            return pd.DataFrame(columns=["slide_id", "map", "tile", "x", "y", "extent", "attention", "normalised"])
        return self.attention[self.attention["slide_id"] == slide_id]


def predictions_file(folder: Path) -> Path:
    """``predictions.csv`` (predict folder) or ``test_predictions.csv`` (fit folder)."""
    for name in PREDICTIONS:
        if (folder / name).is_file():
            return folder / name
    raise WSIError(f"{folder}: no {' or '.join(PREDICTIONS)}; pass a finished run folder "
                   "(runs/<exp>/<timestamp>) or a wsi predict output folder")


def load_outputs(folder: str | Path) -> RunOutputs:
    """Read a fit or predict folder; a WSIError names what is missing and what to pass instead."""
    from wsi_lightning import build
    from wsi_lightning.manifest import load_manifest

    folder = Path(folder)
    cfg_path = folder / "config.resolved.yaml"
    if not cfg_path.is_file():
        raise WSIError(f"{folder}: no config.resolved.yaml; pass a run folder (runs/<exp>/<timestamp>) "
                       "or a wsi predict output folder")
    cfg = OmegaConf.load(cfg_path)
    preds = pd.read_csv(predictions_file(folder), dtype={"slide_id": str, "case_id": str, "slide_ids": str})
    if "slide_id" not in preds.columns and "slide_ids" in preds.columns:  # patient-level bags: a row per case
        preds = preds.assign(slide_id=preds["slide_ids"].str.split(";")).explode("slide_id", ignore_index=True)
    targets = list(cfg.data.tag_cols) if cfg.data.task == "multitag" else [cfg.data.label_col]
    classes = classes_from_columns(preds, targets)
    manifest = load_manifest(build.manifest_path(cfg), targets, classes, check_files=False, allow_missing=True,
                             require_labels=False)
    kind = build.method_input_kind(cfg)
    store = None if build.datamodule_class(cfg, kind).layout is None else build.store_path(cfg)
    att_path = folder / ATTENTION
    attention = pd.read_csv(att_path, dtype={"slide_id": str, "map": str}) if att_path.is_file() else None
    attr_path = folder / ATTRIBUTION
    attribution = pd.read_csv(attr_path, dtype={"slide_id": str}) if attr_path.is_file() else None
    return RunOutputs(folder, cfg, manifest, store, preds, attention, classes, attribution)


def classes_from_columns(preds: pd.DataFrame, targets: list[str]) -> dict[str, list[str]]:
    """{target: class names} in output order, from the ``[<target>_]prob_<class>`` columns."""
    out = {}
    for t in targets:
        pre = "prob_" if len(targets) == 1 else f"{t}_prob_"
        out[t] = [c[len(pre):] for c in preds.columns if c.startswith(pre)]
    return out
