"""One row per (URL after download, TEXT): LAION-5B's filter of scored pairs (``run.dedup_after_download``)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from laionbuild.config import load_config
from laionbuild.runner.publish import PublishBucket
from laionbuild.schema import pair_hash
from laionbuild.stages.pair_dedup import drop_repeated_pairs

REPO = Path(__file__).resolve().parents[1]


def _table(rows):
    urls, texts, paths, offsets = zip(*rows)
    return pa.table({
        "URL": list(urls), "TEXT": list(texts), "hash": [pair_hash(u, t) for u, t in zip(urls, texts)],
        "warc_path": list(paths), "warc_offset": list(offsets),
    })


ROWS = [
    ("http://cdn.e.com/a.jpg", "a red bicycle", "w2", 10),  # two links redirected to the same image
    ("http://cdn.e.com/a.jpg", "a red bicycle", "w1", 99),
    ("http://cdn.e.com/a.jpg", "another caption", "w3", 5),
    ("http://cdn.e.com/b.jpg", "a red bicycle", "w1", 7),
]


def test_first_copy_by_warc_position_is_kept():
    kept, dropped = drop_repeated_pairs(_table(ROWS))
    assert dropped == 1
    assert sorted(zip(kept.column("URL").to_pylist(), kept.column("TEXT").to_pylist(),
                      kept.column("warc_path").to_pylist())) == [
        ("http://cdn.e.com/a.jpg", "a red bicycle", "w1"),
        ("http://cdn.e.com/a.jpg", "another caption", "w3"),
        ("http://cdn.e.com/b.jpg", "a red bicycle", "w1"),
    ]
    same, none = drop_repeated_pairs(_table(ROWS[2:]))
    assert none == 0 and same.num_rows == 2


def test_publish_bucket_drops_repeated_pairs_only_when_asked(tmp_path):
    table = _table(ROWS).append_column("_bucket", pa.array(["en/0"] * len(ROWS)))
    for dedup, rows in ((True, 3), (False, 4)):
        out = tmp_path / str(dedup)
        result = PublishBucket(str(out), 0, "zstd", None, None, dedup)(table).to_pylist()[0]
        assert pq.read_table(out / "en" / "part-g0000-00000.parquet").num_rows == rows == result["rows_out"]
        assert json.loads(result["filtered"]) == ({"fetch:duplicate_after_download": 1} if dedup else {})
    assert load_config(REPO / "configs" / "laion5b.yaml").run.dedup_after_download
    assert not load_config(None).run.dedup_after_download
