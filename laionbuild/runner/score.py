"""Phase 3, fetch and score: each work shard downloaded, resized, CLIP-scored and committed on its own.

Work shards enter the stream in order, a row group at a time; block lists and the
download run in CPU actors, CLIP (and the safety models) in GPU actors when the
cluster has GPUs, then writer tasks put each batch's rows (``output.part_rows``, see
:func:`part_rows`) of each shard under ``scored/<shard_id>/`` as one part: the kept rows per subset and
``fates-*.parquet`` with every row's fate (fetch status, similarity, drop
reason). The driver commits a shard once its parts hold all its rows (a shard
written in several parts through a task that joins them into one part per kind
first); a rerun keeps the parts of an interrupted shard and redoes only its
missing rows (see :mod:`.commit`).
"""

from __future__ import annotations

import json
import logging
import posixpath
import uuid
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import schema as S
from ..config import Config
from ..output.fs import open_fs
from ..output.layout import OutputLayout
from ..stages import registry, shards
from ..stats import StageCounters
from .adapter import (StageActor, StreamStageActor, actor_pool, clear_deaths, node_id, nodes_of, retries, stage_retries,
                      streaming_blocks, task_pool)
from .commit import (FATES, SHARD_ID, SHARD_ROW, Compactor, ShardTracker, compact_shard, part_name, recover_parts,
                     with_part_meta)
from .progress import Progress, StallWatch
from .resources import ClusterShape, cluster_room, score_plan

log = logging.getLogger(__name__)

#: stages of this phase, in order; each reports its own counters (``<stage>:<reason>`` drops)
STAGES = tuple(s.name for s in registry.of_phase("score"))
#: automatic ``output.part_rows``: a writer's batch holds at most this many rows. A scored row
#: carries no pixels (the CLIP stage drops them): ≈ 0.5 KiB in Arrow on the synthetic crawl,
#: ≈ 1 KiB with Common Crawl's longer paths, so a batch is ≈ 20 MiB (60-80 MiB with
#: ``clip.save_embeddings``: 2-3 KiB more a row)
AUTO_PART_ROWS = 20_000
#: the same with ``output.save_images``: each row also carries its encoded image (≈ 30 KiB on
#: average for a 224 px JPEG at quality 95, 47 KiB at the 95th percentile): ≈ 60-90 MiB a batch
AUTO_PART_ROWS_WITH_IMAGES = 2_000
#: columns of the per-row fate files
FATE_COLUMNS = {"URL": S.URL, "TEXT": S.ALT_TEXT, "hash": S.HASH, "subset": S.SUBSET, "LANGUAGE": S.LANGUAGE,
                "status": S.STATUS, "similarity": S.SIMILARITY, "drop_reason": S.DROP_REASON,
                "WIDTH": S.WIDTH, "HEIGHT": S.HEIGHT}


# --------------------------------------------------------------------------- stages (built once per actor)
class FetchStage:
    """Block lists before any request (and on every redirect hop), then download + resize. The
    lists ``laionbuild remove`` recorded in the output folder count as block lists here (drop
    reason ``blocklist:removed/<list>``): a new pair of a taken-down URL is never fetched."""

    def __init__(self, cfg: Config):
        from ..output.layout import OutputLayout
        from ..stages.blocklist import Blocklist
        from ..stages.fetch import ImageFetcher

        self.blocklist = Blocklist.from_config(cfg.blocklist)
        if cfg.run.output:
            OutputLayout(cfg.run.output).removal_lists(into=self.blocklist, name_prefix="removed/")
        url_filter = None if self.blocklist.empty else self.blocklist.match_url
        self.fetcher = ImageFetcher(cfg.fetch, cfg.resize, keep_image_bytes=cfg.output.save_images,
                                    url_filter=url_filter)

    def __call__(self, batch):
        return self.fetcher(self.blocklist(batch))

    def stream(self, batch):
        """The batch's rows in the order they complete (several calls may run at once)."""
        return self.fetcher.stream([self.blocklist(batch)])

    def isolate(self) -> None:
        """Decode images in child processes from now on (a restarted worker)."""
        self.fetcher.isolate_decoding()

    def watch(self) -> None:
        """End this worker process when a decode is stuck past ``fetch.decode_cpu_limit_s``."""
        self.fetcher.end_process_when_stuck()


def tokenize_stage(cfg: Config):
    from ..models import localize_models
    from ..stages.clip_score import ClipTokenizer

    return ClipTokenizer(localize_models(cfg).clip)


def clip_stage(cfg: Config):
    from ..models import localize_models
    from ..stages.clip_score import ClipScorer

    cfg = localize_models(cfg)  # this node's copy of the model cache
    return ClipScorer(cfg.clip, cfg.resize.image_size, safety=cfg.safety)


def stage_counters(batch: dict[str, np.ndarray], cfg: Config | None = None) -> dict[str, StageCounters]:
    """Each stage's own counters, read off a batch that went through every stage (only the
    stages that ran when ``cfg`` is given)."""
    return {spec.name: spec.function("counters")(batch, registry.later_than(spec.name))
            for spec in registry.of_phase("score") if cfg is None or spec.is_enabled(cfg)}


def part_rows(cfg: Config) -> int:
    """Rows per part: ``output.part_rows``, or automatic (a work shard, within a memory bound)."""
    if cfg.output.part_rows > 0:
        return cfg.output.part_rows
    return min(cfg.run.work_shard_rows, AUTO_PART_ROWS_WITH_IMAGES if cfg.output.save_images else AUTO_PART_ROWS)


# --------------------------------------------------------------------------- reading and writing
def read_work_shard(item: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """``map_batches`` body (batch of one item): the rows of one work shard, a batch per row group,
    without the rows (``skip``: their indices in the shard) that an earlier run already wrote.
    The footer is read here, in a task, never by the driver."""
    path, shard_id = str(item["path"][0]), str(item[SHARD_ID][0])
    skip = np.asarray(json.loads(str(item["skip"][0]) or "[]"), dtype=np.int64)
    fs, local = open_fs(path)
    with fs.open(local, "rb") as fh:
        pf = pq.ParquetFile(fh)
        start = 0
        for group in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(group).num_rows
            rows = np.arange(start, start + n, dtype=np.int64)
            start += n
            keep = ~np.isin(rows, skip) if len(skip) else np.ones(n, bool)
            if not keep.any():
                continue
            table = pf.read_row_group(group)
            if not keep.all():
                table, rows = table.filter(pa.array(keep)), rows[keep]
            batch = S.candidate_table_to_batch(table)
            batch[SHARD_ID] = np.full(table.num_rows, shard_id, dtype=object)
            batch[SHARD_ROW] = rows
            yield batch


def stream_items(layout: OutputLayout, pending: dict[str, int], recovered: dict) -> list[dict]:
    """One item per pending shard that still has rows to do, in shard order; no I/O (the manifest
    gave the rows, the recovered parts the rows already written)."""
    items = []
    for sid in sorted(pending):  # shard order = commit order, roughly
        done = recovered[sid].rows if sid in recovered else np.zeros(0, np.int64)
        if len(done) >= pending[sid]:
            continue
        items.append({"path": layout.url_of(layout.workshard_file(sid)), SHARD_ID: sid,
                      "skip": json.dumps(done.tolist()) if len(done) else ""})
    return items


class ShardPartWriter:
    """Writes the rows of a batch under ``scored/<shard_id>/``; one summary row per shard touched."""

    def __init__(self, cfg: Config, output: str):
        self.cfg = cfg
        self.output = output

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        layout = OutputLayout(self.output)
        ids = np.asarray(batch[SHARD_ID], dtype=object)
        out: dict[str, list] = {SHARD_ID: [], "n_rows": [], "parts": [], "counters": [], "node": []}
        #: parts: ``{path: rows}`` (rows of the subset tables; 0 for fates and images)
        for shard_id in sorted(set(ids)):
            mask = ids == shard_id
            sub = {k: v[mask] for k, v in batch.items()}
            counters = stage_counters(sub, self.cfg)  # a stage that did not run reports nothing
            counters = {k: c.to_dict() for k, c in counters.items()}
            nodes = {k: sorted(v) for k, v in nodes_of(sub).items()}
            nodes["write"] = [node_id()]
            out[SHARD_ID].append(shard_id)
            out["n_rows"].append(int(mask.sum()))
            out["parts"].append(json.dumps(self._write(layout, shard_id, sub, counters, nodes)))
            out["counters"].append(json.dumps(counters))
            out["node"].append(json.dumps(nodes))
        return {SHARD_ID: np.array(out[SHARD_ID], dtype=object), "n_rows": np.array(out["n_rows"], dtype=np.int64),
                "parts": np.array(out["parts"], dtype=object), "counters": np.array(out["counters"], dtype=object),
                "node": np.array(out["node"], dtype=object)}

    def _write(self, layout: OutputLayout, shard_id: str, sub: dict[str, np.ndarray], counters: dict,
               nodes: dict) -> dict[str, int]:
        token = uuid.uuid4().hex[:12]
        compression = self.cfg.output.compression
        folder = layout.scored_dir(shard_id)
        written: dict[str, int] = {}

        def put(kind: str, data: bytes, rows: int) -> None:
            path = posixpath.join(folder, part_name(kind, token))
            shards.write_bytes_atomic(layout.fs, path, data)
            written[path] = rows

        alive = np.asarray(sub[S.DROP_REASON], dtype=object) == ""
        subsets = np.asarray(sub[S.SUBSET], dtype=object)
        for subset in S.SUBSETS:
            mask = alive & (subsets == subset)
            if mask.any():
                put(subset, shards.table_to_bytes(shards.output_table(sub, mask), compression), int(mask.sum()))
        if self.cfg.output.save_images and S.IMAGE_BYTES in sub and alive.any():
            put("images", shards.images_tar(sub, alive), int(alive.sum()))
        # the fates file last: a part exists once it does (a rerun keeps it, see .commit)
        put(FATES, shards.table_to_bytes(with_part_meta(fate_table(sub), counters, nodes), compression),
            S.batch_len(sub))
        return written


def fate_table(batch: dict[str, np.ndarray]) -> pa.Table:
    """Every row of a batch with its fate: fetch status, similarity, drop reason (``""`` = kept)."""
    n = S.batch_len(batch)
    cols = {}
    for name, internal in FATE_COLUMNS.items():
        values = batch.get(internal)
        if internal == S.SIMILARITY:
            values = np.full(n, np.nan, np.float32) if values is None else np.asarray(values, np.float32)
            cols[name] = pa.array(values, pa.float32())
        elif internal in (S.WIDTH, S.HEIGHT):
            cols[name] = pa.array(np.zeros(n, np.int32) if values is None else np.asarray(values, np.int32))
        elif internal == S.HASH:
            cols[name] = pa.array(np.asarray(values, np.int64), pa.int64())
        else:
            cols[name] = pa.array(["" if values is None or v is None else str(v) for v in
                                   (values if values is not None else [None] * n)], pa.string())
    if SHARD_ROW in batch:
        cols[SHARD_ROW] = pa.array(np.asarray(batch[SHARD_ROW], np.int64), pa.int64())
    for name in (S.NSFW,):
        if name in batch:
            cols[name] = pa.array([str(v) for v in batch[name]], pa.string())
    for name in shards.SAFETY_COLUMNS:
        if name in batch:
            cols[name] = pa.array(np.asarray(batch[name], np.float32), pa.float32())
    return pa.table(cols)


# --------------------------------------------------------------------------- the driver
def ray_compactor(output: str, compression: str, cpus: float, resources: dict | None = None) -> Compactor:
    """:func:`~.commit.compact_shard` of a complete shard as a Ray task (the driver only tracks
    its future); ``cpus`` and ``resources``: the share and placement of a writer task."""
    import ray

    task = ray.remote(compact_shard).options(num_cpus=cpus, **(resources or {}))
    return lambda sid, marker: task.remote(output, marker, compression).future()


#: fetched rows per block that the fetch stage sends on to CLIP (Ray Data sends a block on when
#: it is full or the call that yields it ends: with its default of 128 MiB, all of a batch's rows
#: waited for the slowest). About 5 blocks per 256-row batch: more blocks would cost the driver,
#: which schedules every block, more work per row.
STREAM_BLOCK_ROWS = 48


def stream_block_bytes(cfg: Config) -> int:
    """Bytes of :data:`STREAM_BLOCK_ROWS` fetched rows: their pixels and about 1 KiB of the rest."""
    return STREAM_BLOCK_ROWS * (cfg.resize.image_size ** 2 * 3 + 1024)


def run_score_phase(cfg: Config, layout: OutputLayout, pending: dict[str, int],
                    shape: ClusterShape) -> tuple[list[str], int]:
    """Fetch and score every pending work shard; returns the shards left uncommitted and the rows
    kept from an interrupted run (not fetched again)."""
    import ray

    recovered = recover_parts(layout, pending)
    kept = sum(len(r.rows) for r in recovered.values())
    plan = score_plan(cfg, shape, rows=sum(pending.values()) - kept)
    items = stream_items(layout, pending, recovered)
    log.info("fetch and score: %d work shards, %d rows; CLIP actors: %d x %s; parts of %d rows", len(pending),
             sum(pending.values()) - kept, plan.clip_actors, plan.clip_resources, part_rows(cfg))
    progress = Progress(len(pending), cfg.run.progress, "phase 3/4 fetch+score", "shard")
    # a shard written in several parts is committed as one part per kind by a task (see .commit)
    tracker = ShardTracker(layout, pending, progress, recovered,
                           compactor=ray_compactor(layout.url, cfg.output.compression, plan.write_cpus,
                                                   plan.cpu_resources),
                           compactions=plan.write_tasks)
    if not items:
        tracker.close()
        progress.close()
        return sorted(tracker.pending), kept
    with streaming_blocks(stream_block_bytes(cfg)):  # fetched rows go on as they complete
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), cfg.ray.max_blocks)))
    ds = ds.map_batches(read_work_shard, batch_size=1, batch_format="numpy", num_cpus=plan.read_cpus,
                        compute=task_pool(plan.read_tasks), **plan.cpu_resources, **retries(cfg, actors=False))
    ds = ds.map_batches(StreamStageActor, fn_constructor_args=(FetchStage, cfg, "fetch"), batch_format="numpy",
                        batch_size=cfg.fetch.batch_size,
                        compute=actor_pool(plan.fetch_actors, concurrent_calls=cfg.fetch.batches_in_flight),
                        num_cpus=plan.fetch_cpus, **plan.cpu_resources, **stage_retries(cfg))
    if plan.tokenize_upstream:
        ds = ds.map_batches(StageActor, fn_constructor_args=(tokenize_stage, cfg, "tokenize"), batch_format="numpy",
                            batch_size=cfg.clip.batch_size, compute=actor_pool(plan.tokenize_actors),
                            num_cpus=plan.tokenize_cpus, **plan.cpu_resources, **stage_retries(cfg))
    ds = ds.map_batches(StageActor, fn_constructor_args=(clip_stage, cfg, "clip"), batch_format="numpy",
                        batch_size=cfg.clip.batch_size, compute=actor_pool(plan.clip_actors),
                        **plan.clip_resources, **stage_retries(cfg))
    # one part per ``part_rows`` rows of a shard (the scored rows carry no pixels: small batches)
    ds = ds.map_batches(ShardPartWriter(cfg, layout.url), batch_format="numpy", batch_size=part_rows(cfg),
                        compute=task_pool(plan.write_tasks), num_cpus=plan.write_cpus, **plan.cpu_resources,
                        **retries(cfg, actors=False))
    try:
        with StallWatch(lambda: progress.rows, cfg.run.stall_warning_s, "phase 3/4 fetch+score",
                        describe=cluster_room):
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                tracker.add(batch)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("Ray Data execution stats:\n%s", ds.stats())
    finally:
        tracker.close()  # every marker written, every compaction done
        progress.close()
        clear_deaths()
    log.info("fetch and score: %d work shards committed, %d of them compacted into one part",
             tracker.committed, tracker.compacted)
    for sid in tracker.pending:
        log.error("work shard %s ended with %d of %d rows written", sid, tracker.rows[sid], pending[sid])
    return sorted(tracker.pending), kept


__all__ = ["AUTO_PART_ROWS", "AUTO_PART_ROWS_WITH_IMAGES", "FATE_COLUMNS", "STAGES", "ShardPartWriter",
           "fate_table", "part_rows", "ray_compactor", "read_work_shard", "run_score_phase", "stage_counters",
           "stream_items"]
