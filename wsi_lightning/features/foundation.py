"""Presets for the pathology foundation models users extract with today (timm builds all of them).

Each preset carries what its model card states: the timm architecture and the ``create_model``
arguments that rebuild it (so the official weights load with strict key matching), the input
size and resolution it was trained at, its normalisation, how the tile embedding is pooled and
the output dimension; plus its licence, whether the Hugging Face repository is gated, and the
card it comes from. ``wsi backbones`` lists them.

    features.backbone=uni                          weights from the hub (pretrained: true), or
    features.backbone=uni features.pretrained=false   random weights (tests, benchmarks), or
    features.backbone=uni features.weights=FILE    a local pytorch_model.bin / .safetensors

**Gated models.** UNI, UNI2-h, Virchow2, H-optimus-0/1 and Prov-GigaPath need an account that
accepted the model's terms on its Hugging Face page, then ``huggingface-cli login`` (or
``HF_TOKEN``) on the machine that downloads. Offline machines: ``huggingface-cli download
ORG/NAME --local-dir DIR`` once elsewhere, then ``features.weights=DIR/pytorch_model.bin``
with the preset (or ``features.backbone=local-dir:DIR`` with the preset's arguments in
``features.backbone_args``).

Cards read (2026-12): https://huggingface.co/MahmoodLab/UNI, https://huggingface.co/MahmoodLab/UNI2-h,
https://huggingface.co/paige-ai/Virchow2, https://huggingface.co/bioptimus/H-optimus-0,
https://huggingface.co/bioptimus/H-optimus-1, https://huggingface.co/prov-gigapath/prov-gigapath
(and their GitHub READMEs where the card's code is there). Where a card does not say the
training resolution, ``mpp`` is what the authors' extraction pipelines use (TRIDENT: 20x), and
the ``note`` says so.

Not presets (yet): Phikon-v2 is a ``transformers`` Dinov2 model, not a timm one; CONCH needs the
authors' ``conch`` package, which is not on PyPI. Both are listed in ``wsi backbones`` with what
they need.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from wsi_lightning.features.backbones import (
    HUB_PREFIX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    _classifier_prefixes,
    _create_timm,
)
from wsi_lightning.registry import BACKBONES

H_OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
H_OPTIMUS_STD = (0.211883, 0.230117, 0.177517)


def _swiglu() -> dict[str, Any]:
    """The SwiGLU MLP + SiLU of UNI2-h / Virchow2 (code objects: a config file cannot hold them)."""
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}


@dataclass(frozen=True)
class FoundationModel:
    """One model card's facts.

    Attributes:
        name: the preset name (``features.backbone``).
        hub: Hugging Face repository (``hf-hub:<hub>`` with ``pretrained: true``).
        arch: timm architecture the random-weights build uses.
        kwargs: ``timm.create_model`` arguments from the card (beyond ``num_classes=0``).
        code_kwargs: the card's arguments that are code objects (SwiGLU layers), built lazily.
        dim: output dimension of the tile embedding.
        input_px: input side in pixels; mpp: µm/px it was trained at (tiling.tile_size / mpp).
        mean / std: input normalisation.
        pooling: ``token`` (the class token, timm's pooled output) or ``cls+mean`` (the class
            token concatenated with the mean of the patch tokens, register tokens left out).
        licence / gated / card / note: what a user must know before downloading.
    """

    name: str
    hub: str
    arch: str
    kwargs: dict[str, Any]
    dim: int
    input_px: int
    mpp: float
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pooling: str = "token"
    code_kwargs: bool = False
    licence: str = ""
    gated: bool = True
    card: str = ""
    note: str = ""

    def create_kwargs(self, overrides: dict[str, Any]) -> dict[str, Any]:
        return {**self.kwargs, **(_swiglu() if self.code_kwargs else {}), **overrides}


class ClassAndMeanTokens(nn.Module):
    """Virchow's embedding: ``[class token, mean of the patch tokens]`` (register tokens left out),
    (B, 2D) from a timm ViT's ``forward_features`` (B, prefix + patches, D)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        self.prefix = int(vit.num_prefix_tokens)  # class + register tokens

    @property
    def weights_target(self) -> nn.Module:
        return self.vit  # the card's weights are the ViT's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)  # (B, T, D)
        return torch.cat([tokens[:, 0], tokens[:, self.prefix:].mean(1)], -1)  # (B, 2D)


_H_OPTIMUS_0 = FoundationModel(
    "h_optimus_0", "bioptimus/H-optimus-0", "vit_giant_patch14_reg4_dinov2",
    {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "global_pool": "token"},
    dim=1536, input_px=224, mpp=0.5, mean=H_OPTIMUS_MEAN, std=H_OPTIMUS_STD, licence="Apache-2.0",
    card="https://huggingface.co/bioptimus/H-optimus-0",
    note="ViT-g/14 (4 register tokens), class token; tiles at 0.5 µm/px (card)")

FOUNDATION_MODELS: dict[str, FoundationModel] = {m.name: m for m in (
    FoundationModel(
        "uni", "MahmoodLab/UNI", "vit_large_patch16_224",
        {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        dim=1024, input_px=224, mpp=0.5, licence="CC-BY-NC-ND-4.0",
        card="https://huggingface.co/MahmoodLab/UNI",
        note="ViT-L/16, class token; 20x (0.5 µm/px) as the authors' TRIDENT/CLAM pipelines extract"),
    FoundationModel(
        "uni2_h", "MahmoodLab/UNI2-h", "vit_giant_patch14_224",
        {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
         "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8,
         "dynamic_img_size": True},
        dim=1536, input_px=224, mpp=0.5, code_kwargs=True, licence="CC-BY-NC-ND-4.0",
        card="https://huggingface.co/MahmoodLab/UNI2-h",
        note="ViT-H/14 (SwiGLU, 8 register tokens), class token; 20x as TRIDENT extracts"),
    FoundationModel(
        "virchow2", "paige-ai/Virchow2", "vit_huge_patch14_224",
        {"img_size": 224, "init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375, "global_pool": "",
         "dynamic_img_size": True},
        dim=2560, input_px=224, mpp=0.5, pooling="cls+mean", code_kwargs=True, licence="CC-BY-NC-ND-4.0",
        card="https://huggingface.co/paige-ai/Virchow2",
        note="ViT-H/14 (SwiGLU, 4 register tokens); class token + mean patch token (2 x 1280); "
             "trained on 5-40x, 20x as TRIDENT extracts"),
    _H_OPTIMUS_0,
    replace(_H_OPTIMUS_0, name="h_optimus_1", hub="bioptimus/H-optimus-1", licence="CC-BY-NC-ND-4.0",
            card="https://huggingface.co/bioptimus/H-optimus-1",
            note="as H-optimus-0 (architecture, normalisation, 0.5 µm/px); access approved by hand"),
    FoundationModel(
        "prov_gigapath", "prov-gigapath/prov-gigapath", "vit_giant_patch14_dinov2",
        {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "global_pool": "token"},
        dim=1536, input_px=224, mpp=0.5,
        licence="Prov-GigaPath License (research, non-commercial; the hub lists Apache-2.0)",
        card="https://huggingface.co/prov-gigapath/prov-gigapath",
        note="ViT-g with 16 px patches, class token; trained on 0.5 µm/px tiles (authors' README)"),
)}

# Listed by `wsi backbones` with what they need; not buildable here.
NOT_PRESETS: dict[str, str] = {
    "phikon_v2": "owkin/phikon-v2, ViT-L/16 (DINOv2), 1024-d class token, 20x: a `transformers` "
                 "Dinov2Model (AutoModel), not a timm model; extract with transformers and "
                 "`wsi import-features`",
    "conch": "MahmoodLab/CONCH, CoCa ViT-B/16 at 448 px, 512-d (encode_image, proj_contrast=False): "
             "needs the authors' `conch` package (pip install git+https://github.com/Mahmoodlab/CONCH), "
             "not on PyPI",
}


def build_foundation(spec: FoundationModel, pretrained: bool = False, **overrides: Any) -> Backbone:
    """The preset's model: the hub weights (``pretrained``) or random weights of its architecture."""
    kwargs = spec.create_kwargs(overrides)
    name = f"{HUB_PREFIX}{spec.hub}" if pretrained else spec.arch
    model = _create_timm(name, pretrained, **kwargs)
    ignore = _classifier_prefixes(model)
    if spec.pooling == "cls+mean":
        model = ClassAndMeanTokens(model)
    return Backbone(model, spec.name, spec.dim, spec.mean, spec.std, ignore, input_px=spec.input_px, mpp=spec.mpp)


def _register(spec: FoundationModel) -> None:
    def factory(pretrained: bool = False, **overrides: Any) -> Backbone:
        return build_foundation(spec, pretrained, **overrides)

    factory.__doc__ = f"{spec.name}: {spec.note} ({spec.dim}-d; {spec.card})"
    factory.foundation = spec  # type: ignore[attr-defined]
    BACKBONES.register(spec.name)(factory)


for _spec in FOUNDATION_MODELS.values():
    _register(_spec)
