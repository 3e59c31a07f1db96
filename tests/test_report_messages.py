"""The report says true things on a run where every download failed, renders its emphasis, names
the text tower of each subset and draws readable axes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

from laionbuild import schema as S
from laionbuild.report import _plt, _thousands, write_report
from laionbuild.runner.score import fate_table
from laionbuild.stats import FileResult, RunStats
from output_units import commit_units

TEXT_MODEL = "sentence-transformers/clip-ViT-B-32-multilingual-v1"


def _all_failed_output(root: Path) -> Path:
    """An output whose 13 downloads all failed: one fate file, every similarity NaN, no shard rows."""
    root.mkdir(parents=True)
    st = RunStats()
    st.files = [FileResult("a.warc.gz")]
    fetch = st.stage("fetch")
    fetch.drop("dns_error", 13)
    fetch.count("attempted", 13)
    st.extra["laion_filter"] = {"enabled": False}
    (root / "stats.json").write_text(st.to_json(), encoding="utf-8")
    (root / "config.yaml").write_text(yaml.safe_dump({"clip": {"models": {
        "en": {"arch": "ViT-B-32", "pretrained": "openai", "text_model": ""},
        "multi": {"arch": "ViT-B-32", "pretrained": "openai", "text_model": TEXT_MODEL}}}}), encoding="utf-8")
    fates = root / "scored" / "g0000-b00000-00"
    fates.mkdir(parents=True)
    n = 13
    batch = {S.URL: np.array([f"http://x.test/{i}.jpg" for i in range(n)], dtype=object),
             S.ALT_TEXT: np.array(["t"] * n, dtype=object), S.HASH: np.arange(n, dtype=np.int64),
             S.SUBSET: np.array(["en"] * n, dtype=object), S.LANGUAGE: np.array(["en"] * n, dtype=object),
             S.STATUS: np.array(["dns_error"] * n, dtype=object),
             S.DROP_REASON: np.array(["fetch:dns_error"] * n, dtype=object)}  # no similarity: never scored
    pq.write_table(fate_table(batch), fates / "fates-aaaa.parquet")
    commit_units(root)
    return root


def test_all_failed_run_report_is_true(tmp_path):
    out = _all_failed_output(tmp_path / "out")
    md = Path(write_report(str(out))).read_text(encoding="utf-8")
    assert "No per-row fate files" not in md
    assert "1 per-row fate files" in md and "no image was downloaded" in md
    htm = (out / "report" / "report.html").read_text(encoding="utf-8")
    assert "**" not in htm
    assert "<strong>total</strong>" in htm
    assert "<strong>off</strong> (safety.laion_filter.enabled=false)" in htm


def test_clip_model_column_names_the_text_tower(tmp_path):
    out = _all_failed_output(tmp_path / "out")
    write_report(str(out))
    models = json.loads((out / "report" / "summary.json").read_text())["models"]
    assert models["en"] == "ViT-B-32 / openai"
    assert models["multi"] == f"ViT-B-32 / openai (text: {TEXT_MODEL})"


def test_an_empty_count_axis_reads_0_to_1():
    plt = _plt()
    fig, ax = plt.subplots()
    ax.bar([0.1, 0.2], [0, 0])
    _thousands(ax, "y")
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    plt.close(fig)
    assert "-0" not in labels
    assert len(labels) == len(set(labels)) and labels[0] == "0"


def test_log_axis_has_no_scientific_minor_labels():
    plt = _plt()
    fig, ax = plt.subplots()
    ax.plot([90, 150, 250, 400], [1, 2, 3, 4])
    ax.set_xscale("log")
    _thousands(ax, "x")
    fig.canvas.draw()
    minor = [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()]
    major = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    plt.close(fig)
    assert minor == []
    assert major and all(m.replace(",", "").isdigit() for m in major), major
    assert {"100", "200"} <= set(major)
