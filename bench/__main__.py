"""``make bench``: run every benchmark, print its rows as it finishes, save JSON.

Each benchmark measures its ratio side by side in one run. A benchmark that fails is reported
(traceback in the log, a FAILED row in the tables) and the others still run; the exit status
is then 1. The JSON record (``<results>/bench-<time>.json``, copied to ``latest.json``) is
rewritten after every benchmark, so the figures measured before a crash are kept. Usage:

    python -m bench [--quick] [--only tiles,bags,extract,sampling,hag_mil,formats,gigapixel,cohort]
                    [--cache DIR] [--results DIR]
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

log = logging.getLogger("bench")

HERE = Path(__file__).resolve().parent
BENCHES = {"tiles": "bench.bench_tiles", "bags": "bench.bench_bags", "extract": "bench.bench_extract",
           "sampling": "bench.bench_sampling", "hag_mil": "bench.bench_hag_mil",
           "formats": "bench.bench_formats",
           "gigapixel": "bench.bench_gigapixel", "cohort": "bench.bench_cohort"}


def _table(results: list[dict], failed: list[dict], title: str) -> Table:
    """One row per ratio of each result, one FAILED row per failed benchmark."""
    table = Table(title=title)
    for col in ("benchmark", "ratio", "measured", "target", "ok"):
        table.add_column(col)
    for r in results:
        for name, val in r["ratios"].items():
            tgt = r["targets"].get(name)
            ok = "-" if tgt is None else "yes" if val >= tgt else "NO"
            table.add_row(r["name"], name, f"{val:.2f}x", f">= {tgt}x" if tgt else "-", ok)
    for f in failed:
        table.add_row(f["benchmark"], "-", "-", "-", "[bold red]FAILED[/]")
    return table


def _save(out: Path, record: dict) -> None:
    """Write the record to `out` and `latest.json` beside it (each atomically)."""
    text = json.dumps(record, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    for path in (out, out.with_name("latest.json")):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def _run_one(key: str, cache: Path, quick: bool) -> dict:
    mod = importlib.import_module(BENCHES[key])
    return mod.run(cache / key, quick=quick)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of %(default)s")
    p.add_argument("--cache", type=Path, default=HERE / ".cache",
                   help="where benchmark data is written once (default: %(default)s)")
    p.add_argument("--results", type=Path, default=HERE / "results",
                   help="where the JSON record is saved (default: %(default)s)")
    args = p.parse_args(argv)
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in BENCHES]
    if unknown or not keys:
        p.error(f"--only {args.only!r}: unknown benchmark(s) {unknown}; expected some of {list(BENCHES)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    threads = torch.get_num_threads()  # restored after each benchmark (some set their own)
    console = Console()
    meta = {"machine": platform.machine(), "cpus": threads, "python": platform.python_version(),
            "torch": torch.__version__, "quick": args.quick, "benchmarks": keys}
    record: dict = {"meta": meta, "results": [], "failed": []}
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    for n, key in enumerate(keys, start=1):
        log.info("[%d/%d] %s", n, len(keys), key)
        t0 = time.perf_counter()
        try:
            res = _run_one(key, args.cache, args.quick)
        except Exception as err:  # keep going: one benchmark's crash must not hide the others
            seconds = round(time.perf_counter() - t0, 1)
            log.exception("benchmark %s failed after %.1f s", key, seconds)
            record["failed"].append({"benchmark": key, "error": f"{type(err).__name__}: {err}",
                                     "seconds": seconds})
            console.print(_table([], record["failed"][-1:], f"{key}: FAILED after {seconds} s"))
        else:
            res["seconds"] = round(time.perf_counter() - t0, 1)
            record["results"].append(res)
            console.print(_table([res], [], f"{key} ({res['seconds']} s)"))
        torch.set_num_threads(threads)
        _save(out, record)
    console.print(_table(record["results"], record["failed"],
                         "wsi_lightning benchmarks (ratios measured side by side)"))
    log.info("saved %s", out)
    if record["failed"]:
        log.error("%d of %d benchmark(s) failed: %s", len(record["failed"]), len(keys),
                  "; ".join(f"{f['benchmark']}: {f['error']}" for f in record["failed"]))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
