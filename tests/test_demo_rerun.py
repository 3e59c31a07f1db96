"""Rerunning the demo starts from a clean folder but keeps what report and compare wrote into it."""

from __future__ import annotations

import pytest

from laionbuild.demo.run import KEPT_ON_RERUN, clear_for_rerun
from laionbuild.errors import SetupError


def test_rerun_keeps_report_and_compare(tmp_path):
    out = tmp_path / "demo-output"
    for name in ("en", "scored/s1", *KEPT_ON_RERUN):
        (out / name).mkdir(parents=True)
        (out / name / "f.txt").write_text("x")
    (out / "stats.json").write_text("{}")
    clear_for_rerun(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(KEPT_ON_RERUN)
    assert all((out / name / "f.txt").is_file() for name in KEPT_ON_RERUN)


def test_a_file_in_the_way_is_refused_not_deleted(tmp_path):
    clear_for_rerun(tmp_path / "missing")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SetupError, match="not a folder"):
        clear_for_rerun(f)
    assert f.read_text() == "x"
