"""``laionbuild report``: markdown/HTML/summary and plots from a small fake output folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from laionbuild import schema as S
from laionbuild.report import write_report
from laionbuild.runner.score import fate_table
from laionbuild.schema import NOLANG_CODE, OUTPUT_SCHEMA, pair_hash
from laionbuild.stats import FileResult, RunStats
from output_units import commit_units

THRESHOLDS = {"en": 0.30, "multi": 0.25, "nolang": 0.22}
#: kept rows per subset and their languages
KEPT = {"en": ["en"] * 7, "multi": ["de"] * 4 + ["fr"] * 3 + ["es"] * 2, "nolang": [NOLANG_CODE] * 3}
#: scored rows below the threshold per subset
BELOW = {"en": 5, "multi": 2, "nolang": 4}


def _stats() -> dict:
    st = RunStats()
    st.files = [FileResult("a.warc.gz"), FileResult("b.warc.gz", "partial", "truncated", "gzip ended early")]
    ex = st.stage("extract")
    ex.kept = 60
    ex.drop("no_alt", 25)
    ex.drop("alt_too_short", 9)
    ex.drop("excluded_extension", 6)
    ex.count("imgs", 100)
    st.stage("langid").kept = 60
    de = st.stage("dedup")
    de.kept = 50
    de.drop("already_in_output", 0)
    de.drop("duplicate", 10)
    fe = st.stage("fetch")
    fe.kept = 40
    fe.drop("http_404", 2)
    fe.drop("timeout", 8)
    cl = st.stage("clip")
    cl.kept = 19
    cl.drop("below_threshold", 21)
    for s, langs in KEPT.items():
        st.kept_per_subset[s] = len(langs)
    st.extra["config_hash"] = "abc123def4567890"
    st.extra["wall_seconds"] = 12.5
    st.extra["laion_filter"] = {"enabled": False, "stage": "laion_filter"}
    return st.to_dict()


def _fate_batch(scores: list[dict]) -> dict[str, np.ndarray]:
    """Scored rows as the batch the fate writer of the score phase takes."""
    n = len(scores)
    return {S.URL: np.array([f"http://img.test/{i}.jpg" for i in range(n)], dtype=object),
            S.ALT_TEXT: np.array([f"caption {i}" for i in range(n)], dtype=object),
            S.HASH: np.arange(n, dtype=np.int64),
            S.SUBSET: np.array([r["subset"] for r in scores], dtype=object),
            S.LANGUAGE: np.array([r["language"] for r in scores], dtype=object),
            S.STATUS: np.array(["success"] * n, dtype=object),
            S.SIMILARITY: np.array([r["similarity"] for r in scores], dtype=np.float32),
            S.DROP_REASON: np.array(["" for _ in scores], dtype=object),
            S.WIDTH: np.array([r["width"] for r in scores], dtype=np.int32),
            S.HEIGHT: np.array([r["height"] for r in scores], dtype=np.int32)}


def _shard(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


def _make_output(root: Path, with_scores: bool = True, with_config: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "stats.json").write_text(json.dumps(_stats()), encoding="utf-8")
    if with_config:
        (root / "config.yaml").write_text(yaml.safe_dump({
            "run": {"name": "fake-run"},
            "clip": {"thresholds": THRESHOLDS,
                     "models": {"en": {"arch": "ViT-B-32", "pretrained": "openai"}}},
        }), encoding="utf-8")
    rng = np.random.default_rng(0)
    scores = []
    sizes = iter([(640, 480), (480, 640), (300, 300), (1024, 768), (50, 50), (800, 200), (200, 800)] * 10)
    for s, langs in KEPT.items():
        rows = []
        for i, lang in enumerate(langs):
            w, h = next(sizes)
            sim = THRESHOLDS[s] + 0.01 + 0.1 * rng.random()
            url, text = f"http://img.test/{s}/{i}.jpg", f"caption {s} {i}"
            rows.append({"URL": url, "TEXT": text, "WIDTH": w, "HEIGHT": h, "similarity": sim, "LANGUAGE": lang,
                         "hash": pair_hash(url, text), "language_score": 0.9, "page_url": "http://p.test/",
                         "warc_path": "a.warc.gz", "warc_record_id": "<urn:x>", "warc_offset": i, "key": f"{i:016x}"})
            scores.append({"subset": s, "similarity": sim, "language": lang, "width": w, "height": h})
        for j in range(BELOW[s]):
            scores.append({"subset": s, "similarity": THRESHOLDS[s] - 0.01 - 0.1 * rng.random(),
                           "language": langs[0], "width": 100, "height": 100})
        (root / s).mkdir()
        half = len(rows) // 2
        pq.write_table(_shard(rows[:half]), root / s / "part-00000.parquet")
        pq.write_table(_shard(rows[half:]), root / s / "part-00001.parquet")
    if with_scores:
        (root / "scored" / "g0000-b00000-00").mkdir(parents=True)
        pq.write_table(fate_table(_fate_batch(scores[::2])), root / "scored" / "g0000-b00000-00" / "fates-aaaa.parquet")
        pq.write_table(fate_table(_fate_batch(scores[1::2])),
                       root / "scored" / "g0000-b00000-00" / "fates-bbbb.parquet")
        # the part of a shard an interrupted run left uncommitted: report does not count it
        (root / "scored" / "g0000-b00001-00").mkdir(parents=True)
        pq.write_table(fate_table(_fate_batch(scores)),
                       root / "scored" / "g0000-b00001-00" / "fates-cccc.parquet")
    commit_units(root, skip=("g0000-b00001-00",))
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = _make_output(tmp_path_factory.mktemp("out") / "output")
    path = write_report(str(out))
    return out, Path(path)


def test_files_are_written(report):
    out, md = report
    assert md == out / "report" / "report.md"
    for name in ("report.md", "report.html", "summary.json", "funnel.png", "similarity.png", "languages.png",
                 "image_sizes.png"):
        f = out / "report" / name
        assert f.is_file() and f.stat().st_size > 200, name
        if name.endswith(".png"):
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # stats.json is left as it was
    assert json.loads((out / "stats.json").read_text()) == _stats()


def test_summary_numbers(report):
    out, _ = report
    s = json.loads((out / "report" / "summary.json").read_text())
    assert s["kept_per_subset"] == {"en": 7, "multi": 9, "nolang": 3}
    assert s["kept_total"] == 19 and s["shard_rows"] == {"en": 7, "multi": 9, "nolang": 3}
    assert s["thresholds"] == THRESHOLDS
    assert s["models"]["en"] == "ViT-B-32 / openai"
    # the default fills the gap, its text tower named
    assert s["models"]["multi"] == "ViT-B-32 / openai (text: sentence-transformers/clip-ViT-B-32-multilingual-v1)"
    funnel = [(f["stage"], f["rows"]) for f in s["funnel"]]
    assert funnel == [("", 100), ("extract", 60), ("langid", 60), ("dedup", 50), ("fetch", 40), ("clip", 19)]
    reasons = [(r["stage"], r["reason"], r["rows"]) for r in s["drop_reasons"]]
    assert reasons[0] == ("extract", "no_alt", 25)
    assert ("dedup", "duplicate", 10) in reasons and ("fetch", "timeout", 8) in reasons
    assert all(r[2] > 0 for r in reasons)
    assert s["similarity_source"] == "scores"
    for subset in ("en", "multi", "nolang"):
        sim = s["similarity"][subset]
        assert sim["rows"] == len(KEPT[subset]) + BELOW[subset]
        assert sim["at_or_above_threshold"] == len(KEPT[subset])
    langs = {(l["language"], l["subset"]): l["rows"] for l in s["languages"]}
    assert langs == {("en", "en"): 7, ("de", "multi"): 4, ("fr", "multi"): 3, ("es", "multi"): 2,
                     (NOLANG_CODE, "nolang"): 3}
    assert s["languages"][0]["language"] == "en"
    sz = s["image_sizes"]
    assert sz["rows"] == 19 and not sz["sampled"]
    assert sz["width"]["min"] == 50 and sz["width"]["max"] == 1024
    assert sz["portrait"] == 5 and sz["square"] == 6 and sz["landscape"] == 8


def test_markdown_content(report):
    out, md = report
    text = md.read_text(encoding="utf-8")
    assert "# laionbuild report: fake-run" in text
    assert "safety filter (NSFW tag, underage and animal drops): **off**" in text
    assert "| en | 7 |" in text and "| multi | 9 |" in text and "| nolang | 3 |" in text
    assert "**19**" in text
    assert "| extract | no_alt | 25 |" in text
    assert "b.warc.gz" in text and "truncated" in text  # the partial file is listed
    assert "abc123def4567890" in text
    for png in ("funnel.png", "similarity.png", "languages.png", "image_sizes.png"):
        assert f"]({png})" in text
    assert "every scored row" in text
    htm = (out / "report" / "report.html").read_text(encoding="utf-8")
    assert '<img src="funnel.png"' in htm and "<table>" in htm and "fake-run" in htm


def test_without_scores_or_config(tmp_path):
    out = _make_output(tmp_path / "o", with_scores=False, with_config=False)
    path = write_report(str(out), str(tmp_path / "rep"))
    assert Path(path) == tmp_path / "rep" / "report.md"
    s = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert s["similarity_source"] == "shards"
    assert s["thresholds"] == {"en": 0.28, "multi": 0.26, "nolang": 0.26}
    # only the published rows are in the histograms
    assert {k: v["rows"] for k, v in s["similarity"].items()} == {"en": 7, "multi": 9, "nolang": 3}
    text = Path(path).read_text(encoding="utf-8")
    assert "published (kept) rows only" in text and "config.yaml not found" in text
    assert (tmp_path / "rep" / "similarity.png").is_file()


def test_empty_output(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    st = RunStats()
    st.files = [FileResult("x.warc.gz", "failed", "not_a_warc", "bad magic")]
    (out / "stats.json").write_text(st.to_json(), encoding="utf-8")
    path = write_report(str(out))
    s = json.loads((out / "report" / "summary.json").read_text())
    assert s["kept_total"] == 0 and s["image_sizes"] == {"rows": 0}
    assert "not_a_warc" in Path(path).read_text(encoding="utf-8")
    for png in ("funnel.png", "similarity.png", "languages.png", "image_sizes.png"):
        assert (out / "report" / png).is_file()


def test_missing_stats_is_a_setup_error(tmp_path):
    from laionbuild.errors import SetupError

    with pytest.raises(SetupError):
        write_report(str(tmp_path))


def test_funnel_stage_that_only_removes_rows():
    from laionbuild.report import _funnel

    stats = {"stages": {
        "extract": {"kept": 10, "dropped_by_reason": {"no_alt": 5}, "counts": {"imgs": 15}},
        "fetch": {"kept": 8, "dropped_by_reason": {"http_error_404": 2}},
        "dedup": {"kept": 7, "dropped_by_reason": {"duplicate_en": 1}},
        "blocklist": {"kept": 0, "dropped_by_reason": {"urls.txt": 2}},
    }, "kept_total": 5}
    steps, reasons = _funnel(stats)
    assert [s["rows"] for s in steps] == [15, 10, 8, 7, 5]
    assert steps[-1]["label"] == "after block lists"
    assert ("blocklist", "urls.txt", 2) in reasons


@pytest.mark.slow
def test_report_command_on_an_fsspec_output(tmp_path, capsys):
    """``laionbuild report URL`` reads an object-store output (memory:// stands in for s3://)."""
    import fsspec

    from laionbuild.cli import main

    local = _make_output(tmp_path / "output")
    fs = fsspec.filesystem("memory")
    url = f"memory://report-test-{tmp_path.name}/output"
    fs.put(str(local), url, recursive=True)
    assert main(["report", url]) == 0
    report_dir = url.rstrip("/") + "/report"
    with fs.open(report_dir + "/summary.json", "rb") as fh:
        summary = json.load(fh)
    assert summary["shard_rows"] == {s: len(langs) for s, langs in KEPT.items()}   # read the remote shards
    for name in ("report.md", "report.html", "funnel.png", "similarity.png"):
        assert fs.exists(report_dir + "/" + name), name
    assert main(["report", url.rstrip("/") + "-missing"]) == 2
    assert "holds no stats.json" in capsys.readouterr().err


def test_similarity_bars_have_one_width_each_for_every_grouping():
    """Grouping the 400 bins by a number that does not divide them (3, 7, 11...) gave one bar
    more than widths, and the report stopped on a shape mismatch."""
    from laionbuild.report import SIM_EDGES, _group_edges, _regroup

    ones = np.ones(len(SIM_EDGES) - 1, dtype=np.int64)
    for group in range(1, 41):
        left, widths = _group_edges(group)
        bars = _regroup(ones, group)
        assert len(left) == len(widths) == len(bars), group
        assert bars.sum() == 400 and np.isclose(widths.sum(), 2.0) and (widths > 0).all()


def test_an_empty_stats_object_gives_a_report(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "stats.json").write_text("{}", encoding="utf-8")
    assert Path(write_report(str(out))).is_file()


def test_a_folder_whose_new_run_removed_stats_json_reports_its_published_generation(tmp_path):
    """A run into a published folder removes stats.json until it ends; the published generation
    keeps the stats of the run that published it, and the report is of what readers see."""
    from laionbuild.output.layout import OutputLayout

    out = _make_output(tmp_path / "output")
    layout = OutputLayout(str(out))
    files = {s: [str(p) for p in sorted((out / s).glob("*.parquet"))] for s in KEPT}
    layout.commit_published(3, files, {s: len(v) for s, v in KEPT.items()})
    layout.write_generation_stats((out / "stats.json").read_bytes())
    assert (out / "_generations" / "g0003-stats.json").is_file()
    (out / "stats.json").unlink()  # a new run has started
    path = write_report(str(out))
    text = Path(path).read_text(encoding="utf-8")
    assert "published generation 3" in text and "stats.json is absent" in text
    # a newer generation's publish keeps its run's stats before its pointer names it, then
    # removes the older generation's: a kill between the two steps never leaves it without stats
    layout.commit_published(4, files, {s: len(v) for s, v in KEPT.items()}, stats=(out / "_generations" /
                                                                                  "g0003-stats.json").read_bytes())
    assert not (out / "_generations" / "g0003-stats.json").exists()
    assert "published generation 4" in Path(write_report(str(out))).read_text(encoding="utf-8")
    # without stats (a publish of an older version), the folder says it is unfinished
    layout.commit_published(5, files, {s: len(v) for s, v in KEPT.items()})
    with pytest.raises(Exception, match="no stats.json"):
        write_report(str(out))
