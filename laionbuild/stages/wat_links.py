"""A page's links as Common Crawl's WAT generator records them, from the page's HTML.

LAION-5B read the ``Links`` of Common Crawl's WAT files. Their generator
(webarchive-commons' ``ExtractingParseObserver`` of 2019-2021, on the
``htmlparser`` lexer) walks the tags of a page as they come, without building
a document tree, and records attribute values **as written** (HTML entities
not decoded, line breaks kept):

* ``<img>``: ``src`` with its ``alt`` (and ``title``), then ``longdesc``;
* ``<a>``: ``href`` with its ``alt`` (and ``target``, ``title``...), recorded when
  the matching ``</a>`` comes (so after the links inside it); an ``<a>`` never
  closed is never recorded; ``<a .../>`` is recorded at once;
* ``<area href>``, ``<iframe src>``, ``<frame src>``, ``<embed src>``,
  ``<source src>``, ``<audio src>``, ``<track src>``, ``<video src poster>``,
  ``<input src formaction>``, ``<form action>``, ``<button formaction>``,
  ``<q|blockquote|del|ins cite>``, ``<applet codebase>``, ``<object data>``
  and the ``background`` / ``data-href`` / ``data-uri`` attributes of any
  element: URL-only entries (they matter for the licence rule).

:func:`page_links` does the same on the decoded text of a page: comments and
the content of ``<script>`` / ``<style>`` are skipped, tags are read with a
lenient attribute syntax (double-, single- or un-quoted values; the first of
repeated attributes counts). Used by ``extract.link_rules: laion`` on WARC
input, so that WARC and WAT of the same page give the same links.
"""

from __future__ import annotations

import re

from .laion_links import PageLink

#: element -> URL attributes recorded, in order
URL_ATTRIBUTES = {
    "img": ("src", "longdesc"),
    "area": ("href",),
    "iframe": ("src",),
    "frame": ("src",),
    "embed": ("src",),
    "source": ("src",),
    "audio": ("src",),
    "track": ("src",),
    "video": ("src", "poster"),
    "input": ("src", "formaction"),
    "form": ("action",),
    "button": ("formaction",),
    "q": ("cite",),
    "blockquote": ("cite",),
    "del": ("cite",),
    "ins": ("cite",),
    "applet": ("codebase",),
    "object": ("codebase", "data"),
}
#: attributes of any element recorded as links
GLOBAL_URL_ATTRIBUTES = ("background", "data-href", "data-uri")
#: (element, attribute) whose entry carries the element's ``alt``
ALT_LINKS = frozenset((("img", "src"),))

_TAG_NAME = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9:-]*)")
_TAG_SPECIAL = re.compile(r"[>\"']")
_ATTRIBUTE = re.compile(r"""([^\s"'=<>/]+)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]+)))?""")
_RAW_TEXT_END = {name: re.compile(rf"</{name}\s*>", re.IGNORECASE) for name in ("script", "style")}
_COMMENT_START, _COMMENT_END = "<!--", "-->"
_GLOBAL_HINT = re.compile("|".join(GLOBAL_URL_ATTRIBUTES), re.IGNORECASE)


def _attributes(text: str) -> dict[str, str | None]:
    attrs: dict[str, str | None] = {}
    for m in _ATTRIBUTE.finditer(text):
        name = m.group(1).lower()
        if name in attrs:
            continue
        if m.group(2) is not None:
            attrs[name] = m.group(2)
        elif m.group(3) is not None:
            attrs[name] = m.group(3)
        else:
            attrs[name] = m.group(4)
    return attrs


def _tag_end(text: str, pos: int) -> int:
    """Index of the ``>`` that ends the tag whose attributes start at ``pos`` (quotes respected; an
    unclosed quote does not count), or -1 when the text ends first. Each character is read once."""
    while True:
        m = _TAG_SPECIAL.search(text, pos)
        if m is None:
            return -1
        if m.group() == ">":
            return m.start()
        close = text.find(m.group(), m.start() + 1)
        if close < 0:
            return text.find(">", m.start() + 1)
        pos = close + 1


def iter_tags(text: str):
    """``(closing, name, attribute text)`` of every tag of a page, in order; comments and the
    content of ``<script>`` / ``<style>`` skipped. Linear in the length of the text."""
    pos = 0
    size = len(text)
    while pos < size:
        lt = text.find("<", pos)
        if lt < 0:
            return
        if text.startswith(_COMMENT_START, lt):
            end = text.find(_COMMENT_END, lt + len(_COMMENT_START))
            if end < 0:
                return
            pos = end + len(_COMMENT_END)
            continue
        m = _TAG_NAME.match(text, lt)
        if m is None:
            pos = lt + 1
            continue
        gt = _tag_end(text, m.end())
        if gt < 0:
            return
        closing, name = bool(m.group(1)), m.group(2).lower()
        yield closing, name, text[m.end():gt]
        pos = gt + 1
        if not closing and name in _RAW_TEXT_END:
            end = _RAW_TEXT_END[name].search(text, pos)
            if end is None:
                return
            pos = end.end()


def page_links(text: str) -> tuple[list[PageLink], bool]:
    """The links of a page's decoded HTML in WAT order, and whether one is an ``<img>`` link."""
    links: list[PageLink] = []
    has_img = False
    open_anchors: list[PageLink | None] = []
    for closing, name, rest in iter_tags(text):
        if closing:
            if name == "a" and open_anchors:
                anchor = open_anchors.pop()
                if anchor is not None:
                    links.append(anchor)
            continue
        if name != "a" and (
            "=" not in rest or (name not in URL_ATTRIBUTES and _GLOBAL_HINT.search(rest) is None)
        ):
            continue
        attrs = _attributes(rest)
        for attr in GLOBAL_URL_ATTRIBUTES:
            value = attrs.get(attr)
            if value is not None:
                links.append(PageLink(value, None, f"{name.upper()}@/{attr}"))
        if name == "a":
            href = attrs.get("href")
            anchor = PageLink(href, attrs.get("alt"), "A@/href") if href is not None else None
            if rest.rstrip().endswith("/"):
                if anchor is not None:
                    links.append(anchor)
            else:
                open_anchors.append(anchor)
            continue
        for attr in URL_ATTRIBUTES.get(name, ()):
            value = attrs.get(attr)
            if value is None:
                continue
            if name == "img":
                has_img = True
            alt = attrs.get("alt") if (name, attr) in ALT_LINKS else None
            links.append(PageLink(value, alt, f"{name.upper()}@/{attr}"))
    return links, has_img


__all__ = ["iter_tags", "page_links"]
