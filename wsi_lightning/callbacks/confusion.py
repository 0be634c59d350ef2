"""Normalised confusion matrix per tag after testing (Patch Transformer, Figure 2).

At the end of testing, rank 0 reads the ``test_predictions.csv`` MILModule wrote (in the
module's ``predictions_dir``, else the run folder), writes ``<run folder>/<out_dir>/
confusion_<tag>.png`` with :func:`wsi_lightning.analysis.confusion.confusion_matrices`, keeps the
matrices in ``callback.matrices`` and sends the images to an attached W&B logger.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

from wsi_lightning.analysis.confusion import NORMALIZE, PNG_NAME, confusion_matrices
from wsi_lightning.errors import ArgumentError
from wsi_lightning.registry import CALLBACKS

log = logging.getLogger(__name__)


@CALLBACKS.register("confusion_matrix")
class ConfusionMatrix(L.Callback):
    """Write a confusion matrix PNG per target of the test predictions.

    Args:
        normalize: ``true`` (rows sum to 1, the paper's Figure 2), ``pred``, ``all`` or ``none``.
        out_dir: output folder relative to the run folder (``.`` = the run folder itself).
        cmap: matplotlib colormap.
        log_images: send the images to an attached W&B logger.
    """

    def __init__(self, normalize: str = "true", out_dir: str = ".", cmap: str = "Blues",
                 log_images: bool = True) -> None:
        import matplotlib

        if normalize not in NORMALIZE:
            raise ArgumentError(f"confusion_matrix: normalize={normalize!r}; expected one of {list(NORMALIZE)}")
        if not isinstance(out_dir, str | os.PathLike) or not str(out_dir).strip():
            raise ArgumentError(f"confusion_matrix: out_dir={out_dir!r}; expected a folder name ('.' = run folder)")
        if cmap not in matplotlib.colormaps:
            raise ArgumentError(f"confusion_matrix: cmap={cmap!r} is not a matplotlib colormap; e.g. 'Blues', 'viridis'")
        if not isinstance(log_images, bool):
            raise ArgumentError(f"confusion_matrix: log_images={log_images!r}; expected true or false")
        self.normalize, self.out_dir, self.cmap, self.log_images = normalize, str(out_dir), cmap, log_images
        self.matrices: dict[str, np.ndarray] = {}

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_test_end runs after the module's on_test_epoch_end has written the predictions
        if not trainer.is_global_zero:
            return
        pdir = (getattr(pl_module, "hparams", {}) or {}).get("predictions_dir") or trainer.default_root_dir
        csv = Path(pdir) / "test_predictions.csv"
        if not csv.exists():
            log.warning("confusion_matrix: no %s (the module writes it when predictions_dir is set); "
                        "no confusion matrices", csv)
            return
        out = Path(trainer.default_root_dir) / self.out_dir
        self.matrices = confusion_matrices(csv, out, getattr(pl_module, "class_names", None), self.normalize, self.cmap)
        paths = {t: out / PNG_NAME.format(tag=t) for t in self.matrices}
        log.info("confusion_matrix: %s", ", ".join(str(p) for p in paths.values()))
        if self.log_images:
            self._log_wandb(trainer, paths)

    def _log_wandb(self, trainer: Any, paths: dict[str, Path]) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for lg in (lg for lg in trainer.loggers if isinstance(lg, WandbLogger)):
            lg.log_image(key="confusion", images=[str(p) for p in paths.values()], step=trainer.global_step,
                         caption=list(paths))
