"""The rows count of a progress line moves as rows finish, before their unit (a work shard) commits."""

from __future__ import annotations

import io

from laionbuild.runner.progress import Progress


def test_rows_show_before_the_first_unit_is_done():
    out = io.StringIO()
    p = Progress(3, True, "phase 3/4 fetch+score", "shard", file=out)
    p.update(rows=250)
    assert "rows=250" in out.getvalue()
    assert "0/3" in out.getvalue()
    p.update(units=1, rows=10)
    p.close()
    last = out.getvalue().rsplit("\r", 1)[-1]
    assert "rows=260" in last and "1/3" in last


def test_disabled_progress_counts_but_draws_nothing():
    out = io.StringIO()
    p = Progress(3, False, "x", "file", file=out)
    p.update(rows=7)
    p.close()
    assert p.rows == 7 and out.getvalue() == ""


# --------------------------------------------------------------------------- rows that stop coming
def _stall_watch(rows_seen, after_s=600, describe=lambda: "the cluster has 1 node(s)"):
    from laionbuild.runner.progress import StallWatch

    state = {"now": 0.0, "said": []}
    watch = StallWatch(lambda: rows_seen[0], after_s, "phase 3/4 fetch+score", describe=describe,
                       emit=state["said"].append, clock=lambda: state["now"])
    return watch, state


def test_a_phase_whose_rows_stop_is_said_once_per_period_and_when_they_come_again():
    rows = [0]
    watch, state = _stall_watch(rows)
    for t, n in [(0, 0), (30, 100), (300, 250), (600, 250), (899, 250)]:   # 599 s without a row: quiet
        state["now"], rows[0] = t, n
        watch.step()
    assert state["said"] == []
    state["now"] = 900                                                     # 600 s without a row
    watch.step()
    [said] = state["said"]
    assert said.startswith("phase 3/4 fetch+score: no row has finished for 600 s (250 rows so far); "
                           "the cluster has 1 node(s)")
    assert "the same command resumes" in said
    for t in (1000, 1200, 1499):                                           # not again within the period
        state["now"] = t
        watch.step()
    assert len(state["said"]) == 1
    state["now"] = 1500
    watch.step()
    assert len(state["said"]) == 2 and "for 1200 s" in state["said"][1]
    state["now"], rows[0] = 1510, 251
    watch.step()
    assert state["said"][2] == "phase 3/4 fetch+score: rows come again after 1210 s (251 rows so far)"
    state["now"] = 1600
    watch.step()
    assert len(state["said"]) == 3 and watch.warnings == 2


def test_a_stall_warning_goes_out_when_the_cluster_cannot_be_described():
    def broken():
        raise RuntimeError("GCS busy")

    rows = [7]
    watch, state = _stall_watch(rows, after_s=10, describe=broken)
    watch.step()
    state["now"] = 10
    watch.step()
    assert state["said"] == ["phase 3/4 fetch+score: no row has finished for 10 s (7 rows so far); the phase goes on: "
                             "Ctrl-C stops it, the same command resumes"]


def test_the_stall_watch_thread_runs_and_stops_and_zero_turns_it_off():
    import threading

    from laionbuild.runner.progress import StallWatch

    seen = threading.Semaphore(0)

    def rows():
        seen.release()
        return 0

    with StallWatch(rows, 3600, "phase", check_s=0.01) as watch:
        for _ in range(3):
            assert seen.acquire(timeout=30)
    assert not watch._thread.is_alive() and watch.warnings == 0
    with StallWatch(rows, 0, "phase") as off:
        assert off._thread is None
