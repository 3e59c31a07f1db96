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

_SKIPPED = re.compile(
    r"<!--.*?(?:-->|\Z)|<(script|style)\b(?:[^>\"']|\"[^\"]*\"|'[^']*')*>.*?(?:</\1\s*>|\Z)",
    re.IGNORECASE | re.DOTALL,
)
_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9:-]*)((?:[^>\"']|\"[^\"]*\"|'[^']*')*)>")
_ATTRIBUTE = re.compile(r"""([^\s"'=<>/]+)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]+)))?""")


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


def page_links(text: str) -> tuple[list[PageLink], bool]:
    """The links of a page's decoded HTML in WAT order, and whether one is an ``<img>`` link."""
    links: list[PageLink] = []
    has_img = False
    open_anchors: list[PageLink | None] = []
    pos = 0
    for skipped in _SKIPPED.finditer(text):
        has_img |= _scan(text[pos:skipped.start()], links, open_anchors)
        pos = skipped.end()
    has_img |= _scan(text[pos:], links, open_anchors)
    return links, has_img


def _scan(text: str, links: list[PageLink], open_anchors: list[PageLink | None]) -> bool:
    has_img = False
    for m in _TAG.finditer(text):
        closing, name, rest = m.group(1), m.group(2).lower(), m.group(3)
        if closing:
            if name == "a" and open_anchors:
                anchor = open_anchors.pop()
                if anchor is not None:
                    links.append(anchor)
            continue
        if "=" not in rest and name not in ("a",):
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
    return has_img


__all__ = ["page_links"]
