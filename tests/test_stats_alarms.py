"""A run whose every download (or every input file) failed says so in one plain line."""

from __future__ import annotations

from laionbuild.stats import FileResult, RunStats, StageCounters


def _stats(fetch: StageCounters | None, files=("ok",)) -> RunStats:
    s = RunStats()
    for i, status in enumerate(files):
        s.files.append(FileResult(path=f"f{i}.warc.gz", status=status, reason="" if status == "ok" else "not_warc"))
    if fetch is not None:
        s.stages["fetch"] = fetch
    return s


def _fetch(kept: int, **dropped: int) -> StageCounters:
    c = StageCounters(kept=kept)
    for reason, n in dropped.items():
        c.drop(reason, n)
    c.count("attempted", kept + sum(dropped.values()))
    return c


def test_all_downloads_failed_with_one_reason():
    assert _stats(_fetch(0, dns_error=13)).alarm_lines() == ["all 13 downloads failed: dns_error"]


def test_all_downloads_failed_with_several_reasons_most_frequent_first():
    line = _stats(_fetch(0, timeout=4, dns_error=9)).alarm_lines()[0]
    assert line == "all 13 downloads failed: dns_error 9, timeout 4"


def test_some_downloads_kept_is_no_alarm():
    assert _stats(_fetch(1, dns_error=12)).alarm_lines() == []
    assert _stats(None).alarm_lines() == []


def test_all_input_files_failed():
    lines = _stats(None, files=("failed", "failed")).alarm_lines()
    assert lines == ["all 2 input file(s) failed: not_warc"]


def test_extract_summary_says_candidates_not_kept_pairs():
    s = _stats(None)
    s.kept_per_subset["en"] = 4
    assert s.summary_lines()[-1] == "kept pairs: 4 (en=4, multi=0, nolang=0)"
    assert s.summary_lines(kept_label="candidates per subset")[-1] == "candidates per subset: 4 (en=4, multi=0, nolang=0)"
