"""Phase 2, de-dup: one global de-duplication of all new candidates, before anything is downloaded.

The key is ``run.dedup_key``: ``url`` (LAION-5B: one row per image URL) or
``url_text`` (one row per (URL, TEXT) pair). Among the new rows of one key the
row with the smallest ``(warc_path, warc_offset, TEXT)`` wins, whatever the order
in which inputs were read; a key already present in an earlier generation of the
same output folder wins over every new row, so adding a crawl snapshot to a
finished output fetches only pairs it does not hold yet.

Rows are hash-partitioned by key into buckets of about ``run.work_shard_rows``
rows; each bucket is de-duplicated alone (in the driver for small runs, as a
``groupby().map_groups()`` shuffle on the Ray engine above ``ray.local_max_rows``,
same files either way) and written as work shards of at most
``run.work_shard_rows`` rows. The generation's manifest, written last, commits it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import schema as S
from ..config import Config
from ..stages import shards
from ..stats import StageCounters
from .adapter import node_id
from ..output.layout import WORKSHARDS, OutputLayout

log = logging.getLogger(__name__)

STAGE = "dedup"
DUPLICATE = "duplicate"
ALREADY_IN_OUTPUT = "already_in_output"
_BUCKET = "_bucket"
_PREV = "_prev"


def key_columns(key: str) -> tuple[str, ...]:
    return ("URL",) if key == "url" else ("URL", "TEXT")


def key_hashes(table: pa.Table, key: str) -> np.ndarray:
    """Stable 64-bit hash of each row's de-dup key (as uint64)."""
    if key == "url":
        urls = table.column("URL").to_pylist()
        return np.fromiter((S.url_hash(u) for u in urls), dtype=np.int64, count=len(urls)).astype(np.uint64)
    return table.column("hash").to_numpy().astype(np.uint64)


def with_bucket(table: pa.Table, key: str, n_buckets: int, prev: bool) -> pa.Table:
    buckets = (key_hashes(table, key) % np.uint64(n_buckets)).astype(np.int64)
    table = table.append_column(_BUCKET, pa.array(buckets, pa.int64()))
    return table.append_column(_PREV, pa.array(np.full(table.num_rows, prev), pa.bool_()))


def _key_strings(table: pa.Table, key: str) -> pa.Array:
    if key == "url":
        return table.column("URL").combine_chunks()
    return pc.binary_join_element_wise(table.column("URL"), table.column("TEXT"), "\x00").combine_chunks()


def dedup_rows(new: pa.Table, prev: pa.Table | None, key: str, enabled: bool = True) -> tuple[pa.Table, StageCounters]:
    """Unique rows of ``new`` (one per key, order-independent tie-break), minus keys in ``prev``."""
    counters = StageCounters()
    n = new.num_rows
    if n == 0:
        return new, counters
    cols = key_columns(key)
    order = [(c, "ascending") for c in cols] + [("warc_path", "ascending"), ("warc_offset", "ascending")]
    if "TEXT" not in cols:
        order.append(("TEXT", "ascending"))
    table = new.sort_by(order)
    if enabled and n > 1:
        same = None
        for c in cols:
            col = table.column(c)
            eq = pc.equal(col.slice(1), col.slice(0, n - 1))
            same = eq if same is None else pc.and_(same, eq)
        first = pa.concat_arrays([pa.array([True]), pc.invert(same).combine_chunks()])
        unique = table.filter(first)
        counters.drop(DUPLICATE, n - unique.num_rows)
        table = unique
    if prev is not None and prev.num_rows and table.num_rows:
        seen = pc.is_in(_key_strings(table, key), value_set=_key_strings(prev, key))
        fresh = table.filter(pc.invert(seen))
        counters.drop(ALREADY_IN_OUTPUT, table.num_rows - fresh.num_rows)
        table = fresh
    counters.kept = table.num_rows
    return table, counters


class BucketWriter:
    """De-duplicate one bucket and write it as work shards; returns a one-row summary table."""

    def __init__(self, output: str, key: str, generation: int, shard_rows: int, compression: str,
                 enabled: bool = True, row_group_rows: int = 1024):
        self.output = output
        self.key = key
        self.generation = generation
        self.shard_rows = shard_rows
        self.compression = compression
        self.enabled = enabled
        #: row groups = the blocks the fetch-and-score phase reads
        self.row_group_rows = row_group_rows

    def __call__(self, table: pa.Table) -> pa.Table:
        bucket = int(table.column(_BUCKET)[0].as_py()) if table.num_rows else 0
        is_prev = table.column(_PREV).to_numpy(zero_copy_only=False) if _PREV in table.column_names else None
        table = table.drop_columns([c for c in (_BUCKET, _PREV) if c in table.column_names])
        if is_prev is not None and is_prev.any():
            prev, new = table.filter(pa.array(is_prev)), table.filter(pa.array(~is_prev))
        else:
            prev, new = None, table
        unique, counters = dedup_rows(new, prev, self.key, self.enabled)
        written = self.write(unique, bucket)
        return pa.table({"bucket": [bucket], "shards": [json.dumps(written)],
                         "counters": [json.dumps(counters.to_dict())], "node": [node_id()]})

    def write(self, unique: pa.Table, bucket: int) -> list[dict[str, Any]]:
        layout = OutputLayout(self.output)
        unique = unique.sort_by([("hash", "ascending"), ("URL", "ascending"), ("TEXT", "ascending")])
        out = []
        for chunk, start in enumerate(range(0, unique.num_rows, self.shard_rows)):
            part = unique.slice(start, self.shard_rows)
            shard_id = f"g{self.generation:04d}-b{bucket:05d}-{chunk:02d}"
            shards.write_bytes_atomic(layout.fs, layout.workshard_file(shard_id),
                                      shards.table_to_bytes(part, self.compression, self.row_group_rows))
            out.append({"id": shard_id, "rows": part.num_rows})
        return out


def _read(layout: OutputLayout, paths: list[str], columns: list[str] | None = None) -> pa.Table | None:
    tables = []
    for p in paths:
        with layout.fs.open(p, "rb") as fh:
            tables.append(pq.read_table(fh, columns=columns))
    return pa.concat_tables(tables, promote_options="default") if tables else None


def _rows(layout: OutputLayout, paths: list[str]) -> int:
    total = 0
    for p in paths:
        with layout.fs.open(p, "rb") as fh:
            total += pq.ParquetFile(fh).metadata.num_rows
    return total


def clean_uncommitted(layout: OutputLayout, manifests: list[dict]) -> None:
    """Work shards that no manifest lists are leftovers of an interrupted de-dup phase."""
    listed = {s["id"] for m in manifests for s in m["shards"]}
    stale = [p for stem, p in layout.names(layout.path(WORKSHARDS), ".parquet").items() if stem not in listed]
    layout.rm_many(stale)


def run_dedup_phase(cfg: Config, layout: OutputLayout, committed: dict[str, dict]) -> dict | None:
    """De-duplicate the committed inputs that no earlier generation holds; returns the new manifest."""
    manifests = layout.manifests()
    clean_uncommitted(layout, manifests)
    consumed = {(fid, tok) for m in manifests for fid, tok in m["inputs"].items()}
    new = {fid: m for fid, m in committed.items() if (fid, m["token"]) not in consumed}
    if not new:
        return None
    started = time.monotonic()
    generation = max((m["generation"] for m in manifests), default=-1) + 1
    key = cfg.run.dedup_key
    new_files = [layout.candidates_file(fid) for fid in sorted(new)]
    prev_files = [layout.workshard_file(s["id"]) for m in manifests for s in m["shards"]]
    total = sum(m["n_candidates"] for m in new.values())
    shard_rows = cfg.run.work_shard_rows
    n_buckets = max(1, math.ceil(total / shard_rows))
    writer = BucketWriter(layout.url, key, generation, shard_rows, cfg.output.compression, cfg.run.global_dedup,
                          cfg.ray.stream_rows)
    if total + (_rows(layout, prev_files) if prev_files else 0) <= cfg.ray.local_max_rows:
        results = _dedup_in_driver(layout, new_files, prev_files, key, n_buckets, writer)
        engine = "driver"
    else:
        results = _dedup_on_engine(layout, new_files, prev_files, key, n_buckets, writer)
        engine = "ray"
    counters = StageCounters()
    shards_out: list[dict] = []
    nodes = set()
    for r in results:
        counters.merge(json.loads(r["counters"]))
        shards_out += json.loads(r["shards"])
        nodes.add(r["node"])
    manifest = {
        "generation": generation, "key": key, "engine": engine,
        "inputs": {fid: m["token"] for fid, m in sorted(new.items())},
        "candidates": total, "unique": counters.kept,
        "shards": sorted(shards_out, key=lambda s: s["id"]),
        "counters": {STAGE: counters.to_dict()},
        "nodes": sorted(n for n in nodes if n),
        "seconds": round(time.monotonic() - started, 2),
    }
    shards.write_json_atomic(layout.fs, layout.manifest(generation), manifest)  # the commit
    log.info("de-dup generation %d: %d candidates -> %d unique (key %s) in %d work shards",
             generation, total, counters.kept, key, len(shards_out))
    return manifest


def _dedup_in_driver(layout: OutputLayout, new_files: list[str], prev_files: list[str], key: str,
                     n_buckets: int, writer: BucketWriter) -> list[dict]:
    new = _read(layout, new_files)
    prev = _read(layout, prev_files, list(key_columns(key)) + ["hash"]) if prev_files else None
    if new is None:
        return []
    new = with_bucket(new, key, n_buckets, False)
    if prev is not None:
        prev = with_bucket(prev, key, n_buckets, True)
    buckets = new.column(_BUCKET).to_numpy()
    prev_buckets = prev.column(_BUCKET).to_numpy() if prev is not None else None
    results = []
    for b in np.unique(buckets):
        group = new.filter(pa.array(buckets == b))
        if prev is not None:
            mine = prev.filter(pa.array(prev_buckets == b))
            if mine.num_rows:
                group = pa.concat_tables([group, mine], promote_options="default")
        results += writer(group).to_pylist()
    return results


def _dedup_on_engine(layout: OutputLayout, new_files: list[str], prev_files: list[str], key: str,
                     n_buckets: int, writer: BucketWriter) -> list[dict]:
    import ray

    def bucketed(files: list[str], prev: bool, columns=None):
        ds = ray.data.read_parquet([layout.url_of(p) for p in files], columns=columns)
        return ds.map_batches(with_bucket, fn_kwargs={"key": key, "n_buckets": n_buckets, "prev": prev},
                              batch_format="pyarrow")

    ds = bucketed(new_files, False)
    if prev_files:
        # earlier generations' rows in full, so that both sides of the union share one schema
        ds = ds.union(bucketed(prev_files, True))

    def dedup_bucket(table: pa.Table) -> pa.Table:  # map_groups wants a plain function
        return writer(table)

    return ds.groupby(_BUCKET).map_groups(dedup_bucket, batch_format="pyarrow").take_all()


def pending_shards(layout: OutputLayout, manifests: list[dict]) -> dict[str, int]:
    """``{shard_id: rows}`` of the work shards not scored yet."""
    done = set(layout.names(layout.path("scored", "_done"), ".json"))
    return {s["id"]: s["rows"] for m in manifests for s in m["shards"] if s["id"] not in done}


__all__ = ["BucketWriter", "dedup_rows", "key_columns", "pending_shards", "run_dedup_phase"]
