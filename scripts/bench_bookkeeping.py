"""The driver's bookkeeping of a run, by number of work shards: does it stay O(1) per unit?

A synthetic output folder with N work shards of a few rows each (work files, the group
markers that list them and the manifest that commits them, then the parts a scoring task
writes for each shard). The driver's
own steps are timed apart from the work the tasks do:

* ``plan``: pending shards from the manifests and markers, recovery of interrupted parts,
  the stream's items (no work file opened);
* ``commit``: the results of the stream fed to :class:`ShardTracker` (markers written in
  the background, committed state freed), up to the last marker written;
* ``publish``: counts from the markers (no footer read) and the published generation;

and, as the baseline measured in the same run, what the former driver did first: one
footer read per pending work shard, one after the other.

Each N runs in its own process, so that its peak RSS (``ru_maxrss``) is its own, ``--repeat``
times (3), the sizes interleaved: a step's time (wall, and for the commit also the process's
CPU time: the driver's thread and the marker writers) is the best of the repetitions (at 200
shards a step takes tens of ms, which one scheduling hiccup of a shared machine can multiply),
the peak RSS the highest. The peak RSS is also given as it stood after the commit step
(``rss_after_commit_mib``), before publish.

    python scripts/bench_bookkeeping.py --shards 200 2000
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS_PER_SHARD = 4
SHARDS_PER_GROUP = 30


def _one(n_shards: int, rows: int) -> dict:
    tmp = tempfile.mkdtemp(prefix="bench-bookkeeping-")
    try:
        return _measure(tmp, n_shards, rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(tmp: str, n_shards: int, rows: int) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from laionbuild.config import load_config
    from laionbuild.output.layout import OutputLayout
    from laionbuild.runner.commit import SHARD_ID, ShardTracker, recover_parts
    from laionbuild.runner.dedup import committed_shards, pending_shards
    from laionbuild.runner.progress import Progress
    from laionbuild.runner.publish import publish
    from laionbuild.runner.score import stream_items
    from laionbuild.schema import pair_hash
    from laionbuild.stages import shards
    from laionbuild.stats import RunStats

    layout = OutputLayout(str(Path(tmp) / "out"))
    cfg = load_config(None, [f"output.rows_per_shard={max(1000, n_shards * rows // 8)}"])
    ids = [f"g0000-b{i:05d}-00" for i in range(n_shards)]
    # the de-dup phase's output (not timed): work files and the manifest
    for i, sid in enumerate(ids):
        urls = [f"http://img.test/{i}/{j}.jpg" for j in range(rows)]
        table = pa.table({"URL": urls, "TEXT": [f"t{j}" for j in range(rows)]})
        shards.write_bytes_atomic(layout.fs, layout.workshard_file(sid), shards.table_to_bytes(table, "zstd"))
    # the group markers list the shards (30 per group, as at LAION scale), the manifest commits them
    for g in range(0, n_shards, SHARDS_PER_GROUP):
        listed = [{"id": s, "rows": rows} for s in ids[g:g + SHARDS_PER_GROUP]]
        shards.write_json_atomic(layout.fs, layout.group_marker(0, g // SHARDS_PER_GROUP),
                                 {"generation": 0, "group": g // SHARDS_PER_GROUP, "shards": listed})
    shards.write_json_atomic(layout.fs, layout.manifest(0), {"generation": 0, "counters": {}, "n_shards": n_shards})

    timings = {}
    t = time.perf_counter()
    pending = pending_shards(layout, committed_shards(layout, layout.manifests()))
    recovered = recover_parts(layout, pending)
    items = stream_items(layout, pending, recovered)
    timings["plan"] = time.perf_counter() - t
    assert len(items) == n_shards

    t = time.perf_counter()
    for sid in sorted(pending):  # the former driver: a footer per shard, one after the other
        with layout.fs.open(layout.workshard_file(sid), "rb") as fh:
            pq.ParquetFile(fh).metadata
    timings["baseline_footer_reads"] = time.perf_counter() - t

    # the scoring tasks' output (not timed): one part per shard, and the summary row the stream returns
    summaries = []
    for i, sid in enumerate(ids):
        urls = [f"http://img.test/{i}/{j}.jpg" for j in range(rows)]
        texts = [f"t{j}" for j in range(rows)]
        en = pa.table({"URL": urls, "TEXT": texts, "hash": [pair_hash(u, x) for u, x in zip(urls, texts)],
                       "similarity": pa.array([0.3] * rows, pa.float32())})
        path = f"{layout.scored_dir(sid)}/en-{i:08x}.parquet"
        shards.write_bytes_atomic(layout.fs, path, shards.table_to_bytes(en, "zstd"))
        summaries.append({SHARD_ID: np.array([sid], dtype=object), "n_rows": np.array([rows]),
                          "parts": np.array([json.dumps({path: rows})], dtype=object),
                          "counters": np.array([json.dumps({})], dtype=object),
                          "node": np.array([json.dumps({"write": ["node"]})], dtype=object)})

    t, cpu = time.perf_counter(), time.process_time()
    tracker = ShardTracker(layout, pending, Progress(len(pending), False, "", ""), recovered)
    for batch in summaries:
        tracker.add(batch)
    tracker.close()
    timings["commit"] = time.perf_counter() - t
    timings["commit_cpu"] = time.process_time() - cpu  # the driver's thread and the marker writers
    assert not tracker.pending and not tracker.parts
    rss_after_commit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    t = time.perf_counter()
    scored = list(layout.scored_markers().values())
    stats = RunStats()
    publish(cfg, layout, scored, stats)
    timings["publish"] = time.perf_counter() - t
    assert stats.kept_per_subset["en"] == n_shards * rows

    # the raw measurements; per-shard figures are derived from the best of the repetitions (_best)
    return {"shards": n_shards, "rows_per_shard": rows,
            "seconds": {k: round(v, 4) for k, v in timings.items()},
            "rss_after_commit_mib": round(rss_after_commit, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _best(reps: list[dict]) -> dict:
    """Best time per step over the repetitions of one N, highest RSS."""
    n = reps[0]["shards"]
    seconds = {k: min(r["seconds"][k] for r in reps) for k in reps[0]["seconds"]}
    return {"shards": n, "rows_per_shard": reps[0]["rows_per_shard"], "repeats": len(reps), "seconds": seconds,
            "driver_us_per_shard": round(1e6 * (seconds["plan"] + seconds["commit"]) / n, 1),
            "commit_us_per_shard": round(1e6 * seconds["commit"] / n, 1),
            "commit_cpu_us_per_shard": round(1e6 * seconds["commit_cpu"] / n, 1),
            "publish_us_per_shard": round(1e6 * seconds["publish"] / n, 1),
            "baseline_footer_us_per_shard": round(1e6 * seconds["baseline_footer_reads"] / n, 1),
            "commit_us_per_shard_each": [round(1e6 * r["seconds"]["commit"] / n, 1) for r in reps],
            "rss_after_commit_mib": max(r["rss_after_commit_mib"] for r in reps),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in reps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, nargs="+", default=[200, 2000])
    ap.add_argument("--rows", type=int, default=ROWS_PER_SHARD, help="rows per work shard")
    ap.add_argument("--repeat", type=int, default=3, help="processes per N (best time, highest RSS)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(args.one, args.rows)))
        return
    reps: dict[int, list[dict]] = {n: [] for n in args.shards}
    for _ in range(args.repeat):  # the sizes interleaved, so that a busy minute hits them alike
        for n in args.shards:
            out = subprocess.run([sys.executable, __file__, "--one", str(n), "--rows", str(args.rows)],
                                 capture_output=True, text=True, check=True)
            reps[n].append(json.loads(out.stdout.strip().splitlines()[-1]))
    runs = [_best(reps[n]) for n in args.shards]
    first, last = runs[0], runs[-1]
    print(json.dumps({"runs": runs,
                      "driver_us_per_shard_ratio": round(last["driver_us_per_shard"] / first["driver_us_per_shard"], 2),
                      "commit_us_per_shard_ratio": round(last["commit_us_per_shard"] / first["commit_us_per_shard"], 2),
                      "commit_cpu_us_per_shard_ratio": round(last["commit_cpu_us_per_shard"]
                                                             / first["commit_cpu_us_per_shard"], 2),
                      "publish_us_per_shard_ratio": round(last["publish_us_per_shard"]
                                                          / first["publish_us_per_shard"], 2),
                      "rss_after_commit_ratio": round(last["rss_after_commit_mib"] / first["rss_after_commit_mib"], 2),
                      "peak_rss_ratio": round(last["peak_rss_mib"] / first["peak_rss_mib"], 2)}, indent=1))


if __name__ == "__main__":
    main()
