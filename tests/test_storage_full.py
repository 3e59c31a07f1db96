"""Storage that takes no more writes (a full disk) stops a run with one line, in the driver or in a
worker, leaves no half-written file, and the same command resumes once there is room."""

from __future__ import annotations

import errno
import os

import fsspec
import pytest

from laionbuild import cli
from laionbuild.errors import os_error_in, storage_full
from laionbuild.stages import shards

FULL = "No space left on device"


def _filling(limit: int):
    """A ``shutil.copyfileobj`` that writes ``limit`` bytes, then fails as a full disk does."""
    def copy(src, dst, length=0):
        dst.write(src.read(limit))
        raise OSError(errno.ENOSPC, FULL)
    return copy


def test_a_write_that_fails_leaves_no_file_and_names_its_path(tmp_path, monkeypatch):
    monkeypatch.setattr(shards.shutil, "copyfileobj", _filling(10))
    path = str(tmp_path / "out" / "part.parquet")
    with pytest.raises(OSError) as raised:
        shards.write_bytes_atomic(fsspec.filesystem("file"), path, b"x" * 100)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == path
    assert os.listdir(tmp_path / "out") == []  # the half-written temporary file is gone
    assert storage_full(raised.value) == (FULL, path)


def test_a_worker_error_is_found_in_the_text_ray_passes_on():
    from ray.exceptions import UserCodeException

    text = ("ray::MapWorker(MapBatches(W)).submit()\n"
            "  File \"x.py\", line 1, in __exit__\n"
            f"OSError: [Errno {errno.ENOSPC}] {FULL}\n\n"
            "The above exception was the direct cause of the following exception:\n\n"
            f"OSError: [Errno {errno.ENOSPC}] {FULL}: '/out/candidates/a.keys'\n\n"
            "The above exception was the direct cause of the following exception:\n\n"
            "ray.exceptions.UserCodeException: UDF failed to process a data block.")
    outer = RuntimeError("the dataset stopped")
    outer.__cause__ = UserCodeException(text)
    assert storage_full(outer) == (FULL, "/out/candidates/a.keys")  # the last one printed: the one raised
    denied = UserCodeException(f"PermissionError: [Errno {errno.EACCES}] Permission denied: '/models/m.bin'")
    assert storage_full(denied) is None
    assert os_error_in(denied) == (errno.EACCES, "Permission denied", "/models/m.bin")
    # an object store's refusal has no errno (s3fs: PermissionError("Access Denied")); the last printed
    # error is the one raised
    refused = UserCodeException(f"OSError: [Errno {errno.ENOSPC}] {FULL}: '/tmp/x'\n\nThe above exception ...\n\n"
                                "PermissionError: Access Denied\n\nray.exceptions.UserCodeException: UDF failed")
    assert os_error_in(refused) == (errno.EACCES, "Access Denied", "") and storage_full(refused) is None
    assert os_error_in(UserCodeException("FileNotFoundError: no-such-bucket/out")) == (
        errno.ENOENT, "no-such-bucket/out", "")
    assert os_error_in(UserCodeException("ValueError: Access Denied")) is None
    # only Ray's errors carry a worker's error as text; another error's message is not read
    assert os_error_in(RuntimeError(f"[Errno {errno.ENOSPC}] {FULL}: '/x'")) is None
    assert storage_full(OSError(errno.EDQUOT, "Disk quota exceeded")) == ("Disk quota exceeded", "")


@pytest.mark.parametrize("raised", [
    OSError(errno.ENOSPC, FULL, "/out/scored/x.parquet"),
    RuntimeError("wrapped"),  # with the full disk as its cause, as a Ray task's error carries it
])
def test_the_command_says_it_in_one_line_and_exits_2(monkeypatch, capsys, tmp_path, raised):
    if isinstance(raised, RuntimeError):
        raised.__cause__ = OSError(errno.ENOSPC, FULL, "/out/scored/x.parquet")

    def run(*args, **kwargs):
        raise raised

    monkeypatch.setattr("laionbuild.runner.run.run", run)
    warc = tmp_path / "a.warc.gz"
    warc.write_bytes(b"")
    assert cli.main(["extract", str(warc), "-o", str(tmp_path / "o")]) == cli.EXIT_BAD_INVOCATION
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "storage takes no more writes" in err[0] and "/out/scored/x.parquet" in err[0] and FULL in err[0]
    assert "rerun the same command" in err[0]


@pytest.mark.ray
def test_a_full_disk_in_a_ray_data_worker_reaches_the_driver_with_its_path(ray_session, tmp_path):
    import ray

    path = str(tmp_path / "out" / "c.keys")

    def write(batch):
        import errno as e

        from laionbuild.stages import shards as sh

        def full(src, dst, length=0):
            dst.write(src.read(3))
            raise OSError(e.ENOSPC, "No space left on device")

        real, sh.shutil.copyfileobj = sh.shutil.copyfileobj, full  # this worker's disk is full
        try:
            sh.write_bytes_atomic(fsspec.filesystem("file"), path, b"data")
        finally:
            sh.shutil.copyfileobj = real  # the worker may serve later tests of this Ray
        return batch

    ds = ray.data.from_items([{"a": 1}]).map_batches(write, batch_format="numpy")
    with pytest.raises(Exception) as raised:
        ds.take_all()
    assert storage_full(raised.value) == (FULL, path)
    assert os.listdir(tmp_path / "out") == []


def test_an_object_stores_refusal_in_a_worker_is_one_line(monkeypatch, capsys, tmp_path):
    from ray.exceptions import UserCodeException

    def run(*args, **kwargs):
        raise UserCodeException("Traceback ...\nPermissionError: Access Denied\n\n"
                                "ray.exceptions.UserCodeException: UDF failed to process a data block.")

    monkeypatch.setattr("laionbuild.runner.run.run", run)
    warc = tmp_path / "a.warc.gz"
    warc.write_bytes(b"")
    assert cli.main(["extract", str(warc), "-o", str(tmp_path / "o")]) == cli.EXIT_BAD_INVOCATION
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["laionbuild: error: cannot use: Access Denied"]


@pytest.mark.parametrize("command", ["report", "remove"])
def test_a_refusal_without_a_key_names_the_folder_the_command_reads(command, monkeypatch, capsys, tmp_path):
    def refused(*args, **kwargs):
        raise PermissionError("Forbidden")  # s3fs: no errno, no key

    monkeypatch.setattr("laionbuild.report.write_report", refused)
    monkeypatch.setattr("laionbuild.remove.remove", refused)
    lst = tmp_path / "urls.txt"
    lst.write_text("http://x.test/a.jpg\n")
    argv = [command, "s3://bucket/out"] + (["--urls", str(lst)] if command == "remove" else [])
    assert cli.main(argv) == cli.EXIT_BAD_INVOCATION
    assert capsys.readouterr().err.strip().splitlines() == ["laionbuild: error: cannot use s3://bucket/out: Forbidden"]
