"""The ROI tree of a magnifying network over each test slide (MagNets' Figure 5 style).

For methods whose ``MILOutput.roi_tree`` describes a tree of regions (``magnet``):

    frames   [(B, N_d, 4)] level-0 square frames ``(x0, y0, x1, y1)`` per depth d = 0..L
             (depth 0: the slide padded to a square; node k's children are ``k·P + p``)
    theta    [(B, N_d, 3)] each depth-d node's crop ``(s, t_x, t_y)`` in its parent's frame
    levels   [(B, N_d)] pyramid level the node's I' was read at (depths 0..L-1)
    patches  (P_1, ..., P_L)

rank 0 writes, after testing, under ``<run folder>/<out_dir>/``:

    rois.csv             slide_id, node, depth, x0, y0, x1, y1, s, tx, ty, level: every node
    <slide_id>.png       the thumbnail with every ROI outlined in its depth's colour and named by
                         its path in the tree ("2.1.3": layer-1 child 2, its child 1, ...), next to
                         the leaves the classifier saw (``RoiTree.leaves``), with their names;
                         annotated lesions (GeoJSON, as the attention logger finds them) in black

and sends the figures to an attached W&B logger. Slides are opened from the batch's ``paths``.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch.distributed as dist

from wsi_lightning.analysis import viz
from wsi_lightning.errors import ArgumentError, WSIError
from wsi_lightning.ids import safe_slide_id
from wsi_lightning.registry import CALLBACKS

log = logging.getLogger(__name__)
COLOURS = ("#ffffff", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def node_names(patches: tuple[int, ...], depth: int) -> list[str]:
    """Names of the depth-d nodes in tree order: "slide" at depth 0, else 1-based child paths.

    (3, 2, 3) at depth 2 gives ["1.1", "1.2", "2.1", "2.2", "3.1", "3.2"].
    """
    names = ["slide"]
    for d in range(depth):
        names = [f"{n}.{p + 1}" if d else str(p + 1) for n in names for p in range(patches[d])]
    return names


@CALLBACKS.register("roi_tree")
class ROITree(L.Callback):
    """Write ``rois.csv`` and one ROI-tree figure per test slide.

    Args:
        max_slides: figures for at most this many test slides (sorted by id); null: all.
        thumb_max_size: longest side of the thumbnail in pixels.
        out_dir: output folder, relative to the run folder.
        log_images: send the figures to an attached W&B logger.
        annotations: outline annotated lesions when the manifest has them.
    """

    def __init__(self, max_slides: int | None = 8, thumb_max_size: int = 1024,
                 out_dir: str = "roi_tree", log_images: bool = True, annotations: bool = True) -> None:
        if max_slides is not None and (isinstance(max_slides, bool) or not isinstance(max_slides, int)
                                       or max_slides < 0):
            raise ArgumentError(f"roi_tree: max_slides={max_slides!r}; expected an integer >= 0 or null")
        if isinstance(thumb_max_size, bool) or not isinstance(thumb_max_size, int) or thumb_max_size < 16:
            raise ArgumentError(f"roi_tree: thumb_max_size={thumb_max_size!r}; expected an integer >= 16")
        if not isinstance(out_dir, str | os.PathLike) or not str(out_dir).strip():
            raise ArgumentError(f"roi_tree: out_dir={out_dir!r}; expected a non-empty folder name")
        for key, flag in (("log_images", log_images), ("annotations", annotations)):
            if not isinstance(flag, bool):
                raise ArgumentError(f"roi_tree: {key}={flag!r}; expected true or false")
        self.max_slides, self.thumb_max_size, self.out_dir = max_slides, thumb_max_size, str(out_dir)
        self.log_images, self.annotations = log_images, annotations
        self._slides: list[dict[str, Any]] = []
        self._warned = False

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._slides = []

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        tree = getattr(getattr(pl_module, "last_output", None), "roi_tree", None)
        if tree is None:
            if not self._warned and trainer.is_global_zero:
                log.warning("roi_tree: %s gives no MILOutput.roi_tree; no ROI figures are written",
                            type(pl_module).__name__)
            self._warned = True
            return
        leaves = tree.leaves
        paths, mpp = getattr(batch, "paths", None), getattr(batch, "mpp", None)
        for b, sid in enumerate(batch.slide_ids):
            self._slides.append({
                "slide_id": str(sid), "patches": tuple(tree.patches),
                "frames": [f[b].double().cpu().numpy() for f in tree.frames],  # (N_d, 4) each
                "theta": [t[b].double().cpu().numpy() for t in tree.theta],  # (N_d, 3), d >= 1
                "levels": [lv[b].cpu().numpy() for lv in tree.levels],  # (N_d,), d < L
                "leaves": None if leaves is None else
                (leaves[b].float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8),
                "path": None if paths is None else str(paths[b]),
                "mpp": None if mpp is None or math.isnan(float(mpp[b])) else float(mpp[b])})

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        slides = self._slides
        self._slides = []
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            parts: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(parts, slides)
            slides = [s for part in parts for s in part]
        if not trainer.is_global_zero or not slides:
            return
        slides = sorted({s["slide_id"]: s for s in slides}.values(), key=lambda s: s["slide_id"])
        out = Path(trainer.default_root_dir) / self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        self.write_csv(slides, out / "rois.csv")
        todo = slides if self.max_slides is None else slides[: self.max_slides]
        figures, failed = [], []
        for s in todo:
            try:
                sid = safe_slide_id(s["slide_id"], where=f"roi_tree: figure in {out}")  # names the file
                figures.append((sid, self.render(s, out / f"{sid}.png", trainer)))
            except (WSIError, OSError, ValueError) as e:
                failed.append(f"{s['slide_id']}: {type(e).__name__}: {e}")
        if failed:
            log.warning("roi_tree: no figure for %d slides (first: %s)", len(failed), failed[0])
        log.info("roi_tree: %d slides in %s, %d figures", len(slides), out / "rois.csv", len(figures))
        if figures and self.log_images:
            from lightning.pytorch.loggers import WandbLogger

            for lg in (lg for lg in trainer.loggers if isinstance(lg, WandbLogger)):
                lg.log_image(key=f"{self.out_dir}/figure", images=[str(p) for _, p in figures],
                             step=trainer.global_step, caption=[sid for sid, _ in figures])

    @staticmethod
    def write_csv(slides: list[dict[str, Any]], path: Path) -> None:
        """One row per node of every slide's tree, written atomically."""
        rows = []
        for s in slides:
            for d, frames in enumerate(s["frames"]):
                theta = s["theta"][d - 1] if d else np.tile([1.0, 0.0, 0.0], (len(frames), 1))
                level = s["levels"][d] if d < len(s["levels"]) else np.full(len(frames), -1)
                for name, f, t, lv in zip(node_names(s["patches"], d), frames, theta, level, strict=True):
                    rows.append({"slide_id": s["slide_id"], "node": name, "depth": d,
                                 "x0": f[0], "y0": f[1], "x1": f[2], "y1": f[3],
                                 "s": t[0], "tx": t[1], "ty": t[2], "level": int(lv) if lv >= 0 else None})
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        pd.DataFrame(rows).to_csv(tmp, index=False)
        os.replace(tmp, path)

    def render(self, s: dict[str, Any], path: Path, trainer: L.Trainer | None = None) -> Path:
        """The figure of one slide (see the module docstring)."""
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Rectangle

        from wsi_lightning.slides import SlideReader

        if s["path"] is None:
            raise ValueError("the batch has no slide paths")
        with SlideReader(s["path"], mpp=s["mpp"]) as reader:
            thumb, thumb_mpp = reader.thumbnail(max_size=self.thumb_max_size)
            k = reader.mpp / thumb_mpp  # thumbnail px per level-0 px
        leaves = s["leaves"]
        fig = Figure(figsize=(14 if leaves is not None else 8, 7.5), layout="constrained")
        left, right = fig.subfigures(1, 2, width_ratios=[1.25, 1]) if leaves is not None else (fig, None)
        ax = left.subplots()
        ax.set_facecolor("black")
        ax.imshow(thumb, extent=(-0.5, thumb.shape[1] - 0.5, thumb.shape[0] - 0.5, -0.5))
        root = s["frames"][0][0] * k
        ax.set_xlim(root[0] - 0.5, root[2] - 0.5)
        ax.set_ylim(root[3] - 0.5, root[1] - 0.5)
        ax.set_xticks([])
        ax.set_yticks([])
        polygons = self._polygons(s["slide_id"], trainer) if self.annotations else []
        if polygons:
            viz.draw_polygons(ax, polygons, k, color="black", linewidth=1.0)
        n_depth = len(s["frames"])
        for d in range(n_depth - 1, 0, -1):  # coarse ROIs on top (a frozen patch hides nothing)
            colour, lw = COLOURS[d % len(COLOURS)], max(2.4 - 0.5 * (d - 1), 0.6)
            for name, f in zip(node_names(s["patches"], d), s["frames"][d] * k, strict=True):
                ax.add_patch(Rectangle((f[0] - 0.5, f[1] - 0.5), f[2] - f[0], f[3] - f[1], fill=False,
                                       edgecolor=colour, linewidth=lw))
                ax.text(f[0], f[1], name, color=colour, fontsize=max(9 - 1.5 * d, 4), va="bottom",
                        ha="left", clip_on=True)
        handles = [Line2D([], [], color=COLOURS[d % len(COLOURS)], label=f"layer {d}") for d in range(1, n_depth)]
        ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.7)
        ax.set_title(f"{s['slide_id']}: ROI tree {'-'.join(map(str, s['patches']))}", fontsize=9)
        if right is not None:
            names = node_names(s["patches"], n_depth - 1)
            cols = math.ceil(math.sqrt(len(leaves)))
            axes = np.asarray(right.subplots(math.ceil(len(leaves) / cols), cols, squeeze=False)).reshape(-1)
            for i, a in enumerate(axes):
                a.set_axis_off()
                if i < len(leaves):
                    a.imshow(leaves[i])
                    a.set_title(names[i], fontsize=7)
            right.suptitle("leaves (classifier input)", fontsize=9)
        return viz.save_figure(fig, path)

    def _polygons(self, sid: str, trainer: L.Trainer | None) -> list[np.ndarray]:
        """Lesion outlines of the slide from the datamodule's manifest; [] when none."""
        from wsi_lightning.slides.annotations import lesion_outlines

        manifest = getattr(getattr(trainer, "datamodule", None), "manifest", None)
        if manifest is None or sid not in set(manifest.df["slide_id"]):
            return []
        return lesion_outlines(manifest.df.set_index("slide_id").loc[sid], manifest.source, "roi_tree")
