"""Phase 4, publish: the kept rows of every committed work shard -> ``OUTPUT/{en,multi,nolang}/``.

Rows are keyed by (subset, ``hash`` mod n_buckets) and each group is written as
``part-g<generation>-<bucket>.parquet``, so the files depend neither on the order in
which shards were scored nor on which node scored them. A publish writes a new
generation next to the live one, then the pointer ``_published.json``, then removes
the old generation (:meth:`~laionbuild.output.layout.OutputLayout.commit_published`):
readers see one generation whole, and a publish cut short is redone by the rerun. Rows are unique already (phase 2); the
block lists of the config and the lists recorded by ``laionbuild remove`` are
applied here a second time (the first is before download), so a list that grew
before a rerun also covers finished shards. Small outputs are published in the
driver, large ones as a shuffle on the Ray engine: the same groups, the same writer,
the same files.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import schema as S
from ..config import Config
from ..output.fs import open_fs
from ..output.layout import IMAGES, OutputLayout
from ..stages import shards
from ..stages.blocklist import Blocklist, filter_image_tar, filter_table
from ..stages.pair_dedup import drop_repeated_pairs
from ..stats import RunStats

_KEY = "_bucket"
#: concurrent reads of parts (and footers, for markers written before they recorded their parts' rows)
READ_THREADS = 16
#: parts read before they are joined into one table (publish in the driver)
COMBINE_PARTS = 256


class PublishFilter:
    """Block lists of the config + removal lists recorded in the output, applied to published tables.

    Pickled into Ray tasks without its loaded lists; each process loads them once.
    """

    def __init__(self, blocklist_cfg, output: str):
        self.blocklist_cfg = blocklist_cfg
        self.output = output
        self._lists: list[Blocklist] | None = None

    def __getstate__(self):
        return {"blocklist_cfg": self.blocklist_cfg, "output": self.output, "_lists": None}

    def lists(self) -> list[Blocklist]:
        if self._lists is None:
            from ..stages.blocklist import cached

            self._lists = [cached(self.blocklist_cfg), OutputLayout(self.output).removal_lists()]
        return self._lists

    @property
    def empty(self) -> bool:
        return all(bl.empty for bl in self.lists())

    def __call__(self, table: pa.Table) -> tuple[pa.Table, Counter]:
        kept, counts, _ = filter_table(table, self.lists())
        return kept, counts


class PublishBucket:
    """Writes one (subset, bucket) group as ``part-<bucket>.parquet`` (+ embeddings, + safe view)."""

    def __init__(self, target_dir: str, generation: int, compression: str, row_filter: PublishFilter | None,
                 safe: tuple[float | None, float | None] | None = None, dedup_pairs: bool = False):
        #: one row per (URL, TEXT) after download (``run.dedup_after_download``)
        self.dedup_pairs = dedup_pairs
        self.target_dir = target_dir
        self.generation = generation
        self.compression = compression
        self.row_filter = row_filter
        #: (punsafe_max, pwatermark_max): also write the ``<subset>_safe`` view
        self.safe = safe

    def __call__(self, table: pa.Table) -> pa.Table:
        subset, bucket = table.column(_KEY)[0].as_py().split("/")
        table = table.drop_columns([c for c in (_KEY, "path") if c in table.column_names])
        rows_in = table.num_rows
        filtered: dict = {}
        if self.row_filter is not None:
            table, filtered = self.row_filter(table)
        if self.dedup_pairs:
            table, repeated = drop_repeated_pairs(table)
            if repeated:
                filtered = {**filtered, "fetch:duplicate_after_download": repeated}
        table = table.sort_by([("hash", "ascending"), ("URL", "ascending"), ("TEXT", "ascending")])
        emb_cols = [c for c in shards.EMBEDDING_COLUMNS if c in table.column_names]
        fs, root = open_fs(self.target_dir)
        name = f"part-g{self.generation:04d}-{int(bucket):05d}.parquet"
        main = table.drop_columns(emb_cols)
        shards.write_bytes_atomic(fs, posixpath.join(root, subset, name), shards.table_to_bytes(main, self.compression))
        if emb_cols:
            emb = table.select(["key", *emb_cols])
            shards.write_bytes_atomic(fs, posixpath.join(root, f"{subset}_embeddings", name),
                                      shards.table_to_bytes(emb, self.compression))
        safe_rows, left_out = 0, {}
        if self.safe is not None:
            view, left_out = shards.safe_view(main, *self.safe)
            safe_rows = view.num_rows
            shards.write_bytes_atomic(fs, posixpath.join(root, f"{subset}_safe", name),
                                      shards.table_to_bytes(view, self.compression))
        return pa.table({"subset": [subset], "bucket": [int(bucket)], "name": [name], "embeddings": [bool(emb_cols)], "rows_in": [rows_in],
                         "rows_out": [table.num_rows], "rows_safe": [safe_rows],
                         "safe_left_out": [json.dumps(left_out)], "filtered": [json.dumps(dict(filtered))]})


def part_subset(path: str) -> str:
    return posixpath.basename(path).split("-", 1)[0]


def _add_bucket(table: pa.Table, n_buckets: dict[str, int]) -> pa.Table:
    hashes = table.column("hash").to_numpy().astype(np.uint64)
    subsets = [part_subset(p) for p in table.column("path").to_pylist()]
    keys = [f"{sub}/{int(h % np.uint64(n_buckets[sub]))}" for sub, h in zip(subsets, hashes)]
    return table.append_column(_KEY, pa.array(keys, pa.string()))


def _publish_in_driver(layout: OutputLayout, parts: list[str], n_buckets: dict[str, int], writer) -> list[dict]:
    def read(path: str) -> pa.Table:
        with layout.fs.open(path, "rb") as fh:
            return pq.read_table(fh)

    results: list[dict] = []
    for subset, n in n_buckets.items():
        mine = [p for p in parts if part_subset(p) == subset]
        chunks = []
        with ThreadPoolExecutor(max_workers=max(1, min(READ_THREADS, len(mine)))) as pool:
            # object stores answer each read in tens of ms; the parts are joined a chunk at a time,
            # so that the driver never holds one table per part (≈ 9 KiB each, however few rows)
            for start in range(0, len(mine), COMBINE_PARTS):
                tables = list(pool.map(read, mine[start:start + COMBINE_PARTS]))
                chunks.append(pa.concat_tables(tables, promote_options="default").combine_chunks())
        table = pa.concat_tables(chunks, promote_options="default").combine_chunks()
        buckets = (table.column("hash").to_numpy().astype(np.uint64) % np.uint64(n)).astype(np.int64)
        for b in np.unique(buckets):
            group = table.filter(pa.array(buckets == b))
            group = group.append_column(_KEY, pa.array([f"{subset}/{int(b)}"] * group.num_rows, pa.string()))
            results += writer(group).to_pylist()
    return results


def _publish_on_engine(layout: OutputLayout, parts: list[str], n_buckets: dict[str, int], writer) -> list[dict]:
    import ray

    ds = ray.data.read_parquet([layout.url_of(p) for p in parts], include_paths=True)
    ds = ds.map_batches(_add_bucket, fn_kwargs={"n_buckets": n_buckets}, batch_format="pyarrow")

    def publish_bucket(table: pa.Table) -> pa.Table:  # map_groups wants a plain function
        return writer(table)

    return ds.groupby(_KEY).map_groups(publish_bucket, batch_format="pyarrow").take_all()


def _part_rows(layout: OutputLayout, scored: list[dict], parts: list[str]) -> dict[str, int]:
    """Rows of each part: from the markers (written by the scoring tasks), footers only for markers
    of an older format, read concurrently."""
    known = {p: n for m in scored for p, n in (m.get("part_rows") or {}).items()}
    missing = [p for p in parts if p not in known]
    if missing:
        def rows(path: str) -> int:
            with layout.fs.open(path, "rb") as fh:
                return pq.ParquetFile(fh).metadata.num_rows

        with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(missing))) as pool:
            known.update(zip(missing, pool.map(rows, missing)))
    return {p: known[p] for p in parts}


def publish(cfg: Config, layout: OutputLayout, scored: list[dict], stats: RunStats, lease=None) -> dict[str, list[str]]:
    """Write the published subsets from the committed work shards; books what the filters took out.

    ``lease``: the run's :class:`~laionbuild.output.lease.RunLease`, checked before the pointer is
    written; the pointer is written only if no other run published since this one started to."""
    parts = sorted(p for m in scored for p in m["parts"] if part_subset(p) in S.SUBSETS)
    rows = _part_rows(layout, scored, parts)
    n_buckets: dict[str, int] = {}
    totals: dict[str, int] = {}
    for subset in S.SUBSETS:
        mine = [p for p in parts if part_subset(p) == subset]
        if mine:
            totals[subset] = sum(rows[p] for p in mine)
            n_buckets[subset] = max(1, -(-totals[subset] // cfg.output.rows_per_shard))
    layout.rm(layout.path("_publish"))  # the staging folder of earlier versions
    tag = layout.published_tag()  # before the pointer: the commit is conditioned on it
    old = layout.published()
    generation = layout.reserve_generation(old)
    row_filter = PublishFilter(cfg.blocklist, layout.url)
    results: list[dict] = []
    if parts:
        safe = (cfg.safety.punsafe_max, cfg.safety.pwatermark_max) if cfg.safety.write_safe_subsets else None
        writer = PublishBucket(layout.url, generation, cfg.output.compression,
                               None if row_filter.empty else row_filter, safe, cfg.run.dedup_after_download)
        if sum(totals.values()) <= cfg.ray.local_max_rows:
            results = _publish_in_driver(layout, parts, n_buckets, writer)
        else:
            results = _publish_on_engine(layout, parts, n_buckets, writer)
    files: dict[str, list[str]] = {}
    for subset in S.SUBSETS:
        mine = sorted((r for r in results if r["subset"] == subset), key=lambda r: r["bucket"])
        _book_filtered(stats, mine, subset)
        stats.kept_per_subset[subset] = sum(r["rows_out"] for r in mine)
        layout.fs.makedirs(layout.subset_dir(subset), exist_ok=True)
        files[subset] = [layout.path(subset, r["name"]) for r in mine]
        emb = [layout.path(f"{subset}_embeddings", r["name"]) for r in mine if r["embeddings"]]
        if emb:
            files[f"{subset}_embeddings"] = emb
        if cfg.safety.write_safe_subsets:
            left_out: Counter = Counter()
            for r in mine:
                left_out.update(json.loads(r["safe_left_out"]))
            layout.fs.makedirs(layout.subset_dir(subset, "_safe"), exist_ok=True)
            stats.extra.setdefault("safe_subsets", {})[subset] = {
                "rows": sum(r["rows_safe"] for r in mine), "left_out": dict(sorted(left_out.items()))}
            files[f"{subset}_safe"] = [layout.path(f"{subset}_safe", r["name"]) for r in mine]
    images = _publish_images(layout, scored, row_filter, generation,
                             on_engine=sum(totals.values()) > cfg.ray.local_max_rows)
    if images:
        files[IMAGES] = images
    if lease is not None:
        lease.check()  # a run paused past its lease never points readers at its files
    layout.commit_published(generation, files, dict(stats.kept_per_subset), expect_tag=tag,
                            stats=stats.to_json().encode("utf-8"))  # the run's end rewrites them whole
    return {folder: files.get(folder, [])
            for folder in [*S.SUBSETS, *(f"{s}_safe" for s in S.SUBSETS if cfg.safety.write_safe_subsets)]}


def _book_filtered(stats: RunStats, results: list[dict], subset: str) -> None:
    """Rows the publish filter took out of ``subset``: block lists per stage, removals apart."""
    counts: Counter = Counter()
    for r in results:
        counts.update(json.loads(r.get("filtered") or "{}"))
    removed = stats.extra.setdefault("removed", {"total": 0, "by_list": {}, "per_subset": {}})
    for reason, n in counts.items():
        prefix, _, name = reason.partition(":")
        if prefix == "removed":
            removed["by_list"][name] = removed["by_list"].get(name, 0) + n
            removed["per_subset"][subset] = removed["per_subset"].get(subset, 0) + n
            removed["total"] += n
        else:
            stats.stage(prefix).drop(name, n)
            stats.stage(prefix).count("dropped_at_publish", n)
    if not removed["total"]:
        stats.extra.pop("removed")


def _publish_images(layout: OutputLayout, scored: list[dict], row_filter: PublishFilter,
                    generation: int, on_engine: bool = False) -> list[str]:
    """Copies of the scored image tars as ``images/part-g<generation>-NNNNN.tar``, filtered: each
    tar read and written once (copied inside the store when no list names a row of it), many at
    once -- Ray tasks on the engine, threads of the driver for a small run."""
    tars = sorted(p for m in scored for p in m["parts"] if p.endswith(".tar"))
    if not tars:
        return []
    target = layout.path(IMAGES)
    layout.fs.makedirs(target, exist_ok=True)
    written = [posixpath.join(target, layout.published_name(generation, i, ".tar")) for i in range(len(tars))]
    pairs = list(zip(tars, written))
    if on_engine:
        _images_on_engine(layout.url, pairs, row_filter)
    else:
        with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(pairs))) as pool:
            list(pool.map(lambda pair: publish_image_tar(layout.url, pair, row_filter), pairs))
    return written


def publish_image_tar(output: str, pair: tuple[str, str], row_filter: PublishFilter) -> int:
    """One scored image tar to its published name, without the rows the lists name."""
    source, target = pair
    return filter_image_tar(OutputLayout(output).fs, source, row_filter.lists(), target=target)


#: image tars being published at once by Ray tasks
IMAGE_TASKS_IN_FLIGHT = 256


def _images_on_engine(output: str, pairs: list[tuple[str, str]], row_filter: PublishFilter) -> None:
    import ray

    task = ray.remote(publish_image_tar).options(num_cpus=0.25)
    shared = ray.put(row_filter)
    waiting: list = []
    for pair in pairs:
        if len(waiting) >= IMAGE_TASKS_IN_FLIGHT:
            done, waiting = ray.wait(waiting, num_returns=1)
            ray.get(done)
        waiting.append(task.remote(output, pair, shared))
    ray.get(waiting)
