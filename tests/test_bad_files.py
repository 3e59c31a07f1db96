"""A bad file among the inputs is listed with its reason; the others are processed; exit status 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laionbuild.demo.sample_warc import build_demo_sample

pytestmark = pytest.mark.ray


def test_bad_and_truncated_files_are_reported_and_the_rest_processed(tmp_path):
    sample = build_demo_sample(str(tmp_path / "sample"), image_base="http://images.demo.test:9")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good = Path(sample.warc_paths[0])
    (inputs / "a-good.warc.gz").write_bytes(good.read_bytes())
    (inputs / "b-not-a-warc.warc.gz").write_bytes(b"<html>this is not a WARC file</html>\n" * 50)
    data = Path(sample.warc_paths[1]).read_bytes()
    (inputs / "c-truncated.warc.gz").write_bytes(data[: len(data) * 2 // 3])
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "laionbuild", "extract", str(inputs), "--output", str(out), "--no-progress",
         "--set", "run.file_retries=0"],
        capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, timeout=240,
    )
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    # a clean console: our progress and summary, none of Ray's notices a user cannot act on
    for notice in ("core_worker.cc", "Token authentication", "Progress bars disabled", "RAY_BACKEND_LOG_LEVEL"):
        assert notice not in r.stderr, notice
    assert "files: 3 (1 ok, 1 partial, 1 failed)" in r.stderr
    stats = json.loads((out / "stats.json").read_text())
    files = stats["files"]
    assert files["total"] == 3 and files["ok"] == 1 and files["failed"] == 1 and files["partial"] == 1
    by_name = {Path(d["path"]).name: d for d in files["details"]}
    assert by_name["b-not-a-warc.warc.gz"]["status"] == "failed" and by_name["b-not-a-warc.warc.gz"]["reason"]
    assert by_name["c-truncated.warc.gz"]["status"] == "partial" and by_name["c-truncated.warc.gz"]["reason"]
    assert not (out / "_SUCCESS").exists()
    rows = [row for f in sorted((out / "candidates").glob("*.parquet")) for row in pq.read_table(f).to_pylist()]
    sources = {Path(row["warc_path"]).name for row in rows}
    assert "a-good.warc.gz" in sources  # the good file was processed in full
    assert "b-not-a-warc.warc.gz" not in sources
    from laionbuild.config import ExtractConfig
    from laionbuild.stages.candidates import extract_file

    good_rows = [row for row in rows if row["warc_path"].endswith("a-good.warc.gz")]
    alone = extract_file(str(inputs / "a-good.warc.gz"), ExtractConfig())
    assert len(good_rows) == len(alone.rows) > 0
