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
