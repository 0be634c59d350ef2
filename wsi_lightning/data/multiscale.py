"""Multi-scale coordinate-aligned bags: ``(B, N, S, D)`` with masks.

A multi-scale slide lives in the feature store like any other, its S scales concatenated per
row: features (N, S * D), attribute ``scales`` = S (and the window sizes in µm). Row i of every
scale is the same location (concentric windows sharing a centre). The DataModule turns rows
back into (N, S, D) and offers the views the CS-MIL baselines need (``mode``):

    stack     (N, S, D)      CS-MIL
    select    (N, D)         one scale (``scale``): single-scale baselines
    flatten   (N * S, D)     every scale an independent instance (multi-scale DeepAttnMISL, GA)
    sum       (N, D)         same-location features added (MDMIL)
    concat    (N, S * D)     same-location features concatenated (DSMIL-style)

CS-MIL's bag sampling (``docs/methods.md`` 3.5) is :class:`ClusterSampling`: per-slide K-means
phenotypes, a per-cluster draw with replacement, one masked placeholder per empty cluster, a
fresh bag per epoch; at test time ``test_bags`` random bags per slide whose probabilities the
module averages (MILModule groups rows of a batch that share a slide id).

Randomness: a training bag of slide i at epoch e is drawn from ``(seed, i, e)`` (the training
sampler yields ``(i, e)`` keys, see :class:`~wsi_lightning.data.bags.EpochKeys`), evaluation
bags from ``(seed, i)``; the K-means phenotypes are a function of the slide's features alone
(fixed ``random_state``, one thread). So bags do not depend on ``num_workers`` or on which
worker clustered a slide first.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from wsi_lightning.data.bags import BagDataModule, BagDataset, index_and_epoch
from wsi_lightning.data.batch import Bag, collate_bags
from wsi_lightning.config import to_dict
from wsi_lightning.errors import ConfigError, StoreError
from wsi_lightning.manifest import Manifest
from wsi_lightning.registry import DATAMODULES

log = logging.getLogger(__name__)
MODES = ("stack", "select", "flatten", "sum", "concat")


@dataclass
class ClusterSampling:
    """Cluster-stratified bags (CS-MIL).

    Attributes:
        k: phenotype clusters per slide (K-means, random_state 0).
        cluster_scale: the scale whose features are clustered (the code: 20x = 0).
        per_cluster: patches drawn per cluster (paper 8); None draws ``N(mean_len, var_len)``
            per bag like the released code (mean 3, var 1).
        mean_len / var_len: the code's bag length distribution.
    """

    k: int = 8
    cluster_scale: int = 0
    per_cluster: int | None = 8
    mean_len: float = 3.0
    var_len: float = 1.0

    def clusters(self, feats: np.ndarray) -> np.ndarray:
        """(N, D) -> (N,) cluster id (fewer than k tiles: one cluster per tile).

        One thread: K-means adds per-thread partial sums in the order the threads finish, so
        with several the centres (and an occasional label) could differ from one process to
        the next; with one, the result depends on the features only.
        """
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits

        n = len(feats)
        if n <= self.k:
            return np.arange(n)
        with threadpool_limits(limits=1):
            return KMeans(self.k, random_state=0, n_init=1).fit_predict(feats.astype(np.float32))

    def draw(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Row indices of one bag; -1 marks the placeholder of an empty cluster."""
        n_c = self.per_cluster or max(1, int(rng.normal(self.mean_len, self.var_len)))
        out = []
        for c in range(self.k):
            members = np.flatnonzero(labels == c)
            if len(members) == 0:
                out.append(np.array([-1]))
            else:
                out.append(rng.choice(members, size=min(n_c, len(members)), replace=True))
        idx = np.concatenate(out)
        rng.shuffle(idx)
        return idx


def scale_view(x: torch.Tensor, mode: str, scale: int = 0) -> torch.Tensor:
    """(N, S, D) -> the ``mode`` view (see the module docstring)."""
    n, s, d = x.shape
    if mode == "stack":
        return x
    if mode == "select":
        return x[:, scale]
    if mode == "flatten":
        return x.reshape(n * s, d)
    if mode == "sum":
        return x.sum(1)
    if mode == "concat":
        return x.reshape(n, s * d)
    raise ConfigError(f"data.multiscale.mode '{mode}'; expected one of {list(MODES)}")


class MultiScaleBagDataset(BagDataset):
    """Bags of one split, with scale views, optional cluster sampling and test-time repeats.

    Indexed by ``i`` or ``(i, epoch)`` (the training sampler's keys); a plain ``i`` uses
    :attr:`epoch` (:meth:`set_epoch`). Training bags are drawn from ``(seed, i, epoch)``,
    evaluation bags (``train=False``) from ``(seed, i)``: the same R bags every epoch.
    """

    def __init__(self, *args, mode: str = "stack", scale: int = 0, sampling: ClusterSampling | None = None,
                 repeats: int = 1, seed: int = 0, train: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mode, self.scale, self.sampling, self.repeats = mode, scale, sampling, repeats
        self.seed, self.train = seed, train
        self._clusters: dict[str, np.ndarray] = {}  # slide id -> (N,) cluster ids, per process

    def clusters(self, sid: str, x: torch.Tensor) -> np.ndarray:
        """(N,) phenotype cluster of each row of slide `sid` ((N, S, D) features `x`), computed
        once per process; the same in every process (:meth:`ClusterSampling.clusters`)."""
        if sid not in self._clusters:
            self._clusters[sid] = self.sampling.clusters(x[:, self.sampling.cluster_scale].numpy())
        return self._clusters[sid]

    def _scales(self, sid: str) -> int:
        s = int(self.store.attrs(sid).get("scales") or 0)
        if s < 1:
            raise StoreError(f"feature store {self.store.root}: slide '{sid}' has no 'scales' attribute; "
                             "extract it with tiling.multiscale.mode=concentric")
        return s

    def _bag(self, x: torch.Tensor, coords: torch.Tensor, labels: np.ndarray | None,
             rng: np.random.Generator) -> dict:
        """One bag: the ``mode`` view of all rows, or of a cluster-stratified draw."""
        mask = torch.ones(len(x), dtype=torch.bool)
        if self.sampling is not None:
            idx = torch.from_numpy(self.sampling.draw(labels, rng))
            mask = idx >= 0
            x = x[idx.clamp(min=0)] * mask.view(-1, 1, 1)  # placeholders are zero rows
            coords = coords[idx.clamp(min=0)]
        view = scale_view(x, self.mode, self.scale)
        if self.mode == "flatten":
            s = x.shape[1]
            mask, coords = mask.repeat_interleave(s), coords.repeat_interleave(s, 0)
        return {"features": view, "valid": mask, "coords": coords}

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, epoch = index_and_epoch(key, self.epoch)
        sid = self.slide_ids[i]
        feats, coords = self.read(sid)  # (N, S*D), (N, 2)
        x = torch.from_numpy(feats).float().view(len(feats), self._scales(sid), -1)  # (N, S, D)
        labels = None if self.sampling is None else self.clusters(sid, x)
        # training: a fresh bag per epoch; evaluation: the same R bags every epoch
        rng = np.random.default_rng([self.seed, i, epoch + 1] if self.train else [self.seed, i, 0])
        meta = {"slide_id": sid, "labels": {t: lab[sid] for t, lab in self.labels.items()}}
        items = [{**self._bag(x, torch.from_numpy(coords), labels, rng), **meta} for _ in range(self.repeats)]
        return items[0] if self.repeats == 1 else {"repeats": items}


def collate_multiscale(items: list[dict]) -> Bag:
    """Pad bags (repeated test bags of one slide become rows sharing a slide id)."""
    flat = [r for it in items for r in (it["repeats"] if "repeats" in it else [it])]
    bag = collate_bags(flat)
    for b, it in enumerate(flat):  # placeholders of empty clusters are masked out
        bag.mask[b, : len(it["valid"])] &= it["valid"]
    return bag


@DATAMODULES.register("multiscale_bags")
class MultiScaleBagDataModule(BagDataModule):
    """Multi-scale bags from a concentric store, one per slide (``data.bag_level=case`` is
    refused at config time: the scale views and cluster sampling are per slide).

    Args (beyond :class:`BagDataModule`'s):
        mode: scale view (``stack | select | flatten | sum | concat``).
        scale: the scale of ``select``.
        sampling: cluster-stratified bags (CS-MIL); None uses whole bags.
        test_bags: random bags per slide at validation / test time (averaged); 1 = one bag.
        seed: sampling seed; a training bag of slide i at epoch e is drawn from (seed, i, e), the
            epoch reaching every DataLoader worker through the training sampler's keys.
    """

    layout = "concentric"
    input_kinds = ("bag", "multiscale")
    bag_levels = ("slide",)  # one bag per slide: data.bag_level=case is refused at config time

    @classmethod
    def check_config(cls, cfg: Any, input_kind: str) -> None:
        if cfg.data.quadtree.level is not None:
            raise ConfigError(f"data.quadtree.level={cfg.data.quadtree.level} applies to quadtree stores; "
                              "on a concentric store choose a scale with data.multiscale.mode=select "
                              "data.multiscale.scale=S (0 = the finest)")
        mode = str(cfg.data.multiscale.mode)
        if (input_kind == "multiscale") != (mode == "stack"):
            want = ("stack (every scale)" if input_kind == "multiscale"
                    else "select (one scale) or flatten / sum / concat")
            raise ConfigError(f"a method taking {input_kind} input on a concentric store needs "
                              f"data.multiscale.mode={want}; the config has {mode}")

    @classmethod
    def from_config(cls, cfg: Any, manifest: Manifest, store: str | Path,
                    prepare: Callable[[], object] | None = None) -> MultiScaleBagDataModule:
        ms = cfg.data.multiscale
        smp = {k: v for k, v in to_dict(ms.sampling).items() if k != "enabled"}
        sampling = ClusterSampling(**smp) if ms.sampling.enabled else None
        return cls(manifest, store, mode=str(ms.mode), scale=int(ms.scale), sampling=sampling,
                   test_bags=int(ms.test_bags), seed=int(cfg.seed), **cls.common_kwargs(cfg, prepare))

    def __init__(self, *args, mode: str = "stack", scale: int = 0, sampling: ClusterSampling | None = None,
                 test_bags: int = 1, seed: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if mode not in MODES:
            raise ConfigError(f"data.multiscale.mode '{mode}'; expected one of {list(MODES)}")
        self.mode, self.scale, self.sampling, self.test_bags, self.seed = mode, scale, sampling, test_bags, seed

    @property
    def in_dim(self) -> int:
        sid = self.store.complete_slides()[0]
        s = int(self.store.attrs(sid).get("scales") or 1)
        d = self.store.feature_dim() // s
        return d * s if self.mode == "concat" else d

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        super().setup(stage)
        for name, ds in list(self.datasets.items()):
            repeats = self.test_bags if (name != "train" and self.sampling is not None) else 1
            self.datasets[name] = MultiScaleBagDataset(
                ds.store, ds.slide_ids, ds.labels, max_bag_size=ds.max_bag_size, scaler=ds.scaler, mode=self.mode,
                scale=self.scale, sampling=self.sampling, repeats=repeats, seed=self.seed, train=name == "train")

    collate = staticmethod(collate_multiscale)

    def _batch_size(self, split: str) -> int:
        return 1 if self.datasets[split].repeats > 1 else self.batch_size  # one slide's R bags a batch
