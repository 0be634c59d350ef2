"""Backbones: preset dims, timm fallback, weights files, hashes, errors, demo_cnn behaviour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from wsi_lightning.errors import ConfigError
from wsi_lightning.features.backbones import Backbone, build_backbone, state_dict_hash
from wsi_lightning.features.foundation import FOUNDATION_MODELS
from wsi_lightning.registry import BACKBONES

PRESET_DIMS = {"demo_cnn": 128, "demo_filters": 96, "resnet18": 512, "resnet50": 2048, "resnet50_trunc": 1024}


@pytest.fixture(scope="module")
def trunc() -> Backbone:
    return build_backbone("resnet50_trunc", pretrained=False)


def test_presets_are_registered() -> None:
    assert set(PRESET_DIMS) <= set(BACKBONES.names())


@pytest.mark.parametrize("name", [n for n in BACKBONES.names() if n not in FOUNDATION_MODELS])  # those: test_foundation
def test_preset_forward_shape(name: str, trunc: Backbone) -> None:
    backbone = trunc if name == "resnet50_trunc" else build_backbone(name, pretrained=False)
    assert backbone.name == name and not backbone.training
    with torch.inference_mode():
        out = backbone(torch.rand(2, 3, 64, 64))  # (B, D)
    assert out.shape == (2, backbone.dim)
    assert backbone.dim == PRESET_DIMS.get(name, backbone.dim)
    assert torch.isfinite(out).all()
    assert len(backbone.weights_hash) == 16


def test_timm_fallback() -> None:
    backbone = build_backbone("resnet10t")
    with torch.inference_mode():
        out = backbone(torch.rand(2, 3, 48, 64))
    assert out.shape == (2, backbone.dim) == (2, 512)


def test_normalisation_inside_forward() -> None:
    backbone = Backbone(nn.Flatten(), "flat", 3, mean=(0.5, 0.25, 0.0), std=(0.5, 0.5, 2.0))
    out = backbone(torch.ones(1, 3, 1, 1))
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.5, 0.5]]))
    assert backbone.state_dict() == {}  # mean/std are not weights


def test_demo_cnn_deterministic_and_rng_free() -> None:
    state = torch.get_rng_state()
    a, b = build_backbone("demo_cnn"), build_backbone("demo_cnn")
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not used
    assert a.weights_hash == b.weights_hash
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert build_backbone("demo_cnn", seed=1).weights_hash != a.weights_hash
    assert build_backbone("demo_cnn", width=16).dim == 64


def test_demo_cnn_depth_keeps_the_first_blocks() -> None:
    three, five = build_backbone("demo_cnn"), build_backbone("demo_cnn", depth=5)
    assert len(five.model.features) == 10 and five.dim == 128
    for i in (0, 2, 4):  # the convolutions of blocks 1-3
        torch.testing.assert_close(three.model.features[i].weight, five.model.features[i].weight)
    with pytest.raises(ConfigError, match="depth"):
        build_backbone("demo_cnn", depth=0)


def _discs(radius: float, size: int = 128, spacing: int = 40) -> torch.Tensor:
    """(1, 3, size, size) white image with dark purple discs of one radius on a grid."""
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    img = torch.ones(3, size, size)
    for cy in range(spacing // 2, size, spacing):
        for cx in range(spacing // 2, size, spacing):
            disc = (xx - cx) ** 2 + (yy - cy) ** 2 < radius**2
            img[:, disc] = torch.tensor([0.35, 0.2, 0.55])[:, None]
    return img[None]


def test_demo_filters_blob_responses_follow_the_nuclear_size() -> None:
    """Per octave o the features are [G, DoG+, DoG-, |grad|] x [mean (RGB), std (RGB)]: the
    octave where dark blobs respond most moves up with the blob radius."""
    backbone = build_backbone("demo_filters")
    assert backbone.state_dict() == {} and backbone.dim == 96
    peaks = []
    for radius in (2.0, 5.0, 11.0):
        with torch.inference_mode():
            f = backbone(_discs(radius))[0].view(4, 4, 2, 3)  # (octave, map, mean/std, RGB)
        peaks.append(int(f[:, 1, 0].mean(-1).argmax()))  # DoG+ mean, over the channels
    assert peaks == sorted(peaks) and peaks[0] < peaks[-1], peaks
    with torch.inference_mode():
        blank = backbone(torch.ones(1, 3, 64, 64))
    assert blank.abs().max() < 1e-5  # white: no stain, no blobs, no edges
    with pytest.raises(ConfigError, match="octaves"):
        build_backbone("demo_filters", octaves=0)


def _tile(lesion: bool, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Pink tissue with nuclei; lesions: larger, darker, bluer, denser nuclei. (H, W, 3)."""
    img = np.array([0.92, 0.67, 0.78]) + rng.normal(0, 0.03, (size, size, 3))
    n, radius = (24, 4.0) if lesion else (10, 2.5)
    colour = np.array([0.27, 0.2, 0.55]) if lesion else np.array([0.47, 0.31, 0.63])
    yy, xx = np.mgrid[:size, :size]
    for cx, cy in rng.uniform(0, size, (n, 2)):
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < (radius * rng.uniform(0.7, 1.3)) ** 2] = colour
    return np.clip(img, 0, 1)


def test_demo_cnn_separates_lesion_tiles() -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(48) % 2
    tiles = np.stack([_tile(bool(y), rng) for y in labels])  # (48, H, W, 3)
    with torch.inference_mode():
        feats = build_backbone("demo_cnn")(torch.from_numpy(tiles).permute(0, 3, 1, 2).float())
    feats = feats.numpy()
    train, test = slice(0, 24), slice(24, 48)
    centroids = np.stack([feats[train][labels[train] == c].mean(0) for c in (0, 1)])  # (2, D)
    dist = ((feats[test][:, None] - centroids[None]) ** 2).sum(-1)  # (24, 2)
    assert (dist.argmin(1) == labels[test]).mean() >= 0.95


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_round_trip(tmp_path: Path, suffix: str) -> None:
    source = build_backbone("demo_cnn", seed=0)
    path = tmp_path / f"demo{suffix}"
    state = source.model.state_dict()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:  # a DDP training checkpoint: nested and "module."-prefixed
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    loaded = build_backbone("demo_cnn", seed=1, weights=str(path))
    assert loaded.weights_hash == source.weights_hash == state_dict_hash(state)
    x = torch.rand(2, 3, 40, 40)
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def test_trunc_accepts_full_resnet50_weights(tmp_path: Path, trunc: Backbone) -> None:
    full = build_backbone("resnet50").model.state_dict()  # has layer4.* and fc.*
    full["fc.weight"], full["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    torch.save({"model": full}, tmp_path / "r50.pth")
    loaded = build_backbone("resnet50_trunc", weights=tmp_path / "r50.pth")
    torch.testing.assert_close(loaded.model.conv1.weight, full["conv1.weight"])
    assert loaded.weights_hash != trunc.weights_hash


def test_missing_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(ConfigError, match="not found; set features.weights") as err:
        build_backbone("demo_cnn", weights=path)
    assert str(path) in str(err.value)


def test_wrong_keys_and_shapes(tmp_path: Path) -> None:
    state = build_backbone("demo_cnn").model.state_dict()
    bad = {("extra." + k if i == 0 else k): v for i, (k, v) in enumerate(state.items())}
    torch.save(bad, tmp_path / "keys.pth")
    with pytest.raises(ConfigError) as err:
        build_backbone("demo_cnn", weights=tmp_path / "keys.pth")
    msg = str(err.value)
    assert "missing keys (1): ['features.0.weight']" in msg
    assert "unexpected keys (1): ['extra.features.0.weight']" in msg
    assert "keys.pth" in msg and "features.backbone" in msg
    torch.save(build_backbone("demo_cnn", width=16).model.state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(ConfigError, match="shape mismatches"):
        build_backbone("demo_cnn", weights=tmp_path / "narrow.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ConfigError, match="holds no state dict"):
        build_backbone("demo_cnn", weights=tmp_path / "tensor.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="could not be read"):
        build_backbone("demo_cnn", weights=tmp_path / "junk.pth")


def test_bad_preset_arguments() -> None:
    with pytest.raises(ConfigError, match="'demo_cnn' does not take arguments {'layers': 3}"):
        build_backbone("demo_cnn", layers=3)


def test_unknown_name() -> None:
    with pytest.raises(ConfigError) as err:
        build_backbone("resnet50_trnc")
    msg = str(err.value)
    assert "unknown backbone 'resnet50_trnc'" in msg and "'demo_cnn'" in msg
    assert "did you mean" in msg and "resnet50_trunc" in msg


def test_pretrained_download_failure(monkeypatch) -> None:
    import timm

    def offline(*args, pretrained: bool = False, **kwargs):
        if pretrained:
            raise OSError("Could not connect to huggingface.co")
        raise AssertionError("only the pretrained path is exercised")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ConfigError, match="features.weights=/path/to/file.*pretrained=false"):
        build_backbone("resnet18", pretrained=True)
    with pytest.raises(ConfigError, match="could not load timm pretrained weights"):
        build_backbone("vit_tiny_patch16_224", pretrained=True)
