"""Phikon-v2: the one preset built with ``transformers`` (a Dinov2Model), offline.

A tiny Dinov2 of the card's family (width, depth, heads and input shrunk) is written with
``save_pretrained``, which keeps the key names the hub's checkpoint has (``attention.attention.
query``, older than the model's own ``attention.q_proj``), and loaded back through the preset's
``features.weights=DIR`` path: same weights, same class tokens; a folder whose keys or config
do not match the preset is refused, not half-loaded.
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

TINY = {"hidden_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32}  # patch 16: 2x2


def _save_tiny(folder: Path) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny random preset model saved as the hub holds Phikon-v2; (backbone, x, class tokens)."""
    torch.manual_seed(0)
    b = build_backbone("phikon_v2", pretrained=False, **TINY)
    b.weights_target.save_pretrained(folder)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        return b, x, b(x)


def _rewrite_weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_the_preset_is_the_cards_vit_large_with_a_1024_d_class_token():
    spec = FOUNDATION_MODELS["phikon_v2"]
    with torch.device("meta"):
        b = build_backbone("phikon_v2", pretrained=False)
        out = b(torch.zeros(2, 3, 224, 224))
    cfg = b.weights_target.config
    assert type(b.weights_target).__name__ == "Dinov2Model" and tuple(out.shape) == (2, 1024) and b.dim == 1024
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.patch_size) == (1024, 24, 16, 16)
    assert 300e6 < sum(p.numel() for p in b.parameters()) < 310e6  # ViT-L/16: ~304M (card: 1.21 GB fp32)
    assert (b.input_px, b.mpp, b.mean, b.std) == (224, 0.5, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert not spec.gated and spec.library == "transformers" and spec.card == "https://huggingface.co/owkin/phikon-v2"


def test_transformers_is_imported_only_when_the_preset_is_built():
    """(Lightning imports torchmetrics, which imports transformers itself wherever it is installed.)"""
    code = ("import sys; import wsi_lightning.cli, wsi_lightning.features; "
            "from wsi_lightning.features.backbones import build_backbone; build_backbone('demo_cnn'); "
            "print('transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_a_saved_tiny_dinov2_loads_back_strictly_with_identical_outputs(tmp_path: Path):
    from safetensors.torch import load_file

    b, x, y = _save_tiny(tmp_path)
    file_keys = set(load_file(tmp_path / "model.safetensors"))
    assert "encoder.layer.0.attention.attention.query.weight" in file_keys  # the hub's layout ...
    assert file_keys != set(b.weights_target.state_dict())  # ... which a plain load_state_dict refuses
    for weights in (tmp_path, tmp_path / "model.safetensors"):  # the folder, or its weights file
        again = build_backbone("phikon_v2", pretrained=False, weights=weights, **TINY)
        assert again.weights_hash == b.weights_hash and again.dim == 48
        with torch.no_grad():
            torch.testing.assert_close(again(x), y, rtol=0, atol=0)
            normalised = (x - torch.tensor(b.mean).view(1, 3, 1, 1)) / torch.tensor(b.std).view(1, 3, 1, 1)
            card = b.weights_target(pixel_values=normalised).last_hidden_state[:, 0]  # the card's snippet
        torch.testing.assert_close(again(x), card)


def test_a_folder_without_config_json_loads_with_the_presets_config(tmp_path: Path):
    b, x, y = _save_tiny(tmp_path)
    (tmp_path / "config.json").unlink()
    again = build_backbone("phikon_v2", weights=tmp_path, **TINY)
    with torch.no_grad():
        torch.testing.assert_close(again(x), y, rtol=0, atol=0)


def test_missing_unexpected_and_misshaped_weights_are_refused(tmp_path: Path):
    _save_tiny(tmp_path)
    _rewrite_weights(tmp_path, lambda s: s.pop("layernorm.weight"))
    with pytest.raises(ConfigError, match=r"features.weights=.*does not match the model: missing keys \(1\): \['layernorm.weight'\]"):
        build_backbone("phikon_v2", weights=tmp_path, **TINY)
    _save_tiny(tmp_path)
    _rewrite_weights(tmp_path, lambda s: s.update(extra_head=torch.zeros(3)))
    with pytest.raises(ConfigError, match=r"unexpected keys \(1\): \['extra_head'\]"):
        build_backbone("phikon_v2", weights=tmp_path, **TINY)
    _save_tiny(tmp_path)
    (tmp_path / "config.json").unlink()  # nothing to compare: the shapes decide
    with pytest.raises(ConfigError, match=r"transformers could not load it .*mismatch"):
        build_backbone("phikon_v2", weights=tmp_path, **{**TINY, "hidden_size": 64})


def test_a_folder_of_another_architecture_names_the_fields(tmp_path: Path):
    _save_tiny(tmp_path)
    with pytest.raises(ConfigError, match=r"another architecture .*'hidden_size': \(48, 1024\).*backbone_args"):
        build_backbone("phikon_v2", weights=tmp_path, num_hidden_layers=1)  # the card's width, tiny depth
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "vit"}))
    with pytest.raises(ConfigError, match=r"model_type 'vit', not 'dinov2'"):
        build_backbone("phikon_v2", weights=tmp_path, **TINY)


def test_bad_weights_paths_and_arguments_say_what_to_do(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"not a transformers model folder.*huggingface-cli download owkin/phikon-v2"):
        build_backbone("phikon_v2", weights=tmp_path / "nowhere", **TINY)
    (tmp_path / "phikon.pth").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"not a transformers model folder"):
        build_backbone("phikon_v2", weights=tmp_path / "phikon.pth", **TINY)
    with pytest.raises(ConfigError, match=r"\['hiden_size'\] are not Dinov2Config arguments; valid ones: .*'hidden_size'"):
        build_backbone("phikon_v2", hiden_size=48)


def test_offline_the_hub_download_fails_with_the_offline_recipe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # no 20 s of retries where there is no network
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))  # and nothing cached
    with pytest.raises(ConfigError, match=r"owkin/phikon-v2 from the Hugging Face Hub: transformers could not "
                                          r"load it .*huggingface-cli download owkin/phikon-v2 --local-dir DIR"):
        build_backbone("phikon_v2", pretrained=True, **TINY)


def test_local_dir_points_a_transformers_folder_to_the_preset(tmp_path: Path):
    _save_tiny(tmp_path)
    with pytest.raises(ConfigError, match=r"transformers model folder \(model_type 'dinov2'\).*features.backbone=phikon_v2"):
        build_backbone(f"local-dir:{tmp_path}")


def test_wsi_extract_with_a_local_tiny_phikon_folder_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """`wsi extract MANIFEST features.backbone=phikon_v2 features.weights=DIR`, with the hub offline."""
    import huggingface_hub.constants as hf

    from wsi_lightning import cli
    from wsi_lightning.demo.dataset import make_demo_dataset
    from wsi_lightning.features.store import FeatureStore

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    b, _, _ = _save_tiny(tmp_path / "phikon")
    manifest = make_demo_dataset(tmp_path / "demo", n_slides=2, seed=1, workers=1, size_um=512.0)
    store = tmp_path / "store"
    args = "{" + ", ".join(f"{k}: {v}" for k, v in TINY.items()) + "}"
    assert cli.main(["extract", str(manifest), "--store", str(store), "features.backbone=phikon_v2",
                     f"features.weights={tmp_path / 'phikon'}", f"features.backbone_args={args}",
                     "features.precision=bf16", "features.num_workers=0", "features.accelerator=cpu",
                     "tiling.tile_size=32", "tiling.mpp=2.0", "tiling.min_tissue=0.3"]) == 0
    fs = FeatureStore(store)
    assert len(fs.complete_slides()) == 2 and fs.feature_dim() == 48
    attrs = fs.attrs(fs.complete_slides()[0])
    assert attrs["backbone"] == "phikon_v2" and attrs["weights_hash"] == b.weights_hash
    assert attrs["extraction"]["backbone_args"] == TINY
