"""Remote WARC reads that break: resumed with Range requests, every record read exactly once."""

from __future__ import annotations

import io
import threading
from http.server import BaseHTTPRequestHandler

import fsspec
import pytest

from conftest_extract import html_page, write_warc
from helpers.http import LoopbackHTTP
from laionbuild.config import ExtractConfig
from laionbuild.remote import (
    RemoteReadError,
    ResumableFsspecReader,
    ResumableHTTPReader,
    RetryPolicy,
    parse_retry_after,
)
from laionbuild.stages.warc import iter_html_documents
from laionbuild.stats import FileResult, StageCounters

FAST = dict(input_retries=3, input_backoff_s=0.0, input_timeout_s=10.0)


class FlakyServer:
    """Serves one object on 127.0.0.1; each request follows the next step of a plan:
    ``"ok"``, ``("drop", n)`` (send n bytes of the answer, then close), ``"503"`` (with
    ``Retry-After``), ``"ignore_range"`` (answer 200 with the whole object), ``"etag"``
    (answer with another ETag). Without steps left: ``"ok"``."""

    def __init__(self, data: bytes, plan: list, retry_after: str = "0", etag: str = '"v1"'):
        self.data = data
        self.plan = list(plan)
        self.retry_after = retry_after
        self.etag = etag
        self.ranges: list[str | None] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                with outer.lock:
                    outer.ranges.append(self.headers.get("Range"))
                    step = outer.plan.pop(0) if outer.plan else "ok"
                if step in ("503", "404"):
                    self.send_response(int(step))
                    self.send_header("Retry-After", outer.retry_after)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data, start = outer.data, 0
                rng = self.headers.get("Range")
                etag = '"v2"' if step == "etag" else outer.etag
                if rng and step != "ignore_range":
                    start = int(rng.split("=")[1].rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("ETag", etag)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Connection", "close")
                self.end_headers()
                body = data[start:]
                if isinstance(step, tuple) and step[0] == "drop":
                    self.wfile.write(body[: step[1]])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = LoopbackHTTP(Handler)
        self.url = f"{self.server.url}/crawl/file.warc.gz"

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop()


@pytest.fixture(scope="module")
def warc(tmp_path_factory):
    path = tmp_path_factory.mktemp("warc") / "many.warc.gz"
    pages = [
        {"url": f"http://site{i}.example/page", "html": html_page(
            f"<p>page {i} {'lorem ipsum dolor sit amet ' * (40 + i % 7)}</p>"
            f"<img src='/img{i}.jpg' alt='picture number {i} of the series'>")}
        for i in range(120)
    ]
    write_warc(path, pages)
    return path


def _docs(path: str, **cfg):
    counters, result = StageCounters(), FileResult(path)
    docs = list(iter_html_documents(path, ExtractConfig(**{**FAST, **cfg}), counters, result))
    return [(d.page_url, d.record_id) for d in docs], result, counters


@pytest.mark.parametrize("reader", ["warcio", "fastwarc"])
def test_broken_reads_resume_and_every_record_is_read_once(warc, reader):
    data = warc.read_bytes()
    expected, ok, _ = _docs(str(warc), reader=reader)
    assert len(expected) == 120 and ok.status == "ok"
    cut1, cut2, cut3 = 9_000, 17_000, 25_000
    plan = [("drop", cut1), "503", ("drop", cut2), ("drop", cut3), "503", "503", "ok"]
    with FlakyServer(data, plan) as server:
        docs, result, _ = _docs(server.url, reader=reader)
        ranges = list(server.ranges)
    assert result.status == "ok", result.message
    assert docs == expected                      # same records, same order, none twice
    assert len(set(docs)) == len(docs)
    resume1, resume2 = cut1, cut1 + cut2
    resume3 = resume2 + cut3
    assert ranges == [None, f"bytes={resume1}-", f"bytes={resume1}-", f"bytes={resume2}-",
                      f"bytes={resume3}-", f"bytes={resume3}-", f"bytes={resume3}-"]
    assert resume3 < len(data)


def test_server_ignoring_range_is_read_from_the_start_and_skipped(warc):
    data = warc.read_bytes()
    expected, _, _ = _docs(str(warc))
    with FlakyServer(data, [("drop", 12_000), "ignore_range"]) as server:
        docs, result, _ = _docs(server.url)
        assert server.ranges == [None, "bytes=12000-"]
    assert result.status == "ok" and docs == expected


def test_retry_budget_spent_fails_the_file_for_the_next_run(warc):
    """The network gave up, not the file: ``failed`` with reason network, not ``partial``."""
    data = warc.read_bytes()
    with FlakyServer(data, [("drop", 15_000)] + ["503"] * 20) as server:
        docs, result, _ = _docs(server.url, input_retries=3)
        assert server.ranges == [None] + ["bytes=15000-"] * 3   # 3 retries after the first failure
    # whatever was parsed before, the file is not complete: no marker, the next run reads it again
    assert result.status == "failed" and result.reason == "network"
    assert "gave up after 4 failed attempts at byte 15000" in result.message


def test_unreachable_at_open_is_a_network_failure(warc):
    with FlakyServer(warc.read_bytes(), ["503"] * 10) as server:
        docs, result, _ = _docs(server.url, input_retries=2)
        assert len(server.ranges) == 3
    assert not docs and result.status == "failed" and result.reason == "network"


def test_missing_object_is_unreadable_without_retries(warc):
    with FlakyServer(warc.read_bytes(), ["404"]) as server:
        docs, result, _ = _docs(server.url)
        assert server.ranges == [None]
    assert not docs and result.status == "failed" and result.reason == "unreadable"
    assert "HTTP 404" in result.message


def test_changed_object_fails_the_file(warc):
    with FlakyServer(warc.read_bytes(), [("drop", 10_000), "etag"]) as server:
        _, result, _ = _docs(server.url)
    assert result.status == "failed" and result.reason == "changed"


def test_truncated_file_is_partial_not_failed(warc):
    """A file that itself ends early is the parser's ``partial``: the network delivered all of it."""
    data = warc.read_bytes()
    cut = data[: len(data) * 2 // 3]
    with FlakyServer(cut, [("drop", 8_000)]) as server:
        docs, result, _ = _docs(server.url)
    expected, _, _ = _docs(str(warc))
    assert result.status == "partial" and result.reason != "network"
    assert docs == expected[: len(docs)] and 0 < len(docs) < len(expected)


def test_retry_after_is_honoured(warc):
    sleeps: list[float] = []
    with FlakyServer(warc.read_bytes(), ["503", "503"], retry_after="7") as server:
        reader = ResumableHTTPReader(server.url, RetryPolicy(retries=5, backoff_s=0.5, max_backoff_s=60),
                                     sleep=sleeps.append)
        with io.BufferedReader(reader) as fh:
            assert fh.read() == warc.read_bytes()
    assert sleeps == [7.0, 7.0]
    assert reader.retries == 2


def test_backoff_grows_and_is_capped():
    policy = RetryPolicy(retries=10, backoff_s=1.0, max_backoff_s=5.0)
    for failures, top in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (8, 5.0)]:
        d = policy.delay(failures)
        assert top * 0.5 <= d <= top
    assert policy.delay(3, retry_after=100.0) == 5.0
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("soon") is None
    # str.isdigit() is true of these, float() refuses them: not delta seconds, not a date
    assert parse_retry_after("\u00b2") is None and parse_retry_after("1\u00b9") is None
    assert parse_retry_after("\u0661\u0662") is None  # Arabic-Indic digits


class _FlakyFile(io.BytesIO):
    """An object-store file whose read breaks after ``fail_after`` bytes of this handle."""

    def __init__(self, data: bytes, fail_after: int | None):
        super().__init__(data)
        self.fail_after = fail_after
        self.got = 0

    def read(self, n=-1):
        if self.fail_after is not None and self.got >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        n = len(self.getvalue()) if n is None or n < 0 else n
        if self.fail_after is not None:
            n = min(n, self.fail_after - self.got)
        chunk = super().read(n)
        self.got += len(chunk)
        return chunk


def test_fsspec_reads_resume_with_a_seek(warc):
    data = warc.read_bytes()
    fails = [7_000, 11_000, None]
    seeks: list[int] = []

    def opener():
        fh = _FlakyFile(data, fails.pop(0))
        real_seek = fh.seek
        fh.seek = lambda pos, whence=0: (seeks.append(pos), real_seek(pos, whence))[1]
        return fh

    reader = ResumableFsspecReader("s3://bucket/file.warc.gz", RetryPolicy(retries=2, backoff_s=0.0),
                                   opener=opener)
    reader.size = len(data)
    with io.BufferedReader(reader, buffer_size=4096) as fh:
        assert fh.read() == data
    assert seeks == [7_000, 18_000]
    assert reader.resumes == 2


def test_fsspec_url_through_the_stage(warc):
    fs = fsspec.filesystem("memory")
    fs.pipe("/remote-reads/file.warc.gz", warc.read_bytes())
    expected, _, _ = _docs(str(warc))
    docs, result, _ = _docs("memory://remote-reads/file.warc.gz")
    assert result.status == "ok" and docs == expected
    with pytest.raises(RemoteReadError):
        ResumableFsspecReader("memory://x", RetryPolicy(retries=0),
                              opener=lambda: (_ for _ in ()).throw(ConnectionError("down")))
