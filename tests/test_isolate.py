"""Native code that kills its process, run in a child process: the call that killed its child is
reported (with the signal), every other call gets its answer; a restarted worker's fetch and
candidates stages use it, so a crashing image or input becomes a row or a file with a reason."""

from __future__ import annotations

import ctypes
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from laionbuild import schema as S
from laionbuild.config import Config, FetchConfig, ResizeConfig
from laionbuild.stages import isolate
from laionbuild.stages.resize import ImageRejected

CRASH = b"LBCRASH!"


def _segfault() -> None:
    import faulthandler

    faulthandler.disable()  # no stack dump from the child on the test's console
    ctypes.string_at(0)  # reads address 0: SIGSEGV, as a decoder's bug would


def square(x: int) -> int:
    if x == 7:
        _segfault()
    if x == 9:
        raise ValueError("nine is refused")
    if x == 11:
        os._exit(3)
    return x * x


def sleeper(seconds: float) -> str:
    import time

    time.sleep(seconds)
    return "woke"


def test_one_call_alone_returns_raises_or_names_the_signal():
    assert isolate.run_alone(square, 4) == 16
    with pytest.raises(ValueError, match="nine is refused"):
        isolate.run_alone(square, 9)
    with pytest.raises(isolate.ChildDied) as died:
        isolate.run_alone(square, 7)
    assert died.value.exitcode == -signal.SIGSEGV and "SIGSEGV" in str(died.value)
    with pytest.raises(isolate.ChildDied, match="exited with status 3"):
        isolate.run_alone(square, 11)
    with pytest.raises(isolate.ChildDied, match="took more than 0.5 s"):
        isolate.run_alone(sleeper, 30, timeout_s=0.5)


def test_in_a_pool_only_the_call_that_kills_its_child_fails():
    calls = isolate.IsolatedCalls(workers=2)

    def one(x):
        try:
            return calls(square, x)
        except isolate.ChildDied as exc:
            return f"died: {exc}"
        except ValueError as exc:
            return f"raised: {exc}"

    try:
        with ThreadPoolExecutor(8) as threads:
            got = list(threads.map(one, range(40)))
    finally:
        calls.close()
    for x, answer in enumerate(got):
        if x == 7:
            assert answer == "died: killed by SIGSEGV"
        elif x == 9:
            assert answer == "raised: nine is refused"
        elif x == 11:
            assert answer == "died: exited with status 3"
        else:
            assert answer == x * x, (x, answer)
    assert calls.stats["calls_killed_child"] == 2 and calls.stats["children_died"] >= 1


def test_the_signal_is_read_while_other_threads_ask_about_children():
    """``multiprocessing`` asks about every child it started whenever a thread starts a process
    or calls ``active_children()``; the status of a child that segfaults stays its signal."""
    import multiprocessing
    import threading

    stop = threading.Event()

    def ask():
        while not stop.is_set():
            multiprocessing.active_children()

    askers = [threading.Thread(target=ask) for _ in range(2)]
    for asker in askers:
        asker.start()
    statuses = []
    try:
        for _ in range(20):
            with pytest.raises(isolate.ChildDied) as died:
                isolate.run_alone(square, 7)
            statuses.append(died.value.exitcode)
    finally:
        stop.set()
        for asker in askers:
            asker.join()
    assert statuses == [-signal.SIGSEGV] * 20


def test_an_exception_and_its_fields_cross_the_process_boundary():
    import pickle

    exc = pickle.loads(pickle.dumps(ImageRejected("decode_error", "broken PNG")))
    assert (exc.status, exc.message) == ("decode_error", "broken PNG")
    died = pickle.loads(pickle.dumps(isolate.ChildDied(-11)))
    assert died.exitcode == -11 and "SIGSEGV" in str(died)


# ----------------------------------------------------------------------------- the fetch stage
def crashing_decoder(data, cfg, **limits):
    """The real decoder, except that an image starting with CRASH kills its process."""
    from laionbuild.stages.resize import decode_and_resize

    if bytes(data[:len(CRASH)]) == CRASH:
        _segfault()
    return decode_and_resize(data, cfg, **limits)


@pytest.fixture
def forked_children(monkeypatch):
    """Children forked from this process, so that the crashing decoder patched in reaches them."""
    monkeypatch.setattr(isolate, "START_METHOD", "fork")
    monkeypatch.setattr(isolate, "_context", None)


def test_a_restarted_fetcher_reports_the_image_that_kills_its_decoder(forked_children, monkeypatch):
    from helpers.images import encode
    from PIL import Image

    from laionbuild.demo.image_server import LoopbackServer
    from laionbuild.stages.fetch import ImageFetcher
    from laionbuild.stages.fetch import stage as fetch_stage

    monkeypatch.setattr(fetch_stage, "decode_and_resize", crashing_decoder)
    good = encode(Image.new("RGB", (64, 48), (200, 30, 30)), "PNG")
    with LoopbackServer("127.0.0.1") as server:
        urls = []
        for i in range(12):
            body = CRASH + good if i == 5 else good
            urls.append(server.add(f"/img/{i}.png", body, content_type="image/png"))
        cfg = FetchConfig(threads=4, allow_addresses=("127.0.0.1",), retries=0)
        batch = {S.URL: np.array(urls, dtype=object), S.DROP_REASON: np.full(len(urls), "", dtype=object)}
        with ImageFetcher(cfg, ResizeConfig(image_size=32)) as fetcher:
            fetcher.isolate_decoding(workers=2)
            out = fetcher(batch)
    status = list(out[S.STATUS])
    assert status[5] == "decoder_crashed" and out[S.DROP_REASON][5] == "fetch:decoder_crashed"
    assert "SIGSEGV" in out[S.ERROR_MESSAGE][5] and out[S.IMAGE][5] is None
    assert status[:5] + status[6:] == ["success"] * 11
    assert all(len(out[S.IMAGE][i]) == 32 * 32 * 3 for i in range(12) if i != 5)
    assert list(out[S.WIDTH][:5]) == [64] * 5


def test_a_fetcher_in_its_first_life_decodes_in_its_own_process(monkeypatch):
    from laionbuild.stages.fetch import ImageFetcher

    with ImageFetcher(FetchConfig(threads=2), ResizeConfig(image_size=32)) as fetcher:
        assert fetcher._isolated is None
        fetcher.isolate_decoding(workers=1)
        assert fetcher._isolated is not None and fetcher._isolated.workers == 1


# ----------------------------------------------------------------------------- the candidates phase
def test_an_input_that_kills_its_extraction_is_a_failed_file(forked_children, monkeypatch, tmp_path):
    from laionbuild.demo.sample_warc import build_demo_sample
    from laionbuild.runner import candidates as phase
    from laionbuild.stages import candidates as stage

    real = stage.extract_file

    def extract(path, cfg):
        if "poison" in path:
            _segfault()
        return real(path, cfg)

    monkeypatch.setattr(stage, "extract_file", extract)
    sample = build_demo_sample(str(tmp_path / "sample"), image_base="http://images.demo.test:9")
    poison = tmp_path / "poison.warc.gz"
    poison.write_bytes(open(sample.warc_paths[0], "rb").read())
    cfg = Config()
    crashed = phase.extract_isolated(str(poison), cfg)
    assert crashed.file.status == "failed" and crashed.file.reason == "crashed"
    assert "SIGSEGV" in crashed.file.message and crashed.rows == []
    fine = phase.extract_isolated(sample.warc_paths[0], cfg)
    assert fine.file.status == "ok" and len(fine.rows) == len(real(sample.warc_paths[0], cfg.extract).rows) > 0


# ----------------------------------------------------------------------------- calls stuck in native code
def spin() -> None:
    while True:  # a call that never ends, as a decoder stuck in a loop
        pass


def test_a_call_over_its_cpu_limit_is_ended_by_the_kernel_and_told_apart():
    with pytest.raises(isolate.ChildDied) as died:
        isolate.run_alone(spin, cpu_limit_s=1)
    assert isolate.over_cpu_limit(died.value) and "SIGXCPU" in str(died.value)
    assert isolate.run_alone(sleeper, 1.5, cpu_limit_s=1) == "woke"  # CPU time counts, not wall time
    with pytest.raises(isolate.ChildDied) as crashed:
        isolate.run_alone(square, 7, cpu_limit_s=1)
    assert not isolate.over_cpu_limit(crashed.value)
    calls = isolate.IsolatedCalls(workers=1, cpu_limit_s=1)
    try:
        assert calls(square, 3) == 9
        with pytest.raises(isolate.ChildDied) as stuck:
            calls(spin)
        assert isolate.over_cpu_limit(stuck.value)
        assert [calls(square, x) for x in (4, 5)] == [16, 25]  # the next children have their own limit
    finally:
        calls.close()
    assert calls.stats["calls_killed_child"] == 1


def test_a_watched_call_over_its_cpu_time_is_reported_once_and_a_waiting_one_never():
    import time

    stuck = []
    watch = isolate.CpuWatch(0.3, lambda what, seconds: stuck.append((what, seconds)), period_s=0.05)
    try:
        with watch.watching("sleeps"):
            time.sleep(0.8)  # waiting uses no CPU
        with watch.watching("spins"):
            start = time.thread_time()
            while time.thread_time() - start < 0.8:  # CPU time: however loaded the machine is
                pass
        with watch.watching("quick"):
            pass
    finally:
        watch.close()
    assert [what for what, _ in stuck] == ["spins"] and stuck[0][1] > 0.3


def _slow_jpeg_fetch(server, n_good: int = 3):
    """URLs of good images and of one valid JPEG whose many scans take seconds of CPU to decode."""
    from helpers.images import encode, many_scans_jpeg
    from PIL import Image

    good = encode(Image.new("RGB", (64, 48), (30, 200, 30)), "PNG")
    urls = [server.add(f"/ok/{i}.png", good, content_type="image/png") for i in range(n_good)]
    urls.append(server.add("/slow.jpg", many_scans_jpeg(9000, 9000, 900)))  # 9000 x 9000, 900 scans: 4-5 CPU-s
    return urls


def test_a_decode_past_its_cpu_limit_is_a_decode_timeout_row_in_a_restarted_fetcher():
    from laionbuild.demo.image_server import LoopbackServer
    from laionbuild.stages.fetch import ImageFetcher

    with LoopbackServer("127.0.0.1") as server:
        urls = _slow_jpeg_fetch(server)
        cfg = FetchConfig(threads=4, allow_addresses=("127.0.0.1",), retries=0, max_jpeg_scans=0,
                          decode_cpu_limit_s=1, timeout_s=30)
        batch = {S.URL: np.array(urls, dtype=object), S.DROP_REASON: np.full(len(urls), "", dtype=object)}
        with ImageFetcher(cfg, ResizeConfig(image_size=32)) as fetcher:
            fetcher.isolate_decoding(workers=1)
            out = fetcher(batch)
    assert list(out[S.STATUS]) == ["success"] * 3 + ["decode_timeout"]
    assert out[S.DROP_REASON][3] == "fetch:decode_timeout" and "1 CPU-seconds" in out[S.ERROR_MESSAGE][3]


def test_a_fetch_worker_whose_decode_is_stuck_ends_its_own_process(tmp_path):
    """In its first life a worker decodes in its own threads; past the CPU limit it ends itself
    (Ray then restarts it into the isolated mode above). Run in a process of its own here."""
    import subprocess
    import sys

    from laionbuild.demo.image_server import LoopbackServer
    from laionbuild.stages.fetch import stage as fetch_stage

    script = """
import sys
import numpy as np
from laionbuild import schema as S
from laionbuild.config import FetchConfig, ResizeConfig
from laionbuild.stages.fetch import ImageFetcher
urls = sys.argv[1:]
cfg = FetchConfig(threads=4, allow_addresses=("127.0.0.1",), retries=0, max_jpeg_scans=0, decode_cpu_limit_s=1,
                  timeout_s=30)
fetcher = ImageFetcher(cfg, ResizeConfig(image_size=32))
fetcher.end_process_when_stuck()
out = fetcher({S.URL: np.array(urls, dtype=object), S.DROP_REASON: np.full(len(urls), "", dtype=object)})
print("finished", list(out[S.STATUS]))
"""
    with LoopbackServer("127.0.0.1") as server:
        urls = _slow_jpeg_fetch(server)
        done = subprocess.run([sys.executable, "-c", script, *urls], capture_output=True, text=True, timeout=120)
    assert done.returncode == fetch_stage.STUCK_DECODE_EXIT, (done.returncode, done.stdout, done.stderr[-2000:])
    assert "finished" not in done.stdout
    assert "/slow.jpg has used" in done.stderr and "decode_timeout" in done.stderr


def test_a_stage_actor_watches_in_its_first_life_and_isolates_after_a_restart(monkeypatch):
    from laionbuild.runner import adapter

    class Stage:
        def __init__(self, cfg):
            self.told = []

        def isolate(self):
            self.told.append("isolate")

        def watch(self):
            self.told.append("watch")

        def __call__(self, batch):
            return batch

    monkeypatch.setattr(adapter, "node_id", lambda: "n")
    for restarted, told in ((False, ["watch"]), (True, ["isolate"])):
        monkeypatch.setattr(adapter, "actor_restarted", lambda r=restarted: r)
        assert adapter.StageActor(Stage, Config()).stage.told == told


def test_a_stage_actor_outside_ray_counts_nothing(monkeypatch):
    """Called outside a Ray actor (a restart made up by the test), a stage actor reads no attempt
    number and writes no count."""
    from laionbuild.runner import adapter

    monkeypatch.setattr(adapter, "actor_restarted", lambda: True)
    actor = adapter.StageActor(lambda cfg: (lambda batch: batch), Config())
    assert actor.deaths.after_crash and actor.deaths.begin() == ""
    assert actor({"x": np.arange(3)})["x"].tolist() == [0, 1, 2]
