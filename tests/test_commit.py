"""The work-shard commit protocol: what a rerun keeps of a shard that an interrupted run left uncommitted."""

from __future__ import annotations

import io
import json
import os
import posixpath
import tarfile
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laionbuild.runner import commit
from laionbuild.runner.commit import (COMPACTED, PART_META, SHARD_ROW, ShardTracker, compact_shard, part_name,
                                      recover_parts, with_part_meta)
from laionbuild.output.layout import OutputLayout
from laionbuild.runner.progress import Progress
from laionbuild.runner.score import read_work_shard, stream_items
from laionbuild.stages import shards

COUNTERS = {"fetch": {"kept": 0, "dropped": 0, "dropped_by_reason": {}, "counts": {"rows": 0}}}


def _part(layout: OutputLayout, sid: str, token: str, rows: list[int], *, fates: bool = True,
          meta: bool = True) -> list[str]:
    folder = layout.scored_dir(sid)
    kept = pa.table({"URL": [f"http://x/{i}" for i in rows]})
    paths = [posixpath.join(folder, part_name("en", token))]
    shards.write_bytes_atomic(layout.fs, paths[0], shards.table_to_bytes(kept, "zstd"))
    if fates:
        table = pa.table({"URL": [f"http://x/{i}" for i in rows], SHARD_ROW: pa.array(rows, pa.int64())})
        counters = json.loads(json.dumps(COUNTERS))
        counters["fetch"]["counts"]["rows"] = len(rows)
        if meta:
            table = with_part_meta(table, counters, {"fetch": ["node-a"], "write": ["node-b"]})
        paths.append(posixpath.join(folder, part_name("fates", token)))
        shards.write_bytes_atomic(layout.fs, paths[1], shards.table_to_bytes(table, "zstd"))
    return paths


def test_finished_parts_are_kept_and_unfinished_files_deleted(tmp_path):
    layout = OutputLayout(str(tmp_path))
    a = _part(layout, "s1", "aaaa", [0, 1, 2])
    b = _part(layout, "s1", "bbbb", [5, 6])
    orphan = _part(layout, "s1", "cccc", [3, 4], fates=False)  # killed before its fates file
    tmp = posixpath.join(layout.scored_dir("s1"), "fates-dddd.parquet.tmp-1234")
    layout.fs.pipe(tmp, b"half a file")
    rec = recover_parts(layout, {"s1": 8, "s2": 4})
    assert set(rec) == {"s1"}  # s2 has no folder: nothing to keep
    assert rec["s1"].rows.tolist() == [0, 1, 2, 5, 6]
    assert sorted(rec["s1"].parts) == sorted(a + b)
    assert {c["fetch"]["counts"]["rows"] for c in rec["s1"].counters} == {3, 2}
    assert all(not layout.fs.exists(p) for p in orphan + [tmp])
    assert all(layout.fs.exists(p) for p in a + b)


def test_parts_that_do_not_add_up_redo_the_shard(tmp_path):
    layout = OutputLayout(str(tmp_path))
    _part(layout, "dup", "aaaa", [0, 1])
    _part(layout, "dup", "bbbb", [1, 2])  # row 1 twice
    _part(layout, "past", "aaaa", [7, 8])  # the shard has 8 rows: row 8 cannot exist
    _part(layout, "old", "aaaa", [0, 1], meta=False)  # no counters: cannot be committed later
    _part(layout, "ok", "aaaa", [3])
    rec = recover_parts(layout, {"dup": 4, "past": 8, "old": 4, "ok": 4})
    assert set(rec) == {"ok"}
    for sid in ("dup", "past", "old"):
        assert not layout.fs.exists(layout.scored_dir(sid))


def test_tracker_commits_resumed_rows_with_their_counters(tmp_path):
    layout = OutputLayout(str(tmp_path))
    _part(layout, "full", "aaaa", [0, 1])
    _part(layout, "full", "bbbb", [2])
    _part(layout, "half", "aaaa", [1])
    rec = recover_parts(layout, {"full": 3, "half": 2})
    tracker = ShardTracker(layout, {"full": 3, "half": 2}, Progress(2, False, "", ""), rec)
    tracker.close()  # markers are written in the background
    marker = json.loads((tmp_path / "scored" / "_done" / "full.json").read_text())
    assert marker["rows"] == 3 and len(marker["parts"]) == 4
    assert marker["counters"]["fetch"]["counts"]["rows"] == 3
    assert marker["nodes"] == {"fetch": ["node-a"], "write": ["node-b"]}
    assert list(tracker.pending) == ["half"]
    tracker = ShardTracker(layout, {"half": 2}, Progress(1, False, "", ""), {"half": rec["half"]})
    tracker.add({"shard_id": np.array(["half"], dtype=object), "n_rows": np.array([1]),
                 "parts": np.array([json.dumps({"p/en-x.parquet": 1, "p/fates-x.parquet": 1})], dtype=object),
                 "counters": np.array([json.dumps(COUNTERS)], dtype=object),
                 "node": np.array([json.dumps({"fetch": ["node-c"]})], dtype=object)})
    assert not tracker.pending
    assert not tracker.parts and not tracker.counters and not tracker.nodes  # committed state is freed
    tracker.close()
    marker = json.loads((tmp_path / "scored" / "_done" / "half.json").read_text())
    assert marker["nodes"]["fetch"] == ["node-a", "node-c"]
    assert marker["part_rows"] == {"p/en-x.parquet": 1, "p/fates-x.parquet": 1}  # publish reads no footer


def test_stream_skips_rows_already_written(tmp_path):
    layout = OutputLayout(str(tmp_path))
    table = pa.table({"x": list(range(10))})
    shards.write_bytes_atomic(layout.fs, layout.workshard_file("s"), shards.table_to_bytes(table, "zstd", 4))
    shards.write_bytes_atomic(layout.fs, layout.workshard_file("t"), shards.table_to_bytes(table, "zstd", 4))
    _part(layout, "s", "aaaa", [0, 1, 2, 3, 5])  # row group 0 (rows 0-3) done, row 5 of group 1
    _part(layout, "u", "aaaa", list(range(10)))  # every row written: nothing to stream
    rec = recover_parts(layout, {"s": 10, "t": 10, "u": 10})
    # the driver reads no work shard: the items are made without any file (the manifest has the rows)
    items = stream_items(OutputLayout(str(tmp_path / "elsewhere")), {"s": 10, "t": 10, "u": 10}, rec)
    assert [(i["shard_id"], i["skip"]) for i in items] == [("s", "[0, 1, 2, 3, 5]"), ("t", "")]
    # the task reads the shard a row group at a time, without the rows written already
    for item, want in zip(stream_items(layout, {"s": 10, "t": 10}, rec), ([4, 6, 7, 8, 9], list(range(10)))):
        batches = list(read_work_shard({k: np.array([v], dtype=object) for k, v in item.items()}))
        assert len(batches) == (2 if item["shard_id"] == "s" else 3)  # row group 0 of s: all written
        assert np.concatenate([b[SHARD_ROW] for b in batches]).tolist() == want


def test_part_rows_is_set_or_a_work_shard_within_a_memory_bound():
    from laionbuild.config import load_config
    from laionbuild.runner.score import AUTO_PART_ROWS, AUTO_PART_ROWS_WITH_IMAGES, part_rows

    assert part_rows(load_config(None, ["run.work_shard_rows=5000"])) == 5000
    assert part_rows(load_config(None, ["run.work_shard_rows=50000"])) == AUTO_PART_ROWS == 20_000
    assert part_rows(load_config(None, ["run.work_shard_rows=50000", "output.save_images=true"])) == \
        AUTO_PART_ROWS_WITH_IMAGES == 2_000
    assert part_rows(load_config(None, ["run.work_shard_rows=50000", "output.part_rows=64"])) == 64


def test_writer_makes_one_part_per_shard_and_subset_of_its_batch(tmp_path):
    """However many rows a batch holds, the writer puts each shard's rows of it in one part:
    one file per subset with kept rows, one fates file."""
    from laionbuild import schema as S
    from laionbuild.config import load_config
    from laionbuild.runner.score import ShardPartWriter

    n = 300
    subsets = ["en", "multi", "nolang"]
    batch = S.rows_to_batch([{S.URL: f"http://x/{i}", S.ALT_TEXT: "t", S.PAGE_URL: "http://p", S.WARC_PATH: "w",
                              S.WARC_RECORD_ID: "r", S.WARC_OFFSET: i, S.HASH: i, S.SUBSET: subsets[i % 3],
                              S.LANGUAGE: "en", S.LANGUAGE_SCORE: 1.0, S.SAMPLE_ID: 1000 + i} for i in range(n)],
                            S.ROUTED_SCHEMA)
    batch.update({S.STATUS: np.array(["success"] * n, dtype=object), S.SIMILARITY: np.full(n, 0.5, np.float32),
                  S.DROP_REASON: np.array(["" if i % 4 else "clip:below_threshold" for i in range(n)], dtype=object),
                  S.WIDTH: np.full(n, 32, np.int32), S.HEIGHT: np.full(n, 32, np.int32),
                  "shard_id": np.array(["a"] * 200 + ["b"] * 100, dtype=object),
                  SHARD_ROW: np.concatenate([np.arange(200), np.arange(100)])})
    out = ShardPartWriter(load_config(None), str(tmp_path))(batch)
    assert list(out["shard_id"]) == ["a", "b"] and list(out["n_rows"]) == [200, 100]
    for sid, parts in zip(out["shard_id"], out["parts"]):
        names = sorted(posixpath.basename(p).rsplit("-", 1)[0] for p in json.loads(parts))
        assert names == ["en", "fates", "multi", "nolang"], (sid, names)


# --------------------------------------------------------------------------- compaction at commit
def _tar(keys: list[str]) -> bytes:
    sink = io.BytesIO()
    with tarfile.open(fileobj=sink, mode="w") as tar:
        for key in keys:
            for name, payload in ((f"{key}.jpg", f"jpeg {key}".encode()), (f"{key}.txt", b"caption"),
                                  (f"{key}.json", json.dumps({"key": key}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return sink.getvalue()


def _full_part(layout: OutputLayout, sid: str, token: str, rows: list[int], node: str) -> dict[str, int]:
    """A part as the writer makes it: en (even rows), multi (rows divisible by 3), images of the
    kept rows, fates last with its counters and nodes; ``{path: rows}``."""
    folder = layout.scored_dir(sid)
    written = {}
    for kind, keep in (("en", [r for r in rows if r % 2 == 0]), ("multi", [r for r in rows if r % 2 and r % 3 == 0])):
        if keep:
            path = posixpath.join(folder, part_name(kind, token))
            table = pa.table({"URL": [f"http://x/{i}" for i in keep], "hash": pa.array(keep, pa.int64())})
            shards.write_bytes_atomic(layout.fs, path, shards.table_to_bytes(table, "zstd"))
            written[path] = len(keep)
    kept = [r for r in rows if r % 2 == 0 or r % 3 == 0]
    path = posixpath.join(folder, part_name("images", token))
    shards.write_bytes_atomic(layout.fs, path, _tar([f"k{i:04d}" for i in kept]))
    written[path] = len(kept)
    counters = json.loads(json.dumps(COUNTERS))
    counters["fetch"]["counts"]["rows"] = len(rows)
    counters["fetch"]["kept"] = len(kept)
    table = with_part_meta(pa.table({"URL": [f"http://x/{i}" for i in rows], SHARD_ROW: pa.array(rows, pa.int64())}),
                           counters, {"fetch": [node], "write": ["w-" + node]})
    path = posixpath.join(folder, part_name("fates", token))
    shards.write_bytes_atomic(layout.fs, path, shards.table_to_bytes(table, "zstd"))
    written[path] = len(rows)
    return written


def _batch(sid: str, written: dict[str, int], node: str) -> dict[str, np.ndarray]:
    """The writer's summary row of one part, as the tracker receives it."""
    fates = next(p for p in written if posixpath.basename(p).startswith("fates-"))
    counters = json.loads(json.dumps(COUNTERS))
    counters["fetch"]["counts"]["rows"] = written[fates]
    return {"shard_id": np.array([sid], dtype=object), "n_rows": np.array([written[fates]]),
            "parts": np.array([json.dumps(written)], dtype=object),
            "counters": np.array([json.dumps(counters)], dtype=object),
            "node": np.array([json.dumps({"fetch": [node]})], dtype=object)}


class _Compactor:
    """What the runner's Ray task does, in a thread: counts the shards handed over."""

    def __init__(self, output: str):
        self.output = output
        self.pool = ThreadPoolExecutor(2)
        self.shards: list[str] = []

    def __call__(self, sid: str, marker: dict):
        self.shards.append(sid)
        return self.pool.submit(compact_shard, self.output, marker, "zstd")


def _kinds(paths) -> dict[str, int]:
    return dict(Counter(posixpath.basename(p).rsplit("-", 1)[0] for p in paths))


def _read_tar_members(path: str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_a_shard_in_several_parts_is_committed_as_one_part_per_kind(tmp_path):
    layout = OutputLayout(str(tmp_path))
    cuts = [list(range(0, 7)), list(range(7, 11)), list(range(11, 20))]
    parts = [_full_part(layout, "s", f"t{i}", rows, f"n{i}") for i, rows in enumerate(cuts)]
    one = _full_part(layout, "one", "only", list(range(5)), "n9")  # already one file per kind
    old = [p for w in parts for p in w]
    members = {}
    for p in old:
        if p.endswith(".tar"):
            members.update(_read_tar_members(p))
    compactor = _Compactor(str(tmp_path))
    tracker = ShardTracker(layout, {"s": 20, "one": 5}, Progress(2, False, "", ""), compactor=compactor)
    for i, written in enumerate(parts):
        tracker.add(_batch("s", written, f"n{i}"))
    tracker.add(_batch("one", one, "n9"))
    tracker.close()
    assert compactor.shards == ["s"] and tracker.committed == 2 and tracker.compacted == 1
    marker = json.loads((tmp_path / "scored" / "_done" / "s.json").read_text())
    assert _kinds(marker["parts"]) == {"en": 1, "multi": 1, "images": 1, "fates": 1}
    assert all(layout.fs.exists(p) for p in marker["parts"])
    assert not any(layout.fs.exists(p) for p in old)  # the old parts are deleted once committed
    assert sorted(os.listdir(tmp_path / "scored" / "s")) == sorted(posixpath.basename(p) for p in marker["parts"])
    assert marker[COMPACTED] == len(old)
    by_kind = {posixpath.basename(p).rsplit("-", 1)[0]: p for p in marker["parts"]}
    fates = pq.read_table(by_kind["fates"])
    assert sorted(fates.column(SHARD_ROW).to_pylist()) == list(range(20))
    meta = json.loads(fates.schema.metadata[PART_META])
    assert meta["counters"]["fetch"]["counts"]["rows"] == 20
    assert meta["counters"]["fetch"]["kept"] == sum(len([r for r in c if r % 2 == 0 or r % 3 == 0]) for c in cuts)
    assert meta["nodes"] == {"fetch": ["n0", "n1", "n2"], "write": ["w-n0", "w-n1", "w-n2"]}
    assert meta[COMPACTED] == ["t0", "t1", "t2"]
    en = pq.read_table(by_kind["en"]).column("hash").to_pylist()
    assert sorted(en) == list(range(0, 20, 2))
    multi = pq.read_table(by_kind["multi"]).column("hash").to_pylist()
    assert sorted(multi) == [3, 9, 15]
    assert _read_tar_members(by_kind["images"]) == members  # every member, byte for byte
    assert marker["part_rows"] == {by_kind["en"]: 10, by_kind["multi"]: 3, by_kind["images"]: 13,
                                   by_kind["fates"]: 20}
    assert marker["counters"]["fetch"]["counts"]["rows"] == 20 and marker["rows"] == 20
    assert layout.fate_files() == sorted([by_kind["fates"], next(p for p in one if "fates-" in p)])
    # a shard already in one part per kind is committed as written
    marker = json.loads((tmp_path / "scored" / "_done" / "one.json").read_text())
    assert sorted(marker["parts"]) == sorted(one) and COMPACTED not in marker


def test_a_failed_compaction_is_raised_and_leaves_the_shard_uncommitted(tmp_path):
    layout = OutputLayout(str(tmp_path))
    parts = [_full_part(layout, "s", f"t{i}", rows, "n") for i, rows in enumerate([[0, 1], [2, 3]])]

    def broken(sid, marker):
        future = Future()
        future.set_exception(OSError("the store is gone"))
        return future

    tracker = ShardTracker(layout, {"s": 4}, Progress(1, False, "", ""), compactor=broken)
    for written in parts:
        tracker.add(_batch("s", written, "n"))
    with pytest.raises(OSError, match="the store is gone"):
        tracker.close()
    assert not layout.exists(layout.scored_marker("s"))


def test_a_compaction_killed_before_its_marker_is_dropped_by_the_rerun(tmp_path, monkeypatch):
    layout = OutputLayout(str(tmp_path))
    cuts = [[0, 1, 2], [3, 4], [5]]
    parts = [_full_part(layout, "s", f"t{i}", rows, f"n{i}") for i, rows in enumerate(cuts)]
    old = sorted(p for w in parts for p in w)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before the marker")

    monkeypatch.setattr(commit.shards, "write_json_atomic", killed)
    tracker = ShardTracker(layout, {"s": 6}, Progress(1, False, "", ""), compactor=_Compactor(str(tmp_path)))
    for i, written in enumerate(parts):
        tracker.add(_batch("s", written, f"n{i}"))
    with pytest.raises(KeyboardInterrupt):
        tracker.close()
    monkeypatch.undo()
    files = sorted(str(p) for p in (tmp_path / "scored" / "s").iterdir())
    assert len(files) == len(old) + 4  # the old parts and the compacted one, fates included
    assert not layout.exists(layout.scored_marker("s"))
    rec = recover_parts(layout, {"s": 6})
    assert rec["s"].rows.tolist() == list(range(6))  # the old parts add up, the compaction is gone
    assert sorted(rec["s"].parts) == old
    assert sorted(str(p) for p in (tmp_path / "scored" / "s").iterdir()) == old
    assert sum(c["fetch"]["counts"]["rows"] for c in rec["s"].counters) == 6
    compactor = _Compactor(str(tmp_path))
    ShardTracker(layout, {"s": 6}, Progress(1, False, "", ""), rec, compactor=compactor).close()
    marker = json.loads((tmp_path / "scored" / "_done" / "s.json").read_text())
    assert compactor.shards == ["s"] and _kinds(marker["parts"]) == {"en": 1, "multi": 1, "images": 1, "fates": 1}
    assert marker["counters"]["fetch"]["counts"]["rows"] == 6


def test_a_compaction_killed_after_its_marker_leaves_only_unread_files(tmp_path, monkeypatch):
    layout = OutputLayout(str(tmp_path))
    parts = [_full_part(layout, "s", f"t{i}", rows, "n") for i, rows in enumerate([[0, 1, 2], [3, 4]])]
    old = sorted(p for w in parts for p in w)
    captured = {}

    def capture(sid, marker):  # the marker the tracker hands over
        captured.update(marker)
        future = Future()
        future.set_result(None)
        return future

    tracker = ShardTracker(layout, {"s": 5}, Progress(1, False, "", ""), compactor=capture)
    for written in parts:
        tracker.add(_batch("s", written, "n"))
    tracker.close()

    def killed(layout, paths):
        raise KeyboardInterrupt("killed after the marker")

    monkeypatch.setattr(commit, "_delete_files", killed)
    with pytest.raises(KeyboardInterrupt):
        compact_shard(str(tmp_path), captured)
    monkeypatch.undo()
    assert all(layout.fs.exists(p) for p in old)  # left over
    marker = layout.scored_markers()["s"]
    assert _kinds(marker["parts"]) == {"en": 1, "multi": 1, "images": 1, "fates": 1}
    assert not set(marker["parts"]) & set(old)
    # readers go through the marker: one fates file, every row once
    (fates,) = layout.fate_files()
    assert sorted(pq.read_table(fates).column(SHARD_ROW).to_pylist()) == [0, 1, 2, 3, 4]
    # a task retried after it had deleted some of the old files finds the marker and leaves it
    os.remove(old[0])
    assert compact_shard(str(tmp_path), captured) == marker
    assert len(os.listdir(tmp_path / "scored" / "s")) == len(old) - 1 + 4
