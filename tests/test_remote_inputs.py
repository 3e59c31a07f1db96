"""Inputs read over HTTP from a loopback server: a WARC URL and a Common Crawl style listing."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laionbuild.demo.image_server import LoopbackServer
from laionbuild.demo.sample_warc import build_demo_sample

pytestmark = pytest.mark.ray


def test_extract_reads_warcs_and_listing_over_http(tmp_path):
    sample = build_demo_sample(str(tmp_path / "sample"), image_base="http://images.demo.test:9")
    with LoopbackServer("127.0.0.1") as server:
        rel = []
        for i, warc in enumerate(sample.warc_paths):
            path = f"crawl-data/TEST/segments/1/warc/file-{i}.warc.gz"
            server.add("/" + path, Path(warc).read_bytes(), content_type="application/octet-stream")
            rel.append(path)
        server.add("/crawl-data/TEST/warc.paths.gz", gzip.compress(("\n".join(rel) + "\n").encode()),
                   content_type="application/octet-stream")
        out = tmp_path / "out"
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        r = subprocess.run(
            [sys.executable, "-m", "laionbuild", "extract", f"{server.base_url}/crawl-data/TEST/warc.paths.gz",
             "--output", str(out), "--no-progress", "--set", f"run.paths_base_url={server.base_url}/"],
            capture_output=True, text=True, env=env, timeout=240,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        for path in rel:
            assert server.request_count("/" + path) >= 1
        base = server.base_url
    stats = json.loads((out / "stats.json").read_text())
    assert stats["files"]["total"] == len(rel) and stats["files"]["failed"] == 0
    rows = [row for f in sorted((out / "candidates").glob("*.parquet")) for row in pq.read_table(f).to_pylist()]
    warcs = {row["warc_path"] for row in rows}
    assert warcs == {f"{base}/{p}" for p in rel}
    routed = {(e.url, e.alt_text) for e in sample.expectations if e.subset}
    assert {(row["URL"], row["TEXT"]) for row in rows} == routed  # the published column names
