"""DICOM WSI tile reading: our fast path vs OpenSlide vs wsidicom vs fastslide vs the decode limit.

A demo-style slide (4096 x 4096 px at 0.5 µm/px, 3 levels, 256-px JPEG q90 frames, YCbCr 4:2:2
as scanners write them) is written once as a DICOM WSI (wsidicom) into the cache folder. Tiles are
drawn at random (fixed seed) from the tissue tiles of a 256-px grid at the slide's own mpp, so
every read is one whole frame at level 0. In one process and one thread, after a warm-up,
several rounds time a pass over the same tiles with:

    decode_limit  the frames' JPEG bytes already in memory, decoded with the fast path's own call
                  (``fastpath.decode_tile``): nothing can read a tile faster than this;
    fast_path     ``SlideReader(backend="fast", tile_cache=0).read_region``: wsidicom finds the
                  frame, the fast path decodes it (``slides/dicom.py``);
    openslide     ``OpenSlide.read_region`` + RGBA -> RGB (the ``openslide`` backend), its tile
                  cache disabled;
    wsidicom      ``WsiDicom.read_region`` (wsidicom's own decoding), its frame caches disabled;
    fastslide     ``FastSlide.read_region`` with no tile cache (where fastslide is installed:
                  the dev extra, CPython 3.11).

Each reader's first tile is compared with OpenSlide's (max abs difference recorded). Reported: the
median tiles/s of each over the rounds, CPU seconds per wall second (a reader that uses threads
shows > 1) and the ratios against OpenSlide (target: fast path >= 3x OpenSlide, >= 0.8x the
decode limit).

Run: ``python bench/bench_formats.py [--quick] [--out-dir DIR]``.
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
from wsi_lightning.slides import SlideReader, segment_tissue, tile_slide
from wsi_lightning.slides.dicom_writer import write_dicom_wsi
from wsi_lightning.slides.fastpath import decode_tile
from wsi_lightning.slides.reader import rgba_to_rgb

log = logging.getLogger(__name__)

SLIDE = {"size_px": 4096, "mpp": 0.5, "tile": 256, "quality": 90, "n_levels": 3, "seed": 0,
         "format": "dicom", "photometric": "YBR_FULL_422", "v": 1}
TILE = 256
ROUNDS = 3


def _slide(out_dir: Path) -> Path:
    """Write (or reuse) the benchmark DICOM WSI folder."""
    folder, stamp = out_dir / "bench_dicom", out_dir / "bench_dicom.json"
    if folder.exists() and stamp.exists() and json.loads(stamp.read_text()) == SLIDE:
        return folder
    log.info("rendering a %d px demo slide as DICOM into %s (once)", SLIDE["size_px"], out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = sample_spec(np.random.default_rng(SLIDE["seed"]), "tumor", "bench",
                       size_um=SLIDE["size_px"] * SLIDE["mpp"], mpp=SLIDE["mpp"])
    image, _ = render(spec)
    if folder.exists():
        for f in folder.iterdir():
            f.unlink()
    write_dicom_wsi(folder, image, SLIDE["mpp"], SLIDE["n_levels"], SLIDE["tile"],
                    SLIDE["quality"], SLIDE["photometric"])
    stamp.write_text(json.dumps(SLIDE))
    return folder


def _timed(read: Callable[[int, int], np.ndarray], coords: list[tuple[int, int]]) -> tuple[float, float]:
    """(tiles/s, CPU s per wall s) of one pass."""
    wall, cpu = time.perf_counter(), time.process_time()
    for x, y in coords:
        read(x, y)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return len(coords) / wall, cpu / wall


def _readers(folder: Path, reader: SlideReader) -> tuple[dict[str, Callable], list[Callable[[], None]]]:
    """{name: read(x, y) -> (256, 256, 3) uint8} for every reader available, and their closers."""
    from wsidicom import WsiDicom
    from wsidicom.config import Settings

    osr = openslide.OpenSlide(reader._file)
    osr.set_cache(openslide.OpenSlideCache(0))
    wsi = WsiDicom.open(folder, settings=Settings(decoded_frame_cache_size=0, encoded_frame_cache_size=0))
    fast = reader._fast
    readers = {
        "fast_path": lambda x, y: reader.read_region((x, y), 0, (TILE, TILE)),
        "openslide": lambda x, y: rgba_to_rgb(np.asarray(osr.read_region((x, y), 0, (TILE, TILE)))),
        "wsidicom": lambda x, y: np.asarray(wsi.read_region((x, y), 0, (TILE, TILE))),
        "decode_limit": None,  # set by run(): needs the frames in memory
    }
    closers = [osr.close, wsi.close]
    try:
        import fastslide
    except ImportError:
        log.warning("fastslide is not installed (dev extra, CPython 3.11): not measured")
    else:
        fs = fastslide.FastSlide.from_file_path(str(reader._file), cache=None)
        readers["fastslide"] = lambda x, y: fs.read_region((x, y), 0, (TILE, TILE)).numpy()[..., :3]
        closers.append(fs.close)
    assert fast is not None and reader.backend == "fast", "the DICOM fast path did not open"
    return readers, closers


def run(out_dir: Path, quick: bool = False) -> dict:
    """Measure DICOM tile reading side by side. Returns the benchmark record (module docstring)."""
    n_tiles = 300 if quick else 2000
    folder = _slide(Path(out_dir))
    reader = SlideReader(folder, backend="fast", tile_cache=0)
    grid = tile_slide(reader, TILE, reader.mpp, min_tissue=0.5, tissue=segment_tissue(reader))
    assert grid.level == 0 and grid.extent_level0 == TILE  # one whole frame per read
    rng = np.random.default_rng(0)
    coords = [(int(x), int(y)) for x, y in grid.coords[rng.integers(0, len(grid), n_tiles)]]
    readers, closers = _readers(folder, reader)
    level0 = reader._fast.levels[0]
    blobs = {(x, y): reader._fast.tile_bytes(0, x // TILE, y // TILE) for x, y in set(coords)}
    readers["decode_limit"] = lambda x, y: decode_tile(blobs[x, y], level0)
    x, y = coords[0]
    ref = readers["openslide"](x, y).astype(int)
    max_diff = {name: int(np.abs(read(x, y).astype(int) - ref).max()) for name, read in readers.items()}
    assert max_diff["fast_path"] == 0, f"fast path and OpenSlide disagree by {max_diff['fast_path']}"
    for read in readers.values():  # warm-up: page cache, decoder, allocator
        _timed(read, coords[:100])
    rates: dict[str, list[float]] = {name: [] for name in readers}
    cpu: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(ROUNDS):
        for name, read in readers.items():
            tps, load = _timed(read, coords)
            rates[name].append(tps)
            cpu[name].append(load)
    for close in closers:
        close()
    reader.close()
    tps = {name: round(statistics.median(r), 1) for name, r in rates.items()}
    ratios = {f"{name}_vs_openslide": round(v / tps["openslide"], 3)
              for name, v in tps.items() if name != "openslide"}
    ratios["fast_vs_decode_limit"] = round(tps["fast_path"] / tps["decode_limit"], 3)
    result = {
        "name": "dicom_tile_reading",
        "tiles_per_s": tps,
        "ratios": ratios,
        "targets": {"fast_path_vs_openslide": 3.0, "fast_vs_decode_limit": 0.8},
        "config": {
            "slide": SLIDE,
            "tile_px": TILE,
            "level": 0,
            "n_tiles": n_tiles,
            "distinct_tiles": len(blobs),
            "rounds": ROUNDS,
            "threads": 1,
            "caches": "off (OpenSlide, wsidicom, fastslide, fast path)",
            "max_abs_diff_vs_openslide": max_diff,
            "cpu_per_wall": {name: round(statistics.median(c), 2) for name, c in cpu.items()},
            "all_rounds": {name: [round(v, 1) for v in r] for name, r in rates.items()},
        },
    }
    log.info("DICOM tile reading: %s", json.dumps(result["tiles_per_s"]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 tiles instead of 2000")
    parser.add_argument(
        "--out-dir",
        default=str(Path(__file__).resolve().parent / ".cache" / "formats"),
        help="where the benchmark slide is written once",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(run(Path(args.out_dir), quick=args.quick), indent=2))


if __name__ == "__main__":
    main()
