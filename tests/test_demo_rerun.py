"""Rerunning the demo starts from a clean folder but keeps what report and compare wrote into it."""

from __future__ import annotations

import pytest

from laionbuild.demo.run import DEMO_MARK, KEPT_ON_RERUN, clear_for_rerun
from laionbuild.errors import SetupError


def test_rerun_keeps_report_and_compare(tmp_path):
    out = tmp_path / "demo-output"
    for name in ("en", "scored/s1", *KEPT_ON_RERUN):
        (out / name).mkdir(parents=True)
        (out / name / "f.txt").write_text("x")
    (out / "stats.json").write_text("{}")
    (out / DEMO_MARK).write_text("")
    clear_for_rerun(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([*KEPT_ON_RERUN, DEMO_MARK, "_lease.lock"])
    assert all((out / name / "f.txt").is_file() for name in KEPT_ON_RERUN)


def test_a_file_in_the_way_is_refused_not_deleted(tmp_path):
    clear_for_rerun(tmp_path / "missing")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SetupError, match="not a folder"):
        clear_for_rerun(f)
    assert f.read_text() == "x"


def test_a_folder_the_demo_did_not_write_is_refused_not_deleted(tmp_path):
    out = tmp_path / "my-run"
    (out / "en").mkdir(parents=True)
    (out / "en" / "part-0.parquet").write_text("x")
    with pytest.raises(SetupError, match="did not write"):
        clear_for_rerun(out)
    assert (out / "en" / "part-0.parquet").read_text() == "x"
    (out / DEMO_MARK).write_text("")
    clear_for_rerun(out)
    assert not (out / "en").exists()


def test_a_folder_a_run_holds_is_refused_not_deleted(tmp_path):
    from laionbuild.output.layout import OutputLayout
    from laionbuild.output.lease import LeaseHeld, RunLease

    out = tmp_path / "demo-output"
    out.mkdir()
    (out / DEMO_MARK).write_text("")
    (out / "stats.json").write_text("{}")
    with RunLease(OutputLayout(str(out)), expiry_s=60.0, heartbeat_s=30.0):
        with pytest.raises(LeaseHeld, match="in use"):
            clear_for_rerun(out)
        assert (out / "stats.json").exists()
    clear_for_rerun(out)
    assert not (out / "stats.json").exists()


def test_a_sample_folder_that_is_not_a_demo_sample_is_refused(tmp_path):
    from laionbuild.demo.run import _check_sample

    mine = tmp_path / "data-sample"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    with pytest.raises(SetupError, match="not a demo sample"):
        _check_sample(mine)
    _check_sample(tmp_path / "missing-sample")
