"""``laionbuild compare``: a synthetic output folder against a reference with planted disagreements.

The output folder follows the runner's layout (candidates, work shards, fates,
published shards) and is written directly by the test. Every pair below has a
known fate on our side and a known presence in the reference, so every figure
of ``compare.json`` is known in advance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from laionbuild import cli
from laionbuild.compare import UrlSet, compare, drop_category, filter_reference_file, write_compare
from laionbuild.errors import SetupError
from laionbuild.schema import pair_hash
from output_units import commit_units

THRESHOLDS = {"en": 0.28, "multi": 0.26, "nolang": 0.26}
NAN = math.nan

# (URL, TEXT, subset, LANGUAGE, fate, similarity); fate "" = kept and published in its subset,
# "ws" = in a work shard but not scored yet, "dup" = lost the de-dup (not in the work shards)
OURS = [
    ("http://a/e1.jpg", "a red car", "en", "en", "", 0.35),
    ("http://a/e2.jpg", "a blue boat", "en", "en", "", 0.40),
    ("http://a/e3.jpg", "a green tree", "en", "en", "", 0.31),  # reference hash differs
    ("http://a/e4.jpg", "a dog", "en", "en", "clip:below_threshold", 0.25),  # reference kept it: 0.29
    ("http://a/e5.jpg", "a cat", "en", "en", "fetch:http_error_404", NAN),
    ("http://a/e6.jpg", "ein Haus am See", "multi", "de", "", 0.30),  # reference: en
    ("http://a/e7.jpg", "our alt text", "en", "en", "", 0.33),  # reference: another alt text
    ("http://a/e8.jpg", "a lamp", "en", "en", "", 0.285),  # not in reference, near the threshold
    ("http://a/e9.jpg", "a chair", "en", "en", "", 0.50),  # URL not in reference
    ("http://a/e10.jpg", "first text", "en", "en", "", 0.33),  # won the de-dup of its URL
    ("http://a/e10.jpg", "second text", "en", "en", "dup", NAN),  # reference has this one
    ("http://a/e11.jpg", "a girl", "en", "en", "laion_filter:underage_word", NAN),
    ("http://a/e12.jpg", "a logo", "en", "en", "blocklist:urls.txt", NAN),
    ("http://a/e13.jpg", "a shoe", "en", "en", "clip:below_threshold", 0.20),  # reference lacks it too
    ("http://a/e14.jpg", "a hat", "en", "en", "fetch:timeout", NAN),  # reference lacks it too
    ("http://a/e15.jpg", "a pen", "en", "en", "ws", NAN),  # reference kept it
    ("http://a/m1.jpg", "ein Hund", "multi", "de", "", 0.30),
    ("http://a/m2.jpg", "un chat", "multi", "fr", "", 0.27),  # reference LANGUAGE es
    ("http://a/m3.jpg", "Haus", "en", "en", "", 0.32),  # reference: multi, de
    ("http://a/m4.jpg", "une table", "multi", "fr", "", 0.35),  # URL not in reference
    ("http://a/n1.jpg", "12345", "nolang", "und", "", 0.30),  # subset absent from the reference
]
# (URL, TEXT, similarity, hash or None = the right one)
REF_EN = [
    ("http://a/e1.jpg", "a red car", 0.34, None),
    ("http://a/e1.jpg", "a red car", 0.34, None),  # duplicate row
    ("http://a/e2.jpg", "a blue boat", 0.42, None),
    ("http://a/e3.jpg", "a green tree", 0.30, 12345),
    ("http://a/e4.jpg", "a dog", 0.29, None),
    ("http://a/e5.jpg", "a cat", 0.33, None),
    ("http://a/e6.jpg", "ein Haus am See", 0.31, None),
    ("http://a/e7.jpg", "their alt text", 0.32, None),
    ("http://a/e10.jpg", "second text", 0.30, None),
    ("http://a/e11.jpg", "a girl", 0.35, None),
    ("http://a/e12.jpg", "a logo", 0.36, None),
    ("http://a/e15.jpg", "a pen", 0.30, None),
]
FILLER = 300  # reference rows of pages this run never read
# (URL, TEXT, similarity, LANGUAGE)
REF_MULTI = [
    ("http://a/m1.jpg", "ein Hund", 0.31, "de"),
    ("http://a/m2.jpg", "un chat", 0.28, "es"),
    ("http://a/m3.jpg", "Haus", 0.30, "de"),
    ("http://z/other.jpg", "autre", 0.40, "fr"),
]


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _make_output(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"run": {"dedup_key": "url"},
                                                      "clip": {"thresholds": THRESHOLDS}}))
    cands, ws, fates = [], [], []
    published = {"en": [], "multi": [], "nolang": []}
    for i, (url, text, subset, lang, fate, sim) in enumerate(OURS):
        h = pair_hash(url, text)
        cand = {"URL": url, "TEXT": text, "page_url": f"http://a/page{i}.html", "warc_path": "x.warc.gz",
                "warc_record_id": f"<urn:{i}>", "warc_offset": i, "hash": h, "LANGUAGE": lang,
                "language_score": 0.9, "subset": subset, "nolang_reason": ""}
        cands.append(cand)
        if fate == "dup":
            continue
        ws.append(cand)
        if fate == "ws":
            continue
        kept = fate == ""
        fates.append({"URL": url, "TEXT": text, "hash": h, "subset": subset, "LANGUAGE": lang,
                      "status": "" if fate.startswith("blocklist") else
                      ("http_error_404" if "404" in fate else "timeout" if "timeout" in fate else "success"),
                      "similarity": np.float32(sim).item(), "drop_reason": fate,
                      "WIDTH": 640, "HEIGHT": 480, "punsafe": None if math.isnan(sim) else sim / 2})
        if kept:
            published[subset].append({"URL": url, "TEXT": text, "WIDTH": 640, "HEIGHT": 480,
                                      "similarity": np.float32(sim).item(), "LANGUAGE": lang, "hash": h})
    # the same candidate extracted twice (two pages): one pair
    cands.append(dict(cands[0], page_url="http://a/again.html"))
    _write(root / "candidates" / "f0.parquet", cands[:10])
    _write(root / "candidates" / "f1.parquet", cands[10:])
    _write(root / "workshards" / "s0.parquet", ws[:8])
    _write(root / "workshards" / "s1.parquet", ws[8:])
    scored_ws = {(r["URL"], r["TEXT"]) for r in ws[:8]}
    _write(root / "scored" / "s0" / "fates-0.parquet", [r for r in fates if (r["URL"], r["TEXT"]) in scored_ws])
    _write(root / "scored" / "s1" / "fates-0.parquet",
           [r for r in fates if (r["URL"], r["TEXT"]) not in scored_ws])
    for subset, rows in published.items():
        _write(root / subset / "part-00000.parquet", rows)
    # leftovers of an interrupted run (no marker): compare reads none of them
    _write(root / "candidates" / "f9.parquet", cands[:3])
    _write(root / "scored" / "s9" / "fates-0.parquet", fates[:3])
    commit_units(root, skip=("f9", "s9"))
    return root


def _make_reference(root: Path) -> Path:
    rows = [{"SAMPLE_ID": i, "URL": u, "TEXT": t, "HEIGHT": 480, "WIDTH": 640, "similarity": s,
             "hash": pair_hash(u, t) if h is None else h, "punsafe": s / 2, "pwatermark": 0.1}
            for i, (u, t, s, h) in enumerate(REF_EN)]
    rows += [{"SAMPLE_ID": 1000 + i, "URL": f"http://x/{i}.jpg", "TEXT": f"filler {i}", "HEIGHT": 10,
              "WIDTH": 10, "similarity": 0.3, "hash": i, "punsafe": 0.0, "pwatermark": 0.0} for i in range(FILLER)]
    _write(root / "laion2B-en" / "part-00000-c000.snappy.parquet", rows)
    # Re-LAION-5B spells some columns in lower case
    _write(root / "relaion2B-multi-research-safe" / "part-00000.parquet",
           [{"url": u, "caption": t, "width": 640, "height": 480, "similarity": s, "hash": pair_hash(u, t),
             "language": lang} for u, t, s, lang in REF_MULTI])
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("compare")
    return _make_output(base / "out"), _make_reference(base / "ref")


@pytest.fixture(scope="module")
def result(folders) -> dict:
    out, ref = folders
    return write_compare(str(out), [str(ref / "*" / "*.parquet")], use_ray=False)


def _f32(x: float) -> float:
    return float(np.float32(x))


def _expected_similarity(pairs: list[tuple[float, float, float]]) -> dict:
    ours = np.array([_f32(o) for o, _, _ in pairs])
    ref = np.array([r for _, r, _ in pairs])
    thr = np.array([t for _, _, t in pairs])
    diff = np.abs(ours - ref)
    return {"rows": len(pairs), "pearson": float(np.corrcoef(ours, ref)[0, 1]),
            "mean_abs_diff": float(diff.mean()), "p99_abs_diff": float(np.percentile(diff, 99)),
            "other_side": int(((ours >= thr) != (ref >= thr)).sum())}


def test_reference_files_and_comparable_rows(result):
    ref = result["reference"]
    assert ref["subsets"] == ["en", "multi"]
    assert [(Path(f["path"]).parent.name, f["subset"], f["rows"], f["comparable"]) for f in ref["files"]] == [
        ("laion2B-en", "en", len(REF_EN) + FILLER, len(REF_EN)),
        ("relaion2B-multi-research-safe", "multi", len(REF_MULTI), 3),
    ]
    assert ref["rows_read"] == len(REF_EN) + FILLER + len(REF_MULTI)
    assert ref["comparable_rows"] == len(REF_EN) + 3
    ours = result["ours"]
    assert ours["candidate_rows"] == len(OURS) + 1
    assert ours["candidate_pairs"] == len(OURS)
    assert ours["candidate_urls"] == len(OURS) - 1
    assert ours["files"] == {"candidates": 2, "workshards": 2, "fates": 2, "published": 3}
    assert ours["dedup_key"] == "url"
    assert set(result["subsets"]) == {"en", "multi"}  # no nolang reference: no nolang figures


def test_en_figures(result):
    en = result["subsets"]["en"]
    assert en["comparable_reference_rows"] == 12
    assert en["reference_duplicate_rows"] == 1
    assert en["comparable_reference_pairs"] == 11
    assert en["kept_by_both"] == 3
    assert en["reference_only"] == {
        "pairs": 8,
        "by_category": {"alt_text": 1, "blocklist": 1, "dedup": 1, "fetch": 1, "language": 1, "pending": 1,
                        "safety": 1, "threshold": 1},
        "by_reason": {"alt_text:different_alt_text": 1, "blocklist:urls.txt": 1, "clip:below_threshold": 1,
                      "dedup:url": 1, "fetch:http_error_404": 1, "laion_filter:underage_word": 1,
                      "language:kept_in_multi": 1, "pending:not_scored": 1},
    }
    assert en["ours_only"] == {"pairs": 5, "by_likely_reason": {"alt_text": 2, "not_in_reference": 1,
                                                                "other_subset": 1, "threshold": 1}}
    d = en["decision"]
    assert (d["both_keep"], d["ours_keep_reference_not"], d["reference_keep_ours_not"], d["both_drop"]) == \
        (3, 5, 8, 2)
    assert d["pairs"] == 18
    assert d["agreement"] == pytest.approx(5 / 18, abs=1e-6)
    assert d["recall"] == pytest.approx(3 / 11, abs=1e-6)
    assert d["precision"] == pytest.approx(3 / 8, abs=1e-6)
    # scored by both: e1, e2, e3, e4 (ours below, theirs above) and e6 (scored by us as multi)
    exp = _expected_similarity([(0.35, 0.34, 0.28), (0.40, 0.42, 0.28), (0.31, 0.30, 0.28), (0.25, 0.29, 0.28),
                                (0.30, 0.31, 0.28)])
    sim = en["similarity"]
    assert sim["rows"] == 5
    assert sim["pearson"] == pytest.approx(exp["pearson"], abs=1e-5)
    assert sim["spearman"] == pytest.approx(0.9, abs=1e-6)
    assert sim["mean_abs_diff"] == pytest.approx(exp["mean_abs_diff"], abs=1e-5)
    assert sim["p99_abs_diff"] == pytest.approx(exp["p99_abs_diff"], abs=1e-5)
    assert sim["other_side_of_threshold"] == 1 == exp["other_side"]
    assert (sim["ours_below_reference_above"], sim["ours_above_reference_below"]) == (1, 0)
    assert en["hash"] == {"pairs": 3, "equal": 2, "rate": pytest.approx(2 / 3, abs=1e-6)}
    assert "language" not in en
    # punsafe of the pairs kept by both (e1, e2, e3); no pwatermark on our side
    ours_p, ref_p = np.array([0.35, 0.40, 0.31]) / 2, np.array([0.34, 0.42, 0.30]) / 2
    assert list(en["safety_scores"]) == ["punsafe"]
    assert en["safety_scores"]["punsafe"]["pairs"] == 3
    assert en["safety_scores"]["punsafe"]["pearson"] == pytest.approx(np.corrcoef(ours_p, ref_p)[0, 1], abs=1e-6)
    assert en["safety_scores"]["punsafe"]["mean_abs_diff"] == pytest.approx(np.abs(ours_p - ref_p).mean(), abs=1e-6)
    assert en["threshold"] == 0.28


def test_multi_figures(result):
    m = result["subsets"]["multi"]
    assert m["comparable_reference_pairs"] == 3
    assert m["kept_by_both"] == 2
    assert m["reference_only"] == {"pairs": 1, "by_category": {"language": 1},
                                   "by_reason": {"language:kept_in_en": 1}}
    assert m["ours_only"] == {"pairs": 2, "by_likely_reason": {"not_in_reference": 1, "other_subset": 1}}
    d = m["decision"]
    assert (d["both_keep"], d["ours_keep_reference_not"], d["reference_keep_ours_not"], d["both_drop"]) == \
        (2, 2, 1, 0)
    assert d["agreement"] == pytest.approx(2 / 5, abs=1e-6)
    sim = m["similarity"]
    exp = _expected_similarity([(0.30, 0.31, 0.26), (0.27, 0.28, 0.26), (0.32, 0.30, 0.26)])
    assert sim["rows"] == 3
    assert sim["pearson"] == pytest.approx(exp["pearson"], abs=1e-5)
    assert sim["spearman"] == pytest.approx(0.5, abs=1e-6)
    assert sim["other_side_of_threshold"] == 0
    assert m["hash"] == {"pairs": 2, "equal": 2, "rate": 1.0}
    assert "safety_scores" not in m  # the multi reference has no punsafe
    lang = m["language"]
    assert (lang["pairs"], lang["agree"], lang["kept_by_both"], lang["kept_by_both_agree"]) == (3, 1, 2, 1)
    assert lang["disagreements"] == [{"reference": "de", "ours": "en", "pairs": 1},
                                     {"reference": "es", "ours": "fr", "pairs": 1}]


def test_overall_figures(result):
    o = result["overall"]
    assert o["comparable_reference_pairs"] == 14
    assert o["kept_by_both"] == 7  # a pair kept in another subset still agrees on keeping
    assert o["reference_only"]["pairs"] == 7
    assert o["reference_only"]["by_category"] == {"alt_text": 1, "blocklist": 1, "dedup": 1, "fetch": 1,
                                                  "pending": 1, "safety": 1, "threshold": 1}
    assert o["ours_only"] == {"pairs": 5, "by_likely_reason": {"alt_text": 2, "not_in_reference": 2,
                                                               "threshold": 1}}
    d = o["decision"]
    assert (d["both_keep"], d["ours_keep_reference_not"], d["reference_keep_ours_not"], d["both_drop"]) == \
        (7, 5, 7, 2)
    assert d["agreement"] == pytest.approx(9 / 21, abs=1e-6)
    assert o["similarity"]["rows"] == 8
    assert o["similarity"]["other_side_of_threshold"] == 1
    assert o["hash"] == {"pairs": 7, "equal": 6, "rate": pytest.approx(6 / 7, abs=1e-6)}
    assert (o["language"]["pairs"], o["language"]["agree"]) == (3, 1)


def test_report_files(folders, result):
    out, _ = folders
    folder = out / "compare"
    for name in ("compare.json", "compare.md", "compare.html", "similarity.png", "decisions.png",
                 "disagreements.png"):
        assert (folder / name).stat().st_size > 0, name
    assert json.loads((folder / "compare.json").read_text()) == json.loads(json.dumps(result))
    md = (folder / "compare.md").read_text()
    assert "| en | 11 | 3 | 8 | 5 | 27.8% |" in md
    assert "language:kept_in_multi" in md and "![similarity ours vs reference](similarity.png)" in md
    assert "<table>" in (folder / "compare.html").read_text()


def test_reference_is_streamed_in_batches(folders, result, tmp_path):
    out, ref = folders
    small = compare(str(out), [str(ref / "*" / "*.parquet")], batch_rows=50, use_ray=False)
    files = small["reference"]["files"]
    assert [f["batches"] for f in files] == [math.ceil((len(REF_EN) + FILLER) / 50), 1]
    assert small["subsets"] == json.loads(json.dumps(result["subsets"]))
    assert small["overall"] == result["overall"]


def test_filter_reference_file_reads_only_the_needed_columns(folders):
    _, ref = folders
    fs = fsspec.filesystem("file")
    path = str(ref / "laion2B-en" / "part-00000-c000.snappy.parquet")
    table, info = filter_reference_file(fs, path, pa.array(["http://a/e1.jpg", "http://a/e9.jpg"]), batch_rows=64)
    assert info["columns"] == ["HEIGHT", "TEXT", "URL", "WIDTH", "hash", "punsafe", "pwatermark", "similarity"]
    assert "SAMPLE_ID" not in table.column_names
    assert table.column("URL").to_pylist() == ["http://a/e1.jpg", "http://a/e1.jpg"]
    assert table.column("ref_subset").to_pylist() == ["en", "en"]
    assert info["batches"] == math.ceil((len(REF_EN) + FILLER) / 64)
    # a candidate set larger than a batch is looked up in a Python set: same rows
    urls = pa.array([f"http://x/{i}.jpg" for i in range(0, 200, 3)] + ["http://a/e1.jpg"])
    small_set, _ = filter_reference_file(fs, path, UrlSet(urls, batch_rows=256), batch_rows=64)
    large_set, _ = filter_reference_file(fs, path, UrlSet(urls, batch_rows=8), batch_rows=64)
    assert UrlSet(urls, batch_rows=8)._set is not None and UrlSet(urls, batch_rows=256)._set is None
    assert small_set.num_rows == 67 + 2
    assert large_set.equals(small_set)


def test_fsspec_urls(folders, result):
    out, ref = folders
    mem = fsspec.filesystem("memory")
    for local, prefix in ((out, "/cmp-out"), (ref, "/cmp-ref")):
        for f in local.rglob("*"):
            if f.is_file() and "compare" not in f.parts[len(local.parts):]:
                mem.pipe(prefix + "/" + f.relative_to(local).as_posix(), f.read_bytes())
    remote = write_compare("memory://cmp-out", ["memory://cmp-ref/laion2B-en/*.parquet",
                                                "memory://cmp-ref/relaion2B-multi-research-safe"],
                           batch_rows=100, use_ray=False)
    assert remote["subsets"] == json.loads(json.dumps(result["subsets"]))
    assert remote["overall"] == result["overall"]
    assert json.loads(mem.cat("/cmp-out/compare/compare.json"))["overall"]["kept_by_both"] == 7
    assert mem.exists("/cmp-out/compare/similarity.png")


def test_subset_option_and_guessing(folders, tmp_path):
    out, ref = folders
    # an unnamed file without LANGUAGE: the subset must be given
    unnamed = tmp_path / "slice.parquet"
    unnamed.write_bytes((ref / "laion2B-en" / "part-00000-c000.snappy.parquet").read_bytes())
    with pytest.raises(SetupError, match="--subset"):
        compare(str(out), [str(unnamed)], use_ray=False)
    got = compare(str(out), [str(unnamed)], subset="en", use_ray=False)
    assert list(got["subsets"]) == ["en"]
    assert got["subsets"]["en"]["kept_by_both"] == 3
    # only the en reference: m3 (kept by us in en, in the multi reference) is now "not in reference" for en
    assert got["subsets"]["en"]["ours_only"]["by_likely_reason"] == {"alt_text": 2, "not_in_reference": 2,
                                                                     "threshold": 1}


def test_drop_category():
    assert drop_category("fetch:http_error_404") == "fetch"
    assert drop_category("resize:decode_error") == "fetch"
    assert drop_category("clip:below_threshold") == "threshold"
    assert drop_category("clip:bad_image") == "fetch"
    assert drop_category("laion_filter:underage_word") == "safety"
    assert drop_category("blocklist:urls.txt") == "blocklist"
    assert drop_category("removed:0001-urls-x") == "blocklist"
    assert drop_category("something:else") == "other"


def test_cli(folders, tmp_path, capsys):
    out, ref = folders
    rc = cli.main(["compare", str(out), "--reference", str(ref / "laion2B-en" / "*.parquet"),
                   "--report-dir", str(tmp_path / "rep"), "--batch-rows", "100"])
    assert rc == 0
    got = json.loads((tmp_path / "rep" / "compare.json").read_text())
    assert got["reference"]["batches_read"] == 4
    assert got["subsets"]["en"]["kept_by_both"] == 3

    rc = cli.main(["compare", str(tmp_path / "missing"), "--reference", str(ref / "*" / "*.parquet")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "candidates" in err and len(err.splitlines()) == 1
    rc = cli.main(["compare", str(out), "--reference", str(tmp_path / "nothing" / "*.parquet")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "matches no parquet file" in err and len(err.splitlines()) == 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "laion2B-en.parquet").write_bytes(b"not parquet")
    rc = cli.main(["compare", str(out), "--reference", str(tmp_path / "bad" / "*.parquet")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "cannot read reference file" in err and len(err.splitlines()) == 1
    rc = cli.main(["compare", str(out), "--reference", str(ref / "*" / "*.parquet"), "--batch-rows", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--batch-rows" in err and len(err.splitlines()) == 1


@pytest.mark.ray
def test_reference_files_are_filtered_by_ray_tasks_when_ray_is_up(ray_session, folders, result, monkeypatch,
                                                                  tmp_path):
    from laionbuild import compare as compare_module

    out, ref = folders
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert compare_module.ray_attached()
    calls = []
    real = compare_module._filter_with_ray
    monkeypatch.setattr(compare_module, "_filter_with_ray", lambda *a: calls.append(a) or real(*a))
    got = compare(str(out), [str(ref / "*" / "*.parquet")], batch_rows=100)
    assert len(calls) == 1
    assert [f["batches"] for f in got["reference"]["files"]] == [4, 1]
    assert got["subsets"] == result["subsets"]
    assert got["overall"] == result["overall"]
    # a file a task cannot read: the task's one-line error, not Ray's traceback around it
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "laion2B-en.parquet").write_bytes(b"not parquet")
    with pytest.raises(SetupError) as err:
        compare(str(out), [str(bad / "*.parquet")], batch_rows=100)
    assert str(err.value).startswith("cannot read reference file") and "\n" not in str(err.value)
    assert len(calls) == 2


def test_an_output_never_deduplicated_is_pending_not_dedup(folders, tmp_path):
    """`laionbuild extract`, or a run stopped before phase 2: no work shards at all. Its pairs were
    put down to the de-dup, as if another row had won."""
    import shutil

    out, ref = folders
    copy = tmp_path / "extract-only"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("workshards", "scored", "en", "multi", "nolang",
                                                             "_published.json"))
    got = write_compare(str(copy), [str(ref / "*" / "*.parquet")], use_ray=False, report_dir=str(tmp_path / "r"))
    by_category = got["overall"]["reference_only"]["by_category"]
    assert set(by_category) == {"pending"} or set(by_category) <= {"pending", "alt_text", "language", "blocklist"}
    assert "dedup" not in by_category and by_category.get("pending", 0) > 0
