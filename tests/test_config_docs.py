"""docs/config.md names every config key with its type, default and meaning, and is in sync with the code."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from laionbuild.config import ClipModelConfig, Config
from laionbuild.config_docs import DOC_PATH, SUBSET_PLACEHOLDER, iter_keys, main, render

REPO = Path(__file__).resolve().parents[1]


def _dataclass_keys(cls: type = Config, prefix: str = "") -> set[str]:
    """Every leaf key the loader accepts, walked independently of the generator."""
    out = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out |= _dataclass_keys(tp, f"{prefix}{f.name}.")
        elif ClipModelConfig in typing.get_args(tp):
            out.add(f"{prefix}{f.name}")
            out |= _dataclass_keys(ClipModelConfig, f"{prefix}{f.name}.{SUBSET_PLACEHOLDER}.")
        else:
            out.add(f"{prefix}{f.name}")
    return out


def _yaml_keys(data: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if prefix == "clip.models.":
            dotted = f"clip.models.{SUBSET_PLACEHOLDER}"
        if isinstance(value, dict) and not dotted.endswith(("thresholds", "punsafe_heads", "host_map", "sources")):
            out |= _yaml_keys(value, f"{dotted}.")
        else:
            out.add(dotted)
    return out


def test_docs_config_md_is_in_sync_with_the_code():
    assert DOC_PATH == REPO / "docs" / "config.md"
    assert DOC_PATH.read_text(encoding="utf-8") == render(), "run: python -m laionbuild.config_docs --write"
    assert main(["--check"]) == 0


def test_every_key_is_documented_with_type_default_and_meaning():
    docs = DOC_PATH.read_text(encoding="utf-8")
    documented = {k.key: k for k in iter_keys()}
    assert set(documented) == _dataclass_keys()
    for key, doc in documented.items():
        assert doc.meaning.strip(), f"{key} has no meaning: add a '#:' comment above the field"
        assert doc.type
        assert f"| `{key}` | {doc.type} |" in docs


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_key_of_a_shipped_config_is_documented(name):
    data = yaml.safe_load((REPO / "configs" / name).read_text(encoding="utf-8")) or {}
    documented = {k.key for k in iter_keys()}
    assert _yaml_keys(data) - documented == set()


def test_dead_keys_are_gone():
    documented = {k.key for k in iter_keys()}
    assert "run.log_level" not in documented and "langid.batch_size" not in documented


def test_check_fails_when_the_page_is_stale(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "config.md"
    stale.write_text(render().replace("run.name", "run.nom", 1))
    monkeypatch.setattr("laionbuild.config_docs.DOC_PATH", stale)
    assert main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().err


def test_an_older_output_config_with_retired_keys_still_loads(caplog):
    from laionbuild.config import config_from_dict

    cfg = config_from_dict({"run": {"log_level": "DEBUG", "name": "old"}, "langid": {"batch_size": 512}}, "old.yaml")
    assert cfg.run.name == "old"
    assert "run.log_level, langid.batch_size no longer do anything" in caplog.text
