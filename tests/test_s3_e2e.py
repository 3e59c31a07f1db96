"""End to end on a loopback S3 server: inputs as an ``s3://`` glob, model cache and output on ``s3://``.

A full run killed once its de-dup generation is committed, its resume (which takes over the
killed run's lease after expiry) while a second copy of the command is refused, an
incremental add, ``report``, ``compare`` and ``remove`` -- all through the CLI, as a user
runs them. The server counts its requests; each command's counts are printed by phase
(object prefix) and bounded: requests per work shard by a constant, listings by the number
of folders, no copy of a published file.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laionbuild.demo.image_server import LoopbackServer
from laionbuild.demo.sample_warc import build_demo_sample
from helpers.processes import stop_processes
from s3_loopback import LoopbackS3, s3_environment

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BUCKET = "lbe2e"
OUT = f"s3://{BUCKET}/out"
#: small work shards, so that the demo sample makes several units of commit
WORK_SHARD_ROWS = 8
#: requests on the objects of one work shard (its work file, parts, marker) in one run
MAX_REQUESTS_PER_SHARD = 40
LEASE = ["--set", "run.lease_expiry_s=4", "--set", "run.lease_heartbeat_s=1"]


def _phase(key: str) -> str:
    """The phase an object belongs to, from its key (``out/<folder>/...``)."""
    parts = key.split("/")
    if parts[0] != "out":
        return parts[0]  # inputs, models, reference
    folder = parts[1] if len(parts) > 2 else "root"
    return {"candidates": "1-candidates", "workshards": "2-dedup", "scored": "3-score"}.get(
        folder, "root" if folder == "root" else "4-publish")


def _by_phase(keys: Counter) -> dict[str, Counter]:
    out: dict[str, Counter] = {}
    for (kind, key), n in keys.items():
        out.setdefault(_phase(key), Counter())[kind] += n
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def _per_shard(keys: Counter) -> Counter:
    per: Counter = Counter()
    for (_, key), n in keys.items():
        m = re.match(r"out/(?:workshards|scored(?:/_done)?)/(g\d{4}-[^/.]+)", key)
        if m:
            per[m.group(1)] += n
    return per


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3e2e")
    with LoopbackS3() as s3, s3_environment(s3), LoopbackServer("127.0.0.1") as images:
        s3.client().create_bucket(Bucket=BUCKET)
        sample = build_demo_sample(str(root / "sample"), image_base=f"http://images.demo.test:{images.port}")
        sample.register(images)
        fs = s3.filesystem()
        first, more = sample.warc_paths[0], sample.warc_paths[1:]
        fs.put(first, f"{BUCKET}/warc/a/{Path(first).name}")
        for w in more:
            fs.put(w, f"{BUCKET}/warc/b/{Path(w).name}")
        yield s3, images, sample, root


def _cmd(sample, *args: str) -> list[str]:
    cmd = [sys.executable, "-m", "laionbuild", *args]
    if args[0] == "run":
        cmd += ["--config", str(REPO / "configs" / "smoke.yaml"), "--output", OUT, "--no-progress", "--local",
                "--set", f"models.cache=s3://{BUCKET}/models", "--set", f"run.work_shard_rows={WORK_SHARD_ROWS}",
                *LEASE]
        for s in sample.config_overrides("127.0.0.1"):
            cmd += ["--set", s]
    return cmd


def _env() -> dict[str, str]:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def _take(s3, label: str) -> Counter:
    keys = s3.keys()
    kinds = s3.take()
    print(f"\n[{label}] requests {sum(kinds.values())}: {dict(sorted(kinds.items()))}")
    for phase, counts in _by_phase(keys).items():
        print(f"  {phase:12s} {counts}")
    return keys


def _committed_fates(layout: OutputLayout) -> list[tuple[str, str]]:
    pairs = []
    for path in layout.fate_files():
        with layout.fs.open(path, "rb") as fh:
            t = pq.read_table(fh, columns=["URL", "TEXT"])
        pairs += list(zip(t.column("URL").to_pylist(), t.column("TEXT").to_pylist()))
    return pairs


def _published(layout: OutputLayout) -> dict[str, set]:
    out = {}
    pointer = layout.published()
    for subset in ("en", "multi", "nolang"):
        rows = set()
        for path in layout.published_files(subset, pointer=pointer):
            with layout.fs.open(path, "rb") as fh:
                t = pq.read_table(fh, columns=["URL", "TEXT"])
            rows |= set(zip(t.column("URL").to_pylist(), t.column("TEXT").to_pylist()))
        out[subset] = rows
    return out


def test_s3_end_to_end(world, tmp_path):
    s3, images, sample, root = world
    layout = s3.layout(OUT)  # the test's own reads are not counted
    first_glob = f"s3://{BUCKET}/warc/a/*.warc.gz"

    # a glob that matches nothing: one line, exit 2
    r = subprocess.run(_cmd(sample, "run", "--input", f"s3://{BUCKET}/warc/none/*.warc.gz"), capture_output=True,
                       text=True, env=_env(), timeout=300)
    assert r.returncode == 2 and "matches no file" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    keys = _take(s3, "a glob matching nothing")
    written = {key for kind, key in keys if kind in ("put", "delete", "copy", "multipart")}
    assert written <= {"out/_lease.json"}  # nothing written but the lease, taken and given back

    # 1. a full run, killed once the de-dup phase is committed (before any work shard is)
    log_path = tmp_path / "killed-run.log"
    ray_tmp = tempfile.mkdtemp(prefix="lbk", dir="/tmp")  # the killed run's Ray, found by its folder
    with open(log_path, "w") as log_file:  # a file, not a pipe: a full pipe would stall the run
        proc = subprocess.Popen(_cmd(sample, "run", "--input", first_glob), stdout=subprocess.DEVNULL,
                                stderr=log_file, text=True, env={**_env(), "RAY_TMPDIR": ray_tmp})
        killed = False
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if any(p.endswith(".json") for p in layout.ls(layout.path("workshards"))):
                proc.kill()
                killed = True
                break
            time.sleep(0.2)
        proc.wait()
    stop_processes(ray_tmp)  # the rest of its Ray, which can outlive the driver by seconds
    shutil.rmtree(ray_tmp, ignore_errors=True)
    print(log_path.read_text()[-2000:])
    _take(s3, "run, killed after the de-dup commit")
    assert killed, "the run ended before the de-dup phase committed"

    # 2. the resume takes over the dead run's lease after its expiry; a second copy is refused
    time.sleep(5)
    resume = subprocess.Popen(_cmd(sample, "run", "--input", first_glob), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 120
    while not (layout.exists(layout.path("_lease.json")) and
               json.loads(layout.fs.cat_file(layout.path("_lease.json"))).get("pid") == resume.pid):
        assert time.monotonic() < deadline and resume.poll() is None, resume.stderr.read()[-3000:]
        time.sleep(0.2)
    twin = subprocess.run(_cmd(sample, "run", "--input", first_glob), capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert twin.returncode == 2, twin.stderr[-3000:]
    line = twin.stderr.strip()  # refused before anything else is logged
    assert len(line.splitlines()) == 1 and f"PID {resume.pid}" in line and "host" in line and "started" in line
    _, err = resume.communicate(timeout=600)
    assert resume.returncode == 0, err[-3000:]
    keys = _take(s3, "resume (+ a refused second run)")
    per_shard = _per_shard(keys)
    print(f"  requests per work shard: max {max(per_shard.values())}, shards {len(per_shard)}")
    assert per_shard and max(per_shard.values()) <= MAX_REQUESTS_PER_SHARD
    assert not any(kind == "copy" for kind, _ in keys)  # publish copies nothing (no mv)
    fates = _committed_fates(layout)
    assert len(fates) == len(set(fates)) > 0  # every row once
    after_first = _published(layout)
    stats = json.loads(layout.fs.cat_file(layout.path("stats.json")))
    assert {s: len(v) for s, v in after_first.items()} == {s: stats["kept_per_subset"][s] for s in after_first}

    # 3. an incremental add, with a second copy refused: no image fetched twice
    images.reset_counts()
    add_cmd = _cmd(sample, "run", "--input", first_glob, "--input", f"s3://{BUCKET}/warc/b/*.warc.gz")
    add = subprocess.Popen(add_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 120
    while not (layout.exists(layout.path("_lease.json")) and
               json.loads(layout.fs.cat_file(layout.path("_lease.json"))).get("pid") == add.pid):
        assert time.monotonic() < deadline and add.poll() is None, add.stderr.read()[-3000:]
        time.sleep(0.2)
    twin = subprocess.run(add_cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert twin.returncode == 2 and len(twin.stderr.strip().splitlines()) == 1
    _, err = add.communicate(timeout=600)
    assert add.returncode == 0, err[-3000:]
    keys = _take(s3, "incremental add (+ a refused second run)")
    assert max(_per_shard(keys).values()) <= MAX_REQUESTS_PER_SHARD
    fetched = Counter({p: images.request_count(p) for p in {urlsplit(e.url).path for e in sample.expectations}})
    assert sum(fetched.values()) >= 1 and max(fetched.values()) <= 1
    fates = _committed_fates(layout)
    assert len(fates) == len(set(fates))
    published = _published(layout)
    want = {s: {(e.url, e.alt_text) for e in sample.kept(s)} for s in published}
    assert published == want
    assert all(after_first[s] <= published[s] for s in published)

    # 4. report, 5. compare (a reference on S3), 6. remove
    r = subprocess.run(_cmd(sample, "report", OUT), capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(layout.fs.cat_file(layout.path("report", "summary.json")))
    assert summary["shard_rows"] == {s: len(v) for s, v in published.items()}
    _take(s3, "report")
    en = sorted(published["en"])
    ref = pa.table({"URL": [u for u, _ in en], "TEXT": [t for _, t in en],
                    "similarity": pa.array([0.5] * len(en), pa.float32())})
    buf = io.BytesIO()
    pq.write_table(ref, buf)
    s3.filesystem().pipe(f"{BUCKET}/ref/laion2B-en/part-00000.parquet", buf.getvalue())
    r = subprocess.run(_cmd(sample, "compare", OUT, "--reference", f"s3://{BUCKET}/ref/*/*.parquet"),
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _take(s3, "compare")
    takedown = tmp_path / "takedown.txt"
    takedown.write_text(en[0][0] + "\n")
    r = subprocess.run(_cmd(sample, "remove", OUT, "--urls", str(takedown)), capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _take(s3, "remove")
    assert _published(layout)["en"] == published["en"] - {en[0]}
