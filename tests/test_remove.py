"""``laionbuild remove``: rows out of a published folder, everything else untouched, and they stay out."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laionbuild import cli
from laionbuild import schema as S
from laionbuild.config import load_config
from laionbuild.output.layout import OutputLayout
from laionbuild.stages.blocklist import filter_table
from laionbuild.stages.blocklist import Blocklist

pytestmark = pytest.mark.ray

DIRS = ("en", "multi", "nolang", "en_embeddings", "multi_embeddings", "nolang_embeddings")


def _snapshot(out: Path) -> dict[str, list[dict]]:
    """Published rows per file, named by folder and bucket (a rerun publishes a new generation)."""
    layout = OutputLayout(str(out))
    snap = {}
    for d in DIRS:
        subset, _, suffix = d.partition("_")
        for f in layout.published_files(subset, f"_{suffix}" if suffix else ""):
            snap[f"{d}/{re.sub(r'^part-g[0-9]{4}-', 'part-', Path(f).name)}"] = pq.read_table(f).to_pylist()
    return snap


def _raw(out: Path, name: str) -> bytes:
    """The bytes of the published file that :func:`_snapshot` calls ``name``."""
    folder, _, part = name.partition("/")
    (path,) = [f for f in (out / folder).glob("*.parquet")
               if re.sub(r"^part-g[0-9]{4}-", "part-", f.name) == part]
    return path.read_bytes()


def _tar_names(out: Path) -> set[str]:
    names = set()
    for f in sorted((out / "images").glob("*.tar")):
        with tarfile.open(fileobj=io.BytesIO(f.read_bytes())) as tar:
            names |= set(tar.getnames())
    return names


def _tar_pairs(out: Path) -> dict[str, tuple[str, str]]:
    """key -> (url, caption) of every image in the tars (duplicates of a published pair included)."""
    pairs = {}
    for f in sorted((out / "images").glob("*.tar")):
        with tarfile.open(fileobj=io.BytesIO(f.read_bytes())) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    pairs[meta["key"]] = (meta["url"], meta["caption"])
    return pairs


@pytest.fixture(scope="module")
def removed(ray_session, tmp_path_factory):
    from laionbuild.runner.run import run as run_pipeline
    from laionbuild.demo.run import run_demo

    root = tmp_path_factory.mktemp("remove")
    out = root / "out"
    result = run_demo(str(out), overrides=["clip.save_embeddings=true", "output.save_images=true",
                                           "safety.laion_filter.enabled=true"], progress=False)
    assert result.exit_code == 0
    before = _snapshot(out)
    raw = {p: _raw(out, p) for p in before}
    stats_before = json.loads((out / "stats.json").read_text())
    tars_before = _tar_names(out)
    tar_pairs = _tar_pairs(out)
    rows = [r for p, rs in before.items() if "_embeddings" not in p for r in rs]
    urls = [r["URL"] for r in rows]
    unique = [r for r in rows if urls.count(r["URL"]) == 1]
    en = [r for r in unique if r["LANGUAGE"] == "en"]
    other = [r for r in unique if r["LANGUAGE"] != "en"]
    by_url = [en[0], other[0]]
    by_hash = en[1]
    url_list = root / "takedown-urls.txt"
    url_list.write_text("# takedown request 1\n" + "".join(r["URL"] + "\n" for r in by_url))
    hash_list = root / "takedown-hashes.txt"
    hash_list.write_text(f"{by_hash['hash']}\n")
    pointer_before = OutputLayout(str(out)).published()
    code = cli.main(["remove", str(out), "--urls", str(url_list), "--hashes", str(hash_list)])
    pointer_after = OutputLayout(str(out)).published()
    disk_after = {folder: {f"{folder}/{p.name}" for p in (out / folder).iterdir() if p.is_file()}
                  for folder in pointer_after["files"]}
    after = _snapshot(out)
    raw_after = {p: _raw(out, p) for p in after}
    stats_after = json.loads((out / "stats.json").read_text())
    prov_after = json.loads((out / "provenance.json").read_text())
    tars_after = _tar_names(out)
    # a later run into the same folder (all inputs complete: it publishes again)
    cfg = load_config(out / "config.yaml", ["run.progress=false"])
    rerun = run_pipeline(cfg)
    yield {
        "out": out, "code": code, "before": before, "after": after, "raw": raw, "raw_after": raw_after,
        "removed": [*by_url, by_hash], "stats_before": stats_before, "stats_after": stats_after,
        "prov_after": prov_after, "tars_before": tars_before, "tars_after": tars_after, "rerun": rerun,
        "lists": (url_list, hash_list), "tar_pairs": tar_pairs,
        "pointers": (pointer_before, pointer_after), "disk_after": disk_after,
    }


def test_listed_rows_removed_everything_else_identical(removed):
    r = removed
    assert r["code"] == 0
    gone_keys = {row["key"] for row in r["removed"]}
    assert len(gone_keys) == 3
    assert set(r["after"]) == set(r["before"])
    n_removed = 0
    for path, rows in r["before"].items():
        kept = [row for row in rows if row["key"] not in gone_keys]
        n_removed += len(rows) - len(kept)
        assert r["after"][path] == kept, path  # same values, same order
        if len(kept) == len(rows):
            assert r["raw_after"][path] == r["raw"][path], path  # untouched files are not rewritten
        else:
            schema_before = pq.read_schema(io.BytesIO(r["raw"][path]))
            assert pq.read_schema(io.BytesIO(r["raw_after"][path])).equals(schema_before, check_metadata=True)
    assert n_removed == 6  # 3 rows + their 3 embedding rows
    assert any(p.endswith("_embeddings/part-00000.parquet") for p in r["before"])
    assert len({n for n in r["tars_before"] if n.rsplit(".", 1)[0] in gone_keys}) == 9  # 3 files per row
    # every saved image of a removed pair goes, also a copy from another WARC that de-duplication
    # left out of the shards (same URL, same hash, other key); nothing else is touched
    from laionbuild.schema import pair_hash

    urls = {row["URL"] for row in r["removed"][:2]}
    hashes = {r["removed"][2]["hash"]}
    gone_tar_keys = {k for k, (u, t) in r["tar_pairs"].items() if u in urls or pair_hash(u, t) in hashes}
    assert gone_keys <= gone_tar_keys
    gone_members = {n for n in r["tars_before"] if n.rsplit(".", 1)[0] in gone_tar_keys}
    assert r["tars_after"] == r["tars_before"] - gone_members


def test_embeddings_nsfw_tags_and_image_tars_stay_consistent(removed):
    """After the removal and the rerun: embeddings beside the shards joined by key, the stored
    similarity the cosine of the stored (fp16) embeddings, the NSFW tag on every row, and every
    published key's image in the webdataset-style tars."""
    import numpy as np

    layout = OutputLayout(str(removed["out"]))
    all_keys = set()
    for subset in S.SUBSETS:
        (shard_file,) = layout.published_files(subset)
        (emb_file,) = layout.published_files(subset, "_embeddings")
        shard, emb = pq.read_table(shard_file), pq.read_table(emb_file)
        assert shard.num_rows > 0
        assert emb.column("key").to_pylist() == shard.column("key").to_pylist()
        img = np.asarray(emb.column("image_embedding").to_pylist(), dtype=np.float32)
        txt = np.asarray(emb.column("text_embedding").to_pylist(), dtype=np.float32)
        assert img.shape == (shard.num_rows, 64) and txt.shape == img.shape
        cos = (img * txt).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
        assert np.allclose(cos, shard.column("similarity").to_numpy(), atol=1e-2)
        assert set(shard.column("NSFW").to_pylist()) <= {"UNLIKELY", "UNSURE", "NSFW"}
        all_keys |= set(shard.column("key").to_pylist())
    tar_keys = {n.rsplit(".", 1)[0] for n in _tar_names(removed["out"])}
    assert all_keys and all_keys <= tar_keys


def test_stats_and_provenance_record_the_removal(removed):
    r = removed
    sb, sa = r["stats_before"], r["stats_after"]
    assert sa["removed"]["total"] == 3 and sa["kept_total"] == sb["kept_total"] - 3
    names = sorted(sa["removed"]["by_list"])
    assert names == ["0001-urls-takedown-urls.txt", "0002-hashes-takedown-hashes.txt"]
    assert sa["removed"]["by_list"][names[0]] == 2 and sa["removed"]["by_list"][names[1]] == 1
    for subset in S.SUBSETS:
        n = sum(1 for row in r["removed"] if (row["LANGUAGE"] == "en") == (subset == "en")
                and _subset_of(r, row) == subset)
        assert sa["kept_per_subset"][subset] == sb["kept_per_subset"][subset] - n
    entries = r["prov_after"]["removals"]
    assert [(e["list"], e["kind"], e["removed"]) for e in entries] == [
        ("takedown-urls.txt", "urls", 2), ("takedown-hashes.txt", "hashes", 1)]
    for e, f in zip(entries, r["lists"]):
        assert e["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest() and e["time"]
        assert (r["out"] / e["stored"]).read_bytes() == f.read_bytes()


def _subset_of(r, row) -> str:
    for path, rows in r["before"].items():
        if row in rows:
            return path.split("/", 1)[0]
    raise AssertionError(row)


def test_removal_survives_a_rerun(removed):
    r = removed
    assert r["rerun"].exit_code == 0
    again = _snapshot(r["out"])
    assert again == r["after"]  # the very same rows, in the same order
    stats = json.loads((r["out"] / "stats.json").read_text())
    assert stats["kept_total"] == r["stats_after"]["kept_total"]
    assert stats["removed"]["total"] == 3
    assert stats["removed"]["by_list"] == r["stats_after"]["removed"]["by_list"]
    assert stats["stages"]["dedup"] == r["stats_before"]["stages"]["dedup"]  # removals are not duplicates
    prov = json.loads((r["out"] / "provenance.json").read_text())
    assert len(prov["removals"]) == 2  # the rerun keeps the record
    assert _tar_names(r["out"]) == r["tars_after"]


def test_recorded_lists_and_table_filter(removed):
    r = removed
    import fsspec

    bl = OutputLayout(str(r["out"])).removal_lists()
    assert [i.name for i in bl.lists] == ["0001-urls-takedown-urls.txt", "0002-hashes-takedown-hashes.txt"]
    table = pq.read_table(io.BytesIO(r["raw"][next(p for p in r["raw"] if p.startswith("en/"))]))
    kept, counts, keys = filter_table(table, [Blocklist(), bl])
    assert kept.num_rows == table.num_rows - sum(counts.values()) and len(keys) == sum(counts.values())
    assert set(counts) <= {"removed:0001-urls-takedown-urls.txt", "removed:0002-hashes-takedown-hashes.txt"}


def test_remove_refuses_an_unfinished_folder(tmp_path, capsys):
    lst = tmp_path / "urls.txt"
    lst.write_text("http://x.test/a.jpg\n")
    assert cli.main(["remove", str(tmp_path / "nothing"), "--urls", str(lst)]) == 2
    assert "stats.json" in capsys.readouterr().err
    assert cli.main(["remove", str(tmp_path)]) == 2


def test_a_list_that_cannot_be_read_is_refused_before_anything_is_stored(tmp_path, capsys):
    import gzip

    out = tmp_path / "out"
    out.mkdir()
    (out / "stats.json").write_text("{}")
    cut = tmp_path / "cut.txt.gz"
    cut.write_bytes(gzip.compress(b"http://x.test/a.jpg\n" * 200)[:-30])
    binary = tmp_path / "bin.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    for flag, path in (("--urls", cut), ("--hashes", binary)):
        assert cli.main(["remove", str(out), flag, str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"laionbuild: error: remove: cannot read {path}") and "\n" not in err
    assert sorted(p.name for p in out.iterdir()) == ["stats.json"]  # nothing recorded: later runs are unaffected


def test_remove_publishes_a_new_generation_and_keeps_untouched_files(removed):
    """The files that lose rows are written under a new generation and the pointer moves last:
    a reader sees the folder before the removal or after it, never a mix."""
    before, after = removed["pointers"]
    assert after["generation"] == before["generation"] + 1
    assert after["counts"]["en"] == before["counts"]["en"] - 2  # two of the three removed rows are English
    assert sum(after["counts"].values()) == sum(before["counts"].values()) - 3
    for folder, old_files in before["files"].items():
        new_files = after["files"][folder]
        assert len(new_files) == len(old_files), folder
        for old, new in zip(sorted(old_files), sorted(new_files)):
            assert new == old or new.startswith(f"{folder}/part-g{after['generation']:04d}-"), (old, new)
    assert any(new != old for folder in before["files"]
               for old, new in zip(sorted(before["files"][folder]), sorted(after["files"][folder])))
    for folder, files in after["files"].items():
        assert removed["disk_after"][folder] == set(files), folder  # the replaced files are gone
