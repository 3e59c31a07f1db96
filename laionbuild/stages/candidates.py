"""HTML page -> image URL + alt-text candidates, with LAION-5B's filters.

For each :class:`~laionbuild.stages.warc.HtmlDocument`:

1. decode: byte-order mark, then the HTTP ``Content-Type`` charset, then
   ``<meta charset>`` / ``<meta http-equiv>``, then detection (UTF-8 when the
   bytes are valid UTF-8, else charset-normalizer). Labels follow the WHATWG
   encoding standard (``iso-8859-1`` reads as windows-1252, ``gb2312`` as
   GB18030, ``shift_jis`` as cp932) because that is how browsers, and so page
   authors, read them;
2. parse with lexbor (selectolax) and walk the ``<img>`` elements;
3. keep ``(url, alt)`` pairs that pass every filter; each failed filter is its
   own drop reason in the counters (see :data:`DROP_REASONS`);
4. give each row the page's ``LICENSE``: the first ``creativecommons.org/licenses/``
   link of the page, cut to 80 characters, else ``?`` (LAION-5B's column).

Every LAION-5B rule is a setting (``configs/laion5b.yaml`` sets them as LAION
did; ``docs/faithfulness.md`` lists each one next to our default).

Nothing here raises for one bad page: a page that cannot be parsed is counted
as ``record_skipped:parse_error``.
"""

from __future__ import annotations

import codecs
import functools
import logging
import re
import unicodedata
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urljoin, urlsplit

import ftfy
import numpy as np
from ftfy.badness import is_bad
from selectolax.lexbor import LexborHTMLParser

from .. import schema
from ..config import ExtractConfig
from ..stats import FileResult, StageCounters
from .laion_links import IMG_PATH_MARKER, page_rows
from .wat_links import page_links
from .warc import HtmlDocument, iter_html_documents, utf16_codec
from .wat import input_kind, iter_wat_pages

log = logging.getLogger(__name__)

#: every reason an ``<img>`` can be dropped, in the order the filters run
DROP_REASONS = (
    "no_alt",  # alt missing or blank
    "meta_robots_noai",  # page opted out with <meta name=robots content=noai|noimageai>
    "meta_tdm_reservation",  # page reserved with <meta name=tdm-reservation content=1>
    "no_url",  # no URL in the configured attributes
    "data_or_javascript_url",  # data: / javascript: URL
    "relative_url",  # not an absolute URL and resolve_relative_urls is off (LAION-5B)
    "invalid_url",  # cannot be resolved / parsed
    "scheme_not_allowed",  # resolved URL is not absolute http(s) (or not in allowed_schemes)
    "url_too_long",  # longer than max_url_length (unless cut_long_urls)
    "excluded_extension",  # URL path ends with an excluded extension (.svg, .gif)
    "excluded_substring",  # an excluded_substrings entry appears anywhere in the URL (LAION-5B)
    "host_too_long",  # host name longer than max_host_length (LAION-5B: 60)
    "alt_too_short",  # fewer than min_alt_length characters after normalisation
    "duplicate_in_file",  # same dedup key (URL, or URL + TEXT) already kept from this WARC file
)

#: ``LICENSE`` of rows whose page links no Creative Commons licence
NO_LICENSE = "?"
#: the marker LAION-5B looked for in the page's links, and how much of the link it kept
LICENSE_MARKER = "creativecommons.org/licenses/"
LICENSE_MAX_LENGTH = 80
_LICENSE_MARKER_BYTES = LICENSE_MARKER.encode("ascii")
_LICENSE_SELECTOR = f"a[href*='{LICENSE_MARKER}'], link[href*='{LICENSE_MARKER}'], area[href*='{LICENSE_MARKER}']"

#: bytes searched for a ``<meta>`` charset declaration
META_PRESCAN_BYTES = 8192
#: bytes given to charset-normalizer when nothing is declared
DETECT_BYTES = 65_536

#: applied to lower-cased bytes: a comment (an unclosed one runs to the end), a <meta> tag and its
#: attributes, the charset inside a content attribute
_COMMENT_RE = re.compile(rb"<!--.*?(?:-->|\Z)", re.DOTALL)
_META_TAG_RE = re.compile(rb"""<meta[\s/]((?:[^>"']+|"[^"]*"|'[^']*')*)""")
_ATTR_RE = re.compile(rb"""([^\s/>"'=][^\s/>=]*)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]*)))?""")
_CONTENT_CHARSET_RE = re.compile(rb"""charset\s*=\s*["']?([^\s"';]+)""")
_URL_STRIP = " \t\n\r\f"
#: what comes before a srcset candidate's URL: ASCII whitespace and commas
_SRCSET_SKIP = _URL_STRIP + ","
_ASCII_SPACE_RUN = re.compile(r"[ \t\n\r\f\v]{2,}")
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
_TOKEN_SPLIT = re.compile(r"[,\s]+")
_HTTP_URL_RE = re.compile(r"(https?)://([^/?#\\]*)([^?#]*)", re.IGNORECASE)
_TAG_RE = re.compile(rb"<(/?)([A-Za-z][A-Za-z0-9]{0,15})")
#: void elements and elements the parser closes by itself (they never nest deeply)
_NOT_NESTING = frozenset(
    b"area base br col embed hr img input link meta source track wbr param keygen basefont bgsound frame "
    b"p li dt dd option optgroup tr td th thead tbody tfoot rb rt rp colgroup caption".split()
)

#: WHATWG label -> the Python codec that reads it the way browsers do
_WHATWG = {
    **dict.fromkeys(
        ("iso-8859-1", "iso8859-1", "iso_8859-1", "latin1", "latin-1", "l1", "ascii", "us-ascii",
         "cp819", "ibm819", "iso-ir-100", "windows-1252", "x-cp1252", "cp1252"),
        "cp1252",
    ),
    **dict.fromkeys(
        ("gb2312", "gb_2312", "gb_2312-80", "gbk", "x-gbk", "chinese", "csgb2312", "iso-ir-58", "gb18030", "cp936"),
        "gb18030",
    ),
    **dict.fromkeys(
        ("shift_jis", "shift-jis", "sjis", "x-sjis", "ms_kanji", "ms932", "windows-31j", "csshiftjis", "cp932"),
        "cp932",
    ),
    **dict.fromkeys(("euc-jp", "x-euc-jp", "cseucpkdfmtjapanese"), "euc_jp"),
    **dict.fromkeys(("iso-8859-8-i", "csiso88598i", "logical", "iso-8859-8", "iso8859-8", "iso_8859-8", "hebrew",
                     "csisolatinhebrew", "iso-ir-138", "visual", "iso_8859-8:1988"), "iso8859-8"),
    **dict.fromkeys(("koi8-u", "koi8-ru"), "koi8-u"),
    **dict.fromkeys(("x-user-defined",), "cp1252"),
    **dict.fromkeys(("euc-kr", "ks_c_5601-1987", "ks_c_5601-1989", "windows-949", "cseuckr", "korean"), "cp949"),
    **dict.fromkeys(("iso-8859-9", "latin5", "l5", "windows-1254"), "cp1254"),
    **dict.fromkeys(("tis-620", "iso-8859-11", "windows-874", "dos-874"), "cp874"),
    **dict.fromkeys(("big5", "big5-hkscs", "cn-big5", "x-x-big5", "csbig5"), "big5hkscs"),
    # a page cannot really be UTF-16 when a meta/HTTP label could be read as ASCII
    **dict.fromkeys(("utf-16", "utf-16le", "utf-16be", "unicode", "ucs-2"), "utf-8"),
    **dict.fromkeys(("utf-8", "utf8", "unicode-1-1-utf-8", "x-unicode20utf8"), "utf-8"),
}
_codec_cache: dict[str, str | None] = {}
#: Python codecs of the encodings the WHATWG Encoding Standard defines: a label that Python
#: knows but browsers do not (``utf-7``, ``utf-32``, EBCDIC, ...) is ignored, as browsers ignore it
_BROWSER_CODECS = frozenset(
    ["utf-8", "cp866", "koi8-r", "koi8-u", "mac-roman", "mac-cyrillic", "cp874", "gb18030", "big5hkscs",
     "euc_jp", "iso2022_jp", "cp932", "cp949", "utf-16-le", "utf-16-be"]
    + [f"iso8859-{n}" for n in (2, 3, 4, 5, 6, 7, 8, 10, 13, 14, 15, 16)]
    + [f"cp{n}" for n in range(1250, 1259)]
)

#: codecs that read ASCII bytes as ASCII, so a pure-ASCII page can skip decoding
_ASCII_COMPATIBLE = frozenset(
    ("utf-8", "cp1252", "gb18030", "cp932", "cp949", "cp1254", "cp874", "big5hkscs", "cp1251", "euc_jp",
     "iso8859-2", "iso8859-15", "cp1250", "koi8-r", "koi8-u", "cp1256", "cp1255", "cp1253", "cp1257", "cp1258")
)

_FTFY_CONFIG = ftfy.TextFixerConfig(unescape_html=False, explain=False)
#: characters that an ftfy fixer other than the mojibake fixer may change: C1 controls,
#: curly quotes and ʼ (uncurled), Latin ligatures and digraph letters (Ĳ ŉ Ǆ Ǉ Ǌ Ǳ, ﬁ...),
#: full/half-width forms, ideographic space, surrogates, U+FFFC, escapes, line breaks
_FTFY_TOUCHES = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u0132\u0133\u0149\u01c4-\u01cc\u01f1-\u01f3\u02bc\u2018-\u201f"
    "\u2028\u2029\u206a-\u206f\u3000\ud800-\udfff\ufb00-\ufb06\ufeff\ufff9-\ufffc\uff00-\uffef]")
#: the ASCII characters among them: control characters (removed), CR (a line break), ESC (escapes)
_FTFY_TOUCHES_ASCII = re.compile("[\x00-\x08\x0b-\x1f\x7f]")
#: format characters kept in alt text: they change how the text reads (Persian, Indic, emoji)
_KEEP_FORMAT = frozenset("\u200c\u200d")


# --------------------------------------------------------------------------- decoding
def resolve_charset(label: str | None) -> str | None:
    """A charset label -> a Python text codec name, or None if it is unknown / not a text codec."""
    if not label:
        return None
    key = label.strip().strip("\"'").lower()
    if key in _codec_cache:
        return _codec_cache[key]
    name = _WHATWG.get(key)
    if name is None:
        try:
            info = codecs.lookup(key)
        except LookupError:
            info = None
        if info is not None and getattr(info, "_is_text_encoding", True):
            name = info.name
            name = {"utf-8": "utf-8", "shift_jis": "cp932", "gb2312": "gb18030", "gbk": "gb18030",
                    "latin-1": "cp1252", "iso8859-1": "cp1252", "ascii": "cp1252", "euc_kr": "cp949",
                    "iso8859-9": "cp1254", "iso8859-11": "cp874"}.get(name, name)
            if name not in _BROWSER_CODECS:
                name = None
    if len(_codec_cache) < 1000:
        _codec_cache[key] = name
    return name


def sniff_charset(html: bytes, http_charset: str | None) -> tuple[str, str]:
    """Pick the codec of a page: ``(codec, source)`` with source bom|http|meta|ascii|utf8|detected|fallback."""
    if html[:3] == b"\xef\xbb\xbf":
        return "utf-8", "bom"
    if html[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return ("utf-16-le" if html[:2] == b"\xff\xfe" else "utf-16-be"), "bom"
    codec = utf16_codec(http_charset) or resolve_charset(http_charset)
    if codec:
        return codec, "http"
    lower_head = html[:META_PRESCAN_BYTES].lower()
    codec = meta_charset(lower_head) if b"charset" in lower_head else None
    if codec:
        return codec, "meta"
    if html.isascii():
        return "utf-8", "ascii"
    try:
        html.decode("utf-8")
        return "utf-8", "utf8"
    except UnicodeDecodeError:
        pass
    try:
        from charset_normalizer import from_bytes

        best = from_bytes(html[:DETECT_BYTES]).best()
        codec = resolve_charset(best.encoding) if best is not None else None
    except Exception:  # noqa: BLE001 - detection is best effort
        codec = None
    if codec:
        return codec, "detected"
    return "cp1252", "fallback"


def _euc_jp_errors(exc: UnicodeError) -> tuple[str, int]:
    """Python's ``euc_jp`` lacks rows of the WHATWG EUC-JP decoder's index (jis0208): NEC's row
    13 (①, ㈱, ㍉) and the IBM rows 89-92. cp932 holds the same index, so such a two-byte
    character is read as its Shift_JIS form with cp932; anything else becomes U+FFFD, both
    bytes of a two-byte sequence consumed."""
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    pair = exc.object[exc.start:exc.start + 2]
    if len(pair) == 2 and 0xA1 <= pair[0] <= 0xFE and 0xA1 <= pair[1] <= 0xFE:
        row, cell = pair[0] - 0x80, pair[1] - 0x80  # JIS X 0208 row / cell bytes, 0x21-0x7E
        lead = ((row + 1) >> 1) + (0x70 if row <= 0x5E else 0xB0)
        trail = cell + (0x7E if row % 2 == 0 else (0x20 if cell >= 0x60 else 0x1F))
        try:
            return bytes((lead, trail)).decode("cp932"), exc.start + 2
        except UnicodeDecodeError:
            return "\ufffd", exc.start + 2
    return "\ufffd", exc.end


codecs.register_error("laionbuild-euc-jp", _euc_jp_errors)


def decode_bytes(html: bytes, codec: str) -> str:
    """``html`` decoded with ``codec`` as browsers decode it, invalid bytes replaced."""
    return html.decode(codec, "laionbuild-euc-jp" if codec == "euc_jp" else "replace")


def meta_charset(lower_head: bytes) -> str | None:
    """The codec of the first ``<meta>`` that declares a known one, as browsers' prescan finds it:
    outside comments; ``charset=`` as an attribute, or inside ``content`` when ``http-equiv`` is
    ``content-type``. ``lower_head``: the page's first bytes, lower-cased."""
    if b"<!--" in lower_head:
        lower_head = _COMMENT_RE.sub(b" ", lower_head)
    for tag in _META_TAG_RE.finditer(lower_head):
        if b"charset" not in tag.group(1):
            continue
        attrs: dict[bytes, bytes] = {}
        for m in _ATTR_RE.finditer(tag.group(1)):
            value = m.group(2) if m.group(2) is not None else m.group(3) if m.group(3) is not None else m.group(4)
            attrs.setdefault(m.group(1), value or b"")
        label = attrs.get(b"charset")
        if label is None and attrs.get(b"http-equiv", b"").strip() == b"content-type":
            found = _CONTENT_CHARSET_RE.search(attrs.get(b"content", b""))
            label = found.group(1) if found else None
        if label is None:
            continue
        codec = resolve_charset(label.decode("ascii", "ignore"))
        if codec:  # a <meta> cannot really say UTF-16: the bytes that say it read as ASCII
            return "utf-8" if codec.startswith("utf-16") else codec
    return None


def parse_html(html: bytes, http_charset: str | None, counters: StageCounters | None = None) -> LexborHTMLParser:
    """Decode and parse a page with lexbor; UTF-8 (and pure ASCII) pages skip Python decoding."""
    codec, source = sniff_charset(html, http_charset)
    if counters is not None:
        counters.count(f"charset_from_{source}")
    if codec == "utf-8":
        if html[:3] == b"\xef\xbb\xbf":
            html = html[3:]
        return LexborHTMLParser(html)
    if codec in _ASCII_COMPATIBLE and html.isascii():
        return LexborHTMLParser(html)
    # lexbor parses UTF-8 bytes faster than a str with non-Latin-1 characters
    return LexborHTMLParser(decode_bytes(html, codec).encode("utf-8", "replace"))


# --------------------------------------------------------------------------- text and URLs
def fix_text(text: str) -> str:
    """``ftfy.fix_text`` (HTML entities left alone: the parser already decoded them once).

    Most non-ASCII alt texts need no fix at all; when ftfy's own mojibake check
    finds nothing and no character that another ftfy fixer would touch is
    present, the result of ftfy is exactly the NFC form, computed directly.
    """
    if text.isascii():
        return text if _FTFY_TOUCHES_ASCII.search(text) is None else ftfy.fix_text(text, config=_FTFY_CONFIG)
    if not is_bad(text) and _FTFY_TOUCHES.search(text) is None:
        return unicodedata.normalize("NFC", text)
    return ftfy.fix_text(text, config=_FTFY_CONFIG)


def normalize_alt(text: str) -> str:
    """ftfy (non-ASCII only), printable characters only, whitespace collapsed."""
    if not text.isascii():
        text = fix_text(text)
        if "\ufffd" in text:
            text = text.replace("\ufffd", " ")
    if not text.isprintable():
        out = []
        for ch in text:
            if ch.isprintable() or ch in _KEEP_FORMAT:
                out.append(ch)
            elif unicodedata.category(ch) != "Cf":
                out.append(" ")
        text = "".join(out)
    return " ".join(text.split())


def normalize_alt_laion(text: str) -> str:
    """LAION-5B's alt-text cleaning: line breaks -> spaces, ftfy, strip, every
    non-printable character removed (``str.isprintable``: tabs and zero-width
    characters included). Runs of spaces stay; cutting to ``max_alt_length`` and
    ``|`` -> space come after the length check (see :func:`finish_alt_laion`)."""
    text = fix_text(text.replace("\n", " "))  # ASCII too: ftfy removes control characters and escapes
    text = text.strip()
    if not text.isprintable():
        text = "".join(ch for ch in text if ch.isprintable())
    return text


def finish_alt_laion(text: str, max_length: int) -> str:
    """The end of LAION-5B's cleaning: cut to ``max_length``; tabs, line breaks and ``|`` -> spaces."""
    text = text[:max_length]
    if "|" in text or "\t" in text or "\n" in text:
        text = text.replace("\t", " ").replace("\n", " ").replace("|", " ")
    return text


def page_license(tree: LexborHTMLParser, html: bytes) -> str:
    """LAION-5B's ``LICENSE``: the first ``creativecommons.org/licenses/`` link of the page
    (``<a>``, ``<link>`` or ``<area>`` ``href``), line breaks removed, cut to 80 characters; else ``?``."""
    if _LICENSE_MARKER_BYTES not in html:
        return NO_LICENSE
    node = tree.css_first(_LICENSE_SELECTOR)
    if node is None:
        return NO_LICENSE
    href = (node.attrs.get("href") or "").replace("\n", "").replace("\r", "")
    return href[:LICENSE_MAX_LENGTH] or NO_LICENSE


def is_absolute_url(url: str) -> bool:
    """``scheme://host...``: what LAION-5B's URL validator asked of a link (relative links failed)."""
    try:
        scheme, netloc, _ = url_parts(url)
    except ValueError:
        return False
    return bool(scheme) and bool(netloc) and "://" in url[: len(scheme) + 3]


def host_name(url: str) -> str:
    """The host of ``url`` (no user info, no port), or "" when it has none."""
    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""


def clean_url(src: str) -> str:
    """Strip the whitespace a browser ignores around and inside a URL attribute."""
    s = src.strip(_URL_STRIP)
    if "\n" in s or "\t" in s or "\r" in s:
        s = s.replace("\n", "").replace("\t", "").replace("\r", "")
    return s


def resolve_url(src: str, base: str, origin: str = "") -> str:
    """Resolve ``src`` against ``base`` (absolute http(s) URLs are kept as they are).

    ``origin`` (``scheme://host`` of ``base``, see :func:`url_origin`) enables a
    shortcut for root-relative paths without dot segments, with the same result
    as ``urljoin``.
    """
    if "\\" in src:
        src = _backslashes_as_slashes(src)
    head = src[:8].lower()
    if head.startswith("http://") or head.startswith("https://"):
        url = src
    elif origin and src[:1] == "/" and src[1:2] != "/" and "/." not in src and "\\" not in src:
        url = origin + src
    else:
        url = urljoin(base, src)
    if " " in url:
        url = url.replace(" ", "%20")
    return url


def _backslashes_as_slashes(src: str) -> str:
    """A ``\\`` before the query of an http(s) URL (or of a relative one, which an http(s) page
    resolves) is a ``/``, as browsers' URL parser reads it: ``\\\\cdn.example\\a.jpg`` is
    ``//cdn.example/a.jpg``. Other schemes keep it."""
    scheme = _SCHEME_RE.match(src)
    if scheme is not None and scheme.group(1).lower() not in ("http", "https"):
        return src
    end = len(src)
    for mark in ("?", "#"):
        i = src.find(mark)
        if 0 <= i < end:
            end = i
    return src[:end].replace("\\", "/") + src[end:]


def url_origin(url: str) -> str:
    """``scheme://host`` of an http(s) URL as ``urljoin`` writes it, or "" for anything else."""
    m = _HTTP_URL_RE.match(url)
    if m is None or "[" in m.group(2) or "@" in m.group(2):
        return ""
    return m.group(1).lower() + "://" + m.group(2)


def url_parts(url: str) -> tuple[str, str, str]:
    """``(scheme, netloc, path)``; ``urlsplit``'s answer, faster for plain http(s) URLs.

    Raises ``ValueError`` where ``urlsplit`` does.
    """
    m = _HTTP_URL_RE.match(url)
    if m is not None and "[" not in m.group(2) and "\\" not in url:
        return m.group(1).lower(), m.group(2), m.group(3)
    parts = urlsplit(url)
    return parts.scheme, parts.netloc, parts.path


def srcset_urls(srcset: str) -> Iterator[str]:
    """The URLs of a ``srcset``'s image candidates, in order, split as the HTML standard
    splits them: leading whitespace and commas skipped, the URL runs to the next whitespace
    (commas inside it belong to it: ``w_300,h_200`` of an image CDN) less trailing commas,
    then the descriptors up to a comma outside parentheses. Descriptors are not checked."""
    pos, n = 0, len(srcset)
    while True:
        while pos < n and srcset[pos] in _SRCSET_SKIP:
            pos += 1
        if pos >= n:
            return
        start = pos
        while pos < n and srcset[pos] not in _URL_STRIP:
            pos += 1
        url = srcset[start:pos]
        if url.endswith(","):
            url = url.rstrip(",")
        else:
            in_parens = False
            while pos < n:
                ch = srcset[pos]
                pos += 1
                if ch == "(":
                    in_parens = True
                elif ch == ")":
                    in_parens = False
                elif ch == "," and not in_parens:
                    break
        if url:
            yield url


def _is_placeholder(src: str) -> bool:
    head = src[:11].lower()
    return head.startswith("data:") or head.startswith("javascript:")


def _srcset_url(img, attrs) -> str:
    """With ``use_srcset``: the first candidate URL of the image's ``srcset``, else of the
    ``srcset`` of a ``<source>`` before it in its ``<picture>``; ``data:`` / ``javascript:``
    candidates only when there is no other. "" when there is none."""
    fallback = ""
    srcset = attrs.get("srcset")
    values = [srcset] if srcset else []
    parent = img.parent
    if parent is not None and parent.tag == "picture":
        for child in parent.iter():
            if child.tag == "img":
                break
            if child.tag == "source":
                value = child.attrs.get("srcset")
                if value:
                    values.append(value)
    for value in values:
        for url in srcset_urls(value):
            url = clean_url(url)
            if not url:
                continue
            if not _is_placeholder(url):
                return url
            fallback = fallback or url
    return fallback


def page_base(tree: LexborHTMLParser, page_url: str) -> str:
    """The URL relative image URLs resolve against: the first ``<base href>`` (wherever it
    is, as in browsers) resolved against the page URL, else the page URL."""
    for node in tree.tags("base"):
        href = node.attrs.get("href")
        if href is None:
            continue
        href = clean_url(href)
        if href:
            try:
                return urljoin(page_url, href)
            except ValueError:
                pass
        break
    return page_url


def _page_opts_out(tree: LexborHTMLParser, cfg: ExtractConfig) -> str:
    """Why the page's images are reserved, or "".

    ``<meta name="robots" content="noai">`` (or ``noimageai``), and with
    ``extract.honour_meta_tdm`` the TDM Reservation Protocol's page-level
    ``<meta name="tdm-reservation" content="1">``.
    """
    for meta in tree.tags("meta"):
        attrs = meta.attrs
        name = (attrs.get("name") or "").strip().lower()
        if name == "robots" and cfg.honour_meta_robots:
            tokens = set(_TOKEN_SPLIT.split((attrs.get("content") or "").lower()))
            if "noai" in tokens or "noimageai" in tokens:
                return "meta_robots_noai"
        elif name == "tdm-reservation" and cfg.honour_meta_tdm:
            if (attrs.get("content") or "").strip() == "1":
                return "meta_tdm_reservation"
    return ""


# --------------------------------------------------------------------------- candidates
def extract_candidates(
    doc: HtmlDocument, cfg: ExtractConfig, counters: StageCounters, seen: set[int] | None = None
) -> list[dict]:
    """Candidate rows (CANDIDATE_SCHEMA keys) of one page.

    ``seen`` holds the keys already kept from the same WARC file (de-duplication
    within the file, on ``extract.dedup_key``: the URL, or URL + TEXT; the first
    row wins); without it, duplicates are removed within the page.
    Counters: ``imgs``, ``imgs_with_alt``, ``candidates``, ``kept``, a drop per
    :data:`DROP_REASONS`, ``charset_from_*``, ``pages_opted_out``.
    """
    try:
        return _extract(doc, cfg, counters, set() if seen is None else seen)
    except Exception as exc:  # noqa: BLE001 - one bad page never stops the file
        log.debug("cannot extract %s (%s): %s", doc.page_url, doc.record_id, exc)
        counters.count("record_skipped:parse_error")
        return []


def nesting_cut(html: bytes, limit: int) -> int | None:
    """Byte offset where the element nesting of ``html`` first exceeds ``limit``, else None.

    An over-estimate of the parser's stack of open elements: void and
    auto-closing elements are not counted, an end tag only closes a start tag of
    the same name. Pages with at most ``limit`` ``<`` characters are not scanned.
    """
    # every open element costs at least 3 bytes ("<a>"), so small pages cannot be too deep
    if limit <= 0 or len(html) <= 3 * limit:
        return None
    if int(np.count_nonzero(np.frombuffer(html, dtype=np.uint8) == 60)) <= limit:  # 60 == ord("<")
        return None
    depth = 0
    open_by_name: dict[bytes, int] = {}
    for m in _TAG_RE.finditer(html):
        name = m.group(2).lower()
        if name in _NOT_NESTING:
            continue
        if m.group(1):
            n = open_by_name.get(name, 0)
            if n:
                open_by_name[name] = n - 1
                depth -= 1
        else:
            open_by_name[name] = open_by_name.get(name, 0) + 1
            depth += 1
            if depth > limit:
                return m.start()
    return None


def _extract(doc: HtmlDocument, cfg: ExtractConfig, counters: StageCounters, seen: set[int]) -> list[dict]:
    html = doc.html
    if cfg.link_rules == "laion":
        return _laion_candidates(doc, decode_html(html, doc.http_charset, counters), cfg, counters, seen)
    cut = nesting_cut(html, cfg.max_nesting_depth)
    if cut is not None:
        counters.count("html_too_deep")
        html = html[:cut]
    tree = parse_html(html, doc.http_charset, counters)
    return _candidates_from_tree(doc, tree, cfg, counters, seen)


@functools.lru_cache(maxsize=64)
def _filter_sets(schemes: tuple[str, ...], extensions: tuple[str, ...]) -> tuple[frozenset, tuple[str, ...]]:
    return frozenset(s.lower() for s in schemes), tuple(e.lower() for e in extensions)


def _candidates_from_tree(
    doc: HtmlDocument, tree: LexborHTMLParser, cfg: ExtractConfig, counters: StageCounters, seen: set[int]
) -> list[dict]:
    images = tree.tags("img")
    n_imgs = len(images)
    counters.count("imgs", n_imgs)
    if not n_imgs:
        return []
    dropped = counters.dropped_by_reason

    # looked up on the first image that has an alt text (most pages have none)
    opted_out: str | None = None
    base = ""
    origin = ""
    url_attrs = cfg.url_attributes
    use_srcset = cfg.use_srcset
    allowed, exts = _filter_sets(cfg.allowed_schemes, cfg.excluded_extensions)
    max_url = cfg.max_url_length
    cut_long = cfg.cut_long_urls
    resolve_relative = cfg.resolve_relative_urls
    substrings = cfg.excluded_substrings
    max_host = cfg.max_host_length
    min_alt = cfg.min_alt_length
    max_alt = cfg.max_alt_length
    laion_alt = cfg.alt_normalization == "laion"
    dedup = cfg.dedup_within_file
    by_url = cfg.dedup_key == "url"
    license_ = ""
    rows: list[dict] = []
    with_alt = 0

    for img in images:
        attrs = img.attrs
        alt = attrs.get("alt")
        if not alt or alt.isspace():
            dropped["no_alt"] += 1
            continue
        with_alt += 1
        if opted_out is None:
            opted_out = _page_opts_out(tree, cfg) if (cfg.honour_meta_robots or cfg.honour_meta_tdm) else ""
        if opted_out:
            dropped[opted_out] += 1
            continue
        src = ""
        for name in url_attrs:
            value = attrs.get(name)
            if value:
                src = clean_url(value)
                if src:
                    break
        if use_srcset and (not src or _is_placeholder(src)):
            # no URL attribute, or a data: / javascript: placeholder of a lazy-loaded image
            src = _srcset_url(img, attrs) or src
        if not src:
            dropped["no_url"] += 1
            continue
        if _is_placeholder(src):
            dropped["data_or_javascript_url"] += 1
            continue
        if cut_long and len(src) > max_url:
            src = src[:max_url]
            counters.count("url_cut")
        if not resolve_relative and not is_absolute_url(src):
            dropped["relative_url"] += 1
            continue
        if not base:
            base = page_base(tree, doc.page_url)
            origin = url_origin(base)
        try:
            url = resolve_url(src, base, origin)
            scheme, netloc, path = url_parts(url)
        except ValueError:
            dropped["invalid_url"] += 1
            continue
        if scheme not in allowed or not netloc:
            dropped["scheme_not_allowed"] += 1
            continue
        if len(url) > max_url:
            dropped["url_too_long"] += 1
            continue
        if exts and path.lower().endswith(exts):
            dropped["excluded_extension"] += 1
            continue
        if substrings and any(x in url for x in substrings):
            dropped["excluded_substring"] += 1
            continue
        if max_host and len(netloc) > max_host and len(host_name(url)) > max_host:
            dropped["host_too_long"] += 1
            continue
        if "\ufffd" in alt:
            # bytes that are invalid in the page's charset; they are removed below
            counters.count("alt_invalid_chars")
        # bound the work on absurd attributes before normalising
        if laion_alt:
            text = normalize_alt_laion(alt[: max_alt * 4 + 64])
            if len(text) < min_alt:
                dropped["alt_too_short"] += 1
                continue
            if len(text) > max_alt:
                counters.count("alt_truncated")
            text = finish_alt_laion(text, max_alt)
        else:
            bound = max_alt * 4 + 64
            if len(alt) > bound:  # runs of spaces collapse below: shorten them first, not the text after them
                alt = _ASCII_SPACE_RUN.sub(" ", alt)
            text = normalize_alt(alt[:bound])
            if len(text) < min_alt:
                dropped["alt_too_short"] += 1
                continue
            if len(text) > max_alt:
                text = text[:max_alt].rstrip()
                counters.count("alt_truncated")
        h = schema.pair_hash(url, text)
        if dedup:
            key = hash(url) if by_url else h
            if key in seen:
                dropped["duplicate_in_file"] += 1
                continue
            seen.add(key)
        if not license_:
            license_ = page_license(tree, doc.html)
        rows.append(_candidate_row(doc, url, text, h, license_))
    counters.count("imgs_with_alt", with_alt)
    if opted_out:
        counters.count("pages_opted_out")
    if rows:
        counters.count("candidates", len(rows))
        counters.kept += len(rows)
    return rows


def _candidate_row(doc: HtmlDocument, url: str, text: str, h: int, license_: str, langid_text: str = "") -> dict:
    """One candidate of a page: the pair, where it was found, its hash and the page's licence
    (``langid_text``: see :data:`schema.LANGID_TEXT`)."""
    row = {
        schema.URL: url,
        schema.ALT_TEXT: text,
        schema.PAGE_URL: doc.page_url,
        schema.WARC_PATH: doc.warc_path,
        schema.WARC_RECORD_ID: doc.record_id,
        schema.WARC_OFFSET: doc.offset,
        schema.HASH: h,
        schema.LICENSE: license_,
    }
    if langid_text:
        row[schema.LANGID_TEXT] = langid_text
    return row


def candidate_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """The candidate rows of one input as the batch the language stage takes: the candidate
    columns, an empty ``DROP_REASON`` and, when a row has one, ``LANGID_TEXT``."""
    batch = schema.rows_to_batch(rows, schema.CANDIDATE_SCHEMA)
    batch[schema.DROP_REASON] = np.full(len(rows), "", dtype=object)
    if any(schema.LANGID_TEXT in row for row in rows):  # read by the language stage, never written
        batch[schema.LANGID_TEXT] = np.array([row.get(schema.LANGID_TEXT, "") for row in rows], dtype=object)
    return batch


def decode_html(html: bytes, http_charset: str | None, counters: StageCounters | None = None) -> str:
    """The text of a page, decoded as :func:`parse_html` decodes it (invalid bytes replaced)."""
    codec, source = sniff_charset(html, http_charset)
    if counters is not None:
        counters.count(f"charset_from_{source}")
    if codec == "utf-8" and html[:3] == b"\xef\xbb\xbf":
        html = html[3:]
    return decode_bytes(html, codec)


def _laion_candidates(
    doc: HtmlDocument, text: str, cfg: ExtractConfig, counters: StageCounters, seen: set[int]
) -> list[dict]:
    """LAION-5B's rules on the page's links as the WAT generator records them (raw attribute values)."""
    links, has_img = page_links(text)
    counters.count("imgs", sum(1 for link in links if link.path == "IMG@/src"))
    if not has_img:  # LAION's test was "IMG@" anywhere in the WAT record: another IMG@ path, a URL, an alt
        has_img = IMG_PATH_MARKER in doc.page_url or any(
            link.path.startswith(IMG_PATH_MARKER) or IMG_PATH_MARKER in link.url
            or (link.alt is not None and IMG_PATH_MARKER in link.alt) for link in links)
    if not has_img:
        counters.count("pages_without_img_link")
        return []
    found = page_rows(links, doc.page_url, cfg, counters, seen, by_url=cfg.dedup_key == "url")
    rows = [
        _candidate_row(doc, url, text, h, license_, langid_text)
        for url, text, license_, h, langid_text in found
    ]
    if rows:
        counters.count("candidates", len(rows))
        counters.kept += len(rows)
    return rows


# --------------------------------------------------------------------------- files
@dataclass
class FileExtraction:
    """Everything one WARC file gave: candidate rows, counters and the file's outcome."""

    path: str
    rows: list[dict]
    counters: StageCounters
    file: FileResult


def _extract_other_kind(
    path: str, kind: str, cfg: ExtractConfig, counters: StageCounters, result: FileResult
) -> FileExtraction:
    """Candidates of a WAT file (LAION-5B's link rules); a WET file fails (it holds no links)."""
    rows: list[dict] = []
    if kind == "wet":
        result.status, result.reason = "failed", "wet_file"
        result.message = "WET files hold plain text without links: give the WARC or WAT file"
        return FileExtraction(path=path, rows=rows, counters=counters, file=result)
    if cfg.link_rules != "laion":
        result.status, result.reason = "failed", "wat_needs_laion_link_rules"
        result.message = "WAT input carries links, not HTML: it is read with extract.link_rules: laion"
        return FileExtraction(path=path, rows=rows, counters=counters, file=result)
    seen: set[int] = set()
    by_url = cfg.dedup_key == "url"
    try:
        for page in iter_wat_pages(path, cfg, counters, result):
            doc = HtmlDocument(page_url=page.page_url, html=b"", http_charset=None, record_id=page.record_id,
                               offset=page.offset, warc_path=page.wat_path)
            for url, text, license_, h, langid_text in page_rows(page.links, page.page_url, cfg, counters, seen,
                                                                 by_url):
                rows.append(_candidate_row(doc, url, text, h, license_, langid_text))
    except Exception as exc:  # noqa: BLE001 - the reader reports bad files; this is a last guard
        log.warning("extraction of %s stopped: %s: %s", path, type(exc).__name__, exc)
        result.status = "partial" if rows else "failed"
        result.reason, result.message = "error", f"{type(exc).__name__}: {exc}"
    if rows:
        counters.count("candidates", len(rows))
        counters.kept += len(rows)
    return FileExtraction(path=path, rows=rows, counters=counters, file=result)


def extract_file(path: str, cfg: ExtractConfig) -> FileExtraction:
    """Extract all candidates of one input file; never raises (a bad file is in ``.file``).

    WARC files (``*.warc.gz``) are parsed as HTML; WAT files (``*.wat.gz``, with
    ``extract.link_rules: laion``) give their pages' links to LAION-5B's rules.
    """
    counters = StageCounters()
    result = FileResult(path=path)
    rows: list[dict] = []
    seen: set[int] = set()
    kind = input_kind(path)
    if kind != "warc":
        return _extract_other_kind(path, kind, cfg, counters, result)
    try:
        for doc in iter_html_documents(path, cfg, counters, result):
            rows.extend(extract_candidates(doc, cfg, counters, seen if cfg.dedup_within_file else None))
    except Exception as exc:  # noqa: BLE001 - the reader already reports bad files; this is a last guard
        log.warning("extraction of %s stopped: %s: %s", path, type(exc).__name__, exc)
        if rows or counters.counts.get("records"):
            if result.status == "ok":
                result.status, result.reason = "partial", "error"
                result.message = f"{type(exc).__name__}: {exc}"
        else:
            result.status, result.reason = "failed", "error"
            result.message = f"{type(exc).__name__}: {exc}"
    return FileExtraction(path=path, rows=rows, counters=counters, file=result)


__all__ = [
    "DROP_REASONS",
    "FileExtraction",
    "extract_candidates",
    "candidate_batch",
    "extract_file",
    "normalize_alt",
    "normalize_alt_laion",
    "page_license",
    "parse_html",
    "resolve_charset",
    "resolve_url",
    "sniff_charset",
]
