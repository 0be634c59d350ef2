"""Bag loading: ``FeatureStore.read`` vs ``torch.load`` of CLAM-style ``.pt`` bags.

The same bags (random N in [3000, 7000] x 1024 float16, plus coords) are written once into a
``FeatureStore`` and as CLAM ``pt_files/<slide>.pt`` (the features tensor only, as CLAM saves).
Everything is read once to warm the page cache; then several rounds time both loaders over all
bags, alternating loaders bag by bag, each producing a torch tensor of features. Reported: the median bags/s per loader
and their ratio (target: the store at least as fast as ``torch.load``).

Run: ``python bench/bench_bags.py [--quick] [--out-dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from wsi_lightning.features.store import FeatureStore

log = logging.getLogger(__name__)

DIM = 1024
N_RANGE = (3000, 7000)


def _write_bags(out_dir: Path, n_bags: int, seed: int) -> tuple[FeatureStore, list[Path]]:
    """Write (or reuse) the bags in ``out_dir/store`` and ``out_dir/pt_files``."""
    config = {"n_bags": n_bags, "dim": DIM, "n_range": list(N_RANGE), "seed": seed, "v": 1}
    store, pt_dir = FeatureStore(out_dir / "store"), out_dir / "pt_files"
    ids = [f"slide_{i:04d}" for i in range(n_bags)]
    stamp = out_dir / "bags.json"
    if stamp.exists() and json.loads(stamp.read_text()) == config:
        return store, [pt_dir / f"{s}.pt" for s in ids]
    log.info("writing %d bags to %s (once)", n_bags, out_dir)
    pt_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((N_RANGE[1] + 1000, DIM), dtype=np.float32).astype(np.float16)
    for sid in ids:
        n = int(rng.integers(N_RANGE[0], N_RANGE[1] + 1))
        start = int(rng.integers(0, len(pool) - n))
        feats = pool[start : start + n]  # (n, DIM) float16
        coords = rng.integers(0, 100_000, (n, 2), dtype=np.int64)
        store.write_slide(sid, feats, coords, {"mpp": 0.5, "tile_size": 256, "backbone": "bench"})
        torch.save(torch.from_numpy(feats.copy()), pt_dir / f"{sid}.pt")
    stamp.write_text(json.dumps(config))
    return store, [pt_dir / f"{s}.pt" for s in ids]


def _time_pass(load: Callable[[int], torch.Tensor], n: int) -> float:
    """Bags per second of one pass over all bags."""
    t0 = time.perf_counter()
    for i in range(n):
        feats = load(i)
        assert feats.shape[1] == DIM
    return n / (time.perf_counter() - t0)


def _time_interleaved(
    loaders: dict[str, Callable[[int], torch.Tensor]], n: int, flip: bool
) -> dict[str, float]:
    """Bags per second of each loader over all bags, alternating loaders bag by bag.

    Interleaving per bag exposes both loaders to the same background load (a shared machine),
    which whole-pass timings do not.
    """
    names = list(loaders)
    total = dict.fromkeys(names, 0.0)
    for i in range(n):
        for name in names if (i % 2 == 0) != flip else reversed(names):
            t0 = time.perf_counter()
            feats = loaders[name](i)
            total[name] += time.perf_counter() - t0
            assert feats.shape[1] == DIM
            del feats
    return {name: n / t for name, t in total.items()}


def run(out_dir: Path, quick: bool = False) -> dict:
    """Benchmark bag loading; bags are cached in ``out_dir`` between runs.

    Args:
        out_dir: Folder for the cached bags (~2 GB per loader for 200 bags).
        quick: 100 bags and 3 rounds instead of 200 bags and 7 rounds.

    Returns:
        ``{"name", "bags_per_s": {"store", "torch_load_pt"}, "ratios", "targets", "config"}``.
    """
    n_bags, rounds = (100, 3) if quick else (200, 7)
    out_dir = Path(out_dir) / f"bags_{n_bags}"
    store, pt_files = _write_bags(out_dir, n_bags, seed=0)
    ids = [p.stem for p in pt_files]

    def load_store(i: int) -> torch.Tensor:
        feats, _coords = store.read(ids[i])  # (N, D), (N, 2)
        return torch.from_numpy(feats)

    def load_pt(i: int) -> torch.Tensor:
        return torch.load(pt_files[i], weights_only=True)

    loaders = {"store": load_store, "torch_load_pt": load_pt}
    for load in loaders.values():  # warm the page cache (and the store's metadata cache)
        _time_pass(load, n_bags)
    speeds: dict[str, list[float]] = {name: [] for name in loaders}
    for r in range(rounds):
        for name, speed in _time_interleaved(loaders, n_bags, flip=r % 2 == 1).items():
            speeds[name].append(speed)
    bags_per_s = {name: round(statistics.median(v), 1) for name, v in speeds.items()}
    # the first read of each bag in a process (an epoch-1 worker): no metadata cache yet, and
    # the finite check of every feature file runs (later reads skip an unchanged file)
    first: dict[str, list[float]] = {"store": [], "torch_load_pt": []}
    for r in range(rounds):
        fresh = FeatureStore(store.root)
        firsts = {"store": lambda i, st=fresh: torch.from_numpy(st.read(ids[i])[0]), "torch_load_pt": load_pt}
        for name, speed in _time_interleaved(firsts, n_bags, flip=r % 2 == 1).items():
            first[name].append(speed)
    first_ratio = statistics.median(a / b for a, b in zip(first["store"], first["torch_load_pt"], strict=True))
    mean_n = float(np.mean([store.num_instances(s) for s in ids]))
    return {
        "name": "bag_loading",
        "bags_per_s": bags_per_s,
        "ratios": {
            "store_vs_torch_load": round(bags_per_s["store"] / bags_per_s["torch_load_pt"], 3),
            "store_first_read_vs_torch_load": round(first_ratio, 3),
        },
        "targets": {"store_vs_torch_load": 1.0},
        "config": {
            "n_bags": n_bags,
            "mean_instances": round(mean_n, 1),
            "dim": DIM,
            "dtype": "float16",
            "rounds": rounds,
            "all_rounds_bags_per_s": {k: [round(x, 1) for x in v] for k, v in speeds.items()},
            "per_round_ratios": [
                round(a / b, 3)
                for a, b in zip(speeds["store"], speeds["torch_load_pt"], strict=True)
            ],
            "store_reads": "features + coords",
            "torch_threads": torch.get_num_threads(),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="100 bags, 3 rounds (default 200 bags, 7 rounds)"
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "wsi_lightning_bench",
        help="where the bags are cached (default: %(default)s)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args.out_dir, quick=args.quick)
    print(json.dumps(result, indent=2))  # the script's output is the JSON result


if __name__ == "__main__":
    main()
