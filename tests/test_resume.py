"""Kill a run mid-way, rerun it, and get exactly the rows of an uninterrupted run.

Also: the same (URL, TEXT) found in several WARC files is published once.
"""

from __future__ import annotations

import json
import mimetypes
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laionbuild.demo.image_server import LoopbackServer
from laionbuild.demo.sample_warc import build_demo_sample

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
N_COPIES = 5
IMAGE_DELAY_S = 0.2


@pytest.fixture(scope="module")
def served_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    with LoopbackServer("127.0.0.1") as server:
        sample = build_demo_sample(str(root / "sample"), image_base=f"http://images.demo.test:{server.port}")
        # every image answers a little slowly, so that the run can be caught half-way
        image_dir = Path(sample.image_dir)
        for f in sorted(image_dir.rglob("*")):
            if f.is_file():
                ctype = mimetypes.guess_type(f.name)[0] or "application/octet-stream"
                server.add("/" + f.relative_to(image_dir).as_posix(), f.read_bytes(), content_type=ctype,
                           delay_s=IMAGE_DELAY_S)
        sample.register(server)
        inputs = root / "inputs"
        inputs.mkdir()
        for i in range(N_COPIES):  # the same pages in several files: global de-dup must merge them
            for j, warc in enumerate(sample.warc_paths):
                shutil.copy(warc, inputs / f"crawl-{i:02d}-{j}.warc.gz")
        yield sample, inputs, server


def _cmd(sample, inputs: Path, out: Path, engine_publish: bool = False) -> list[str]:
    sets = [
        # the publish phase on the Ray engine (a shuffle keyed by hash bucket) or in the driver
        f"output.local_publish_max_rows={0 if engine_publish else 1_000_000}",
        *sample.config_overrides("127.0.0.1"),
        "langid.batch_size=8", "fetch.batch_size=8", "clip.batch_size=8", "ray.write_batch_size=8",
        "fetch.threads=2", "fetch.per_host_concurrency=2",
    ]
    cmd = [sys.executable, "-m", "laionbuild", "run", "--config", str(REPO / "configs" / "smoke.yaml"),
           "--input", str(inputs / "*.warc.gz"), "--output", str(out), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _published(out: Path) -> list[dict]:
    rows = []
    for subset in ("en", "multi", "nolang"):
        for f in sorted((out / subset).glob("*.parquet")):
            for r in pq.read_table(f).to_pylist():
                r["_subset"] = subset
                rows.append(r)
    return sorted(rows, key=lambda r: (r["URL"], r["TEXT"]))


def _env():
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def test_kill_and_resume_gives_identical_rows(served_inputs, tmp_path):
    sample, inputs, _ = served_inputs
    n_inputs = len(list(inputs.glob("*.warc.gz")))

    ref = tmp_path / "ref"
    r = subprocess.run(_cmd(sample, inputs, ref), capture_output=True, text=True, env=_env(), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]

    out = tmp_path / "out"
    proc = subprocess.Popen(_cmd(sample, inputs, out, engine_publish=True), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=_env(), start_new_session=True)
    done_dir = out / "_work" / "done"
    killed_at = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        n_done = len(list(done_dir.glob("*.json"))) if done_dir.is_dir() else 0
        if 1 <= n_done < n_inputs:
            os.killpg(proc.pid, signal.SIGKILL)
            killed_at = n_done
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed_at is not None, "the run finished before it could be interrupted"
    assert not (out / "stats.json").exists()  # an interrupted run never looks complete
    time.sleep(1.0)  # let the killed run's Ray processes go away

    r = subprocess.run(_cmd(sample, inputs, out, engine_publish=True), capture_output=True, text=True, env=_env(),
                       timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["inputs_skipped_as_complete"] >= killed_at

    # the reference published in the driver, the resumed run on the engine: the same rows and files
    assert sorted(p.name for p in (ref / "en").glob("*.parquet")) == sorted(p.name for p in (out / "en").glob("*.parquet"))
    a, b = _published(ref), _published(out)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert abs(x.pop("similarity") - y.pop("similarity")) < 1e-4
        assert x == y
    # no duplicate (URL, TEXT) although every page is in N_COPIES files
    pairs = [(r["URL"], r["TEXT"]) for r in b]
    assert len(pairs) == len(set(pairs))
    # the tie-break keeps the copy found in the smallest WARC path
    first = sorted(str(p) for p in inputs.glob("crawl-00-*.warc.gz"))
    assert {r["warc_path"] for r in b} <= set(first)
    ref_stats = json.loads((ref / "stats.json").read_text())
    assert ref_stats["kept_total"] == len(sample.kept())
    scored_kept = ref_stats["stages"]["clip"]["kept"]
    assert scored_kept % N_COPIES == 0 and scored_kept >= N_COPIES * ref_stats["kept_total"]
    assert ref_stats["stages"]["dedup"]["dropped"] == scored_kept - ref_stats["kept_total"]


def test_resume_with_other_config_is_refused(served_inputs, tmp_path):
    sample, inputs, _ = served_inputs
    out = tmp_path / "o"
    out.mkdir()
    (out / "provenance.json").write_text(json.dumps({"config_hash": "0000", "command": "run"}))
    r = subprocess.run(_cmd(sample, inputs, out), capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 2
    assert "another config" in r.stderr
