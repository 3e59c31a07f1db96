"""Killed runs lose at most the work units in flight; reruns and grown crawls redo nothing.

On a synthetic crawl of a few dozen WARC files (pages re-crawled across files,
images on a slow loopback host):

* a run killed with SIGKILL at 70% of a full run's wall time and started again
  fetches at most half the images again, takes less time than a full run (the
  ratio is printed) and ends with exactly the uninterrupted rows;
* no image URL is requested twice, and the rows scored are the unique candidates;
* new input files added to a finished output fetch only their new pairs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laionbuild.demo.crawl import build_crawl
from laionbuild.demo.image_server import LoopbackServer

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
N_FILES = 24
IMAGE_DELAY_S = 0.14


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    root = tmp_path_factory.mktemp("crawl")
    with LoopbackServer("127.0.0.1") as server:
        base = f"http://images.crawl.test:{server.port}"
        first = build_crawl(str(root / "inputs"), n_files=N_FILES, image_base=base)
        more = build_crawl(str(root / "more"), n_files=4, image_base=base, first_file=N_FILES)
        first.register(server, delay_s=IMAGE_DELAY_S)
        more.register(server, delay_s=IMAGE_DELAY_S)
        yield first, more, root, server


def _cmd(crawl, inputs: list[str], out: Path) -> list[str]:
    sets = [*crawl.config_overrides("127.0.0.1"), "run.work_shard_rows=100", "ray.stream_rows=50",
            "fetch.batch_size=25", "clip.batch_size=50", "fetch.threads=4", "fetch.per_host_concurrency=4"]
    cmd = [sys.executable, "-m", "laionbuild", "run", "--config", str(REPO / "configs" / "smoke.yaml"),
           "--output", str(out), "--no-progress"]
    for path in inputs:
        cmd += ["--input", path]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _env():
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def _run(cmd) -> float:
    t = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return time.monotonic() - t


def _published(out: Path) -> list[dict]:
    rows = []
    for subset in ("en", "multi", "nolang"):
        for f in sorted((out / subset).glob("*.parquet")):
            for r in pq.read_table(f).to_pylist():
                r["_subset"] = subset
                rows.append(r)
    return sorted(rows, key=lambda r: (r["URL"], r["TEXT"]))


def _same_rows(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        x, y = dict(x), dict(y)
        assert abs(x.pop("similarity") - y.pop("similarity")) < 1e-4  # batch shape may change the last bits
        assert x == y


@pytest.fixture(scope="module")
def reference(crawl, tmp_path_factory):
    first, _, root, server = crawl
    out = tmp_path_factory.mktemp("ref") / "out"
    server.reset_counts()
    wall = _run(_cmd(first, [str(root / "inputs")], out))
    requests = {p: server.request_count(p) for p in first.images}
    return out, wall, requests


def test_each_image_fetched_once_and_rows_scored_are_unique_candidates(crawl, reference):
    first, _, _, _ = crawl
    out, _, requests = reference
    assert max(requests.values()) == 1, "an image URL was requested twice"
    assert sum(requests.values()) == len(first.pairs)
    stats = json.loads((out / "stats.json").read_text())
    st = stats["stages"]
    assert st["extract"]["kept"] > len(first.pairs)  # re-crawled pages give duplicates ...
    assert st["dedup"]["kept"] == len(first.pairs)  # ... removed before download
    assert st["fetch"]["counts"]["rows"] == st["dedup"]["kept"]
    assert st["dedup"]["dropped_by_reason"]["duplicate"] == st["extract"]["kept"] - len(first.pairs)
    assert stats["work_shards"]["total"] >= 10


@pytest.fixture(scope="module")
def resumed(crawl, reference, tmp_path_factory):
    """A run killed with SIGKILL at 70% of the reference run's wall time, then run again."""
    first, _, root, _ = crawl
    _, full_wall, _ = reference
    out = tmp_path_factory.mktemp("killed") / "out"
    cmd = _cmd(first, [str(root / "inputs")], out)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
                            start_new_session=True)
    try:
        proc.wait(timeout=0.7 * full_wall)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    killed = proc.returncode == -signal.SIGKILL
    complete_at_kill = (out / "stats.json").exists()
    done = len(list((out / "scored" / "_done").glob("*.json")))
    time.sleep(1.0)  # let the killed run's Ray processes go away
    server = crawl[3]
    server.reset_counts()
    rerun_wall = _run(cmd)
    rerun_requests = sum(server.request_count(p) for p in first.images)
    return {"out": out, "killed": killed, "complete_at_kill": complete_at_kill, "done_at_kill": done,
            "rerun_wall": rerun_wall, "rerun_requests": rerun_requests}


def test_killed_at_70_percent_reruns_half_the_work_with_identical_rows(crawl, reference, resumed):
    ref_out, full_wall, _ = reference
    r = resumed
    out = r["out"]
    assert r["killed"], "the run finished before 70% of a full run's time"
    assert not r["complete_at_kill"]  # an interrupted run never looks complete
    assert r["done_at_kill"] >= 1, "no work shard was committed before the kill"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["work_shards"]["skipped_as_complete"] == r["done_at_kill"]
    assert stats["inputs_skipped_as_complete"] == N_FILES
    _same_rows(_published(ref_out), _published(out))
    assert sorted(p.name for p in (ref_out / "en").glob("*.parquet")) == \
        sorted(p.name for p in (out / "en").glob("*.parquet"))
    print(f"full run {full_wall:.1f} s, rerun after the kill {r['rerun_wall']:.1f} s "
          f"({r['rerun_wall'] / full_wall:.2f}x), shards committed before the kill: {r['done_at_kill']}, "
          f"images fetched again: {r['rerun_requests']} of {len(crawl[0].pairs)}")
    # the rerun redoes at most half the work (the images it fetches: the committed shards are not
    # fetched again), and takes less time than a full run; its wall time against a full run's also
    # carries ~45 s of fixed start-up per process on this machine, so it is reported, not bounded at 0.5
    assert r["rerun_requests"] <= 0.5 * len(crawl[0].pairs), r
    assert r["rerun_wall"] < full_wall, (r["rerun_wall"], full_wall)


def test_new_inputs_fetch_only_new_pairs(crawl, reference, resumed):
    first, more, root, server = crawl
    ref_out, _, _ = reference
    out = resumed["out"]  # a finished output
    server.reset_counts()
    _run(_cmd(first, [str(root / "inputs"), str(root / "more")], out))
    new_pairs = more.pairs - first.pairs
    assert new_pairs and more.pairs & first.pairs  # the new files re-crawl some old pages too
    fetched = {p for p in {**first.images, **more.images} if server.request_count(p)}
    assert fetched == {"/" + u.split("/", 3)[3] for u, _ in new_pairs}
    assert all(server.request_count(p) == 1 for p in fetched)
    old = {(r["URL"], r["TEXT"]) for r in _published(ref_out)}
    now = {(r["URL"], r["TEXT"]) for r in _published(out)}
    assert old < now and (now - old) <= new_pairs
    manifests = sorted((out / "workshards").glob("_manifest-*.json"))
    assert len(manifests) == 2
    assert json.loads(manifests[1].read_text())["unique"] == len(new_pairs)


def test_resume_with_other_config_is_refused(crawl, tmp_path):
    first, _, root, _ = crawl
    out = tmp_path / "o"
    out.mkdir()
    (out / "provenance.json").write_text(json.dumps({"config_hash": "0000", "command": "run"}))
    r = subprocess.run(_cmd(first, [str(root / "inputs")], out), capture_output=True, text=True, env=_env(),
                       timeout=120)
    assert r.returncode == 2
    assert "another config" in r.stderr
