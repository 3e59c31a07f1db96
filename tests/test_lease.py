"""One run per output folder: the lease on a local folder (an OS lock) and on S3 (conditional writes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from laionbuild.errors import SetupError
from laionbuild.output.layout import OutputLayout
from laionbuild.output.lease import LEASE, LeaseHeld, RunLease
from s3_loopback import LoopbackS3, output_location, s3_environment

BUCKET = "lblease"
EXPIRY_S, HEARTBEAT_S = 30.0, 0.2


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    with output_location(request.param, tmp_path, BUCKET) as url:
        yield url


def _lease(output: str, **kw) -> RunLease:
    return RunLease(OutputLayout(output), EXPIRY_S, HEARTBEAT_S, **kw)


def test_second_holder_refused_with_one_line_naming_the_first(output):
    with _lease(output) as first:
        with pytest.raises(LeaseHeld) as err:
            _lease(output).acquire()
        msg = str(err.value)
        assert isinstance(err.value, SetupError) and len(msg.splitlines()) == 1
        assert f"PID {os.getpid()}" in msg and first.holder["host"] in msg and first.holder["started"] in msg
    with _lease(output):  # released: the next run takes it
        pass


def test_heartbeat_renews_and_release_removes_the_lease(output):
    layout = OutputLayout(output)
    with _lease(output) as lease:
        assert layout.exists(layout.path(LEASE))
        if lease._thread is not None:  # object stores renew; a local lock needs no renewal
            first = lease._etag
            deadline = time.monotonic() + 30
            while lease._etag == first and time.monotonic() < deadline:
                time.sleep(HEARTBEAT_S)
            assert lease._etag != first and not lease.lost
    assert not layout.exists(layout.path(LEASE))


def test_lease_of_a_killed_run_is_taken_over(output, tmp_path):
    layout = OutputLayout(output)
    code = ("import sys, time; from laionbuild.output.layout import OutputLayout; "
            "from laionbuild.output.lease import RunLease; "
            f"l = RunLease(OutputLayout({output!r}), {EXPIRY_S}, {HEARTBEAT_S}); l.acquire(); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld) as err:
            _lease(output).acquire()
        assert f"PID {proc.pid}" in str(err.value)
    finally:
        proc.kill()
        proc.wait()
    if layout.url.startswith("s3://"):
        with pytest.raises(LeaseHeld):  # not renewed, but not expired yet
            _lease(output).acquire()
        later = _lease(output, clock=lambda: time.time() + EXPIRY_S + 1)
    else:
        later = _lease(output)  # the OS released the lock with the process
    with later:
        assert json.loads(layout.fs.cat_file(layout.path(LEASE)))["pid"] == os.getpid()


def test_a_run_whose_lease_was_taken_over_knows_it(tmp_path):
    with LoopbackS3() as s3, s3_environment(s3):
        s3.client().create_bucket(Bucket=BUCKET)
        output = f"s3://{BUCKET}/out"
        stale = _lease(output)
        stale.acquire()
        stale._stop.set()  # a run that stopped renewing (a long pause) ...
        stale._thread.join()
        with _lease(output, clock=lambda: time.time() + EXPIRY_S + 1):  # ... is taken over
            stale._stop.clear()
            stale._thread = None
            import threading

            t = threading.Thread(target=stale._heartbeat)
            t.start()
            time.sleep(HEARTBEAT_S * 3)
            stale._stop.set()
            t.join()
            assert stale.lost
            with pytest.raises(LeaseHeld):
                stale.check()


def test_cli_run_into_a_held_folder_exits_2_with_one_line(output, tmp_path):
    warc = tmp_path / "in.warc.gz"
    warc.write_bytes(b"")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with _lease(output) as held:
        r = subprocess.run([sys.executable, "-m", "laionbuild", "run", "--config", "configs/smoke.yaml", "--input",
                            str(warc), "--output", output, "--no-progress"], capture_output=True, text=True, env=env,
                           timeout=300, cwd=Path(__file__).resolve().parents[1])
        assert r.returncode == 2, r.stderr[-2000:]
        line = r.stderr.strip()
        assert len(line.splitlines()) == 1 and f"PID {os.getpid()}" in line and held.holder["started"] in line
        layout = OutputLayout(output)
        assert json.loads(layout.fs.cat_file(layout.path(LEASE)))["token"] == held.token  # ours, untouched


def test_an_output_in_a_bucket_that_does_not_exist_is_refused_and_no_bucket_made():
    with LoopbackS3() as s3, s3_environment(s3):
        s3.client().create_bucket(Bucket=BUCKET)
        with pytest.raises(SetupError) as err:
            _lease("s3://lbleasx/out").acquire()  # one letter off
        assert "lbleasx" in str(err.value) and "does not exist" in str(err.value)
        assert sorted(b["Name"] for b in s3.client().list_buckets()["Buckets"]) == [BUCKET]
        with _lease(f"s3://{BUCKET}/new/out"):  # a new folder in a bucket that exists is made
            pass


def test_an_output_that_names_an_existing_object_is_refused():
    from laionbuild.cli import check_output_folder

    with LoopbackS3() as s3, s3_environment(s3):
        s3.client().create_bucket(Bucket=BUCKET)
        s3.client().put_object(Bucket=BUCKET, Key="afile", Body=b"x")
        with pytest.raises(SetupError, match="s3://lblease/afile is an existing object"):
            check_output_folder(f"s3://{BUCKET}/afile")
        check_output_folder(f"s3://{BUCKET}/a-new-prefix")  # a prefix that holds nothing yet is fine
