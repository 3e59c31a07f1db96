"""Writes to an object store: one PUT per file, no request for folders (s3fs's ``makedirs``
checks the bucket on every call, and would create a bucket deleted meanwhile)."""

from __future__ import annotations

import pytest

from laionbuild.stages import shards
from s3_loopback import LoopbackS3, s3_environment

BUCKET = "lbwrites"


@pytest.fixture(scope="module")
def s3():
    with LoopbackS3() as server, s3_environment(server):
        server.client().create_bucket(Bucket=BUCKET)
        yield server


def _fs():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def test_atomic_writes_are_one_put_each(s3):
    fs = _fs()
    s3.take()
    for i in range(6):
        shards.write_bytes_atomic(fs, f"{BUCKET}/out/scored/part-{i}.parquet", b"x" * (i + 1))
    shards.write_json_atomic(fs, f"{BUCKET}/out/scored/_done/s1.json", {"rows": 6})
    counts = s3.take()
    assert counts["put"] == 7
    assert sum(counts.values()) == 7, counts  # no bucket check, no folder marker, no listing
    assert s3.filesystem().cat(f"{BUCKET}/out/scored/part-5.parquet") == b"x" * 6


def test_a_write_never_creates_a_bucket(s3):
    fs = _fs()
    with pytest.raises(OSError):
        shards.write_bytes_atomic(fs, "lbgone/out/part-0.parquet", b"x")
    assert "lbgone" not in {b["Name"] for b in s3.client().list_buckets()["Buckets"]}
