"""Presets for the pathology foundation models users extract with today (timm builds all of them
but Phikon-v2, a ``transformers`` Dinov2Model).

Each preset carries what its model card states: the architecture and the arguments that rebuild
it (``timm.create_model`` arguments, or a ``Dinov2Config``), so the official weights load with
strict key matching, the input
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

**Phikon-v2** (not gated) is built with ``transformers`` (imported only when the preset is):
random weights are ``Dinov2Model(Dinov2Config(<card's architecture>))``, pretrained ones
``Dinov2Model.from_pretrained("owkin/phikon-v2")``, or ``features.weights=DIR`` for a folder
that ``save_pretrained`` wrote or ``huggingface-cli download owkin/phikon-v2 --local-dir DIR``
fetched. The folder's ``config.json`` must describe the preset's architecture (its fields are
compared) and every weight must load: missing, unexpected or mis-shaped keys are refused.

Cards read (2026-12): https://huggingface.co/MahmoodLab/UNI, https://huggingface.co/MahmoodLab/UNI2-h,
https://huggingface.co/paige-ai/Virchow2, https://huggingface.co/bioptimus/H-optimus-0,
https://huggingface.co/bioptimus/H-optimus-1, https://huggingface.co/prov-gigapath/prov-gigapath,
https://huggingface.co/owkin/phikon-v2 (and their GitHub READMEs where the card's code is there). Where a card does not say the
training resolution, ``mpp`` is what the authors' extraction pipelines use (TRIDENT: 20x), and
the ``note`` says so.

Not a preset: CONCH needs the authors' ``conch`` package, which is not on PyPI (a project pinned
to PyPI packages cannot depend on it); ``wsi backbones`` lists it with what it needs.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_lightning.errors import ConfigError
from wsi_lightning.features.backbones import (
    HUB_PREFIX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    _classifier_prefixes,
    _create_timm,
)
from wsi_lightning.registry import BACKBONES

logger = logging.getLogger(__name__)

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
        arch: timm architecture the random-weights build uses (``Dinov2Model`` for transformers).
        kwargs: ``timm.create_model`` arguments from the card (beyond ``num_classes=0``), or the
            ``Dinov2Config`` arguments for ``library="transformers"``.
        code_kwargs: the card's arguments that are code objects (SwiGLU layers), built lazily.
        dim: output dimension of the tile embedding.
        input_px: input side in pixels; mpp: µm/px it was trained at (tiling.tile_size / mpp).
        mean / std: input normalisation.
        pooling: ``token`` (the class token, timm's pooled output) or ``cls+mean`` (the class
            token concatenated with the mean of the patch tokens, register tokens left out).
        licence / gated / card / note: what a user must know before downloading.
        library: ``timm`` or ``transformers`` (which builds and loads it).
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
    library: str = "timm"

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
    FoundationModel(  # architecture: the card's "ViT-L/16 via DINOv2" as its config.json spells it
        "phikon_v2", "owkin/phikon-v2", "Dinov2Model",
        {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "mlp_ratio": 4,
         "patch_size": 16, "image_size": 224, "use_swiglu_ffn": False},
        dim=1024, input_px=224, mpp=0.5, library="transformers", gated=False,
        licence="Owkin non-commercial licence (LICENSE.pdf in the repository; the hub lists 'other')",
        card="https://huggingface.co/owkin/phikon-v2",
        note="ViT-L/16 (DINOv2, no register tokens), class token (last_hidden_state[:, 0]); 20x "
             "(card); 224 px tiles, ImageNet normalisation (paper, arXiv:2409.09173)"),
)}

# Listed by `wsi backbones` with what they need; not buildable here.
NOT_PRESETS: dict[str, str] = {
    "conch": "MahmoodLab/CONCH, CoCa ViT-B/16 at 448 px, 512-d (encode_image, proj_contrast=False): "
             "needs the authors' `conch` package (pip install git+https://github.com/Mahmoodlab/CONCH), "
             "not on PyPI",
}


def build_foundation(spec: FoundationModel, pretrained: bool = False, **overrides: Any) -> Backbone:
    """The preset's model: the hub weights (``pretrained``) or random weights of its architecture."""
    if spec.library == "transformers":
        return build_dinov2(spec, pretrained, **overrides)
    kwargs = spec.create_kwargs(overrides)
    name = f"{HUB_PREFIX}{spec.hub}" if pretrained else spec.arch
    model = _create_timm(name, pretrained, **kwargs)
    ignore = _classifier_prefixes(model)
    if spec.pooling == "cls+mean":
        model = ClassAndMeanTokens(model)
    return Backbone(model, spec.name, spec.dim, spec.mean, spec.std, ignore, input_px=spec.input_px, mpp=spec.mpp)


# ---------------------------------------------------------------------- transformers (Phikon-v2)
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


class ClassToken(nn.Module):
    """The class token of a ``transformers`` ViT's last hidden state: (B, 3, H, W) -> (B, D)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    @property
    def weights_target(self) -> nn.Module:
        return self.encoder  # the repository's weights are the encoder's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixel_values=x).last_hidden_state[:, 0]  # (B, T, D) -> (B, D)


class TransformersBackbone(Backbone):
    """A Backbone whose ``features.weights`` is a ``transformers`` folder (``save_pretrained``, or
    ``huggingface-cli download ORG/NAME --local-dir DIR``), loaded with ``from_pretrained``: the
    library maps the checkpoint's key names (older releases wrote other ones) onto the model.

    ``arch`` holds the preset's configuration arguments (card + ``features.backbone_args``) that a
    folder's ``config.json`` must agree with.
    """

    def __init__(self, *args: Any, arch: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arch = dict(arch)

    def load_weights(self, path: str | Path) -> None:
        path = Path(path).expanduser()
        folder = path.parent if path.is_file() and path.name in _HF_WEIGHT_FILES else path
        where = f"backbone '{self.name}': features.weights={path}"
        if not folder.is_dir() or not any((folder / f).is_file() for f in _HF_WEIGHT_FILES):
            raise ConfigError(
                f"{where} is not a transformers model folder (one holding {' or '.join(_HF_WEIGHT_FILES[:2])}); "
                "set features.weights to the folder `huggingface-cli download owkin/phikon-v2 --local-dir DIR` "
                "fetched (or model.save_pretrained(DIR) wrote), or to null")
        self.model.encoder = _load_dinov2(str(folder), self.model.encoder.config, self.arch, where)
        logger.info("%s loaded (hash %s)", where, self.weights_hash)


def _dinov2_config(spec: FoundationModel, overrides: dict[str, Any]) -> Any:
    try:
        from transformers import Dinov2Config
    except ImportError as e:
        raise ConfigError(f"backbone '{spec.name}' is a transformers model: pip install "
                          f"transformers==5.23.0 ({e})") from e
    valid = sorted(p for p in inspect.signature(Dinov2Config.__init__).parameters if p not in ("self", "kwargs"))
    unknown = sorted(set(overrides) - set(valid))
    if unknown:  # Dinov2Config would keep them silently
        raise ConfigError(f"backbone '{spec.name}': features.backbone_args {unknown} are not Dinov2Config "
                          f"arguments; valid ones: {valid}")
    return Dinov2Config(**spec.create_kwargs(overrides))


def _load_dinov2(source: str, expected: Any, arch: dict[str, Any], where: str) -> nn.Module:
    """``Dinov2Model.from_pretrained(source)`` (a hub repository or a folder), strictly.

    The source's ``config.json`` is used when there is one (the model then computes what the
    card's own code computes) and must agree with ``arch`` (the preset's arguments); without one,
    ``expected`` (the preset's config) is. Any missing, unexpected or mis-shaped weight is refused.
    """
    from transformers import Dinov2Config, Dinov2Model

    has_config = not Path(source).is_dir() or (Path(source) / "config.json").is_file()
    try:
        config = expected
        if has_config:
            raw, _ = Dinov2Config.get_config_dict(source)
            if raw.get("model_type") != "dinov2":
                raise ConfigError(f"{where}: its config.json has model_type {raw.get('model_type')!r}, "
                                  "not 'dinov2'; this preset loads a Dinov2Model folder")
            config = Dinov2Config.from_dict(raw)
            differ = {k: (getattr(config, k, None), v) for k, v in arch.items() if getattr(config, k, None) != v}
            if differ:
                raise ConfigError(
                    f"{where}: its config.json describes another architecture than the preset's "
                    f"(field: file vs preset) {differ}; pass the file's values in features.backbone_args "
                    "if it is a smaller model of the family, or use the preset's own weights")
        model, info = Dinov2Model.from_pretrained(source, config=config, dtype=torch.float32,
                                                  output_loading_info=True)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised as a ConfigError that says what to do
        raise ConfigError(
            f"{where}: transformers could not load it ({type(e).__name__}: {' '.join(str(e).split())[:400]}); for the hub "
            "without internet access, download it once elsewhere (`huggingface-cli download owkin/phikon-v2 "
            "--local-dir DIR`, not gated) and set features.weights=DIR, or features.pretrained=false "
            "for random weights") from e
    problems = [f"{k.replace('_', ' ')} ({len(info[k])}): {sorted(map(str, info[k]))[:10]}"
                for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[k]]
    if problems:
        raise ConfigError(f"{where} does not match the model: {'; '.join(problems)}. Check that it holds "
                          "the weights of the preset's architecture")
    return model.eval()


def build_dinov2(spec: FoundationModel, pretrained: bool = False, **overrides: Any) -> Backbone:
    """Phikon-v2: random ``Dinov2Model(Dinov2Config(card))`` weights, or the hub's (``pretrained``)."""
    config, arch = _dinov2_config(spec, overrides), spec.create_kwargs(overrides)
    from transformers import Dinov2Model  # (importable: _dinov2_config checked)

    where = f"backbone '{spec.name}': {spec.hub} from the Hugging Face Hub"
    encoder = _load_dinov2(spec.hub, config, arch, where) if pretrained else Dinov2Model(config)
    return TransformersBackbone(ClassToken(encoder), spec.name, config.hidden_size, spec.mean, spec.std,
                                input_px=spec.input_px, mpp=spec.mpp, arch=arch)


def _register(spec: FoundationModel) -> None:
    def factory(pretrained: bool = False, **overrides: Any) -> Backbone:
        return build_foundation(spec, pretrained, **overrides)

    factory.__doc__ = f"{spec.name}: {spec.note} ({spec.dim}-d; {spec.card})"
    factory.foundation = spec  # type: ignore[attr-defined]
    BACKBONES.register(spec.name)(factory)


for _spec in FOUNDATION_MODELS.values():
    _register(_spec)
