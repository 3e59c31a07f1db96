"""Remote inputs as local ones: globs and folders on S3 expanded from one listing, sorted."""

from __future__ import annotations

import pytest

from laionbuild.config import RunConfig
from laionbuild.errors import SetupError
from laionbuild.inputs import expand_inputs
from s3_loopback import LoopbackS3, s3_environment

BUCKET = "lbglobs"
#: files of the crawl folder besides a and b: many more than the listing requests a glob may make
MORE = [f"crawl/d{i:02d}.warc.gz" for i in range(12)]
#: list requests of one glob: s3fs lists the prefix (and checks its parent), never once per file
MAX_LISTS = 3


@pytest.fixture(scope="module")
def s3():
    with LoopbackS3() as server, s3_environment(server):
        server.client().create_bucket(Bucket=BUCKET)
        fs = server.filesystem()
        for key in ("crawl/b.warc.gz", "crawl/a.warc.gz", "crawl/sub/c.warc.gz", "crawl/notes.txt",
                    "other/x.warc.gz", *MORE):
            fs.pipe(f"{BUCKET}/{key}", b"x")
        yield server


def test_glob_and_folder_expanded_sorted_from_one_listing(s3):
    s3.take()
    top = [f"s3://{BUCKET}/{k}" for k in ["crawl/a.warc.gz", "crawl/b.warc.gz", *MORE]]
    got = expand_inputs([f"s3://{BUCKET}/crawl/*.warc.gz"], RunConfig())
    assert got == sorted(top)
    counts = s3.take()
    # a listing of the prefix (and one check of it), never a request per file
    assert counts["list"] <= MAX_LISTS and counts["head"] + counts["get"] <= 1
    got = expand_inputs([f"s3://{BUCKET}/crawl/"], RunConfig())
    assert got == sorted([*top, f"s3://{BUCKET}/crawl/sub/c.warc.gz"])
    assert expand_inputs([f"s3://{BUCKET}/other/x.warc.gz"], RunConfig()) == [f"s3://{BUCKET}/other/x.warc.gz"]


def test_glob_matching_nothing_is_a_setup_error(s3):
    with pytest.raises(SetupError, match="matches no file"):
        expand_inputs([f"s3://{BUCKET}/crawl/*.arc"], RunConfig())
    with pytest.raises(SetupError, match="no \\*.warc\\* file"):
        expand_inputs([f"s3://{BUCKET}/empty/"], RunConfig())
