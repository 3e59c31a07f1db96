"""``laionbuild report OUTPUT``: a readable report with plots for a finished output folder.

Reads

* ``OUTPUT/stats.json`` (:meth:`laionbuild.stats.RunStats.to_dict`),
* ``OUTPUT/config.yaml`` (CLIP thresholds and models),
* the published shards ``OUTPUT/{en,multi,nolang}/*.parquet``,
* when present, the similarity of *every* scored row, kept or not
  (``OUTPUT/scored/*/fates-*.parquet``);
  without them the similarity histograms show the published rows only.

and writes ``report.md``, ``report.html``, ``summary.json`` (the numbers the
report shows) and four PNG plots into ``OUTPUT/report/`` (or ``report_dir``):

``funnel.png``
    rows left after each stage, from the ``<img>`` tags of the pages to the
    published pairs, and the most frequent drop reasons;
``similarity.png``
    CLIP similarity per subset with the subset's threshold;
``languages.png``
    the most frequent ``LANGUAGE`` values of the published pairs;
``image_sizes.png``
    distribution of the original ``WIDTH`` / ``HEIGHT``.

The shards are read batch by batch into fixed-bin histograms and counters, so
memory does not grow with the size of the dataset. ``stats.json`` itself is
left untouched.
"""

from __future__ import annotations

import contextlib
import html
import json
import logging
import math
import posixpath
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow.parquet as pq
import yaml

from .config import ClipConfig
from .schema import SUBSETS
from .stages import registry
from .stages.shards import read_json_object
from .errors import SetupError
from .output.fs import open_fs, url_of
from .output.layout import OutputLayout

log = logging.getLogger(__name__)

STAGE_LABELS = {spec.name: spec.label for spec in registry.STAGES}
SUBSET_COLOURS = {"en": "#1f77b4", "multi": "#ff7f0e", "nolang": "#7f7f7f"}
STAGE_COLOURS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]

#: similarity histogram bins (cosine similarity lies in [-1, 1])
SIM_EDGES = np.linspace(-1.0, 1.0, 401)
#: log-spaced image side bins, 1 px .. 100k px
SIZE_EDGES = np.logspace(0, 5, 61)
#: (width, height) pairs kept for the scatter plot and the percentiles
SIZE_SAMPLE = 50_000
TOP_LANGUAGES = 20
TOP_REASONS = 15


# --------------------------------------------------------------------------- reading
def _iter_batches(fs, paths: Iterable[str], columns: list[str]) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """``(path, {column: values})`` per record batch; missing columns are left out; bad files are skipped."""
    for path in paths:
        try:
            with fs.open(path, "rb") as fh:
                pf = pq.ParquetFile(fh)
                present = [c for c in columns if c in pf.schema_arrow.names]
                for batch in pf.iter_batches(columns=present, batch_size=65_536):
                    yield path, {c: batch.column(c).to_numpy(zero_copy_only=False) for c in present}
        except Exception as exc:  # noqa: BLE001 - one unreadable shard must not stop the report
            log.warning("report: cannot read %s: %s: %s", path, type(exc).__name__, exc)


def read_output_config(fs, path: str, shown: str) -> dict[str, Any]:
    """An output's ``config.yaml`` as a mapping (empty when there is none). One that cannot be
    read, or whose ``clip`` settings are not what a run writes, is one line naming the file."""
    if not fs.exists(path):
        return {}
    try:
        with fs.open(path, "rb") as fh:
            data = yaml.safe_load(fh.read().decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        problem = " ".join(str(exc).split())[:200]
        raise SetupError(f"{shown} is not valid YAML ({problem}); restore it or rerun the run that wrote it") from None
    data = {} if data is None else data
    not_written = (f"{shown} is not a config a run writes (a mapping; clip.thresholds and clip.models mappings); "
                   "restore it or rerun the run that wrote it")
    if not isinstance(data, dict):
        raise SetupError(not_written)
    clip = data.get("clip")
    if clip is None:
        return data
    if not isinstance(clip, dict) or any(not isinstance(clip.get(key) or {}, dict) for key in ("thresholds", "models")):
        raise SetupError(not_written)
    for subset, value in (clip.get("thresholds") or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SetupError(f"{shown}: clip.thresholds.{subset} is not a number ({value!r})")
    return data


# --------------------------------------------------------------------------- aggregation
@dataclass
class _Similarity:
    hist: np.ndarray = field(default_factory=lambda: np.zeros(len(SIM_EDGES) - 1, dtype=np.int64))
    hist_kept: np.ndarray = field(default_factory=lambda: np.zeros(len(SIM_EDGES) - 1, dtype=np.int64))
    n: int = 0
    n_kept: int = 0
    total: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf

    def add(self, values: np.ndarray, threshold: float) -> None:
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if not len(values):
            return
        kept = values >= threshold
        self.hist += np.histogram(np.clip(values, -1, 1), SIM_EDGES)[0]
        self.hist_kept += np.histogram(np.clip(values[kept], -1, 1), SIM_EDGES)[0]
        self.n += len(values)
        self.n_kept += int(kept.sum())
        self.total += float(values.sum())
        self.lo = min(self.lo, float(values.min()))
        self.hi = max(self.hi, float(values.max()))

    def summary(self) -> dict[str, Any]:
        if not self.n:
            return {"rows": 0}
        return {
            "rows": self.n,
            "at_or_above_threshold": self.n_kept,
            "mean": round(self.total / self.n, 4),
            "min": round(self.lo, 4),
            "max": round(self.hi, 4),
            "median": round(_hist_quantile(self.hist, SIM_EDGES, 0.5), 3),
        }


def _hist_quantile(hist: np.ndarray, edges: np.ndarray, q: float) -> float:
    cum = np.cumsum(hist)
    if not cum[-1]:
        return float("nan")
    i = int(np.searchsorted(cum, q * cum[-1]))
    return float((edges[i] + edges[i + 1]) / 2)


@dataclass
class _Sizes:
    width: np.ndarray = field(default_factory=lambda: np.zeros(len(SIZE_EDGES) - 1, dtype=np.int64))
    height: np.ndarray = field(default_factory=lambda: np.zeros(len(SIZE_EDGES) - 1, dtype=np.int64))
    sample: list[tuple[int, int]] = field(default_factory=list)
    seen: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def add(self, w: np.ndarray, h: np.ndarray) -> None:
        w = np.asarray(w, dtype=np.float64)
        h = np.asarray(h, dtype=np.float64)
        ok = (w > 0) & (h > 0)
        w, h = w[ok], h[ok]
        self.width += np.histogram(np.clip(w, 1, 99_999), SIZE_EDGES)[0]
        self.height += np.histogram(np.clip(h, 1, 99_999), SIZE_EDGES)[0]
        for pair in zip(w.astype(int).tolist(), h.astype(int).tolist()):  # reservoir sample
            self.seen += 1
            if len(self.sample) < SIZE_SAMPLE:
                self.sample.append(pair)
            else:
                j = self.rng.randrange(self.seen)
                if j < SIZE_SAMPLE:
                    self.sample[j] = pair

    def summary(self) -> dict[str, Any]:
        if not self.sample:
            return {"rows": 0}
        arr = np.array(self.sample)
        out: dict[str, Any] = {"rows": self.seen, "sampled": len(self.sample) < self.seen}
        for i, name in enumerate(("width", "height")):
            p10, p50, p90 = np.percentile(arr[:, i], [10, 50, 90])
            out[name] = {"p10": int(p10), "median": int(p50), "p90": int(p90),
                         "min": int(arr[:, i].min()), "max": int(arr[:, i].max())}
        out["square"] = int((arr[:, 0] == arr[:, 1]).sum())
        out["landscape"] = int((arr[:, 0] > arr[:, 1]).sum())
        out["portrait"] = int((arr[:, 0] < arr[:, 1]).sum())
        return out


@dataclass
class _Data:
    output: str
    stats: dict[str, Any]
    config: dict[str, Any]
    config_found: bool
    thresholds: dict[str, float]
    models: dict[str, str]
    shard_files: dict[str, list[str]]
    shard_rows: Counter
    languages: dict[str, Counter]
    sizes: _Sizes
    similarity: dict[str, _Similarity]
    similarity_source: str  # "scores" or "shards"
    score_files: list[str]
    stats_note: str = ""


def _load(output_dir: str) -> _Data:
    fs, root = open_fs(output_dir)
    stats_path = posixpath.join(root, "stats.json")
    layout = OutputLayout(output_dir)
    pointer = layout.published()
    stats_note = ""
    if not fs.exists(stats_path):
        # a run into the folder removes stats.json until it ends: the published generation keeps
        # its own copy, and the report is of what readers see
        kept = layout.generation_stats_path(pointer["generation"]) if pointer is not None else None
        if kept is None or not fs.exists(kept):
            raise SetupError(f"{output_dir} holds no stats.json: not a finished output folder")
        stats_path = kept
        stats_note = (f"stats.json is absent (a run into this folder is in progress, or stopped): this report "
                      f"is of the published generation {int(pointer['generation'])} and the stats of the run "
                      "that published it")
    stats = read_json_object(fs, stats_path, url_of(fs, stats_path))

    cfg_path = posixpath.join(root, "config.yaml")
    config = read_output_config(fs, cfg_path, posixpath.join(output_dir.rstrip("/"), "config.yaml"))
    clip = config.get("clip") or {}
    defaults = ClipConfig()
    thresholds = {s: float((clip.get("thresholds") or {}).get(s, defaults.thresholds[s])) for s in SUBSETS}
    models = {}
    for s in SUBSETS:
        m = (clip.get("models") or {}).get(s) or {}
        d = defaults.models[s]
        text_model = m.get("text_model", d.text_model) or ""
        models[s] = f"{m.get('arch', d.arch)} / {m.get('pretrained', d.pretrained)}" + (
            f" (text: {text_model})" if text_model else "")

    shard_files = {s: layout.published_files(s, pointer=pointer) for s in SUBSETS}
    shard_rows: Counter = Counter()
    languages = {s: Counter() for s in SUBSETS}
    sizes = _Sizes()
    shard_sim = {s: _Similarity() for s in SUBSETS}
    for s in SUBSETS:
        for _, cols in _iter_batches(fs, shard_files[s], ["LANGUAGE", "WIDTH", "HEIGHT", "similarity"]):
            n = len(next(iter(cols.values()))) if cols else 0
            shard_rows[s] += n
            if "LANGUAGE" in cols:
                languages[s].update(str(v) for v in cols["LANGUAGE"])
            if "WIDTH" in cols and "HEIGHT" in cols:
                sizes.add(cols["WIDTH"], cols["HEIGHT"])
            if "similarity" in cols:
                shard_sim[s].add(cols["similarity"], thresholds[s])

    score_files = layout.fate_files()  # committed work shards only
    similarity, source = shard_sim, "shards"
    if score_files:
        scored = {s: _Similarity() for s in SUBSETS}
        for _, cols in _iter_batches(fs, score_files, ["subset", "similarity"]):
            if "subset" not in cols or "similarity" not in cols:
                continue
            subset_col = np.asarray(cols["subset"], dtype=object)
            for s in SUBSETS:
                mask = subset_col == s
                if mask.any():
                    scored[s].add(np.asarray(cols["similarity"])[mask], thresholds[s])
        if any(v.n for v in scored.values()):
            similarity, source = scored, "scores"

    return _Data(
        output=output_dir, stats=stats, config=config, config_found=bool(config), thresholds=thresholds,
        models=models, shard_files=shard_files, shard_rows=shard_rows, languages=languages, sizes=sizes,
        similarity=similarity, similarity_source=source, score_files=score_files, stats_note=stats_note,
    )


# --------------------------------------------------------------------------- funnel
def _funnel(stats: dict[str, Any]) -> tuple[list[dict[str, Any]], list[tuple[str, str, int]]]:
    """Steps ``{label, stage, rows, dropped}`` and drop reasons ``(stage, reason, n)``."""
    stages = stats.get("stages") or {}
    steps: list[dict[str, Any]] = []
    reasons: list[tuple[str, str, int]] = []
    first = True
    for name, c in stages.items():
        kept = int(c.get("kept", 0))
        by_reason = {k: int(v) for k, v in (c.get("dropped_by_reason") or {}).items()}
        dropped = sum(by_reason.values()) if by_reason else int(c.get("dropped", 0))
        if not (kept or dropped):
            continue
        if first:
            imgs = int((c.get("counts") or {}).get("imgs", kept + dropped))
            steps.append({"label": "<img> tags in the pages", "stage": "", "rows": max(imgs, kept + dropped),
                          "dropped": 0})
            first = False
        if not kept and len(steps) > 1:
            # a stage that only removes rows (block lists): what is left after it
            kept = max(0, steps[-1]["rows"] - dropped)
        steps.append({"label": STAGE_LABELS.get(name, name), "stage": name, "rows": kept, "dropped": dropped})
        reasons += [(name, r, n) for r, n in by_reason.items() if n]
    kept_total = stats.get("kept_total")
    if kept_total is not None and (not steps or steps[-1]["rows"] != kept_total):
        steps.append({"label": "published pairs", "stage": "", "rows": int(kept_total), "dropped": 0})
    reasons.sort(key=lambda t: (-t[2], t[0], t[1]))
    return steps, reasons


# --------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.spines.top": False,
                         "axes.spines.right": False})
    return plt


def _fmt(n: float) -> str:
    return f"{int(n):,}"


#: the labelled ticks of a log axis, per decade
LOG_TICK_SUBS = (1.0, 2.0, 5.0)


def _thousands(ax, axis: str = "x") -> None:
    from matplotlib.ticker import FuncFormatter

    from matplotlib.ticker import MaxNLocator

    from matplotlib.ticker import LogLocator, NullFormatter

    target = ax.xaxis if axis == "x" else ax.yaxis
    if target.get_scale() != "log":
        target.set_major_locator(MaxNLocator(integer=True))
        lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
        if hi - lo < 1:  # nothing counted: an axis of 0 to 1, not of 0 0 0 -0 -0
            (ax.set_xlim if axis == "x" else ax.set_ylim)(0, max(1, hi))
    else:  # labelled ticks at 1, 2 and 5 of each decade, in plain numbers (no 2×10²)
        target.set_major_locator(LogLocator(base=10, subs=LOG_TICK_SUBS))
        target.set_minor_formatter(NullFormatter())
    target.set_major_formatter(FuncFormatter(lambda v, _pos: f"{abs(v) if abs(v) < 0.5 else v:,.0f}"))


def _plot_funnel(steps, reasons, path: Path) -> None:
    plt = _plt()
    n_reasons = min(len(reasons), TOP_REASONS)
    fig, axes = plt.subplots(
        2 if n_reasons else 1, 1, figsize=(9, 1.0 + 0.45 * len(steps) + (0.8 + 0.35 * n_reasons if n_reasons else 0)),
        gridspec_kw={"height_ratios": [len(steps) + 1, n_reasons + 1]} if n_reasons else None, squeeze=False,
    )
    ax = axes[0][0]
    top = max((s["rows"] for s in steps), default=0) or 1
    labels = [s["label"] for s in steps][::-1]
    values = [s["rows"] for s in steps][::-1]
    bars = ax.barh(labels, values, color="#4c72b0")
    if len(bars):
        bars[0].set_color("#2ca02c")  # the published pairs
    for bar, v in zip(bars, values):
        ax.text(bar.get_width() + top * 0.01, bar.get_y() + bar.get_height() / 2,
                f"{_fmt(v)}  ({100 * v / top:.1f}%)", va="center", fontsize=9)
    ax.set_xlim(0, top * 1.3)
    ax.set_title("Funnel: rows left after each stage")
    ax.set_xlabel("rows")
    _thousands(ax)
    if n_reasons:
        ax2 = axes[1][0]
        shown = reasons[:TOP_REASONS][::-1]
        stage_names = list(dict.fromkeys(r[0] for r in reasons))
        colours = [STAGE_COLOURS[stage_names.index(st) % len(STAGE_COLOURS)] for st, _, _ in shown]
        bars = ax2.barh([f"{st}: {r}" for st, r, _ in shown], [n for _, _, n in shown], color=colours)
        rtop = max(n for _, _, n in shown) or 1
        for bar, (_, _, n) in zip(bars, shown):
            ax2.text(bar.get_width() + rtop * 0.01, bar.get_y() + bar.get_height() / 2, _fmt(n),
                     va="center", fontsize=9)
        ax2.set_xlim(0, rtop * 1.15)
        more = f" (top {TOP_REASONS} of {len(reasons)})" if len(reasons) > TOP_REASONS else ""
        ax2.set_title(f"Dropped rows by stage and reason{more}")
        ax2.set_xlabel("rows")
        _thousands(ax2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_similarity(data: _Data, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=False)
    nonzero = [np.flatnonzero(data.similarity[s].hist) for s in SUBSETS]
    nonzero = [nz for nz in nonzero if len(nz)]
    if nonzero:
        lo_i = max(0, min(int(nz[0]) for nz in nonzero) - 4)
        hi_i = min(len(SIM_EDGES) - 2, max(int(nz[-1]) for nz in nonzero) + 4)
    else:
        lo_i, hi_i = 160, 260
    lo_x = min(float(SIM_EDGES[lo_i]), min(data.thresholds.values()) - 0.05)
    hi_x = max(float(SIM_EDGES[hi_i + 1]), max(data.thresholds.values()) + 0.05)
    # merge 0.005-wide bins so that a subset shows ~40 bars
    span_bins = max(1, int(round((hi_x - lo_x) / 0.005)))
    group = max(1, span_bins // 40)
    for ax, s in zip(axes, SUBSETS):
        sim = data.similarity[s]
        thr = data.thresholds[s]
        below = _regroup(sim.hist - sim.hist_kept, group)
        kept = _regroup(sim.hist_kept, group)
        left, widths = _group_edges(group)
        ax.bar(left, below, width=widths, align="edge", color="#c7c7c7", label="below threshold")
        ax.bar(left, kept, width=widths, align="edge", bottom=below, color=SUBSET_COLOURS[s], label="kept")
        ax.axvline(thr, color="#d62728", linestyle="--", linewidth=1.5)
        ax.text(thr, 1.0, f" threshold {thr:g}", color="#d62728", transform=ax.get_xaxis_transform(),
                va="top", ha="left", fontsize=9,
                bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none", "pad": 1})
        ax.set_xlim(lo_x, hi_x)
        _thousands(ax, "y")
        kept_pct = f", {100 * sim.n_kept / sim.n:.0f}% kept" if sim.n else ""
        ax.set_title(f"{s}  (n={_fmt(sim.n)}{kept_pct})")
        ax.set_xlabel("CLIP cosine similarity")
        if not sim.n:
            ax.text(0.5, 0.5, "no rows", transform=ax.transAxes, ha="center", va="center", color="#777777")
    axes[0].set_ylabel("rows")
    axes[0].legend(loc="upper left", fontsize=8, frameon=False, bbox_to_anchor=(0.0, 0.9))
    src = ("all scored rows" if data.similarity_source == "scores"
           else "published rows only (no per-row scores found)")
    fig.suptitle(f"CLIP similarity per subset: {src}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _group_edges(group: int) -> tuple[np.ndarray, np.ndarray]:
    """Left edges and widths of the bars of :func:`_regroup` (the last group may be narrower:
    ``group`` need not divide the bins)."""
    left = SIM_EDGES[:-1][::group]
    return left, np.append(left[1:], SIM_EDGES[-1]) - left


def _regroup(hist: np.ndarray, group: int) -> np.ndarray:
    n = len(hist) // group * group
    out = hist[:n].reshape(-1, group).sum(axis=1)
    if n < len(hist):
        out = np.append(out, hist[n:].sum())
    return out


def _top_languages(data: _Data) -> list[tuple[str, str, int]]:
    rows = [(lang, s, n) for s in SUBSETS for lang, n in data.languages[s].items()]
    rows.sort(key=lambda t: (-t[2], t[0]))
    return rows


def _plot_languages(data: _Data, path: Path) -> None:
    plt = _plt()
    rows = _top_languages(data)[:TOP_LANGUAGES]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * max(len(rows), 3)))
    if rows:
        shown = rows[::-1]
        bars = ax.barh([f"{lang} ({s})" for lang, s, _ in shown], [n for _, _, n in shown],
                       color=[SUBSET_COLOURS[s] for _, s, _ in shown])
        top = max(n for _, _, n in rows)
        total = sum(sum(c.values()) for c in data.languages.values())
        for bar, (_, _, n) in zip(bars, shown):
            ax.text(bar.get_width() + top * 0.01, bar.get_y() + bar.get_height() / 2,
                    f"{_fmt(n)} ({100 * n / total:.1f}%)", va="center", fontsize=9)
        ax.set_xlim(0, top * 1.25)
        handles = [plt.Rectangle((0, 0), 1, 1, color=SUBSET_COLOURS[s]) for s in SUBSETS]
        ax.legend(handles, SUBSETS, loc="lower right", frameon=False, fontsize=8)
    else:
        ax.text(0.5, 0.5, "no published rows", transform=ax.transAxes, ha="center", va="center")
    ax.set_title(f"Top languages of the published pairs (LANGUAGE, top {TOP_LANGUAGES})")
    ax.set_xlabel("pairs")
    _thousands(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_sizes(data: _Data, path: Path) -> None:
    plt = _plt()
    sizes = data.sizes
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    if sizes.seen:
        centres = np.sqrt(SIZE_EDGES[:-1] * SIZE_EDGES[1:])
        nz = np.flatnonzero(sizes.width + sizes.height)
        lo, hi = max(0, nz[0] - 2), min(len(centres) - 1, nz[-1] + 2)
        ax1.step(centres[lo:hi + 1], sizes.width[lo:hi + 1], where="mid", label="WIDTH", linewidth=1.8)
        ax1.step(centres[lo:hi + 1], sizes.height[lo:hi + 1], where="mid", label="HEIGHT", linewidth=1.8,
                 linestyle="--", alpha=0.85)  # dashed: where both lines agree both still show
        ax1.set_xscale("log")
        _thousands(ax1)
        ax1.set_xlabel("pixels (original image)")
        ax1.set_ylabel("pairs")
        ax1.legend(frameon=False)
        arr = np.array(sizes.sample)
        ax2.scatter(arr[:, 0], arr[:, 1], s=6 if len(arr) > 2000 else 14, alpha=0.35 if len(arr) > 2000 else 0.7,
                    color="#1f77b4", edgecolors="none")
        lim = (max(1, arr.min() * 0.8), arr.max() * 1.25)
        ax2.plot(lim, lim, color="#999999", linewidth=1, linestyle=":", label="square")
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlim(lim)
        ax2.set_ylim(lim)
        _thousands(ax2, "x")
        _thousands(ax2, "y")
        ax2.set_xlabel("WIDTH")
        ax2.set_ylabel("HEIGHT")
        ax2.legend(frameon=False, loc="upper left")
        sampled = f" (sample of {_fmt(len(arr))})" if sizes.seen > len(arr) else ""
        ax2.set_title(f"WIDTH × HEIGHT{sampled}")
    else:
        for ax in (ax1, ax2):
            ax.text(0.5, 0.5, "no published rows", transform=ax.transAxes, ha="center", va="center")
    ax1.set_title(f"Image size distribution (n={_fmt(sizes.seen)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- document
class _Doc:
    """A few block types rendered both as Markdown and as HTML."""

    def __init__(self) -> None:
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[Any]], align: str = "") -> None:
        self.blocks.append(("table", header, [[str(c) for c in r] for r in rows], align))

    def img(self, src: str, alt: str) -> None:
        self.blocks.append(("img", src, alt))

    def ul(self, items: list[str]) -> None:
        self.blocks.append(("ul", items))

    def markdown(self) -> str:
        out: list[str] = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + _md(b[2]))
            elif b[0] == "p":
                out.append(_md(b[1]))
            elif b[0] == "table":
                _, header, rows, align = b
                aligns = (align or "l" + "r" * (len(header) - 1)).ljust(len(header), "r")
                out.append("| " + " | ".join(_md(h) for h in header) + " |")
                out.append("|" + "|".join(":---" if a == "l" else "---:" for a in aligns) + "|")
                out += ["| " + " | ".join(_md(c).replace("|", "\\|") for c in r) + " |" for r in rows]
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1]})")
            elif b[0] == "ul":
                out += [f"- {_md(item)}" for item in b[1]]
            out.append("")
        return "\n".join(out)

    def html(self, title: str) -> str:
        body: list[str] = []
        for b in self.blocks:
            if b[0] == "h":
                body.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                body.append(f"<p>{_inline(b[1])}</p>")
            elif b[0] == "table":
                _, header, rows, align = b
                aligns = (align or "l" + "r" * (len(header) - 1)).ljust(len(header), "r")
                cls = lambda i: ' class="num"' if aligns[i] == "r" else ""  # noqa: E731
                body.append("<table><thead><tr>" + "".join(f"<th{cls(i)}>{_inline(h)}</th>"
                                                           for i, h in enumerate(header)) + "</tr></thead><tbody>")
                body += ["<tr>" + "".join(f"<td{cls(i)}>{_inline(c)}</td>" for i, c in enumerate(r)) + "</tr>"
                         for r in rows]
                body.append("</tbody></table>")
            elif b[0] == "img":
                body.append(f'<p><img src="{html.escape(b[1])}" alt="{html.escape(b[2])}"></p>')
            elif b[0] == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b[1]) + "</ul>")
        style = (
            "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
            "table{border-collapse:collapse;margin:0.5em 0 1em}th,td{border:1px solid #ddd;padding:3px 8px}"
            "th{background:#f3f3f3}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}"
            "img{max-width:100%}code{background:#f3f3f3;padding:0 3px}"
        )
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _md(text: str) -> str:
    """Escape ``<`` / ``>`` outside ``code`` spans so that Markdown shows them as text."""
    parts = text.split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;").replace(">", "&gt;") for i, p in enumerate(parts))


def _inline(text: str) -> str:
    """Escape, then render ``code`` spans and ``**bold**`` outside them."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else _bold(p) for i, p in enumerate(parts))


def _bold(text: str) -> str:
    pieces = text.split("**")
    if len(pieces) % 2 == 0:  # an odd number of markers: not emphasis
        return text
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(pieces))


def _pct(n: int, d: int) -> str:
    return f"{100 * n / d:.1f}%" if d else "–"


def _build_document(data: _Data, steps, reasons) -> tuple[_Doc, dict[str, Any]]:
    stats = data.stats
    doc = _Doc()
    name = (data.config.get("run") or {}).get("name") or "laionbuild"
    doc.h(1, f"laionbuild report: {name}")
    files = stats.get("files") or {}
    facts = [f"output: `{data.output}`"]
    if stats.get("config_hash"):
        facts.append(f"config hash: `{stats['config_hash']}`")
    if stats.get("wall_seconds") is not None:
        facts.append(f"wall time: {stats['wall_seconds']} s")
    facts.append(f"input files: {files.get('total', 0)} ({files.get('ok', 0)} ok, {files.get('partial', 0)} partial, "
                 f"{files.get('failed', 0)} failed)")
    if not data.config_found:
        facts.append("config.yaml not found: thresholds and models shown are the LAION-5B defaults")
    if data.stats_note:
        facts.append(data.stats_note)
    laion_filter = stats.get("laion_filter")
    if laion_filter is not None:
        facts.append("LAION-5B's safety filter (NSFW tag, underage and animal drops): " + (
            "on" if laion_filter.get("enabled") else "**off** (safety.laion_filter.enabled=false)"))
    doc.ul(facts)

    kept = stats.get("kept_per_subset") or {}
    kept_total = int(stats.get("kept_total", sum(kept.values())))
    doc.h(2, "Kept pairs per subset")
    rows = []
    for s in SUBSETS:
        rows.append([s, _fmt(kept.get(s, 0)), _pct(kept.get(s, 0), kept_total), f"{data.thresholds[s]:g}",
                     data.models[s], _fmt(data.shard_rows.get(s, 0)), str(len(data.shard_files[s]))])
    rows.append(["**total**", f"**{_fmt(kept_total)}**", "100%" if kept_total else "–", "", "",
                 _fmt(sum(data.shard_rows.values())), str(sum(len(v) for v in data.shard_files.values()))])
    doc.table(["subset", "kept pairs", "share", "CLIP threshold", "CLIP model", "rows in shards", "shards"],
              rows, "lrrrlrr")
    mismatch = [s for s in SUBSETS if data.shard_rows.get(s, 0) != int(kept.get(s, 0))]
    if mismatch:
        doc.p("Note: the shard row count differs from stats.json for " + ", ".join(mismatch) + ".")

    doc.h(2, "Funnel")
    doc.p("Rows left after each stage, from the `<img>` tags of the HTML pages to the published pairs. "
          "Each stage's drops are listed below with their reasons.")
    first = steps[0]["rows"] if steps else 0
    doc.table(["step", "stage", "rows", "dropped here", "of the first step"],
              [[s["label"], s["stage"] or "", _fmt(s["rows"]), _fmt(s["dropped"]) if s["dropped"] else "",
                _pct(s["rows"], first)] for s in steps], "llrrr")
    doc.img("funnel.png", "funnel")
    if reasons:
        total_dropped = sum(n for _, _, n in reasons)
        doc.h(3, "Drop reasons")
        doc.table(["stage", "reason", "rows", "share of drops"],
                  [[st, r, _fmt(n), _pct(n, total_dropped)] for st, r, n in reasons], "llrr")
    details = files.get("details") or []
    if details:
        doc.h(3, "Input files that were not read completely")
        doc.table(["status", "path", "reason", "message"],
                  [[d.get("status", ""), d.get("path", ""), d.get("reason", ""), d.get("message", "")]
                   for d in details], "llll")

    doc.h(2, "CLIP similarity")
    if data.similarity_source == "scores":
        doc.p(f"Similarity of every scored row, kept or not ({len(data.score_files)} score files); "
              "rows at or above the subset's threshold are kept.")
    elif data.score_files:
        doc.p(f"The {len(data.score_files)} per-row fate files (`scored/*/fates-*.parquet`) hold no similarity: "
              "no image was downloaded and scored (see the drop reasons above); the histograms are empty.")
    else:
        doc.p("No per-row fate files (`scored/*/fates-*.parquet`) were found, so these histograms show "
              "the published (kept) rows only; everything below the threshold is missing from them.")
    rows = []
    for s in SUBSETS:
        sm = data.similarity[s].summary()
        if not sm["rows"]:
            rows.append([s, "0", "", "", "", "", "", f"{data.thresholds[s]:g}"])
            continue
        rows.append([s, _fmt(sm["rows"]), _fmt(sm["at_or_above_threshold"]),
                     _pct(sm["at_or_above_threshold"], sm["rows"]), f"{sm['min']:.3f}", f"{sm['median']:.3f}",
                     f"{sm['max']:.3f}", f"{data.thresholds[s]:g}"])
    doc.table(["subset", "rows", "≥ threshold", "share", "min", "median (binned)", "max", "threshold"], rows)
    doc.img("similarity.png", "similarity histograms")

    doc.h(2, "Languages")
    langs = _top_languages(data)
    n_lang = sum(n for _, _, n in langs)
    if langs:
        doc.table(["LANGUAGE", "subset", "pairs", "share"],
                  [[lang, s, _fmt(n), _pct(n, n_lang)] for lang, s, n in langs[:TOP_LANGUAGES]], "llrr")
        if len(langs) > TOP_LANGUAGES:
            doc.p(f"{len(langs) - TOP_LANGUAGES} more (language, subset) values not shown.")
    else:
        doc.p("No published rows.")
    doc.img("languages.png", "top languages")

    doc.h(2, "Image sizes")
    sz = data.sizes.summary()
    if sz["rows"]:
        doc.table(["", "min", "p10", "median", "p90", "max"],
                  [[k.upper()] + [_fmt(sz[k][q]) for q in ("min", "p10", "median", "p90", "max")]
                   for k in ("width", "height")], "lrrrrr")
        doc.p(f"{_fmt(sz['square'])} square, {_fmt(sz['landscape'])} landscape, {_fmt(sz['portrait'])} portrait"
              + (f" (in a sample of {_fmt(len(data.sizes.sample))} of {_fmt(sz['rows'])} pairs)" if sz["sampled"]
                 else "") + ". Sizes are those of the original images (LAION-5B's WIDTH / HEIGHT).")
    else:
        doc.p("No published rows.")
    doc.img("image_sizes.png", "image sizes")

    summary = {
        "output": data.output,
        "kept_per_subset": {s: int(kept.get(s, 0)) for s in SUBSETS},
        "kept_total": kept_total,
        "shard_rows": {s: int(data.shard_rows.get(s, 0)) for s in SUBSETS},
        "thresholds": data.thresholds,
        "models": data.models,
        "funnel": steps,
        "drop_reasons": [{"stage": st, "reason": r, "rows": n} for st, r, n in reasons],
        "similarity_source": data.similarity_source,
        "similarity": {s: data.similarity[s].summary() for s in SUBSETS},
        "languages": [{"language": lang, "subset": s, "rows": n} for lang, s, n in langs],
        "image_sizes": sz,
    }
    return doc, summary


# --------------------------------------------------------------------------- entry point
def write_report(output_dir: str, report_dir: str | None = None) -> str:
    """Write ``report.md`` (+ ``report.html``, ``summary.json``, PNG plots); returns the path of ``report.md``.

    ``report_dir`` defaults to ``OUTPUT/report``. Remote outputs (``s3://...``)
    are read with fsspec; the report is written locally and copied there.
    """
    data = _load(output_dir)
    steps, reasons = _funnel(data.stats)
    doc, summary = _build_document(data, steps, reasons)

    target = report_dir or posixpath.join(output_dir.rstrip("/"), "report")
    with report_folder(target) as work:
        _plot_funnel(steps, reasons, work / "funnel.png")
        _plot_similarity(data, work / "similarity.png")
        _plot_languages(data, work / "languages.png")
        _plot_sizes(data, work / "image_sizes.png")
        (work / "report.md").write_text(doc.markdown(), encoding="utf-8")
        title = f"laionbuild report: {(data.config.get('run') or {}).get('name') or 'laionbuild'}"
        (work / "report.html").write_text(doc.html(title), encoding="utf-8")
        (work / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
    path = str(work / "report.md") if _is_local(target) else target.rstrip("/") + "/report.md"
    log.info("report: %s", path)
    return path


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


@contextlib.contextmanager
def report_folder(target: str) -> Iterator[Path]:
    """A local folder to write a report into; for a remote ``target`` its files are copied there at the end."""
    local = _is_local(target)
    if target.startswith("file://"):
        target = target[len("file://"):]
    work = Path(target) if local else Path(tempfile.mkdtemp(prefix="laionbuild-report-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
        if not local:
            tfs, troot = open_fs(target)
            tfs.makedirs(troot, exist_ok=True)
            for f in sorted(work.iterdir()):
                tfs.put(str(f), posixpath.join(troot, f.name))
    finally:
        if not local:
            shutil.rmtree(work, ignore_errors=True)


__all__ = ["report_folder", "write_report"]
