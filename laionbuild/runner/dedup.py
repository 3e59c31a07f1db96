"""Phase 2, de-dup: one global de-duplication of all new candidates, before anything is downloaded.

The key is ``run.dedup_key``: ``url`` (LAION-5B: one row per image URL) or
``url_text`` (one row per (URL, TEXT) pair). Among the new rows of one key the
row with the smallest ``(warc_path, warc_offset, TEXT)`` wins, whatever the order
in which inputs were read; a key already present in an earlier generation of the
same output folder wins over every new row, so adding a crawl snapshot to a
finished output fetches only pairs it does not hold yet. (Within one page, extraction has
already kept the first link of a key: see docs/pipeline.md.)

Only keys move (:mod:`.dedupkeys`: 20 bytes per candidate, written by phase 1). The phase has
two kinds of unit, each committed by its own marker, so a rerun redoes only the missing ones:

* a *hash range* (``ray.dedup_ranges`` of them): reads its slice of every new input's key file,
  keeps one row per key, drops keys that the range's index of earlier generations holds, and
  writes the winners' locators and the updated index; marker ``dedup/gNNNN/_done/rRRRRRR.json``;
* a *group* of consecutive inputs (about ``ray.dedup_group_candidates`` candidates): reads its
  winners from every range, takes those rows from its inputs' candidate tables and writes them as
  work shards of equal size, at most ``run.work_shard_rows`` rows; marker
  ``workshards/_groups/gNNNN-sGGGGG.json``.

The generation's manifest (inputs, counts; no list of shards), written last, commits it. Small
runs (up to ``ray.local_max_rows`` candidates) run the same units in the driver.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import schema as S
from ..config import Config
from ..errors import SetupError
from ..stages import shards
from ..stats import StageCounters
from . import dedupkeys as K
from .adapter import node_id
from ..output.layout import CANDIDATES, WORKSHARDS, OutputLayout
from .progress import Progress

log = logging.getLogger(__name__)

STAGE = "dedup"
DUPLICATE = "duplicate"
ALREADY_IN_OUTPUT = "already_in_output"
#: a group of inputs holds about this many work shards' worth of candidates by default
DEFAULT_GROUP_SHARDS = 100


def key_columns(key: str) -> tuple[str, ...]:
    return ("URL",) if key == "url" else ("URL", "TEXT")


def _key_strings(table: pa.Table, key: str) -> pa.Array:
    if key == "url":
        return table.column("URL").combine_chunks()
    url = pc.replace_substring(table.column("URL"), "\x00", K.URL_NUL)  # as key_hashes: one key per pair
    return pc.binary_join_element_wise(url, table.column("TEXT"), "\x00").combine_chunks()


def dedup_rows(new: pa.Table, prev: pa.Table | None, key: str, enabled: bool = True) -> tuple[pa.Table, StageCounters]:
    """Unique rows of ``new`` (one per key, order-independent tie-break), minus keys in ``prev``.

    The rule of the phase on whole rows, in one process (the reference the units reproduce)."""
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


# --------------------------------------------------------------------------- the plan
def _group_starts(candidates: list[int], target: int) -> list[int]:
    """First input of each group of consecutive inputs holding about ``target`` candidates, then
    the number of inputs."""
    starts, acc = [0], 0
    for i, n in enumerate(candidates):
        if acc and acc + n > target:
            starts.append(i)
            acc = 0
        acc += n
    return starts + [len(candidates)]


def make_plan(cfg: Config, layout: OutputLayout, generation: int, new: dict[str, dict],
              prev: dict | None) -> dict:
    """What every unit of a generation needs: its inputs in tie-break order, ranges and groups."""
    order = sorted(new, key=lambda f: (new[f]["keys"]["first_warc_path"], f))
    shard_rows = cfg.run.work_shard_rows
    target = cfg.ray.dedup_group_candidates or DEFAULT_GROUP_SHARDS * shard_rows
    return {
        "output": layout.url, "generation": generation, "key": cfg.run.dedup_key,
        "enabled": cfg.run.global_dedup, "ranges": cfg.ray.dedup_ranges,
        "prev_generation": prev["generation"] if prev else -1, "prev_ranges": prev["ranges"] if prev else 0,
        "shard_rows": shard_rows, "compression": cfg.output.compression, "row_group_rows": cfg.ray.stream_rows,
        "read_threads": cfg.ray.dedup_read_threads,
        "group_starts": _group_starts([new[f]["keys"]["rows"] for f in order], target),
        "inputs": [{"fid": f, "token": new[f]["token"], "rows": new[f]["keys"]["rows"],
                    "bits": new[f]["keys"]["bits"]} for f in order],
    }


#: plan entries that change how units run, not what they write
_EXECUTION_ONLY = ("read_threads",)


def _same_plan(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in b if k not in _EXECUTION_ONLY)


def _ensure_keys(cfg: Config, layout: OutputLayout, fid: str, marker: dict, have: set[str]) -> dict:
    """An input committed without key file (or with another key): its keys, written now.
    ``have``: the inputs whose key file exists (one listing of the folder)."""
    info = marker.get("keys")
    if info and info.get("key") == cfg.run.dedup_key and fid in have:
        return marker
    with layout.fs.open(layout.candidates_file(fid), "rb") as fh:
        table = pq.read_table(fh)
    data, info = K.encode_keys(table, cfg.run.dedup_key)
    shards.write_bytes_atomic(layout.fs, layout.candidates_keys(fid), data)
    return {**marker, "keys": info}


# --------------------------------------------------------------------------- the units
def _read_many(read: Callable[[Any], Any], items: list, threads: int) -> list:
    """``read`` of every item, in order; concurrent reads (object stores answer each in tens of ms)."""
    if threads <= 1 or len(items) <= 1:
        return [read(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        return list(pool.map(read, items))


def dedup_range(plan: dict, r: int) -> dict:
    """One hash range: winners among the new keys, minus keys held before; commits its marker."""
    started = time.monotonic()
    layout = OutputLayout(plan["output"])
    fs = layout.fs
    generation = plan["generation"]
    lo, hi = K.range_bounds(r, plan["ranges"])
    parts, which, moved = [], [], 0
    sources = [(i, s) for i, s in enumerate(plan["inputs"]) if s["rows"]]
    def read(item: tuple[int, dict]) -> tuple[np.ndarray, int]:
        return K.read_key_slice(fs, layout.candidates_keys(item[1]["fid"]), item[1]["bits"], lo, hi)

    slices = _read_many(read, sources, plan["read_threads"])
    for (i, _), (rec, nbytes) in zip(sources, slices):
        moved += nbytes
        if len(rec):
            parts.append(rec)
            which.append(np.full(len(rec), i, dtype=np.uint32))
    rec = np.concatenate(parts) if parts else np.zeros(0, dtype=K.KEY_RECORD)
    inp = np.concatenate(which) if which else np.zeros(0, dtype=np.uint32)
    n = len(rec)
    counters = StageCounters()
    h1, h2, row = rec["h1"], rec["h2"], rec["row"]
    if n:
        order = np.lexsort((rec["rank"], inp, h2, h1))  # per key: smallest (warc_path, offset, TEXT) first
        h1, h2, row, inp = h1[order], h2[order], row[order], inp[order]
        if plan["enabled"]:
            first = np.ones(n, dtype=bool)
            first[1:] = (h1[1:] != h1[:-1]) | (h2[1:] != h2[:-1])
            h1, h2, row, inp = h1[first], h2[first], row[first], inp[first]
            counters.drop(DUPLICATE, n - len(h1))
    prev = _previous_index(layout, plan, lo, hi)
    seen = K.held(prev, h1, h2)
    if seen.any():
        counters.drop(ALREADY_IN_OUTPUT, int(seen.sum()))
        h1, h2, row, inp = h1[~seen], h2[~seen], row[~seen], inp[~seen]
    counters.kept = len(h1)
    loc = np.empty(len(h1), dtype=K.LOCATOR)
    loc["input"], loc["row"] = inp, row
    loc = loc[np.lexsort((loc["row"], loc["input"]))]
    winners = K.encode_winners(loc, np.asarray(plan["group_starts"], dtype=np.int64))
    index = K.merge_index(prev, h1, h2).tobytes()
    shards.write_bytes_atomic(fs, layout.dedup_winners(generation, r), winners)
    shards.write_bytes_atomic(fs, layout.dedup_index(generation, r), index)
    marker = {"range": r, "candidates": n, "counters": counters.to_dict(), "node": node_id(),
              "bytes_read": moved, "bytes_written": len(winners) + len(index),
              "seconds": round(time.monotonic() - started, 3)}
    shards.write_json_atomic(fs, layout.dedup_range_marker(generation, r), marker)  # the commit
    return marker


def _previous_index(layout: OutputLayout, plan: dict, lo: int, hi: int) -> np.ndarray:
    """The keys the output held before this generation in ``[lo, hi)`` (from the last one's index,
    whatever its number of ranges)."""
    prev_gen, prev_ranges = plan["prev_generation"], plan["prev_ranges"]
    if prev_gen < 0:
        return np.zeros(0, dtype=K.INDEX_RECORD)
    first = lo * prev_ranges // K.HASH_SPACE
    last = (hi - 1) * prev_ranges // K.HASH_SPACE
    parts = []
    for q in range(first, last + 1):
        idx = K.read_index(layout.fs, layout.dedup_index(prev_gen, q))
        parts.append(idx[K.in_bounds(idx["h1"], lo, hi)])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=K.INDEX_RECORD)


def shard_id(generation: int, group: int, chunk: int) -> str:
    return f"g{generation:04d}-s{group:05d}-{chunk:03d}"


def shard_sizes(rows: int, shard_rows: int) -> list[int]:
    """Rows of each work shard of a group: as few shards as ``shard_rows`` allows, of equal size."""
    if rows <= 0:
        return []
    n = math.ceil(rows / shard_rows)
    base, extra = divmod(rows, n)
    return [base + 1 if k < extra else base for k in range(n)]


def assemble_group(plan: dict, group: int) -> dict:
    """One group of inputs: its winners from every range -> rows -> work shards; commits its marker."""
    started = time.monotonic()
    layout = OutputLayout(plan["output"])
    fs = layout.fs
    generation = plan["generation"]
    n_groups = len(plan["group_starts"]) - 1
    parts, moved = [], 0
    slices = _read_many(lambda r: K.read_winners_group(fs, layout.dedup_winners(generation, r), n_groups, group),
                        list(range(plan["ranges"])), plan["read_threads"])
    for loc, nbytes in slices:
        moved += nbytes
        if len(loc):
            parts.append(loc)
    loc = np.concatenate(parts) if parts else np.zeros(0, dtype=K.LOCATOR)
    loc = loc[np.lexsort((loc["row"], loc["input"]))]
    sizes = shard_sizes(len(loc), plan["shard_rows"])
    written: list[dict[str, Any]] = []
    pending: list[pa.Table] = []
    buffered = 0

    def flush(size: int) -> None:
        nonlocal pending, buffered
        table = pa.concat_tables(pending, promote_options="default").combine_chunks()
        part, rest = table.slice(0, size), table.slice(size)
        part = part.sort_by([("hash", "ascending"), ("URL", "ascending"), ("TEXT", "ascending")])
        sid = shard_id(generation, group, len(written))
        shards.write_bytes_atomic(fs, layout.workshard_file(sid),
                                  shards.table_to_bytes(part, plan["compression"], plan["row_group_rows"]))
        written.append({"id": sid, "rows": part.num_rows})
        pending, buffered = ([rest] if rest.num_rows else []), rest.num_rows

    if len(loc):
        bounds = np.flatnonzero(np.diff(loc["input"].astype(np.int64))) + 1
        for chunk in np.split(loc, bounds):
            inp = plan["inputs"][int(chunk["input"][0])]
            with fs.open(layout.candidates_file(inp["fid"]), "rb") as fh:
                table = pq.read_table(fh)
            pending.append(table.take(pa.array(chunk["row"].astype(np.int64))))
            buffered += len(chunk)
            while len(written) < len(sizes) and buffered >= sizes[len(written)]:
                flush(sizes[len(written)])
    marker = {"generation": generation, "group": group, "rows": int(len(loc)), "shards": written,
              "node": node_id(), "bytes_read": moved, "seconds": round(time.monotonic() - started, 3)}
    shards.write_json_atomic(fs, layout.group_marker(generation, group), marker)  # the commit
    return marker


# --------------------------------------------------------------------------- the driver
def clean_uncommitted(layout: OutputLayout, groups: dict[str, dict]) -> None:
    """Work shards that no group marker lists are leftovers of an interrupted de-dup phase."""
    listed = {s["id"] for m in groups.values() for s in m["shards"]}
    stale = [p for stem, p in layout.names(layout.path(WORKSHARDS), ".parquet").items() if stem not in listed]
    layout.rm_many(stale)


def _run_units(cfg: Config, engine: str, fn: Callable[[dict, int], dict], plan: dict, units: list[int],
               desc: str, unit: str) -> list[dict]:
    """``fn(plan, u)`` for every unit, in the driver or as one Ray task each (spread over the nodes)."""
    progress = Progress(len(units), cfg.run.progress, desc, unit)
    out = []
    try:
        if engine == "driver":
            for u in units:
                out.append(fn(plan, u))
                progress.update(1)
            return out
        import ray

        task = ray.remote(fn).options(num_cpus=cfg.ray.dedup_num_cpus, scheduling_strategy="SPREAD")
        plan_ref = ray.put(plan)
        waiting = [task.remote(plan_ref, u) for u in units]
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            out += ray.get(ready)
            progress.update(len(ready))
        return out
    finally:
        progress.close()


def _start_generation(cfg: Config, layout: OutputLayout, generation: int, new: dict[str, dict],
                      prev: dict | None, groups: dict[str, dict]) -> dict:
    """The generation's plan: the one an interrupted run wrote if it still holds, else a new one
    (and the units of the old one are discarded)."""
    plan = make_plan(cfg, layout, generation, new, prev)
    path = layout.dedup_plan(generation)
    if layout.exists(path):
        old = shards.read_json(layout.fs, path)
        if _same_plan(old, plan):
            return {**old, **{k: plan[k] for k in _EXECUTION_ONLY}}
        log.info("de-dup generation %d: inputs or settings changed since it was started; starting it again",
                 generation)
    prefix = f"g{generation:04d}-"
    layout.rm(layout.dedup_dir(generation))
    layout.rm_many([layout.group_marker(generation, int(name[len(prefix) + 1:]))
                    for name in groups if name.startswith(prefix)])
    shards.write_json_atomic(layout.fs, path, plan)
    return plan


def begin_generation(cfg: Config, layout: OutputLayout, committed: dict[str, dict]) -> dict | None:
    """The plan of the generation that de-duplicates the committed inputs no earlier generation
    holds (the one an interrupted run started, if it still holds); ``None`` when there are none."""
    manifests = layout.manifests()
    consumed = {(fid, tok) for m in manifests for fid, tok in m["inputs"].items()}
    new = {fid: m for fid, m in committed.items() if (fid, m["token"]) not in consumed}
    groups = layout.group_markers()
    if not new:
        clean_uncommitted(layout, groups)
        return None
    if manifests and "ranges" not in manifests[-1]:
        raise SetupError(f"{layout.url}: its de-dup generations were made by an older laionbuild "
                         "(no per-range index); write new inputs to a new output folder")
    generation = max((m["generation"] for m in manifests), default=-1) + 1
    have = set(layout.names(layout.path(CANDIDATES), ".keys"))  # one listing, not a request per input
    new = {fid: _ensure_keys(cfg, layout, fid, m, have) for fid, m in new.items()}
    return _start_generation(cfg, layout, generation, new, manifests[-1] if manifests else None, groups)


def engine_for(cfg: Config, plan: dict) -> str:
    return "driver" if sum(inp["rows"] for inp in plan["inputs"]) <= cfg.ray.local_max_rows else "ray"


def run_ranges(cfg: Config, layout: OutputLayout, plan: dict, engine: str) -> dict[int, dict]:
    """Every hash range of the generation committed; ``{range: marker}`` (one listing first)."""
    generation = plan["generation"]
    ranges = layout.dedup_range_markers(generation)
    todo = [r for r in range(plan["ranges"]) if r not in ranges]
    if todo and len(todo) < plan["ranges"]:
        log.info("de-dup generation %d: %d of %d hash ranges already committed", generation,
                 plan["ranges"] - len(todo), plan["ranges"])
    for m in _run_units(cfg, engine, dedup_range, plan, todo, "phase 2/4 de-dup ranges", "range"):
        ranges[m["range"]] = m
    return ranges


def run_groups(cfg: Config, layout: OutputLayout, plan: dict, engine: str) -> dict[int, dict]:
    """Every group of inputs of the generation committed as work shards; ``{group: marker}``."""
    groups = layout.group_markers()
    clean_uncommitted(layout, groups)
    prefix = f"g{plan['generation']:04d}-"
    mine = {m["group"]: m for name, m in groups.items() if name.startswith(prefix)}
    todo = [g for g in range(len(plan["group_starts"]) - 1) if g not in mine]
    for m in _run_units(cfg, engine, assemble_group, plan, todo, "phase 2/4 work shards", "group"):
        mine[m["group"]] = m
    return mine


def run_dedup_phase(cfg: Config, layout: OutputLayout, committed: dict[str, dict]) -> dict | None:
    """De-duplicate the committed inputs that no earlier generation holds; returns the new manifest."""
    started = time.monotonic()
    plan = begin_generation(cfg, layout, committed)
    if plan is None:
        return None
    generation = plan["generation"]
    engine = engine_for(cfg, plan)
    ranges = run_ranges(cfg, layout, plan, engine)
    mine = run_groups(cfg, layout, plan, engine)
    counters = StageCounters()
    for m in ranges.values():
        counters.merge(m["counters"])
    units = [*ranges.values(), *mine.values()]
    total = sum(inp["rows"] for inp in plan["inputs"])
    manifest = {
        "generation": generation, "key": plan["key"], "engine": engine,
        "inputs": {inp["fid"]: inp["token"] for inp in plan["inputs"]},
        "candidates": total, "unique": counters.kept,
        "ranges": plan["ranges"], "groups": len(mine),
        "n_shards": sum(len(m["shards"]) for m in mine.values()),
        "counters": {STAGE: counters.to_dict()},
        "nodes": sorted({m["node"] for m in units if m["node"]}),
        "bytes_read": sum(m["bytes_read"] for m in units),
        "bytes_written": sum(m.get("bytes_written", 0) for m in ranges.values()),
        "seconds": round(time.monotonic() - started, 2),
    }
    shards.write_json_atomic(layout.fs, layout.manifest(generation), manifest)  # the commit
    log.info("de-dup generation %d: %d candidates -> %d unique (key %s) in %d work shards, %d ranges",
             generation, total, counters.kept, plan["key"], manifest["n_shards"], plan["ranges"])
    return manifest


def committed_shards(layout: OutputLayout, manifests: list[dict]) -> dict[str, int]:
    """``{shard_id: rows}`` of the work shards of every committed generation."""
    return layout.committed_shards(manifests)


def pending_shards(layout: OutputLayout, shards_rows: dict[str, int]) -> dict[str, int]:
    """``{shard_id: rows}`` of the work shards not scored yet."""
    done = set(layout.names(layout.path("scored", "_done"), ".json"))
    return {sid: rows for sid, rows in shards_rows.items() if sid not in done}


__all__ = ["assemble_group", "begin_generation", "committed_shards", "dedup_range", "dedup_rows", "key_columns",
           "make_plan", "pending_shards", "run_dedup_phase", "run_groups", "run_ranges", "shard_sizes"]
