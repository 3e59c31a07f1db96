"""Publish is atomic: a reader sees the old generation or the new one, never a mix, and a rerun
completes a publish cut short -- on a local folder and on a loopback S3 server."""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laionbuild.config import load_config
from laionbuild.output.layout import OutputLayout
from laionbuild.runner import publish as P
from laionbuild.schema import pair_hash
from laionbuild.stages import shards
from laionbuild.stats import RunStats
from s3_loopback import output_location

BUCKET = "lbpublish"


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    with output_location(request.param, tmp_path, BUCKET) as url:
        yield url


def _shard(layout: OutputLayout, sid: str, rows: dict[str, list[int]]) -> dict:
    """A committed work shard whose parts hold rows ``i`` of each subset; returns its marker."""
    parts, part_rows = [], {}
    for subset, ids in rows.items():
        urls = [f"http://img.test/{subset}/{i}.jpg" for i in ids]
        texts = [f"caption {i}" for i in ids]
        table = pa.table({"URL": urls, "TEXT": texts, "hash": [pair_hash(u, t) for u, t in zip(urls, texts)],
                          "similarity": pa.array([0.3] * len(ids), pa.float32())})
        path = posixpath.join(layout.scored_dir(sid), f"{subset}-{sid}.parquet")
        shards.write_bytes_atomic(layout.fs, path, shards.table_to_bytes(table, "zstd"))
        parts.append(path)
        part_rows[path] = len(ids)
    return {"shard_id": sid, "rows": sum(part_rows.values()), "parts": parts, "part_rows": part_rows}


def _seen(output: str) -> dict[str, set[str]]:
    """What a reader of the published subsets sees (through the layout, as report and compare do)."""
    layout = OutputLayout(output)
    pointer = layout.published()
    seen = {}
    for subset in ("en", "multi"):
        urls: list[str] = []
        for path in layout.published_files(subset, pointer=pointer):
            with layout.fs.open(path, "rb") as fh:
                urls += pq.read_table(fh, columns=["URL"]).column(0).to_pylist()
        assert len(urls) == len(set(urls)), subset  # never a row twice (two generations mixed)
        seen[subset] = set(urls)
    return seen


def _files(layout: OutputLayout, folder: str) -> list[str]:
    return [p for p in layout.ls(layout.path(folder)) if p.endswith(".parquet")]


def test_publish_cut_short_shows_old_or_new_and_the_rerun_completes_it(output, monkeypatch):
    cfg = load_config(None, ["output.rows_per_shard=3"])  # several parts per subset
    layout = OutputLayout(output)
    first = [_shard(layout, "s0", {"en": list(range(7)), "multi": list(range(5))})]
    real_call = P.PublishBucket.__call__
    calls = {"n": 0}

    def failing_call(self, table):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed while writing parts")
        return real_call(self, table)

    # 0. the very first publish cut short: there is no published state yet, and readers see none
    monkeypatch.setattr(P.PublishBucket, "__call__", failing_call)
    with pytest.raises(RuntimeError):
        P.publish(cfg, layout, first, RunStats())
    monkeypatch.setattr(P.PublishBucket, "__call__", real_call)
    assert _files(layout, "en") and _seen(output) == {"en": set(), "multi": set()}

    P.publish(cfg, layout, first, RunStats())
    old = _seen(output)
    assert {k: len(v) for k, v in old.items()} == {"en": 7, "multi": 5}
    # on an object store each publish takes its own number: the one cut short above kept 1
    assert layout.published()["generation"] == (2 if output.startswith("s3://") else 1)

    both = first + [_shard(layout, "s1", {"en": list(range(7, 15)), "multi": list(range(5, 9))})]
    new_sizes = {"en": 15, "multi": 9}

    # 1. cut short while writing the parts of the new generation: readers see the old one
    calls["n"] = 0
    monkeypatch.setattr(P.PublishBucket, "__call__", failing_call)
    with pytest.raises(RuntimeError):
        P.publish(cfg, layout, both, RunStats())
    monkeypatch.setattr(P.PublishBucket, "__call__", real_call)
    assert _seen(output) == old
    assert len(_files(layout, "en")) > len(layout.published_files("en"))  # new parts are there, unseen

    # 2. cut short after the pointer, before the old generation is removed: readers see the new one
    monkeypatch.setattr(OutputLayout, "clean_published", lambda self, pointer: (_ for _ in ()).throw(
        RuntimeError("killed before clean-up")))
    with pytest.raises(RuntimeError):
        P.publish(cfg, layout, both, RunStats())
    monkeypatch.undo()
    seen = _seen(output)
    assert {k: len(v) for k, v in seen.items()} == new_sizes and seen["en"] >= old["en"]

    # 3. the rerun publishes again and leaves exactly one generation in each folder
    stats = RunStats()
    P.publish(cfg, layout, both, stats)
    assert _seen(output) == seen
    assert dict(stats.kept_per_subset) == {**new_sizes, "nolang": 0}
    pointer = layout.published()
    for subset in ("en", "multi"):
        assert sorted(_files(layout, subset)) == sorted(layout.published_files(subset, pointer=pointer))
        assert all(f"part-g{pointer['generation']:04d}-" in p for p in _files(layout, subset))


def test_publish_in_the_driver_joins_the_parts_a_chunk_at_a_time(tmp_path, monkeypatch):
    """More parts than one chunk (parts read, then joined, a few at a time): every row is published
    once, in the same files as when every part is read before the join."""
    layout = OutputLayout(str(tmp_path / "out"))
    scored = [_shard(layout, f"s{k}", {"en": list(range(4 * k, 4 * k + 4)), "multi": [100 + k]}) for k in range(7)]
    cfg = load_config(None, ["output.rows_per_shard=5"])
    published = {}
    for chunk in (2, 10_000):
        monkeypatch.setattr(P, "COMBINE_PARTS", chunk)
        stats = RunStats()
        files = P.publish(cfg, layout, scored, stats)
        assert stats.kept_per_subset["en"] == 28 and stats.kept_per_subset["multi"] == 7
        published[chunk] = {s: [pq.read_table(f).to_pylist() for f in files[s]] for s in ("en", "multi")}
    assert published[2] == published[10_000]
    assert sorted(r["URL"] for t in published[2]["en"] for r in t) == \
        sorted(f"http://img.test/en/{i}.jpg" for i in range(28))


def test_a_publisher_paused_past_its_lease_never_mixes_with_the_run_that_took_over(tmp_path):
    """Run A starts to publish and pauses (its lease expires); run B takes the folder over and
    publishes. When A wakes up, its files go under a generation number of its own, its pointer
    write fails (the pointer changed since A started), and it removes nothing of B's."""
    from laionbuild.output.layout import PublishedMeanwhile

    with output_location("s3", tmp_path, BUCKET) as output:
        cfg = load_config(None, ["output.rows_per_shard=3"])
        layout = OutputLayout(output)
        a_rows = [_shard(layout, "a0", {"en": list(range(4)), "multi": list(range(2))})]
        b_rows = a_rows + [_shard(layout, "b1", {"en": list(range(4, 9)), "multi": list(range(2, 5))})]
        real_commit = OutputLayout.commit_published
        paused: dict = {}

        def pause_before_commit(self, generation, files, counts, expect_tag=None, stats=None):
            if not paused:  # run A, about to point readers at its files: B runs now, whole
                paused["generation"] = generation
                P.publish(cfg, OutputLayout(output), b_rows, RunStats())
            return real_commit(self, generation, files, counts, expect_tag=expect_tag, stats=stats)

        OutputLayout.commit_published = pause_before_commit
        try:
            with pytest.raises(PublishedMeanwhile):
                P.publish(cfg, layout, a_rows, RunStats())
        finally:
            OutputLayout.commit_published = real_commit
        pointer = layout.published()
        assert pointer["generation"] != paused["generation"]  # B never wrote under A's number
        assert {k: len(v) for k, v in _seen(output).items()} == {"en": 9, "multi": 5}  # B's, whole
        for subset in ("en", "multi"):
            assert all(layout.exists(p) for p in layout.published_files(subset, pointer=pointer))


def test_a_lease_not_renewed_within_its_expiry_stops_the_next_commit(tmp_path):
    import time

    from laionbuild.output.lease import LeaseHeld, RunLease

    with output_location("s3", tmp_path, BUCKET) as output:
        now = [time.time()]
        lease = RunLease(OutputLayout(output), 30.0, 10.0, clock=lambda: now[0])
        with lease:
            lease.check()  # just renewed
            now[0] += 28.0  # paused (or unable to renew) for most of the expiry
            with pytest.raises(LeaseHeld, match="not renewed within its expiry"):
                lease.check()
        gone = RunLease(OutputLayout(output + "-2"), 30.0, 0.1)
        gone.acquire()
        try:
            OutputLayout(output + "-2").rm(gone.path)  # taken over and released by another run meanwhile
            deadline = time.monotonic() + 20
            while not gone.lost and time.monotonic() < deadline:
                time.sleep(0.05)
            assert gone.lost  # a renewal of a lease that no longer exists is a lost lease, not a retry
        finally:
            gone.release()
