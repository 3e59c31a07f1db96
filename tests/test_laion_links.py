"""LAION-5B's per-link decisions (``extract.link_rules: laion``) on links with known fates."""

from __future__ import annotations

from pathlib import Path

import pytest

from laion_link_table import ALT, ALT_CASES, IMG, PAGE, URL_CASES
from laionbuild import schema
from laionbuild.config import config_from_dict, load_config
from laionbuild.errors import ConfigError
from laionbuild.stages.candidates import extract_candidates
from laionbuild.stages.wat_links import page_links
from laionbuild.stages.laion_links import PageLink, decide_link, page_base_url, page_rows
from laionbuild.stages.url_validation import is_valid_url
from laionbuild.stages.warc import HtmlDocument
from laionbuild.stats import StageCounters

REPO = Path(__file__).resolve().parents[1]
LAION = load_config(REPO / "configs" / "laion5b.yaml").extract
BASE = page_base_url(PAGE)


def _expected(value):
    return value if isinstance(value, str) else tuple(value)


def test_the_table_is_large_enough():
    assert len(URL_CASES) + len(ALT_CASES) >= 80


@pytest.mark.parametrize("url, expected", URL_CASES, ids=[repr(u)[:60] for u, _ in URL_CASES])
def test_url_decisions_equal_laion(url, expected):
    assert decide_link(url, ALT, BASE, LAION) == _expected(expected)


@pytest.mark.parametrize("alt, expected", ALT_CASES, ids=[repr(a)[:60] for a, _ in ALT_CASES])
def test_alt_decisions_equal_laion(alt, expected):
    assert decide_link(IMG, alt, BASE, LAION) == _expected(expected)


@pytest.mark.parametrize("url, expected", URL_CASES, ids=[repr(u)[:60] for u, _ in URL_CASES])
def test_validator_alone(url, expected):
    cut = url[:2000].replace("\n", "")
    if expected == "invalid_url":
        assert not is_valid_url(cut)
    else:
        assert is_valid_url(cut)


def test_validator_rules_beyond_the_table():
    assert not is_valid_url(None)
    assert not is_valid_url("http://example.com/" + "a" * 2100)  # longer than 2,048
    assert is_valid_url("http://a.b.c.d.example.travel/x")
    assert not is_valid_url("http://" + ".".join(["a" * 60] * 5) + ".com/")  # host over 253
    assert is_valid_url("http://[::ffff:1.2.3.4]/x")
    assert not is_valid_url("gopher://example.com/x")


def _page(links, page=PAGE, seen=None, cfg=LAION):
    counters = StageCounters()
    rows = page_rows([PageLink(*x) for x in links], page, cfg, counters, set() if seen is None else seen)
    return rows, counters


def test_license_is_the_last_cc_link_seen_so_far():
    cc1 = "https://creativecommons.org/licenses/by/4.0/"
    cc2 = "https://creativecommons.org/licenses/by-sa/3.0/deed.en_US_and_a_long_tail_beyond_eighty_characters"
    rows, _ = _page([
        ("http://e.com/0.jpg", "before any licence"),
        (cc1, None),
        ("http://e.com/1.jpg", "after the first licence"),
        (cc2, None),
        ("http://e.com/2.jpg", "after the second licence"),
    ])
    assert [r[2] for r in rows] == ["?", cc1, cc2[:80]]


def test_links_without_alt_are_not_candidates_and_anchor_alts_are():
    rows, c = _page([("http://e.com/a.jpg", None), ("http://e.com/page", "an anchor with alt")])
    assert [(r[0], r[1]) for r in rows] == [("http://e.com/page", "an anchor with alt")]
    assert c.counts["links"] == 2 and c.counts["links_with_alt"] == 1


def test_first_row_per_url_wins_within_a_file():
    seen: set[int] = set()
    rows, _ = _page([("http://e.com/a.jpg", "first caption"), ("http://e.com/a.jpg", "second caption")], seen=seen)
    more, c = _page([("http://e.com/a.jpg", "third caption")], seen=seen)
    assert [r[1] for r in rows] == ["first caption"] and more == []
    assert c.dropped_by_reason["duplicate_in_file"] == 1


def test_the_hash_is_computed_from_the_joined_url():
    rows, _ = _page([("HTTP://e.com/a.jpg?", "upper case scheme")])
    assert rows[0][0] == "http://e.com/a.jpg"
    assert rows[0][3] == schema.pair_hash("http://e.com/a.jpg", "upper case scheme")


def _html_rows(body: str, cfg=LAION):
    counters = StageCounters()
    html = f"<html><head><title>t</title></head><body>{body}</body></html>".encode()
    doc = HtmlDocument(page_url=PAGE, html=html, http_charset="utf-8", record_id="r", offset=0, warc_path="w")
    return extract_candidates(doc, cfg, counters), counters


def test_warc_pages_list_links_in_wat_order_with_raw_values():
    html = ("<a href='http://e.com/outer' alt='anchor alt'><IMG SRC=\"http://e.com/in.jpg?a=1&amp;b=2\" "
            "alt='Tom &amp; Jerry'></a>"
            "<!-- <img src='http://e.com/commented.jpg' alt='in a comment'> -->"
            "<script>var s = '<img src=\"http://e.com/script.jpg\" alt=\"in a script\">';</script>"
            "<area href=http://e.com/map><img longdesc='http://e.com/d'><div background='http://e.com/bg.png'>"
            "<a href='http://e.com/never-closed' alt='unclosed anchor'><a name='x'></a>"
            "<a href='http://e.com/self' alt='self closing'/>")
    links, has_img = page_links(html)
    assert has_img
    assert links == [
        PageLink("http://e.com/in.jpg?a=1&amp;b=2", "Tom &amp; Jerry"),
        PageLink("http://e.com/outer", "anchor alt"),
        PageLink("http://e.com/map", None),
        PageLink("http://e.com/d", None),
        PageLink("http://e.com/bg.png", None),
        PageLink("http://e.com/self", "self closing"),
    ]
    assert [link.path for link in links][:2] == ["IMG@/src", "A@/href"]
    assert page_links("<a href='x' alt='no image on this page'>x</a>") == (
        [PageLink("x", "no image on this page")], False)


def test_warc_page_in_laion_mode():
    cc = "http://creativecommons.org/licenses/by/2.0/"
    rows, c = _html_rows(
        "<img src='http://e.com/a.jpg' alt='before the licence'>"
        f"<a href='{cc}'>cc</a>"
        "<img src='http://e.com/b b.jpg' alt='a space in the path'>"
        "<img src='/relative.jpg' alt='a relative link'>"
        "<a href='http://e.com/c.jpg' alt='anchor alt text'>x</a>"
        "<img src='HTTP://E.com/d.jpg' alt='\u2018curly\u2019 caption'>"
    )
    assert [(r[schema.URL], r[schema.ALT_TEXT], r[schema.LICENSE]) for r in rows] == [
        ("http://e.com/a.jpg", "before the licence", "?"),
        ("http://e.com/c.jpg", "anchor alt text", cc),
        ("http://E.com/d.jpg", "'curly' caption", cc),
    ]
    assert c.dropped_by_reason["invalid_url"] == 2


def test_a_page_without_img_links_is_skipped_as_laion_did():
    rows, c = _html_rows("<img alt='no src at all'><a href='http://e.com/x' alt='anchor alt text'>x</a>")
    assert rows == [] and c.counts["pages_without_img_link"] == 1


def test_link_rules_setting_is_checked():
    with pytest.raises(ConfigError):
        config_from_dict({"extract": {"link_rules": "django"}})
    assert LAION.link_rules == "laion"
    assert config_from_dict({}).extract.link_rules == "ours"


@pytest.mark.parametrize("html", [
    '<a"' + "<b " * 20000,  # a quote never closed, no ">" after it
    "<b " * 20000,  # tags never closed
    "<!--" + "<img src='http://e.com/a.jpg' alt='inside a comment never closed'>" * 100,
    "<script>" + "<img src='http://e.com/a.jpg' alt='inside a script never closed'>" * 100,
])
def test_broken_markup_gives_no_links_and_ends(html):
    assert page_links(html) == ([], False)
