"""Statistics, figures and interpretation: pure functions over predictions, scores and tiles.

    metrics     task -> torchmetrics collections (the figures every run logs)
    stats       DeLong and paired-bootstrap tests between two classifiers (CS-MIL's Table 2)
    confusion   normalised confusion matrices per tag (Patch Transformer's Figure 2)
    mechanism   does a method look at the lesions? (ROI overlap, cascade recall, localisation AUC)
    interpret   piece-wise feature attribution (Pirovano et al.)
    viz         heat-maps and overlays on slide thumbnails

Below ``nn`` / ``methods`` / ``callbacks``: nothing here imports a method or a callback.
"""
