"""Compare ``extract.link_rules: laion`` with LAION-5B's libraries on the link table.

LAION-5B's ``parse_wat`` ran Django's ``URLValidator`` and ftfy's ``fix_text``.
This script runs those steps with the real libraries in a second Python process
(``--reference-path`` names a folder where Django 3.2 and ftfy 6.0 are installed,
e.g. ``pip install --target /tmp/ref "django==3.2.*" "ftfy==6.0.3"``) and prints,
as JSON, how many links of ``tests/laion_link_table.py`` (and of links taken from
the sample WARC files with ``--warc``, and ``--fuzz N`` links generated from
tricky pieces) get the same decision from
:func:`laionbuild.stages.laion_links.decide_link`, listing the differences.

``--emit`` prints the reference decisions (run under the reference path).
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import subprocess
import sys
from pathlib import Path
from urllib.parse import urljoin, urlparse

REPO = Path(__file__).resolve().parents[1]
MARKERS = (".svg", ".gif", "data:image", "javascript:")
MAX_URL = 2000
MAX_HOST = 60
MIN_ALT = 5
MAX_ALT = 2000


def reference_decision(url: str, alt: str, page: str):
    """LAION's steps, with Django and ftfy as installed in this process."""
    import ftfy
    from django.conf import settings

    if not settings.configured:
        settings.configure()
    from django.core.exceptions import ValidationError
    from django.core.validators import URLValidator

    url = url[:MAX_URL].replace("\n", "")
    try:
        URLValidator()(url)
    except ValidationError:
        return "invalid_url"
    except Exception:  # noqa: BLE001 - LAION's caller treated any error as invalid
        return "invalid_url"
    if any(x in url for x in MARKERS):
        return "excluded_substring"
    try:
        host = urlparse(url).hostname
    except Exception:  # noqa: BLE001
        return "invalid_url"
    if not host:
        return "invalid_url"
    if len(host) > MAX_HOST:
        return "host_too_long"
    try:
        text = ftfy.fix_text(alt.replace("\n", " ")).strip()
        text = "".join(c for c in text if c.isprintable())
    except Exception:  # noqa: BLE001
        text = ""
    if len(text) < MIN_ALT:
        return "alt_too_short"
    text = text[:MAX_ALT].replace("\t", " ").replace("\n", " ").replace("|", " ")
    if not url.startswith("http"):
        url = urljoin(posixpath.dirname(page), url)
    return [url, text]


def table_links() -> list[tuple[str, str, str]]:
    sys.path.insert(0, str(REPO / "tests"))
    import laion_link_table as t

    links = [(u, t.ALT, t.PAGE) for u, _ in t.URL_CASES] + [(t.IMG, a, t.PAGE) for a, _ in t.ALT_CASES]
    return links


_SCHEMES = ["http", "https", "HTTP", "Https", "ftp", "ftps", "file", "mailto", "", "//", "javascript"]
_HOSTS = ["example.com", "Example.COM", "b\u00fccher.de", "xn--bcher-kva.de", "exa_mple.com", "-bad.com", "bad-.com",
          "example", "localhost", "1.2.3.4", "256.1.1.1", "01.2.3.4", "[::1]", "[2001:db8::1]", "[::g]",
          "a.b.c.example.museum", "example.c", "example.123", "\u4f8b\u3048.\u30c6\u30b9\u30c8", "exa mple.com",
          "user:pw@example.com", "us er@example.com", "\uff25\uff38.com", "a..com", "example.com.", "e.xn--p1ai",
          "a" * 61 + ".com", "a" * 64 + ".com", "x.y-z.co.uk"]
_PORTS = ["", ":80", ":8", ":8080", ":123456", ":abc", ":", ":\uff18\uff10"]
_PATHS = ["", "/", "/a.jpg", "/a b.jpg", "/\u00e9t\u00e9.jpg", "/a.svg", "/a.SVG", "/img.php?f=x.gif", "/a%20b.jpg",
          "/a.jpg#frag", "/a.jpg?", "/a.jpg?x=1&amp;y=2", "/data:image/x", "/a\tb", "/a\nb", "/a\rb",
          "/a\u3000b", "/a\\b", "?q=javascript:1", "/creativecommons.org/licenses/by/x.jpg", "/" + "p" * 2100]
_ALT_PIECES = ["a caption", "  ", "&amp;", "&#8217;", "&lt;b&gt;", "<", "\u2018q\u2019", "\u201cq\u201d", "\u201e",
               "\u0132", "\u01c4", "\ufb01", "\ufffc", "\x1b[31m", "\r", "\n", "\r\n", "\t", "|", "\u200b",
               "\u200d", "\uff46\uff55\uff4c\uff4c", "caf\u00c3\u00a9", "\u00a0", "\u3000", "\x85", "\x00",
               "\u00ad", "\u202e", "\U0001f600", "e\u0301", "\u212b", "\uff8a\uff9d", "&nbsp;", "&quot;",
               "\u0645\u0631\u062d\u0628\u0627", "x", "ab", "Photo", "\u2028", "x" * 1998]


def fuzz_links(n: int, seed: int) -> list[tuple[str, str, str]]:
    """``n`` links built from the pieces above (each URL with a plain alt, each alt with a plain URL,
    and mixed ones)."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        scheme = rng.choice(_SCHEMES)
        lead = rng.choice(["", "", "", " ", "\t"])
        sep = "" if scheme in ("", "//") else ("://" if scheme not in ("mailto", "javascript") else ":")
        url = lead + scheme + sep + rng.choice(_HOSTS) + rng.choice(_PORTS) + rng.choice(_PATHS)
        alt = "".join(rng.choice(_ALT_PIECES) for _ in range(rng.randint(1, 5)))
        if i % 3 == 0:
            url = "http://example.com/p.jpg"
        elif i % 3 == 1:
            alt = "a plain caption"
        out.append((url, alt, "http://example.com/dir/page.html"))
    return out


def warc_links(paths: list[str]) -> list[tuple[str, str, str]]:
    from laionbuild.config import ExtractConfig
    from laionbuild.stages.candidates import decode_html
    from laionbuild.stages.wat_links import page_links
    from laionbuild.stages.warc import iter_html_documents
    from laionbuild.stats import FileResult, StageCounters

    out = []
    for path in paths:
        for doc in iter_html_documents(path, ExtractConfig(), StageCounters(), FileResult(path=path)):
            links, _ = page_links(decode_html(doc.html, doc.http_charset))
            out.extend((link.url, link.alt, doc.page_url) for link in links if link.alt is not None)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference-path", default="", help="folder holding Django 3.2 and ftfy 6.0")
    ap.add_argument("--warc", nargs="*", default=[], help="also links of these WARC files")
    ap.add_argument("--fuzz", type=int, default=0, help="also this many generated links (seeded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--emit", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.emit:
        links = json.load(sys.stdin)
        json.dump([reference_decision(u, a, p) for u, a, p in links], sys.stdout)
        return 0
    links = table_links() + warc_links(args.warc) + fuzz_links(args.fuzz, args.seed)
    env = dict(os.environ, PYTHONPATH=args.reference_path)
    proc = subprocess.run(
        [sys.executable, __file__, "--emit"],
        input=json.dumps(links), capture_output=True, text=True, env=env, check=True,
    )
    expected = json.loads(proc.stdout)

    import ftfy

    from laionbuild.config import load_config
    from laionbuild.stages.laion_links import decide_link

    cfg = load_config(REPO / "configs" / "laion5b.yaml").extract
    differ = []
    for (url, alt, page), want in zip(links, expected):
        got = decide_link(url, alt, posixpath.dirname(page), cfg)
        got = list(got) if isinstance(got, tuple) else got
        if got != want:
            differ.append({"url": url, "alt": alt, "reference": want, "ours": got})
    print(json.dumps({"links": len(links), "same": len(links) - len(differ), "ftfy_here": ftfy.__version__,
                      "differences": differ}, ensure_ascii=True, indent=1))
    return 0 if not differ else 1


if __name__ == "__main__":
    sys.exit(main())
