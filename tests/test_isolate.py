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
