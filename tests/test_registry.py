"""The stage registry: every consumer covers every stage, and no second list of stages exists."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import laionbuild
from laionbuild import compare, report, stats
from laionbuild import schema as S
from laionbuild.config import load_config
from laionbuild.runner import nodes, run, score
from laionbuild.stages import registry

PACKAGE = Path(laionbuild.__file__).parent
#: literals whose keys merely share names with stages: compare's categories of missing pairs
NOT_STAGE_LISTS = {("compare.py", "CATEGORIES")}


def test_registry_is_well_formed():
    names = [s.name for s in registry.STAGES]
    assert len(names) == len(set(names)) and names[0] == "extract"
    assert [s.phase for s in registry.STAGES] == sorted((s.phase for s in registry.STAGES),
                                                       key=registry.PHASES.index)  # phases in run order
    cfg = load_config(None, [])
    for spec in registry.STAGES:
        assert spec.label and spec.resources in registry.RESOURCES
        assert spec.category in compare.CATEGORIES
        for key in (spec.batch_size, spec.enabled, *spec.models, *spec.lists):
            if key:
                registry.config_value(cfg, key)  # every config key it names exists
        for attr in ("counters", "check", "check_node"):
            if getattr(spec, attr):
                assert callable(spec.function(attr)), (spec.name, attr)
        if spec.phase == "score":
            assert spec.function("counters") is not None  # stats.json gets its counters from the batches


def test_every_consumer_covers_every_stage():
    assert stats.STAGES == registry.NAMES
    assert list(stats.RunStats().stages) == list(registry.NAMES)
    assert set(report.STAGE_LABELS) == set(registry.NAMES)
    assert score.STAGES == tuple(s.name for s in registry.STAGES if s.phase == "score")
    for spec in registry.STAGES:
        assert compare.drop_category(f"{spec.name}:anything") == spec.category
    assert compare.drop_category("clip:below_threshold") == "threshold"
    assert compare.drop_category("clip:bad_image") == "fetch"


def _scored_batch() -> dict[str, np.ndarray]:
    n = 5
    return {
        S.DROP_REASON: np.array(["", "blocklist:urls", "fetch:timeout", "clip:below_threshold",
                                 "laion_filter:animal"], dtype=object),
        S.STATUS: np.array(["success", "skipped", "timeout", "success", "success"], dtype=object),
        S.SUBSET: np.array(["en"] * n, dtype=object),
        S.SIMILARITY: np.array([0.4, np.nan, np.nan, 0.1, 0.5], dtype=np.float32),
    }


def test_stage_counters_cover_the_score_phase():
    counters = score.stage_counters(_scored_batch())
    assert list(counters) == list(score.STAGES)
    assert counters["blocklist"].dropped_by_reason == {"urls": 1}
    assert counters["fetch"].dropped_by_reason == {"timeout": 1}
    assert counters["laion_filter"].dropped_by_reason == {"animal": 1}
    off = load_config(None, ["safety.laion_filter.enabled=false"])
    assert "laion_filter" not in score.stage_counters(_scored_batch(), off)  # a stage that is off reports nothing


def test_preflight_and_node_check_ask_every_stage(monkeypatch):
    cfg = load_config(None, [])
    asked: list[tuple[str, str]] = []

    def spy(spec, attr):
        def check(c):
            asked.append((spec.name, attr))
        return check

    def function(self, attr):
        return spy(self, attr) if getattr(self, attr) else None

    monkeypatch.setattr(registry.StageSpec, "function", function)
    monkeypatch.setattr(run, "expand_inputs", lambda inputs, run_cfg: ["x.warc.gz"])
    run.preflight(cfg, need_clip=True)
    assert asked == [(s.name, "check") for s in registry.STAGES if s.check]
    asked.clear()
    run.preflight(cfg, need_clip=False)
    assert asked == [(s.name, "check") for s in registry.STAGES if s.check and s.resources != "gpu"]

    import laionbuild.models as models

    monkeypatch.setattr(models, "localize_files", lambda c: {"copied": []})
    monkeypatch.setattr(models, "local_config", lambda c: c)
    asked.clear()
    out = nodes.check_node(cfg, load_clip=True)
    assert out["error"] == ""
    assert asked == [(s.name, "check_node") for s in registry.STAGES if s.check_node]
    asked.clear()
    nodes.check_node(cfg, load_clip=False)
    assert asked == [(s.name, "check_node") for s in registry.STAGES if s.check_node and s.resources != "gpu"]


def test_provenance_describes_every_stage():
    cfg = load_config(None, [])
    described = [spec.describe(cfg) for spec in registry.STAGES]
    assert [d["name"] for d in described] == list(registry.NAMES)
    fetch = described[registry.NAMES.index("fetch")]
    assert fetch["batch_size"] == cfg.fetch.batch_size and fetch["resources"] == "cpu"
    clip = described[registry.NAMES.index("clip")]
    assert clip["resources"] == "gpu" and set(clip["models"]["clip.models"]) == set(cfg.clip.models)


def _literal_strings(node: ast.AST) -> set[str]:
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        items = node.elts
    elif isinstance(node, ast.Dict):
        items = [k for k in node.keys if k is not None]
    else:
        return set()
    return {i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)}


@pytest.mark.parametrize("path", sorted(p for p in PACKAGE.rglob("*.py") if p.name != "registry.py"),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_second_list_of_stages(path):
    """No tuple, list, set or dict literal outside the registry names three stages or more."""
    names = set(registry.NAMES)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    exempt = {id(node.value) for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
              and any(isinstance(t, ast.Name) and (path.name, t.id) in NOT_STAGE_LISTS
                      for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))}
    for node in ast.walk(tree):
        if id(node) in exempt:
            continue
        found = _literal_strings(node) & names
        assert len(found) < 3, f"{path.name}:{node.lineno} lists stages {sorted(found)}: derive it from the registry"
