"""Commit the units of a hand-made output folder the way a run does: markers written last.

Readers (report, compare) see committed units only, so a test that writes phase files by
hand records them in the markers and manifests of :mod:`laionbuild.output.layout`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from laionbuild.output.layout import OutputLayout


def commit_units(root: Path, *, skip: tuple[str, ...] = ()) -> None:
    """Markers for every candidates file, work shard and scored folder under ``root``, except the
    stems / shard ids in ``skip`` (left uncommitted, as by an interrupted run)."""
    cands = sorted((root / "candidates").glob("*.parquet"))
    if cands:
        (root / "candidates" / "_done").mkdir(exist_ok=True)
    for f in cands:
        if f.stem not in skip:
            (root / "candidates" / "_done" / f"{f.stem}.json").write_text(json.dumps({"file_id": f.stem}))
    shards = [f for f in sorted((root / "workshards").glob("*.parquet")) if f.stem not in skip]
    if shards:
        listed = [{"id": f.stem, "rows": pq.read_metadata(f).num_rows} for f in shards]
        group = Path(OutputLayout(str(root)).group_marker(0, 0))
        group.parent.mkdir(parents=True, exist_ok=True)
        group.write_text(json.dumps({"generation": 0, "group": 0, "shards": listed}))
        manifest = {"generation": 0, "n_shards": len(listed), "rows": sum(s["rows"] for s in listed)}
        (root / "workshards" / "_manifest-g0000.json").write_text(json.dumps(manifest))
    scored = [d for d in sorted((root / "scored").glob("*")) if d.is_dir() and d.name != "_done"]
    if scored:
        (root / "scored" / "_done").mkdir(exist_ok=True)
    for d in scored:
        if d.name not in skip:
            marker = {"shard_id": d.name, "parts": [str(p) for p in sorted(d.iterdir())]}
            (root / "scored" / "_done" / f"{d.name}.json").write_text(json.dumps(marker))
