"""WAT input: Common Crawl's link metadata read as LAION-5B read it, and files of the wrong kind."""

from __future__ import annotations

import gzip
from pathlib import Path

from conftest_extract import html_page, write_warc, write_wat
from laionbuild import schema
from laionbuild.config import load_config
from laionbuild.demo.image_server import LoopbackServer
from laionbuild.inputs import expand_inputs
from laionbuild.stages.candidates import extract_file
from laionbuild.stages.wat import input_kind

REPO = Path(__file__).resolve().parents[1]
CFG = load_config(REPO / "configs" / "laion5b.yaml")
LAION = CFG.extract
DEFAULT = load_config(None).extract
CC = "https://creativecommons.org/licenses/by/4.0/"

# two pages, as HTML and as the Links Common Crawl's parser writes for them (<img> when it
# opens, with src / alt / title; <a> when it closes, with href / alt and its text)
PAGES = [
    {
        "url": "http://shop.example.com/items/list.html",
        "html": html_page(
            "<img src='http://cdn.example.com/a.jpg' alt='A red bicycle'>"
            f"<a href='{CC}'>CC BY</a>"
            "<a href='http://shop.example.com/b.jpg' alt='A blue kayak'><img src='http://cdn.example.com/c.jpg' "
            "alt='An inner image'></a>"
            "<img src='/relative.jpg' alt='relative is refused'>"
            "<img src='HTTP://cdn.example.com/d.jpg' alt='Upper case scheme'>"
            "<img src='http://cdn.example.com/a.jpg' alt='A second caption'>"
            "<img src='http://cdn.example.com/e.gif' alt='An animation'>"
        ),
        "links": [
            {"path": "IMG@/src", "url": "http://cdn.example.com/a.jpg", "alt": "A red bicycle"},
            {"path": "A@/href", "url": CC, "text": "CC BY"},
            {"path": "IMG@/src", "url": "http://cdn.example.com/c.jpg", "alt": "An inner image"},
            {"path": "A@/href", "url": "http://shop.example.com/b.jpg", "alt": "A blue kayak"},
            {"path": "IMG@/src", "url": "/relative.jpg", "alt": "relative is refused"},
            {"path": "IMG@/src", "url": "HTTP://cdn.example.com/d.jpg", "alt": "Upper case scheme"},
            {"path": "IMG@/src", "url": "http://cdn.example.com/a.jpg", "alt": "A second caption"},
            {"path": "IMG@/src", "url": "http://cdn.example.com/e.gif", "alt": "An animation"},
        ],
    },
    {
        # no <img>: LAION's parser skipped the whole record
        "url": "http://blog.example.org/post",
        "html": html_page("<a href='http://blog.example.org/p.jpg' alt='An anchor alone'>p</a>"),
        "links": [{"path": "A@/href", "url": "http://blog.example.org/p.jpg", "alt": "An anchor alone",
                   "text": "p"}],
    },
]
EXPECTED = [
    ("http://cdn.example.com/a.jpg", "A red bicycle", "?"),
    ("http://cdn.example.com/c.jpg", "An inner image", CC),
    ("http://shop.example.com/b.jpg", "A blue kayak", CC),
    ("http://cdn.example.com/d.jpg", "Upper case scheme", CC),
]


def _triples(rows):
    return [(r[schema.URL], r[schema.ALT_TEXT], r[schema.LICENSE]) for r in rows]


def test_wat_gives_laions_candidates(tmp_path):
    wat = write_wat(tmp_path / "x.warc.wat.gz", PAGES)
    got = extract_file(str(wat), LAION)
    assert got.file.status == "ok", got.file
    assert _triples(got.rows) == EXPECTED
    assert {r[schema.PAGE_URL] for r in got.rows} == {PAGES[0]["url"]}
    assert all(r[schema.HASH] == schema.pair_hash(r[schema.URL], r[schema.ALT_TEXT]) for r in got.rows)
    c = got.counters
    assert c.counts["wat_pages"] == 1 and c.counts["pages_without_img_link"] == 1
    assert c.dropped_by_reason["duplicate_in_file"] == 1 and c.dropped_by_reason["invalid_url"] == 1
    assert c.dropped_by_reason["excluded_substring"] == 1


def test_wat_and_warc_of_the_same_pages_give_the_same_candidates(tmp_path):
    wat = extract_file(str(write_wat(tmp_path / "p.wat.gz", PAGES)), LAION)
    warc = extract_file(str(write_warc(tmp_path / "p.warc.gz", PAGES)), LAION)
    assert _triples(wat.rows) == _triples(warc.rows) == EXPECTED


def test_wat_values_keep_entities_and_ftfy_decodes_them(tmp_path):
    page = {"url": "http://e.com/", "links": [
        {"path": "IMG@/src", "url": "http://e.com/a.jpg?x=1&amp;y=2", "alt": "Tom &amp; Jerry&#8217;s"},
    ]}
    got = extract_file(str(write_wat(tmp_path / "e.wat.gz", [page])), LAION)
    assert _triples(got.rows) == [("http://e.com/a.jpg?x=1&amp;y=2", "Tom & Jerry's", "?")]


def test_warc_reader_refuses_wat_and_wet_files(tmp_path):
    wat_named_warc = write_wat(tmp_path / "looks.warc.gz", PAGES)
    for cfg in (LAION, DEFAULT):
        got = extract_file(str(wat_named_warc), cfg)
        assert (got.file.status, got.file.reason, got.rows) == ("failed", "wat_file", [])
        assert "WAT" in got.file.message
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(write_wat(tmp_path / "long.warc.gz", PAGES * 10).read_bytes()[:5000])
    got = extract_file(str(cut), LAION)
    assert (got.file.status, got.file.reason) == ("failed", "wat_file")  # a cut WAT is still a WAT
    wet_named_warc = write_wat(tmp_path / "text.warc.gz", [], extra_records=[("conversion", b"plain text")])
    got = extract_file(str(wet_named_warc), LAION)
    assert (got.file.status, got.file.reason) == ("failed", "wet_file")
    got = extract_file(str(tmp_path / "named.warc.wet.gz"), LAION)
    assert (got.file.status, got.file.reason) == ("failed", "wet_file")


def test_wat_reader_refuses_a_warc_and_needs_laion_rules(tmp_path):
    warc_named_wat = write_warc(tmp_path / "really-a-warc.wat.gz", PAGES)
    got = extract_file(str(warc_named_wat), LAION)
    assert (got.file.status, got.file.reason, got.rows) == ("failed", "not_wat", [])
    wat = write_wat(tmp_path / "ok.wat.gz", PAGES)
    got = extract_file(str(wat), DEFAULT)
    assert (got.file.status, got.file.reason) == ("failed", "wat_needs_laion_link_rules")


def test_wat_cut_short_keeps_what_was_read(tmp_path):
    wat = write_wat(tmp_path / "cut.wat.gz", PAGES * 20)
    data = wat.read_bytes()
    cut = tmp_path / "cut2.wat.gz"
    cut.write_bytes(data[: len(data) * 2 // 3])
    got = extract_file(str(cut), LAION)
    assert got.file.status == "partial" and got.rows


def test_input_kind():
    assert input_kind("crawl-data/X/wat/a.warc.wat.gz") == "wat"
    assert input_kind("https://h/x/a.warc.wet.gz") == "wet"
    assert input_kind("a.warc.gz") == "warc"


def test_remote_wat_and_wat_paths_listing(tmp_path):
    wat = write_wat(tmp_path / "w.warc.wat.gz", PAGES)
    with LoopbackServer("127.0.0.1") as server:
        rel = "crawl-data/TEST/segments/1/wat/w.warc.wat.gz"
        server.add("/" + rel, wat.read_bytes(), content_type="application/octet-stream")
        listing = tmp_path / "wat.paths.gz"
        listing.write_bytes(gzip.compress((rel + "\n").encode()))
        run = CFG.run.__class__(**{**CFG.run.__dict__, "paths_base_url": server.base_url + "/"})
        paths = expand_inputs([str(listing)], run)
        assert paths == [f"{server.base_url}/{rel}"]
        got = extract_file(paths[0], LAION)
    assert got.file.status == "ok" and _triples(got.rows) == EXPECTED


def test_laion_counters_add_up_on_the_real_samples():
    from conftest_extract import SHARED_WARC

    for path in sorted(SHARED_WARC.glob("*.warc.gz")):
        got = extract_file(str(path), LAION)
        c = got.counters
        assert c.kept + sum(c.dropped_by_reason.values()) == c.counts.get("links_with_alt", 0), path.name


def test_both_reader_engines_read_wat_alike(tmp_path):
    import dataclasses

    wat = write_wat(tmp_path / "r.wat.gz", PAGES)
    big_path = write_wat(tmp_path / "big.wat.gz", PAGES * 20)
    big = big_path.read_bytes()
    from warcio.archiveiterator import ArchiveIterator

    with open(big_path, "rb") as fh:
        it = ArchiveIterator(fh)
        starts = [it.offset for _ in it]
    # inside the gzip member of a record: 120 bytes in (its WARC header) and half-way (its payload);
    # a cut in the first bytes of a member (no data decompressed yet) ends like a complete file
    cuts = [starts[i] + d for i in (5, 20) for d in (120, (starts[i + 1] - starts[i]) // 2)]
    results = {}
    for engine in ("warcio", "fastwarc"):
        cfg = dataclasses.replace(LAION, reader=engine)
        whole = extract_file(str(wat), cfg)
        assert whole.file.status == "ok", engine
        partial_rows = []
        for k in cuts:
            cut = tmp_path / f"cut{k}.wat.gz"
            cut.write_bytes(big[:k])
            partial = extract_file(str(cut), cfg)
            assert (partial.file.status, partial.file.reason) == ("partial", "truncated"), (engine, k)
            partial_rows.append(len(partial.rows))
        results[engine] = (_triples(whole.rows), partial_rows)
    assert results["warcio"] == results["fastwarc"]
    assert results["warcio"][0] == EXPECTED


def _wat_of_payloads(path: Path, payloads: list[bytes], record_type: str = "metadata", one_member: bool = False):
    """A WAT of raw JSON payloads (shapes ``wat_json`` never writes); one gzip member if asked."""
    import io

    from warcio.warcwriter import WARCWriter

    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=not one_member)
    for i, payload in enumerate(payloads):
        writer.write_record(writer.create_warc_record(f"http://p.example/{i}", record_type, payload=io.BytesIO(payload),
                                                      warc_content_type="application/json"))
    data = buf.getvalue()
    path.write_bytes(gzip.compress(data) if one_member else data)
    return path


def _good(i: int) -> bytes:
    from laionbuild.stages.wat import wat_json

    return wat_json(f"http://p.example/{i}.html",
                    [{"path": "IMG@/src", "url": f"http://cdn.example.com/{i}.jpg", "alt": f"picture number {i}"}])


def test_a_record_of_another_json_shape_is_skipped_and_the_file_read_on(tmp_path):
    shapes = [b'["IMG@"]', b'"IMG@"', b'{"Envelope": "IMG@"}',
              b'{"Envelope": {"WARC-Header-Metadata": {"WARC-Target-URI": "http://x/"}, "Payload-Metadata": '
              b'{"HTTP-Response-Metadata": {"HTML-Metadata": {"Links": 5}}}}, "k": "IMG@"}',
              b'{"Envelope": {"WARC-Header-Metadata": {"WARC-Target-URI": "http://x/"}, "Payload-Metadata": '
              b'{"HTTP-Response-Metadata": {"HTML-Metadata": ["IMG@"]}}}}']
    for n, shape in enumerate(shapes):
        got = extract_file(str(_wat_of_payloads(tmp_path / f"s{n}.wat.gz", [_good(1), shape, _good(2)])), LAION)
        assert got.file.status == "ok", (shape, got.file)
        assert [r[schema.URL] for r in got.rows] == ["http://cdn.example.com/1.jpg", "http://cdn.example.com/2.jpg"]
        assert got.counters.counts["record_skipped:bad_json"] == 1


def test_lone_surrogates_from_json_escapes_never_reach_a_row(tmp_path):
    from laionbuild.stages.wat import wat_json

    def escaped(payload: bytes) -> bytes:  # JSON escapes of lone surrogates, as a WAT may carry them
        return payload.replace(b"HIGH", b"\\ud800").replace(b"LOW", b"\\udc80")

    bad_url = escaped(wat_json("http://p.example/s.html", [{"path": "IMG@/src", "url": "http://cdn.example.com/HIGH.jpg",
                                                            "alt": "a surrogate in the url"}]))
    bad_page = escaped(wat_json("http://p.example/LOW/p.html",
                                [{"path": "A@/href", "url": "https://creativecommons.org/licenses/by/4.0/HIGH"},
                                 {"path": "IMG@/src", "url": "http://cdn.example.com/k.jpg", "alt": "kept, page url mended"}]))
    got = extract_file(str(_wat_of_payloads(tmp_path / "s.wat.gz", [_good(1), bad_url, bad_page, _good(2)])), LAION)
    assert got.file.status == "ok"
    assert [r[schema.URL] for r in got.rows] == ["http://cdn.example.com/1.jpg", "http://cdn.example.com/k.jpg",
                                                 "http://cdn.example.com/2.jpg"]
    assert got.rows[1][schema.PAGE_URL] == "http://p.example/\ufffd/p.html"
    assert got.rows[1][schema.LICENSE] == "?"  # the licence link with the surrogate was left out
    for row in got.rows:
        for value in row.values():
            if isinstance(value, str):
                value.encode("utf-8")  # every value can be written


def test_empty_and_wet_files_named_wat_are_named_so(tmp_path):
    empty = tmp_path / "empty.wat.gz"
    empty.write_bytes(b"")
    empty_gz = tmp_path / "emptygz.wat.gz"
    empty_gz.write_bytes(gzip.compress(b""))
    wet = _wat_of_payloads(tmp_path / "wet.wat.gz", [b"plain text"] * 2, record_type="conversion")
    for path, reason in ((empty, "empty_file"), (empty_gz, "empty_file"), (wet, "wet_file")):
        got = extract_file(str(path), LAION)
        assert (got.file.status, got.file.reason) == ("failed", reason), path.name


def test_a_wat_of_one_gzip_member_is_read_whole_by_both_engines(tmp_path):
    import dataclasses

    whole = _wat_of_payloads(tmp_path / "one.wat.gz", [_good(i) for i in range(3)], one_member=True)
    cut = tmp_path / "cut.wat.gz"
    cut.write_bytes(whole.read_bytes()[:-8])  # only the gzip trailer is missing: every record is there
    for engine in ("warcio", "fastwarc"):
        cfg = dataclasses.replace(LAION, reader=engine)
        got = extract_file(str(whole), cfg)
        assert (got.file.status, len(got.rows)) == ("ok", 3), engine
        got = extract_file(str(cut), cfg)
        assert len(got.rows) == 3, engine
        assert got.file.status == ("partial" if engine == "warcio" else "ok"), engine


def test_pages_whose_only_img_marker_is_another_path_or_a_text_match_between_wat_and_warc(tmp_path):
    """LAION kept a WAT record when "IMG@" appeared anywhere in it: an <img> with only a data-href, an
    alt text that mentions IMG@; the WARC side finds the same pages."""
    from laionbuild.stages.wat import write_wat_from_warc

    pages = [
        {"url": "http://a.example.com/1.html", "html": html_page(
            "<img data-href='http://a.example.com/big.jpg'><a href='http://a.example.com/b.jpg' "
            "alt='anchor alt text one'>b</a>")},
        {"url": "http://b.example.com/2.html", "html": html_page(
            "<a href='http://b.example.com/c.jpg' alt='see IMG@home now'>c</a>")},
        {"url": "http://c.example.com/3.html", "html": html_page("<a href='http://c.example.com/d.jpg' "
                                                                   "alt='no marker anywhere here'>d</a>")},
    ]
    warc = write_warc(tmp_path / "m.warc.gz", pages)
    wat = tmp_path / "m.wat.gz"
    write_wat_from_warc([str(warc)], str(wat))
    from_warc, from_wat = extract_file(str(warc), LAION), extract_file(str(wat), LAION)
    assert _triples(from_warc.rows) == _triples(from_wat.rows) == [
        ("http://a.example.com/b.jpg", "anchor alt text one", "?"),
        ("http://b.example.com/c.jpg", "see IMG@home now", "?")]
