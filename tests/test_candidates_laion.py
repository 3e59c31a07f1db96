"""LAION-5B's candidate rules (configs/laion5b.yaml) next to our defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest_extract import html_page, write_warc
from laionbuild import schema
from laionbuild.config import ExtractConfig, config_from_dict, load_config
from laionbuild.errors import ConfigError
from laionbuild.stages.candidates import (
    DROP_REASONS,
    NO_LICENSE,
    extract_candidates,
    extract_file,
    normalize_alt_laion,
)
from laionbuild.stages.laion_links import laion_clean_alt
from laionbuild.stages.warc import HtmlDocument
from laionbuild.stats import StageCounters

REPO = Path(__file__).resolve().parents[1]
PAGE = "http://example.com/dir/page.html"
LAION = load_config(REPO / "configs" / "laion5b.yaml").extract
DEFAULT = load_config(None).extract


def run(body: str, cfg: ExtractConfig, url: str = PAGE):
    counters = StageCounters()
    html = html_page(body).encode("utf-8")
    d = HtmlDocument(page_url=url, html=html, http_charset="utf-8", record_id="r", offset=0, warc_path="w")
    return extract_candidates(d, cfg, counters), counters


def test_faithful_config_holds_laion_rules():
    assert (LAION.resolve_relative_urls, LAION.cut_long_urls, LAION.max_host_length) == (False, True, 60)
    assert set(LAION.excluded_substrings) == {".svg", ".gif", "data:image", "javascript:"}
    assert (LAION.alt_normalization, LAION.max_alt_length, LAION.min_alt_length) == ("laion", 2000, 5)
    assert LAION.dedup_key == "url" and not LAION.honour_meta_robots and not LAION.honour_meta_tdm
    assert (DEFAULT.resolve_relative_urls, DEFAULT.alt_normalization, DEFAULT.dedup_key) == (True, "collapse", "url_text")
    assert DEFAULT.reader == "auto"


def test_relative_links_are_dropped_only_in_the_faithful_config():
    body = "<img src='/a.jpg' alt='a relative image'><img src='http://cdn.example.org/b.jpg' alt='an absolute image'>"
    rows, c = run(body, LAION)
    assert [r[schema.URL] for r in rows] == ["http://cdn.example.org/b.jpg"]
    assert c.dropped_by_reason["invalid_url"] == 1  # LAION's URL validator refused them
    rows, _ = run(body, DEFAULT)
    assert [r[schema.URL] for r in rows] == ["http://example.com/a.jpg", "http://cdn.example.org/b.jpg"]
    # protocol-relative links have no scheme: LAION's validator refused them too
    rows, c = run("<img src='//cdn.example.org/c.jpg' alt='protocol relative'>", LAION)
    assert rows == [] and c.dropped_by_reason["invalid_url"] == 1


@pytest.mark.parametrize(
    "src, laion_reason, default_reason",
    [
        ("http://e.com/a.svg", "excluded_substring", "excluded_extension"),
        ("http://e.com/a.svg.jpg", "excluded_substring", ""),  # anywhere, not only the suffix
        ("http://e.com/img.php?file=x.gif&w=200", "excluded_substring", ""),
        ("http://e.com/proxy?u=data:image/png", "excluded_substring", ""),
        ("http://e.com/a.GIF", "", "excluded_extension"),  # LAION's test is case-sensitive
        ("http://e.com/photo.jpg", "", ""),
    ],
)
def test_svg_gif_rule_anywhere_vs_suffix(src, laion_reason, default_reason):
    for cfg, reason in ((LAION, laion_reason), (DEFAULT, default_reason)):
        rows, c = run(f"<img src='{src}' alt='some image text'>", cfg)
        if reason:
            assert rows == [] and dict(c.dropped_by_reason) == {reason: 1}, cfg.excluded_substrings
        else:
            assert [r[schema.URL] for r in rows] == [src]


def test_long_host_names_are_dropped():
    long_host = "a" * 57 + ".com"  # 61 characters
    rows, c = run(f"<img src='http://{long_host}/x.jpg' alt='long host image'>"
                  f"<img src='http://user@{'b' * 56}.com:8080/x.jpg' alt='sixty with port'>", LAION)
    assert c.dropped_by_reason["host_too_long"] == 1 and len(rows) == 1  # the port and user do not count
    rows, _ = run(f"<img src='http://{long_host}/x.jpg' alt='long host image'>", DEFAULT)
    assert len(rows) == 1


def test_long_urls_are_cut_faithfully_and_dropped_by_default():
    src = "http://e.com/" + "p" * 2100 + ".jpg"
    rows, c = run(f"<img src='{src}' alt='a very long url'>", LAION)
    assert len(rows) == 1 and rows[0][schema.URL] == src[:2000] and c.counts["url_cut"] == 1
    rows, c = run(f"<img src='{src}' alt='a very long url'>", DEFAULT)
    assert rows == [] and c.dropped_by_reason["url_too_long"] == 1


def test_laion_alt_cleaning_keeps_spaces_and_removes_non_printables():
    assert normalize_alt_laion("  two  spaces\tand\u200ba tab\nline  ") == "two  spacesanda tab line"
    assert laion_clean_alt("  two  spaces\tand\u200ba tab\nline  ") == "two  spacesanda tab line"
    rows, _ = run("<img src='http://e.com/a.jpg' alt='a | b  c&#9;d'>", LAION)
    assert rows[0][schema.ALT_TEXT] == "a   b  cd"  # the tab is not printable: removed, | -> space
    rows, _ = run("<img src='http://e.com/a.jpg' alt='a | b  c&#9;d'>", DEFAULT)
    assert rows[0][schema.ALT_TEXT] == "a | b c d"
    # the length check comes before the cut and after removing non-printables
    rows, c = run("<img src='http://e.com/a.jpg' alt='ab\u200b\u200bc'>", LAION)
    assert rows == [] and c.dropped_by_reason["alt_too_short"] == 1
    rows, c = run("<img src='http://e.com/a.jpg' alt='" + "x" * 2500 + "'>", LAION)
    assert len(rows[0][schema.ALT_TEXT]) == 2000 and c.counts["alt_truncated"] == 1


def test_license_first_cc_link_by_default_and_the_last_one_seen_so_far_in_laion_mode():
    cc = "https://creativecommons.org/licenses/by-sa/4.0/deed.en_GB_with_a_long_tail_that_goes_past_eighty_chars"
    body = (f"<img src='http://e.com/a.jpg' alt='licensed picture'><a href='{cc}'>CC</a>"
            "<a href='http://creativecommons.org/licenses/by/2.0/'>other</a>"
            "<img src='http://e.com/b.jpg' alt='second picture'>")
    rows, _ = run(body, DEFAULT)
    assert [r[schema.LICENSE] for r in rows] == [cc[:80], cc[:80]]
    rows, _ = run(body, LAION)
    assert [r[schema.LICENSE] for r in rows] == ["?", "http://creativecommons.org/licenses/by/2.0/"]
    rows, _ = run("<img src='http://e.com/a.jpg' alt='unlicensed picture'><a href='/about'>x</a>", DEFAULT)
    assert rows[0][schema.LICENSE] == NO_LICENSE == "?"
    rows, _ = run("<link rel=license href='http://creativecommons.org/licenses/by/3.0/'>"
                  "<img src='http://e.com/a.jpg' alt='licensed by link'>", DEFAULT)
    assert rows[0][schema.LICENSE] == "http://creativecommons.org/licenses/by/3.0/"
    assert schema.LICENSE in schema.CANDIDATE_SCHEMA.names and "LICENSE" in schema.OUTPUT_SCHEMA.names


def test_dedup_key_url_keeps_the_first_row_per_url(tmp_path):
    pages = [{"url": "http://e.com/1.html", "body": "<img src='http://e.com/a.jpg' alt='first caption'>"
                                                    "<img src='http://e.com/a.jpg' alt='second caption'>"},
             {"url": "http://e.com/2.html", "body": "<img src='http://e.com/a.jpg' alt='third caption'>"
                                                    "<img src='http://e.com/b.jpg' alt='first caption'>"}]
    path = write_warc(tmp_path / "d.warc.gz", [{**p, "html": html_page(p["body"])} for p in pages])
    by_url = extract_file(str(path), LAION)
    assert [(r[schema.URL], r[schema.ALT_TEXT]) for r in by_url.rows] == [
        ("http://e.com/a.jpg", "first caption"), ("http://e.com/b.jpg", "first caption")]
    assert by_url.counters.dropped_by_reason["duplicate_in_file"] == 2
    by_pair = extract_file(str(path), DEFAULT)
    assert len(by_pair.rows) == 4


def test_dedup_key_config():
    assert config_from_dict({"run": {"dedup_key": "url"}}).extract.dedup_key == "url"
    assert config_from_dict({}).extract.dedup_key == "url_text"
    assert config_from_dict({"run": {"dedup_key": "url"}, "extract": {"dedup_key": "url_text"}}).extract.dedup_key \
        == "url_text"
    for bad in ({"run": {"dedup_key": "text"}}, {"extract": {"dedup_key": "hash"}},
                {"extract": {"alt_normalization": "squash"}}, {"extract": {"reader": "fast"}}):
        with pytest.raises(ConfigError):
            config_from_dict(bad)
    assert {"relative_url", "excluded_substring", "host_too_long"} <= set(DROP_REASONS)
