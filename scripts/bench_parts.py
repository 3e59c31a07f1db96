#!/usr/bin/env python
"""Parts per work shard under Ray Data's batching: when does ``output.part_rows`` bound them?

Phase 3's chain of operators with stand-in stages (no network, no model): one task reads a
work shard (a batch per row group), download actors stream the rows of their batch as they
complete (random delays, several calls per actor, as ``StreamStageActor``) and give each row a
pixel payload, a CLIP actor drops it, and writer tasks take batches of ``part_rows`` rows and
make one part per shard of each batch (as ``ShardPartWriter``: a small ``en`` table and a fates
table with ``shard_row`` and the part's metadata, in a temporary output folder). The results go
to the runner's ``ShardTracker`` with its Ray compactor, as in a run: a complete shard written in
several parts is committed as one part per kind by a task. Counts the parts each shard was
written in (``written``, compared with ceil(rows / part_rows) + 1) and the files per shard and
kind that its marker lists once committed (``committed``), and checks that the shard folders hold
nothing else.

A download task takes a whole work shard (its rows without pixels make one block); its output
leaves in blocks of at most ``--block-bytes`` (Ray Data's ``target_max_block_size``, 128 MiB in
a run). With small payloads a shard leaves as one block and the bound holds; with payloads that
cut it into many blocks (224 px: 147 KiB a row, ≈ 900 rows per 128 MiB), the blocks of the
shards in flight interleave before the writer. ``--pixel-bytes 10000 --block-bytes 1000000``
makes blocks of 100 rows, the same cut on a small scale.

    python scripts/bench_parts.py --part-rows 64 500
    python scripts/bench_parts.py --part-rows 64 500 --pixel-bytes 10000 --block-bytes 1000000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import posixpath
import random
import shutil
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np


def _parts(args, part_rows: int) -> dict:
    import pyarrow as pa
    import ray

    from laionbuild.output.layout import OutputLayout
    from laionbuild.runner.commit import COMPACTED, SHARD_ROW, ShardTracker, part_name, with_part_meta
    from laionbuild.runner.progress import Progress
    from laionbuild.runner.score import ray_compactor
    from laionbuild.stages import shards

    output = tempfile.mkdtemp(prefix="bench-parts-")

    rows, group = args.rows, args.row_group

    def read(item):
        sid = str(item["sid"][0])
        for start in range(0, rows, group):
            n = min(group, rows - start)
            yield {"sid": np.full(n, sid, dtype=object), "row": np.arange(start, start + n)}

    class Download:
        def __init__(self):
            self.pool = ThreadPoolExecutor(16)
            self.rnd = random.Random()

        def __call__(self, batch):
            index = {self.pool.submit(time.sleep, 0.002 + 0.3 * self.rnd.random() ** 6): i
                     for i in range(len(batch["sid"]))}
            done, left = [], len(index)
            for f in as_completed(index):
                done.append(index[f])
                left -= 1
                if len(done) == 8 or not left:  # rows leave in the order they complete
                    idx = np.array(done)
                    out = {k: v[idx] for k, v in batch.items()}
                    out["image"] = np.zeros((len(idx), args.pixel_bytes), np.uint8)
                    yield out
                    done = []

    class Clip:
        def __call__(self, batch):
            batch.pop("image", None)
            return batch

    def write(batch):  # one part per shard of the batch, as ShardPartWriter
        layout = OutputLayout(output)
        sids = batch["sid"].astype(str)
        out = {"shard_id": [], "n_rows": [], "parts": [], "counters": [], "node": []}
        for sid in np.unique(sids):
            rows = batch["row"][sids == sid]
            token = uuid.uuid4().hex[:12]
            written = {}
            for kind, table in (("en", pa.table({"row": rows})),
                                ("fates", with_part_meta(pa.table({SHARD_ROW: rows}), {}, {"write": ["w"]}))):
                path = posixpath.join(layout.scored_dir(sid), part_name(kind, token))
                shards.write_bytes_atomic(layout.fs, path, shards.table_to_bytes(table, "zstd"))
                written[path] = len(rows)
            for key, value in (("shard_id", sid), ("n_rows", len(rows)), ("parts", json.dumps(written)),
                               ("counters", "{}"), ("node", "{}")):
                out[key].append(value)
        return {k: np.array(v, dtype=np.int64 if k == "n_rows" else object) for k, v in out.items()}

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False  # as the runner sets it
    ctx.target_max_block_size = args.block_bytes
    pool = ray.data.ActorPoolStrategy(size=args.download_actors, max_tasks_in_flight_per_actor=2,
                                      max_concurrent_calls_per_actor=2, enable_true_multi_threading=True)
    ds = ray.data.from_items([{"sid": f"s{i:04d}"} for i in range(args.shards)], override_num_blocks=args.shards)
    ds = ds.map_batches(read, batch_size=1, batch_format="numpy", num_cpus=0.1)
    ds = ds.map_batches(Download, batch_size=args.download_batch, batch_format="numpy", num_cpus=0.25, compute=pool)
    ds = ds.map_batches(Clip, batch_size=args.clip_batch, batch_format="numpy", num_cpus=0.25,
                        compute=ray.data.ActorPoolStrategy(size=1))
    ds = ds.map_batches(write, batch_size=part_rows, batch_format="numpy", num_cpus=0.25)
    layout = OutputLayout(output)
    shard_ids = [f"s{i:04d}" for i in range(args.shards)]
    tracker = ShardTracker(layout, dict.fromkeys(shard_ids, rows), Progress(args.shards, False, "", ""),
                           compactor=ray_compactor(output, "zstd", 0.25), compactions=2)
    parts = Counter()
    t = time.monotonic()
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for sid in b["shard_id"]:
            parts[sid] += 1
        tracker.add(b)
    closing = time.monotonic()
    tracker.close()  # waits for the compactions still running
    wall, closing = time.monotonic() - t, time.monotonic() - closing
    assert len(parts) == args.shards and not tracker.pending
    markers = layout.scored_markers()
    committed = {sid: Counter(posixpath.basename(p).rsplit("-", 1)[0] for p in m["parts"])
                 for sid, m in markers.items()}
    for sid, m in markers.items():  # every row once, nothing else in the folder
        assert sorted(os.listdir(layout.scored_dir(sid))) == sorted(posixpath.basename(p) for p in m["parts"])
        assert all(n == rows for n in m["part_rows"].values()), m
    per_kind = [n for kinds in committed.values() for n in kinds.values()]
    shutil.rmtree(output, ignore_errors=True)
    bound = math.ceil(rows / part_rows) + 1
    return {"part_rows": part_rows, "bound": bound,
            "written": {"mean_parts": round(sum(parts.values()) / len(parts), 2), "max_parts": max(parts.values()),
                        "shards_over_bound": sum(v > bound for v in parts.values())},
            "committed": {"mean_parts": round(sum(per_kind) / len(per_kind), 2), "max_parts": max(per_kind),
                          "shards_compacted": sum(COMPACTED in m for m in markers.values())},
            "stream_and_commit_s": round(wall, 2), "close_s": round(closing, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part-rows", type=int, nargs="+", default=[64, 500])
    ap.add_argument("--shards", type=int, default=24)
    ap.add_argument("--rows", type=int, default=1000, help="rows per work shard")
    ap.add_argument("--row-group", type=int, default=100, help="rows per row group of a work shard")
    ap.add_argument("--download-actors", type=int, default=4)
    ap.add_argument("--download-batch", type=int, default=32)
    ap.add_argument("--clip-batch", type=int, default=64)
    ap.add_argument("--pixel-bytes", type=int, default=0, help="payload per row out of the download stage")
    ap.add_argument("--block-bytes", type=int, default=128 * 1024 * 1024, help="Ray Data's target_max_block_size")
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()
    from laionbuild.demo.run import own_ray
    from laionbuild.runner.connect import connect

    rows_per_block = args.block_bytes // max(1, args.pixel_bytes) if args.pixel_bytes else None
    with own_ray(""):  # a Ray of its own (temp folder, loopback), whatever else runs on the machine
        connect(local=True, num_cpus=args.cpus)
        runs = [_parts(args, p) for p in args.part_rows]
    print(json.dumps({"shards": args.shards, "rows_per_shard": args.rows, "pixel_bytes": args.pixel_bytes,
                      "download_rows_per_block": rows_per_block, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
