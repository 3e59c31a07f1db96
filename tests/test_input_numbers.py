"""Each input of an output folder keeps the number it got when a run first planned it (its rows'
``SAMPLE_ID``): a run killed before the input was committed gives it the same number on rerun."""

from __future__ import annotations

from laionbuild.output.layout import OutputLayout
from laionbuild.runner.candidates import number_inputs


def test_an_input_keeps_its_number_through_a_kill_before_its_commit(tmp_path):
    layout = OutputLayout(str(tmp_path / "out"))
    pending = {"fa": "/w/a.warc.gz", "fb": "/w/b.warc.gz", "fc": "/w/c.warc.gz"}
    assert number_inputs(layout, pending, []) == {"fa": 0, "fb": 1, "fc": 2}
    # killed: b and c were committed, a (a slow input) was not; the rerun has a alone to do
    markers = [{"file_id": "fb", "ordinal": 1}, {"file_id": "fc", "ordinal": 2}]
    assert number_inputs(layout, {"fa": "/w/a.warc.gz"}, markers) == {"fa": 0}
    # a later run adds inputs: numbered after every number given, in its order
    more = {"fd": "/w/d.warc.gz", "fa": "/w/a.warc.gz"}
    assert number_inputs(layout, more, markers) == {"fd": 3, "fa": 0}


def test_folders_made_before_numbers_were_written_down_continue_after_their_markers(tmp_path):
    layout = OutputLayout(str(tmp_path / "out"))
    markers = [{"file_id": "fx", "ordinal": 0}, {"file_id": "fy", "ordinal": 4}, {"file_id": "old"}]
    assert number_inputs(layout, {"fz": "/w/z.warc.gz"}, markers) == {"fz": 5}
    assert layout.input_numbers() == {"fz": 5}
