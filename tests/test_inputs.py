import gzip
import os

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


def test_a_listing_keeps_absolute_paths_urls_and_file_urls(tmp_path):
    listing = tmp_path / "warc.paths"
    listing.write_text("crawl/a.warc.gz\n/data/b.warc.gz\nfile:///data/c.warc.gz\ns3://bucket/d.warc.gz\n")
    assert read_listing(str(listing), "https://d.test/") == [
        "https://d.test/crawl/a.warc.gz", "/data/b.warc.gz", "file:///data/c.warc.gz", "s3://bucket/d.warc.gz"]


def test_file_id_is_stable_and_distinct():
    a = file_id("/data/x/CC-MAIN-1.warc.gz")
    assert a == file_id("/data/x/CC-MAIN-1.warc.gz")
    assert a != file_id("/data/y/CC-MAIN-1.warc.gz")
    assert "/" not in file_id("s3://bucket/a b/c.warc.gz")


def test_an_input_folder_that_holds_the_output_is_refused(tmp_path):
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    (crawl / "a.warc.gz").write_bytes(b"x")
    for output in (crawl, crawl / "out", crawl / "deep" / "er"):
        with pytest.raises(SetupError, match="holds the output folder"):
            expand_inputs([str(crawl)], RunConfig(output=str(output)))
    assert len(expand_inputs([str(crawl)], RunConfig(output=str(tmp_path / "out")))) == 1
    assert len(expand_inputs([str(crawl)], RunConfig(output="s3://bucket/crawl"))) == 1
    # a file input inside the output folder is read as it is: the run's own files are not *.warc*
    assert len(expand_inputs([str(crawl / "a.warc.gz")], RunConfig(output=str(crawl)))) == 1


def test_inputs_that_cannot_be_read_stop_the_run_before_it_starts(tmp_path):
    (tmp_path / "loop.warc.gz").symlink_to(tmp_path / "loop.warc.gz")
    with pytest.raises(SetupError, match="cannot read input .*loop.warc.gz"):
        expand_inputs([str(tmp_path / "loop.warc.gz")], RunConfig())
    with pytest.raises(SetupError, match="cannot read input .*loop.warc.gz"):
        expand_inputs([str(tmp_path / "*.warc.gz")], RunConfig())
    fifo = tmp_path / "pipe.warc.gz"
    os.mkfifo(fifo)
    assert expand_inputs([str(fifo)], RunConfig()) == [str(fifo)]  # checked without waiting for a writer


def test_listings_that_name_nothing_readable_are_refused(tmp_path):
    binary = tmp_path / "bin.paths.gz"
    binary.write_bytes(gzip.compress(bytes(range(256))))
    with pytest.raises(SetupError, match="binary data"):
        expand_inputs([str(binary)], RunConfig())
    empty = tmp_path / "empty.paths.gz"
    empty.write_bytes(gzip.compress(b"# nothing\n\n"))
    with pytest.raises(SetupError, match="holds no path"):
        expand_inputs([str(empty)], RunConfig())
    local = tmp_path / "local.paths"
    local.write_text(f"{tmp_path}/there.warc.gz\n{tmp_path}/missing.warc.gz\n")
    (tmp_path / "there.warc.gz").write_bytes(b"x")
    with pytest.raises(SetupError, match=r"does not exist: .*missing.warc.gz \(listed in .*local.paths\)"):
        expand_inputs([str(local)], RunConfig())


def test_only_the_inputs_a_run_reads_are_checked(tmp_path):
    """A listing shared by several machines names files other shards read (or that --limit leaves
    out): only the run's own must be there."""
    (tmp_path / "a.warc.gz").write_bytes(b"x")
    listing = tmp_path / "warc.paths"
    listing.write_text("".join(f"{tmp_path}/{n}.warc.gz\n" for n in "abc"))
    assert expand_inputs([str(listing)], RunConfig(limit=1)) == [f"{tmp_path}/a.warc.gz"]
    assert expand_inputs([str(listing)], RunConfig(shard="0/3")) == [f"{tmp_path}/a.warc.gz"]
    with pytest.raises(SetupError, match="b.warc.gz"):
        expand_inputs([str(listing)], RunConfig(shard="1/3"))


def test_local_inputs_are_named_by_absolute_paths_however_given(tmp_path, monkeypatch):
    """An input is known by its name (file_id): a relative glob run from two folders must name two
    inputs, and one file given in several forms is one input."""
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "part-0.warc.gz").write_bytes(folder.encode())
    (tmp_path / "x" / "warc.paths").write_text("part-0.warc.gz\n")
    run = RunConfig()
    monkeypatch.chdir(tmp_path / "x")
    from_x = expand_inputs(["*.warc.gz"], run)
    monkeypatch.chdir(tmp_path / "y")
    from_y = expand_inputs(["*.warc.gz"], run)
    assert from_x == [str(tmp_path / "x" / "part-0.warc.gz")] and from_y == [str(tmp_path / "y" / "part-0.warc.gz")]
    assert file_id(from_x[0]) != file_id(from_y[0])
    monkeypatch.chdir(tmp_path)
    forms = ["x/part-0.warc.gz", "./x/part-0.warc.gz", "y/../x/*.warc.gz", "x", str(tmp_path / "x" / "part-0.warc.gz")]
    assert expand_inputs(forms, run) == [str(tmp_path / "x" / "part-0.warc.gz")]
    assert expand_inputs(["x/warc.paths"], RunConfig(paths_base_url="x")) == [str(tmp_path / "x" / "part-0.warc.gz")]
