"""MagNets (Dimitriou et al., 2024): one paper, one package.

    model        MagNetNet (the tree, the classifier, the auxiliaries) and the registered MagNet
    magnify      the magnifying layer: ST stacks, spatial 1.5-entmax, crops, the ROI geometry
    lin_sampler  linearized multi-sampling (the differentiable crop)
    reads        the I' reads of the slide pyramid inside ``forward``
"""

from wsi_lightning.methods.magnet.model import MagNet, MagNetNet

__all__ = ["MagNet", "MagNetNet"]
