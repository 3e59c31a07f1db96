"""LAION-5B's decision for each link of a page (``extract.link_rules: laion``).

LAION-5B read Common Crawl's WAT files: for each page, the list of links the
WAT generator recorded (``Links``, in the order the generator met them, each a
``url`` and, for ``<img>`` and ``<a>`` elements that carry one, an ``alt``),
and the page's URL. Its ``parse_wat`` then did, per link and in this order:

1. ``LICENSE``: a link whose ``url`` contains ``creativecommons.org/licenses/``
   becomes the licence of this and every later link of the page (its first 80
   characters, LF removed); before any such link the licence is ``?``;
2. the ``url`` is cut to 2,000 characters and its LFs are removed;
3. the URL must pass Django's ``URLValidator`` (:mod:`.url_validation`);
4. it must not contain ``.svg``, ``.gif``, ``data:image`` or ``javascript:``;
5. its host name must exist and be at most 60 characters;
6. the link must have an ``alt``: LFs become spaces, ``ftfy.fix_text`` with its
   default settings (HTML entities still in the value are decoded then), strip,
   every non-printable character removed; at least 5 characters must remain;
7. the text is cut to 2,000 characters, tabs, LFs and ``|`` become spaces;
8. a URL that does not start with ``http`` (an upper-case scheme, ``ftp``) is
   passed through ``urljoin(dirname(page URL), url)`` (which lower-cases a
   scheme equal to the page's and drops empty ``?`` / ``#``);
9. within one WAT file, the first row per URL wins.

Pages whose record names no ``IMG@`` link path (no ``<img src>`` /
``<img longdesc>``) were skipped whole. Only the counting of each drop reason
is ours. Everything here is pure; the WAT reader (:mod:`.wat`) and the WARC
extractor (:mod:`.candidates`) both feed it.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Iterable
from urllib.parse import urljoin, urlsplit

import ftfy

from .. import schema
from ..config import ExtractConfig
from ..stats import StageCounters
from .url_validation import is_valid_url

#: the marker of a licence link, and how much of the link becomes ``LICENSE``
LICENSE_MARKER = "creativecommons.org/licenses/"
LICENSE_MAX_LENGTH = 80
NO_LICENSE = "?"
#: the WAT link path of an ``<img>`` element; a page without one was skipped
IMG_PATH_MARKER = "IMG@"


@dataclass(frozen=True)
class PageLink:
    """One entry of a page's ``Links``: the ``url``, the ``alt`` (None when absent) and the
    WAT ``path`` (``IMG@/src``, ``A@/href``...; informative, not compared)."""

    url: str
    alt: str | None = None
    path: str = field(default="", compare=False)


def laion_clean_alt(alt: str) -> str:
    """LF -> space, ``ftfy.fix_text`` (defaults), strip, non-printable characters removed."""
    text = ftfy.fix_text(alt.replace("\n", " ")).strip()
    if not text.isprintable():
        text = "".join(ch for ch in text if ch.isprintable())
    return text


def laion_finish_alt(text: str, max_length: int) -> str:
    """Cut to ``max_length``; tabs, LFs and ``|`` -> spaces."""
    return text[:max_length].replace("\t", " ").replace("\n", " ").replace("|", " ")


def page_base_url(page_url: str) -> str:
    """The base of LAION's ``urljoin``: the page URL up to its last ``/`` (``os.path.dirname``)."""
    return posixpath.dirname(page_url)


def decide_link(
    url: str, alt: str, base_url: str, cfg: ExtractConfig, counters: StageCounters | None = None
) -> tuple[str, str] | str:
    """``(URL, TEXT)`` of a link LAION-5B kept, or the reason it was dropped.

    With ``counters``, a kept link whose URL or text was cut counts ``url_cut`` /
    ``alt_truncated``.
    """
    decision = _decide(url, alt, base_url, cfg, counters)
    return decision if isinstance(decision, str) else decision[:2]


def _decide(
    url: str, alt: str, base_url: str, cfg: ExtractConfig, counters: StageCounters | None = None
) -> tuple[str, str, str] | str:
    """:func:`decide_link`, with the cleaned text before its cut (the text LAION's CLD3 read)."""
    url_cut = len(url) > cfg.max_url_length
    url = url[: cfg.max_url_length].replace("\n", "")
    if not is_valid_url(url):
        return "invalid_url"
    if cfg.excluded_substrings and any(x in url for x in cfg.excluded_substrings):
        return "excluded_substring"
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return "invalid_url"
    if not host:
        return "invalid_url"
    if cfg.max_host_length and len(host) > cfg.max_host_length:
        return "host_too_long"
    try:
        text = laion_clean_alt(alt)
    except Exception:  # noqa: BLE001 - LAION's code treated any failure here as no alt text
        text = ""
    if len(text) < cfg.min_alt_length:
        return "alt_too_short"
    if counters is not None:
        if url_cut:
            counters.count("url_cut")
        if len(text) > cfg.max_alt_length:
            counters.count("alt_truncated")
    cleaned, text = text, laion_finish_alt(text, cfg.max_alt_length)
    if not url.startswith("http"):
        try:
            url = urljoin(base_url, url)
        except ValueError:
            return "invalid_url"
    return url, text, cleaned


def page_rows(
    links: Iterable[PageLink],
    page_url: str,
    cfg: ExtractConfig,
    counters: StageCounters,
    seen: set[int],
    by_url: bool = True,
) -> list[tuple[str, str, str, int, str]]:
    """``(URL, TEXT, LICENSE, hash, langid text)`` of the links of one page that LAION-5B kept; the
    langid text is the cleaned alt text before its cut when the cut changed it, else "".

    ``seen`` holds the de-duplication keys already kept from the same input file
    (``hash(URL)`` with ``by_url``, else the pair hash); it is updated.
    Counters: ``links``, ``links_with_alt``, a drop per reason, ``duplicate_in_file``.
    """
    base = page_base_url(page_url)
    license_ = NO_LICENSE
    rows: list[tuple[str, str, str, int, str]] = []
    dropped = counters.dropped_by_reason
    n_links = n_alt = 0
    for link in links:
        n_links += 1
        url = link.url
        if LICENSE_MARKER in url:
            license_ = url[:LICENSE_MAX_LENGTH].replace("\n", "")
        if link.alt is None:
            continue
        n_alt += 1
        decision = _decide(url, link.alt, base, cfg, counters)
        if isinstance(decision, str):
            dropped[decision] += 1
            continue
        url, text, cleaned = decision
        h = schema.pair_hash(url, text)
        if cfg.dedup_within_file:
            key = hash(url) if by_url else h
            if key in seen:
                dropped["duplicate_in_file"] += 1
                continue
            seen.add(key)
        rows.append((url, text, license_, h, cleaned if len(cleaned) > cfg.max_alt_length else ""))
    counters.count("links", n_links)
    counters.count("links_with_alt", n_alt)
    return rows


__all__ = [
    "IMG_PATH_MARKER",
    "LICENSE_MARKER",
    "PageLink",
    "decide_link",
    "laion_clean_alt",
    "laion_finish_alt",
    "page_base_url",
    "page_rows",
]
