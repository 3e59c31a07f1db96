"""Output of ``laionbuild models list`` and ``laionbuild models pull`` (argument parsing is in laionbuild/cli.py)."""

from __future__ import annotations

import json
import sys
from typing import TextIO

from ..config import Config
from .hub import hf_default_cache
from .requirements import ModelRequirement, cache_layout, required_models
from .store import pull, read_lock



def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _status(r: ModelRequirement) -> str:
    if r.present:
        return "packaged" if r.source == "packaged" else "present"
    return "missing" if r.fetch else "MISSING!"


def format_table(reqs: list[ModelRequirement], header: str) -> str:
    rows = [("STATUS", "KIND", "SIZE", "USED BY", "WHAT")]
    rows += [(_status(r), r.kind, _size(r.size), ", ".join(r.used_by), r.name) for r in reqs]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [header]
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
        if i:
            r = reqs[i - 1]
            pad = "    "
            lines.append(f"{pad}path:   {r.path or '?'}")
            if r.source not in ("packaged", "local"):
                lines.append(f"{pad}source: {r.source}")
            if r.note:
                lines.append(f"{pad}note:   {r.note}")
    missing = [r for r in reqs if not r.present]
    fetchable = [r for r in missing if r.fetch]
    lines.append(f"{len(reqs)} model file(s): {len(reqs) - len(missing)} present, {len(fetchable)} missing that "
                 f"'laionbuild models pull' downloads, {len(missing) - len(fetchable)} missing that must be provided "
                 f"by hand" + (" (MISSING! in the table)" if len(missing) > len(fetchable) else ""))
    return "\n".join(lines)


def list_models(cfg: Config, config_name: str, *, as_json: bool = False, out: TextIO | None = None) -> int:
    """Print every model file ``cfg`` needs; always exit status 0."""
    out = out or sys.stdout
    reqs = required_models(cfg)
    layout = cache_layout(cfg.models)
    where = {"cache": layout.cache, "local_root": str(layout.root),
             "hub": str(layout.root / "hub") if layout.own_hub else hf_default_cache()}
    if layout.copy:
        where["cache_recorded_files"] = len(read_lock(layout.cache)["files"])
    if as_json:
        json.dump({"config": config_name, **where, "models": [r.to_dict() for r in reqs]}, out, indent=1)
        out.write("\n")
        return 0
    header = (f"models for {config_name}: Hugging Face files in {where['hub']}, released files in "
              f"{layout.root / 'releases'}" + (f" (copied per node from {layout.cache}, which records "
                                                f"{where['cache_recorded_files']} file(s))" if layout.copy else ""))
    out.write(format_table(reqs, header) + "\n")
    return 0


def pull_models(cfg: Config, *, progress: bool = True, out: TextIO | None = None) -> int:
    """Download what is missing; exit status 0 when everything is present afterwards, 2 otherwise."""
    out = out or sys.stdout
    records = pull(cfg, progress=progress)
    for rec in records:
        out.write(f"fetched {rec['file']}  {rec['size']} bytes  sha256 {rec['sha256']}  from {rec['source']}\n")
    left = [r for r in required_models(cfg) if not r.present]
    layout = cache_layout(cfg.models)
    out.write(f"{len(records)} file(s) fetched into {layout.cache if layout.copy else layout.root}; "
              f"record: {layout.root / 'models.lock.json'}\n")
    for r in left:
        out.write(f"still missing: {r.name} ({', '.join(r.used_by)}): {r.path} {r.note}\n")
    return 2 if left else 0
