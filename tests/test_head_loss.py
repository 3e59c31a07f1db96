"""A cluster head (GCS) that goes away: the run stops with one line of ours, before Ray ends the
driver on its own (status 1, nothing said), and the same command resumes."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from laionbuild.runner import connect as C
from helpers.processes import stop_processes

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
HEAD_IP = "127.0.0.2"


class _Exited(Exception):
    pass


def _watch(answers, **kwargs):
    """A watch over a scripted head: ``answers`` the probes' results, one clock tick per probe."""
    clock = iter(range(10_000))
    state = {"now": 0, "exit": None, "cleaned": 0}

    def tick():
        state["now"] = next(clock)
        return state["now"]

    def exit_(code):
        state["exit"] = code
        raise _Exited

    def cleanup():
        state["cleaned"] += 1

    stream = io.StringIO()
    watch = C.HeadWatch(cleanup=cleanup, give_up_s=5, probe=lambda address: next(answers), clock=tick,
                        exit=exit_, stream=stream, **kwargs)
    watch.address = "127.0.0.9:6379"
    return watch, state, stream


def test_a_head_that_stays_away_stops_the_run_with_one_line():
    watch, state, stream = _watch(iter([True, True, False, False, False, False, False, False, False]))
    steps = 0
    with pytest.raises(_Exited):
        while True:
            steps += 1
            watch.step()
    # the clock reads 0, 1, 2, ... at the probes: down from the 3rd (clock 2); at clock 7, 5 s
    # later, the watch gives up
    assert steps == 8 and watch.misses == 6 and watch.gave_up
    assert state["exit"] == C.HEAD_LOST_EXIT == 2 and state["cleaned"] == 1
    [line] = stream.getvalue().splitlines()
    assert line.startswith("laionbuild: error: the Ray cluster's head at 127.0.0.9:6379 has not answered for 5 s")
    assert "rerun the same command to resume" in line
    assert watch.step() is True and state["cleaned"] == 1      # once given up, nothing more happens


def test_a_head_that_comes_back_in_time_lets_the_run_go_on():
    answers = iter([False, False, False, False, True, False, False, False, False, True, True])
    watch, state, stream = _watch(answers)
    for _ in range(11):
        assert watch.step() is False
    # two outages of 4 and 5 probes: neither lasted 5 clock seconds from its first miss
    assert watch.misses == 8 and not watch.gave_up and state["exit"] is None and state["cleaned"] == 0
    assert watch.down_since is None and stream.getvalue() == ""


def test_a_cleanup_that_hangs_does_not_keep_the_process():
    hang = threading.Event()
    watch, state, stream = _watch(iter([False] * 10), cleanup_timeout_s=0.05)
    watch.cleanup = hang.wait  # an object store that never answers the lease's delete
    with pytest.raises(_Exited):
        for _ in range(10):
            watch.step()
    assert not hang.is_set() and state["exit"] == 2 and "has not answered" in stream.getvalue()
    hang.set()


def test_the_give_up_time_follows_rays_own_timeout(monkeypatch):
    monkeypatch.delenv(C.RAY_GCS_TIMEOUT_VAR, raising=False)
    assert C.HeadWatch().give_up_s == C.RAY_GCS_TIMEOUT_S - C.HEAD_WATCH_MARGIN_S == 45
    monkeypatch.setenv(C.RAY_GCS_TIMEOUT_VAR, "300")
    assert C.HeadWatch().give_up_s == 285
    monkeypatch.setenv(C.RAY_GCS_TIMEOUT_VAR, "12")
    assert C.HeadWatch().give_up_s == 5               # never sooner than 5 s
    monkeypatch.setenv(C.RAY_GCS_TIMEOUT_VAR, "soon")
    assert C.HeadWatch().give_up_s == 45


def test_only_a_cluster_address_is_watched():
    for address in (None, "", "ray://head:10001", "local"):
        watch = C.HeadWatch()
        assert watch.start(address) is False
        watch.stop()


def test_the_probe_tells_a_listening_port_from_a_closed_one():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        address = f"127.0.0.1:{srv.getsockname()[1]}"
        assert C._accepts_connections(address, timeout_s=2.0) is True
    assert C._accepts_connections(address, timeout_s=2.0) is False


def test_the_watch_thread_probes_a_real_port_and_stops_cleanly():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        address = f"127.0.0.1:{srv.getsockname()[1]}"
        seen = threading.Semaphore(0)

        def probe(addr):
            up = C._accepts_connections(addr, timeout_s=2.0)
            seen.release()
            return up

        with C.HeadWatch(interval_s=0.01, give_up_s=5, probe=probe, exit=lambda code: None) as watch:
            assert watch.start(address) is True
            for _ in range(3):
                assert seen.acquire(timeout=30)
        assert watch.misses == 0 and not watch.gave_up and watch._thread is None


# --------------------------------------------------------------------------- for real
def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_head_stops_the_run_with_one_line_and_the_rerun_resumes(tmp_path):
    from laionbuild.demo.crawl import build_crawl
    from laionbuild.demo.image_server import LoopbackServer

    ray_tmp = tempfile.mkdtemp(prefix="lbh", dir="/tmp")  # short: Ray's socket paths live under it
    home = tmp_path / "home"
    home.mkdir()  # no token: the head starts without authentication
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", C.AUTH_MODE_VAR, C.TOKEN_VAR,
                                                            C.TOKEN_PATH_VAR)}
    env.update({"RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0", "HOME": str(home),
                # Ray ends its processes 40 s after the head went away; the watch stops the run at 25 s
                C.RAY_GCS_TIMEOUT_VAR: "40",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                "PYTHONPATH": str(REPO)})
    port = _free_port(HEAD_IP)
    out = tmp_path / "out"
    with LoopbackServer("127.0.0.1") as server:
        crawl = build_crawl(str(tmp_path / "inputs"), n_files=2, pages_per_file=4, images_per_page=3,
                            image_base=f"http://images.crawl.test:{server.port}")
        crawl.register(server, delay_s=5.0)  # phase 3 is under way when the head is killed
        sets = []
        for s in [*crawl.config_overrides("127.0.0.1"), "run.work_shard_rows=4"]:
            sets += ["--set", s]
        args = [sys.executable, "-m", "laionbuild", "run", "-c", "configs/smoke.yaml", "--input",
                str(tmp_path / "inputs"), "--output", str(out), "--no-progress", *sets]
        try:
            head = subprocess.run([RAY, "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={port}",
                                   "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                                  env=env, capture_output=True, text=True, timeout=120)
            assert head.returncode == 0, head.stdout[-2000:] + head.stderr[-2000:]
            driver = subprocess.Popen([*args, "--address", f"{HEAD_IP}:{port}"], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            lines = []
            for line in driver.stdout:
                lines.append(line)
                if "fetch and score:" in line:
                    break
            assert any("fetch and score:" in line for line in lines), "".join(lines)[-3000:]
            gcs = [pid for pid in _pids("gcs_server") if ray_tmp in _environ(pid) or str(port) in _cmdline(pid)]
            assert gcs, "no gcs_server process found"
            for pid in gcs:
                os.kill(pid, signal.SIGKILL)
            rest, _ = driver.communicate(timeout=120)
            lines += rest.splitlines(keepends=True)
            log = "".join(lines)
            assert driver.returncode == C.HEAD_LOST_EXIT, log[-3000:]
            errors = [line for line in log.splitlines() if line.startswith("laionbuild: error:")]
            assert len(errors) == 1 and f"the Ray cluster's head at {HEAD_IP}:{port} has not answered" in errors[0], \
                log[-3000:]
            assert "Traceback" not in log
            assert not (out / "_lease.json").exists()       # released: the rerun need not wait
            assert not (out / "_SUCCESS").exists()
        finally:
            stop_processes(ray_tmp)
            shutil.rmtree(ray_tmp, ignore_errors=True)
        # the same command, on a Ray of its own this time, resumes and publishes every pair
        crawl.register(server)
        again = subprocess.run([*args, "--local"], cwd=REPO, env={**env, "RAY_TMPDIR": tempfile.gettempdir()},
                               capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    assert (out / "_SUCCESS").is_file()
    assert stats["stages"]["dedup"]["kept"] == stats["stages"]["fetch"]["counts"]["rows"] == len(crawl.pairs)
    assert "already extracted" in again.stderr + again.stdout


def _pids(name: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and name in _cmdline(int(entry)):
            found.append(int(entry))
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _environ(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return ""
