#!/usr/bin/env python
"""Benchmark the reference side of ``laionbuild compare`` against reading the file whole.

Writes one synthetic LAION-5B style metadata part (``--rows`` rows with the
columns of ``laion2B-en``: SAMPLE_ID, URL, TEXT, HEIGHT, WIDTH, LICENSE, NSFW,
similarity, hash, punsafe, pwatermark) and a candidate URL set holding
``--overlap`` of its URLs, then, each in a fresh process, in the same run:

* ``ours``: :func:`laionbuild.compare.filter_reference_file` (record batches,
  only the needed columns, URL membership filter);
* ``baseline_read_table``: ``pyarrow.parquet.read_table`` of the whole file,
  then the same ``is_in`` filter.

Reports rows per second (wall) and the peak resident memory of each process.
Prints JSON.

Usage::

    python scripts/bench_compare.py                # 2,000,000 rows
    python scripts/bench_compare.py --rows 200000  # quick run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _write_reference(path: Path, rows: int, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    step = 250_000
    writer = None
    for start in range(0, rows, step):
        n = min(step, rows - start)
        ids = np.arange(start, start + n)
        table = pa.table({
            "SAMPLE_ID": ids,
            "URL": [f"https://images.example-{i % 9973}.com/media/catalog/product/{i:012d}/picture.jpg" for i in ids],
            "TEXT": [f"A product photo number {i} with a descriptive alt text of some length" for i in ids],
            "HEIGHT": rng.integers(64, 2048, n).astype("float64"),
            "WIDTH": rng.integers(64, 2048, n).astype("float64"),
            "LICENSE": ["?"] * n,
            "NSFW": ["UNLIKELY"] * n,
            "similarity": rng.uniform(0.28, 0.45, n),
            "hash": rng.integers(-2**62, 2**62, n),
            "punsafe": rng.uniform(0, 1, n).astype("float32"),
            "pwatermark": rng.uniform(0, 1, n).astype("float32"),
        })
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression="snappy")
        writer.write_table(table, row_group_size=step)
    writer.close()


def _candidate_urls(rows: int, overlap: float) -> list[str]:
    stride = max(1, round(1 / overlap))
    return [f"https://images.example-{i % 9973}.com/media/catalog/product/{i:012d}/picture.jpg"
            for i in range(0, rows, stride)]


def _run(variant: str, path: str, rows: int, overlap: float, queue) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    sys.path.insert(0, str(REPO))
    import fsspec

    from laionbuild.compare import filter_reference_file

    urls = pa.array(_candidate_urls(rows, overlap))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if variant == "ours":
        table, _ = filter_reference_file(fsspec.filesystem("file"), path, urls, subset="en")
        kept = table.num_rows
    else:
        whole = pq.read_table(path)
        kept = whole.filter(pc.is_in(whole.column("URL"), value_set=urls)).num_rows
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"variant": variant, "wall_s": round(wall, 3), "rows_per_s": round(rows / wall),
               "comparable_rows": kept, "peak_rss_mb": round(peak / 1024, 1),
               "rss_growth_mb": round((peak - before) / 1024, 1)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--overlap", type=float, default=0.01, help="share of reference URLs among the candidates")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        path = Path(tmp) / "part-00000.snappy.parquet"
        _write_reference(path, args.rows)
        results = []
        for variant in ("ours", "baseline_read_table"):
            queue = ctx.Queue()
            proc = ctx.Process(target=_run, args=(variant, str(path), args.rows, args.overlap, queue))
            proc.start()
            results.append(queue.get())
            proc.join()
        size_mb = path.stat().st_size / 1e6
    ours, base = results
    print(json.dumps({
        "rows": args.rows, "file_mb": round(size_mb, 1), "overlap": args.overlap,
        "python": platform.python_version(), "results": results,
        "speed_vs_baseline": round(ours["rows_per_s"] / base["rows_per_s"], 2),
        "peak_rss_vs_baseline": round(ours["peak_rss_mb"] / base["peak_rss_mb"], 3),
    }, indent=1))


if __name__ == "__main__":
    main()
