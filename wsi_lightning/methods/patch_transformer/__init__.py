"""Patch Transformer (Li et al., MICCAI 2019): one paper, one package.

    model   PatchTransformerNet and the registered PatchTransformer
    block   the patch transformation (transformer encoder over patches) and multi-tag attention
"""

from wsi_lightning.methods.patch_transformer.model import PatchTransformer, PatchTransformerNet

__all__ = ["PatchTransformer", "PatchTransformerNet"]
