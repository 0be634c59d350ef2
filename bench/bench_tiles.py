"""Tile reading: our fast path vs OpenSlide vs the raw JPEG-decode limit.

A demo-style slide (8192 x 8192 px at 0.5 µm/px, JPEG q90, 256-px tiles) is written once into the
cache folder. Tiles are drawn at random (with a fixed seed) from the tissue tiles of a 256-px grid
at the slide's own mpp, so every read is one whole TIFF tile at level 0. In one process and one
thread, after a warm-up, several rounds time a pass over the same tiles with:

    decode_limit  the tiles' JPEG bytes already in memory, decoded with the fast path's own call
                  (``fastpath.decode_tile``): nothing can read a tile faster than this;
    fast_path     ``SlideReader(backend="fast", tile_cache=0).read_region``: pread + decode;
    openslide     ``OpenSlide.read_region`` + RGBA -> RGB (what the ``openslide`` backend does),
                  with OpenSlide's tile cache disabled, as neither of the others caches.

Reported: the median tiles/s of each over the rounds and the ratios (targets: fast path >= 0.8x
the decode limit and >= 3x OpenSlide).

Run: ``python bench/bench_tiles.py [--quick] [--out-dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openslide

from wsi_lightning.demo.synthetic import render, sample_spec
from wsi_lightning.slides import SlideReader, segment_tissue, tile_slide, write_pyramid_tiff
from wsi_lightning.slides.fastpath import decode_tile
from wsi_lightning.slides.reader import rgba_to_rgb

log = logging.getLogger(__name__)

SLIDE = {"size_px": 8192, "mpp": 0.5, "tile": 256, "quality": 90, "n_levels": 5, "seed": 0, "v": 1}
TILE = 256
ROUNDS = 3


def _slide(out_dir: Path) -> Path:
    """Write (or reuse) the benchmark slide."""
    path, stamp = out_dir / "bench_slide.tiff", out_dir / "bench_slide.json"
    if path.exists() and stamp.exists() and json.loads(stamp.read_text()) == SLIDE:
        return path
    log.info("rendering a %d px demo slide into %s (once)", SLIDE["size_px"], out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = sample_spec(
        np.random.default_rng(SLIDE["seed"]),
        "tumor",
        "bench",
        size_um=SLIDE["size_px"] * SLIDE["mpp"],
        mpp=SLIDE["mpp"],
    )
    image, _ = render(spec)
    write_pyramid_tiff(
        path, image, SLIDE["mpp"], SLIDE["n_levels"], SLIDE["tile"], SLIDE["quality"]
    )
    stamp.write_text(json.dumps(SLIDE))
    return path


def _tiles_per_s(read: Callable[[int, int], np.ndarray], coords: np.ndarray) -> float:
    start = time.perf_counter()
    for x, y in coords:
        read(x, y)
    return len(coords) / (time.perf_counter() - start)


def run(out_dir: Path, quick: bool = False) -> dict:
    """Measure tile reading side by side. Returns the benchmark record (see module docstring)."""
    n_tiles = 300 if quick else 2000
    path = _slide(Path(out_dir))
    reader = SlideReader(path, backend="fast", tile_cache=0)
    grid = tile_slide(reader, TILE, reader.mpp, min_tissue=0.5, tissue=segment_tissue(reader))
    assert grid.level == 0 and grid.extent_level0 == TILE  # one whole TIFF tile per read
    rng = np.random.default_rng(0)
    coords = [(int(x), int(y)) for x, y in grid.coords[rng.integers(0, len(grid), n_tiles)]]
    fast = reader._fast  # the same decoder and the same bytes as the fast path
    level0 = fast.levels[0]
    blobs = {(x, y): fast.tile_bytes(0, x // TILE, y // TILE) for x, y in set(coords)}
    osr = openslide.OpenSlide(path)
    osr.set_cache(openslide.OpenSlideCache(0))

    methods = {
        "decode_limit": lambda x, y: decode_tile(blobs[x, y], level0),
        "fast_path": lambda x, y: reader.read_region((x, y), 0, (TILE, TILE)),
        "openslide": lambda x, y: rgba_to_rgb(np.asarray(osr.read_region((x, y), 0, (TILE, TILE)))),
    }
    x, y = coords[0]
    a, b = methods["fast_path"](x, y), methods["openslide"](x, y)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, "fast path and OpenSlide disagree"
    warm = np.array(coords[: min(100, n_tiles)])
    for read in methods.values():  # warm-up: page cache, decoder, allocator
        _tiles_per_s(read, warm)
    rates: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(ROUNDS):
        for name, read in methods.items():
            rates[name].append(_tiles_per_s(read, np.array(coords)))
    osr.close()
    reader.close()
    tps = {name: round(statistics.median(r), 1) for name, r in rates.items()}
    result = {
        "name": "tile_reading",
        "tiles_per_s": tps,
        "ratios": {
            "fast_vs_decode_limit": round(tps["fast_path"] / tps["decode_limit"], 3),
            "fast_vs_openslide": round(tps["fast_path"] / tps["openslide"], 3),
        },
        "targets": {"fast_vs_decode_limit": 0.8, "fast_vs_openslide": 3.0},
        "config": {
            "slide": SLIDE,
            "tile_px": TILE,
            "level": 0,
            "n_tiles": n_tiles,
            "distinct_tiles": len(blobs),
            "rounds": ROUNDS,
            "threads": 1,
            "openslide_cache": 0,
            "fast_path_tile_cache": 0,
            "all_rounds": {name: [round(v, 1) for v in r] for name, r in rates.items()},
        },
    }
    log.info("tile reading: %s", json.dumps(result["tiles_per_s"]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 tiles instead of 2000")
    parser.add_argument(
        "--out-dir",
        default=str(Path(__file__).resolve().parent / ".cache" / "tiles"),
        help="where the benchmark slide is written once",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(run(Path(args.out_dir), quick=args.quick), indent=2))


if __name__ == "__main__":
    main()
