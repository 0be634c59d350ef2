"""GPU paths (CUDA, AMP). Skipped on machines without CUDA; run with `make test-all` on a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import feature_cfg_overrides
from wsi_lightning import config, run
from wsi_lightning.features.backbones import build_backbone

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_fit_with_amp_on_gpu(bag_data: Path, tmp_path: Path, precision: str):
    over = feature_cfg_overrides(bag_data, tmp_path / "runs", **{
        "trainer.accelerator": "gpu", "trainer.precision": precision, "trainer.max_epochs": 3})
    res = run.fit(config.load("abmil", over))
    assert 0.0 <= res.metrics["test/auroc"] <= 1.0


def test_backbone_on_gpu_matches_cpu():
    bb = build_backbone("demo_cnn")
    x = torch.rand(4, 3, 64, 64)
    with torch.inference_mode():
        cpu = bb(x)
        gpu = bb.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(cpu, gpu, rtol=1e-3, atol=1e-3)
