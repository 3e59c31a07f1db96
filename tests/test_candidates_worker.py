"""The candidates phase's unit of work, without Ray: one input extracted, numbered, routed, committed."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from conftest_extract import html_page, write_warc
from laionbuild import schema as S
from laionbuild.config import load_config
from laionbuild.output.layout import OutputLayout
from laionbuild.runner.candidates import CandidatesWorker

ALTS = ["a red bicycle leaning on a wall", "the old harbour at sunset", "a bowl of fresh strawberries"]


def _input(tmp_path):
    body = "".join(f"<img src='/i/{i}.jpg' alt='{alt}'>" for i, alt in enumerate(ALTS))
    return write_warc(tmp_path / "in.warc.gz", [{"url": "http://www.example.com/p.html", "html": html_page(body)}])


def test_an_input_is_numbered_routed_and_committed(tmp_path):
    out = tmp_path / "out"
    worker = CandidatesWorker(load_config(None), str(out))
    marker = worker.process(str(_input(tmp_path)), "f0", 5)
    assert marker["file"]["status"] == "ok" and marker["n_candidates"] == 3 and marker["ordinal"] == 5
    layout = OutputLayout(str(out))
    table = pq.read_table(layout.candidates_file("f0"))
    assert table.column(S.SAMPLE_ID).to_pylist() == [5 * S.SAMPLE_ID_STRIDE + i for i in range(3)]
    assert sorted(table.column(S.CANDIDATE_FILE_NAMES[S.ALT_TEXT]).to_pylist()) == sorted(ALTS)
    assert sum(marker["counters"]["langid"]["counts"].get(f"subset:{s}", 0) for s in S.SUBSETS) == 3
    assert json.loads(layout.fs.cat(layout.candidates_marker("f0")))["token"] == marker["token"]


def test_an_input_with_more_candidates_than_its_numbers_fails_unrouted_and_uncommitted(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "SAMPLE_ID_STRIDE", 2)  # two numbers per input: three candidates are too many
    out = tmp_path / "out"
    worker = CandidatesWorker(load_config(None), str(out))
    calls = []
    route = worker.router
    worker.router = lambda batch: calls.append(len(batch[S.ALT_TEXT])) or route(batch)
    marker = worker.process(str(_input(tmp_path)), "f0", 0)
    assert marker["file"]["status"] == "failed" and marker["file"]["reason"] == "too_many_candidates"
    assert marker["n_candidates"] == 3 and "langid" not in marker["counters"]
    assert calls == []  # its rows are not routed
    layout = OutputLayout(str(out))
    assert not layout.fs.exists(layout.candidates_marker("f0"))
    assert not layout.fs.exists(layout.candidates_file("f0"))
