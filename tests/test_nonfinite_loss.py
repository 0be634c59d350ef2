"""A NaN training loss stops the run naming the batch's slides (it used to train on, exit 0)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import feature_cfg_overrides
from wsi_lightning import config, run
from wsi_lightning.errors import WSIError
from wsi_lightning.methods.base import MILModule


def test_nan_loss_stops_training_naming_the_slides(bag_data: Path, tmp_path: Path, monkeypatch):
    real = MILModule.task_loss

    def nan_loss(self, out, bag):
        return {k: v * torch.nan for k, v in real(self, out, bag).items()}

    monkeypatch.setattr(MILModule, "task_loss", nan_loss)
    cfg = config.load("abmil", feature_cfg_overrides(bag_data, tmp_path / "runs"))
    with pytest.raises(WSIError, match=r"non-finite training loss .* on slides \['s\d+'\]"):
        run.fit(cfg)
