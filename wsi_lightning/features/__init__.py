"""Tile features: backbones (timm), the per-slide feature store, importers for CLAM/TRIDENT.

Extraction itself (a Lightning predict run, heavier imports) lives in
``wsi_lightning.features.extract`` and is imported from there.
"""

from __future__ import annotations

from wsi_lightning.features.backbones import Backbone, DemoCNN, build_backbone, state_dict_hash
from wsi_lightning.features.foundation import FOUNDATION_MODELS
from wsi_lightning.features.importers import FORMATS, import_features, read_feature_file
from wsi_lightning.features.store import CALLER_ATTRS, STORE_ATTRS, FeatureStore

__all__ = [
    "CALLER_ATTRS",
    "FORMATS",
    "FOUNDATION_MODELS",
    "STORE_ATTRS",
    "Backbone",
    "DemoCNN",
    "FeatureStore",
    "build_backbone",
    "import_features",
    "read_feature_file",
    "state_dict_hash",
]
