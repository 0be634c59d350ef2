"""confusion_matrix callback: arguments checked up front, PNGs per tag at test end, W&B images."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion

from wsi_lightning.callbacks.confusion import ConfusionMatrix
from wsi_lightning.data.bags import BagDataModule
from wsi_lightning.errors import ArgumentError
from wsi_lightning.manifest import load_manifest
from wsi_lightning.methods.abmil import ABMIL
from wsi_lightning.registry import CALLBACKS


def test_registered_and_arguments_checked():
    assert CALLBACKS.get("confusion_matrix") is ConfusionMatrix
    for bad in ({"normalize": "rows"}, {"out_dir": ""}, {"cmap": "nope"}, {"log_images": "yes"}):
        with pytest.raises(ArgumentError):
            ConfusionMatrix(**bad)


def test_writes_one_png_per_tag_at_test_end(bag_data: Path, tmp_path: Path):
    df = pd.read_csv(bag_data)
    df["organ"] = [["liver", "lung", "bone"][i % 3] for i in range(len(df))]
    df.to_csv(bag_data, index=False)
    m = load_manifest(bag_data, ["label", "organ"], check_files=False)
    dm = BagDataModule(m, bag_data.parent / "store", split={"val": 0.25, "test": 0.25}, batch_size=2)
    model = ABMIL(in_dim=16, num_classes=m.num_classes, class_names=m.classes, embed_dim=8, attn_dim=4,
                  predictions_dir=str(tmp_path))
    cb = ConfusionMatrix(out_dir="figs", log_images=False)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), callbacks=[cb])
    trainer.test(model, datamodule=dm, verbose=False)
    pred = pd.read_csv(tmp_path / "test_predictions.csv", dtype=str)
    assert set(cb.matrices) == {"label", "organ"}
    for t in ("label", "organ"):
        ref = sk_confusion(pred[f"{t}_label"], pred[f"{t}_pred"], labels=m.classes[t], normalize="true")
        np.testing.assert_allclose(cb.matrices[t], ref)
        assert (tmp_path / "figs" / f"confusion_{t}.png").exists()


def test_sends_images_to_wandb(tmp_path: Path):
    from lightning.pytorch.loggers import WandbLogger

    calls = []

    class Recorder(WandbLogger):
        def log_image(self, key, images, step=None, **kwargs):
            calls.append((key, images, step, kwargs.get("caption")))

    paths = {"stain": tmp_path / "confusion_stain.png"}
    trainer = SimpleNamespace(loggers=[Recorder(offline=True, save_dir=str(tmp_path))], global_step=7)
    ConfusionMatrix()._log_wandb(trainer, paths)
    assert calls == [("confusion", [str(paths["stain"])], 7, ["stain"])]
