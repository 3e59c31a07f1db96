"""WARC reading: record selection, HTTP block handling, both reader engines, URL input."""

from __future__ import annotations

import gzip
import http.server
import zlib
from pathlib import Path

import pytest

from helpers.http import LoopbackHTTP
from conftest_extract import (
    SAMPLE_2020,
    SAMPLE_2022,
    SAMPLE_2024,
    SHARED_WARC,
    html_page,
    http_block,
    raw_record,
    write_raw,
    write_warc,
)
from laionbuild.config import ExtractConfig
from laionbuild.stages.warc import (
    iter_html_documents,
    open_input,
    parse_http_block,
    split_content_type,
)
from laionbuild.stats import FileResult, StageCounters

READERS = ("warcio", "fastwarc")
needs_samples = pytest.mark.skipif(not SHARED_WARC.is_dir(), reason="shared WARC samples not available")


def read_docs(path, reader="warcio", **cfg_kw):
    counters, result = StageCounters(), FileResult(str(path))
    docs = list(iter_html_documents(str(path), ExtractConfig(reader=reader, **cfg_kw), counters, result))
    return docs, counters, result


# --------------------------------------------------------------------------- real samples
@needs_samples
@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(
    "path, records, responses, html, first_url",
    [
        (SAMPLE_2020, 50, 16, 16, "http://003338.cn/l41/481397.html"),
        (SAMPLE_2022, 3, 1, 1, "http://018hs.com/demo87/alzs.html"),
        (SAMPLE_2024, 4, 1, 1, "https://an.wikipedia.org/wiki/Escopete"),
    ],
)
def test_real_samples_record_counts(reader, path, records, responses, html, first_url):
    docs, counters, result = read_docs(path, reader)
    assert result.status == "ok", result
    assert counters.counts["records"] == records
    assert counters.counts["responses"] == responses
    assert counters.counts["html_responses"] == html == len(docs)
    assert docs[0].page_url == first_url
    assert all(d.record_id.startswith("<urn:uuid:") for d in docs)
    assert all(d.warc_path == str(path) for d in docs)


@needs_samples
def test_both_readers_give_the_same_documents():
    a, _, _ = read_docs(SAMPLE_2020, "warcio")
    b, _, _ = read_docs(SAMPLE_2020, "fastwarc")
    assert [(d.page_url, d.offset, d.record_id, d.http_charset, d.html) for d in a] == [
        (d.page_url, d.offset, d.record_id, d.http_charset, d.html) for d in b
    ]
    # offsets point at the gzip member of the record: decompressing there gives the record
    raw = SAMPLE_2020.read_bytes()
    for d in a[:4]:
        member = zlib.decompressobj(31).decompress(raw[d.offset:])
        assert member.startswith(b"WARC/1.0\r\n")
        assert d.record_id.encode() in member[:2000]
    # HTTP charsets as SOURCES.md lists them
    charsets = [d.http_charset.lower() for d in a if d.http_charset]
    assert charsets.count("gb2312") == 2 and charsets.count("windows-1251") == 1


# --------------------------------------------------------------------------- record selection
@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("gz", [True, False])
def test_only_html_responses_are_yielded(tmp_path, reader, gz):
    path = write_warc(
        tmp_path / "a.warc.gz",
        [
            {"url": "http://a.example/", "html": html_page("<img src=a.jpg alt='first image here'>")},
            {"url": "http://a.example/", "record_type": "request", "html": b""},
            {"url": "http://a.example/x.jpg", "html": b"\xff\xd8\xff\xe0JFIF", "content_type": "image/jpeg"},
            {"url": "http://a.example/x.xhtml", "html": html_page("x"), "content_type": "application/xhtml+xml"},
            {"url": "http://a.example/res", "html": html_page("resource"), "record_type": "resource"},
            {"url": "http://a.example/css", "html": b"body{}", "content_type": "text/css"},
        ],
        gzip_records=gz,
    )
    docs, counters, result = read_docs(path, reader)
    assert result.status == "ok"
    assert [d.page_url for d in docs] == ["http://a.example/", "http://a.example/x.xhtml"]
    assert counters.counts["records"] == 7  # warcinfo + 6
    assert counters.counts["responses"] == 4
    assert counters.counts["html_responses"] == 2
    assert docs[0].http_charset == "utf-8"
    assert docs[0].html.startswith(b"<!DOCTYPE html>")


def test_html_mime_types_are_configurable(tmp_path):
    path = write_warc(tmp_path / "a.warc.gz", [
        {"url": "http://a.example/x.xhtml", "html": html_page("x"), "content_type": "application/xhtml+xml"},
    ])
    docs, _, _ = read_docs(path, html_mime_types=("text/html",))
    assert docs == []


@pytest.mark.parametrize("reader", READERS)
def test_chunked_and_gzip_encodings_are_removed(tmp_path, reader):
    page = html_page("<img src=a.jpg alt='encoded page'>").encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(page[i:i + 50]), page[i:i + 50]) for i in range(0, len(page), 50))
    chunked += b"0\r\n\r\n"
    gz = gzip.compress(page)
    path = write_raw(tmp_path / "enc.warc.gz", [
        raw_record(http_block(chunked, headers=[("Transfer-Encoding", "chunked")]), url="http://a.example/1"),
        raw_record(http_block(gz, headers=[("Content-Encoding", "gzip")]), url="http://a.example/2"),
        raw_record(http_block(zlib.compress(page), headers=[("Content-Encoding", "deflate")]),
                   url="http://a.example/3"),
    ])
    docs, counters, result = read_docs(path, reader)
    assert result.status == "ok"
    assert [d.html for d in docs] == [page, page, page]
    assert counters.counts.get("content_encoding_mismatch", 0) == 0


@pytest.mark.parametrize("reader", READERS)
def test_payload_is_cut_at_max_html_bytes(tmp_path, reader):
    page = html_page("<p>" + "x" * 5000 + "</p>")
    path = write_warc(tmp_path / "big.warc.gz", [{"url": "http://a.example/", "html": page}])
    docs, counters, _ = read_docs(path, reader, max_html_bytes=1000)
    assert len(docs[0].html) == 1000
    assert counters.counts["html_truncated"] == 1


# --------------------------------------------------------------------------- HTTP helpers
def test_parse_http_block():
    status, headers, start = parse_http_block(
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nX-A: 1\r\nx-a: 2\r\n\r\n<html>"
    )
    assert status == 404
    assert headers == {"content-type": "text/html", "x-a": "1, 2"}
    assert start == len(b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    # bare LF line ends are accepted
    status, headers, start = parse_http_block(b"HTTP/1.0 200 OK\nContent-Type: text/html\n\nbody")
    assert (status, headers["content-type"]) == (200, "text/html")


@pytest.mark.parametrize(
    "value, expected",
    [
        ("text/html; charset=UTF-8", ("text/html", "UTF-8")),
        ("Text/HTML;charset=\"gb2312\"", ("text/html", "gb2312")),
        ("text/html", ("text/html", None)),
        ("application/xhtml+xml ; Charset = 'Shift_JIS'", ("application/xhtml+xml", "Shift_JIS")),
        ("", ("", None)),
        # a header sent twice, joined by a comma: the last MIME type, as browsers read it
        ("text/html, text/html", ("text/html", None)),
        ("text/html, text/html; charset=UTF-8", ("text/html", "UTF-8")),
        ("text/html; charset=gbk, text/html", ("text/html", "gbk")),  # kept from the same type
        ("text/html; charset=gbk, text/plain, text/html", ("text/html", None)),  # not across types
        ("text/plain, text/html;charset=latin1", ("text/html", "latin1")),
        ("text/html, */*", ("text/html", None)),
        ("text/html, nonsense", ("text/html", None)),
        ('text/html; charset="a,b", image/png', ("image/png", None)),
        ('image/png, text/html; x="a,b"; charset=utf-8', ("text/html", "utf-8")),
        ("text/html charset=utf-8", ("", None)),
        ("html", ("", None)),
    ],
)
def test_split_content_type(value, expected):
    assert split_content_type(value) == expected


@pytest.mark.parametrize("reader", READERS)
def test_repeated_and_folded_content_type_headers(tmp_path, reader):
    page = html_page("<img src=a.jpg alt='some image'>").encode()
    path = write_raw(tmp_path / "ct.warc.gz", [
        raw_record(http_block(page, "text/html", headers=[("Content-Type", "text/html")]), url="http://a.example/1"),
        raw_record(http_block(page, "text/html", headers=[("Content-Type", "text/html; charset=windows-1251")]),
                   url="http://a.example/2"),
        # obs-fold: the value continues on the next line
        raw_record(b"HTTP/1.1 200 OK\r\nContent-Type:\r\n text/html;\r\n\tcharset=gbk\r\n\r\n" + page,
                   url="http://a.example/3"),
        raw_record(b"HTTP/1.1 200 OK\nX-Note: a\n Content-Type: image/png\nContent-Type: text/html\n\n" + page,
                   url="http://a.example/4"),
        # names HTML but reads as no MIME type: skipped with a reason
        raw_record(http_block(page, "text/html charset=utf-8"), url="http://a.example/5"),
        raw_record(http_block(b"\x89PNG", "image/png"), url="http://a.example/6"),
    ])
    docs, counters, result = read_docs(path, reader)
    assert result.status == "ok"
    assert [(d.page_url, d.http_charset) for d in docs] == [
        ("http://a.example/1", None), ("http://a.example/2", "windows-1251"), ("http://a.example/3", "gbk"),
        ("http://a.example/4", None)]
    assert counters.counts["record_skipped:bad_content_type"] == 1
    assert counters.counts["responses"] == 6
    assert counters.counts["html_responses"] == 4


def test_parse_http_block_unfolds_folded_lines():
    _, headers, _ = parse_http_block(b"HTTP/1.1 200 OK\r\nX-A: 1,\r\n  2\r\nContent-Type: text/html\r\n\r\nbody")
    assert headers == {"x-a": "1, 2", "content-type": "text/html"}


# --------------------------------------------------------------------------- input paths and URLs
def test_open_input_local_and_file_url(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"abc")
    with open_input(str(p)) as fh:
        assert fh.read() == b"abc"
    with open_input(f"file://{p}") as fh:
        assert fh.read() == b"abc"


@pytest.mark.parametrize("reader", READERS)
def test_missing_file_is_reported_not_raised(tmp_path, reader):
    docs, _, result = read_docs(tmp_path / "nope.warc.gz", reader)
    assert docs == []
    assert (result.status, result.reason) == ("failed", "unreadable")


@pytest.fixture()
def loopback_server(tmp_path, monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "srv"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *args):
            pass

    with LoopbackHTTP(Handler) as server:
        yield root, server.url


@pytest.mark.parametrize("reader", READERS)
def test_warc_from_http_url(loopback_server, reader):
    root, base = loopback_server
    write_warc(root / "w.warc.gz", [
        {"url": "http://a.example/", "html": html_page("<img src=a.jpg alt='served over http'>")},
        {"url": "http://b.example/", "html": html_page("second")},
    ])
    docs, counters, result = read_docs(f"{base}/w.warc.gz", reader)
    assert result.status == "ok"
    assert [d.page_url for d in docs] == ["http://a.example/", "http://b.example/"]
    assert docs[0].warc_path == f"{base}/w.warc.gz"
    missing, _, result = read_docs(f"{base}/missing.warc.gz", reader)
    assert missing == [] and (result.status, result.reason) == ("failed", "unreadable")
    assert "404" in result.message


def test_sample_path_constant_points_next_to_repo():
    assert SHARED_WARC == Path(__file__).resolve().parents[2] / "shared" / "data" / "warc"
