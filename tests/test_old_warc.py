"""An old-format crawl: WARC/0.18 records, LF-only header lines, EUC-JP pages with CRLF bodies.

The HTTP header block of such a record ends with a bare ``\\n\\n``; the body has
CRLF lines and blank lines. Taking the first ``\\r\\n\\r\\n`` as the end of the
header cut every page at its first blank line (its ``<meta charset>`` and the
images before it lost). The extractor must see exactly what a plain HTML parse
of the same payloads sees.
"""

from __future__ import annotations

import gzip
import uuid

import pytest
from selectolax.lexbor import LexborHTMLParser

from laionbuild.config import ExtractConfig
from laionbuild.stages.candidates import extract_file
from laionbuild.stages.warc import fastwarc_available, iter_html_documents, parse_http_block
from laionbuild.stats import FileResult, StageCounters

ALTS = ["富士山と桜の写真", "東京タワーの夜景", "京都の古いお寺", "北海道の雪まつり", "沖縄の青い海と白い砂浜",
        "大阪城の石垣", "奈良公園の鹿"]
#: the image before the page's first blank line
TOP_ALT = "トップページの写真"


def euc_jp_page(k: int) -> bytes:
    """A page as old Japanese sites wrote them: EUC-JP, CRLF lines, blank lines between blocks."""
    lines = ['<html><head>',
             '<meta http-equiv="Content-Type" content="text/html; charset=EUC-JP">',
             f'<title>旅行写真集 {k}</title></head>', '<body>',
             f'<img src="/top/{k}.jpg" alt="{TOP_ALT}">', '',
             '<img src="/img/logo.gif" alt="ロゴ">']
    for i, alt in enumerate(ALTS):
        lines += [f'<h2>第{i}章</h2>', '', f'<img src="/photo/{k}/{i}.jpg" alt="{alt}">',
                  f'<img src="/spacer.png">', '']
    lines += ['<img src="http://example.jp/ad.jpg" alt="">', '</body></html>', '']
    return "\r\n".join(lines).encode("euc_jp")


def old_record(url: str, payload: bytes) -> bytes:
    """A WARC/0.18 response record with LF-only WARC and HTTP header lines."""
    http = b"HTTP/1.0 200 OK\nServer: Apache/1.3.41\nContent-Type: text/html\nConnection: close\n\n" + payload
    head = (f"WARC/0.18\nWARC-Type: response\nWARC-Target-URI: {url}\nWARC-Date: 2009-01-13T18:05:37-0800\n"
            f"WARC-Record-ID: <urn:uuid:{uuid.uuid4()}>\nContent-Type: application/http;msgtype=response\n"
            f"Content-Length: {len(http)}\n\n").encode("ascii")
    return head + http + b"\n\n"


@pytest.fixture()
def old_warc(tmp_path):
    payloads = {f"http://www.example.jp/trip/{k}.html": euc_jp_page(k) for k in range(4)}
    path = tmp_path / "clueweb-like.warc.gz"
    with open(path, "wb") as fh:
        for url, payload in payloads.items():
            fh.write(gzip.compress(old_record(url, payload)))
    return path, payloads


def plain_parse(payloads: dict[str, bytes]) -> dict[str, int]:
    imgs = with_alt = 0
    pairs = set()
    for payload in payloads.values():
        tree = LexborHTMLParser(payload.decode("euc_jp"))
        for img in tree.tags("img"):
            imgs += 1
            alt = (img.attrs.get("alt") or "").strip()
            if alt:
                with_alt += 1
            src = img.attrs.get("src") or ""
            if len(alt) >= 5 and not src.endswith(".gif"):
                pairs.add((src, alt))
    return {"imgs": imgs, "imgs_with_alt": with_alt, "candidates": len(pairs)}


def test_lf_only_header_ends_at_the_first_blank_line():
    payload = b"<p>a</p>\r\n\r\n<img src=x alt=y>"
    status, headers, start = parse_http_block(b"HTTP/1.0 200 OK\nContent-Type: text/html\n\n" + payload)
    assert status == 200 and headers["content-type"] == "text/html"
    assert start == len(b"HTTP/1.0 200 OK\nContent-Type: text/html\n\n")


@pytest.mark.parametrize("reader", ["auto", "warcio"])
def test_old_warc_gives_what_a_plain_parse_gives(old_warc, reader):
    path, payloads = old_warc
    expected = plain_parse(payloads)
    assert expected == {"imgs": 4 * 17, "imgs_with_alt": 4 * 9, "candidates": 4 * 8}
    fe = extract_file(str(path), ExtractConfig(reader=reader))
    assert fe.file.status == "ok", fe.file
    c = fe.counters.counts
    assert c["imgs"] == expected["imgs"]
    assert c["imgs_with_alt"] == expected["imgs_with_alt"]
    assert len(fe.rows) == expected["candidates"]
    assert c["charset_from_meta"] == 4  # the <meta> and the image before the first blank line are seen
    assert sorted({r["alt_text"] for r in fe.rows}) == sorted(ALTS + [TOP_ALT])
    assert {r["url"] for r in fe.rows} >= {"http://www.example.jp/photo/0/0.jpg", "http://www.example.jp/photo/3/6.jpg"}


def test_documents_hold_the_whole_payload(old_warc):
    path, payloads = old_warc
    counters, result = StageCounters(), FileResult(str(path))
    docs = list(iter_html_documents(str(path), ExtractConfig(reader="warcio"), counters, result))
    assert [d.html for d in docs] == list(payloads.values())


@pytest.mark.skipif(not fastwarc_available(), reason="fastwarc not installed")
def test_auto_reader_falls_back_to_warcio_for_lf_only_warc_headers(old_warc):
    path, payloads = old_warc
    fe = extract_file(str(path), ExtractConfig(reader="auto"))
    assert fe.counters.counts["reader_fallback_warcio"] == 1
    assert fe.counters.counts["records"] == len(payloads)  # the failed fastwarc attempt is not counted
    assert fe.file.status == "ok"


def _crlf_record(url: str, payload: bytes) -> bytes:
    http = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n" + payload
    head = (f"WARC/1.0\r\nWARC-Type: response\r\nWARC-Target-URI: {url}\r\nWARC-Date: 2021-01-01T00:00:00Z\r\n"
            f"WARC-Record-ID: <urn:uuid:{uuid.uuid4()}>\r\nContent-Type: application/http; msgtype=response\r\n"
            f"Content-Length: {len(http)}\r\n\r\n").encode("ascii")
    return head + http + b"\r\n\r\n"


@pytest.mark.skipif(not fastwarc_available(), reason="fastwarc not installed")
@pytest.mark.parametrize("gz", [True, False])
def test_auto_reader_reads_on_with_warcio_when_fastwarc_stops_at_a_later_record(tmp_path, old_warc, gz):
    """CRLF records first, then LF-only ones: fastwarc stops at the first LF-only header; warcio
    reads on from there, every record counted once."""
    _, payloads = old_warc
    records = [_crlf_record(f"http://www.example.com/{i}.html",
                            f"<img src='/a{i}.jpg' alt='a crlf record image {i}'>".encode()) for i in range(2)]
    records += [old_record(url, payload) for url, payload in payloads.items()]
    path = tmp_path / ("mixed.warc.gz" if gz else "mixed.warc")
    path.write_bytes(b"".join(gzip.compress(r) if gz else r for r in records))
    ref = extract_file(str(path), ExtractConfig(reader="warcio"))
    assert ref.file.status == "ok" and ref.counters.counts["records"] == 6
    fe = extract_file(str(path), ExtractConfig(reader="auto"))
    assert (fe.file.status, fe.file.reason) == ("ok", "")
    assert fe.rows == ref.rows
    assert len(fe.rows) == 2 + 4 * 8
    counts = dict(fe.counters.counts)
    assert counts.pop("reader_fallback_warcio") == 1
    assert counts == dict(ref.counters.counts)
    assert fe.counters.dropped_by_reason == ref.counters.dropped_by_reason and fe.counters.kept == ref.counters.kept


@pytest.mark.skipif(not fastwarc_available(), reason="fastwarc not installed")
def test_auto_reader_keeps_fastwarc_account_when_warcio_gets_no_further(tmp_path):
    records = [_crlf_record(f"http://www.example.com/{i}.html",
                            f"<img src='/a{i}.jpg' alt='a crlf record image {i}'>".encode()) for i in range(3)]
    data = b"".join(records)
    path = tmp_path / "cut.warc"
    path.write_bytes(data[: len(records[0]) + len(records[1]) + 40])  # the third record's header is cut
    fw = extract_file(str(path), ExtractConfig(reader="fastwarc"))
    fe = extract_file(str(path), ExtractConfig(reader="auto"))
    assert fw.file.status == fe.file.status == "partial"
    assert fe.rows == fw.rows and len(fe.rows) == 2
    counts = dict(fe.counters.counts)
    assert counts.pop("reader_fallback_warcio") == 1
    assert counts == dict(fw.counters.counts)


@pytest.mark.skipif(not fastwarc_available(), reason="fastwarc not installed")
@pytest.mark.parametrize("tail", ["corrupt member", "garbage"])
def test_auto_reader_never_yields_a_page_twice_when_fastwarc_fails_between_records(tmp_path, tail):
    """fastwarc yields two pages, then fails looking for the third record: warcio takes over after
    the second, not at it (the second page was yielded twice, and counted as a duplicate)."""
    records = [_crlf_record(f"http://www.example.com/{i}.html",
                            f"<img src='/a{i}.jpg' alt='a picture number {i}'>".encode()) for i in range(3)]
    members = [gzip.compress(r) for r in records]
    bad = bytearray(members[2])
    bad[20:40] = b"\xff" * 20
    data = b"".join(members[:2]) + (bytes(bad) if tail == "corrupt member" else b"this is not gzip at all" * 10)
    path = tmp_path / "tail.warc.gz"
    path.write_bytes(data)
    for dedup in (True, False):
        fw = extract_file(str(path), ExtractConfig(reader="fastwarc", dedup_within_file=dedup))
        fe = extract_file(str(path), ExtractConfig(reader="auto", dedup_within_file=dedup))
        assert len(fe.rows) == len(fw.rows) == 2
        assert fe.counters.kept == fw.counters.kept == 2 and not fe.counters.dropped_by_reason
        assert fe.counters.counts["candidates"] == 2 and fe.counters.counts["responses"] == 2
