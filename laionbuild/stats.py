"""Counters that every stage reports, and the run summary built from them.

A :class:`StageCounters` is ``kept`` plus ``dropped_by_reason`` plus free-form
``counts`` (records seen, statuses...). :class:`RunStats` holds one per stage,
the per-file results, and renders the final JSON / text summary.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .stages.registry import NAMES

#: the stages of a run in the order rows meet them (stats.json lists them in this order)
STAGES = NAMES


@dataclass
class StageCounters:
    kept: int = 0
    dropped_by_reason: Counter = field(default_factory=Counter)
    counts: Counter = field(default_factory=Counter)

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.dropped_by_reason[reason] += n

    def count(self, name: str, n: int = 1) -> None:
        if n:
            self.counts[name] += n

    @property
    def dropped(self) -> int:
        return sum(self.dropped_by_reason.values())

    def merge(self, other: "StageCounters | Mapping[str, Any]") -> "StageCounters":
        if isinstance(other, Mapping):
            other = StageCounters.from_dict(other)
        self.kept += other.kept
        self.dropped_by_reason.update(other.dropped_by_reason)
        self.counts.update(other.counts)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "kept": self.kept,
            "dropped": self.dropped,
            "dropped_by_reason": dict(sorted(self.dropped_by_reason.items())),
            "counts": dict(sorted(self.counts.items())),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StageCounters":
        return cls(
            kept=int(data.get("kept", 0)),
            dropped_by_reason=Counter(data.get("dropped_by_reason", {})),
            counts=Counter(data.get("counts", {})),
        )


@dataclass
class FileResult:
    """Outcome of one input file: ``ok``, ``partial`` (kept what was read) or ``failed``."""

    path: str
    status: str = "ok"
    reason: str = ""
    message: str = ""
    attempts: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class RunStats:
    stages: dict[str, StageCounters] = field(default_factory=lambda: {s: StageCounters() for s in STAGES})
    files: list[FileResult] = field(default_factory=list)
    kept_per_subset: Counter = field(default_factory=Counter)
    extra: dict[str, Any] = field(default_factory=dict)

    def stage(self, name: str) -> StageCounters:
        return self.stages.setdefault(name, StageCounters())

    def merge_stages(self, stages: Mapping[str, Any]) -> None:
        for name, counters in stages.items():
            self.stage(name).merge(counters)

    @property
    def failed_files(self) -> list[FileResult]:
        return [f for f in self.files if f.status == "failed"]

    @property
    def partial_files(self) -> list[FileResult]:
        return [f for f in self.files if f.status == "partial"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": {
                "total": len(self.files),
                "ok": sum(f.status == "ok" for f in self.files),
                "partial": len(self.partial_files),
                "failed": len(self.failed_files),
                "details": [f.to_dict() for f in self.files if f.status != "ok"],
            },
            "stages": {name: c.to_dict() for name, c in self.stages.items()},
            "kept_per_subset": dict(sorted(self.kept_per_subset.items())),
            "kept_total": sum(self.kept_per_subset.values()),
            **self.extra,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, ensure_ascii=False)

    def summary_lines(self, kept_label: str = "kept pairs") -> list[str]:
        """Console summary; ``kept_label`` names the per-subset counts (``extract`` keeps candidates)."""
        d = self.to_dict()
        lines = [
            f"files: {d['files']['total']} ({d['files']['ok']} ok, {d['files']['partial']} partial, "
            f"{d['files']['failed']} failed)"
        ]
        for f in self.files:
            if f.status != "ok":
                lines.append(f"  {f.status}: {f.path}: {f.reason} {f.message}".rstrip())
        for name, c in self.stages.items():
            if not (c.kept or c.dropped or c.counts):
                continue
            parts = [f"kept={c.kept}"]
            parts += [f"{k}={v}" for k, v in sorted(c.counts.items())]
            lines.append(f"{name}: " + " ".join(parts))
            for reason, n in sorted(c.dropped_by_reason.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"    dropped {reason}: {n}")
        kept = ", ".join(f"{s}={self.kept_per_subset.get(s, 0)}" for s in ("en", "multi", "nolang"))
        lines.append(f"{kept_label}: {d['kept_total']} ({kept})")
        return lines

    def alarm_lines(self) -> list[str]:
        """What a run whose every download, or every input file, failed must say plainly."""
        out = []
        if self.files and all(f.status == "failed" for f in self.files):
            reasons = Counter(f.reason for f in self.files)
            out.append(f"all {len(self.files)} input file(s) failed: " + _reasons_text(reasons))
        fetch = self.stages.get(FETCH_STAGE)
        attempted = int(fetch.counts.get("attempted", 0)) if fetch else 0
        if fetch and attempted and not fetch.kept:
            out.append(f"all {attempted} downloads failed: " + _reasons_text(Counter(fetch.dropped_by_reason)))
        return out


#: the stage whose counters hold the image downloads
FETCH_STAGE = "fetch"


def _reasons_text(reasons: Mapping[str, int]) -> str:
    """``dns_error`` or ``dns_error 9, timeout 4``, most frequent first."""
    ranked = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    if len(ranked) == 1:
        return ranked[0][0] or "unknown reason"
    return ", ".join(f"{r or 'unknown reason'} {n}" for r, n in ranked)


def sum_counters(items: Iterable[Mapping[str, Any]]) -> dict[str, StageCounters]:
    """Add up ``{stage: counters}`` mappings (e.g. from per-file completion markers)."""
    total: dict[str, StageCounters] = {}
    for item in items:
        for name, counters in item.items():
            total.setdefault(name, StageCounters()).merge(counters)
    return total
