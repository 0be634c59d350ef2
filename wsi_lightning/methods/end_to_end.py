"""End-to-end MIL from slides: a CNN fine-tuned on random tissue patches under any bag method.

Used for the Patch Transformer's setting (Li et al., MICCAI 2019, docs/methods.md 1.2): every visit of
a slide draws M = 32 random tissue patches (``SlideSamplingDataModule``, patches mode, with
flips and 90-degree rotations), each is resized and randomly cropped, a CNN (ResNet-50 in the
paper) embeds them, and a registered bag method (``mil``, e.g. ``patch_transformer``) turns the
(B, M, D) embeddings into slide predictions. The CNN and the bag method train together.

Input: ``Bag`` whose ``features`` are images (B, M, 3, T, T) in [0, 1] (``input_kind =
"patches"``).

Deviations from paper:
    - Crops (docs/methods.md register item 5): patches read at ``data.sampling.patch_size`` px are resized to
      ``resize`` px, then randomly cropped to ``crop`` px in training (centre crop at
      evaluation); the paper's 512 px patches resized to 256 and cropped to 224 is the default.
    - Test-time sampling (docs/methods.md register item 3): ``data.sampling.test_draws`` random draws of M
      patches per slide, fixed across epochs; their predictions are averaged.
    - BatchNorm layers of the CNN run in training mode on the M patches of the step's slides.
    - The task loss is the plain per-target cross-entropy: a wrapped method's own loss
      weighting (e.g. CLAM-SB's bag weight) is not applied; its auxiliary losses are.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsi_lightning.data.batch import Bag
from wsi_lightning.errors import ConfigError
from wsi_lightning.methods.base import MILModule, MILOutput
from wsi_lightning.registry import METHODS


class EndToEndNet(nn.Module):
    """Args:
        in_dim: image channels (3; injected).
        num_classes: {target: C}.
        mil: registered bag method whose net aggregates the patch embeddings.
        mil_args: that method's arguments.
        backbone: ``wsi_lightning.features.backbones`` preset or timm name.
        backbone_args: keyword arguments of the preset / ``timm.create_model`` (e.g.
            ``{depth: 5}`` for ``demo_cnn``, ``{img_size: 224}`` for a ViT).
        pretrained: timm pretrained weights (needs the internet once).
        weights: local weights file (overrides ``pretrained``).
        freeze_backbone: keep the CNN fixed (no fine-tuning).
        resize / crop: patch side after resizing, and after cropping (None: no resize / crop).
    """

    def __init__(self, in_dim: int, num_classes: dict[str, int], mil: str = "patch_transformer",
                 mil_args: dict[str, Any] | None = None, backbone: str = "resnet50",
                 backbone_args: dict[str, Any] | None = None, pretrained: bool = True,
                 weights: str | None = None, freeze_backbone: bool = False,
                 resize: int | None = 256, crop: int | None = 224) -> None:
        super().__init__()
        from wsi_lightning.features.backbones import build_backbone
        from wsi_lightning.methods import import_all

        import_all()  # the wrapped method may not be imported yet
        if mil not in METHODS or not _bag_mil(METHODS.get(mil)):
            raise ConfigError(f"end_to_end: method.mil={mil!r} must be a registered bag method "
                              f"(one of {[n for n in METHODS.names() if _bag_mil(METHODS.get(n))]})")
        if crop is not None and resize is not None and crop > resize:
            raise ConfigError(f"end_to_end: crop={crop} is larger than resize={resize}")
        # weights are loaded when fitting starts (``load_pretrained``), never at construction, so
        # building the model or loading a checkpoint never downloads anything
        self.backbone_args = dict(backbone_args or {})
        self.backbone = build_backbone(backbone, pretrained=False, **self.backbone_args).train()
        self.backbone_name, self.pretrained, self.weights = backbone, bool(pretrained), weights
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        self.mil = METHODS.get(mil).Net(in_dim=self.backbone.dim, num_classes=num_classes, **(mil_args or {}))
        self.resize, self.crop = resize, crop

    def load_pretrained(self) -> None:
        """The local weight file, or timm's ImageNet weights, into the CNN."""
        from wsi_lightning.features.backbones import build_backbone

        if self.weights:
            self.backbone.load_weights(self.weights)
        elif self.pretrained:
            self.backbone.model.load_state_dict(
                build_backbone(self.backbone_name, pretrained=True, **self.backbone_args).model.state_dict())

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(K, 3, T, T) -> resized, then randomly (train) or centrally cropped."""
        if self.resize is not None and x.shape[-1] != self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False,
                              antialias=True)
        if self.crop is None or self.crop >= x.shape[-1]:
            return x
        side = x.shape[-1] - self.crop
        if self.training:
            i, j = (int(v) for v in torch.randint(0, side + 1, (2,)))
        else:
            i = j = side // 2
        return x[..., i : i + self.crop, j : j + self.crop]

    def forward(self, bag: Bag) -> MILOutput:
        images = bag.features  # (B, M, 3, T, T)
        if images.dim() != 5:
            raise ConfigError("end_to_end needs image bags (B, M, 3, T, T) from the slide sampling "
                              "DataModule in patches mode; it got features of shape "
                              f"{tuple(images.shape)}")
        b, m = images.shape[:2]
        emb = self.backbone(self._prepare(images.flatten(0, 1))).view(b, m, -1)  # (B, M, D)
        emb = emb * bag.mask[..., None]
        return self.mil(Bag(emb, bag.mask, bag.coords, bag.labels, bag.slide_ids))


def _bag_mil(cls: type) -> bool:
    """A Lightning method on plain feature bags, whose ``Net`` can pool the image features."""
    return issubclass(cls, MILModule) and cls.input_kind == "bag"


@METHODS.register("end_to_end")
class EndToEnd(MILModule):
    """A CNN on random tissue patches under a bag method, trained end to end."""

    Net = EndToEndNet
    input_kind = "patches"
