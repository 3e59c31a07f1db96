"""``laionbuild remove``: take rows out of a published output folder, for good.

``remove(OUTPUT, url_files=[...], hash_files=[...])``

1. copies each list into ``OUTPUT/removals/<NNNN>-<urls|hashes>-<file name>``
   (first, so the intent survives a crash half-way);
2. rewrites every published parquet file holding a listed row --
   ``OUTPUT/{en,multi,nolang}/``, their ``*_embeddings`` companions (matched by
   ``key``) and any other ``<subset>_*`` view -- without those rows, each file
   written whole under a temporary name and renamed into place; every other
   row keeps its values and its order, the schema and the compression stay.
   Files are first scanned through the columns a list matches on, many at once,
   and only those holding a listed row are read whole;
3. drops the listed rows' images from ``OUTPUT/images/*.tar`` when present;
4. adds the counts to ``stats.json`` (a ``removed`` section; ``kept_per_subset``
   and ``kept_total`` go down) and records the list (file name, sha256, entries,
   rows removed, time) under ``removals`` in ``provenance.json``.

The publish phase applies every list found in ``OUTPUT/removals/``
(:meth:`~laionbuild.output.layout.OutputLayout.removal_lists`), so a later ``laionbuild run`` into the same folder
publishes the same rows minus the removed ones.

URL lists and hash lists have the format of :mod:`laionbuild.stages.blocklist`
(a hash list may mix LAION ``hash`` values and md5 / sha1 / sha256 URL digests).
"""

from __future__ import annotations

import io
import logging
import posixpath
import re
import tarfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from . import schema as S
from .errors import LaionBuildError
from .stages import shards
from .output.layout import IMAGES, OutputLayout, REMOVAL_KINDS as _KIND_OF, REMOVALS as REMOVALS_DIR, REMOVED as PREFIX, STORED_REMOVAL as _STORED
from .stages.blocklist import (TAR_THREADS, Blocklist, filter_image_tar, filter_image_tars, filter_table, list_lines,
                               list_name, read_list_bytes)

log = logging.getLogger(__name__)



def _record(fs, root: str, kind: str, source: str, data: bytes) -> str:
    folder = posixpath.join(root, REMOVALS_DIR)
    fs.makedirs(folder, exist_ok=True)
    try:
        listed = fs.ls(folder, detail=False)
    except FileNotFoundError:  # an object store has no empty folders
        listed = []
    seqs = [int(m.group(1)) for p in listed if (m := _STORED.match(posixpath.basename(p)))]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", posixpath.basename(source.rstrip("/"))) or "list"
    path = posixpath.join(folder, f"{max(seqs, default=0) + 1:04d}-{kind}-{safe}")
    shards.write_bytes_atomic(fs, path, data)
    return path


# --------------------------------------------------------------------------- tables
def _compression(meta: pq.FileMetaData) -> str:
    if meta.num_row_groups and meta.num_columns:
        codec = meta.row_group(0).column(0).compression
        return "none" if codec == "UNCOMPRESSED" else codec.lower()
    return "zstd"


#: columns a removal list is matched on (a row table) or carried by (``key``: companions, tars)
_MATCH_COLUMNS = ("URL", "hash", "key")


def _read_columns(fs, path: str, wanted: tuple[str, ...]) -> pa.Table:
    """Only the ``wanted`` columns (those the file has) of one parquet file."""
    with fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        names = set(pf.schema_arrow.names)
        return pf.read(columns=[c for c in wanted if c in names])


def _rewrite(fs, path: str, keep_fn, target: str | None = None) -> int:
    """Write the rows ``keep_fn(table)`` keeps of one parquet file to ``target`` (default: the
    file itself) when it drops any; returns rows removed."""
    with fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        compression = _compression(pf.metadata)
        table = pf.read()
    kept = keep_fn(table)
    removed = table.num_rows - kept.num_rows
    if removed:
        shards.write_bytes_atomic(fs, target or path, shards.table_to_bytes(kept, compression))
    return removed


def _map(fn, items: list) -> list:
    """``fn`` over ``items``, :data:`TAR_THREADS` at once (each is a read, and maybe a write, of
    one file: on an object store tens of ms of waiting, in pyarrow without the interpreter lock)."""
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(TAR_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


def _published_folders(layout: OutputLayout, pointer: dict | None
                       ) -> tuple[dict[str, list[str]], dict[str, list[str]], list[str]]:
    """Files of the published generation (``pointer``): row tables and key-only companions
    (``*_embeddings``) per folder, and the image tars."""
    if pointer is not None:
        folders = sorted(pointer.get("files", {}))
    else:  # a folder published before the pointer existed: its folders as listed
        folders = sorted(posixpath.basename(p.rstrip("/")) for p in layout.ls(layout.root) if layout.fs.isdir(p))
    main: dict[str, list[str]] = {}
    companions: dict[str, list[str]] = {}
    for name in folders:
        if not any(name == s or name.startswith(s + "_") for s in S.SUBSETS):
            continue
        subset, suffix = (name, "") if name in S.SUBSETS else name.split("_", 1)
        files = layout.published_files(subset, "_" + suffix if suffix else "", pointer=pointer)
        (companions if name.endswith("_embeddings") else main)[name] = files
    return main, companions, layout.published_files(IMAGES, pointer=pointer)


def apply_to_published(layout: OutputLayout, lists: list[Blocklist], lease=None) -> dict[str, Any]:
    """Remove the rows the lists name from every published file; counts per folder and per list.

    The files that lose rows are written under a new generation and the pointer is moved to it
    last, as a publish does: a reader sees the folder before the removal or after it, never
    some files of each; unchanged files stay where they are. (A folder published before the
    pointer existed is rewritten in place.) ``lease``: checked before the pointer is written."""
    fs = layout.fs
    tag = layout.published_tag()  # before the pointer: the commit is conditioned on it
    pointer = layout.published()
    generation = layout.reserve_generation(pointer) if pointer is not None else None
    main, companions, images = _published_folders(layout, pointer)
    per_dir: Counter = Counter()
    by_list: Counter = Counter()
    keys: set[str] = set()
    files: dict[str, list[str]] = {}

    def rewrite(folder: str, path: str, keep_fn) -> tuple[str, int]:
        target = layout.under_generation(path, generation) if generation is not None else None
        removed = _rewrite(fs, path, keep_fn, target)
        return (target if removed and target else path), removed

    def scan_rows(path: str) -> bool:
        return bool(filter_table(_read_columns(fs, path, _MATCH_COLUMNS), lists)[1])

    def rewrite_rows(item: tuple[str, str]) -> tuple[str, int, Counter, set[str]]:
        folder, path = item
        found: list = [Counter(), set()]

        def keep(table: pa.Table) -> pa.Table:
            kept, counts, gone = filter_table(table, lists)
            found[:] = [counts, gone]
            return kept

        return (*rewrite(folder, path, keep), *found)

    def scan_keys(path: str) -> bool:
        table = _read_columns(fs, path, ("key",))
        return "key" in table.column_names and any(k in keys for k in table.column("key").to_pylist())

    def keep_keys(table: pa.Table) -> pa.Table:
        mask = [k not in keys for k in table.column("key").to_pylist()]
        return table.filter(pa.array(mask, pa.bool_()))

    def apply(folders: dict[str, list[str]], scan, rewrite_one) -> None:
        """Every file is first scanned for a listed row through the columns that match (many at
        once); only the files that hold one are read whole and rewritten (many at once)."""
        items = [(folder, path) for folder, paths in folders.items() for path in paths]
        hits = _map(scan, [path for _, path in items])
        rewritten = dict(zip([item for item, hit in zip(items, hits) if hit],
                             _map(rewrite_one, [item for item, hit in zip(items, hits) if hit])))
        for item in items:  # in the published order
            new_path, removed, *found = rewritten.get(item, (item[1], 0))
            per_dir[item[0]] += removed
            files.setdefault(item[0], []).append(new_path)
            if found:
                keys.update(found[1])
                if item[0] in S.SUBSETS:
                    by_list.update(found[0])

    apply(main, scan_rows, rewrite_rows)
    if keys:
        apply(companions, scan_keys, lambda item: rewrite(item[0], item[1], keep_keys))
    else:
        apply(companions, lambda path: False, None)
    dropped = 0
    if images and generation is None:
        dropped = filter_image_tars(fs, layout.path(IMAGES), lists, keys, paths=images)
    elif images:
        def one_tar(path: str) -> tuple[str, int]:
            target = layout.under_generation(path, generation)
            n = filter_image_tar(fs, path, lists, keys, target=target, copy_unchanged=False)
            return (target if n else path), n

        done = _map(one_tar, sorted(images))
        files[IMAGES] = [p for p, _ in done]
        dropped = sum(n for _, n in done)
    if generation is not None:
        for folder in pointer.get("files", {}):  # folders with nothing to rewrite keep their files
            files.setdefault(folder, [layout.path(rel) for rel in pointer["files"][folder]])
        counts = {s: max(0, int(n) - int(per_dir.get(s, 0))) for s, n in (pointer.get("counts") or {}).items()}
        if lease is not None:
            lease.check()
        layout.commit_published(generation, files, counts, expect_tag=tag)
    return {"per_dir": dict(per_dir), "by_list": dict(by_list), "images": dropped}


# --------------------------------------------------------------------------- the command
def remove(output: str, *, url_files: Iterable[str] = (), hash_files: Iterable[str] = ()) -> dict[str, Any]:
    """Remove the rows named by the lists from a finished output folder (see the module docstring)."""
    layout = OutputLayout(output)
    fs, root = layout.fs, layout.root
    stats_path = posixpath.join(root, "stats.json")
    if not fs.exists(stats_path):
        raise LaionBuildError(f"{output} holds no stats.json: not a finished output folder "
                              "(a running or interrupted run applies recorded removals when it publishes)")
    shards.read_json_object(fs, stats_path, posixpath.join(output.rstrip("/"), "stats.json"))  # before any change
    sources = [("urls", p) for p in url_files] + [("hashes", p) for p in hash_files]
    if not sources:
        raise LaionBuildError("remove: give at least one --urls or --hashes list")
    loaded = []
    for kind, source in sources:
        try:
            data = read_list_bytes(source)
            next(iter(list_lines(data, source)), None)  # a broken .gz or binary data: refused before any is stored
        except (OSError, EOFError, ValueError) as exc:
            raise LaionBuildError(f"remove: cannot read {source}: {exc}") from None
        loaded.append((kind, source, data))
    from .config import RunConfig
    from .output.lease import RunLease

    defaults = RunConfig()
    with RunLease(layout, defaults.lease_expiry_s, defaults.lease_heartbeat_s) as lease:  # not while a run writes
        return _remove_holding(layout, output, loaded, lease)


def _remove_holding(layout: OutputLayout, output: str, loaded: list[tuple[str, str, bytes]],
                    lease=None) -> dict[str, Any]:
    fs, root = layout.fs, layout.root
    stats_path = posixpath.join(root, "stats.json")
    records = []
    lists = Blocklist(PREFIX)
    for kind, source, data in loaded:
        stored = _record(fs, root, kind, source, data)
        info = lists.add_bytes(data, _KIND_OF[kind], posixpath.basename(stored), stored)
        records.append((kind, source, stored, info))
    result = apply_to_published(layout, [lists], lease)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    per_subset = {s: int(result["per_dir"].get(s, 0)) for s in S.SUBSETS}
    by_list = {name.split(":", 1)[1]: n for name, n in result["by_list"].items()}

    stats = shards.read_json_object(fs, stats_path)
    section = stats.setdefault("removed", {"total": 0, "by_list": {}, "per_subset": {}})
    for name, n in by_list.items():
        section["by_list"][name] = section["by_list"].get(name, 0) + n
    for s, n in per_subset.items():
        section["per_subset"][s] = section["per_subset"].get(s, 0) + n
        kept = stats.setdefault("kept_per_subset", {})
        kept[s] = max(0, int(kept.get(s, 0)) - n)
    section["total"] = sum(section["per_subset"].values())
    stats["kept_total"] = sum(int(v) for v in stats.get("kept_per_subset", {}).values())
    shards.write_bytes_atomic(fs, stats_path, _dumps(stats))
    layout.write_generation_stats(_dumps(stats))

    prov_path = posixpath.join(root, "provenance.json")
    prov = shards.read_json(fs, prov_path) if fs.exists(prov_path) else {}
    entries = prov.setdefault("removals", [])
    for kind, source, stored, info in records:
        entries.append({
            "list": list_name(source),
            "source": source,
            "stored": posixpath.relpath(stored, root),
            "kind": kind,
            "sha256": info.sha256,
            "entries": info.entries,
            "invalid_entries": info.invalid,
            "removed": by_list.get(info.name, 0),
            "time": now,
        })
    shards.write_json_atomic(fs, prov_path, prov)
    report = {"output": output, "removed": sum(per_subset.values()), "per_subset": per_subset,
              "by_list": by_list, "companion_rows": {k: v for k, v in result["per_dir"].items() if k not in S.SUBSETS},
              "images": result["images"], "lists": [posixpath.relpath(r[2], root) for r in records]}
    log.info("removed %d rows (%s)", report["removed"], ", ".join(f"{s}={n}" for s, n in per_subset.items()))
    return report


def _dumps(obj: Any) -> bytes:
    import json

    return json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8")


__all__ = ["apply_to_published", "remove"]
