"""Foundation-model presets and timm's own loaders (hf-hub:, local-dir:), offline.

Each preset builds with random weights at its card's output dimension (on the meta device: no
memory for a billion parameters). A tiny model of each preset's architecture family is saved
with timm's ``save_for_hf`` and loaded back, through the preset (``features.weights``) and
through ``local-dir:`` with the preset's arguments, strictly: a model built without the card's
constructor arguments refuses the file. Phikon-v2 (transformers) has its own: test_phikon.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wsi_lightning.errors import ConfigError
from wsi_lightning.features import FOUNDATION_MODELS
from wsi_lightning.features.backbones import build_backbone
from wsi_lightning.features.extract import autocast_dtype

# a tiny member of each architecture family: width, depth and heads shrunk, everything else the card's
TINY = {"depth": 1, "embed_dim": 48, "num_heads": 2}
TIMM = sorted(n for n, s in FOUNDATION_MODELS.items() if s.library == "timm")  # phikon_v2: test_phikon.py


def tiny_args(name: str) -> dict:
    spec = FOUNDATION_MODELS[name]
    patch = spec.kwargs.get("patch_size", 14)
    return {**TINY, "img_size": 2 * patch}


@pytest.mark.parametrize("name", sorted(FOUNDATION_MODELS))
def test_every_preset_builds_with_its_cards_output_dim(name: str):
    spec = FOUNDATION_MODELS[name]
    with torch.device("meta"):
        b = build_backbone(name, pretrained=False)
        out = b(torch.zeros(2, 3, spec.input_px, spec.input_px))
    assert tuple(out.shape) == (2, spec.dim) and b.dim == spec.dim
    assert b.mean == spec.mean and b.std == spec.std and b.input_px == spec.input_px
    assert spec.card.startswith("https://huggingface.co/") and spec.licence


def _save_tiny(name: str, folder: Path) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny random model of the preset's family saved as the hub holds it; (backbone, x, y)."""
    from timm.models import save_for_hf

    torch.manual_seed(0)
    b = build_backbone(name, pretrained=False, **tiny_args(name))
    code = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"} if FOUNDATION_MODELS[name].code_kwargs else None
    save_for_hf(b.weights_target, str(folder), safe_serialization=True, model_args=code)  # as the hub has them
    cfg = json.loads((folder / "config.json").read_text())  # hub configs hold the architecture only:
    cfg["model_args"] = {k: v for k, v in cfg.get("model_args", {}).items() if k in ("img_size", *TINY)}
    (folder / "config.json").write_text(json.dumps(cfg))  # the card's arguments come from the preset
    x = torch.rand(2, 3, *[tiny_args(name)["img_size"]] * 2)
    with torch.no_grad():
        return b, x, b(x)


@pytest.mark.parametrize("name", TIMM)
def test_a_saved_tiny_model_loads_back_strictly_through_the_preset(name: str, tmp_path: Path):
    b, x, y = _save_tiny(name, tmp_path)
    again = build_backbone(name, pretrained=False, weights=tmp_path / "model.safetensors", **tiny_args(name))
    assert again.weights_hash == b.weights_hash
    torch.testing.assert_close(again(x), y)


@pytest.mark.parametrize("name", [n for n in TIMM if FOUNDATION_MODELS[n].pooling == "token"])
def test_local_dir_loads_a_saved_tiny_model_with_the_presets_arguments(name: str, tmp_path: Path):
    b, x, y = _save_tiny(name, tmp_path)
    args = FOUNDATION_MODELS[name].create_kwargs(tiny_args(name))
    loaded = build_backbone(f"local-dir:{tmp_path}", **args)
    assert loaded.weights_hash == b.weights_hash  # (the normalisation is the folder's config's, not the card's)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), b.model(x))


def test_without_the_cards_arguments_the_weights_do_not_load(tmp_path: Path):
    """UNI's LayerScale (init_values) keys: strict loading names them instead of ignoring them."""
    _save_tiny("uni", tmp_path)
    with pytest.raises(ConfigError, match=r"timm could not build or load it .*unexpected|Unexpected key"):
        build_backbone(f"local-dir:{tmp_path}", **TINY)
    with pytest.raises(ConfigError, match=r"unexpected keys .*ls1\.gamma"):
        build_backbone("vit_large_patch16_224", weights=tmp_path / "model.safetensors", img_size=32, **TINY)


def test_local_dir_and_hub_names_get_actionable_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # no 20 s of retries where there is no network
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))  # and nothing cached
    with pytest.raises(ConfigError, match=r"must hold timm's config.json and weights"):
        build_backbone(f"local-dir:{tmp_path}")
    with pytest.raises(ConfigError, match=r"huggingface-cli login.*local-dir:DIR"):
        build_backbone("hf-hub:nobody/not-a-model-here")  # offline here; a missing repo online


def test_wsi_backbones_lists_every_preset_with_dim_and_licence():
    done = subprocess.run([sys.executable, "-m", "wsi_lightning", "backbones"], capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "COLUMNS": "250"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    for name, spec in FOUNDATION_MODELS.items():
        row = next(line for line in lines if f" {name} " in line)
        assert f" {spec.dim} " in row and spec.licence.split()[0] in row
    assert "resnet50_trunc" in done.stdout and "conch (not a preset)" in done.stdout
    assert "phikon_v2 (not a preset)" not in done.stdout


def test_precision_choices():
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16 and autocast_dtype("fp16", "cuda") is torch.float16
    assert autocast_dtype("fp32", "cuda") is None and autocast_dtype("fp16", "cpu") is None  # no CPU fp16
    with pytest.raises(Exception, match="features.precision='fp8'"):
        autocast_dtype("fp8", "cpu")


def test_wsi_extract_with_a_local_dir_vit_and_backbone_args(tmp_path: Path):
    """The acceptance command: `wsi extract MANIFEST features.backbone=local-dir:DIR
    features.backbone_args=...`, offline, bf16 autocast on the CPU."""
    from wsi_lightning.demo.dataset import make_demo_dataset
    from wsi_lightning.features.store import FeatureStore

    _save_tiny("uni", tmp_path / "uni")
    manifest = make_demo_dataset(tmp_path / "demo", n_slides=2, seed=1, workers=1, size_um=512.0)
    store = tmp_path / "store"
    args = "{init_values: 1.0e-5, dynamic_img_size: true}"
    cmd = [sys.executable, "-m", "wsi_lightning", "extract", str(manifest), "--store", str(store),
           f"features.backbone=local-dir:{tmp_path / 'uni'}", f"features.backbone_args={args}",
           "features.precision=bf16", "features.num_workers=0", "features.accelerator=cpu",
           "tiling.tile_size=32", "tiling.mpp=2.0", "tiling.min_tissue=0.3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    fs = FeatureStore(store)
    sid = fs.complete_slides()[0]
    assert len(fs.complete_slides()) == 2 and fs.feature_dim() == 48
    attrs = fs.attrs(sid)
    assert attrs["extraction"]["backbone_args"] == {"init_values": 1e-5, "dynamic_img_size": True}
    assert attrs["extraction"]["precision"] == "bf16"
