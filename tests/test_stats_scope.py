"""stats.json describes the whole output folder: after two --shard slices into one folder, the
inputs and the extraction counts are those of both, as the later phases' counts are."""

from __future__ import annotations

import json

import pytest

from laionbuild import cli

pytestmark = pytest.mark.ray


def test_slices_into_one_folder_count_every_input(ray_session, tmp_path):
    from laionbuild.demo.sample_warc import build_demo_sample

    sample = build_demo_sample(str(tmp_path / "sample"))
    assert len(sample.warc_paths) >= 2
    out = tmp_path / "out"
    per_slice = []
    for i in range(2):
        code = cli.main(["extract", *sample.warc_paths, "--output", str(out), "--shard", f"{i}/2", "--no-progress"])
        assert code == 0
        stats = json.loads((out / "stats.json").read_text())
        per_slice.append(stats)
    first, both = per_slice
    assert both["inputs_this_run"] == len(sample.warc_paths[1::2])
    assert first["files"]["total"] == len(sample.warc_paths[0::2])
    assert both["files"]["total"] == both["files"]["ok"] == len(sample.warc_paths)
    assert both["stages"]["extract"]["kept"] > first["stages"]["extract"]["kept"] > 0
    assert both["kept_total"] > first["kept_total"] > 0
