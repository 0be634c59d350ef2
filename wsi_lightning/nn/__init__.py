"""Blocks shared by two or more methods."""

from wsi_lightning.nn.attention import AttentionPool, masked_softmax
from wsi_lightning.nn.heads import MultiHead, decision_mlp, instance_mlp

__all__ = ["AttentionPool", "MultiHead", "decision_mlp", "instance_mlp", "masked_softmax"]
