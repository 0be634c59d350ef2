"""Task -> torchmetrics collection (binary, multiclass; multi-tag = one collection per tag).

Every target is a softmax head with C >= 2 classes. Metric keys are ``{stage}/{metric}`` for
a single target and ``{stage}/{tag}/{metric}`` plus the tag average ``{stage}/{metric}`` for
multi-tag tasks. A target with no labelled slide in the epoch (every rank together), e.g. slides
to predict without labels, gives no metric keys.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryAveragePrecision,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassAveragePrecision,
    MulticlassF1Score,
)

METRIC_NAMES = ("auroc", "ap", "acc", "f1_macro", "f1_micro")


def make_metrics(num_classes: int) -> MetricCollection:
    """Metrics for one softmax target with ``num_classes`` classes.

    Binary targets (C = 2) use the positive-class probability for AUROC / AP and accuracy at
    0.5; multiclass AUROC / AP are macro (one-vs-rest) averages.
    """
    if num_classes < 2:
        raise ValueError(f"a target needs at least 2 classes, got {num_classes}")
    f1 = {
        "f1_macro": MulticlassF1Score(num_classes, average="macro"),
        "f1_micro": MulticlassF1Score(num_classes, average="micro"),
    }
    if num_classes == 2:
        return MetricCollection(
            {"auroc": BinaryAUROC(), "ap": BinaryAveragePrecision(), "acc": BinaryAccuracy(), **f1}
        )
    return MetricCollection(
        {
            "auroc": MulticlassAUROC(num_classes, average="macro"),
            "ap": MulticlassAveragePrecision(num_classes, average="macro"),
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            **f1,
        }
    )


class TaskMetrics(nn.Module):
    """One metric collection per target; update with probabilities, compute flat keys."""

    def __init__(self, num_classes: dict[str, int]) -> None:
        super().__init__()
        self.targets = list(num_classes)
        self.cols = nn.ModuleDict({t: make_metrics(c) for t, c in num_classes.items()})
        self.seen = dict.fromkeys(self.targets, 0)  # labelled slides this epoch, this rank

    def update(self, probs: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> None:
        """probs: {target: (B, C)}; labels: {target: (B,)}, entries < 0 (unknown) are skipped."""
        for t in self.targets:
            y = labels[t]
            keep = y >= 0
            if not bool(keep.any()):
                continue
            self.seen[t] += int(keep.sum())
            p = probs[t][keep]
            if p.shape[1] == 2:
                self.cols[t]["auroc"].update(p[:, 1], y[keep])
                self.cols[t]["ap"].update(p[:, 1], y[keep])
                self.cols[t]["acc"].update(p[:, 1], y[keep])
                self.cols[t]["f1_macro"].update(p, y[keep])
                self.cols[t]["f1_micro"].update(p, y[keep])
            else:
                self.cols[t].update(p, y[keep])

    def compute(self, stage: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        per_tag: dict[str, list[torch.Tensor]] = {m: [] for m in METRIC_NAMES}
        seen = self._seen_everywhere()
        for t in self.targets:
            if not seen[t]:
                continue
            vals = self.cols[t].compute()
            for m, v in vals.items():
                per_tag[m].append(v)
                if len(self.targets) > 1:
                    out[f"{stage}/{t}/{m}"] = v
        for m, vs in per_tag.items():
            if vs:
                out[f"{stage}/{m}"] = torch.stack([v.float() for v in vs]).mean()
        return out

    def _seen_everywhere(self) -> dict[str, int]:
        """Labelled slides per target over every rank (every rank must call this)."""
        import torch.distributed as dist

        counts = torch.tensor([self.seen[t] for t in self.targets], dtype=torch.long)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            counts = counts.to("cuda" if dist.get_backend() == "nccl" else "cpu")  # nccl: this rank's GPU
            dist.all_reduce(counts)
        return dict(zip(self.targets, counts.tolist(), strict=True))

    def reset(self) -> None:
        for c in self.cols.values():
            c.reset()
        self.seen = dict.fromkeys(self.targets, 0)
