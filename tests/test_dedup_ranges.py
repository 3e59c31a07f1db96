"""The de-dup phase by hash range: the same rows as the whole-table rule, incremental generations,
a killed phase redone range by range, and work shards sized by the rows they hold."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laionbuild.config import config_from_dict
from laionbuild.demo.candidates import draw_pairs, write_inputs
from laionbuild.runner import dedupkeys as K
from laionbuild.runner.dedup import (begin_generation, committed_shards, dedup_rows, run_dedup_phase,
                                     run_ranges, shard_sizes)
from laionbuild.output.layout import OutputLayout

REPO = Path(__file__).resolve().parents[1]
ROW = ("URL", "TEXT", "warc_path", "warc_offset")


def _cfg(out, key="url_text", ranges=8, shard_rows=100, group=300, **run):
    return config_from_dict({"run": {"output": str(out), "dedup_key": key, "work_shard_rows": shard_rows, **run},
                             "ray": {"dedup_ranges": ranges, "dedup_group_candidates": group}})


def _tables(out, markers) -> pa.Table:
    return pa.concat_tables([pq.read_table(out / "candidates" / f"{fid}.parquet") for fid in sorted(markers)])


def _shard_rows(out, layout, generation=None) -> list[tuple]:
    rows = []
    for m in layout.group_markers().values():
        if generation is not None and m["generation"] != generation:
            continue
        for s in m["shards"]:
            t = pq.read_table(out / "workshards" / f"{s['id']}.parquet", columns=list(ROW))
            assert t.num_rows == s["rows"]
            rows += list(zip(*(t.column(c).to_pylist() for c in ROW)))
    return rows


def _as_rows(table: pa.Table) -> list[tuple]:
    return list(zip(*(table.column(c).to_pylist() for c in ROW)))


def _mixed_inputs(seed=3):
    """Inputs whose duplicates cross files, and rows of one file out of (offset, TEXT) order."""
    pairs = draw_pairs(12, 150, 0.5, seed)
    pairs[4] = pairs[4][::-1].copy()
    return pairs


@pytest.mark.parametrize("key", ["url_text", "url"])
def test_ranges_keep_the_rows_of_the_whole_table_rule(tmp_path, key):
    out = tmp_path / "out"
    markers = write_inputs(str(out), _mixed_inputs(), key)
    layout = OutputLayout(str(out))
    manifest = run_dedup_phase(_cfg(out, key), layout, markers)
    expected, counters = dedup_rows(_tables(out, markers), None, key)
    got = _shard_rows(out, layout)
    assert len(got) == len(set(got)) == expected.num_rows
    assert set(got) == set(_as_rows(expected))
    assert manifest["counters"]["dedup"] == counters.to_dict()
    assert manifest["ranges"] == 8 and manifest["groups"] > 1 and manifest["engine"] == "driver"
    shards = committed_shards(layout, [manifest])
    assert len(shards) == manifest["n_shards"] and max(shards.values()) <= 100
    assert "shards" not in manifest  # the shards are listed per group, never in one file


def test_tie_break_does_not_depend_on_the_order_inputs_are_numbered(tmp_path):
    pairs = _mixed_inputs(5)
    a, b = tmp_path / "a", tmp_path / "b"
    ma = write_inputs(str(a), pairs, "url")
    mb = write_inputs(str(b), pairs[::-1], "url", first=100)
    # same files under other ids: rename warc paths so both folders hold the same rows
    for fid in mb:
        t = pq.read_table(b / "candidates" / f"{fid}.parquet")
        i = 111 - int(fid[2:])
        paths = pa.array([f"synthetic/{i:06d}.warc.gz"] * t.num_rows)
        t = t.set_column(t.column_names.index("warc_path"), "warc_path", paths)
        pq.write_table(t, b / "candidates" / f"{fid}.parquet")
        (b / "candidates" / f"{fid}.keys").unlink()  # key files made again from the table
    run_dedup_phase(_cfg(a, "url"), OutputLayout(str(a)), ma)
    run_dedup_phase(_cfg(b, "url"), OutputLayout(str(b)), mb)
    assert set(_shard_rows(a, OutputLayout(str(a)))) == set(_shard_rows(b, OutputLayout(str(b))))


def test_incremental_generation_with_other_range_count(tmp_path):
    out = tmp_path / "out"
    pairs = _mixed_inputs(7)
    first = write_inputs(str(out), pairs[:6], "url_text")
    layout = OutputLayout(str(out))
    m0 = run_dedup_phase(_cfg(out, ranges=8), layout, first)
    second = write_inputs(str(out), pairs[6:], "url_text", first=6)
    assert run_dedup_phase(_cfg(out, ranges=5), layout, first) is None  # nothing new
    m1 = run_dedup_phase(_cfg(out, ranges=5), layout, {**first, **second})
    prev, _ = dedup_rows(_tables(out, first), None, "url_text")
    expected, counters = dedup_rows(_tables(out, second), prev, "url_text")
    got = _shard_rows(out, layout, generation=1)
    assert sorted(got) == sorted(_as_rows(expected))
    assert m1["counters"]["dedup"] == counters.to_dict() and counters.dropped_by_reason["already_in_output"] > 0
    assert set(m1["inputs"]) == set(second) and m0["generation"] == 0 and m1["generation"] == 1
    # every pair of the two generations once
    both = _shard_rows(out, layout)
    assert len(both) == len({(u, t) for u, t, *_ in both})


def test_global_dedup_off_keeps_every_row_but_held_keys(tmp_path):
    out = tmp_path / "out"
    markers = write_inputs(str(out), _mixed_inputs(9), "url_text")
    manifest = run_dedup_phase(_cfg(out, global_dedup=False), OutputLayout(str(out)), markers)
    assert manifest["unique"] == sum(m["n_candidates"] for m in markers.values())
    assert manifest["counters"]["dedup"]["dropped_by_reason"] == {}


def test_key_file_slices_cover_each_row_once(tmp_path):
    out = tmp_path / "out"
    markers = write_inputs(str(out), draw_pairs(1, 5000, 0.9, 1), "url_text")
    (fid, m), = markers.items()
    layout = OutputLayout(str(out))
    for n_ranges in (1, 3, 64, 1000):
        rows = []
        for r in range(n_ranges):
            lo, hi = K.range_bounds(r, n_ranges)
            rec, _ = K.read_key_slice(layout.fs, layout.candidates_keys(fid), m["keys"]["bits"], lo, hi)
            assert K.in_bounds(rec["h1"], lo, hi).all()
            rows += rec["row"].tolist()
        assert sorted(rows) == list(range(5000))


def test_shard_sizes():
    assert shard_sizes(0, 10) == []
    assert shard_sizes(10, 10) == [10]
    assert shard_sizes(11, 10) == [6, 5]
    assert sum(shard_sizes(228_001, 50_000)) == 228_001 and max(shard_sizes(228_001, 50_000)) <= 50_000


_KILLED_RANGES = textwrap.dedent("""
    import json, sys
    from laionbuild.config import config_from_dict
    from laionbuild.runner.dedup import begin_generation, run_ranges
    from laionbuild.output.layout import OutputLayout
    out, markers = sys.argv[1], json.load(open(sys.argv[2]))
    cfg = config_from_dict({"run": {"output": out, "work_shard_rows": 500, "progress": False},
                            "ray": {"dedup_ranges": 256, "dedup_group_candidates": 300}})
    layout = OutputLayout(out)
    plan = begin_generation(cfg, layout, markers)
    print("ranges", flush=True)
    run_ranges(cfg, layout, plan, "driver")
""")


def test_killed_phase_redoes_only_the_ranges_without_marker(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    markers = write_inputs(str(ref), draw_pairs(40, 2000, 0.6, 11), "url_text")
    shutil.copytree(ref / "candidates", out / "candidates")
    cfg = _cfg(ref, ranges=256, shard_rows=500)
    layout_ref = OutputLayout(str(ref))
    run_ranges(cfg, layout_ref, begin_generation(cfg, layout_ref, markers), "driver")
    (tmp_path / "markers.json").write_text(json.dumps(markers))
    done = out / "dedup" / "g0000" / "_done"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RANGES, str(out), str(tmp_path / "markers.json")],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        while proc.poll() is None and len(list(done.glob("*.json"))) < 16:
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the phase finished before it could be killed"
    before = {p.name: p.stat().st_mtime_ns for p in done.glob("*.json")}
    assert 16 <= len(before) < 256
    layout = OutputLayout(str(out))
    plan = begin_generation(_cfg(out, ranges=256, shard_rows=500), layout, markers)
    redone = []
    import laionbuild.runner.dedup as D

    original = D.dedup_range
    D.dedup_range = lambda plan, r: redone.append(r) or original(plan, r)
    try:
        ranges = run_ranges(_cfg(out, ranges=256, shard_rows=500), layout, plan, "driver")
    finally:
        D.dedup_range = original
    assert len(ranges) == 256
    assert sorted(redone) == sorted(set(range(256)) - {int(n[1:7]) for n in before})
    assert {p.name: p.stat().st_mtime_ns for p in done.glob("*.json") if p.name in before} == before
    for kind in ("winners", "index"):
        for p in sorted((ref / "dedup" / "g0000").glob(f"{kind}-*.bin")):
            assert (out / "dedup" / "g0000" / p.name).read_bytes() == p.read_bytes(), p.name


@pytest.mark.slow
def test_400k_candidates_fill_cluster_sized_shards(tmp_path):
    """The cluster configs' work-shard size (50,000 rows): shards are >= 80% full on average and
    every unique pair is in exactly one."""
    out = tmp_path / "out"
    pairs = draw_pairs(40, 10_000, 0.8, 21)
    markers = write_inputs(str(out), pairs, "url_text")
    cfg = config_from_dict({"run": {"output": str(out), "work_shard_rows": 50_000, "progress": False},
                            "ray": {"dedup_ranges": 256}})
    layout = OutputLayout(str(out))
    manifest = run_dedup_phase(cfg, layout, markers)
    shards = committed_shards(layout, [manifest])
    unique = len(np.unique(np.concatenate(pairs)))
    assert sum(shards.values()) == manifest["unique"] == unique
    assert max(shards.values()) <= 50_000
    assert sum(shards.values()) / len(shards) >= 0.8 * 50_000
    got = []
    for sid in shards:
        t = pq.read_table(out / "workshards" / f"{sid}.parquet", columns=["TEXT"])
        got += t.column("TEXT").to_pylist()
    assert len(got) == len(set(got)) == unique  # alt text "alt <pair id>" names the pair
    assert manifest["bytes_read"] / manifest["candidates"] <= 32 + 12  # keys in, winners' locators out


@pytest.mark.ray
def test_ray_tasks_write_the_files_of_the_driver_path(ray_session, tmp_path):
    a, b = tmp_path / "driver", tmp_path / "ray"
    markers = write_inputs(str(a), _mixed_inputs(13), "url_text")
    shutil.copytree(a / "candidates", b / "candidates")
    run_dedup_phase(_cfg(a), OutputLayout(str(a)), markers)
    cfg = config_from_dict({"run": {"output": str(b), "work_shard_rows": 100, "progress": False},
                            "ray": {"dedup_ranges": 8, "dedup_group_candidates": 300, "local_max_rows": 0}})
    manifest = run_dedup_phase(cfg, OutputLayout(str(b)), markers)
    assert manifest["engine"] == "ray"
    for p in sorted((a / "dedup" / "g0000").glob("*.bin")):
        assert (b / "dedup" / "g0000" / p.name).read_bytes() == p.read_bytes(), p.name
    assert sorted(_shard_rows(a, OutputLayout(str(a)))) == sorted(_shard_rows(b, OutputLayout(str(b))))
    assert sorted(p.name for p in (a / "workshards").glob("*.parquet")) == \
        sorted(p.name for p in (b / "workshards").glob("*.parquet"))


def test_a_nul_in_a_url_never_makes_two_pairs_one_key(tmp_path):
    """URL + TEXT keys are joined by a NUL: (``a\\x00b``, ``c``) and (``a``, ``b\\x00c``) were one key."""
    urls, texts = ["http://x.test/a\x00b", "http://x.test/a"], ["c", "b\x00c"]
    h1, h2 = K.key_hashes(urls, texts)
    assert len(set(zip(h1.tolist(), h2.tolist()))) == 2
    table = pa.table({"URL": urls, "TEXT": texts, "warc_path": ["w"] * 2, "warc_offset": [1, 2]})
    kept, _ = dedup_rows(table, None, "url_text")
    assert kept.num_rows == 2
    # a URL without NUL keeps the key it always had (earlier generations' indexes stay valid)
    import mmh3

    assert K.key_hashes(["http://x.test/a"], ["t"])[0][0] == mmh3.hash64(b"http://x.test/a\x00t", signed=False)[0]


def test_a_generation_lists_the_key_files_once(tmp_path, monkeypatch):
    """The driver finds the inputs' key files with one listing, not a request per input (an
    object store answers each in tens of ms: 100,000 inputs were an hour of requests)."""
    out = tmp_path / "out"
    markers = write_inputs(str(out), draw_pairs(40, 20, 0.3, 7), "url_text")
    layout = OutputLayout(str(out))
    asked = []
    real_exists = type(layout.fs).exists
    monkeypatch.setattr(type(layout.fs), "exists", lambda self, path, **kw: asked.append(path) or
                        real_exists(self, path, **kw))
    plan = begin_generation(_cfg(out), layout, markers)
    assert plan is not None and len(plan["inputs"]) == 40
    assert sum(p.endswith(".keys") for p in asked) == 0, asked[:3]
