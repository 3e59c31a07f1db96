"""Resuming into a folder made with another config: refused with the settings that changed named;
``--force`` records the earlier config; a change no output can take is refused even then."""

from __future__ import annotations

import json

import pytest

from laionbuild.config import load_config
from laionbuild.errors import SetupError
from laionbuild.output.layout import OutputLayout
from laionbuild.runner.run import prepare_output


def _cfg(out, *overrides):
    return load_config(None, list(overrides), [f"run.output={out}", "run.inputs=[x.warc.gz]"])


def test_a_changed_config_is_named_refused_and_recorded_when_forced(tmp_path):
    out = str(tmp_path / "out")
    prepare_output(_cfg(out), OutputLayout(out), ["x"], "extract")
    with pytest.raises(SetupError, match=r"changed: langid\.threshold \(0\.25 -> 0\.6\)") as err:
        prepare_output(_cfg(out, "langid.threshold=0.6"), OutputLayout(out), ["x"], "extract")
    assert "\n" not in str(err.value)
    # forced: the run goes on, the earlier config is kept beside the new one
    prepare_output(_cfg(out, "langid.threshold=0.6", "run.force=true"), OutputLayout(out), ["x"], "extract")
    prov = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert prov["config"]["langid"]["threshold"] == 0.6
    assert [c["config"]["langid"]["threshold"] for c in prov["earlier_configs"]] == [0.25]
    # a second forced change keeps both earlier configs
    prepare_output(_cfg(out, "langid.threshold=0.7", "run.force=true"), OutputLayout(out), ["x"], "extract")
    prov = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert [c["config"]["langid"]["threshold"] for c in prov["earlier_configs"]] == [0.25, 0.6]
    # execution-only settings are no change at all
    prepare_output(_cfg(out, "langid.threshold=0.7", "ray.local_max_rows=5"), OutputLayout(out), ["x"], "extract")


def test_the_dedup_key_cannot_change_even_forced(tmp_path):
    out = str(tmp_path / "out")
    prepare_output(_cfg(out), OutputLayout(out), ["x"], "extract")
    with pytest.raises(SetupError, match=r"another run\.dedup_key.*not even with --force"):
        prepare_output(_cfg(out, "run.dedup_key=url", "run.force=true"), OutputLayout(out), ["x"], "extract")


def test_settings_added_since_at_their_defaults_are_no_change(tmp_path):
    """A folder made before laionbuild gained a setting resumes without --force when the run
    leaves that setting at its default; a value other than the default is a change."""
    out = str(tmp_path / "out")
    prepare_output(_cfg(out), OutputLayout(out), ["x"], "extract")
    prov_path = tmp_path / "out" / "provenance.json"
    prov = json.loads(prov_path.read_text())
    del prov["config"]["fetch"]["max_retry_after_s"]  # as written by a version without that setting
    prov["config_hash"] = "0123456789abcdef"
    prov_path.write_text(json.dumps(prov))
    prepare_output(_cfg(out), OutputLayout(out), ["x"], "extract")
    assert json.loads(prov_path.read_text())["config"]["fetch"]["max_retry_after_s"] == 30.0
    prov = json.loads(prov_path.read_text())
    del prov["config"]["fetch"]["max_retry_after_s"]
    prov["config_hash"] = "0123456789abcdef"
    prov_path.write_text(json.dumps(prov))
    with pytest.raises(SetupError, match=r"fetch\.max_retry_after_s \(null -> 5\.0\)"):
        prepare_output(_cfg(out, "fetch.max_retry_after_s=5"), OutputLayout(out), ["x"], "extract")


def test_inputs_committed_under_relative_names_keep_their_ids(tmp_path, monkeypatch):
    """Earlier versions named a glob's files as given (relative); a resume from the same folder
    finds them committed under those names instead of extracting them again."""
    from laionbuild.inputs import file_id
    from laionbuild.runner.run import _ids_of_earlier_versions

    monkeypatch.chdir(tmp_path)
    (tmp_path / "crawl").mkdir()
    a, b = str(tmp_path / "crawl" / "a.warc.gz"), str(tmp_path / "crawl" / "b.warc.gz")
    old_a = file_id("crawl/a.warc.gz")
    on_disk = {old_a: {"path": "crawl/a.warc.gz"}, file_id("/elsewhere/b.warc.gz"): {"path": "/elsewhere/b.warc.gz"}}
    fids = _ids_of_earlier_versions({file_id(a): a, file_id(b): b}, on_disk)
    assert fids == {old_a: a, file_id(b): b}
    assert _ids_of_earlier_versions({file_id(a): a}, {}) == {file_id(a): a}
