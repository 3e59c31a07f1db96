"""The work-shard commit protocol: what a rerun keeps of a shard that an interrupted run left uncommitted."""

from __future__ import annotations

import json
import posixpath

import numpy as np
import pyarrow as pa

from laionbuild.runner.commit import (SHARD_ROW, ShardTracker, part_name, recover_parts, with_part_meta)
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
                              S.LANGUAGE: "en", S.LANGUAGE_SCORE: 1.0} for i in range(n)], S.ROUTED_SCHEMA)
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
