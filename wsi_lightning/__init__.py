"""wsi_lightning: weakly-supervised whole-slide-image learning on PyTorch Lightning."""

__version__ = "0.1.0"
