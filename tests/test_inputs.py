import gzip

import pytest

from laionbuild.config import RunConfig
from laionbuild.errors import SetupError
from laionbuild.inputs import expand_inputs, file_id, read_listing


def test_glob_folder_and_missing(tmp_path):
    for name in ("a.warc.gz", "b.warc.gz", "c.txt"):
        (tmp_path / name).write_bytes(b"x")
    run = RunConfig()
    files = expand_inputs([str(tmp_path / "*.warc.gz")], run)
    assert [f.rsplit("/", 1)[-1] for f in files] == ["a.warc.gz", "b.warc.gz"]
    assert len(expand_inputs([str(tmp_path)], run)) == 2
    with pytest.raises(SetupError, match="does not exist"):
        expand_inputs([str(tmp_path / "nope.warc.gz")], run)
    with pytest.raises(SetupError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.arc")], run)
    with pytest.raises(SetupError, match="no input"):
        expand_inputs([], run)


def test_listing_base_url_limit_and_shard(tmp_path):
    lines = [f"crawl-data/CC-MAIN-2024-22/segments/x/warc/file-{i:02d}.warc.gz" for i in range(10)]
    listing = tmp_path / "warc.paths.gz"
    listing.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    run = RunConfig(paths_base_url="https://data.example.test/")
    files = read_listing(str(listing), run.paths_base_url)
    assert files[0] == "https://data.example.test/crawl-data/CC-MAIN-2024-22/segments/x/warc/file-00.warc.gz"
    assert len(expand_inputs([str(listing)], run)) == 10
    limited = expand_inputs([str(listing)], RunConfig(paths_base_url="https://d.test", limit=4))
    assert [f[-11:] for f in limited] == [f"-{i:02d}.warc.gz" for i in range(4)]
    shard = expand_inputs([str(listing)], RunConfig(paths_base_url="https://d.test", shard="1/3"))
    assert [f[-11:] for f in shard] == ["-01.warc.gz", "-04.warc.gz", "-07.warc.gz"]
    # shards partition the listing
    allp = set()
    for i in range(3):
        allp |= set(expand_inputs([str(listing)], RunConfig(paths_base_url="https://d.test", shard=f"{i}/3")))
    assert len(allp) == 10


def test_file_id_is_stable_and_distinct():
    a = file_id("/data/x/CC-MAIN-1.warc.gz")
    assert a == file_id("/data/x/CC-MAIN-1.warc.gz")
    assert a != file_id("/data/y/CC-MAIN-1.warc.gz")
    assert "/" not in file_id("s3://bucket/a b/c.warc.gz")
