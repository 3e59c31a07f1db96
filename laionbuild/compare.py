"""``laionbuild compare OUTPUT --reference 'laion2B-en/*.parquet'``: how close is a rebuild to LAION-5B?

The rebuild and the reference (LAION-5B's or Re-LAION-5B's metadata parquet)
are compared pair by pair, a pair being ``(URL, TEXT)``:

* **comparable set**: the reference rows whose ``URL`` is among the candidates
  this run extracted (``OUTPUT/candidates/``); rows from crawl files the run
  did not read do not count against it;
* per subset and overall: comparable reference rows we kept too; those we did
  not keep, by our reason (routed to another subset, de-dup, fetch status,
  CLIP threshold, safety rule, block list, another alt text for the URL); rows
  we kept that the reference lacks, by a likely reason; the keep/drop decision
  table; language agreement (multi); similarity agreement of the pairs both
  scored; ``hash`` equality.

Our side is read whole (candidates, work shards, fates, published rows: small
next to LAION-5B); the reference is streamed batch by batch, reading only the
columns needed and keeping only the rows whose ``URL`` is a candidate URL
(:class:`UrlSet`). With a Ray cluster attached (``ray.is_initialized()`` or
``RAY_ADDRESS`` set) the reference files are filtered by Ray tasks.

Writes ``compare.json``, ``compare.md``, ``compare.html`` and three PNG plots
into ``OUTPUT/compare/`` (or ``report_dir``). See docs/compare.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import posixpath
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import ClipConfig
from .errors import SetupError, error_cause
from .output.fs import open_fs, url_of
from .output.layout import OutputLayout
from .report import _Doc, _fmt, _pct, _plt, _thousands, read_output_config, report_folder
from .schema import NOLANG_CODE, SUBSETS
from .stages import registry

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- output layout
CONFIG_FILE = "config.yaml"


def output_fs(output: str):
    """``(filesystem, root path)`` of an output folder or URL."""
    return open_fs(output)


# the committed files of a run, as its output layout lists them (never a leftover of unfinished work)
def candidate_files(layout: OutputLayout) -> list[str]:
    """Every candidate the run extracted, before the global de-dup (committed inputs only)."""
    return layout.candidate_files()


def workshard_files(layout: OutputLayout) -> list[str]:
    """The unique candidates after the global de-dup (work shards of committed generations)."""
    return [layout.workshard_file(sid) for sid in sorted(layout.committed_shards())]


def fate_files(layout: OutputLayout) -> list[str]:
    """Every row of every committed work shard, kept or dropped, with its ``drop_reason``."""
    return layout.fate_files()


def published_files(layout: OutputLayout, subset: str) -> list[str]:
    """The published rows of one subset (the generation the pointer names)."""
    return layout.published_files(subset)


# --------------------------------------------------------------------------- settings
#: rows per record batch read from a reference file
REFERENCE_BATCH_ROWS = 65_536
#: a pair we kept that the reference lacks counts as "our threshold decision" when its
#: similarity lies within this distance of the subset's threshold
NEAR_THRESHOLD = 0.01
#: safety model scores compared on the pairs kept by both, when both sides have them
SAFETY_SCORES = ("punsafe", "pwatermark")
#: how many (reference, ours) language disagreements the report lists
TOP_LANGUAGE_PAIRS = 10
#: above this many pairs the similarity plot is a hexbin instead of a scatter
HEXBIN_ABOVE = 2_000

#: reference column -> accepted spellings (LAION-5B, its "-joined" variant, Re-LAION-5B)
REFERENCE_ALIASES = {
    "URL": ("URL", "url"),
    "TEXT": ("TEXT", "caption", "text"),
    "similarity": ("similarity", "SIMILARITY"),
    "hash": ("hash", "HASH"),
    "LANGUAGE": ("LANGUAGE", "language"),
    "WIDTH": ("WIDTH", "width"),
    "HEIGHT": ("HEIGHT", "height"),
    "punsafe": ("punsafe", "PUNSAFE"),
    "pwatermark": ("pwatermark", "PWATERMARK"),
}
REFERENCE_TYPES = {
    "URL": pa.string(), "TEXT": pa.string(), "similarity": pa.float64(), "hash": pa.int64(),
    "LANGUAGE": pa.string(), "WIDTH": pa.float64(), "HEIGHT": pa.float64(), "punsafe": pa.float64(),
    "pwatermark": pa.float64(),
}
#: a reference file's subset from its path (LAION-5B and Re-LAION-5B repository names)
SUBSET_FROM_PATH = (
    (re.compile(r"2b[-_]?en(?![a-z])", re.I), "en"),
    (re.compile(r"2b[-_]?multi", re.I), "multi"),
    (re.compile(r"1b[-_]?nolang", re.I), "nolang"),
)

#: why a comparable reference pair is not among our kept pairs (see :func:`drop_category`)
CATEGORIES = {
    "language": "routed to another subset by our language id",
    "alt_text": "our candidates hold this URL with another alt text only",
    "dedup": "dropped by our global de-dup (another row with the same de-dup key won)",
    "fetch": "image not downloaded or not decodable (fetch status)",
    "threshold": "below our CLIP similarity threshold",
    "safety": "dropped by a safety rule",
    "blocklist": "on a block or opt-out list",
    "pending": "not scored yet (its work shard is pending, or the output was never de-duplicated: "
               "`laionbuild extract`, a run stopped before phase 2)",
    "not_published": "kept by scoring but not in the published shards (removed)",
    "other": "another drop reason",
}
#: why a pair we kept is missing from the reference
OURS_ONLY = {
    "other_subset": "the reference has the pair in another subset",
    "alt_text": "the reference has this URL with another alt text",
    "threshold": "our similarity lies within {near} of the threshold",
    "not_in_reference": "the URL is not in the reference: page crawled in another snapshot, or not a "
                        "LAION candidate",
}
#: drop_reason (whole or its stage) -> category: each stage's own (stages/registry.py), then
#: the reasons whose category is not their stage's, and prefixes written outside the stages
_REASON_CATEGORY = {
    **{spec.name: spec.category for spec in registry.STAGES},
    "clip:below_threshold": "threshold",
    "clip:bad_image": "fetch",
    "resize": "fetch",  # written by outputs of earlier versions, where decoding was its own stage
    "blocklisted": "blocklist",
    "optout": "blocklist",
    "removed": "blocklist",
    "safety": "safety",
    "nsfw": "safety",
    "watermark": "safety",
}


def drop_category(reason: str) -> str:
    """The :data:`CATEGORIES` key of a ``drop_reason`` such as ``fetch:http_error_404``."""
    if reason in _REASON_CATEGORY:
        return _REASON_CATEGORY[reason]
    return _REASON_CATEGORY.get(reason.split(":", 1)[0], "other")


# --------------------------------------------------------------------------- our side
@contextlib.contextmanager
def _parquet(fs, path: str, what: str) -> Iterator[pq.ParquetFile]:
    """An open parquet file; an unreadable one is a :class:`SetupError` naming it."""
    try:
        with fs.open(path, "rb") as fh:
            yield pq.ParquetFile(fh)
    except (OSError, pa.ArrowException) as exc:
        raise SetupError(f"cannot read {what} {path}: {type(exc).__name__}: {exc}") from exc


def _read_tables(fs, paths: Iterable[str], columns: dict[str, pa.DataType]) -> pa.Table:
    """The ``columns`` of every file, cast to the given types; a column a file lacks is null."""
    parts = []
    for path in paths:
        with _parquet(fs, path, "output file") as pf:
            names = pf.schema_arrow.names
            t = pf.read(columns=[c for c in columns if c in names])
        parts.append(pa.table({c: t.column(c).cast(typ) if c in names else pa.nulls(t.num_rows, typ)
                               for c, typ in columns.items()}))
    if not parts:
        return pa.table({c: pa.array([], typ) for c, typ in columns.items()})
    return pa.concat_tables(parts)


def _first_per_pair(t: pa.Table) -> pa.Table:
    """One row per ``(URL, TEXT)``: the first one."""
    t = t.append_column("_row", pa.array(np.arange(t.num_rows)))
    rest = [c for c in t.column_names if c not in ("URL", "TEXT", "_row")]
    g = t.group_by(["URL", "TEXT"]).aggregate([("_row", "min")])
    first = g.column("_row_min")
    return t.take(pc.take(first, pc.sort_indices(first))).select(["URL", "TEXT", *rest])


def _fill(t: pa.Table, defaults: dict[str, Any]) -> pa.Table:
    for c, v in defaults.items():
        i = t.column_names.index(c)
        t = t.set_column(i, c, pc.fill_null(t.column(c), v))
    return t


@dataclass
class Ours:
    """One row per unique candidate pair ``(URL, TEXT)`` of the run, with its fate."""

    table: pa.Table  # URL, TEXT, subset, LANGUAGE, hash, fate, pub_subset, similarity, ...
    candidate_rows: int
    candidate_urls: pa.Array
    thresholds: dict[str, float]
    dedup_key: str
    files: dict[str, int]


def load_ours(output: str) -> Ours:
    """Read the run's candidates, work shards, fates and published rows into one table of pairs."""
    layout = OutputLayout(output)
    fs, root = layout.fs, layout.root
    cand_paths = candidate_files(layout)
    if not cand_paths:
        raise SetupError(f"{output} holds no committed candidates (candidates/_done/): not an output folder of a run")
    config = read_output_config(fs, posixpath.join(root, CONFIG_FILE), posixpath.join(output.rstrip("/"), CONFIG_FILE))
    defaults = ClipConfig().thresholds
    cfg_thr = (config.get("clip") or {}).get("thresholds") or {}
    thresholds = {s: float(cfg_thr.get(s, defaults[s])) for s in SUBSETS}
    dedup_key = str((config.get("run") or {}).get("dedup_key", "url_text"))

    s, f64, i64 = pa.string(), pa.float64(), pa.int64()
    cand = _read_tables(fs, cand_paths, {"URL": s, "TEXT": s, "subset": s, "LANGUAGE": s, "hash": i64})
    cand = _fill(cand, {"URL": "", "TEXT": "", "subset": "", "LANGUAGE": ""})
    candidate_rows = cand.num_rows
    pairs = _first_per_pair(cand)

    ws_paths = workshard_files(layout)
    ws = _read_tables(fs, ws_paths, {"URL": s, "TEXT": s})
    ws = _fill(ws, {"URL": "", "TEXT": ""})
    ws = _first_per_pair(ws)
    ws = ws.append_column("in_workshards", pa.array(np.ones(ws.num_rows, dtype=bool)))
    ws_urls = pc.unique(ws.column("URL"))

    fate_paths = fate_files(layout)
    fates = _read_tables(fs, fate_paths, {"URL": s, "TEXT": s, "drop_reason": s, "status": s,
                                          "similarity": f64, "punsafe": f64, "pwatermark": f64})
    fates = _fill(fates, {"URL": "", "TEXT": "", "drop_reason": ""})
    fates = _first_per_pair(fates)
    fates = fates.append_column("in_fates", pa.array(np.ones(fates.num_rows, dtype=bool)))

    pubs = []
    n_pub_files = 0
    for subset in SUBSETS:
        paths = published_files(layout, subset)
        n_pub_files += len(paths)
        t = _read_tables(fs, paths, {"URL": s, "TEXT": s, "similarity": f64, "hash": i64, "LANGUAGE": s})
        pubs.append(t.append_column("pub_subset", pa.array([subset] * t.num_rows, s)))
    pub = _fill(pa.concat_tables(pubs), {"URL": "", "TEXT": ""})
    pub = _first_per_pair(pub).rename_columns(["URL", "TEXT", "pub_similarity", "pub_hash", "pub_LANGUAGE",
                                               "pub_subset"])

    t = pairs.join(ws, ["URL", "TEXT"], join_type="left outer")
    t = t.join(fates, ["URL", "TEXT"], join_type="left outer")
    t = t.join(pub, ["URL", "TEXT"], join_type="left outer")
    t = _fill(t, {"in_workshards": False, "in_fates": False, "drop_reason": "", "status": "", "pub_subset": ""})
    t = t.append_column("url_in_workshards", pc.is_in(t.column("URL"), value_set=ws_urls))

    # one fate per pair: "" kept (published), else why not
    in_ws = t.column("in_workshards").to_numpy(zero_copy_only=False)
    in_fates = t.column("in_fates").to_numpy(zero_copy_only=False)
    url_in_ws = t.column("url_in_workshards").to_numpy(zero_copy_only=False)
    reason = np.asarray(t.column("drop_reason").to_pylist(), dtype=object)
    published = np.asarray(t.column("pub_subset").to_pylist(), dtype=object) != ""
    fate = np.where(published, "", reason).astype(object)
    fate[~published & in_fates & (reason == "")] = "publish:not_published"
    fate[~published & in_ws & ~in_fates] = "pending:not_scored"
    fate[~in_ws & url_in_ws] = f"dedup:{dedup_key}"
    fate[~in_ws & ~url_in_ws] = "dedup:not_in_workshards"
    if not ws_paths and not layout.manifests():  # no de-dup committed: `laionbuild extract`, or stopped before
        fate[~published] = "pending:not_deduplicated"
    t = t.append_column("fate", pa.array(fate.tolist(), s))
    # our similarity: the fates' (kept or not), else the published one
    sim = pc.coalesce(t.column("similarity"), t.column("pub_similarity"))
    t = t.set_column(t.column_names.index("similarity"), "similarity", sim)
    our_hash = pc.coalesce(t.column("pub_hash"), t.column("hash"))
    t = t.set_column(t.column_names.index("hash"), "hash", our_hash)

    files = {"candidates": len(cand_paths), "workshards": len(ws_paths), "fates": len(fate_paths),
             "published": n_pub_files}
    log.info("compare: %d candidate rows, %d unique pairs, %d scored, %d published", candidate_rows,
             t.num_rows, int(in_fates.sum()), int(published.sum()))
    return Ours(table=t, candidate_rows=candidate_rows, candidate_urls=pc.unique(pairs.column("URL")),
                thresholds=thresholds, dedup_key=dedup_key, files=files)


# --------------------------------------------------------------------------- reference side
def reference_files(patterns: Iterable[str]) -> list[tuple[Any, str]]:
    """``(filesystem, path)`` of every parquet file the patterns (globs, folders, files, URLs) name."""
    out: list[tuple[Any, str]] = []
    seen: set[str] = set()  # a file two patterns name is read once
    for pattern in patterns:
        try:
            fs, path = open_fs(pattern)
            if any(ch in path for ch in "*?["):
                paths = sorted(fs.glob(path))
            elif fs.isdir(path):
                paths = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
            elif fs.exists(path):
                paths = [path]
            else:
                paths = []
        except Exception as exc:  # noqa: BLE001 - an unknown protocol, credentials, an endpoint: name the reference
            raise SetupError(f"cannot read reference {pattern}: {error_cause(exc)}") from None
        if not paths:
            raise SetupError(f"reference {pattern} matches no parquet file")
        out += [(fs, p) for p in paths if url_of(fs, p) not in seen]
        seen.update(url_of(fs, p) for p in paths)
    return out


#: LANGUAGE values of a reference row without a language (LAION-5B's nolang subset)
NO_LANGUAGE_VALUES = frozenset({"", NOLANG_CODE, "nolang", "none"})


def subset_of(path: str, names: Iterable[str], subset: str | None = None) -> str | None:
    """The LAION subset of a reference file: ``subset`` if given, else from its path; None when only
    its LANGUAGE values can tell (see :func:`subset_from_languages`)."""
    if subset:
        return subset
    for part in reversed([p for p in re.split(r"[/\\]", path) if p]):  # the name nearest the file decides
        found = {name for rx, name in SUBSET_FROM_PATH if rx.search(part)}
        if len(found) == 1:
            return found.pop()
        if found:
            raise SetupError(f"reference file {path}: '{part}' names several subsets ({', '.join(sorted(found))}): "
                             "pass --subset")
    if any(n in REFERENCE_ALIASES["LANGUAGE"] for n in names):
        return None
    raise SetupError(f"cannot tell the subset of reference file {path} (no laion2B-en / laion2B-multi / "
                     "laion1B-nolang in its path, no LANGUAGE column): pass --subset")


def subset_from_languages(path: str, languages: Counter) -> str:
    """The subset a reference file's LANGUAGE values say: all ``en`` -> en; none a language ->
    nolang; languages other than ``en`` only -> multi; else ask for ``--subset``."""
    seen = {str(v).strip().lower() for v in languages}
    if not languages:
        raise SetupError(f"cannot tell the subset of reference file {path}: its path does not say and it has "
                         "no rows; pass --subset")
    if seen == {"en"}:
        return "en"
    if seen <= NO_LANGUAGE_VALUES:
        return "nolang"
    if "en" not in seen:
        return "multi"
    top = ", ".join(f"{v} {n}" for v, n in languages.most_common(3))
    raise SetupError(f"cannot tell the subset of reference file {path}: its path does not say and its LANGUAGE "
                     f"values mix en with other languages ({top}, ...); pass --subset")


def _resolve(names: list[str]) -> dict[str, str]:
    """reference column -> its name in this file."""
    out = {}
    lower = {n.lower(): n for n in names}
    for col, aliases in REFERENCE_ALIASES.items():
        for a in aliases:
            if a in names:
                out[col] = a
                break
        else:
            for a in aliases:
                if a.lower() in lower:
                    out[col] = lower[a.lower()]
                    break
    return out


class UrlSet:
    """Membership test against the candidate URLs, prepared once for every batch of every file.

    ``pyarrow.compute.is_in`` builds a hash table of its value set on each call, which costs
    more than the batch itself once the set outgrows it; above ``batch_rows`` URLs a Python
    set answers instead.
    """

    def __init__(self, urls: pa.Array, batch_rows: int = REFERENCE_BATCH_ROWS):
        self.size = len(urls)
        self._array = urls if len(urls) <= batch_rows else None
        self._set = None if self._array is not None else frozenset(urls.to_pylist())

    def mask(self, values: pa.Array) -> pa.Array:
        if self._array is not None:
            return pc.is_in(values, value_set=self._array)
        return pa.array(np.fromiter((v in self._set for v in values.to_pylist()), dtype=bool, count=len(values)))


def filter_reference_file(fs, path: str, urls: pa.Array | UrlSet, subset: str | None = None,
                          batch_rows: int = REFERENCE_BATCH_ROWS) -> tuple[pa.Table, dict[str, Any]]:
    """The rows of one reference file whose URL is in ``urls``, read batch by batch.

    Returns the rows (columns of :data:`REFERENCE_TYPES` plus ``ref_subset``) and
    ``{path, subset, rows, batches, comparable, columns}``.
    """
    lookup = urls if isinstance(urls, UrlSet) else UrlSet(urls, batch_rows)
    kept: list[pa.Table] = []
    rows = batches = 0
    with _parquet(fs, path, "reference file") as pf:
        names = pf.schema_arrow.names
        cols = _resolve(names)
        if "URL" not in cols or "TEXT" not in cols:
            raise SetupError(f"reference file {path} has no URL / TEXT column (columns: {', '.join(names)})")
        name = subset_of(path, names, subset)
        languages: Counter = Counter()
        for batch in pf.iter_batches(batch_size=batch_rows, columns=list(cols.values())):
            rows += batch.num_rows
            batches += 1
            if name is None:
                counts = pc.value_counts(pc.fill_null(batch.column(cols["LANGUAGE"]).cast(pa.string()), ""))
                languages.update({v["values"]: v["counts"] for v in counts.to_pylist()})
            url = batch.column(cols["URL"]).cast(pa.string())
            mask = lookup.mask(url)
            if not pc.any(mask).as_py():
                continue
            sel = batch.filter(mask)
            kept.append(pa.table({c: sel.column(cols[c]).cast(typ) if c in cols else pa.nulls(sel.num_rows, typ)
                                  for c, typ in REFERENCE_TYPES.items()}))
    table = pa.concat_tables(kept) if kept else pa.table({c: pa.array([], t) for c, t in REFERENCE_TYPES.items()})
    table = _fill(table, {"URL": "", "TEXT": ""})
    if name is None:
        name = subset_from_languages(path, languages)
        log.info("compare: %s: subset %s, from its LANGUAGE values (%s); --subset overrides", path, name,
                 ", ".join(f"{v or '(empty)'} {n}" for v, n in languages.most_common(3)))
    table = table.append_column("ref_subset", pa.array([name] * table.num_rows, pa.string()))
    info = {"path": path, "subset": name, "rows": rows, "batches": batches, "comparable": table.num_rows,
            "columns": sorted(cols)}
    log.info("compare: %s (%s): %d of %d rows comparable", path, name, table.num_rows, rows)
    return table, info


def ray_attached() -> bool:
    """True when a Ray cluster is attached: ``ray.is_initialized()`` or ``RAY_ADDRESS`` set."""
    if os.environ.get("RAY_ADDRESS"):
        return True
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def _filter_with_ray(files, urls: UrlSet, subset, batch_rows):
    from .runner.tasks import map_with_shared  # Ray stays inside the runner

    return map_with_shared(filter_reference_file, [((fs, path), (subset, batch_rows)) for fs, path in files], urls)


def load_reference(patterns: Iterable[str], urls: pa.Array, subset: str | None = None,
                   batch_rows: int = REFERENCE_BATCH_ROWS, use_ray: bool | None = None
                   ) -> tuple[pa.Table, list[dict[str, Any]]]:
    """The comparable reference rows of every file, with per-file read counts."""
    files = reference_files(patterns)
    urls = UrlSet(urls, batch_rows)
    if use_ray is None:
        use_ray = ray_attached()
    if use_ray:
        results = _filter_with_ray(files, urls, subset, batch_rows)
    else:
        results = [filter_reference_file(fs, path, urls, subset, batch_rows) for fs, path in files]
    tables = [t for t, _ in results]
    return pa.concat_tables(tables), [i for _, i in results]


# --------------------------------------------------------------------------- figures
def _np(t: pa.Table, col: str, fill=None) -> np.ndarray:
    c = t.column(col)
    if fill is not None:
        c = pc.fill_null(c, fill)
    if pa.types.is_string(c.type):
        return np.asarray(c.to_pylist(), dtype=object)
    return c.to_numpy()


def _valid(t: pa.Table, col: str) -> np.ndarray:
    return pc.is_valid(t.column(col)).to_numpy(zero_copy_only=False)


def _category(reason: str) -> str:
    """:data:`CATEGORIES` key of a row's reason (a ``drop_reason`` or one this module gives)."""
    stage = reason.split(":", 1)[0]
    if stage in ("language", "alt_text", "pending"):
        return stage
    if reason == "publish:not_published":
        return "not_published"
    return drop_category(reason)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    sx = x[order]
    starts = np.flatnonzero(np.r_[True, sx[1:] != sx[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends - 1) / 2.0, ends - starts)
    return ranks


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return round(float(np.corrcoef(a, b)[0, 1]), 6)


def similarity_agreement(ours: np.ndarray, ref: np.ndarray, thresholds: np.ndarray) -> dict[str, Any]:
    """Correlation and distance of two similarity columns, and how many pairs the threshold splits."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    out: dict[str, Any] = {"rows": int(len(ours))}
    if not len(ours):
        return out
    diff = np.abs(ours - ref)
    ours_above = ours >= thresholds
    ref_above = ref >= thresholds
    out.update({
        "pearson": _corr(ours, ref),
        "spearman": _corr(_ranks(ours), _ranks(ref)),
        "mean_abs_diff": round(float(diff.mean()), 6),
        "p99_abs_diff": round(float(np.percentile(diff, 99)), 6),
        "mean_diff_ours_minus_reference": round(float((ours - ref).mean()), 6),
        "other_side_of_threshold": int((ours_above != ref_above).sum()),
        "ours_below_reference_above": int((~ours_above & ref_above).sum()),
        "ours_above_reference_below": int((ours_above & ~ref_above).sum()),
    })
    return out


def _counts(values: np.ndarray) -> dict[str, int]:
    return dict(sorted(Counter(values.tolist()).items(), key=lambda kv: (-kv[1], kv[0])))


def _unique_reference(ref: pa.Table) -> pa.Table:
    ref = ref.append_column("ref_row", pa.array(np.ones(ref.num_rows, dtype=bool)))
    return _first_per_pair(ref)


def _view_figures(t: pa.Table, ours_keep: np.ndarray, ref_keep: np.ndarray, ours: Ours, ref_urls: pa.Array,
                  subset: str | None, ref_subsets: list[str], near: float) -> dict[str, Any]:
    """The figures of one view (``subset``, or ``None``: overall) over its pairs ``t`` (both sides joined)
    and the two keep decisions."""
    o_in = _np(t, "o_in", False).astype(bool)
    cand_subset = _np(t, "subset", "")
    pub_subset = _np(t, "pub_subset", "")
    fate = _np(t, "fate", "")
    sim = _np(t, "similarity", math.nan).astype(np.float64)
    rsim = _np(t, "r_similarity", math.nan).astype(np.float64)
    r_subset = _np(t, "r_subset", "")
    thr_subset = np.where(r_subset != "", r_subset, cand_subset) if subset is None else [subset] * t.num_rows
    thr = np.array([ours.thresholds.get(x, math.nan) for x in thr_subset], dtype=np.float64)

    both = ours_keep & ref_keep
    ref_only = ref_keep & ~ours_keep
    ours_only = ours_keep & ~ref_keep
    both_drop = ~ours_keep & ~ref_keep

    # why the reference pairs we did not keep are missing from ours
    reason = np.empty(t.num_rows, dtype=object)
    reason[:] = fate
    reason[~o_in] = "alt_text:different_alt_text"
    if subset is not None:
        other = o_in & (cand_subset != subset)
        reason[other] = np.char.add("language:routed_to_", cand_subset[other].astype(str)).astype(object)
        moved = o_in & (pub_subset != "") & (pub_subset != subset)
        reason[moved] = np.char.add("language:kept_in_", pub_subset[moved].astype(str)).astype(object)
    else:
        moved = o_in & (pub_subset != "") & ~np.isin(pub_subset, ref_subsets)
        reason[moved] = np.char.add("language:kept_in_", pub_subset[moved].astype(str)).astype(object)
    category = np.array([_category(r) for r in reason], dtype=object)

    # why the pairs we kept are missing from the reference
    likely = np.full(t.num_rows, "not_in_reference", dtype=object)
    likely[np.abs(sim - thr) <= near] = "threshold"
    url_in_ref = pc.is_in(t.column("URL"), value_set=ref_urls).to_numpy(zero_copy_only=False)
    likely[url_in_ref] = "alt_text"
    if subset is not None:
        elsewhere = _np(t, "r_any_subset", "")
        likely[(elsewhere != "") & (elsewhere != subset)] = "other_subset"

    n = int(both.sum() + ref_only.sum() + ours_only.sum() + both_drop.sum())
    out: dict[str, Any] = {
        "comparable_reference_pairs": int(ref_keep.sum()),
        "kept_by_both": int(both.sum()),
        "reference_only": {
            "pairs": int(ref_only.sum()),
            "by_category": _counts(category[ref_only]),
            "by_reason": _counts(reason[ref_only]),
        },
        "ours_only": {
            "pairs": int(ours_only.sum()),
            "by_likely_reason": _counts(likely[ours_only]),
        },
        "decision": {
            "both_keep": int(both.sum()),
            "ours_keep_reference_not": int(ours_only.sum()),
            "reference_keep_ours_not": int(ref_only.sum()),
            "both_drop": int(both_drop.sum()),
            "pairs": n,
            "agreement": round(float((both.sum() + both_drop.sum()) / n), 6) if n else None,
            "recall": round(float(both.sum() / ref_keep.sum()), 6) if ref_keep.sum() else None,
            "precision": round(float(both.sum() / ours_keep.sum()), 6) if ours_keep.sum() else None,
        },
    }
    scored = ref_keep & o_in & np.isfinite(sim) & np.isfinite(rsim)
    out["similarity"] = similarity_agreement(sim[scored], rsim[scored], thr[scored])

    has = both & _valid(t, "r_hash") & _valid(t, "hash")
    eq = has & (_np(t, "r_hash", 0) == _np(t, "hash", 0))
    out["hash"] = {"pairs": int(has.sum()), "equal": int(eq.sum()),
                   "rate": round(float(eq.sum() / has.sum()), 6) if has.sum() else None}

    scores = {}
    for col in SAFETY_SCORES:
        m = both & _valid(t, col) & _valid(t, f"r_{col}")
        if m.any():
            a, b = _np(t, col)[m].astype(np.float64), _np(t, f"r_{col}")[m].astype(np.float64)
            scores[col] = {"pairs": int(m.sum()), "pearson": _corr(a, b),
                           "mean_abs_diff": round(float(np.abs(a - b).mean()), 6)}
    if scores:
        out["safety_scores"] = scores

    if subset in (None, "multi"):
        rlang = _np(t, "r_LANGUAGE", "")
        olang = _np(t, "LANGUAGE", "")
        mask = ref_keep & o_in & (rlang != "")
        if subset is None:
            mask &= r_subset == "multi"
        agree = mask & (rlang == olang)
        pairs = Counter(zip(rlang[mask & ~agree].tolist(), olang[mask & ~agree].tolist()))
        kb = mask & both
        out["language"] = {
            "pairs": int(mask.sum()), "agree": int(agree.sum()),
            "rate": round(float(agree.sum() / mask.sum()), 6) if mask.sum() else None,
            "kept_by_both": int(kb.sum()), "kept_by_both_agree": int((kb & agree).sum()),
            "disagreements": [{"reference": a, "ours": b, "pairs": c} for (a, b), c in
                              sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_LANGUAGE_PAIRS]],
        }
    out["_plot"] = {"ours": sim[scored], "reference": rsim[scored], "threshold": thr[scored]}
    return out


def compare(output: str, reference: Iterable[str], subset: str | None = None,
            batch_rows: int = REFERENCE_BATCH_ROWS, near_threshold: float = NEAR_THRESHOLD,
            use_ray: bool | None = None) -> dict[str, Any]:
    """All the figures of ``compare.json``."""
    return _compare(output, reference, subset, batch_rows, near_threshold, use_ray)[0]


def _compare(output, reference, subset, batch_rows, near_threshold, use_ray
             ) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """The figures, and per subset the similarity pairs scored by both (for the plot)."""
    if subset is not None and subset not in SUBSETS:
        raise SetupError(f"--subset must be one of {', '.join(SUBSETS)}, not {subset!r}")
    if batch_rows < 1 or not near_threshold >= 0:
        raise SetupError(f"--batch-rows must be >= 1 and --near-threshold >= 0 (got {batch_rows}, {near_threshold})")
    reference = list(reference)
    ours = load_ours(output)
    ref, infos = load_reference(reference, ours.candidate_urls, subset, batch_rows, use_ray)
    ref_subsets = [s for s in SUBSETS if any(i["subset"] == s for i in infos)]
    ref_urls = pc.unique(ref.column("URL"))

    o = ours.table.append_column("o_in", pa.array(np.ones(ours.table.num_rows, dtype=bool)))
    ref_all = _unique_reference(ref.select(["URL", "TEXT", "ref_subset"])) \
        .rename_columns(["URL", "TEXT", "r_any_subset", "ref_row"]).select(["URL", "TEXT", "r_any_subset"])

    views: dict[str, dict[str, Any]] = {}
    plots: dict[str, dict[str, np.ndarray]] = {}
    for s in ref_subsets + ["overall"]:
        r = ref if s == "overall" else ref.filter(pc.equal(ref.column("ref_subset"), s))
        cols = ["URL", "TEXT", "similarity", "hash", "LANGUAGE", "punsafe", "pwatermark", "ref_subset"]
        r_s = _unique_reference(r.select(cols))
        r_s = r_s.rename_columns(["URL", "TEXT"] + [f"r_{c}" for c in cols[2:-1]] + ["r_subset", "r_row"])
        j = r_s.join(o, ["URL", "TEXT"], join_type="full outer")
        j = j.join(ref_all, ["URL", "TEXT"], join_type="left outer")
        j = _fill(j, {"r_row": False, "o_in": False, "pub_subset": "", "subset": ""})
        ref_keep = _np(j, "r_row").astype(bool)
        pub = _np(j, "pub_subset")
        cand = _np(j, "subset")
        if s == "overall":
            ours_keep = np.isin(pub, ref_subsets)
            universe = ref_keep | ours_keep | (_np(j, "o_in").astype(bool) & np.isin(cand, ref_subsets))
        else:
            ours_keep = pub == s
            universe = ref_keep | ours_keep | (_np(j, "o_in").astype(bool) & (cand == s))
        j = j.filter(pa.array(universe))
        fig = _view_figures(j, ours_keep[universe], ref_keep[universe], ours, ref_urls,
                            None if s == "overall" else s, ref_subsets, near_threshold)
        plots[s] = fig.pop("_plot")
        fig["comparable_reference_rows"] = int(r.num_rows)
        fig["reference_duplicate_rows"] = int(r.num_rows - r_s.num_rows)
        if s != "overall":
            fig["threshold"] = ours.thresholds[s]
            fig["reference_rows_read"] = sum(i["rows"] for i in infos if i["subset"] == s)
        views[s] = fig

    return {
        "output": output,
        "reference": {"patterns": reference, "files": infos, "subsets": ref_subsets,
                      "rows_read": sum(i["rows"] for i in infos), "batches_read": sum(i["batches"] for i in infos),
                      "comparable_rows": int(ref.num_rows)},
        "ours": {"candidate_rows": ours.candidate_rows, "candidate_pairs": ours.table.num_rows,
                 "candidate_urls": len(ours.candidate_urls), "files": ours.files, "thresholds": ours.thresholds,
                 "dedup_key": ours.dedup_key},
        "near_threshold": near_threshold,
        "subsets": {s: views[s] for s in ref_subsets},
        "overall": views["overall"],
    }, plots


# --------------------------------------------------------------------------- report
def _plot_similarity(result: dict[str, Any], plots: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    plt = _plt()
    names = list(result["subsets"])
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.6 * max(1, len(names)), 4.2), squeeze=False)
    for ax, s in zip(axes[0], names or ["–"]):
        p = plots.get(s) or {"ours": np.zeros(0), "reference": np.zeros(0)}
        x, y = p["reference"], p["ours"]
        if len(x):
            lo = float(min(x.min(), y.min())) - 0.02
            hi = float(max(x.max(), y.max())) + 0.02
            if len(x) > HEXBIN_ABOVE:
                hb = ax.hexbin(x, y, gridsize=60, bins="log", cmap="viridis", mincnt=1)
                fig.colorbar(hb, ax=ax, label="pairs")
            else:
                ax.scatter(x, y, s=10, alpha=0.6, edgecolors="none")
            ax.plot([lo, hi], [lo, hi], color="#999999", linewidth=1, linestyle=":")
            thr = result["subsets"][s]["threshold"]
            ax.axvline(thr, color="#c44e52", linewidth=1)
            ax.axhline(thr, color="#c44e52", linewidth=1, label=f"threshold {thr:g}")
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.legend(frameon=False, loc="upper left", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no pair scored by both", transform=ax.transAxes, ha="center", va="center")
        ax.set_title(f"{s}: CLIP similarity (n={_fmt(len(x))})")
        ax.set_xlabel("reference similarity")
        ax.set_ylabel("our similarity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_decisions(result: dict[str, Any], path: Path) -> None:
    plt = _plt()
    views = list(result["subsets"]) + ["overall"]
    fig, axes = plt.subplots(1, len(views), figsize=(3.4 * len(views), 3.4), squeeze=False)
    for ax, s in zip(axes[0], views):
        d = (result["subsets"].get(s) or result["overall"])["decision"]
        m = np.array([[d["both_keep"], d["ours_keep_reference_not"]],
                      [d["reference_keep_ours_not"], d["both_drop"]]])
        top = max(int(m.max()), 1)
        for (i, k), v in np.ndenumerate(m):  # agreement green, disagreement red, darker = more pairs
            colour = "#55a868" if i == k else "#c44e52"
            ax.add_patch(plt.Rectangle((k - 0.5, i - 0.5), 1, 1, color=colour, alpha=0.15 + 0.75 * v / top))
            ax.text(k, i, _fmt(v), ha="center", va="center", fontsize=12)
        ax.set_xlim(-0.5, 1.5)
        ax.set_ylim(1.5, -0.5)
        ax.set_aspect("equal")
        ax.set_xticks([0, 1], ["in reference", "not in reference"])
        ax.set_yticks([0, 1], ["we keep", "we drop"])
        agree = d["agreement"]
        ax.set_title(f"{s}: agreement {'–' if agree is None else f'{100 * agree:.1f}%'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_disagreements(result: dict[str, Any], path: Path) -> None:
    plt = _plt()
    o = result["overall"]
    left = [(f"{k}", v) for k, v in o["reference_only"]["by_reason"].items()][:15]
    right = [(k, v) for k, v in o["ours_only"]["by_likely_reason"].items()]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 1.4 + 0.35 * max(len(left), len(right), 2)))
    for ax, rows, title, colour in ((ax1, left, "in the reference, not kept by us: our reason", "#c44e52"),
                                    (ax2, right, "kept by us, not in the reference: likely reason", "#4c72b0")):
        if rows:
            shown = rows[::-1]
            bars = ax.barh([k for k, _ in shown], [v for _, v in shown], color=colour)
            top = max(v for _, v in rows)
            for bar, (_, v) in zip(bars, shown):
                ax.text(bar.get_width() + top * 0.01, bar.get_y() + bar.get_height() / 2, _fmt(v),
                        va="center", fontsize=9)
            ax.set_xlim(0, top * 1.2)
            _thousands(ax)
        else:
            ax.text(0.5, 0.5, "none", transform=ax.transAxes, ha="center", va="center")
        ax.set_title(title)
        ax.set_xlabel("pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _num(v: Any, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _gap_text(ref: dict[str, Any], overall: dict[str, Any]) -> str:
    """How the rows read become the comparable pairs: rows whose URL we never saw, duplicate rows."""
    parts = []
    unseen = ref["rows_read"] - ref["comparable_rows"]
    if unseen:
        parts.append(f"{_fmt(unseen)} not (their URL is not among our candidates)")
    dup = overall.get("reference_duplicate_rows", 0)
    if dup:
        parts.append(f"{_fmt(dup)} repeat(s) a (URL, TEXT) pair of another reference row and counts once")
    pairs = overall.get("comparable_reference_pairs")
    tail = f"; {_fmt(pairs)} comparable pairs" if pairs is not None and dup else ""
    return (": " + "; ".join(parts) + tail) if parts else ""


def _document(result: dict[str, Any]) -> _Doc:
    doc = _Doc()
    ref = result["reference"]
    ours = result["ours"]
    doc.h(1, "laionbuild compare")
    doc.ul([
        f"output: `{result['output']}`",
        f"reference: {len(ref['files'])} file(s), {_fmt(ref['rows_read'])} rows read, "
        f"{_fmt(ref['comparable_rows'])} comparable (their URL is among our candidates)"
        + _gap_text(ref, result["overall"]),
        f"ours: {_fmt(ours['candidate_rows'])} candidate rows, {_fmt(ours['candidate_pairs'])} unique (URL, TEXT) "
        f"pairs, {_fmt(ours['candidate_urls'])} URLs; de-dup key `{ours['dedup_key']}`",
    ])
    views = list(result["subsets"]) + ["overall"]
    get = lambda s: result["subsets"].get(s) or result["overall"]  # noqa: E731
    doc.h(2, "Summary")
    doc.p("A pair is (URL, TEXT). *Comparable* reference pairs are those whose URL our run extracted as a "
          "candidate. Similarity figures are over the reference pairs we scored too.")
    rows = []
    for s in views:
        v = get(s)
        d, sm, h = v["decision"], v["similarity"], v["hash"]
        rows.append([s, _fmt(v["comparable_reference_pairs"]), _fmt(v["kept_by_both"]),
                     _fmt(v["reference_only"]["pairs"]), _fmt(v["ours_only"]["pairs"]),
                     _pct(d["both_keep"] + d["both_drop"], d["pairs"]), _num(sm.get("pearson")),
                     _num(sm.get("spearman")), _num(sm.get("mean_abs_diff"), 4), _num(sm.get("p99_abs_diff"), 4),
                     _fmt(sm.get("other_side_of_threshold", 0)), _pct(h["equal"], h["pairs"])])
    doc.table(["subset", "comparable", "kept by both", "reference only", "ours only", "decision agreement",
               "Pearson", "Spearman", "mean abs Δsim", "p99 abs Δsim", "other side of threshold", "hash equal"],
              rows)
    doc.h(2, "Keep/drop decision")
    doc.p("Rows: our decision; columns: whether the reference has the pair. *Both drop* counts our candidate "
          "pairs of the subset that neither side published.")
    doc.table(["subset", "we keep, in reference", "we keep, not in reference", "we drop, in reference",
               "both drop", "agreement", "recall", "precision"],
              [[s, _fmt(get(s)["decision"]["both_keep"]), _fmt(get(s)["decision"]["ours_keep_reference_not"]),
                _fmt(get(s)["decision"]["reference_keep_ours_not"]), _fmt(get(s)["decision"]["both_drop"]),
                _num(get(s)["decision"]["agreement"]), _num(get(s)["decision"]["recall"]),
                _num(get(s)["decision"]["precision"])] for s in views])
    doc.img("decisions.png", "decision tables")
    doc.h(2, "Disagreements")
    for s in views:
        v = get(s)
        doc.h(3, s)
        ro, oo = v["reference_only"], v["ours_only"]
        if ro["pairs"]:
            doc.p(f"Reference pairs we did not keep: {_fmt(ro['pairs'])}, by our reason:")
            doc.table(["category", "meaning", "pairs"],
                      [[k, CATEGORIES.get(k, k), _fmt(n)] for k, n in ro["by_category"].items()], "llr")
            doc.table(["drop reason", "pairs"], [[k, _fmt(n)] for k, n in ro["by_reason"].items()], "lr")
        if oo["pairs"]:
            doc.p(f"Pairs we kept that the reference lacks: {_fmt(oo['pairs'])}, by likely reason:")
            doc.table(["likely reason", "meaning", "pairs"],
                      [[k, OURS_ONLY.get(k, k).format(near=result["near_threshold"]), _fmt(n)]
                       for k, n in oo["by_likely_reason"].items()], "llr")
        if not (ro["pairs"] or oo["pairs"]):
            doc.p("None.")
        lang = v.get("language")
        if lang and lang["pairs"]:
            doc.p(f"Language (multi): {_fmt(lang['agree'])} of {_fmt(lang['pairs'])} comparable pairs get the "
                  f"reference's LANGUAGE ({_pct(lang['agree'], lang['pairs'])}).")
            if lang["disagreements"]:
                doc.table(["reference LANGUAGE", "our LANGUAGE", "pairs"],
                          [[x["reference"], x["ours"], _fmt(x["pairs"])] for x in lang["disagreements"]], "llr")
    doc.img("disagreements.png", "disagreement reasons")
    doc.h(2, "CLIP similarity")
    doc.p("Our similarity against the reference's for the pairs both scored; red lines: our threshold.")
    doc.img("similarity.png", "similarity ours vs reference")
    rows = [[s, col, _fmt(sc["pairs"]), _num(sc["pearson"]), _num(sc["mean_abs_diff"], 4)]
            for s in views for col, sc in (get(s).get("safety_scores") or {}).items()]
    if rows:
        doc.h(2, "Safety scores")
        doc.p("Our safety model scores against the reference's, for the pairs kept by both.")
        doc.table(["subset", "score", "pairs", "Pearson", "mean abs difference"], rows, "llrrr")
    return doc


def write_compare(output: str, reference: Iterable[str], subset: str | None = None,
                  report_dir: str | None = None, batch_rows: int = REFERENCE_BATCH_ROWS,
                  near_threshold: float = NEAR_THRESHOLD, use_ray: bool | None = None) -> dict[str, Any]:
    """Compare, then write ``compare.json``, ``compare.md``, ``compare.html`` and the plots; returns the figures."""
    result, plots = _compare(output, list(reference), subset, batch_rows, near_threshold, use_ray)
    target = report_dir or posixpath.join(output.rstrip("/"), "compare")
    with report_folder(target) as work:
        _plot_similarity(result, plots, work / "similarity.png")
        _plot_decisions(result, work / "decisions.png")
        _plot_disagreements(result, work / "disagreements.png")
        doc = _document(result)
        (work / "compare.md").write_text(doc.markdown(), encoding="utf-8")
        (work / "compare.html").write_text(doc.html("laionbuild compare"), encoding="utf-8")
        (work / "compare.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
    log.info("compare: report in %s", target)
    return result


__all__ = ["UrlSet", "candidate_files", "compare", "drop_category", "fate_files", "filter_reference_file", "load_ours",
           "load_reference", "published_files", "workshard_files", "write_compare"]
