"""How phase 3 commits a work shard, and what a rerun keeps of an interrupted one.

A writer task puts the rows of one batch of one shard under ``scored/<shard_id>/``
as one *part*: ``<subset>-<token>.parquet`` for the kept rows of each subset,
``images-<token>.tar`` when images are saved, and last ``fates-<token>.parquet``
with every row of the part (its index in the work shard in ``shard_row``) and,
in its schema metadata, the part's stage counters and nodes. A part exists once
its fates file does. A writer's batch is ``output.part_rows`` rows
(:func:`~.score.part_rows`: 0 = a work shard, at most 20,000); a shard whose rows
reach the writer together is written in at most ceil(rows / part_rows) + 1 parts
per subset, and in about one part per download block when the download stage's
blocks of several shards interleave (``scripts/bench_parts.py``: 11.75 parts per
shard of 1,000 rows in blocks of 100, where the bound is 3; see docs/pipeline.md).

The driver commits a shard once the rows of its parts equal the rows of the shard.
When its parts are one file per kind, the driver writes the marker
(``scored/_done/<shard_id>.json``, the commit) in a background thread. Otherwise it
hands the shard to a compactor (the runner's: a Ray task running :func:`compact_shard`;
the driver only holds its future, at most one writer-task pool of them at once):
the task writes one file per kind under a new token (fates last, its metadata
marking it a compaction of the parts it joins), then the marker listing only the
new files, then deletes the old ones. A committed shard is therefore one part per
subset, whatever the interleaving (the bench: 1.0 files per shard and kind, from
11.75 parts). A compaction reads and writes the shard's output once more (its
images too, when saved); the driver's work per shard stays one submission.

A rerun keeps the parts of uncommitted shards, deletes any file of an unfinished
part and any compaction whose marker was never written (the parts it joins are
all still there: they are deleted only after the marker), and fetches and scores
only the rows no part holds: a killed run loses the rows between download and
write, not whole shards. A run killed between a compaction's marker and the end
of its deletions leaves the old files of a committed shard behind: no reader sees
them, since every reader lists a shard's files from its marker
(:meth:`~..output.layout.OutputLayout.scored_markers`, ``fate_files``).
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
import tempfile
import threading
import uuid
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..stages import shards
from ..stats import sum_counters
from ..output.layout import SCORED, OutputLayout
from .progress import Progress

log = logging.getLogger(__name__)

SHARD_ID = "shard_id"
#: column of the fates files (and of the stream): a row's index in its work shard
SHARD_ROW = "shard_row"
#: schema-metadata key of a fates file: ``{"counters": {...}, "nodes": {...}}`` of its part
PART_META = b"laionbuild.part"
FATES = "fates"
#: key of :data:`PART_META` in a fates file written by :func:`compact_shard`: the tokens of the
#: parts it joins (a rerun drops such a part of an uncommitted shard: the parts it joins are all
#: there); in the marker of a compacted shard: the number of files joined
COMPACTED = "compacted_from"
#: threads writing markers, so that a commit never holds up the stream
MARKER_WRITERS = 4
MARKERS_IN_FLIGHT = 64
#: compactions submitted and not finished (the runner passes its write-task pool size)
COMPACTIONS_IN_FLIGHT = 4
#: a compacted images tar is spooled in memory up to this size, then on local disk
SPOOL_BYTES = 64 * 1024 * 1024


def part_name(kind: str, token: str) -> str:
    """File name of one piece of a part: ``fates-<token>.parquet``, ``en-<token>.parquet``, ``images-<token>.tar``."""
    return f"{kind}-{token}.tar" if kind == "images" else f"{kind}-{token}.parquet"


def _token(name: str) -> tuple[str, str] | None:
    """``(kind, token)`` of a part file name; None for anything else (temporary files included)."""
    if ".tmp-" in name:
        return None
    stem, dot, _ = name.partition(".")
    kind, dash, token = stem.rpartition("-")
    return (kind, token) if dot and dash and kind and token else None


def part_kind(path: str) -> str | None:
    """``fates``, ``en``, ``images``, ... of a part file's path (None for any other file)."""
    kt = _token(posixpath.basename(path.rstrip("/")))
    return kt[0] if kt else None


def needs_compaction(parts: Iterable[str]) -> bool:
    """True when the parts of a shard hold more than one file of some kind."""
    return any(n > 1 for n in Counter(part_kind(p) for p in parts).values())


def with_part_meta(fates: pa.Table, counters: dict, nodes: dict, compacted: list[str] | None = None) -> pa.Table:
    meta = dict(fates.schema.metadata or {})
    value = {"counters": counters, "nodes": nodes}
    if compacted is not None:
        value[COMPACTED] = compacted
    meta[PART_META] = json.dumps(value).encode("utf-8")
    return fates.replace_schema_metadata(meta)


def _join_tars(layout: OutputLayout, paths: list[str], target: str) -> int:
    """The members of every tar of ``paths``, in order, in one tar at ``target``; returns the rows
    (a row is ``<key>.jpg|png``, ``<key>.txt`` and ``<key>.json``). Streamed: one member in memory."""
    rows = 0
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
        with tarfile.open(fileobj=spool, mode="w") as out:
            for path in paths:
                with layout.fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
                    for member in tar:
                        out.addfile(member, tar.extractfile(member) if member.isfile() else None)
                        rows += member.name.endswith(".json")
        shards.write_file_atomic(layout.fs, target, spool)
    return rows


def compact_shard(output: str, marker: dict, compression: str = "zstd") -> dict:
    """Commit a complete work shard whose parts hold several files of a kind as one part.

    ``marker``: the marker the driver would write (``parts``: every file of the shard's parts).
    Writes one file per kind under a new token (the subset tables and the fates table
    concatenated, the images tars joined member by member) with the fates file last, its
    :data:`PART_META` holding the summed counters, the union of the nodes and, under
    :data:`COMPACTED`, the tokens of the parts it joins; then the marker, which lists only the
    new files (the commit); then deletes the old files. Killed before the marker, the shard is
    uncommitted and a rerun drops the compacted part (:func:`recover_parts`); killed after it,
    the old files are left over but no reader sees them (readers go through the markers). A
    retried task joins the files again while they are all there, else finds the marker written.
    Returns the marker. No Ray here: the runner runs it as a task."""
    layout = OutputLayout(output)
    sid = marker[SHARD_ID]
    try:
        return _compact(layout, sid, marker, compression)
    except FileNotFoundError:
        try:  # a retried task whose first try committed, then died deleting the old files
            return shards.read_json(layout.fs, layout.scored_marker(sid))
        except FileNotFoundError:
            pass
        raise


def _compact(layout: OutputLayout, sid: str, marker: dict, compression: str) -> dict:
    folder = layout.scored_dir(sid)
    token = uuid.uuid4().hex[:12]
    by_kind: dict[str, list[str]] = defaultdict(list)
    for p in sorted(marker["parts"]):
        by_kind[part_kind(p)].append(layout.path(SCORED, sid, posixpath.basename(p)))
    written: dict[str, int] = {}
    for kind in sorted(by_kind, key=lambda k: (k == FATES, k)):  # the fates file last
        paths = by_kind[kind]
        target = posixpath.join(folder, part_name(kind, token))
        if kind == "images":
            written[target] = _join_tars(layout, paths, target)
            continue
        # start=0: one GET per file on object stores (without it s3fs asks for the size first)
        tables = [pq.read_table(pa.BufferReader(layout.fs.cat_file(p, start=0))) for p in paths]
        table = pa.concat_tables(tables, promote_options="default")
        if kind == FATES:
            metas = [json.loads((t.schema.metadata or {})[PART_META]) for t in tables]
            nodes: dict[str, set] = defaultdict(set)
            for m in metas:
                for stage, ids in m["nodes"].items():
                    nodes[stage].update(ids)
            counters = {k: c.to_dict() for k, c in sum_counters(m["counters"] for m in metas).items()}
            tokens = sorted(_token(posixpath.basename(p))[1] for p in paths)
            table = with_part_meta(table, counters, {k: sorted(v) for k, v in nodes.items()}, tokens)
        shards.write_bytes_atomic(layout.fs, target, shards.table_to_bytes(table, compression))
        written[target] = table.num_rows
    new = {**marker, "parts": sorted(written), "part_rows": dict(sorted(written.items())),
           COMPACTED: sum(len(v) for v in by_kind.values())}
    shards.write_json_atomic(layout.fs, layout.scored_marker(sid), new)  # the commit
    _delete_files(layout, [p for paths in by_kind.values() for p in paths])
    return new


def _delete_files(layout: OutputLayout, paths: list[str]) -> None:
    """Files, not folders: no listing per path (object stores delete them in one bulk request)."""
    layout.fs.rm(paths)


@dataclass
class Recovered:
    """The parts of an uncommitted shard that a rerun keeps."""

    rows: np.ndarray  # sorted indices (in the work shard) of the rows they hold
    parts: list[str] = field(default_factory=list)
    counters: list[dict] = field(default_factory=list)
    nodes: dict[str, set] = field(default_factory=lambda: defaultdict(set))


def _read_fates(layout: OutputLayout, path: str) -> tuple[np.ndarray, dict] | None:
    try:
        with layout.fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            meta = (pf.schema_arrow.metadata or {}).get(PART_META)
            if meta is None or SHARD_ROW not in pf.schema_arrow.names:
                return None
            rows = pf.read(columns=[SHARD_ROW]).column(0).to_numpy()
        return np.asarray(rows, dtype=np.int64), json.loads(meta)
    except Exception as exc:  # noqa: BLE001 - an unreadable part is redone, not fatal
        log.warning("part %s of an interrupted run cannot be read (%s); its rows are redone", path, exc)
        return None


def recover_parts(layout: OutputLayout, pending: dict[str, int], threads: int = 16) -> dict[str, Recovered]:
    """Keep the finished parts of uncommitted shards; delete every other file in their folders.

    A shard whose parts do not add up (a row twice, a row past the shard's end, an
    unreadable or older-format part) is cleared and redone whole.
    """
    present = {posixpath.basename(p.rstrip("/")): p for p in layout.ls(layout.path(SCORED))}
    stale: list[str] = []
    found: dict[str, dict[str, list[str]]] = {}
    for sid in pending:
        if sid not in present:
            continue
        parts: dict[str, list[str]] = defaultdict(list)
        for path in layout.ls(present[sid]):
            kt = _token(posixpath.basename(path.rstrip("/")))
            if kt is None:
                stale.append(path)
            else:
                parts[kt[1]].append(path)
        found[sid] = parts
    fates = {(sid, tok): p for sid, parts in found.items() for tok, paths in parts.items() for p in paths
             if _token(posixpath.basename(p)) == (FATES, tok)}
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(fates) or 1))) as pool:
        read = dict(zip(fates, pool.map(lambda p: _read_fates(layout, p), fates.values())))
    out: dict[str, Recovered] = {}
    for sid, parts in found.items():
        rec = Recovered(np.zeros(0, np.int64))
        chunks = []
        ok = True
        for tok, paths in sorted(parts.items()):
            got = read.get((sid, tok))
            if (sid, tok) not in fates:  # an unfinished part: its fates file was never written
                stale += paths
                continue
            if got is None:
                ok = False
                break
            rows, meta = got
            if COMPACTED in meta:  # killed before its marker: the parts it joins are all still there
                log.info("work shard %s: dropping a compaction that was not committed", sid)
                stale += paths
                continue
            chunks.append(rows)
            rec.parts += sorted(paths)
            rec.counters.append(meta["counters"])
            for stage, ids in meta["nodes"].items():
                rec.nodes[stage].update(ids)
        if ok and chunks:
            rows = np.sort(np.concatenate(chunks))
            ok = len(rows) == len(np.unique(rows)) and (len(rows) == 0 or (rows[0] >= 0 and rows[-1] < pending[sid]))
            rec.rows = rows
        if not ok:
            log.warning("work shard %s: the parts of an interrupted run do not add up; redoing it whole", sid)
            stale.append(present[sid])
            continue
        if len(rec.rows):
            out[sid] = rec
    layout.rm_many(stale)
    if out:
        log.info("kept %d rows of %d interrupted work shards (written before the interruption)",
                 sum(len(r.rows) for r in out.values()), len(out))
    return out


#: ``compactor(shard_id, marker)``: starts :func:`compact_shard` for a complete shard somewhere
#: (the runner: a Ray task) and returns its future
Compactor = Callable[[str, dict], Future]


class ShardTracker:
    """Commits a work shard once all its rows are written (parts first, marker last).

    The driver holds state only for the shards in flight: a committed shard's counters, parts
    and nodes go into its marker and are freed; markers are written by a small thread pool, so
    that the stream of results never waits on the object store (:meth:`close` waits for them).
    With a ``compactor``, a shard whose parts hold several files of a kind is handed to it
    instead (it writes one file per kind, then the marker: :func:`compact_shard`); at most
    ``compactions`` run at once, past that the stream waits. Without one, every shard is
    committed as its parts were written.
    """

    def __init__(self, layout: OutputLayout, pending: dict[str, int], progress: Progress,
                 recovered: dict[str, Recovered] | None = None, writers: int = MARKER_WRITERS,
                 compactor: Compactor | None = None, compactions: int = COMPACTIONS_IN_FLIGHT):
        self.layout = layout
        self.pending = dict(pending)
        self.rows: Counter = Counter()
        self.parts: dict[str, dict[str, int | None]] = defaultdict(dict)
        self.counters: dict[str, list[dict]] = defaultdict(list)
        self.nodes: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
        self.progress = progress
        self.committed = 0
        #: shards handed to the compactor
        self.compacted = 0
        self._pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="marker")
        #: markers submitted and not written yet, bounded: past it the stream waits (backpressure)
        self._in_flight = threading.BoundedSemaphore(MARKERS_IN_FLIGHT)
        self._compactor = compactor
        self._compacting = threading.BoundedSemaphore(max(1, compactions))
        self._futures: set[Future] = set()
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []
        for sid, rec in (recovered or {}).items():
            self.rows[sid] = len(rec.rows)
            self.parts[sid] = {p: None for p in rec.parts}
            self.counters[sid] = list(rec.counters)
            for stage, ids in rec.nodes.items():
                self.nodes[sid][stage].update(ids)
            if self.rows[sid] == self.pending.get(sid):
                self.commit(sid)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for sid, n, parts, counters, node in zip(batch[SHARD_ID], batch["n_rows"], batch["parts"],
                                                 batch["counters"], batch["node"]):
            self.rows[sid] += int(n)
            written = json.loads(parts)
            self.parts[sid].update(written if isinstance(written, dict) else {p: None for p in written})
            self.counters[sid].append(json.loads(counters))
            for stage, ids in json.loads(node).items():
                self.nodes[sid][stage].update(ids)
            self.progress.update(rows=int(n))
            if sid in self.pending and self.rows[sid] == self.pending[sid]:
                self.commit(sid)

    def commit(self, sid: str) -> None:
        counters = sum_counters(self.counters.pop(sid))
        parts = self.parts.pop(sid)
        marker = {SHARD_ID: sid, "rows": self.pending.pop(sid), "parts": sorted(parts),
                  #: rows of each subset table, so that publish needs no footer
                  "part_rows": {p: n for p, n in sorted(parts.items()) if n is not None},
                  "nodes": {stage: sorted(n for n in ids if n) for stage, ids in self.nodes.pop(sid, {}).items()},
                  "counters": {k: c.to_dict() for k, c in counters.items()}}
        self.rows.pop(sid, None)
        if self._errors:
            raise self._errors[0]
        if self._compactor is not None and needs_compaction(parts):
            self._compacting.acquire()
            try:
                future = self._compactor(sid, marker)
            except BaseException:
                self._compacting.release()
                raise
            with self._lock:
                self._futures.add(future)
            future.add_done_callback(self._compaction_done)
            self.compacted += 1
        else:
            self._in_flight.acquire()
            self._pool.submit(self._write_marker, sid, marker)
        self.committed += 1
        self.progress.update(units=1)

    def _write_marker(self, sid: str, marker: dict) -> None:
        try:
            shards.write_json_atomic(self.layout.fs, self.layout.scored_marker(sid), marker)
        except BaseException as exc:  # noqa: BLE001 - raised in the driver by the next commit or close()
            self._errors.append(exc)
        finally:
            self._in_flight.release()

    def _compaction_done(self, future: Future) -> None:
        try:
            exc = future.exception()
            if exc is not None:
                self._errors.append(exc)  # raised in the driver by the next commit or close()
        except BaseException as err:  # noqa: BLE001 - a cancelled future
            self._errors.append(err)
        finally:
            with self._lock:
                self._futures.discard(future)
            self._compacting.release()

    def close(self) -> None:
        """Wait for every marker write and compaction; the first error is raised here."""
        self._pool.shutdown(wait=True)
        with self._lock:
            futures = list(self._futures)
        wait(futures)
        for future in futures:  # a future's callback may still be running once wait() returns
            exc = None if future.cancelled() else future.exception()
            if exc is not None and exc not in self._errors:
                self._errors.append(exc)
        if self._errors:
            raise self._errors[0]


__all__ = ["COMPACTED", "Compactor", "FATES", "PART_META", "SHARD_ID", "SHARD_ROW", "Recovered", "ShardTracker",
           "compact_shard", "needs_compaction", "part_kind", "part_name", "recover_parts", "with_part_meta"]
