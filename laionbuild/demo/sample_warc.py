"""The embedded demo sample: small Common-Crawl-like WARC files plus their images.

:func:`build_demo_sample` writes two gzipped WARC files (``warcinfo``,
``request``, ``response`` and ``metadata`` records, as in Common Crawl) with
HTML pages in English, German, French, Spanish, Russian, Japanese and Chinese,
encoded in ``utf-8``, ``iso-8859-1``, ``windows-1251``, ``shift_jis`` and
``gb2312`` (declared in the HTTP ``Content-Type`` header, in ``<meta>`` or
both). The pages' ``<img>`` tags point at a loopback image host
(``image_base``, e.g. ``http://images.demo.test:48123``) with absolute,
root-relative, relative, ``<base href>``-relative and protocol-relative URLs.

Every ``<img>`` is described by a :class:`SampleExpectation`: which subset the
pair ends up in (``en`` / ``multi`` / ``nolang``) or why it is dropped:

``drop:candidate``
    removed by the candidate filters of the extraction stage (empty or short
    alt text, ``.svg`` / ``.gif``, ``data:`` / ``javascript:`` URLs, no
    ``src``, a page that opts out with ``<meta name=robots content=noai>``).
``drop:duplicate``
    the same (URL, TEXT) pair seen before, in the same WARC file (within-file
    de-duplication) or in the other one (global de-duplication).
``drop:fetch``
    the image side fails: HTTP 404, a text body served as ``.jpg``, or an
    ``X-Robots-Tag: noai`` answer.
``drop:clip``
    the alt text names another colour than the image shows, so its CLIP
    similarity falls below the subset's threshold.

The images are drawn with :mod:`laionbuild.demo.shapes` into ``image_dir``
(a file tree to serve at ``/``); answers that need a status code or header
(redirect, opt-out) are listed in :attr:`DemoSample.special_routes`, and
:meth:`DemoSample.register` installs everything on a
:class:`~laionbuild.demo.image_server.LoopbackServer`.

Command line (for scripts)::

    python -m laionbuild.demo.sample_warc OUT_DIR --image-base http://images.demo.test:48123
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from .shapes import ShapeSpec, caption, render

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_BASE = "http://images.demo.test:8765"
MANIFEST_NAME = "manifest.json"
SUBSET_KINDS = ("en", "multi", "nolang")
DROP_KINDS = ("drop:candidate", "drop:duplicate", "drop:fetch", "drop:clip")

#: the colour named by a mismatching caption (far from the image's colour)
_OTHER_COLOUR = {
    "red": "blue",
    "blue": "yellow",
    "yellow": "black",
    "black": "yellow",
    "green": "purple",
    "purple": "green",
}
_LANGUAGE = {"en": "en", "de": "de", "fr": "fr", "es": "es", "nolang": "und"}


# --------------------------------------------------------------------------- public types
@dataclass
class SampleExpectation:
    """What the pipeline must do with one ``<img>`` of the sample."""

    #: absolute image URL as resolved against the page (raw ``src`` when it has no scheme we fetch)
    url: str
    #: the alt text after charset decoding and entity unescaping
    alt_text: str
    #: ``en`` / ``multi`` / ``nolang`` (kept in that subset) or ``drop:<kind>``
    expected: str
    #: subset the pair is routed to by language id ("" when it never gets there)
    subset: str = ""
    #: expected ``LANGUAGE`` value (``und`` for nolang, "" when never routed)
    language: str = ""
    #: finer reason of a drop (``empty_alt``, ``http_404``, ``colour_mismatch``...)
    detail: str = ""
    page_url: str = ""
    #: file name of the WARC holding the page
    warc: str = ""
    #: what the image shows (``red circle``), "" when there is no image
    image: str = ""
    width: int = 0
    height: int = 0

    @property
    def kept(self) -> bool:
        return self.expected in SUBSET_KINDS


@dataclass
class DemoSample:
    warc_paths: list[str]
    #: folder to serve at URL path ``/`` of the image host (``image_dir/img/...``)
    image_dir: str
    #: image host name (map it to the loopback address with ``fetch.host_map``)
    host: str
    expectations: list[SampleExpectation]
    manifest_path: str
    image_base: str = DEFAULT_IMAGE_BASE
    port: int = 0
    #: URL path -> ``{"status", "content_type", "headers", "file"}`` or ``{"status", "location"}``
    special_routes: dict[str, dict[str, Any]] = field(default_factory=dict)

    # ------------------------------------------------------------------ summaries
    def counts(self) -> dict[str, int]:
        """Number of expectations per kind (``en``, ..., ``drop:clip``)."""
        c = Counter(e.expected for e in self.expectations)
        return {k: c.get(k, 0) for k in SUBSET_KINDS + DROP_KINDS}

    def kept(self, subset: str | None = None) -> list[SampleExpectation]:
        return [e for e in self.expectations if e.kept and (subset is None or e.expected == subset)]

    def config_overrides(self, address: str = "127.0.0.1") -> list[str]:
        """``--set`` overrides that let the fetch stage reach the loopback image host."""
        return [
            f"fetch.host_map={{{self.host}: '{address}'}}",
            f"fetch.allow_addresses=['{address}']",
        ]

    # ------------------------------------------------------------------ serving
    def register(self, server: Any) -> None:
        """Install the image tree and the special routes on a ``LoopbackServer``."""
        for path, route in self.special_routes.items():
            if "location" in route:
                server.add_redirect(path, route["location"], status=int(route.get("status", 302)))
            else:
                body = (Path(self.image_dir).parent / route["file"]).read_bytes()
                server.add(
                    path,
                    body,
                    content_type=route.get("content_type", "image/jpeg"),
                    status=int(route.get("status", 200)),
                    headers=dict(route.get("headers", {})),
                )
        server.add_file_tree("/", self.image_dir)

    # ------------------------------------------------------------------ manifest
    def to_dict(self) -> dict[str, Any]:
        return {
            "image_base": self.image_base,
            "host": self.host,
            "port": self.port,
            "warcs": [Path(p).name for p in self.warc_paths],
            "image_dir": Path(self.image_dir).name,
            "special_routes": self.special_routes,
            "counts": self.counts(),
            "expectations": [asdict(e) for e in self.expectations],
        }

    @classmethod
    def load(cls, manifest_path: str) -> "DemoSample":
        """Read a sample back from its ``manifest.json``."""
        mp = Path(manifest_path)
        data = json.loads(mp.read_text(encoding="utf-8"))
        return cls(
            warc_paths=[str(mp.parent / name) for name in data["warcs"]],
            image_dir=str(mp.parent / data["image_dir"]),
            host=data["host"],
            expectations=[SampleExpectation(**e) for e in data["expectations"]],
            manifest_path=str(mp),
            image_base=data["image_base"],
            port=int(data["port"]),
            special_routes=data["special_routes"],
        )


# --------------------------------------------------------------------------- page model
@dataclass
class _Img:
    """One ``<img>`` tag: its HTML attributes and what should become of it."""

    src: str | None  # attribute value as written in the page (None = no src attribute)
    alt: str | None  # decoded alt text (None = no alt attribute)
    expected: str
    subset: str = ""
    language: str = ""
    detail: str = ""
    # image file behind the URL (None = nothing is served there)
    spec: ShapeSpec | None = None
    size: tuple[int, int] = (0, 0)  # width, height
    fmt: str = "JPEG"
    file_path: str = ""  # URL path the image file is written to ("" = derive from the URL)
    raw_body: bytes | None = None  # a non-image body written at the URL's path


@dataclass
class _Page:
    url: str
    charset: str
    #: where the charset is declared: "header", "meta", "http-equiv" or "both"
    declare: str
    html_lang: str
    title: str
    paragraphs: list[str]
    images: list[_Img]
    head_extra: str = ""
    content_language: str = ""
    server: str = "nginx"


_FMT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_FMT_CTYPE = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


def _good(spec: ShapeSpec, lang: str, variant: int, url: str, size: tuple[int, int], fmt: str = "JPEG",
          **kw: Any) -> _Img:
    subset = "en" if lang == "en" else ("nolang" if lang == "nolang" else "multi")
    return _Img(src=url, alt=caption(spec, lang, variant), expected=subset, subset=subset,
                language=_LANGUAGE[lang], spec=spec, size=size, fmt=fmt, **kw)


def _mismatch(spec: ShapeSpec, lang: str, variant: int, url: str, size: tuple[int, int], fmt: str = "JPEG",
              **kw: Any) -> _Img:
    other = ShapeSpec(_OTHER_COLOUR[spec.colour], spec.shape)
    subset = "en" if lang == "en" else ("nolang" if lang == "nolang" else "multi")
    return _Img(src=url, alt=caption(other, lang, variant), expected="drop:clip", subset=subset,
                language=_LANGUAGE[lang], detail="colour_mismatch", spec=spec, size=size, fmt=fmt, **kw)


def _cand(src: str | None, alt: str | None, detail: str) -> _Img:
    return _Img(src=src, alt=alt, expected="drop:candidate", detail=detail)


def _pages(base: str) -> list[list[_Page]]:
    """The sample's pages, one list per WARC file; ``base`` is the image base URL."""
    host_port = urlsplit(base).netloc
    S = ShapeSpec
    warc1 = [
        _Page(
            url="http://www.example-shop.test/en/gallery.html",
            charset="utf-8", declare="header", html_lang="en",
            title="Shape Gallery – Example Shop",
            paragraphs=[
                "Welcome to our gallery of hand-drawn shapes. Every print is made on heavy white paper.",
                "Free shipping on orders over 30 dollars. Browse the new arrivals below.",
            ],
            images=[
                _good(S("red", "circle"), "en", 2, f"{base}/img/en/red-circle.jpg", (320, 240)),
                _good(S("blue", "square"), "en", 1, f"{base}/img/en/blue-square.png", (128, 128), "PNG"),
                _good(S("green", "triangle"), "en", 2, f"{base}/img/en/green-triangle.webp", (200, 300), "WEBP"),
                _good(S("purple", "circle"), "nolang", 1, f"{base}/img/misc/purple-dot.png", (96, 96), "PNG"),
                _mismatch(S("yellow", "circle"), "en", 1, f"{base}/img/en/yellow-circle.jpg", (256, 256)),
                _mismatch(S("purple", "square"), "en", 2, f"{base}/img/en/purple-square.jpg", (180, 120)),
                _cand(f"{base}/img/en/banner.jpg", "", "empty_alt"),
                _cand(f"{base}/img/en/logo.jpg", "logo", "short_alt"),
                _cand("/static/img/spinner.gif", "loading animation spinner", "excluded_extension"),
                _cand(f"{base}/img/icons/cart.svg", "shopping cart icon", "excluded_extension"),
                _cand(None, "a photo of a red square drawn on a sheet of white paper", "missing_src"),
                _cand("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==",
                      "a tiny transparent pixel used as a placeholder", "scheme"),
                _cand("javascript:void(0)", "open the zoom viewer for this print", "scheme"),
                # the first tag again, same URL and alt text
                _Img(src=f"{base}/img/en/red-circle.jpg", alt=caption(S("red", "circle"), "en", 2),
                     expected="drop:duplicate", detail="within_file"),
            ],
        ),
        _Page(
            url=f"{base}/pages/en/blog/colours-of-spring.html",
            charset="utf-8", declare="meta", html_lang="en-GB",
            title="The colours of spring — a drawing blog",
            paragraphs=[
                "This week I drew simple shapes with a thick brush and a few bright colours.",
                "Below are the results — some came out better than others ✏️.",
            ],
            images=[
                _good(S("black", "square"), "en", 0, "../../../img/en/black-square.png", (150, 150), "PNG"),
                _good(S("purple", "circle"), "en", 1, f"//{host_port}/img/en/purple-circle.jpg", (240, 320)),
                _good(S("yellow", "triangle"), "en", 2, "/img/en/yellow-triangle.webp", (300, 200), "WEBP"),
                _good(S("green", "circle"), "nolang", 1, "../../../img/misc/green-dot.jpg", (128, 128)),
                _good(S("blue", "triangle"), "nolang", 0, "/img/misc/blue-tri.png", (100, 100), "PNG"),
                _mismatch(S("red", "triangle"), "nolang", 1, "/img/misc/red-tri.jpg", (120, 120)),
                _mismatch(S("green", "square"), "en", 0, "/img/en/green-square.jpg", (200, 200)),
                _Img(src="/img/en/missing-photo.jpg", alt=caption(S("blue", "circle"), "en", 0),
                     expected="drop:fetch", subset="en", language="en", detail="http_404"),
                _Img(src="/img/en/not-really.jpg", alt=caption(S("black", "circle"), "en", 2),
                     expected="drop:fetch", subset="en", language="en", detail="not_an_image",
                     raw_body=b"<html><body>Sorry, this image has moved.</body></html>\n"),
            ],
        ),
        _Page(
            url="http://www.beispiel-laden.test/katalog/formen.html",
            charset="iso-8859-1", declare="header", html_lang="de", content_language="de",
            title="Formen und Farben – Katalog",
            paragraphs=[
                "Unsere Drucke werden auf schwerem, weißem Papier gefertigt. Größe und Farbe wählen Sie selbst.",
                "Lieferung innerhalb von drei Werktagen. Rückgabe kostenlos.",
            ],
            images=[
                _good(S("green", "circle"), "de", 0, f"{base}/img/de/gruener-kreis.jpg", (256, 256)),
                _good(S("red", "square"), "de", 1, f"{base}/img/de/rotes-quadrat.png", (200, 160), "PNG"),
                _good(S("blue", "triangle"), "de", 0, f"{base}/img/de/blaues-dreieck.jpg", (180, 270)),
                _mismatch(S("black", "circle"), "de", 1, f"{base}/img/de/schwarzer-kreis.jpg", (220, 220)),
                _Img(src=f"{base}/img/de/geschuetzt.jpg", alt=caption(S("red", "triangle"), "de", 1),
                     expected="drop:fetch", subset="multi", language="de", detail="opt_out",
                     spec=S("red", "triangle"), size=(160, 160), file_path="special/geschuetzt.jpg"),
            ],
        ),
        _Page(
            url=f"{base}/pages/de/angebote.html",
            charset="iso-8859-1", declare="http-equiv", html_lang="de",
            title="Angebote der Woche",
            paragraphs=["Nur diese Woche: alle gelben Motive zum halben Preis."],
            head_extra=f'<base href="{base}/img/de/">',
            images=[
                _good(S("yellow", "circle"), "de", 1, "gelber-kreis.jpg", (300, 300)),
                _mismatch(S("green", "triangle"), "de", 0, "gruenes-dreieck.webp", (200, 200), "WEBP"),
            ],
        ),
        _Page(
            url="http://www.primer-magazin.test/katalog/figury.html",
            charset="windows-1251", declare="header", html_lang="ru", content_language="ru",
            title="Каталог: геометрические фигуры",
            paragraphs=[
                "Мы печатаем простые фигуры на плотной белой бумаге. Доставка по всей стране.",
                "Цены указаны в рублях. Скидки постоянным покупателям.",
            ],
            images=[
                _good(S("black", "triangle"), "en", 1, f"{base}/img/ru/black-triangle.jpg", (210, 210)),
                # emoji are not in windows-1251: they travel as numeric character references
                _good(S("blue", "square"), "nolang", 1, f"{base}/img/ru/blue-square.jpg", (140, 140)),
                _mismatch(S("yellow", "square"), "nolang", 1, f"{base}/img/ru/yellow-square.png", (160, 120), "PNG"),
                _cand(f"{base}/img/ru/kot.jpg", "Кот", "short_alt"),
                _Img(src=f"{base}/img/ru/noai-print.jpg", alt=caption(S("green", "square"), "en", 2),
                     expected="drop:fetch", subset="en", language="en", detail="opt_out",
                     spec=S("green", "square"), size=(128, 128), file_path="special/noai-print.jpg"),
            ],
        ),
    ]
    warc2 = [
        _Page(
            url="http://www.exemple-boutique.test/produits/formes.html",
            charset="iso-8859-1", declare="meta", html_lang="fr",
            title="Nos formes géométriques – Boutique",
            paragraphs=[
                "Des impressions élégantes sur papier épais. Livraison offerte dès 30 euros.",
                "Découvrez aussi nos carrés et nos triangles colorés.",
            ],
            images=[
                _good(S("blue", "square"), "fr", 0, f"{base}/img/old/carre-bleu.jpg", (240, 240),
                      file_path="img/fr/carre-bleu.jpg", detail="redirect"),
                _good(S("red", "circle"), "fr", 1, f"{base}/img/fr/cercle-rouge.jpg", (200, 300)),
                _good(S("black", "triangle"), "fr", 0, f"{base}/img/fr/triangle-noir.png", (180, 180), "PNG"),
                _good(S("purple", "square"), "fr", 1, f"{base}/img/fr/carre-violet.webp", (256, 192), "WEBP"),
                _mismatch(S("yellow", "triangle"), "fr", 1, f"{base}/img/fr/triangle-jaune.jpg", (220, 220)),
                _cand(f"{base}/img/fr/promo.gif", "promotion du mois sur les cercles", "excluded_extension"),
                # the same pair as on the first WARC's gallery page
                _Img(src=f"{base}/img/en/red-circle.jpg", alt=caption(S("red", "circle"), "en", 2),
                     expected="drop:duplicate", subset="en", language="en", detail="global"),
            ],
        ),
        _Page(
            url=f"{base}/pages/es/tienda/formas.html",
            charset="utf-8", declare="both", html_lang="es", content_language="es",
            title="Tienda de formas – colores vivos",
            paragraphs=[
                "Láminas con formas sencillas, impresas en papel blanco de alta calidad.",
                "Envío gratuito a partir de 30 euros. ¡Aprovecha nuestras ofertas!",
            ],
            images=[
                _good(S("green", "square"), "es", 0, "../../../img/es/cuadrado-verde.jpg", (200, 200)),
                _good(S("yellow", "circle"), "es", 1, "../../../img/es/circulo-amarillo.png", (150, 225), "PNG"),
                _good(S("red", "triangle"), "es", 1, "/img/es/triangulo-rojo.jpg", (260, 260)),
                _good(S("black", "circle"), "nolang", 1, "/img/misc/black-dot.jpg", (90, 90)),
                _mismatch(S("blue", "circle"), "es", 0, "../../../img/es/circulo-azul.jpg", (200, 200)),
                _mismatch(S("purple", "triangle"), "es", 1, "/img/es/triangulo-morado.webp", (180, 240), "WEBP"),
                _cand("../../../img/es/icono.jpg", "   ", "empty_alt"),
            ],
        ),
        _Page(
            url="http://www.rei-shop.test/shouhin/zukei.html",
            charset="shift_jis", declare="header", html_lang="ja", content_language="ja",
            title="図形のポスター | ショップ",
            paragraphs=[
                "シンプルな図形のポスターを白い厚紙に印刷しています。",
                "全国送料無料。三営業日以内に発送します。",
            ],
            images=[
                _good(S("yellow", "square"), "en", 0, f"{base}/img/ja/yellow-square.jpg", (200, 200)),
                _good(S("red", "square"), "nolang", 1, f"{base}/img/ja/red-square.png", (120, 120), "PNG"),
                _mismatch(S("black", "square"), "nolang", 1, f"{base}/img/ja/black-square.jpg", (128, 128)),
                _cand(f"{base}/img/ja/akai-maru.jpg", "赤い丸", "short_alt"),
            ],
        ),
        _Page(
            url="http://www.shili-shangdian.test/chanpin/tuxing.html",
            charset="gb2312", declare="meta", html_lang="zh-CN",
            title="几何图形海报 - 示例商店",
            paragraphs=["我们在厚白纸上印刷简单的几何图形。全国包邮。"],
            images=[
                _good(S("purple", "triangle"), "en", 2, f"{base}/img/zh/purple-triangle.jpg", (230, 230)),
                _good(S("yellow", "triangle"), "nolang", 1, f"{base}/img/zh/yellow-triangle.png", (110, 110), "PNG"),
                _mismatch(S("blue", "circle"), "nolang", 1, f"{base}/img/zh/blue-circle.jpg", (140, 140)),
                _cand(f"{base}/img/zh/hongse.jpg", "红色圆形", "short_alt"),
            ],
        ),
        _Page(
            url="http://www.private-gallery.test/prints/index.html",
            charset="utf-8", declare="header", html_lang="en",
            title="Private prints – not for AI training",
            paragraphs=["These prints may not be used to train machine-learning models."],
            head_extra='<meta name="robots" content="noai, noimageai">',
            images=[
                _Img(src=f"{base}/img/en/private-blue.jpg", alt=caption(S("blue", "square"), "en", 0),
                     expected="drop:candidate", detail="meta_robots"),
                _Img(src=f"{base}/img/en/private-red.jpg", alt=caption(S("red", "triangle"), "en", 1),
                     expected="drop:candidate", detail="meta_robots"),
            ],
        ),
    ]
    return [warc1, warc2]


# --------------------------------------------------------------------------- HTML + WARC writing
def _attr(value: str) -> str:
    return value.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def _text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _page_html(page: _Page) -> bytes:
    head = ['<meta name="viewport" content="width=device-width, initial-scale=1">']
    if page.declare in ("meta", "both"):
        head.insert(0, f'<meta charset="{page.charset}">')
    elif page.declare == "http-equiv":
        head.insert(0, f'<meta http-equiv="Content-Type" content="text/html; charset={page.charset}">')
    if page.head_extra:
        head.append(page.head_extra)
    body = [f"<h1>{_text(page.title)}</h1>"]
    for i, para in enumerate(page.paragraphs):
        body.append(f"<p>{_text(para)}</p>")
        if i == 0:
            body.append('<nav><a href="/">Home</a> | <a href="/contact">Contact</a></nav>')
    body.append('<div class="products">')
    for n, img in enumerate(page.images):
        attrs = []
        if img.src is not None:
            attrs.append(f'src="{_attr(img.src)}"')
        if img.alt is not None:
            attrs.append(f'alt="{_attr(img.alt)}"')
        if img.size[0]:
            attrs.append(f'width="{img.size[0]}" height="{img.size[1]}"')
        attrs.append('loading="lazy"')
        body.append(f'  <figure class="item-{n}"><img {" ".join(attrs)}></figure>')
    body.append("</div>")
    body.append("<footer><p>&copy; 2024</p></footer>")
    html = (
        "<!DOCTYPE html>\n"
        f'<html lang="{page.html_lang}">\n<head>\n' + "\n".join(head)
        + f"\n<title>{_text(page.title)}</title>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )
    # characters the charset lacks (emoji, ...) become numeric character references, as browsers do
    return html.encode(page.charset, errors="xmlcharrefreplace")


class _Ids:
    """Deterministic record ids and timestamps (same seed, same bytes)."""

    def __init__(self, seed: int, warc_index: int):
        self._prefix = f"laionbuild-demo/{seed}/{warc_index}/"
        self._n = 0
        self.t0 = datetime(2024, 5, 18, 1, 0, 0, tzinfo=timezone.utc) + timedelta(hours=warc_index)

    def record_id(self) -> str:
        self._n += 1
        return f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, self._prefix + str(self._n))}>"

    def date(self, k: int) -> datetime:
        return self.t0 + timedelta(seconds=7 * k)


def _fmt_date(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def _http_date(dt: datetime) -> str:
    return dt.strftime("%a, %d %b %Y %H:%M:%S GMT")


def _write_warc(path: Path, pages: list[_Page], ids: _Ids, warc_index: int) -> None:
    filename = path.name
    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=True)
        info_id = ids.record_id()
        info = (
            "isPartOf: CC-MAIN-DEMO-2024-22\r\n"
            "publisher: laionbuild demo\r\n"
            "description: Tiny synthetic crawl in the Common Crawl layout (embedded demo)\r\n"
            "operator: laionbuild\r\n"
            "hostname: demo-crawler-0\r\n"
            "software: laionbuild sample_warc\r\n"
            "robots: checked via crawler-commons\r\n"
            "format: WARC File Format 1.1\r\n"
            "conformsTo: https://iipc.github.io/warc-specifications/specifications/warc-format/warc-1.1/\r\n"
        ).encode("utf-8")
        writer.write_record(writer.create_warc_record(
            "", "warcinfo", payload=io.BytesIO(info), length=len(info),
            warc_content_type="application/warc-fields",
            warc_headers_dict={"WARC-Type": "warcinfo", "WARC-Date": _fmt_date(ids.t0), "WARC-Record-ID": info_id,
                               "WARC-Filename": filename},
        ))
        for k, page in enumerate(pages):
            _write_page(writer, page, ids, info_id, k)
        if warc_index == 0:
            _write_non_html(writer, ids, info_id, len(pages))


def _write_exchange(writer: WARCWriter, url: str, ids: _Ids, info_id: str, k: int,
                    status: str, headers: list[tuple[str, str]], body: bytes,
                    payload_type: str, meta: list[tuple[str, str]]) -> None:
    parts = urlsplit(url)
    when = ids.date(k)
    date = _fmt_date(when)
    ip = f"198.51.100.{10 + k}"  # documentation range; provenance only, never contacted
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    req = (
        f"GET {target} HTTP/1.1\r\n"
        "User-Agent: CCBot/2.0 (https://commoncrawl.org/faq/)\r\n"
        "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
        "Accept-Language: en-US,en;q=0.5\r\n"
        "Accept-Encoding: br,gzip\r\n"
        f"Host: {parts.netloc}\r\n"
        "Connection: Keep-Alive\r\n\r\n"
    ).encode("ascii")
    req_id = ids.record_id()
    writer.write_record(writer.create_warc_record(
        url, "request", payload=io.BytesIO(req), length=len(req),
        warc_content_type="application/http; msgtype=request",
        warc_headers_dict={"WARC-Type": "request", "WARC-Date": date, "WARC-Record-ID": req_id,
                           "WARC-Warcinfo-ID": info_id, "WARC-IP-Address": ip, "WARC-Target-URI": url},
    ))
    resp_id = ids.record_id()
    http_headers = StatusAndHeaders(status, headers + [("Content-Length", str(len(body)))],
                                    protocol="HTTP/1.1")
    writer.write_record(writer.create_warc_record(
        url, "response", payload=io.BytesIO(body), length=len(body),
        warc_content_type="application/http; msgtype=response",
        http_headers=http_headers,
        warc_headers_dict={"WARC-Type": "response", "WARC-Date": date, "WARC-Record-ID": resp_id,
                           "WARC-Warcinfo-ID": info_id, "WARC-Concurrent-To": req_id, "WARC-IP-Address": ip,
                           "WARC-Target-URI": url, "WARC-Identified-Payload-Type": payload_type},
    ))
    fields = "".join(f"{k_}: {v}\r\n" for k_, v in meta).encode("utf-8")
    writer.write_record(writer.create_warc_record(
        url, "metadata", payload=io.BytesIO(fields), length=len(fields),
        warc_content_type="application/warc-fields",
        warc_headers_dict={"WARC-Type": "metadata", "WARC-Date": date, "WARC-Record-ID": ids.record_id(),
                           "WARC-Warcinfo-ID": info_id, "WARC-Concurrent-To": resp_id, "WARC-Target-URI": url},
    ))


def _write_page(writer: WARCWriter, page: _Page, ids: _Ids, info_id: str, k: int) -> None:
    body = _page_html(page)
    ctype = "text/html"
    if page.declare in ("header", "both"):
        ctype += f"; charset={page.charset.upper() if page.charset != 'utf-8' else 'UTF-8'}"
    when = ids.date(k)
    headers = [
        ("Date", _http_date(when)),
        ("Server", page.server),
        ("Content-Type", ctype),
        ("X-Crawler-Content-Encoding", "gzip"),
        ("Cache-Control", "max-age=600"),
        ("Vary", "Accept-Encoding"),
    ]
    if page.content_language:
        headers.append(("Content-Language", page.content_language))
    cld2 = json.dumps({"reliable": True, "text-bytes": len(body),
                       "languages": [{"code": page.html_lang.split("-")[0].lower(), "text-covered": 0.9}]})
    meta = [("fetchTimeMs", str(120 + 17 * k)), ("charset-detected", page.charset.upper()),
            ("languages-cld2", cld2)]
    _write_exchange(writer, page.url, ids, info_id, k, "200 OK", headers, body, "text/html", meta)


def _write_non_html(writer: WARCWriter, ids: _Ids, info_id: str, k: int) -> None:
    """A PDF response, as main Common Crawl WARCs carry some: no candidates come from it."""
    body = (
        b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
        b"2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\n"
        b"trailer << /Root 1 0 R >>\n%%EOF\n"
    )
    headers = [("Date", _http_date(ids.date(k))), ("Server", "Apache"), ("Content-Type", "application/pdf")]
    _write_exchange(writer, "http://www.example-shop.test/catalogue.pdf", ids, info_id, k, "200 OK",
                    headers, body, "application/pdf", [("fetchTimeMs", "80")])


# --------------------------------------------------------------------------- images
def _encode(img_spec: ShapeSpec, size: tuple[int, int], fmt: str, seed: int) -> bytes:
    w, h = size
    im = render(img_spec, size=h, seed=seed, width=w)
    buf = io.BytesIO()
    if fmt == "JPEG":
        im.save(buf, "JPEG", quality=85)
    elif fmt == "WEBP":
        im.save(buf, "WEBP", quality=80)
    else:
        im.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _stable_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "big")


# --------------------------------------------------------------------------- entry points
def build_demo_sample(out_dir: str, *, image_base: str = DEFAULT_IMAGE_BASE, seed: int = 0) -> DemoSample:
    """Write the demo WARCs, images and ``manifest.json`` below ``out_dir``.

    ``image_base`` is the scheme, host and port every image URL of the pages
    points at (choose the port after starting the image server). Returns the
    :class:`DemoSample` describing the files and what the pipeline must keep.
    """
    image_base = image_base.rstrip("/")
    parts = urlsplit(image_base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"image_base must look like http://host:port, got {image_base!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_dir = out / "images"
    image_dir.mkdir(exist_ok=True)
    base_path = urlsplit(image_base).path  # normally ""

    expectations: list[SampleExpectation] = []
    special: dict[str, dict[str, Any]] = {}
    warc_paths: list[str] = []
    for w, pages in enumerate(_pages(image_base)):
        warc_name = f"CC-MAIN-DEMO-{seed:05d}-{w:05d}.warc.gz"
        for page in pages:
            base_href = page.url
            if "<base href=" in page.head_extra:
                base_href = page.head_extra.split('"')[1]
            for img in page.images:
                url = _resolve(base_href, img.src)
                if img.spec is not None:
                    url_path = urlsplit(url).path[len(base_path):]
                    if img.file_path.startswith("special/"):
                        target = out / img.file_path
                        special[url_path] = {
                            "status": 200, "content_type": _FMT_CTYPE[img.fmt],
                            "headers": {"X-Robots-Tag": "noai"}, "file": img.file_path,
                        }
                    elif img.file_path:
                        target = image_dir / img.file_path
                        special[url_path] = {"status": 301, "location": "/" + img.file_path}
                    else:
                        target = image_dir / url_path.lstrip("/")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if not target.exists():
                        target.write_bytes(_encode(img.spec, img.size, img.fmt, _stable_seed(seed, url_path)))
                elif img.raw_body is not None:
                    target = image_dir / urlsplit(url).path[len(base_path):].lstrip("/")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(img.raw_body)
                expectations.append(SampleExpectation(
                    url=url,
                    alt_text=(img.alt or "").strip(),
                    expected=img.expected,
                    subset=img.subset,
                    language=img.language,
                    detail=img.detail,
                    page_url=page.url,
                    warc=warc_name,
                    image=f"{img.spec.colour} {img.spec.shape}" if img.spec else "",
                    width=img.size[0] if img.spec else 0,
                    height=img.size[1] if img.spec else 0,
                ))
        path = out / warc_name
        _write_warc(path, pages, _Ids(seed, w), w)
        warc_paths.append(str(path))

    # a duplicate shows the same image as the pair it repeats
    originals = {(e.url, e.alt_text): e for e in expectations if e.kept}
    for e in expectations:
        first = originals.get((e.url, e.alt_text))
        if e.expected == "drop:duplicate" and first is not None:
            e.image, e.width, e.height = first.image, first.width, first.height

    sample = DemoSample(
        warc_paths=warc_paths,
        image_dir=str(image_dir),
        host=parts.hostname,
        expectations=expectations,
        manifest_path=str(out / MANIFEST_NAME),
        image_base=image_base,
        port=parts.port or (443 if parts.scheme == "https" else 80),
        special_routes=special,
    )
    Path(sample.manifest_path).write_text(
        json.dumps(sample.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    logger.info("demo sample: %d WARC files, %d expectations in %s", len(warc_paths), len(expectations), out)
    return sample


def _resolve(page_url: str, src: str | None) -> str:
    if src is None:
        return ""
    src = src.strip()
    scheme = src.split(":", 1)[0].lower() if ":" in src.split("/", 1)[0] else ""
    if scheme and scheme not in ("http", "https"):
        return src
    return urljoin(page_url, src)




def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m laionbuild.demo.sample_warc",
        description="Write the embedded demo sample (WARC files, images, manifest.json).",
    )
    parser.add_argument("out_dir", help="folder to write into")
    parser.add_argument("--image-base", default=DEFAULT_IMAGE_BASE,
                        help="scheme://host:port every image URL points at (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sample = build_demo_sample(args.out_dir, image_base=args.image_base, seed=args.seed)
    print(json.dumps({
        "manifest": sample.manifest_path,
        "warcs": sample.warc_paths,
        "image_dir": sample.image_dir,
        "host": sample.host,
        "port": sample.port,
        "counts": sample.counts(),
        "config_overrides": sample.config_overrides(),
    }, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
