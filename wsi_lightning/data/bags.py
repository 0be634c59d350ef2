"""Bag-of-features DataModule over the feature store.

``prepare_data()`` tiles and extracts whatever the store lacks (so an experiment can start
from raw slides), ``setup()`` splits slides by patient, and the loaders yield padded
:class:`~wsi_lightning.data.batch.Bag` batches. Under DDP, training uses a shuffling
``DistributedSampler``; validation and test give each rank a disjoint, unpadded share, so
metrics and prediction files cover every slide (or case) exactly once.

Patient-level bags (``data.bag_level=case``, :class:`CaseBagDataset`): one bag per
``case_id``, the instances of all its slides concatenated (slides in manifest order, each
slide's rows in store order), labelled with the label its slides share
(:meth:`~wsi_lightning.manifest.Manifest.labels_by_case`). ``Bag.slide_ids`` then holds case
ids, ``Bag.slides`` each case's slides and ``Bag.slide_index`` each instance's slide, so
coordinates stay in their own slide's frame and heat-maps stay per slide. The split is the
same patient-level one (every slide of a case in one split); the feature statistics
(``data.standardize``) are the training slides' as before; ``max_bag_size`` subsamples the
whole case bag. Only :class:`BagDataModule` (plain stores) builds case bags; the others
refuse ``data.bag_level=case`` at config time (:meth:`SplitDataModule.check_bag_level`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, ClassVar
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from wsi_lightning.data.batch import Bag, collate_bags
from wsi_lightning.manifest import Manifest, patient_split
from wsi_lightning.config import to_dict
from wsi_lightning.errors import ConfigError, StoreError
from wsi_lightning.features.store import FeatureStore
from wsi_lightning.registry import DATAMODULES

log = logging.getLogger(__name__)


class FeatureScaler:
    """Per-dimension standardisation (``data.standardize``): ``(x - mean) / std`` with the
    statistics of the training slides' instances, so no validation or test slide leaks in.

    Frozen features are often far from zero-mean / unit-variance (post-ReLU ImageNet features,
    or the random ``demo_cnn``, whose per-dimension spread is ~0.08 around a mean of ~0.47):
    small MIL heads then see a nearly constant input and learn slowly or not at all.
    """

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.mean, self.std = mean.astype(np.float32), std.astype(np.float32)
        # (x - mean) / std = shift + x * scale, one fused torch op (__call__)
        self._shift = torch.from_numpy(-self.mean / self.std)
        self._scale = torch.from_numpy((1.0 / self.std).astype(np.float32))

    @classmethod
    def fit(cls, store: FeatureStore, slide_ids: list[str], max_slides: int = 256,
            seed: int = 0) -> FeatureScaler:
        """Mean and std over every instance of (at most ``max_slides`` random) training slides;
        dimensions that never vary keep std 1."""
        ids = sorted(slide_ids)
        if len(ids) > max_slides:
            ids = sorted(np.random.default_rng(seed).choice(ids, max_slides, replace=False).tolist())
        total, sq, n = 0.0, 0.0, 0
        for sid in ids:
            f = np.asarray(store.read_features(sid), dtype=np.float64)  # (N, D)
            total, sq, n = total + f.sum(0), sq + (f * f).sum(0), n + len(f)
        if n == 0:
            raise StoreError(f"feature store {store.root}: the training slides have no instances "
                             "to standardise with (data.standardize=true)")
        mean = total / n
        std = np.sqrt(np.maximum(sq / n - mean * mean, 0.0))
        std[std < 1e-6] = 1.0
        log.info("data.standardize: feature mean/std from %d training slides (%d instances)", len(ids), n)
        return cls(mean, std)

    def __call__(self, feats: np.ndarray) -> np.ndarray:
        # torch's fp16 -> fp32 conversion and one fused multiply-add: a 3,000 x 1,024 fp16 bag
        # in ~4.6 ms, where NumPy's (x - mean) / std took ~17 ms (bench cohort: z-scoring was
        # ~70% of a bag's loading CPU); equal to 1e-6
        arr = np.asarray(feats)
        if not (arr.flags.writeable and arr.flags.c_contiguous):  # torch.from_numpy needs both
            arr = np.array(arr)
        return torch.addcmul(self._shift, torch.from_numpy(arr).to(torch.float32), self._scale).numpy()

    def state_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> FeatureScaler:
        return cls(np.asarray(state["mean"]), np.asarray(state["std"]))


class BagDataset(Dataset):
    """Bags of one split.

    Args:
        store: feature store holding every slide.
        slide_ids: slides of this split.
        labels: {target: {slide_id: class index}}.
        max_bag_size: if set, a random subset of at most this many instances per visit.
        scaler: standardises every slide's features as it is read (None: as stored).
    """

    def __init__(self, store: FeatureStore, slide_ids: list[str], labels: dict[str, dict[str, int]],
                 max_bag_size: int | None = None, scaler: FeatureScaler | None = None, seed: int = 0) -> None:
        self.store, self.slide_ids, self.labels = store, list(slide_ids), labels
        self.max_bag_size, self.scaler, self.seed = max_bag_size, scaler, int(seed)
        self.epoch = 0  # of plain-index reads; loaders pass (index, epoch) keys

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def subset(self, n: int, i: int, epoch: int) -> torch.Tensor | None:
        """The sorted ``max_bag_size`` instances of slide ``i`` at ``epoch`` (None: all), drawn
        from ``(seed, i, epoch)``: the same in any worker, new each epoch."""
        if not self.max_bag_size or n <= self.max_bag_size:
            return None
        rng = np.random.default_rng([self.seed, i, epoch + 1])
        return torch.from_numpy(np.sort(rng.permutation(n)[: self.max_bag_size]))

    def __len__(self) -> int:
        return len(self.slide_ids)

    def read(self, sid: str) -> tuple[np.ndarray, np.ndarray]:
        """One slide's (N, D) features (standardised when a scaler is set) and (N, 2) coords."""
        feats, coords = self.store.read(sid)
        return (feats if self.scaler is None else self.scaler(feats)), coords

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, epoch = index_and_epoch(key, self.epoch)
        sid = self.slide_ids[i]
        feats, coords = self.read(sid)  # (N, D), (N, 2)
        feats_t, coords_t = torch.from_numpy(feats), torch.from_numpy(coords)
        keep = self.subset(len(feats_t), i, epoch)
        if keep is not None:
            feats_t, coords_t = feats_t[keep], coords_t[keep]
        return {"features": feats_t, "coords": coords_t, "slide_id": sid,
                "labels": {t: lab[sid] for t, lab in self.labels.items()}}


class CaseBagDataset(BagDataset):
    """Patient-level bags of one split (``data.bag_level=case``): one bag per case, every
    instance of every slide of the case, each with the slide it came from.

    Args:
        store: feature store holding every slide.
        cases: {case_id: its slides (in this split, with features)}, the bags in order.
        labels: {target: {case_id: class index}} (:meth:`Manifest.labels_by_case`).
        max_bag_size: if set, a random subset of at most this many of the case's instances
            per visit (drawn from ``(seed, case index, epoch)``, as for slides).
        scaler: standardises every slide's features as it is read (None: as stored).

    Items hold ``slide_id`` (the case id, the bag's id), ``slides`` and ``slide_index`` (N,)
    (each instance's slide, an index into ``slides``) besides the features and coords.
    """

    def __init__(self, store: FeatureStore, cases: dict[str, list[str]], labels: dict[str, dict[str, int]],
                 max_bag_size: int | None = None, scaler: FeatureScaler | None = None, seed: int = 0) -> None:
        super().__init__(store, list(cases), labels, max_bag_size=max_bag_size, scaler=scaler, seed=seed)
        self.cases = {c: list(s) for c, s in cases.items()}

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, epoch = index_and_epoch(key, self.epoch)
        cid = self.slide_ids[i]
        slides = self.cases[cid]
        parts = [self.read(sid) for sid in slides]  # [((N_k, D), (N_k, 2))]
        feats_t = torch.from_numpy(np.concatenate([f for f, _ in parts]))  # (N, D), N = sum N_k
        coords_t = torch.from_numpy(np.concatenate([c for _, c in parts]))  # (N, 2), per slide's frame
        index = torch.repeat_interleave(torch.arange(len(slides)), torch.tensor([len(f) for f, _ in parts]))  # (N,)
        keep = self.subset(len(feats_t), i, epoch)
        if keep is not None:
            feats_t, coords_t, index = feats_t[keep], coords_t[keep], index[keep]
        return {"features": feats_t, "coords": coords_t, "slide_id": cid, "slides": list(slides),
                "slide_index": index, "labels": {t: lab[cid] for t, lab in self.labels.items()}}


# ----------------------------------------------------------------------------- epoch keys
def index_and_epoch(key: int | tuple[int, int], epoch: int) -> tuple[int, int]:
    """``(i, epoch)`` of a dataset key: an index, or an ``(index, epoch)`` pair."""
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return int(key), int(epoch)


class EpochKeys:
    """Mixin for an index sampler: yields ``(index, epoch)`` pairs instead of indices.

    DataLoader workers (persistent ones included) hold copies of the dataset made when they
    started, so an epoch set on the dataset in the main process never reaches them; the
    sampler runs in the main process and its indices are sent to the workers, so the epoch
    travels with each index. Lightning calls ``set_epoch`` on the training loader's sampler at
    the start of every epoch (resumed runs included), before the epoch's batches are fetched.
    """

    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch  # fixed when the epoch's iterator is made
        return ((int(i), epoch) for i in super().__iter__())


class EpochRandomSampler(EpochKeys, RandomSampler):
    """A shuffling sampler (torch's global RNG, as ``shuffle=True``) of ``(index, epoch)``."""


class EpochDistributedSampler(EpochKeys, DistributedSampler):
    """``DistributedSampler`` (shuffled by ``seed`` + epoch) of ``(index, epoch)`` pairs."""


def epoch_sampler(dataset: Dataset, world: int = 1, rank: int = 0,
                  seed: int = 0) -> EpochRandomSampler | EpochDistributedSampler:
    """The training sampler of a dataset whose draws are seeded by ``(seed, index, epoch)``:
    a shuffle of every index on one process, this rank's shuffled share under DDP."""
    if world > 1:
        return EpochDistributedSampler(dataset, world, rank, shuffle=True, seed=seed)
    return EpochRandomSampler(dataset)



class UnpaddedDistributedSampler(Sampler[int]):
    """Rank r gets indices r, r + W, r + 2W, ...: disjoint, no repeats, possibly uneven."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.idx = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.idx)

    def __len__(self) -> int:
        return len(self.idx)


def datamodule_for(input_kind: str, tiling: str | None) -> type:
    """The registered DataModule serving a method's ``input_kind`` from a store made with
    ``tiling.multiscale.mode`` = ``tiling`` (every DataModule states both, ``layout`` and
    ``input_kinds``); a ConfigError naming what would serve it otherwise."""
    served = {(cls.layout, kind): cls for name in DATAMODULES for cls in [DATAMODULES.get(name)]
              for kind in cls.input_kinds}
    if (None, input_kind) in served:  # read on the fly: no store, any tiling
        return served[(None, input_kind)]
    if (tiling, input_kind) in served:
        return served[(tiling, input_kind)]
    need = sorted(str(layout) for layout, kind in served if kind == input_kind)
    raise ConfigError(f"no data for {input_kind!r} input from tiling.multiscale.mode={tiling}; "
                      f"set tiling.multiscale.mode to one of {need}")


BAG_LEVELS = ("slide", "case")


def require_bag_level(cls: type, level: str) -> None:
    """``level`` (``data.bag_level``) is one the DataModule class ``cls`` builds (its
    ``bag_levels``), else a ConfigError naming the key, the DataModule and the fix."""
    if level not in BAG_LEVELS:
        raise ConfigError(f"config key 'data.bag_level' = {level!r}; expected one of {list(BAG_LEVELS)}")
    if level in getattr(cls, "bag_levels", ("slide",)):
        return
    layout = getattr(cls, "layout", None)
    what = "on-the-fly slide sampling" if layout is None else f"tiling.multiscale.mode={layout} stores"
    raise ConfigError(f"data.bag_level={level}: {cls.__name__} ({what}) builds one bag per slide only; "
                      "patient-level bags (one per case_id) are built from plain feature stores "
                      "(tiling.multiscale.mode=none) for methods taking 'bag' input. Set "
                      "data.bag_level=slide")


class SplitDataModule(L.LightningDataModule):
    """What every DataModule shares: the manifest and its patient-level split, the class
    names, the loaders (training: a shuffling sampler of ``(index, epoch)`` keys; DDP: this
    rank's share, unpadded at validation / test) and moving batches (``batch.to(device)``).

    Subclasses set ``datasets`` in ``setup`` (after :meth:`split`) and may override
    :meth:`loader_kwargs` (batch size, collate function, workers' settings).
    """

    # data.bag_level values this DataModule builds: "slide" (one bag per slide), "case" (one per case_id)
    bag_levels: ClassVar[tuple[str, ...]] = ("slide",)

    @classmethod
    def check_bag_level(cls, cfg: Any) -> None:
        """Raise ConfigError if this DataModule cannot build ``data.bag_level`` bags (config time)."""
        require_bag_level(cls, str(cfg.data.get("bag_level", "slide")))

    def __init__(self, manifest: Manifest, split: dict | None = None, batch_size: int = 1,
                 num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.manifest, self.split_cfg = manifest, dict(split or {})
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        # a split smaller than the number of ranks leaves some ranks without a slide (Lightning hook)
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self.splits: dict[str, list[str]] = {}
        self.datasets: dict[str, Any] = {}

    @property
    def num_classes(self) -> dict[str, int]:
        return self.manifest.num_classes

    @property
    def class_names(self) -> dict[str, list[str]]:
        return self.manifest.classes

    def train_labels(self) -> dict[str, np.ndarray]:
        """{target: (S,) int64 class index of every training slide}, -1 where unknown (after
        ``setup("fit")``; what ``loss.class_weights=balanced`` counts)."""
        train = set(self.splits.get("train", []))
        return {t: np.array([i for s, i in by_slide.items() if s in train], dtype=np.int64)
                for t, by_slide in self.manifest.labels_by_slide().items()}

    def split(self) -> dict[str, list[str]]:
        """The patient-level split of ``data.split`` (see :func:`patient_split`)."""
        s = self.split_cfg
        return patient_split(self.manifest, val=float(s.get("val", 0.15)), test=float(s.get("test", 0.3)),
                             seed=int(s.get("seed", 0)), fold=s.get("fold"))

    def loader_kwargs(self, split: str) -> dict[str, Any]:
        """DataLoader arguments beyond the dataset and the sampler."""
        return {"batch_size": self.batch_size, "num_workers": self.num_workers,
                "persistent_workers": self.num_workers > 0}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self.datasets[split]
        world = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        sampler: Sampler | None = None
        if shuffle:  # (index, epoch) keys: the epoch reaches every worker (EpochKeys)
            sampler = epoch_sampler(ds, world, rank, int(self.split_cfg.get("seed", self.seed)))
        elif world > 1:
            sampler = UnpaddedDistributedSampler(len(ds), rank, world)
        return DataLoader(ds, sampler=sampler, **self.loader_kwargs(split))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        to = getattr(batch, "to", None)
        return to(device) if callable(to) else super().transfer_batch_to_device(batch, device, dataloader_idx)


@DATAMODULES.register("bags")
class BagDataModule(SplitDataModule):
    """Feature bags from a plain store (``tiling.multiscale.mode=none``).

    Every DataModule declares the store ``layout`` it reads (a ``tiling.multiscale.mode``;
    None: slides read on the fly) and the method ``input_kinds`` it serves, checks a config
    (:meth:`check_config`, at config time) and builds itself from one (:meth:`from_config`).

    Args:
        manifest: the validated slide manifest.
        store: feature store folder.
        split: ``{val, test, seed, fold}`` (see :func:`patient_split`).
        batch_size: bags per batch (padded with masks).
        max_bag_size: training-time instance subsampling.
        num_workers: DataLoader workers.
        standardize: z-score every feature dimension with the training slides' statistics
            (:class:`FeatureScaler`, fitted in ``setup()``).
        prepare: called by ``prepare_data()`` to fill the store (tiling + extraction); None
            when the store is already complete.
        bag_level: ``slide`` (one bag per slide) or ``case`` (one per ``case_id``, every slide
            of the case: :class:`CaseBagDataset`; the labels of a case's slides must agree,
            checked here). With ``case``, ``splits`` still lists slides and ``cases`` lists
            each split's cases; metrics and prediction rows are per case.
    """

    layout: ClassVar[str | None] = "none"
    input_kinds: ClassVar[tuple[str, ...]] = ("bag",)
    bag_levels: ClassVar[tuple[str, ...]] = ("slide", "case")

    @classmethod
    def check_config(cls, cfg: Any, input_kind: str) -> None:
        """Raise ConfigError if ``cfg`` cannot give ``input_kind`` input (before any data work)."""

    @classmethod
    def common_kwargs(cls, cfg: Any, prepare: Callable[[], object] | None) -> dict[str, Any]:
        """The ``data:`` arguments every feature-bag DataModule takes."""
        return dict(split=to_dict(cfg.data.split), batch_size=int(cfg.data.batch_size),
                    max_bag_size=cfg.data.max_bag_size, num_workers=int(cfg.data.num_workers), prepare=prepare,
                    standardize=bool(cfg.data.standardize), bag_level=str(cfg.data.get("bag_level", "slide")))

    @classmethod
    def from_config(cls, cfg: Any, manifest: Manifest, store: str | Path,
                    prepare: Callable[[], object] | None = None) -> BagDataModule:
        return cls(manifest, store, **cls.common_kwargs(cfg, prepare))

    def __init__(self, manifest: Manifest, store: str | Path, split: dict | None = None,
                 batch_size: int = 1, max_bag_size: int | None = None, num_workers: int = 0,
                 prepare: Callable[[], object] | None = None, standardize: bool = False,
                 bag_level: str = "slide") -> None:
        require_bag_level(type(self), bag_level)
        super().__init__(manifest, split, batch_size, num_workers, seed=int((split or {}).get("seed", 0)))
        self.bag_level = bag_level
        # case bags: the labels of a case's slides must agree; fails before any data work
        self.case_labels = manifest.labels_by_case() if bag_level == "case" else None
        self.cases: dict[str, list[str]] = {}  # case bags: split -> case ids
        self.store = FeatureStore(store)
        self.max_bag_size = max_bag_size
        self._prepare, self._prepared = prepare, False
        self.left_out: dict[str, list[str]] = {}  # split -> slides the store lacks (skip_errors)
        self.standardize = standardize
        self.scaler: FeatureScaler | None = None

    @property
    def in_dim(self) -> int:
        return self.store.feature_dim()

    def prepare_data(self) -> None:
        """Extract what the store lacks, once per process: ``run.fit`` calls it before DDP
        children exist, then ``trainer.fit`` and ``trainer.test`` call it again (a failing slide
        was retried, and its errors printed, three times)."""
        if self._prepare is not None and not self._prepared:
            self._prepare()
            self._prepared = True

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        s = self.split_cfg
        self.splits = self.split()
        available = set(self.store.complete_slides())
        missing = [sid for ids in self.splits.values() for sid in ids if sid not in available]
        if missing:
            report = self.store.root / "errors.csv"
            why = f" (failures recorded in {report})" if report.exists() else ""
            self.left_out = {k: [i for i in v if i not in available] for k, v in self.splits.items()}
            log.warning("feature store %s lacks %d slide(s)%s; they are left out (%s): %s",
                        self.store.root, len(missing), why,
                        ", ".join(f"{k} {len(v)}" for k, v in self.left_out.items() if v), missing[:10])
            if self.left_out.get("test"):
                log.warning("the test split lost %d of its %d slides: test metrics are over the rest "
                            "(metrics.json records test/slides_left_out)", len(self.left_out["test"]),
                            len(self.splits["test"]))
            self.splits = {k: [i for i in v if i in available] for k, v in self.splits.items()}
        if not self.splits["train"] and stage in (None, "fit"):
            raise StoreError(f"feature store {self.store.root}: no training slide has features; "
                             "run `wsi extract <manifest>` first")
        if self.standardize and self.scaler is None and not self.splits["train"]:
            raise StoreError("data.standardize=true but there is no training slide to fit the feature "
                             "statistics on and none were restored from a checkpoint (run.restore_datamodule); "
                             "test or predict from a checkpoint of a run trained with this version")
        if self.standardize and self.scaler is None:  # restored by load_state_dict: kept as trained
            self.scaler = FeatureScaler.fit(self.store, self.splits["train"], seed=int(s.get("seed", 0)))
        if self.bag_level == "case":
            self._setup_cases(int(s.get("seed", 0)))
            return
        labels = self.manifest.labels_by_slide()
        for name, ids in self.splits.items():
            mbs = self.max_bag_size if name == "train" else None
            self.datasets[name] = BagDataset(self.store, ids, labels, max_bag_size=mbs, scaler=self.scaler,
                                             seed=int(s.get("seed", 0)))
        log.info("splits (slides): %s", {k: len(v) for k, v in self.splits.items()})

    def _setup_cases(self, seed: int) -> None:
        """One :class:`CaseBagDataset` per split: each case of the split with its slides that
        have features (a case with none left is left out, its slides counted in ``left_out``)."""
        for name, ids in self.splits.items():
            have = set(ids)
            cases = {c: [x for x in slides if x in have] for c, slides in self.manifest.cases().items()}
            cases = {c: v for c, v in sorted(cases.items()) if v}
            self.cases[name] = list(cases)
            mbs = self.max_bag_size if name == "train" else None
            self.datasets[name] = CaseBagDataset(self.store, cases, self.case_labels, max_bag_size=mbs,
                                                 scaler=self.scaler, seed=seed)
        log.info("splits (cases / slides): %s", {k: f"{len(self.cases[k])} / {len(v)}" for k, v in self.splits.items()})

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the training-set feature statistics, so a test or
        prediction run from the checkpoint standardises new slides exactly as in training."""
        return {} if self.scaler is None else {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "scaler" not in state:
            return
        width = self.store.feature_dim()  # as stored (a concentric store: every scale side by side)
        if len(state["scaler"]["mean"]) != width:
            raise StoreError(f"the checkpoint's feature statistics are {len(state['scaler']['mean'])}-d "
                             f"but store {self.store.root} holds {width}-d features; use the "
                             "store (backbone) the model was trained on")
        self.scaler = FeatureScaler.from_state(state["scaler"])
        for ds in self.datasets.values():  # Lightning restores after setup(): swap it in
            ds.scaler = self.scaler

    def loader_kwargs(self, split: str) -> dict[str, Any]:
        return {**super().loader_kwargs(split), "batch_size": self._batch_size(split), "collate_fn": self.collate}

    collate = staticmethod(collate_bags)

    def _batch_size(self, split: str) -> int:
        return self.batch_size

