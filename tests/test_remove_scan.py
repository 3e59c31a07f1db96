"""``remove`` on a folder of many published files: every file is scanned through the columns a
list matches on, many at once, and only the files that hold a listed row are read whole and
rewritten (a LAION-scale output has thousands of files; a takedown list touches a few)."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq

from laionbuild import remove as R
from laionbuild.output.layout import OutputLayout
from laionbuild.stages.blocklist import Blocklist

N_FILES = 24


def _folder(root):
    rows = 0
    for subset in ("en", "multi"):
        for i in range(N_FILES // 2):
            urls = [f"https://img.example/{subset}/{i}/{j}.jpg" for j in range(5)]
            keys = [f"{subset}{i:03d}{j}" for j in range(5)]
            table = pa.table({"URL": urls, "TEXT": ["a caption"] * 5, "hash": [rows + j for j in range(5)],
                              "key": keys, "similarity": [0.3] * 5})
            (root / subset).mkdir(parents=True, exist_ok=True)
            pq.write_table(table, root / subset / f"part-{i:05d}.parquet")
            emb = pa.table({"key": keys, "image_embedding": [[0.1, 0.2]] * 5})
            (root / f"{subset}_embeddings").mkdir(parents=True, exist_ok=True)
            pq.write_table(emb, root / f"{subset}_embeddings" / f"part-{i:05d}.parquet")
            rows += 5


def test_only_files_holding_a_listed_row_are_read_whole_and_scans_overlap(tmp_path, monkeypatch):
    root = tmp_path / "out"
    _folder(root)
    lists = Blocklist("removed")
    lists.add_bytes(b"https://img.example/en/3/1.jpg\nhttps://img.example/multi/7/4.jpg\n", "url", "takedown")
    scanned, whole, running, peak = [], [], [0], [0]
    lock = threading.Lock()
    read_columns, rewrite = R._read_columns, R._rewrite

    def counting_scan(fs, path, wanted):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            scanned.append((path, wanted))
        try:
            time.sleep(0.05)  # an object store's answer: the next files are asked for meanwhile
            return read_columns(fs, path, wanted)
        finally:
            with lock:
                running[0] -= 1

    def counting_rewrite(fs, path, keep_fn, target=None):
        with lock:
            whole.append(path)
        return rewrite(fs, path, keep_fn, target)

    monkeypatch.setattr(R, "_read_columns", counting_scan)
    monkeypatch.setattr(R, "_rewrite", counting_rewrite)
    result = R.apply_to_published(OutputLayout(str(root)), [lists])

    assert result["per_dir"] == {"en": 1, "multi": 1, "en_embeddings": 1, "multi_embeddings": 1}
    # every row table and every companion scanned once, on the matching columns only
    assert len(scanned) == 2 * N_FILES
    assert all(set(w) <= {"URL", "hash", "key"} for _, w in scanned)
    # only the two row files and their two companions were read whole
    assert sorted(p.split("/out/", 1)[1] for p in whole) == [
        "en/part-00003.parquet", "en_embeddings/part-00003.parquet",
        "multi/part-00007.parquet", "multi_embeddings/part-00007.parquet"]
    assert peak[0] > 1
    kept = pq.read_table(root / "en" / "part-00003.parquet")
    assert kept.column("URL").to_pylist() == [f"https://img.example/en/3/{j}.jpg" for j in (0, 2, 3, 4)]
    assert kept.column_names == ["URL", "TEXT", "hash", "key", "similarity"]
    emb = pq.read_table(root / "multi_embeddings" / "part-00007.parquet")
    assert emb.column("key").to_pylist() == [f"multi007{j}" for j in range(4)]
    untouched = pq.read_table(root / "en" / "part-00004.parquet")
    assert untouched.num_rows == 5


def test_nothing_listed_rewrites_nothing(tmp_path, monkeypatch):
    root = tmp_path / "out"
    _folder(root)
    lists = Blocklist("removed")
    lists.add_bytes(b"https://elsewhere.example/x.jpg\n", "url", "takedown")
    whole = []
    rewrite = R._rewrite
    monkeypatch.setattr(R, "_rewrite", lambda fs, path, keep_fn, target=None: whole.append(path) or rewrite(
        fs, path, keep_fn, target))
    result = R.apply_to_published(OutputLayout(str(root)), [lists])
    assert whole == [] and sum(result["per_dir"].values()) == 0


def test_a_removed_url_is_never_fetched_again(tmp_path):
    """A later run's new pair of a taken-down URL is dropped before download by the lists that
    ``laionbuild remove`` recorded (as a block list), and counted under the block-list stage."""
    import numpy as np

    from laionbuild import schema as S
    from laionbuild.config import load_config
    from laionbuild.demo.image_server import LoopbackServer
    from laionbuild.runner.score import FetchStage
    from laionbuild.stages.blocklist import stage_counters

    out = tmp_path / "out"
    (out / "removals").mkdir(parents=True)
    from helpers.images import encode
    from PIL import Image

    png = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    with LoopbackServer("127.0.0.1") as srv:
        gone = srv.add("/gone.png", png, content_type="image/png")
        kept = srv.add("/kept.png", png, content_type="image/png")
        (out / "removals" / "0001-urls-takedown.txt").write_text(gone + "\n")
        cfg = load_config(None, [f"run.output={out}", "fetch.allow_addresses=[127.0.0.1]", "fetch.retries=0"])
        stage = FetchStage(cfg)
        try:
            batch = {S.URL: np.array([gone, kept], dtype=object),
                     S.ALT_TEXT: np.array(["a new caption", "another caption"], dtype=object)}
            result = stage(batch)
        finally:
            stage.fetcher.close()
        assert srv.request_count("/gone.png") == 0 and srv.request_count("/kept.png") == 1
    assert list(result[S.DROP_REASON]) == ["blocklist:removed/0001-urls-takedown.txt", ""]
    counters = stage_counters(result)
    assert counters.dropped_by_reason == {"removed/0001-urls-takedown.txt": 1}
