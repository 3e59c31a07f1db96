"""The stages of a run, in the order rows meet them: the one list every other part derives from.

Each :class:`StageSpec` says what the rest of the code needs to know of a stage:

* ``name``: its key in stats.json, the prefix of the drop reasons it writes
  (``fetch:http_error_404``) and its name in the report and in compare;
* ``label``: the report's label for the rows left after it;
* ``phase``: the phase that runs it (``candidates``, ``dedup`` or ``score``);
* ``category``: compare's category for the rows it drops;
* ``code``: the module holding its code; ``counters``, ``check`` and
  ``check_node`` name functions in it (resolved only when used, so that this
  module stays import-light);
* ``counters``: ``f(batch, later)`` -> :class:`~laionbuild.stats.StageCounters`
  read off a batch that went through every stage of its phase (``later``: the
  names of the stages after it); empty for stages whose counters come from
  their own driver code;
* ``check``: ``f(cfg)`` raising ``ConfigError`` / ``SetupError`` when the stage
  cannot run (the preflight calls it on the driver); ``check_node``: the same
  for a worker node, once its files are local (``runner.nodes.check_node``);
* ``resources``: ``cpu`` (CPU worker nodes), ``gpu`` (GPU nodes when the
  cluster has GPUs, else CPU) or ``driver``;
* ``batch_size``: the config key of its batch size (``fetch.batch_size``);
* ``models`` / ``lists``: the config keys naming the model files and the
  lists it reads (recorded in provenance.json);
* ``enabled``: a boolean config key that turns the stage off (empty: always
  on); a stage that is off reports no counters.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

#: phases, in the order a run goes through them
PHASES = ("candidates", "dedup", "score")
#: what a stage asks of a node
RESOURCES = ("cpu", "gpu", "driver")


@dataclass(frozen=True)
class StageSpec:
    name: str
    label: str
    phase: str
    category: str
    code: str
    counters: str = ""
    check: str = ""
    check_node: str = ""
    resources: str = "cpu"
    batch_size: str = ""
    models: tuple[str, ...] = ()
    lists: tuple[str, ...] = ()
    enabled: str = ""

    def function(self, attr: str) -> Callable[..., Any] | None:
        """The function named by ``attr`` (``counters``, ``check``, ``check_node``), or None."""
        name = getattr(self, attr)
        if not name:
            return None
        return getattr(importlib.import_module(self.code), name)

    def is_enabled(self, cfg) -> bool:
        return not self.enabled or bool(config_value(cfg, self.enabled))

    def describe(self, cfg) -> dict[str, Any]:
        """What provenance.json records of the stage."""
        out: dict[str, Any] = {"name": self.name, "phase": self.phase, "resources": self.resources,
                               "enabled": self.is_enabled(cfg)}
        if self.batch_size:
            out["batch_size"] = config_value(cfg, self.batch_size)
        for kind in ("models", "lists"):
            keys = getattr(self, kind)
            if keys:
                out[kind] = {k: _plain(config_value(cfg, k)) for k in keys}
        return out


STAGES: tuple[StageSpec, ...] = (
    StageSpec("extract", "candidates (after HTML filters)", "candidates", "other", "laionbuild.stages.candidates"),
    StageSpec("langid", "after language routing", "candidates", "language", "laionbuild.stages.langid",
              check="check_config", check_node="check_config", models=("langid.model_path",)),
    StageSpec("dedup", "after global de-duplication", "dedup", "dedup", "laionbuild.runner.dedup"),
    StageSpec("blocklist", "after block lists", "score", "blocklist", "laionbuild.stages.blocklist",
              counters="stage_counters", check="check_config", batch_size="fetch.batch_size",
              lists=("blocklist.url_files", "blocklist.domain_files", "blocklist.hash_files")),
    StageSpec("fetch", "images downloaded", "score", "fetch", "laionbuild.stages.fetch.stage",
              counters="stage_counters", batch_size="fetch.batch_size"),
    StageSpec("clip", "above the CLIP threshold", "score", "threshold", "laionbuild.stages.clip_score",
              counters="stage_counters", check="check_config", check_node="check_node_models", resources="gpu",
              batch_size="clip.batch_size", models=("clip.models", "safety.punsafe_heads", "safety.watermark_model")),
    StageSpec("laion_filter", "after LAION-5B's safety filter", "score", "safety", "laionbuild.stages.laion_filter",
              counters="stage_counters", resources="gpu", batch_size="clip.batch_size",
              enabled="safety.laion_filter.enabled"),
)

NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def get(name: str) -> StageSpec:
    for spec in STAGES:
        if spec.name == name:
            return spec
    raise KeyError(name)


def of_phase(phase: str) -> tuple[StageSpec, ...]:
    return tuple(s for s in STAGES if s.phase == phase)


def later_than(name: str) -> tuple[str, ...]:
    """Names of the stages of ``name``'s phase that come after it."""
    spec = get(name)
    names = [s.name for s in of_phase(spec.phase)]
    return tuple(names[names.index(name) + 1:])


def config_value(cfg, key: str) -> Any:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _plain(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return {k: _plain(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


__all__ = ["NAMES", "PHASES", "RESOURCES", "STAGES", "StageSpec", "config_value", "get", "later_than", "of_phase"]
