"""HTML -> (URL, alt) candidates: charsets, URL resolution, LAION-5B filters, counters."""

from __future__ import annotations

import ftfy
import pytest

from conftest_extract import SAMPLE_2020, SAMPLE_2022, SAMPLE_2024, SHARED_WARC, html_page, write_warc
from laionbuild import schema
from laionbuild.config import ExtractConfig
from laionbuild.stages.candidates import (
    DROP_REASONS,
    extract_candidates,
    extract_file,
    fix_text,
    normalize_alt,
    parse_html,
    resolve_charset,
    sniff_charset,
    srcset_urls,
)
from laionbuild.stages.warc import HtmlDocument, iter_html_documents
from laionbuild.stats import FileResult, StageCounters

needs_samples = pytest.mark.skipif(not SHARED_WARC.is_dir(), reason="shared WARC samples not available")
PAGE = "http://www.example.com/dir/page.html"


def doc(html: str | bytes, charset: str | None = "utf-8", url: str = PAGE) -> HtmlDocument:
    if isinstance(html, str):
        html = html.encode("utf-8")
    return HtmlDocument(page_url=url, html=html, http_charset=charset, record_id="<urn:uuid:1>", offset=7,
                        warc_path="/w.warc.gz")


def run(html, charset="utf-8", url=PAGE, **cfg_kw):
    counters = StageCounters()
    rows = extract_candidates(doc(html, charset, url), ExtractConfig(**cfg_kw), counters)
    return rows, counters


def alts_of(html_bytes: bytes, charset: str | None) -> list[str]:
    return [img.attrs.get("alt") for img in parse_html(html_bytes, charset).css("img") if img.attrs.get("alt")]


# --------------------------------------------------------------------------- real samples
@needs_samples
@pytest.mark.parametrize("reader", ["warcio", "fastwarc"])
@pytest.mark.parametrize(
    "path, imgs, with_alt, kept, drops",
    [
        (SAMPLE_2020, 153, 32, 13,
         {"no_alt": 121, "excluded_extension": 13, "alt_too_short": 3, "duplicate_in_file": 3}),
        (SAMPLE_2022, 9, 9, 6, {"alt_too_short": 3}),
        (SAMPLE_2024, 13, 7, 5, {"no_alt": 6, "excluded_extension": 2}),
    ],
)
def test_real_sample_counts(reader, path, imgs, with_alt, kept, drops):
    fe = extract_file(str(path), ExtractConfig(reader=reader))
    assert fe.file.status == "ok"
    c = fe.counters
    assert c.counts["imgs"] == imgs  # SOURCES.md: 153 / 13 / 9 <img>
    assert c.counts["imgs_with_alt"] == with_alt  # SOURCES.md: 32 / 7 / 9 with alt
    assert c.kept == len(fe.rows) == c.counts["candidates"] == kept
    assert dict(c.dropped_by_reason) == drops
    assert c.kept + c.dropped == imgs
    assert all(set(r) == set(schema.CANDIDATE_SCHEMA.names) for r in fe.rows)
    assert all(r[schema.HASH] == schema.pair_hash(r[schema.URL], r[schema.ALT_TEXT]) for r in fe.rows)
    assert all(r[schema.WARC_PATH] == str(path) and r[schema.WARC_RECORD_ID] for r in fe.rows)


@needs_samples
def test_real_sample_charsets_decode_correctly():
    cfg = ExtractConfig()
    docs = {d.page_url: d for d in iter_html_documents(str(SAMPLE_2020), cfg, StageCounters(), FileResult("x"))}
    # windows-1251 from the HTTP header
    ru = docs["http://01spb.ru/company/"]
    assert sniff_charset(ru.html, ru.http_charset) == ("cp1251", "http")
    rows = extract_candidates(ru, cfg, StageCounters())
    assert {r["alt_text"] for r in rows} == {"Стратегия пожарной безопасности", "Яндекс.Метрика"}
    assert rows[0]["url"] == "http://01spb.ru/logo.png"  # "/logo.png" resolved against the page
    # gb2312 from the HTTP header (read as GB18030, as browsers do)
    zh = docs["http://0760.jxtdw.com/area/sanxiang/"]
    assert sniff_charset(zh.html, zh.http_charset) == ("gb18030", "http")
    assert alts_of(zh.html, zh.http_charset)[:3] == ["用心专注，服务专业", "中山英才网", "个人服务"]
    # gbk from <meta>
    gbk = docs["http://041696.com/15477/list_6_4.html"]
    assert sniff_charset(gbk.html, None) == ("gb18030", "meta")
    assert parse_html(gbk.html, None).css_first("title").text() == "香港最快开奖现场直84期_主页"
    # iso-8859-1 from <meta> (read as windows-1252), raw bytes and entities
    de = docs["http://06.live-radsport.ch/fahrerstatistik_801/Anthony_Ravard.html"]
    assert sniff_charset(de.html, None) == ("cp1252", "meta")
    assert "Höhepunkte" in parse_html(de.html, None).body.text()
    de2 = docs["http://06.live-radsport.ch/tippspiel/stats_140_petzi.html"]
    assert b"&uuml;" in de2.html and "Zurück" in parse_html(de2.html, None).body.text()
    # utf-8 page whose alt holds double-encoded UTF-8: ftfy repairs it
    mojibake = docs["http://044545.com/topic/20200207/015849.html"]
    rows = extract_candidates(mojibake, cfg, StageCounters())
    assert "98a8e084f2bc4be1.jpg (781×451)" in {r["alt_text"] for r in rows}
    # utf-8 from <meta> only (2022 sample)
    fe = extract_file(str(SAMPLE_2022), cfg)
    assert "广州天仁再生资源回收有限公司" in {r["alt_text"] for r in fe.rows}


# --------------------------------------------------------------------------- charsets
JA = "赤い丸の写真です、白い紙の上に描かれています"


def test_shift_jis_from_http_header():
    page = html_page(f"<p>{JA}</p><img src='/a.jpg' alt='{JA}'>", lang="ja").encode("shift_jis")
    rows, c = run(page, charset="Shift_JIS")
    assert [r["alt_text"] for r in rows] == [JA]
    assert c.counts["charset_from_http"] == 1


def test_euc_jp_from_meta():
    page = html_page(f"<img src='/a.jpg' alt='{JA}'>", head='<meta http-equiv="Content-Type" '
                     'content="text/html; charset=EUC-JP">', lang="ja").encode("euc_jp")
    rows, c = run(page, charset=None)
    assert [r["alt_text"] for r in rows] == [JA]
    assert c.counts["charset_from_meta"] == 1


@pytest.mark.parametrize(
    "text, codec",
    [
        ("Фотография красного круга на белом листе бумаги, нарисованного толстой кистью. " * 4, "cp1251"),
        (JA * 6, "shift_jis"),
    ],
)
def test_undeclared_charset_is_detected(text, codec):
    alt = text[:40].strip()
    page = html_page(f"<p>{text}</p><img src='/a.jpg' alt='{alt}'>").encode(codec)
    rows, c = run(page, charset=None)
    assert [r["alt_text"] for r in rows] == [alt]
    assert c.counts["charset_from_detected"] == 1


def test_http_charset_wins_over_meta_and_bom_wins_over_http():
    page = html_page("<img src='/a.jpg' alt='Grüße aus Köln'>", head="<meta charset='iso-8859-1'>")
    rows, _ = run(page.encode("utf-8"), charset="utf-8")
    assert rows[0]["alt_text"] == "Grüße aus Köln"
    rows, c = run(b"\xef\xbb\xbf" + page.encode("utf-8"), charset="iso-8859-1")
    assert rows[0]["alt_text"] == "Grüße aus Köln"
    assert c.counts["charset_from_bom"] == 1


def test_unknown_or_binary_codec_labels_are_ignored():
    assert resolve_charset("x-no-such-charset") is None
    assert resolve_charset("base64") is None
    assert resolve_charset("ISO-8859-1") == "cp1252"
    assert resolve_charset("GB2312") == "gb18030"
    assert resolve_charset("Shift_JIS") == "cp932"
    page = html_page("<img src='/a.jpg' alt='Grüße aus Köln'>", head="<meta charset='utf-8'>")
    rows, c = run(page.encode("utf-8"), charset="x-no-such-charset")
    assert rows[0]["alt_text"] == "Grüße aus Köln"
    assert c.counts["charset_from_meta"] == 1


RU = "Тестовое изображение"


@pytest.mark.parametrize(
    "head",
    [
        "<!-- <meta charset='koi8-r'> --><meta charset='utf-8'>",  # a commented-out declaration
        "<meta content='text/html; charset=koi8-r'><meta charset='utf-8'>",  # content without http-equiv
        "<meta property='og:description' content='about charset=koi8-r'>",  # not a declaration at all
        "<meta name=x content='a > b'><META HTTP-EQUIV='Content-Type' CONTENT='text/html; charset=utf-8'>",
    ],
)
def test_meta_prescan_finds_only_what_browsers_read_as_a_declaration(head):
    rows, c = run(html_page(f"<img src='/a.jpg' alt='{RU}'>", head=head).encode("utf-8"), charset=None)
    assert [r["alt_text"] for r in rows] == [RU]
    assert sniff_charset(html_page("", head=head).encode(), None)[0] == "utf-8"


def test_meta_http_equiv_content_type_is_read():
    head = "<meta http-equiv='content-type' content='text/html; charset=\"windows-1251\"'>"
    rows, c = run(html_page(f"<img src='/a.jpg' alt='{RU}'>", head=head).encode("cp1251"), charset=None)
    assert [r["alt_text"] for r in rows] == [RU]
    assert c.counts["charset_from_meta"] == 1


def test_charset_labels_as_browsers_know_them():
    heb = "תמונה של חתול על הגג"
    rows, _ = run(html_page(f"<img src='/a.jpg' alt='{heb}'>", head="<meta charset='iso-8859-8-i'>").encode("iso8859-8"),
                  charset=None)
    assert [r["alt_text"] for r in rows] == [heb]
    assert resolve_charset("koi8-ru") == "koi8-u"
    # labels Python knows but browsers do not are ignored
    assert resolve_charset("utf-7") is None and resolve_charset("utf-32") is None and resolve_charset("cp037") is None
    rows, _ = run(html_page("<img src='/a.jpg' alt='C++ and C# +AAA- book'>", head="<meta charset='utf-7'>"),
                  charset=None)
    assert [r["alt_text"] for r in rows] == ["C++ and C# +AAA- book"]


def test_utf16_from_the_http_header_without_a_bom(tmp_path):
    page = html_page(f"<img src='/a.jpg' alt='{RU}'>").encode("utf-16-le")
    path = write_warc(tmp_path / "u16.warc.gz", [{"url": PAGE, "html": page,
                                                    "content_type": "text/html; charset=UTF-16LE"}])
    fe = extract_file(str(path), ExtractConfig())
    assert fe.file.status == "ok" and [r["alt_text"] for r in fe.rows] == [RU]
    assert sniff_charset(page, "utf-16") == ("utf-16-le", "http")
    # in a <meta>, a UTF-16 label reads as UTF-8 (the bytes that say it are ASCII)
    assert sniff_charset(html_page("", head="<meta charset='utf-16'>").encode(), None) == ("utf-8", "meta")


def test_euc_jp_reads_the_rows_python_lacks_as_browsers_do():
    from laionbuild.stages.candidates import decode_bytes

    # NEC row 13 and IBM rows 89-92 of the WHATWG index (cp932 holds the same); JIS X 0213 has none
    assert decode_bytes(b"\xad\xa1\xad\xea\xf9\xa1", "euc_jp") == "①㈱纊"
    assert decode_bytes(b"\xae\xa1\xfe\xfe", "euc_jp") == "\ufffd\ufffd"
    assert decode_bytes(b"\xb0\xa1\xa5\xc6", "euc_jp") == "亜テ"


def test_euc_jp_reads_nec_row_13_as_browsers_do():
    alt = "株式会社①㈱テスト"
    page = html_page(f"<img src='/a.jpg' alt='{alt}'>").encode("euc_jis_2004")
    with pytest.raises(UnicodeDecodeError):
        page.decode("euc_jp")  # Python's own euc_jp lacks the row
    rows, _ = run(page, charset="EUC-JP")
    assert [r["alt_text"] for r in rows] == [alt]


def test_a_long_run_of_spaces_does_not_cut_the_alt_text():
    rows, c = run(html_page("<img src='/a.jpg' alt='ab" + " " * 5000 + "\n\t real description text'>"))
    assert [r["alt_text"] for r in rows] == ["ab real description text"]


def test_broken_utf8_alt_is_cleaned_and_counted():
    page = html_page("<img src='/a.jpg' alt='caf\udcff au lait bowl'>").encode("utf-8", "surrogateescape")
    rows, c = run(page)
    assert rows[0]["alt_text"] == "caf au lait bowl"
    assert "\ufffd" not in rows[0]["alt_text"]
    assert c.counts["alt_invalid_chars"] == 1


# --------------------------------------------------------------------------- URLs
@pytest.mark.parametrize(
    "src, expected",
    [
        ("http://cdn.example.com/a.jpg", "http://cdn.example.com/a.jpg"),
        ("HTTPS://cdn.example.com/A.jpg", "HTTPS://cdn.example.com/A.jpg"),
        ("//cdn.example.com/a.jpg", "http://cdn.example.com/a.jpg"),
        ("/img/a.jpg", "http://www.example.com/img/a.jpg"),
        ("img/a.jpg", "http://www.example.com/dir/img/a.jpg"),
        ("../a.jpg?x=1&amp;y=2", "http://www.example.com/a.jpg?x=1&y=2"),
        ("  \n /img/b c.jpg \t", "http://www.example.com/img/b%20c.jpg"),
        ("/img/\na\tb.jpg", "http://www.example.com/img/ab.jpg"),
        # browsers read a backslash before the query of an http(s) URL as a slash
        ("\\\\cdn.example.net\\img\\b.jpg", "http://cdn.example.net/img/b.jpg"),
        ("http:\\\\cdn.example.net\\b2.jpg?a=\\x", "http://cdn.example.net/b2.jpg?a=\\x"),
        ("img\\c.jpg#f\\g", "http://www.example.com/dir/img/c.jpg#f\\g"),
    ],
)
def test_url_resolution(src, expected):
    rows, _ = run(html_page(f"<img src='{src}' alt='a useful caption'>"))
    assert [r["url"] for r in rows] == [expected]


def test_base_href_is_honoured():
    page = html_page("<img src='a.jpg' alt='resolved against base'>", head="<base href='https://static.example.org/s/'>")
    rows, _ = run(page)
    assert rows[0]["url"] == "https://static.example.org/s/a.jpg"
    assert rows[0]["page_url"] == PAGE
    page = html_page("<img src='a.jpg' alt='relative base here'>", head="<base target=_blank><base href='/x/'>")
    rows, _ = run(page)
    assert rows[0]["url"] == "http://www.example.com/x/a.jpg"


def test_url_attributes_and_srcset_are_configurable():
    page = html_page(
        "<img data-src='/lazy.jpg' src='/placeholder.png' alt='lazy loaded image'>"
        "<img srcset='/s1.jpg 1x, /s2.jpg 2x' alt='only a srcset here'>"
    )
    rows, c = run(page)  # LAION: src only
    assert [r["url"] for r in rows] == ["http://www.example.com/placeholder.png"]
    assert c.dropped_by_reason["no_url"] == 1
    rows, _ = run(page, url_attributes=("data-src", "src"), use_srcset=True)
    assert [r["url"] for r in rows] == ["http://www.example.com/lazy.jpg", "http://www.example.com/s1.jpg"]


@pytest.mark.parametrize("srcset, expected", [
    ("https://res.cloudinary.com/d/image/upload/w_300,h_200,c_fill/s.jpg 300w, /b.jpg 600w",
     ["https://res.cloudinary.com/d/image/upload/w_300,h_200,c_fill/s.jpg", "/b.jpg"]),
    ("/wp/a.jpg?resize=300,200 300w,/wp/a.jpg?resize=600,400 600w", ["/wp/a.jpg?resize=300,200",
                                                                    "/wp/a.jpg?resize=600,400"]),
    (", /lead.jpg 1x", ["/lead.jpg"]),
    (" ,, /a.jpg,, /b.jpg 2x", ["/a.jpg", "/b.jpg"]),
    ("/a.jpg,/b.jpg 2x", ["/a.jpg,/b.jpg"]),  # no whitespace: one URL, as browsers read it
    ("/a.jpg 100w (x, y), /b.jpg", ["/a.jpg", "/b.jpg"]),  # a comma inside parentheses
    ("data:image/gif;base64,R0lGOD 1w, /real.jpg 800w", ["data:image/gif;base64,R0lGOD", "/real.jpg"]),
    ("", []),
    (" , ", []),
])
def test_srcset_is_split_as_browsers_split_it(srcset, expected):
    assert list(srcset_urls(srcset)) == expected


def test_srcset_urls_with_commas_placeholders_and_picture_sources():
    page = html_page(
        "<img srcset='https://res.cloudinary.com/d/image/upload/w_300,h_200/s.jpg 300w, /b.jpg 600w' "
        "alt='cloudinary transformed image'>"
        "<img srcset=', /lead.jpg 1x' alt='leading comma in srcset'>"
        "<img src='data:image/gif;base64,R0lGOD' srcset='/real.jpg 1x' alt='placeholder src with srcset'>"
        "<img srcset='data:image/gif;base64,R0lGOD 1w, /second.jpg 800w' alt='data uri first in srcset'>"
        "<picture><source srcset='/p.webp 1x' type='image/webp'>"
        "<img src='data:image/gif;base64,R0lGOD' alt='picture with a placeholder img'></picture>"
        "<img src='data:image/gif;base64,R0lGOD' alt='placeholder and nothing else'>"
    )
    rows, c = run(page, use_srcset=True)
    assert [r["url"] for r in rows] == [
        "https://res.cloudinary.com/d/image/upload/w_300,h_200/s.jpg", "http://www.example.com/lead.jpg",
        "http://www.example.com/real.jpg", "http://www.example.com/second.jpg", "http://www.example.com/p.webp"]
    assert dict(c.dropped_by_reason) == {"data_or_javascript_url": 1}
    # without use_srcset (LAION-5B's default) nothing of this is read
    rows, c = run(page)
    assert rows == []
    assert dict(c.dropped_by_reason) == {"no_url": 3, "data_or_javascript_url": 3}


# --------------------------------------------------------------------------- filters
def test_each_filter_has_its_own_drop_reason():
    long_url = "http://a.example/" + "x" * 2000 + ".jpg"
    page = html_page(
        "<img src='/ok.jpg' alt='a perfectly fine caption'>"
        "<img src='/noalt.jpg'>"
        "<img src='/blank.jpg' alt='   '>"
        "<img alt='caption without any url'>"
        "<img src='data:image/png;base64,iVBORw0KGgo=' alt='inline data image'>"
        "<img src=' JavaScript:void(0)' alt='script pseudo url'>"
        "<img src='mailto:someone@example.com' alt='mail link image'>"
        "<img src='ftp://files.example.com/a.jpg' alt='ftp hosted image'>"
        "<img src='http://[::1/a.jpg' alt='broken ipv6 host'>"
        f"<img src='{long_url}' alt='very long url here'>"
        "<img src='/logo.SVG' alt='vector logo image'>"
        "<img src='/anim.gif?v=2' alt='animated gif image'>"
        "<img src='/photo.jpg?fmt=.gif' alt='query is not the path'>"
        "<img src='/short.jpg' alt=' tiny '>"
        "<img src='/ok.jpg' alt='a  perfectly\nfine caption'>"
    )
    rows, c = run(page)
    assert [r["url"].rsplit("/", 1)[1] for r in rows] == ["ok.jpg", "photo.jpg?fmt=.gif"]
    assert dict(c.dropped_by_reason) == {
        "no_alt": 2,
        "no_url": 1,
        "data_or_javascript_url": 2,
        "scheme_not_allowed": 2,
        "invalid_url": 1,
        "url_too_long": 1,
        "excluded_extension": 2,
        "alt_too_short": 1,
        "duplicate_in_file": 1,
    }
    assert set(c.dropped_by_reason) <= set(DROP_REASONS)
    assert c.counts["imgs"] == 15 and c.counts["imgs_with_alt"] == 13
    # every threshold is configuration
    rows, c = run(page, max_url_length=5000, excluded_extensions=(), min_alt_length=2,
                  allowed_schemes=("http", "https", "ftp"), dedup_within_file=False)
    assert len(rows) == 8
    assert "alt_too_short" not in c.dropped_by_reason


def test_alt_normalisation_and_truncation():
    assert normalize_alt("  two\tspaced \u00a0 words\n") == "two spaced words"
    assert normalize_alt("bell\x07and\x00nul") == "bell and nul"
    assert normalize_alt("soft\u00adhyphen zero\u200bwidth") == "softhyphen zerowidth"
    assert normalize_alt("ﬁne ＦＵＬＬ width") == "fine FULL width"
    assert normalize_alt("cafe\u0301") == "café"  # NFC
    assert normalize_alt("ð\x9f\x98\x80 smile") == "😀 smile"  # mojibake repaired
    assert normalize_alt("👨\u200d👩\u200d👧 family") == "👨\u200d👩\u200d👧 family"  # ZWJ kept
    assert normalize_alt("&amp; stays") == "&amp; stays"  # entities were decoded once by the parser
    rows, c = run(html_page("<img src='/a.jpg' alt='" + "word " * 400 + "'>"), max_alt_length=100)
    assert len(rows[0]["alt_text"]) <= 100 and rows[0]["alt_text"].startswith("word word")
    assert not rows[0]["alt_text"].endswith(" ")
    assert c.counts["alt_truncated"] == 1
    rows, _ = run(html_page("<img src='/a.jpg' alt='Fish &amp; Chips &eacute;t&#233; &#x1F600;'>"))
    assert rows[0]["alt_text"] == "Fish & Chips été 😀"


@pytest.mark.parametrize(
    "text",
    [
        "广州天仁再生资源回收有限公司", "Стратегия пожарной безопасности", "Escudo d'armas Ñandú café",
        "98a8e084f2bc4be1.jpg (781Ã\x97451)", "ï¬\x81ne", "ＦＵＬＬ　width", "e\u0301t\u0301e", "Ã©tÃ©",
        "ðŸ˜€ smile", "\x85line", "日本語のテキスト ｶﾀｶﾅ", "Ελληνικά κείμενα", "עברית", "हिन्दी पाठ", "😀🎉",
        "â€œquotedâ€\x9d", "naïve façade", "Straße", "\ud800 lone", "x\u2028y",
    ],
)
def test_fast_ftfy_path_matches_ftfy(text):
    assert fix_text(text) == ftfy.fix_text(text, unescape_html=False)


def test_meta_robots_noai_drops_the_page():
    imgs = "<img src='/a.jpg' alt='first opted out image'><img src='/b.jpg'>"
    for content in ("noai", "NoImageAI", "index, follow, noai", "noimageai,nofollow"):
        page = html_page(imgs, head=f"<meta name='Robots' content='{content}'>")
        rows, c = run(page)
        assert rows == [] and c.dropped_by_reason == {"meta_robots_noai": 1, "no_alt": 1}, content
        assert c.counts["pages_opted_out"] == 1
    rows, _ = run(html_page(imgs, head="<meta name='robots' content='noai'>"), honour_meta_robots=False)
    assert len(rows) == 1
    # other meta names or tokens do not opt out
    rows, _ = run(html_page(imgs, head="<meta name='description' content='noai'>"
                                      "<meta name='robots' content='noarchive, noaix'>"))
    assert len(rows) == 1


def test_dedup_within_file_and_provenance(tmp_path):
    page = html_page("<img src='/a.jpg' alt='same pair twice'><img src='/a.jpg' alt='same pair twice'>"
                     "<img src='/a.jpg' alt='same url new text'>")
    path = write_warc(tmp_path / "d.warc.gz", [
        {"url": "http://a.example/", "html": page},
        {"url": "http://a.example/", "html": page},
    ])
    fe = extract_file(str(path), ExtractConfig())
    assert [r["alt_text"] for r in fe.rows] == ["same pair twice", "same url new text"]
    assert fe.counters.dropped_by_reason["duplicate_in_file"] == 4
    first = fe.rows[0]
    assert first["page_url"] == "http://a.example/"
    assert first["warc_path"] == str(path)
    assert first["warc_record_id"].startswith("<urn:uuid:")
    assert first["warc_offset"] > 0
    fe = extract_file(str(path), ExtractConfig(dedup_within_file=False))
    assert len(fe.rows) == 6


def test_rows_have_exactly_the_candidate_schema():
    rows, _ = run(html_page("<img src='/a.jpg' alt='schema checked row'>"))
    assert list(rows[0]) == schema.CANDIDATE_SCHEMA.names
    assert rows[0]["warc_offset"] == 7 and rows[0]["warc_record_id"] == "<urn:uuid:1>"
    batch = schema.rows_to_batch(rows, schema.CANDIDATE_SCHEMA)
    assert batch["hash"].dtype.name == "int64"


def test_page_without_images_and_unparseable_input():
    rows, c = run(html_page("<p>no images</p>"))
    assert rows == [] and c.counts["imgs"] == 0
    rows, c = run(b"\x00" * 10 + b"<img src=/a.jpg alt='after nul bytes'>")
    assert isinstance(rows, list)


def test_demo_sample_expectations(tmp_path):
    from laionbuild.demo import sample_warc
    sample = sample_warc.build_demo_sample(str(tmp_path), image_base="http://images.demo.test:48123")
    rows = []
    for p in sample.warc_paths:
        fe = extract_file(p, ExtractConfig())
        assert fe.file.status == "ok"
        rows += fe.rows
    got = {(r["url"], r["alt_text"]) for r in rows}
    for e in sample.expectations:
        assert ((e.url, e.alt_text) in got) == (e.expected != "drop:candidate"), e


@pytest.mark.parametrize(
    "base",
    ["http://www.example.com/dir/page.html", "HTTPS://Ex.COM:8080/a/b/?q=1#f", "http://user@h.com/x",
     "http://[::1]/a", "http://h.com", "https://h.com/a%20b/c"],
)
def test_url_shortcuts_match_urllib(base):
    from urllib.parse import urljoin, urlsplit

    from laionbuild.stages.candidates import resolve_url, url_origin, url_parts

    origin = url_origin(base)
    for src in ["/a.jpg", "/a/../b.jpg", "/./x.jpg", "//cdn.x/y.jpg", "a.jpg", "../a.jpg", "?q=2", "#f",
                "/a b.jpg", "/a?x=/y#z", "/%7Euser/p.png", "/a\\b.jpg", "/", "/a/b/./c.jpg"]:
        url = resolve_url(src, base, origin)
        # a backslash before the query is a slash, as browsers read it (urljoin keeps it)
        assert url == urljoin(base, src.replace("\\", "/")).replace(" ", "%20")
        parts = urlsplit(url)
        assert url_parts(url) == (parts.scheme, parts.netloc, parts.path)


def test_meta_tdm_reservation_drops_the_page():
    imgs = "<img src='/a.jpg' alt='first reserved image'><img src='/b.jpg' alt='second reserved image'>"
    page = html_page(imgs, head="<meta name='tdm-reservation' content='1'>")
    rows, c = run(page)
    assert rows == [] and c.dropped_by_reason == {"meta_tdm_reservation": 2}
    assert len(run(page, honour_meta_tdm=False)[0]) == 2
    # content 0 reserves nothing
    assert len(run(html_page(imgs, head="<meta name='tdm-reservation' content='0'>"))[0]) == 2


def test_the_ftfy_shortcut_equals_ftfy_for_every_character():
    """fix_text skips ftfy when nothing would change: checked on every BMP character (curly quotes,
    digraph letters such as Ǆ and ʼ, U+FFFC were once missed)."""
    from laionbuild.stages.candidates import _FTFY_CONFIG

    differ = []
    for o in range(0x80, 0x10000):
        if 0xD800 <= o <= 0xDFFF:
            continue
        text = f"café {chr(o)} x"
        if fix_text(text) != ftfy.fix_text(text, config=_FTFY_CONFIG):
            differ.append(f"U+{o:04X}")
    assert differ == []


def test_the_laion_cleaning_runs_ftfy_on_ascii_text_too():
    from laionbuild.stages.candidates import _FTFY_CONFIG, normalize_alt_laion

    for text in ("\x1b[31mRed\x1b[0m alert sign", "tab\there and a\x01control", "cr\rline"):
        expected = ftfy.fix_text(text, config=_FTFY_CONFIG).strip()
        assert normalize_alt_laion(text) == "".join(ch for ch in expected if ch.isprintable())
    assert normalize_alt_laion("\x1b[31mRed\x1b[0m alert sign") == "Red alert sign"
