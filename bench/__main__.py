"""``make bench``: run every benchmark, print one table, save JSON under bench/results/.

Each benchmark measures its ratio side by side in one run. Usage:
    python -m bench [--quick] [--only tiles,bags,extract,sampling,hag_mil]
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import platform
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BENCHES = {"tiles": "bench.bench_tiles", "bags": "bench.bench_bags", "extract": "bench.bench_extract",
           "sampling": "bench.bench_sampling", "hag_mil": "bench.bench_hag_mil"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset")
    p.add_argument("--cache", default=str(HERE / ".cache"), help="where benchmark data is written once")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cache = Path(args.cache)
    results = []
    for key in args.only.split(","):
        mod = importlib.import_module(BENCHES[key])
        t0 = time.perf_counter()
        res = mod.run(cache / key, quick=args.quick)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(res)
    from rich.console import Console
    from rich.table import Table

    table = Table(title="wsi_lightning benchmarks (ratios measured side by side)")
    for col in ("benchmark", "ratio", "measured", "target", "ok"):
        table.add_column(col)
    for r in results:
        for name, val in r["ratios"].items():
            tgt = r["targets"].get(name)
            ok = "-" if tgt is None else "yes" if val >= tgt else "NO"
            table.add_row(r["name"], name, f"{val:.2f}x", f">= {tgt}x" if tgt else "-", ok)
    Console().print(table)
    out = HERE / "results" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    meta = {"machine": platform.machine(), "cpus": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "quick": args.quick}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (HERE / "results" / "latest.json").write_text(out.read_text())
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
