"""MagNets: magnifying networks (Dimitriou et al., "Magnifying Networks for Histopathological
Images with Billions of Pixels", 2024; ``docs/methods.md`` section 4).

A tree of L magnifying layers zooms from a whole-slide thumbnail to a few high-resolution
leaves, reading the slide pyramid on the fly; a classification layer reads the leaves::

    depth 0: the slide padded to a square frame; I (56²) from the batch, I' (112²) read
    layer l = 1..L: for each of its N_in(l) = Π_{j<l} P_j inputs and each child p < P_l, an
        ST stack (magnify.py) -> 1.5-entmax over 56x56 -> crop (s, t_x, t_y) -> child
        O_p sampled from I' by linearized multi-sampling (56², or 224² at l = L); the child's
        level-0 frame = parent frame ∘ crop; its I' read at the level its size chooses
    leaves (B, N_out(L), 3, 224, 224) -> InceptionV3 -> bi-GRU -> MLP 512/256 -> logits   (L3)
    layer-1 / layer-3 children -> one ResNet-18 each -> mean patch logits -> CE          (L2)
    L1, the paradoxical loss on the two auxiliaries: callbacks/paradoxical_loss.py

Deviations from paper (docs/methods.md register items 15-21 and ``docs/methods.md`` 4.10):
    - No official code exists; this follows the paper, its Appendix snippets and the linearized
      sampler's reference code (item 21).
    - The last layer's I' is rendered at ``last_source_size`` (112, the text; 448 is the
      alternative of item 15).
    - Translations take tanh on the marginals (Appendix code; ``tanh_on=expectation`` is the
      text, item 16); the clamps run in the code's order, s <- clamp(min(s, 1 - max|t|), 0.05, 1).
    - Auxiliary slide logits are the mean of per-patch logits; the GRU is bidirectional, 512 wide,
      and "both last outputs" are its two final states concatenated (item 17). Heads are C-way
      softmax + cross-entropy (for two classes the same model as sigmoid + BCE); the MLP uses ReLU.
    - The 4-layer MagNet is (3, 2, 3, 2) (item 18); auxiliaries stay on layers 1 and 3. The GRU
      reads the leaves in depth-first tree order [inferred].
    - I' levels follow the paper's formula with m_max = levels - 1 (``level_rule=paper``, item 19)
      applied to the square frame side; ``resolution`` reads the coarsest level with I''s
      resolution instead. Reads larger than 8192 px per side are chunked and box-reduced.
    - The frozen patch (identity crop) is child 0 of every layer-2 node (4.10 item 8).
    - Table 1's check marks are lost (item 20). Its "L3" cannot be the classifier's own loss (rows
      without it still score 62-68% AUROC), so ``detach_leaves=true`` reads "without L3" as "L3
      does not reach the magnifying layers" (they then learn from L1 and L2 only) [inferred].
    - BatchNorm stays in the ST stacks, including the last 1x1 Conv2D (4.10 item 10), with
      running statistics that start as a cumulative average (so evaluation crops are the
      training ones from the first epoch; magnify.py ``WarmBatchNorm2d``); children's
      I' padding sits where their frame leaves the parent's content; frames use
      ``align_corners=False``; the sampler's forward value is exactly bilinear (no intercept).
      See magnify.py and lin_sampler.py.
    - Augmentation (flips, 90° rotations) is applied here to the thumbnail and to every read,
      and predicted crops are mapped back through it, so the ROI tree stays in slide coordinates.
    - Pretrained weights are loaded when fitting starts, never at construction (checkpoints and
      config checks work offline).
    - The grey filter runs on the layer-1 thumbnail (``data.sampling.grey_tol``) and on every read
      here (``method.grey_tol``). The I' reads run in the training process, inside ``forward``
      (non-differentiable, as in the paper); DataLoader workers only prepare the thumbnails.
    - Pixel counts are values (x 3 channels), as the paper's 2,803,584 for (3, 2, 3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsi_lightning.data.sampling import (
    GreyFilter,
    SlideBatch,
    dihedral_matrix,
    dihedral_tensor,
)
from wsi_lightning.errors import ConfigError
from wsi_lightning.features.backbones import Backbone, build_backbone
from wsi_lightning.methods.base import MILModule, MILOutput, RoiTree
from wsi_lightning.methods.magnet.magnify import (
    MagnifyingLayer,
    child_frames,
    clip_boxes,
    tree_counts,
)
from wsi_lightning.methods.magnet.reads import LEVEL_RULES, read_frames
from wsi_lightning.nn import MultiHead
from wsi_lightning.registry import METHODS
from wsi_lightning.slides.reader import SlideCache


class AuxClassifier(nn.Module):
    """A backbone + per-target linear heads on one layer's patches, slide logits = mean over
    patches: (B, N, 3, o, o) -> {target: (B, C_t)}."""

    def __init__(self, backbone: Backbone, num_classes: dict[str, int]) -> None:
        super().__init__()
        self.backbone, self.head = backbone, MultiHead(backbone.dim, num_classes)

    def forward(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        b, n = patches.shape[:2]
        f = self.backbone(patches.flatten(0, 1)).view(b, n, -1)  # (B, N, D)
        return {t: v.mean(1) for t, v in self.head(f).items()}  # (B, N, C) -> (B, C)


class MagNetNet(nn.Module):
    """Args:
        in_dim: image channels of the data (RGB); unused, slides are always read as RGB.
        num_classes: {target: C}.
        patches: P_l per layer: (3, 2, 3) or (3, 2, 3, 2) in the paper.
        in_size / source_size / leaf_size: sides of I (56), I' (112) and the leaves (224).
        last_source_size: side of the last layer's I' (112; docs/methods.md register item 15).
        frozen_patch: child 0 of every layer-2 node is the identity crop.
        tanh_on, min_scale, sampler: see :class:`~wsi_lightning.methods.magnet.magnify.MagnifyingLayer`.
        lin_samples, lin_radius: linearized sampler's K (8) and jitter radius (0.5).
        backbone / aux_backbone: leaf (InceptionV3) and auxiliary (ResNet-18) feature extractors,
            registered presets or timm names.
        pretrained: load ImageNet weights (timm) into both when fitting starts.
        backbone_weights / aux_weights: local weight files instead of ``pretrained``.
        aux_layers: layers whose children feed an auxiliary classifier (1, 3).
        aux_weight: weight of each auxiliary cross-entropy (L2).
        gru_hidden, mlp: GRU width (512) and MLP sizes (512, 256).
        detach_leaves: the classifier's loss (L3) does not reach the magnifying layers.
        level_rule: ``paper`` | ``resolution``, see :func:`~wsi_lightning.methods.magnet.reads.read_frames`.
        grey_tol: grey filter of every read (15); null: off.
        max_open: slide handles kept open by this process.
    """

    def __init__(self, in_dim: int, num_classes: dict[str, int], patches: Sequence[int] = (3, 2, 3),
                 in_size: int = 56, source_size: int = 112, last_source_size: int = 112,
                 leaf_size: int = 224, frozen_patch: bool = True, tanh_on: str = "marginals",
                 min_scale: float = 0.05, sampler: str = "linearized", lin_samples: int = 8,
                 lin_radius: float = 0.5, backbone: str = "inception_v3",
                 aux_backbone: str = "resnet18", pretrained: bool = True,
                 backbone_weights: str | None = None, aux_weights: str | None = None,
                 aux_layers: Sequence[int] = (1, 3), aux_weight: float = 1.0, gru_hidden: int = 512,
                 mlp: Sequence[int] = (512, 256), detach_leaves: bool = False,
                 level_rule: str = "paper", grey_tol: int | None = 15, max_open: int = 16) -> None:
        super().__init__()
        self.patches, self.aux_layers = tuple(int(p) for p in patches), tuple(int(a) for a in aux_layers)
        n_layers = len(self.patches)
        if not self.patches or min(self.patches) < 1:
            raise ConfigError(f"magnet: method.patches={list(patches)}; expected >= 1 patches per layer")
        if frozen_patch and n_layers > 1 and self.patches[1] < 2:
            raise ConfigError(f"magnet: method.patches={list(patches)} with frozen_patch=true; layer 2 "
                              "needs >= 2 patches (child 0 is frozen)")
        if any(not 1 <= a <= n_layers for a in self.aux_layers):
            raise ConfigError(f"magnet: method.aux_layers={list(aux_layers)}; layers are 1..{n_layers}")
        if level_rule not in LEVEL_RULES:
            raise ConfigError(f"magnet: method.level_rule={level_rule!r}; expected one of {list(LEVEL_RULES)}")
        self.in_size, self.leaf_size = int(in_size), int(leaf_size)
        self.source_sizes = [int(source_size)] * (n_layers - 1) + [int(last_source_size)]
        self.detach_leaves, self.level_rule, self.aux_weight = detach_leaves, level_rule, float(aux_weight)
        self.grey = None if grey_tol is None else GreyFilter(tol=int(grey_tol))
        self.pretrained, self.names = bool(pretrained), (backbone, aux_backbone)
        self.weight_files = (backbone_weights, aux_weights)
        n_in, _ = tree_counts(self.patches)
        lin = {"n_samples": int(lin_samples), "radius": float(lin_radius)} if sampler == "linearized" else {}
        self.layers = nn.ModuleList(
            MagnifyingLayer(n_in[i], p, self.leaf_size if i == n_layers - 1 else self.in_size,
                            freeze_first=frozen_patch and i == 1, tanh_on=tanh_on, min_scale=min_scale,
                            sampler=sampler, lin_kwargs=lin)
            for i, p in enumerate(self.patches))
        self.backbone = build_backbone(backbone)
        self.gru = nn.GRU(self.backbone.dim, gru_hidden, batch_first=True, bidirectional=True)
        dims = [2 * gru_hidden, *(int(m) for m in mlp)]
        self.mlp = nn.Sequential(*[m for a, b in zip(dims[:-1], dims[1:], strict=True)
                                   for m in (nn.Linear(a, b), nn.ReLU())])
        self.head = MultiHead(dims[-1], num_classes)
        self.aux = nn.ModuleDict({f"layer{a}": AuxClassifier(build_backbone(aux_backbone), num_classes)
                                  for a in self.aux_layers})
        self._slides = SlideCache(max_open=max_open)
        self.train()  # build_backbone returns eval-mode models; Lightning keeps submodule modes

    def load_pretrained(self) -> None:
        """ImageNet weights (timm) or the local weight files into the leaf and aux backbones."""
        pairs = [(self.backbone, 0)] + [(a.backbone, 1) for a in self.aux.values()]
        for bb, i in pairs:
            if self.weight_files[i]:
                bb.load_weights(self.weight_files[i])
            elif self.pretrained:
                bb.model.load_state_dict(build_backbone(self.names[i], pretrained=True).model.state_dict())

    def _read(self, batch: SlideBatch, frames: torch.Tensor, contents: torch.Tensor, size: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """I' of K frames per slide, augmented like the slide: (B, K, 4) float64 level-0 frames
        and contents -> ((B, K, 3, size, size) images, (B, K) levels, (B, K) pixels read)."""
        images, levels, px = [], [], []
        for i, path in enumerate(batch.paths):
            mpp = float(batch.mpp[i])
            reader = self._slides.get(path, mpp=None if math.isnan(mpp) else mpp)
            img, lv, n = read_frames(reader, frames[i].numpy(), contents[i].numpy(), size,
                                     self.level_rule, self.grey)
            img = torch.from_numpy(img).permute(0, 3, 1, 2).float().div_(255)  # (K, 3, S, S)
            images.append(dihedral_tensor(img, *batch.aug[i].tolist()))
            levels.append(torch.from_numpy(lv))
            px.append(torch.from_numpy(n))
        return torch.stack(images).to(batch.images.device), torch.stack(levels), torch.stack(px)

    def magnify(self, batch: SlideBatch) -> tuple[list[torch.Tensor], RoiTree]:
        """Run the tree. Returns the children of every layer [(B, N_out(l), 3, o, o)] and the ROI
        tree (level-0 frames, crops in slide coordinates, read levels, pixel counts)."""
        if batch.images.shape[-1] != self.in_size:
            raise ConfigError(f"magnet: the batch images are {batch.images.shape[-1]} px but "
                              f"method.in_size={self.in_size}; set data.sampling.image_size={self.in_size}")
        b = len(batch)
        rot = torch.from_numpy(np.stack([dihedral_matrix(*a) for a in batch.aug.tolist()]))  # (B, 2, 2)
        x, y, side = batch.boxes[:, 0], batch.boxes[:, 1], batch.boxes[:, 2]
        frames = torch.stack([x, y, x + side, y + side], -1)[:, None]  # (B, 1, 4) square frame
        slide = torch.cat([torch.zeros(b, 2, dtype=torch.float64), batch.dimensions.double()], -1)
        contents = clip_boxes(frames, slide[:, None])  # (B, 1, 4)
        images = torch.stack([dihedral_tensor(im, *a) for im, a in zip(batch.images, batch.aug.tolist(),
                                                                        strict=True)])[:, None]
        sources, lv, px = self._read(batch, frames, contents, self.source_sizes[0])
        tree = RoiTree([frames], tuple(self.patches), levels=[lv])
        outputs, n_px, n_src, n_read = [], images[0].numel(), sources[0].numel(), px.sum(1)
        for i, layer in enumerate(self.layers):
            out = layer(images, sources)  # patches (B, N, P, 3, o, o), theta (B, N, P, 3)
            theta = out.theta.detach().double().cpu()
            t = torch.einsum("bij,bnpj->bnpi", rot, theta[..., 1:])  # translations, slide coords
            kids = child_frames(frames, torch.cat([theta[..., :1], t], -1))  # (B, N, P, 4)
            contents = clip_boxes(kids, contents[:, :, None]).flatten(1, 2)  # (B, N·P, 4)
            frames, images = kids.flatten(1, 2), out.patches.flatten(1, 2)  # (B, N·P, ...)
            tree.frames.append(frames)
            tree.theta.append(torch.cat([theta[..., :1], t], -1).flatten(1, 2))
            tree.scale.append(out.theta[:, :, int(layer.freeze_first):, 0].detach())
            outputs.append(images)
            n_px += images[0].numel()  # the next layer's inputs, or the leaves
            if i + 1 < len(self.layers):
                sources, lv, px = self._read(batch, frames, contents, self.source_sizes[i + 1])
                tree.levels.append(lv)
                n_src, n_read = n_src + sources[0].numel(), n_read + px.sum(1)
        tree.pixels = {"processed": n_px, "sources": n_src, "read": 3 * n_read.double()}  # values
        return outputs, tree

    def forward(self, batch: SlideBatch) -> MILOutput:
        """(B slides) -> MILOutput with logits {t: (B, C)}, aux losses ``loss_aux_layer{l}`` and
        ``aux_logits`` {"layer{l}": {t: (B, C)}}, ``roi_tree`` (its leaves included) and ``stats``."""
        outputs, tree = self.magnify(batch)
        leaves = outputs[-1]  # (B, N_L, 3, leaf, leaf)
        b, n = leaves.shape[:2]
        x = leaves.detach() if self.detach_leaves else leaves
        feats = self.backbone(x.flatten(0, 1)).view(b, n, -1)  # (B, N_L, D), tree order
        _, h = self.gru(feats)  # (2, B, H): final states of both directions
        logits = self.head(self.mlp(torch.cat([h[0], h[1]], -1)))  # {t: (B, C)}
        aux = {f"layer{a}": self.aux[f"layer{a}"](outputs[a - 1]) for a in self.aux_layers}
        losses = {}
        for name, lg in aux.items():
            ce = [F.cross_entropy(v.float(), batch.labels[t], ignore_index=-1) for t, v in lg.items()
                  if t in batch.labels and bool((batch.labels[t] >= 0).any())]
            if ce:
                losses[f"loss_aux_{name}"] = self.aux_weight * torch.stack(ce).mean()
        stats = {f"scale_layer{i + 1}": float(s.mean()) for i, s in enumerate(tree.scale) if s.numel()}
        stats |= {f"level_depth{d}": float(lv.double().mean()) for d, lv in enumerate(tree.levels)}
        pix = tree.pixels
        stats |= {"pixels_per_slide": float(pix["processed"]), "source_pixels_per_slide": float(pix["sources"]),
                  "pyramid_pixels_per_slide": float(pix["read"].mean())}
        tree.leaves = leaves.detach()
        return MILOutput(logits, aux_losses=losses, aux_logits=aux, roi_tree=tree, stats=stats)


@METHODS.register("magnet")
class MagNet(MILModule):
    """MagNets on whole slides read on the fly. Callbacks add loss terms with
    :meth:`~wsi_lightning.methods.base.MILModule.register_loss`, e.g. ``paradoxical_loss`` (L1)."""

    Net = MagNetNet
    input_kind = "slide"
    class_weighted = False  # the auxiliary classifiers' CE (L2) is the net's own
    auxiliary_outputs = True  # the layer-l classifiers (L2), what paradoxical_loss compares
