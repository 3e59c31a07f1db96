"""End to end through Ray on the generated demo sample: subsets, columns, stats, provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from laionbuild.config import load_config
from laionbuild.demo.run import SMOKE_CONFIG, compare_with_expectations, run_demo
from laionbuild.schema import pair_hash

pytestmark = pytest.mark.ray

LAION_COLUMNS = [("SAMPLE_ID", "int64"), ("URL", "string"), ("TEXT", "string"), ("WIDTH", "int32"), ("HEIGHT", "int32"),
                 ("similarity", "float"), ("LANGUAGE", "string"), ("hash", "int64")]


@pytest.fixture(scope="module")
def demo_run(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "out"
    result = run_demo(str(out), progress=False)
    from laionbuild.demo.sample_warc import DemoSample

    sample = DemoSample.load(str(Path(f"{out}-sample") / "manifest.json"))
    yield result, out, sample


def _rows(out: Path, subset: str) -> list[dict]:
    rows = []
    for f in sorted((out / subset).glob("*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return rows


def test_clean_run_exit_code_and_files(demo_run):
    result, out, _ = demo_run
    assert result.exit_code == 0
    for name in ("stats.json", "config.yaml", "provenance.json", "_SUCCESS"):
        assert (out / name).is_file(), name
    assert load_config(out / "config.yaml").resize.image_size == load_config(SMOKE_CONFIG).resize.image_size
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["config_hash"] and prov["package_versions"]["ray"]


def test_columns_are_laion_compatible(demo_run):
    _, out, _ = demo_run
    for subset in ("en", "multi", "nolang"):
        files = sorted((out / subset).glob("*.parquet"))
        assert files, subset
        schema = pq.read_schema(files[0])
        assert [(f.name, str(f.type)) for f in schema][: len(LAION_COLUMNS)] == LAION_COLUMNS
        for row in _rows(out, subset):
            assert row["hash"] == pair_hash(row["URL"], row["TEXT"])
            assert row["SAMPLE_ID"] is not None and row["SAMPLE_ID"] >= 0
            assert row["page_url"] and row["warc_path"] and row["warc_record_id"]


def test_subsets_hold_exactly_the_expected_pairs(demo_run):
    _, out, sample = demo_run
    check = compare_with_expectations(str(out), sample)
    for subset, row in check.items():
        assert row["expected"] >= 3, (subset, row)
        assert row["missing"] == 0 and row["unexpected"] == 0, (subset, row)


def test_mismatched_alt_texts_dropped_by_clip(demo_run):
    _, out, sample = demo_run
    kept = {(r["URL"], r["TEXT"]) for s in ("en", "multi", "nolang") for r in _rows(out, s)}
    mismatched = [e for e in sample.expectations if e.expected == "drop:clip"]
    assert len(mismatched) >= 3
    assert not kept & {(e.url, e.alt_text) for e in mismatched}
    stats = json.loads((out / "stats.json").read_text())
    clip_drops = stats["stages"]["clip"]["dropped_by_reason"]
    assert sum(v for k, v in clip_drops.items() if k.startswith("below_threshold")) == len(mismatched)


def test_languages_and_sizes(demo_run):
    _, out, sample = demo_run
    by_pair = {(e.url, e.alt_text): e for e in sample.expectations}
    for subset in ("en", "multi", "nolang"):
        for row in _rows(out, subset):
            e = by_pair[(row["URL"], row["TEXT"])]
            assert row["LANGUAGE"] == e.language
            if subset == "en":
                assert row["LANGUAGE"] == "en"
            if subset == "nolang":
                assert row["LANGUAGE"] == "und"
            assert (row["WIDTH"], row["HEIGHT"]) == (e.width, e.height)  # original size, not swapped
            thr = {"en": 0.28, "multi": 0.26, "nolang": 0.26}[subset]
            assert row["similarity"] >= thr


def test_stats_count_every_stage(demo_run):
    result, out, sample = demo_run
    stats = json.loads((out / "stats.json").read_text())
    st = stats["stages"]
    assert stats["files"]["total"] == len(sample.warc_paths) and stats["files"]["failed"] == 0
    # the published generation keeps the stats of the run that published it (read by report
    # while a later run into the folder has removed stats.json)
    generation = json.loads((out / "_published.json").read_text())["generation"]
    assert (out / "_generations" / f"g{generation:04d}-stats.json").read_bytes() == (out / "stats.json").read_bytes()
    assert st["extract"]["kept"] > 0 and st["extract"]["dropped_by_reason"]
    assert st["fetch"]["kept"] > 0
    failures = st["fetch"]["dropped_by_reason"]
    assert any(k.startswith("http_error_404") for k in failures), failures
    assert failures.get("opt_out", 0) >= 1
    # connection reuse and DNS work reach stats.json: every attempted download opened or reused one
    # connection at least, or failed before connecting
    counts = st["fetch"]["counts"]
    assert counts.get("connections_opened", 0) > 0 and counts.get("connections_reused", 0) > 0
    assert counts.get("connections_opened", 0) + counts.get("connections_reused", 0) >= st["fetch"]["kept"]
    assert stats["kept_total"] == sum(stats["kept_per_subset"].values())
    for subset in ("en", "multi", "nolang"):
        assert stats["kept_per_subset"][subset] == len(_rows(out, subset))
    # every candidate is accounted for: kept + dropped downstream == extracted
    downstream = sum(st[s]["dropped"] for s in ("fetch", "clip")) + st["dedup"]["dropped"]
    assert st["extract"]["kept"] == stats["kept_total"] + downstream


def test_compare_demo_output_with_planted_reference(demo_run, tmp_path):
    """A reference built from the demo's own published rows with planted changes: compare finds exactly them."""
    import pyarrow as pa

    from laionbuild.compare import compare

    _, out, sample = demo_run
    en = sorted(_rows(out, "en"), key=lambda r: (r["URL"], r["TEXT"]))
    cols = ["URL", "TEXT", "WIDTH", "HEIGHT", "similarity", "hash"]
    ref = [{c: r[c] for c in cols} for r in en]
    missing = ref.pop(0)  # 1: a pair we kept that the reference lacks
    ref[0]["similarity"] = 0.20  # 2: the reference scored it on the other side of the threshold
    ref[1]["hash"] = ref[1]["hash"] + 1  # 3: a hash that differs
    clip_drop = next(e for e in sample.expectations if e.expected == "drop:clip" and e.subset == "en")
    # 4: a pair the reference kept and our CLIP stage dropped
    ref.append({"URL": clip_drop.url, "TEXT": clip_drop.alt_text, "WIDTH": 64, "HEIGHT": 64, "similarity": 0.30,
                "hash": pair_hash(clip_drop.url, clip_drop.alt_text)})
    # 5: the reference's alt text for one of our URLs is another one
    other = ref[-2]
    other["TEXT"] = "a completely different caption"
    other["hash"] = pair_hash(other["URL"], other["TEXT"])
    path = tmp_path / "laion2B-en" / "part-00000.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(ref), path)
    result = compare(str(out), [str(path)], use_ray=False)
    e = result["subsets"]["en"]
    assert e["comparable_reference_pairs"] == len(en)
    assert e["kept_by_both"] == len(en) - 2
    assert e["reference_only"]["by_category"] == {"threshold": 1, "alt_text": 1}
    assert e["ours_only"] == {"pairs": 2, "by_likely_reason": {"not_in_reference": 1, "alt_text": 1}}
    assert e["similarity"]["other_side_of_threshold"] == 2  # the planted 0.20 and our CLIP drop at 0.30
    assert e["hash"]["pairs"] == len(en) - 2 and e["hash"]["equal"] == len(en) - 3
    assert missing["URL"] not in {r["URL"] for r in ref}
