"""Bad input never crashes extraction: each case is counted with a reason (both reader engines)."""

from __future__ import annotations

import gzip
import os
import zlib

import pytest

from conftest_extract import html_page, http_block, raw_record, write_raw, write_warc
from laionbuild.config import ExtractConfig
from laionbuild.stages.candidates import extract_file

READERS = ("warcio", "fastwarc")
GOOD_ALT = "a good caption of page {i}"


def good_pages(n: int) -> list[dict]:
    return [
        {"url": f"http://site{i}.example/", "html": html_page(f"<p>{'text ' * 300}</p>"
                                                               f"<img src='/p{i}.jpg' alt='{GOOD_ALT.format(i=i)}'>")}
        for i in range(n)
    ]


def good_raw(i: int) -> bytes:
    return raw_record(http_block(html_page(f"<img src='/p{i}.jpg' alt='{GOOD_ALT.format(i=i)}'>").encode()),
                      url=f"http://site{i}.example/")


def alts(fe) -> list[str]:
    return [r["alt_text"] for r in fe.rows]


# --------------------------------------------------------------------------- truncation
@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("fraction", [0.35, 0.6, 0.9])
def test_truncated_gzip_keeps_what_was_read(tmp_path, reader, fraction):
    full = write_warc(tmp_path / "full.warc.gz", good_pages(6))
    data = full.read_bytes()
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(data[: int(len(data) * fraction)])
    fe = extract_file(str(cut), ExtractConfig(reader=reader))
    assert fe.file.status == "partial"
    assert fe.file.reason in ("truncated", "bad_record")
    assert fe.file.message
    got = alts(fe)
    assert 0 < len(got) < 6
    assert got == [GOOD_ALT.format(i=i) for i in range(len(got))]  # what was read is kept, in order


@pytest.mark.parametrize("reader", READERS)
def test_truncated_plain_warc(tmp_path, reader):
    full = write_warc(tmp_path / "full.warc", good_pages(4), gzip_records=False)
    data = full.read_bytes()
    cut = tmp_path / "cut.warc"
    cut.write_bytes(data[: len(data) - 700])
    fe = extract_file(str(cut), ExtractConfig(reader=reader))
    assert (fe.file.status, fe.file.reason) == ("partial", "truncated")
    assert alts(fe) == [GOOD_ALT.format(i=i) for i in range(3)]
    assert fe.counters.counts["record_skipped:truncated"] == 1


# --------------------------------------------------------------------------- not a WARC
@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(
    "content",
    [
        b"this is a plain text file, not a web archive\n" * 20,
        gzip.compress(b"this is a gzipped text file, not a web archive\n" * 20),
        b"<!DOCTYPE html><html><body><img src='/a.jpg' alt='html, not warc'></body></html>",
        bytes(range(256)) * 8,
        b"\x1f\x8b\x08\x00garbage after a gzip magic",
    ],
    ids=["text", "gzip-text", "html", "binary", "bad-gzip"],
)
def test_not_a_warc_fails_cleanly(tmp_path, reader, content):
    p = tmp_path / "x.warc.gz"
    p.write_bytes(content)
    fe = extract_file(str(p), ExtractConfig(reader=reader))
    assert fe.rows == []
    assert (fe.file.status, fe.file.reason) == ("failed", "not_warc"), fe.file


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("content", [b"", gzip.compress(b""), gzip.compress(b"") * 3], ids=["0 bytes", "gzip", "3 members"])
def test_empty_file_fails_cleanly(tmp_path, reader, content):
    p = tmp_path / "empty.warc.gz"
    p.write_bytes(content)
    fe = extract_file(str(p), ExtractConfig(reader=reader))
    assert (fe.file.status, fe.file.reason) == ("failed", "empty_file")


# --------------------------------------------------------------------------- version quirks
@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("version", ["WARC/0.18", "WARC/0.17", "WARC/1.1"])
def test_old_and_new_warc_versions_are_read(tmp_path, reader, version):
    p = write_raw(tmp_path / "v.warc.gz", [raw_record(http_block(html_page(
        "<img src='/a.jpg' alt='versioned record image'>").encode()), version=version)])
    fe = extract_file(str(p), ExtractConfig(reader=reader))
    assert fe.file.status == "ok"
    assert alts(fe) == ["versioned record image"]


@pytest.mark.parametrize("reader", READERS)
def test_unknown_version_in_the_middle_keeps_earlier_records(tmp_path, reader):
    p = write_raw(tmp_path / "v.warc.gz", [good_raw(0), good_raw(1), raw_record(b"x", version="WARC/9.9"), good_raw(3)])
    fe = extract_file(str(p), ExtractConfig(reader=reader))
    assert (fe.file.status, fe.file.reason) == ("partial", "bad_record")
    assert alts(fe)[:2] == [GOOD_ALT.format(i=0), GOOD_ALT.format(i=1)]
    p = write_raw(tmp_path / "first.warc.gz", [raw_record(b"x", version="WARC/9.9"), good_raw(1)])
    fe = extract_file(str(p), ExtractConfig(reader=reader))
    assert (fe.file.status, fe.file.reason) == ("failed", "not_warc")


# --------------------------------------------------------------------------- bogus records
@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("gz", [True, False])
def test_bogus_and_missing_headers_skip_only_the_record(tmp_path, reader, gz):
    records = [
        good_raw(0),
        raw_record(b"GARBAGE STATUS LINE\r\nContent-Type: text/html\r\n\r\n<img src=/x.jpg alt='never seen'>"),
        raw_record(b"HTTP/1.1 abc OK\r\nContent-Type: text/html\r\n\r\n<img src=/x.jpg alt='never seen'>"),
        raw_record(b"<html>no http header at all, just a body without blank line"),
        raw_record(http_block(b"<img src=/x.jpg alt='no target uri here'>"), url=None),
        raw_record(http_block(b"<img src=/x.jpg alt='no content type'>", content_type="")),
        raw_record(b"", rtype="response"),
        raw_record(http_block(b"   \r\n  "), url="http://blank.example/"),
        good_raw(9),
    ]
    p = write_raw(tmp_path / "bogus.warc.gz", records, gzip_records=gz)
    fe = extract_file(str(p), ExtractConfig(reader=reader))
    assert fe.file.status == "ok", fe.file
    assert alts(fe) == [GOOD_ALT.format(i=0), GOOD_ALT.format(i=9)]
    counts = fe.counters.counts
    assert counts["records"] == 9 and counts["responses"] == 9
    assert counts["record_skipped:bad_http_header"] == 3
    assert counts["record_skipped:missing_target_uri"] == 1
    assert counts["record_skipped:empty_record"] == 1
    assert counts["record_skipped:empty_payload"] == 1


@pytest.mark.parametrize("reader", READERS)
def test_content_encoding_lies(tmp_path, reader):
    body = html_page("<img src='/a.jpg' alt='plain body despite header'>").encode()
    p = write_raw(tmp_path / "lie.warc.gz", [
        raw_record(http_block(body, headers=[("Content-Encoding", "gzip")])),
        raw_record(http_block(body, headers=[("Content-Encoding", "br")]), url="http://b.example/"),
        raw_record(http_block(body, headers=[("Transfer-Encoding", "chunked")]), url="http://c.example/"),
        raw_record(http_block(b"\x1f\x8b\x08\x00broken gzip", headers=[("Content-Encoding", "gzip")]),
                   url="http://d.example/"),
    ])
    fe = extract_file(str(p), ExtractConfig(reader=reader))
    assert fe.file.status == "ok"
    assert len(fe.rows) == 3 and len({r["page_url"] for r in fe.rows}) == 3
    assert fe.counters.counts["content_encoding_mismatch"] == 3
    assert fe.counters.counts["transfer_encoding_mismatch"] == 1


@pytest.mark.parametrize("reader", READERS)
def test_gzip_bomb_payload_is_bounded(tmp_path, reader):
    bomb = gzip.compress(b"<p>" + b"a" * 40_000_000)
    p = write_raw(tmp_path / "bomb.warc.gz", [raw_record(http_block(bomb, headers=[("Content-Encoding", "gzip")]))])
    fe = extract_file(str(p), ExtractConfig(reader=reader, max_html_bytes=100_000))
    assert fe.file.status == "ok"
    assert fe.counters.counts["html_truncated"] == 1


@pytest.mark.parametrize("reader", READERS)
def test_binary_content_labelled_as_html(tmp_path, reader):
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + os.urandom(3000)
    p = write_raw(tmp_path / "bin.warc.gz", [
        raw_record(http_block(png)),
        raw_record(http_block(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + os.urandom(2000)), url="http://j.example/"),
        good_raw(2),
    ])
    fe = extract_file(str(p), ExtractConfig(reader=reader))
    assert fe.file.status == "ok"
    assert alts(fe) == [GOOD_ALT.format(i=2)]
    assert fe.counters.counts["record_skipped:binary_payload"] == 2


@pytest.mark.parametrize("reader", READERS)
def test_invalid_bytes_in_alt_text(tmp_path, reader):
    body = (b"<html><head><meta charset='utf-8'></head><body>"
            b"<img src='/a.jpg' alt='broken \xff\xfe bytes \xc3 here'>"
            b"<img src='/b.jpg' alt='\x80\x81\x82\x83\x84\x85'></body></html>")
    p = write_raw(tmp_path / "alt.warc.gz", [raw_record(http_block(body, content_type="text/html"))])
    fe = extract_file(str(p), ExtractConfig(reader=reader))
    assert alts(fe) == ["broken bytes here"]
    assert fe.counters.counts["alt_invalid_chars"] == 2
    assert fe.counters.dropped_by_reason["alt_too_short"] == 1


# --------------------------------------------------------------------------- hostile pages
@pytest.mark.parametrize("reader", READERS)
def test_50mb_page_is_bounded(tmp_path, reader):
    head = b"<html><body><img src='/first.jpg' alt='image at the top of a huge page'>"
    tail = b"<img src='/last.jpg' alt='image after fifty megabytes'></body></html>"
    filler = b"<p>" + b"lorem ipsum " * 1000 + b"</p>"
    body = head + filler * (50_000_000 // len(filler) + 1) + tail
    assert len(body) > 50_000_000
    p = write_raw(tmp_path / "huge.warc", [raw_record(http_block(body)), good_raw(1)], gzip_records=False)
    del body
    fe = extract_file(str(p), ExtractConfig(reader=reader))  # max_html_bytes: 5 MB by default
    assert fe.file.status == "ok"
    # bounded: the page was cut at max_html_bytes, so the image after 50 MB was never parsed
    assert alts(fe) == ["image at the top of a huge page", GOOD_ALT.format(i=1)]
    assert fe.counters.counts["html_truncated"] == 1


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("unit", [(b"<div><span>", b"</span></div>"), (b"<div>", b"</x>"), (b"<ul><li>", b"")])
def test_deeply_nested_page(tmp_path, reader, unit):
    depth = 100_000
    body = (b"<html><body><img src='/top.jpg' alt='image before the nesting'>" + unit[0] * depth
            + b"<img src='/deep.jpg' alt='image at the bottom'>" + unit[1] * depth + b"</body></html>")
    p = write_raw(tmp_path / "deep.warc.gz", [raw_record(http_block(body)), good_raw(1)])
    fe = extract_file(str(p), ExtractConfig(reader=reader))
    assert fe.file.status == "ok"
    # bounded: the page was cut where max_nesting_depth was reached, so the deep image was never parsed
    assert alts(fe) == ["image before the nesting", GOOD_ALT.format(i=1)]
    assert fe.counters.counts["html_too_deep"] == 1


def test_nesting_guard_leaves_normal_pages_alone():
    from laionbuild.stages.candidates import nesting_cut

    wide = b"<html><body>" + b"<div><p>x<img src=a.jpg><br></div>" * 20_000 + b"</body></html>"
    assert nesting_cut(wide, 10_000) is None
    deep = b"<html><body>" + b"<section>" * 50 + b"</section>" * 50
    assert nesting_cut(deep, 10_000) is None  # few tags: not even scanned
    # html and body are open too: the 19th <section> is the 21st open element
    assert nesting_cut(deep, 20) == deep.index(b"<section>") + 18 * len(b"<section>")


@pytest.mark.parametrize("reader", READERS)
def test_billion_laughs_entities_are_not_expanded(tmp_path, reader):
    defs = ['<!ENTITY lol "lol">'] + [f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10}">' for i in range(1, 10)]
    body = ("<!DOCTYPE html [" + "".join(defs).replace("&lol0;", "&lol;") + "]><html><body>"
            "<img src='/laugh.jpg' alt='&lol9; laughs'>" + "&lol9;" * 1000 + "</body></html>").encode()
    p = write_raw(tmp_path / "laughs.warc.gz", [raw_record(http_block(body))])
    fe = extract_file(str(p), ExtractConfig(reader=reader))
    assert alts(fe) == ["&lol9; laughs"]  # not expanded (an expansion would be 10**9 "lol")


@pytest.mark.parametrize("reader", READERS)
def test_single_member_gzip_warc(tmp_path, reader):
    plain = write_warc(tmp_path / "p.warc", good_pages(3), gzip_records=False)
    p = tmp_path / "one-member.warc.gz"
    p.write_bytes(gzip.compress(plain.read_bytes()))
    fe = extract_file(str(p), ExtractConfig(reader=reader))
    assert fe.file.status == "ok"
    assert alts(fe) == [GOOD_ALT.format(i=i) for i in range(3)]
    assert fe.counters.counts["records"] == 4
    # zero padding after the member (as tape-block writers leave it) is skipped, as gzip skips it
    padded = tmp_path / "padded.warc.gz"
    padded.write_bytes(p.read_bytes() + b"\0" * 512)
    fe = extract_file(str(padded), ExtractConfig(reader=reader))
    assert alts(fe) == [GOOD_ALT.format(i=i) for i in range(3)]
    assert fe.file.status == ("ok" if reader == "warcio" else "partial")  # fastwarc reads the zeros as a record
    # cut short: every record that decompresses is read (warcio lost all but the first), the file is partial
    cut = tmp_path / "cut-member.warc.gz"
    for trim in (8, len(p.read_bytes()) // 3):
        cut.write_bytes(p.read_bytes()[:-trim])
        fe = extract_file(str(cut), ExtractConfig(reader=reader))
        assert fe.file.status == ("ok" if (reader, trim) == ("fastwarc", 8) else "partial"), (reader, trim)
        assert alts(fe) == [GOOD_ALT.format(i=i) for i in range(3 if trim == 8 else len(alts(fe)))]


def test_a_compression_bomb_payload_is_not_inflated_past_the_limit():
    """decompress_content returns at most limit + 1 bytes and never holds the whole bomb."""
    import tracemalloc

    from laionbuild.stages.warc import decompress_content

    payload = b"\0" * 50_000_000
    bombs = {"gzip": gzip.compress(payload), "deflate": zlib.compress(payload)}
    try:
        import brotli

        bombs["br"] = brotli.compress(payload, quality=5)
    except ImportError:  # brotli is optional
        pass
    for coding, bomb in bombs.items():
        tracemalloc.start()
        out = decompress_content(bomb, coding, 1_000_000)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(out) == 1_000_001, coding
        assert peak < 10_000_000, (coding, peak)  # the 50 MB are never held
    assert decompress_content(b"not gzip at all", "gzip", 100) is None


@pytest.mark.parametrize("reader", ("warcio", "auto"))
def test_not_warc_message_quotes_a_short_piece_of_the_first_line(tmp_path, reader):
    path = tmp_path / "archive.warc"
    path.write_bytes(b"././@PaxHeader" + b"\0" * 500 + bytes(range(1, 256)) * 4 + b"\n")  # a tar file, say
    fe = extract_file(str(path), ExtractConfig(reader=reader))
    assert (fe.file.status, fe.file.reason) == ("failed", "not_warc")
    assert "first line: " in fe.file.message and "PaxHeader" in fe.file.message
    assert len(fe.file.message) < 160, fe.file.message
    assert "more characters)" in fe.file.message
