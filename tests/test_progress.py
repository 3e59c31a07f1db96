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
