"""On-the-fly slide sampling: level choice, region reads, grey filter, datasets, DataModule."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from wsi_lightning.data.bags import UnpaddedDistributedSampler
from wsi_lightning.manifest import load_manifest, patient_split
from wsi_lightning.methods.magnet.reads import read_frames
from wsi_lightning.data.sampling import (
    GreyFilter,
    RegionSampler,
    SlideBatch,
    SlideImageDataset,
    SlideSamplingDataModule,
    TissuePatchDataset,
    choose_level,
    dihedral,
    dihedral_matrix,
    dihedral_tensor,
    grey_filter,
    grey_mask,
    magnets_level,
    magnets_out_size,
    slide_refs,
    square_box,
)
from wsi_lightning.errors import ConfigError, NoTissueError, SlideError
from wsi_lightning.slides.pyramid import write_pyramid_tiff
from wsi_lightning.slides.reader import SlideReader

MPP = 0.5
TISSUE = {"thumb_mpp": 4.0, "min_area_um2": 2_000.0}  # the fixture slides are only 320 µm wide


def pattern(h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8: R horizontal ramp, G vertical ramp, B 64-px checker."""
    yy, xx = np.mgrid[0:h, 0:w]
    b = np.where((xx // 64 + yy // 64) % 2, 160, 90)
    return np.stack([(xx + 0.5) * 255 / w, (yy + 0.5) * 255 / h, b], -1).round().astype(np.uint8)


def tissue_image(seed: int, h: int = 512, w: int = 640) -> np.ndarray:
    """Near-white glass with two textured pink ellipses of tissue."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 238, np.float32) + rng.normal(0, 2, (h, w, 1))
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(2):
        cx, cy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.3, 0.7) * h
        rx, ry = rng.uniform(90, 140), rng.uniform(70, 110)
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        texture = rng.normal(0, 12, (h, w, 1)) + np.array([200, 110, 160])
        img[inside] = texture[inside]
    return img.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    """Pattern slide (halving, 3 levels), a factor-3 generic TIFF, a blank and a corrupt file."""
    root = tmp_path_factory.mktemp("sampling_slides")
    paths = {"pattern": root / "pattern.tiff", "third": root / "third.tiff",
             "blank": root / "blank.tiff", "corrupt": root / "corrupt.tiff"}
    img = pattern(768, 1024)
    write_pyramid_tiff(paths["pattern"], img, MPP, n_levels=3)
    with tifffile.TiffWriter(paths["third"]) as tw:  # levels 1, 3, 9: not a halving pyramid
        for i, f in enumerate((1, 3, 9)):
            lv = img if f == 1 else np.asarray(Image.fromarray(img).reduce(f))
            tw.write(lv, tile=(256, 256), photometric="rgb", compression="jpeg",
                     compressionargs={"level": 90}, resolution=(1e4 / (MPP * f),) * 2,
                     resolutionunit="CENTIMETER", subfiletype=min(i, 1), metadata=None)
    write_pyramid_tiff(paths["blank"], np.full((256, 256, 3), 240, np.uint8), MPP, n_levels=2)
    paths["corrupt"].write_bytes(b"II*\x00" + b"\x00" * 64)
    return paths


@pytest.fixture(scope="module")
def manifest_csv(tmp_path_factory) -> Path:
    """8 tissue slides, 2 labels, cases c0 and c1 with two slides each."""
    root = tmp_path_factory.mktemp("sampling_manifest")
    rows = []
    for i in range(8):
        write_pyramid_tiff(root / f"s{i}.tiff", tissue_image(i), MPP, n_levels=3)
        case = f"c{i // 2}" if i < 4 else f"c{i}"
        rows.append({"slide_id": f"s{i}", "case_id": case, "path": f"s{i}.tiff",
                     "label": ["normal", "tumor"][(i // 2) % 2 if i < 4 else i % 2]})
    path = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def bad_manifest(tmp_path: Path, slides: dict[str, Path], which: str) -> Path:
    """The fixture manifest with row 3 pointing at `which` (blank / corrupt)."""
    df = pd.DataFrame({"slide_id": ["a", "b", which], "case_id": ["a", "b", "c"],
                       "path": [str(slides["pattern"])] * 2 + [str(slides[which])],
                       "label": ["x", "y", "x"]})
    df.to_csv(tmp_path / "bad.csv", index=False)
    return tmp_path / "bad.csv"


# ----------------------------------------------------------------------------- level choice
# docs/methods.md 4.4 worked example: 50,000 x 100,000 WSI, nine levels; one ROI inside each row's band
WORKED = [((30_000, 60_000), 8), ((20_000, 40_000), 7), ((10_000, 20_000), 6),
          ((5_000, 10_000), 5), ((2_500, 5_000), 4), ((1_200, 2_400), 3), ((500, 1_000), 2),
          ((250, 500), 1), ((100, 200), 0), ((20, 30), 0)]
SLIDE, N_LEVELS = (50_000, 100_000), 9


@pytest.mark.parametrize("roi,level", WORKED)
def test_paper_worked_example(roi, level):
    halving = [2.0**i for i in range(N_LEVELS)]
    assert magnets_level(SLIDE, roi, N_LEVELS) == level
    assert choose_level(halving, roi, magnets_out_size(SLIDE, N_LEVELS), tol=0) == level


def test_paper_formula_takes_the_finer_axis_and_boundaries():
    halving, out = [2.0**i for i in range(N_LEVELS)], magnets_out_size(SLIDE, N_LEVELS)
    # R = max(R_h, R_w): a wide but short ROI reads from the level its height asks for (register 19)
    assert magnets_level(SLIDE, (30_000, 1_000), N_LEVELS) == 2
    assert choose_level(halving, (30_000, 1_000), out) == 2
    assert magnets_level(SLIDE, (25_001, 50_001), N_LEVELS) == 8  # "> 25,000 and > 50,000"
    assert magnets_level(SLIDE, (25_000, 50_000), N_LEVELS) == 7  # exact half: floor(log2 2) = 1
    assert magnets_level(SLIDE, (80_000, 200_000), N_LEVELS) == 8  # larger than the slide: capped
    rng = np.random.default_rng(0)  # off the power-of-two boundaries the two rules agree
    for w, h in np.exp(rng.uniform(np.log(20), np.log([60_000, 120_000]), (500, 2))):
        assert choose_level(halving, (w, h), out, tol=0) == magnets_level(SLIDE, (w, h), N_LEVELS)


def test_choose_level_non_halving_pyramids(slides):
    by4 = [1.0, 4.0, 16.0, 64.0]
    assert choose_level(by4, 1000, 100) == 1  # 10 level-0 px per output px: level 1 (4) is finest
    assert choose_level(by4, 1600, 100) == 2
    assert choose_level(by4, 1590, 100) == 2  # 15.9 within 1% of 16: no 4x larger read
    assert choose_level(by4, 1590, 100, tol=0) == 1
    assert choose_level(by4, (6400, 300), (100, 100)) == 0  # the finer axis decides
    assert choose_level(by4, 50, 100) == 0  # upsampling
    reader = SlideReader(slides["third"])
    assert reader.level_downsamples[1] == pytest.approx(3, rel=0.01)
    assert choose_level(reader, 300, 100) == 1 and choose_level(reader, 280, 100) == 0
    assert choose_level(reader, 2000, 100) == 2
    with pytest.raises(ConfigError, match="output size"):
        choose_level(by4, 100, 0)


# ----------------------------------------------------------------------------- region reads
@pytest.mark.parametrize("backend", ["fast", "openslide"])
@pytest.mark.parametrize("level", [0, 1, 2])
def test_region_read_equals_reader_read(slides, backend, level):
    reader = SlideReader(slides["pattern"], backend=backend)
    ds = reader.level_downsamples[level]
    box, out = (128, 256, 128 * ds, 64 * ds), (128, 64)  # inside every level
    sampler = RegionSampler(reader)
    assert sampler.level_for(box[2:], out) == level
    got = sampler.read(box, out)
    want = reader.read_region((128, 256), level, out)
    assert got.shape == (64, 128, 3) and np.abs(got.astype(int) - want).max() <= 1


def test_region_read_resampled_close_to_read_at_mpp(slides):
    reader = SlideReader(slides["pattern"])
    got = RegionSampler(reader).read((100, 60, 300, 300), 100)  # 3 level-0 px per output px
    want = reader.read_at_mpp((100, 60), (100, 100), 3 * MPP)
    assert np.abs(got.astype(float) - want).mean() < 3


def test_region_read_non_halving_pyramid(slides):
    reader = SlideReader(slides["third"])
    sampler = RegionSampler(reader)
    got = sampler.read((30, 60, 300, 300), 100)
    want = reader.read_region((30, 60), 1, (100, 100))
    assert sampler.level_for(300, 100) == 1 and np.abs(got.astype(float) - want).mean() < 3


def test_black_padding_outside_the_slide(slides):
    reader = SlideReader(slides["pattern"])
    sampler = RegionSampler(reader)
    got = sampler.read((-128, 0, 256, 256), 256)  # level 0, left half outside
    assert (got[:, :128] == 0).all()
    assert np.abs(got[:, 128:].astype(int) - reader.read_region((0, 0), 0, (128, 256))).max() <= 1
    assert (sampler.read((2000, 2000, 400, 400), 64) == 0).all()  # entirely outside
    img, box = sampler.whole_slide(64)  # 1024 x 768 padded to 1024 x 1024: 8 black rows each side
    assert box == square_box(reader.dimensions) == (0.0, -128.0, 1024.0, 1024.0)
    assert img.shape == (64, 64, 3) and (img[:7] == 0).all() and (img[-7:] == 0).all()
    assert img[9:-9].min(axis=(0, 1)).max() > 0


def test_capped_reads_are_chunked_and_reduced(slides):
    reader = SlideReader(slides["pattern"])
    box = (-40, 10, 1000, 700)
    full = RegionSampler(reader).read(box, (100, 70), level=0)
    capped = RegionSampler(reader, max_read_px=96).read(box, (100, 70), level=0)
    assert np.abs(full.astype(float) - capped).mean() < 3 and (capped[:, :3] == 0).all()


# ----------------------------------------------------------------------------- MagNets' I' reads
def test_read_frames_levels_padding_and_grey(slides):
    reader = SlideReader(slides["pattern"])  # 1024 x 768, 3 halving levels
    frames = np.array([[0.0, -128, 1024, 896],  # the whole slide padded to a square
                       [256.0, 256, 512, 512],  # a 256 px ROI inside
                       [-64.0, -64, 64, 64]])  # a corner ROI, 3/4 outside the slide
    contents = np.array([[0.0, 0, 1024, 768], [256.0, 256, 512, 384], [0.0, 0, 64, 64]])
    imgs, levels, px = read_frames(reader, frames, contents, 32)
    assert imgs.shape == (3, 32, 32, 3) and imgs.dtype == np.uint8
    assert levels.tolist() == [magnets_level((1024, 768), (s, s), 3) for s in (1024, 256, 128)]
    assert levels.tolist() == [2, 0, 0]
    assert px.tolist() == [1024 * 768 // 16, 256 * 128, 64 * 64]
    assert (imgs[0, :4] == 0).all() and (imgs[0, -4:] == 0).all() and imgs[0, 8:24].max(-1).min() > 0
    assert (imgs[1, 16:] == 0).all() and imgs[1, :16].max(-1).min() > 0  # below the content: black
    assert (imgs[2, :16] == 0).all() and (imgs[2, :, :16] == 0).all() and imgs[2, 16:, 16:].max(-1).min() > 0
    direct = RegionSampler(reader).read((256, 256, 256, 128), (32, 16), level=0)
    assert np.abs(imgs[1, :14].astype(int) - direct[:14]).max() <= 1  # the edge row sees beyond
    res = read_frames(reader, frames, contents, 32, level_rule="resolution")[1]
    assert res.tolist() == [2, 2, 2]  # coarsest level with 32 px over the frame side
    flat = np.full((256, 256, 3), 200, np.uint8)
    assert (GreyFilter()(flat)[0] == 0).all()
    with pytest.raises(ConfigError, match="level_rule"):
        read_frames(reader, frames, contents, 32, level_rule="closest")


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("flips", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_dihedral_tensor_and_matrix(k, flips):
    img = pattern(8, 8)
    t = torch.from_numpy(img).permute(2, 0, 1)  # (3, 8, 8)
    out = dihedral_tensor(t, k, *flips).permute(1, 2, 0).numpy()
    assert np.array_equal(out, dihedral(img, k, *flips))
    # the transformed image at normalised u shows the original at M u (pixel centres)
    m = dihedral_matrix(k, *flips)
    centres = (np.arange(8) + 0.5) / 4 - 1  # (8,) normalised pixel centres
    for i, j in [(0, 0), (1, 6), (5, 2), (7, 7)]:
        u = np.array([centres[j], centres[i]])  # (x, y) of output pixel (row i, col j)
        x, y = m @ u
        src = (int(np.argmin(np.abs(centres - y))), int(np.argmin(np.abs(centres - x))))
        assert np.array_equal(out[i, j], img[src])


# ----------------------------------------------------------------------------- grey filter
def test_grey_filter():
    img = np.zeros((4, 10, 3), np.uint8)
    img[:, :5] = (200, 200, 214)  # max pairwise difference 14: grey
    img[:, 5:8] = (200, 200, 215)  # 15: not grey
    img[:, 8:] = (220, 120, 170)  # tissue
    out, frac, keep = grey_filter(img)
    assert frac == pytest.approx(0.5) and keep
    assert (out[:, :5] == 0).all() and (out[:, 5:] == img[:, 5:]).all()
    assert grey_filter(img, max_fraction=0.4)[2] is False
    assert (grey_filter(img, blacken=False)[0] == img).all()
    assert GreyFilter(tol=16, max_fraction=0.6)(img)[1:] == (0.8, False)
    t = torch.from_numpy(img).permute(2, 0, 1).float().div(255)[None]  # (1, 3, H, W)
    assert (grey_mask(t)[0].numpy() == grey_mask(img)).all()


# ----------------------------------------------------------------------------- datasets
def patch_ds(manifest_csv: Path, **kw) -> TissuePatchDataset:
    m = load_manifest(manifest_csv)
    refs = list(slide_refs(m).values())[:2]
    labels = {"label": dict(zip(m.df["slide_id"], m.label_index("label").tolist(), strict=True))}
    args = dict(n_patches=4, patch_size=32, patch_mpp=1.0, train=True, seed=3, tissue=TISSUE)
    return TissuePatchDataset(refs, labels, **{**args, **kw})


def test_patch_mode_shapes_and_determinism(manifest_csv):
    ds = patch_ds(manifest_csv)
    a = ds[0]
    assert a["image"].shape == (4, 3, 32, 32) and a["image"].dtype == torch.float32
    assert 0 <= a["image"].min() and a["image"].max() <= 1
    assert a["coords"].shape == (4, 2) and a["coords"].dtype == torch.int64
    assert a["slide_id"] == "s0" and a["labels"] == {"label": 0}
    tissue = ds.tissue(0).mask()  # patches lie on tissue (4 µm mask pixels, 8 level-0 px)
    centres = (a["coords"].numpy() + 32) // 8  # 32 px at 1 µm/px = 64 level-0 px boxes
    assert tissue[centres[:, 1], centres[:, 0]].mean() >= 0.75
    again = patch_ds(manifest_csv)[0]
    assert torch.equal(a["image"], again["image"]) and torch.equal(a["coords"], again["coords"])
    assert torch.equal(a["coords"], ds[0]["coords"])  # the same epoch: the same draw, in any worker
    assert not torch.equal(a["coords"], ds[(0, 1)]["coords"])  # training: a fresh draw per epoch
    ev = patch_ds(manifest_csv, train=False)
    assert torch.equal(ev[1]["coords"], ev[1]["coords"])  # evaluation: the same patches
    assert not torch.equal(patch_ds(manifest_csv, seed=4)[0]["coords"], a["coords"])


def test_patch_augmentations_are_dihedral(manifest_csv):
    aug, plain = patch_ds(manifest_csv)[1], patch_ds(manifest_csv, augment=False)[1]
    assert torch.equal(aug["coords"], plain["coords"])  # augmentation draws come last
    changed = 0
    for x, y in zip(aug["image"], plain["image"], strict=True):
        src = y.permute(1, 2, 0).numpy()
        views = [dihedral(src, k, h, v) for k in range(4) for h in (0, 1) for v in (0, 1)]
        assert any(np.array_equal(x.permute(1, 2, 0).numpy(), v) for v in views)
        changed += not torch.equal(x, y)
    assert changed > 0
    ev, ev_plain = patch_ds(manifest_csv, train=False)[1], patch_ds(manifest_csv, train=False,
                                                                    augment=False)[1]
    assert torch.equal(ev["image"], ev_plain["image"])  # no augmentation outside training


def test_patch_mode_grey_rejection(manifest_csv):
    def grey_fractions(**kw) -> torch.Tensor:  # blackened grey pixels are still grey
        item = patch_ds(manifest_csv, patch_mpp=2.0, n_patches=6, **kw)[0]
        return grey_mask(item["image"]).float().mean((1, 2))  # (M,)

    assert grey_fractions().max() > 0.3  # 64 µm patches by the edge of the tissue
    assert grey_fractions(grey=GreyFilter(max_fraction=0.3)).max() <= 0.3
    worst = grey_fractions(grey=GreyFilter(max_fraction=0.0))  # none passes: least grey first
    assert (worst.diff() >= 0).all()


def test_slide_mode_item(manifest_csv):
    m = load_manifest(manifest_csv)
    refs = list(slide_refs(m).values())[:1]
    ds = SlideImageDataset(refs, {"label": {"s0": 0}}, image_size=[56, 112])
    it = ds[0]
    assert it["image"].shape == (3, 56, 56) and it["image_112"].shape == (3, 112, 112)
    assert it["path"] == refs[0].path and math.isnan(it["mpp"])
    assert it["dimensions"].tolist() == [640, 512] and it["box"].tolist() == [0, -64, 640, 640]
    assert (it["image"][:, :5] == 0).all() and (it["image_112"][:, -11:] == 0).all()  # padding
    assert it["aug"].tolist() == [0, 0, 0] and it["labels"] == {"label": 0}
    direct = RegionSampler(SlideReader(refs[0].path)).whole_slide(56)[0]
    assert torch.equal(it["image"], torch.from_numpy(direct).permute(2, 0, 1).float() / 255)


# ----------------------------------------------------------------------------- DataModule
def make_dm(manifest_csv: Path, **kw) -> SlideSamplingDataModule:
    args = dict(split={"val": 0.25, "test": 0.25}, batch_size=2, n_patches=2, patch_size=16,
                patch_mpp=2.0, tissue=TISSUE)
    dm = SlideSamplingDataModule(load_manifest(manifest_csv), **{**args, **kw})
    dm.setup()
    return dm


def test_datamodule_splits_and_batches(manifest_csv):
    dm = make_dm(manifest_csv)
    assert dm.splits == patient_split(dm.manifest, val=0.25, test=0.25)
    assert sorted(sum(dm.splits.values(), [])) == [f"s{i}" for i in range(8)]
    assert dm.num_classes == {"label": 2}
    batch = next(iter(dm.train_dataloader()))
    assert batch.features.shape == (2, 2, 3, 16, 16) and batch.coords.shape == (2, 2, 2)  # a Bag of images
    assert batch.labels["label"].shape == (2,) and len(batch.slide_ids) == 2 and batch.mask.all()
    slide = make_dm(manifest_csv, mode="slide", image_size=[32, 64])
    batch = next(iter(slide.val_dataloader()))
    assert isinstance(batch, SlideBatch) and len(batch) == 2
    assert batch.images.shape == (2, 3, 32, 32) and batch.extra[64].shape == (2, 3, 64, 64)
    assert isinstance(batch.paths[0], str) and batch.mpp.isnan().all()
    assert batch.dimensions.shape == (2, 2) and batch.boxes.dtype == torch.float64
    assert batch.aug.shape == (2, 3) and batch.labels["label"].shape == (2,)
    assert batch.slide_ids == slide.splits["val"][:2]
    moved = slide.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert isinstance(moved, SlideBatch) and torch.equal(moved.images, batch.images)


def test_datamodule_ddp_samplers(manifest_csv):
    shards = []
    for rank in range(2):
        dm = make_dm(manifest_csv)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        train = dm.train_dataloader().sampler
        assert isinstance(train, DistributedSampler)
        assert (train.num_replicas, train.rank, train.shuffle) == (2, rank, True)
        val = dm.val_dataloader().sampler
        assert isinstance(val, UnpaddedDistributedSampler)
        shards.append(list(val))
    assert sorted(shards[0] + shards[1]) == list(range(len(dm.datasets["val"])))


def test_datamodule_workers_and_prefetch(manifest_csv):
    dm = make_dm(manifest_csv, num_workers=1, prefetch_factor=3)
    loader = dm.val_dataloader()
    assert loader.persistent_workers and loader.prefetch_factor == 3
    serial = next(iter(make_dm(manifest_csv).val_dataloader()))
    batch = next(iter(loader))  # read in a worker with its own slide handles
    assert torch.equal(batch.features, serial.features)
    assert make_dm(manifest_csv).val_dataloader().prefetch_factor is None


def test_tissue_cache_written_by_prepare_data(manifest_csv, tmp_path, monkeypatch):
    dm = make_dm(manifest_csv, tissue_cache=tmp_path / "tissue")
    dm.prepare_data()
    assert len(list((tmp_path / "tissue").glob("*.npz"))) == 8
    import wsi_lightning.data.sampling as sampling

    def fail(*a, **k):
        raise AssertionError("segmented again instead of reading the cache")

    monkeypatch.setattr(sampling, "segment_tissue", fail)
    fresh = make_dm(manifest_csv, tissue_cache=tmp_path / "tissue")
    assert fresh.datasets["train"][0]["image"].shape == (2, 3, 16, 16)


# ----------------------------------------------------------------------------- errors
def test_errors_name_the_row(slides, tmp_path):
    blank = load_manifest(bad_manifest(tmp_path, slides, "blank"))
    ds = TissuePatchDataset(list(slide_refs(blank).values()), {}, n_patches=2, patch_size=16)
    with pytest.raises(NoTissueError, match=r"bad.csv row 3: slide 'blank'.*no tissue"):
        ds[2]
    dm = SlideSamplingDataModule(blank, tissue_cache=tmp_path / "t")
    with pytest.raises(NoTissueError, match="row 3: slide 'blank'"):
        dm.prepare_data()  # fails before training, naming the row
    corrupt = load_manifest(bad_manifest(tmp_path, slides, "corrupt"))
    ds = SlideImageDataset(list(slide_refs(corrupt).values()), {})
    with pytest.raises(SlideError, match=r"bad.csv row 3: slide 'corrupt'.*cannot open slide"):
        ds[2]


def test_bad_arguments_fail_up_front(manifest_csv):
    m = load_manifest(manifest_csv)
    with pytest.raises(ConfigError, match=r"mode 'tiles'.*n_patches=0.*min_tissue=2"):
        SlideSamplingDataModule(m, mode="tiles", n_patches=0, min_tissue=2)
    with pytest.raises(ConfigError, match="resample"):
        RegionSampler(None, resample="lanczos")  # type: ignore[arg-type]


def test_test_draws_are_rows_of_one_slide_fixed_across_epochs(manifest_csv):
    dm = make_dm(manifest_csv, test_draws=3)
    batch = next(iter(dm.test_dataloader()))
    assert len(batch) == 3 and len(set(batch.slide_ids)) == 1  # one slide's 3 draws per batch
    assert not torch.equal(batch.features[0], batch.features[1])  # different draws
    again = next(iter(dm.test_dataloader()))
    assert torch.equal(batch.features, again.features)  # the same every epoch
    assert len(next(iter(dm.train_dataloader()))) == 2  # training: one draw per slide


def test_end_to_end_fit_on_patches(manifest_csv, tmp_path):
    """A CNN + bag method trained from slide patches; test predictions average the draws."""
    import lightning as L
    import pandas as pd

    from wsi_lightning.methods.end_to_end import EndToEnd

    dm = make_dm(manifest_csv, test_draws=2, patch_size=32)
    model = EndToEnd(in_dim=3, num_classes=dm.num_classes, class_names=dm.class_names, backbone="demo_cnn",
                     pretrained=False, mil="patch_transformer", mil_args={"heads": 2}, resize=None, crop=24,
                     predictions_dir=str(tmp_path))
    before = [p.detach().clone() for p in model.net.backbone.parameters()]
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.net.backbone.parameters(), strict=True))
    trainer.test(model, datamodule=dm, verbose=False)
    pred = pd.read_csv(tmp_path / "test_predictions.csv")
    assert pred["slide_id"].is_unique and sorted(pred["slide_id"]) == sorted(dm.splits["test"])
