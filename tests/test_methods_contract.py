"""Contract tests run over every registered method (timm style)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from tests.methods_helpers import CONTRACT_KWARGS, ZERO_GRAD_PARAMS, quadtree_bag
from wsi_lightning.build import import_registered
from wsi_lightning.data.bags import BagDataModule
from wsi_lightning.data.batch import Bag
from wsi_lightning.manifest import load_manifest
from wsi_lightning.methods.base import MILModule
from wsi_lightning.registry import METHODS

import_registered()
D = 16
TASKS = {"single": {"label": 2}, "multitag": {"stain": 3, "organ": 4}}


S = 3  # scales of multi-scale bags


def make_bag(b: int = 3, n: int = 12, pad_to: int | None = None, seed: int = 0, scales: int | None = None) -> Bag:
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([n - i for i in range(b)])
    nmax = pad_to or n
    feats = torch.randn(b, nmax, *((scales,) if scales else ()), D, generator=g)
    mask = torch.arange(nmax)[None] < lens[:, None]
    feats = feats * mask.view(b, nmax, *([1] * (feats.dim() - 2)))
    coords = torch.zeros(b, nmax, 2, dtype=torch.long)
    return Bag(feats, mask, coords, {}, [f"s{i}" for i in range(b)])


def kind_of(name: str) -> str:
    return METHODS.get(name).input_kind


# Methods trained end to end on whole slides (input_kind "slide": magnet) take no feature bags;
# their contract tests (shapes, gradients, fast_dev_run, checkpoints) are in tests/methods/.
# The two-step scikit-learn baselines (SlideEstimator) have no torch module: tests/methods/test_patch_baselines.py.
BAG_METHODS = [n for n in METHODS.names() if kind_of(n) != "slide" and issubclass(METHODS.get(n), MILModule)]


def bag_for(name: str, b: int = 3, n: int = 12, pad_to: int | None = None, seed: int = 0) -> Bag:
    """The input a method takes: plain, multi-scale (B, N, S, D) or quadtree bags (n // 4
    coarse tiles per bag, so the finest level has about 4n instances)."""
    if kind_of(name) == "quadtree":
        return quadtree_bag(D, b=b, n0=max(b + 1, n // 4), pad_to=pad_to and max(b + 1, pad_to // 4), seed=seed)
    if kind_of(name) == "patches":  # image bags (B, N, 3, 24, 24) for end-to-end methods
        bag = make_bag(b=b, n=n, pad_to=pad_to, seed=seed)
        g = torch.Generator().manual_seed(seed)
        lens = bag.mask.sum(1)
        imgs = torch.rand(b, bag.mask.shape[1], 3, 24, 24, generator=g)
        for i in range(b):  # valid images independent of the padding: same seed per bag
            imgs[i, : int(lens[i])] = torch.rand(int(lens[i]), 3, 24, 24,
                                                 generator=torch.Generator().manual_seed(seed * 100 + i))
        bag.features = imgs
        return bag
    return make_bag(b=b, n=n, pad_to=pad_to, seed=seed, scales=scales_of(name))


def small(name: str) -> dict:
    """A method's ``contract_kwargs``: the same code at small widths (paper widths are slow on CPU)."""
    return dict(CONTRACT_KWARGS.get(name, {}))


def build(name: str, task: str = "single"):
    return METHODS.get(name)(in_dim=D, num_classes=TASKS[task], **small(name)).eval()


def scales_of(name: str) -> int | None:
    """Multi-scale methods take (B, N, S, D) bags."""
    return S if METHODS.get(name).input_kind == "multiscale" else None


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("name", BAG_METHODS)
def test_shapes_and_no_nan(name: str, task: str):
    out = build(name, task)(bag_for(name))
    assert set(out.logits) == set(TASKS[task])
    for t, c in TASKS[task].items():
        assert out.logits[t].shape == (3, c)
        assert torch.isfinite(out.logits[t]).all()
    for v in out.aux_losses.values():
        assert torch.isfinite(v).all()


@pytest.mark.parametrize("name", BAG_METHODS)
def test_mask_invariance(name: str):
    """Padding a bag with garbage instances must not change its output."""
    model = build(name)
    small = bag_for(name, b=2, n=10)
    big = bag_for(name, b=2, n=10, pad_to=25)  # quadtree bags: padded at every level
    if kind_of(name) not in ("quadtree", "patches"):
        big.features[:, :10] = small.features
        big.features[~big.mask] = 1e3 * torch.randn_like(big.features[~big.mask])
    with torch.no_grad():
        a, b = model(small), model(big)
    for t in a.logits:
        torch.testing.assert_close(a.logits[t], b.logits[t], rtol=1e-4, atol=1e-5)
    if a.attention is not None:
        n = small.mask.shape[1]
        torch.testing.assert_close(a.attention, b.attention[..., :n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", BAG_METHODS)
def test_attention_sums_to_one_on_valid_instances(name: str):
    bag = bag_for(name, b=3, n=12)
    out = build(name)(bag)
    if out.attention is None:
        pytest.skip(f"{name} has no attention")
    a = out.attention if out.attention.dim() == 3 else out.attention[:, None]
    torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:2]), rtol=1e-5, atol=1e-5)
    assert (a.masked_select(~bag.mask[:, None].expand_as(a)) == 0).all()


@pytest.mark.parametrize("name", BAG_METHODS)
def test_every_parameter_gets_a_gradient(name: str):
    torch.manual_seed(0)
    model = build(name, "multitag").train()
    bag = bag_for(name, b=4, n=30)
    bag.labels = {"stain": torch.tensor([0, 1, 2, 0]), "organ": torch.tensor([3, 2, 1, 0])}
    out = model(bag)
    loss = torch.stack(list(model.task_loss(out, bag).values()) + list(out.aux_losses.values())).sum()
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
        if pname.endswith(ZERO_GRAD_PARAMS.get(name, ())):
            continue  # declared mathematically zero (e.g. a bias under a softmax)
        assert p.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"


class _Scaled(torch.utils.data.Dataset):
    def __init__(self, ds, s: int) -> None:
        self.ds, self.s = ds, s

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        it = dict(self.ds[i])
        it["features"] = torch.stack([it["features"].float() * (k + 1) for k in range(self.s)], 1)  # (N, S, D)
        return it


@pytest.mark.parametrize("name", [n for n in BAG_METHODS if kind_of(n) != "patches"])  # e2e: tests/methods
def test_fast_dev_run_and_checkpoint_round_trip(name: str, bag_data: Path, tmp_path: Path):
    if kind_of(name) == "quadtree":
        from tests.conftest import make_quadtree_bags
        from wsi_lightning.data.quadtree import QuadtreeBagDataModule

        bag_data = make_quadtree_bags(tmp_path / "qt", n_slides=8)
    m = load_manifest(bag_data, "label", check_files=False)
    dm_cls = QuadtreeBagDataModule if kind_of(name) == "quadtree" else BagDataModule
    dm = dm_cls(m, bag_data.parent / "store", split={"val": 0.25, "test": 0.25}, batch_size=2)
    dm.setup()
    if scales_of(name):  # same bags seen at S "scales" (the real multi-scale data is tested elsewhere)
        dm.datasets = {k: _Scaled(v, scales_of(name)) for k, v in dm.datasets.items()}
    model = METHODS.get(name)(in_dim=dm.in_dim, num_classes=dm.num_classes, class_names=dm.class_names,
                              **small(name))
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    again = METHODS.get(name).load_from_checkpoint(ckpt, map_location="cpu").eval()
    model.eval()
    bag = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        a, b = model(bag), again(bag)
    for t in a.logits:
        torch.testing.assert_close(a.logits[t], b.logits[t])


# ----------------------------------------------------------------------------- patient-level bags
CASE_METHODS = [n for n in BAG_METHODS if kind_of(n) == "bag"]  # those BagDataModule serves


@pytest.fixture(scope="module")
def case_bags(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import make_case_bags

    return make_case_bags(tmp_path_factory.mktemp("cases"), n_cases=8)


@pytest.mark.parametrize("name", CASE_METHODS)
def test_trains_on_case_bags(name: str, case_bags: Path):
    """Every feature-bag method trains on patient-level bags (``data.bag_level=case``: the
    instances of 2-3 slides a bag, coordinates repeating between slides) unchanged."""
    m = load_manifest(case_bags, "label", check_files=False)
    dm = BagDataModule(m, case_bags.parent / "store", split={"val": 0.25, "test": 0.25}, batch_size=2,
                       bag_level="case")
    dm.setup()
    model = METHODS.get(name)(in_dim=dm.in_dim, num_classes=dm.num_classes, class_names=dm.class_names,
                              **small(name))
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, datamodule=dm)  # a training step and a validation step on case batches
    bag = next(iter(dm.test_dataloader()))
    assert len(bag) == 2 and bag.slides is not None and all(len(s) >= 2 for s in bag.slides)
    with torch.no_grad():
        out = model.eval()(bag)
    assert out.logits["label"].shape == (2, 2) and torch.isfinite(out.logits["label"]).all()
    if out.attention is not None:  # over every valid instance of the case, all its slides
        a = out.attention if out.attention.dim() == 3 else out.attention[:, None]
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:2]), rtol=1e-5, atol=1e-5)
