"""Relative local paths on a cluster: the workers run in the folder `ray start` ran in, not the
driver's. The driver gives them absolute paths (inputs, the output folder, list files), so a run
started from any folder reads and writes where its command line says."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from laionbuild import cli
from laionbuild.config import load_config, with_absolute_paths

pytestmark = pytest.mark.ray


def test_a_run_from_another_folder_than_the_workers_reads_and_writes_its_own(ray_session, tmp_path, monkeypatch):
    from laionbuild.demo.sample_warc import build_demo_sample

    sample = build_demo_sample(str(tmp_path / "sample"))
    here = tmp_path / "here"
    (here / "in").mkdir(parents=True)
    for p in sample.warc_paths:
        shutil.copy(p, here / "in")
    monkeypatch.chdir(here)  # the session's Ray workers were started elsewhere
    assert Path.cwd() != Path(ray_session.get(ray_session.remote(lambda: str(Path.cwd())).remote()))
    code = cli.main(["extract", "in", "--output", "out", "--no-progress"])
    assert code == 0
    stats = json.loads((here / "out" / "stats.json").read_text())
    assert stats["files"]["total"] == stats["files"]["ok"] == len(sample.warc_paths)
    assert stats["kept_total"] > 0 and list((here / "out" / "candidates").glob("*.parquet"))
    config = (here / "out" / "config.yaml").read_text()
    assert "output: out" in config  # recorded as given: a rerun from here resumes


def test_with_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "urls.txt").write_text("https://a.example/x.jpg\n")
    cfg = load_config(None, ["run.output=out", "blocklist.url_files=[lists/urls.txt]"])
    done = with_absolute_paths(cfg)
    assert done.run.output == str(tmp_path / "out")
    assert done.blocklist.url_files == (str(tmp_path / "lists" / "urls.txt"),)
    assert done.clip.models["en"].pretrained == cfg.clip.models["en"].pretrained  # a tag, not a path
    assert with_absolute_paths(load_config(None, ["run.output=s3://b/out"])).run.output == "s3://b/out"
