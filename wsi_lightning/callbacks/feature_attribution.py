"""``FeatureAttribution``: the piece-wise interpretability analysis (Pirovano et al., 2020) of a
trained CHOWDER / attention-MIL model, at the end of testing or with ``wsi attribute RUN_DIR``.

Outputs in ``<run>/attribution/``:
    selected.csv       Q1 descriptor positions K_c and Q2 features k_c per class, with scores
                       (and each positive-class feature's orientation, +1 / -1)
    localisation.csv   localisation AUC of the feature-based heat-map (the paper's, and the
                       oriented one: see wsi_lightning.analysis.interpret) and of the tile scores, over
                       all test slides and over tumour slides only
    tiles.csv          per tile: slide, coords, ground truth, H, H_oriented, tile score
    heatmaps/<slide>.png    oriented H over the slide thumbnail, lesion outlines drawn
    montages/feature_<k>.png  the test tiles that activate each selected feature most
Metrics (``attribution/...``) are added to the run's ``metrics.json`` and logged to W&B.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch

from wsi_lightning.analysis import interpret as ip
from wsi_lightning.errors import ArgumentError
from wsi_lightning.registry import CALLBACKS
from wsi_lightning.slides.annotations import TILE_RULES, find_annotation, load_lesions, tile_labels

log = logging.getLogger(__name__)


@CALLBACKS.register("feature_attribution")
class FeatureAttribution(L.Callback):
    """Args:
        positive_class: the lesion class (heat-maps, localisation); default the last class name.
        top_positions: L, descriptor positions kept per class (Q1).
        top_features: l, tile features kept per class (Q2).
        gradient: ``grad_x_input`` or ``grad`` (see ``wsi_lightning.analysis.interpret``).
        tile_selection: ``auto | extremes | contribution | attention``.
        tiles_per_slide: tiles per slide for contribution / attention selection.
        tile_rule: tile ground truth: ``centre`` (tile centre in a lesion) or ``overlap``.
        min_overlap: lesion area fraction for ``overlap``.
        montage_tiles: tiles shown per selected feature (7 in the paper).
        max_heatmaps: cap on heat-map PNGs (None = every test slide).
        out_dir: folder inside the run folder.
    """

    def __init__(self, positive_class: str | None = None, top_positions: int = 2, top_features: int = 5,
                 gradient: str = "grad_x_input", tile_selection: str = "auto", tiles_per_slide: int = 10,
                 tile_rule: str = "centre", min_overlap: float = 0.5, montage_tiles: int = 7,
                 max_heatmaps: int | None = None, out_dir: str = "attribution") -> None:
        super().__init__()
        checks = {"gradient": (gradient, ip.GRADIENTS), "tile_selection": (tile_selection, ip.SELECTIONS),
                  "tile_rule": (tile_rule, TILE_RULES)}
        for name, (val, allowed) in checks.items():
            if val not in allowed:
                raise ArgumentError(f"FeatureAttribution: {name}='{val}'; expected one of {list(allowed)}")
        for name, val in (("top_positions", top_positions), ("top_features", top_features),
                          ("tiles_per_slide", tiles_per_slide), ("montage_tiles", montage_tiles)):
            if int(val) < 1:
                raise ArgumentError(f"FeatureAttribution: {name} must be >= 1, got {val}")
        if not 0 < min_overlap <= 1:
            raise ArgumentError(f"FeatureAttribution: min_overlap must be in (0, 1], got {min_overlap}")
        self.opts = dict(positive_class=positive_class, top_positions=int(top_positions),
                         top_features=int(top_features), gradient=gradient, tile_selection=tile_selection,
                         tiles_per_slide=int(tiles_per_slide), tile_rule=tile_rule,
                         min_overlap=float(min_overlap), montage_tiles=int(montage_tiles),
                         max_heatmaps=max_heatmaps)
        self.out_dir = out_dir
        self.metrics: dict[str, float] = {}

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if not ip.is_piecewise(pl_module.net):
            log.warning("FeatureAttribution: method %s has no piece-wise interface "
                        "(tile_logits/tile_scores/aggregate/classify); skipped", type(pl_module).__name__)
            return
        out = Path(trainer.default_root_dir) / self.out_dir
        was_training = pl_module.training
        pl_module.eval()
        with torch.inference_mode(False), torch.enable_grad():
            self.metrics = attribute(pl_module, trainer.datamodule, out, **self.opts)
        pl_module.train(was_training)
        for lg in trainer.loggers:
            if hasattr(lg, "log_metrics"):
                lg.log_metrics({k: v for k, v in self.metrics.items() if np.isfinite(v)})
            if hasattr(lg, "log_image"):
                pngs = sorted((out / "heatmaps").glob("*.png"))[:8] + sorted((out / "montages").glob("*.png"))
                if pngs:
                    lg.log_image(key="attribution", images=[str(p) for p in pngs])


def _test_bags(dm: Any, target: str) -> list[tuple[str, torch.Tensor, np.ndarray, int]]:
    labels = dict(zip(dm.manifest.df["slide_id"], dm.manifest.label_index(target).tolist(), strict=True))
    bags = []
    scaler = getattr(dm, "scaler", None)  # data.standardize: the features the model was trained on
    for sid in dm.splits["test"]:
        feats, coords = dm.store.read(sid)
        feats = feats if scaler is None else scaler(feats)
        bags.append((sid, torch.from_numpy(feats).float(), coords, labels[sid]))
    return bags


def attribute(module: L.LightningModule, dm: Any, out: Path, positive_class: str | None = None,
              top_positions: int = 2, top_features: int = 5, gradient: str = "grad_x_input",
              tile_selection: str = "auto", tiles_per_slide: int = 10, tile_rule: str = "centre",
              min_overlap: float = 0.5, montage_tiles: int = 7, max_heatmaps: int | None = None) -> dict[str, float]:
    """Run Q1, Q2, the feature heat-maps and the localisation AUCs on the test split."""
    net, target = module.net, module.targets[0]
    names = dm.class_names[target]
    pos = names.index(positive_class) if positive_class else len(names) - 1
    evals = ip.evaluate_slides(net, _test_bags(dm, target), target)
    rows, feats_by_class, pairs_by_class = [], {}, {}
    for c, cname in enumerate(names):
        a_desc = ip.descriptor_attribution(evals, c)
        k_pos = np.argsort(-a_desc)[:top_positions]
        pairs = ip.select_tiles(evals, c, k_pos, tile_selection, tiles_per_slide)
        a_feat = ip.tile_attribution(net, evals, pairs, gradient) if pairs else np.zeros(evals[0].features.shape[1])
        k_feat = np.argsort(-a_feat)[:top_features]
        feats_by_class[c], pairs_by_class[c] = k_feat, pairs
        rows += [{"class": cname, "question": "Q1 descriptor position", "rank": r, "index": int(i),
                  "score": float(a_desc[i])} for r, i in enumerate(k_pos)]
        rows += [{"class": cname, "question": "Q2 tile feature", "rank": r, "index": int(i),
                  "score": float(a_feat[i]), "n_tiles": len(pairs)} for r, i in enumerate(k_feat)]
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "selected.csv", index=False)

    signs = ip.feature_orientation(evals, pairs_by_class[pos], feats_by_class[pos])
    heat = ip.feature_heatmaps(evals, feats_by_class[pos])  # the paper's H
    heat_or = ip.feature_heatmaps(evals, feats_by_class[pos], signs)
    gt, has_gt, tile_rows = _ground_truth(dm, evals, pos, tile_rule, min_overlap)
    metrics, loc_rows = {}, []
    subsets = {"all": [i for i in range(len(evals)) if has_gt[i]],
               "tumour_slides": [i for i in range(len(evals)) if has_gt[i] and evals[i].label == pos]}
    for pname, pred in (("feature", heat), ("feature_oriented", heat_or), ("tile_scores", [e.scores for e in evals])):
        for sname, idx in subsets.items():
            auc = ip.localisation_auc([pred[i] for i in idx], [gt[i] for i in idx])
            metrics[f"attribution/loc_auc/{pname}/{sname}"] = auc
            loc_rows.append({"predictor": pname, "slides": sname, "auc": auc, "n_slides": len(idx),
                             "n_tiles": int(sum(len(gt[i]) for i in idx)),
                             "n_positive_tiles": int(sum(gt[i].sum() for i in idx)), "tile_rule": tile_rule})
    pd.DataFrame(loc_rows).to_csv(out / "localisation.csv", index=False)
    for i, e in enumerate(evals):
        tile_rows[i]["H"] = heat[i]
        tile_rows[i]["H_oriented"] = heat_or[i]
        tile_rows[i]["tile_score"] = e.scores
    pd.concat(tile_rows).to_csv(out / "tiles.csv", index=False)
    sel = pd.read_csv(out / "selected.csv")
    sel["orientation"] = np.nan
    q2 = (sel["class"] == names[pos]) & (sel["question"] == "Q2 tile feature")
    sel.loc[q2, "orientation"] = signs
    sel.to_csv(out / "selected.csv", index=False)
    _render(dm, evals, heat_or, feats_by_class[pos], out, max_heatmaps, montage_tiles)
    log.info("feature attribution: %s", {k: round(v, 4) for k, v in metrics.items()})
    return metrics


def _ground_truth(dm: Any, evals: list[ip.SlideEval], pos: int, rule: str, min_overlap: float):
    """Tile labels per slide; slides of the positive class without annotation have no GT."""
    df = dm.manifest.df.set_index("slide_id", drop=False)
    gt, has, tile_rows = [], [], []
    for e in evals:
        row = df.loc[e.slide_id]
        ann = find_annotation(row, dm.manifest.source)
        skip = bool(row.get("exclude_localisation", False)) if "exclude_localisation" in row else False
        extent = float(dm.store.attrs(e.slide_id)["extent_level0"])
        lesions = load_lesions(ann) if ann else []
        y = tile_labels(e.coords, extent, lesions, rule, min_overlap)
        gt.append(y)
        has.append(not skip and (ann is not None or e.label != pos))
        tile_rows.append(pd.DataFrame({"slide_id": e.slide_id, "tile": np.arange(len(y)), "x": e.coords[:, 0],
                                       "y": e.coords[:, 1], "gt": y.astype(int)}))
    return gt, has, tile_rows


def _render(dm: Any, evals: list[ip.SlideEval], heat: list[np.ndarray], features: np.ndarray,
            out: Path, max_heatmaps: int | None, montage_tiles: int) -> None:
    """Heat-map PNGs over thumbnails and per-feature montages; skipped without slide files."""
    from wsi_lightning.analysis import viz

    df = dm.manifest.df.set_index("slide_id", drop=False)
    if not all(df.loc[e.slide_id, "path"] and Path(df.loc[e.slide_id, "path"]).exists() for e in evals):
        log.warning("FeatureAttribution: slide files not given in the manifest ('path') or not found; "
                    "heat-map and montage PNGs skipped (the attribution CSVs are written)")
        return
    from rich.progress import track

    from wsi_lightning.slides import SlideReader

    chosen = evals if max_heatmaps is None else evals[:max_heatmaps]
    for i, e in enumerate(track(chosen, description="attribution heat-maps", transient=True)):
        row, a = df.loc[e.slide_id], dm.store.attrs(e.slide_id)
        with SlideReader(row["path"], mpp=_mpp(row)) as r:
            thumb, thumb_mpp = r.thumbnail(max_size=1024)
            scale = r.mpp / thumb_mpp  # thumbnail px per level-0 px
        ann = find_annotation(row, dm.manifest.source)
        polys = [les.exterior for les in load_lesions(ann)] if ann else None
        overlay = viz.tile_heatmap(heat[i], e.coords, float(a["extent_level0"]), thumb, scale)
        viz.save_heatmap_figure(out / "heatmaps" / f"{e.slide_id}.png", thumb, overlay,
                                f"{e.slide_id} ({dm.class_names[dm.manifest.targets[0]][e.label]}): "
                                "feature-based heat-map H (oriented)", "H", polygons_level0=polys, thumb_scale=scale)
    for k in features:
        best = sorted(((float(e.features[j, int(k)]), i, j) for i, e in enumerate(evals)
                       for j in np.argsort(-e.features[:, int(k)].numpy())[:montage_tiles]), reverse=True)
        tiles, labels = [], []
        for v, i, j in best[:montage_tiles]:
            e = evals[i]
            row, a = df.loc[e.slide_id], dm.store.attrs(e.slide_id)
            with SlideReader(row["path"], mpp=_mpp(row)) as r:
                size = int(a["tile_size"])
                tiles.append(r.read_at_mpp(tuple(int(c) for c in e.coords[j]), (size, size), float(a["mpp"])))
            labels.append(f"{e.slide_id} {v:.2f}")
        viz.tile_montage(tiles, labels, ncols=montage_tiles, path=out / "montages" / f"feature_{int(k)}.png",
                         title=f"feature {int(k)}: highest activations")


def _mpp(row: pd.Series) -> float | None:
    v = row.get("mpp", np.nan)
    return None if pd.isna(v) else float(v)
