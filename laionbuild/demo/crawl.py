"""A synthetic crawl of any size: many WARC files of pages with images, some pages re-crawled.

Used by the resume tests and ``scripts/bench_pipeline.py``. Every page is an
English HTML page with ``images_per_page`` ``<img>`` tags whose alt text names
the coloured shape drawn in the image (every fifth names another colour, so the
CLIP stage has something to drop). A fraction of each file's pages are copies of
pages of earlier files (same URL, same images, same alt texts), as Common Crawl
re-crawls pages across snapshots. Image URLs are unique per (page, position);
the bytes behind them repeat (one JPEG per shape), which keeps generation fast.
"""

from __future__ import annotations

import io
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from warcio.warcwriter import WARCWriter

from .shapes import ShapeSpec, all_specs, caption, render

_OTHER = {"red": "blue", "blue": "red", "green": "purple", "purple": "green", "yellow": "black", "black": "yellow"}


@dataclass
class SyntheticCrawl:
    warc_paths: list[str]
    #: image URL path -> JPEG bytes
    images: dict[str, bytes]
    #: every distinct (image URL, alt text) of the crawl
    pairs: set[tuple[str, str]] = field(default_factory=set)
    host: str = "images.crawl.test"

    def config_overrides(self, address: str = "127.0.0.1") -> list[str]:
        return [f"fetch.host_map={{{self.host}: '{address}'}}", f"fetch.allow_addresses=['{address}']"]

    def register(self, server: Any, delay_s: float = 0.0) -> None:
        for path, data in self.images.items():
            server.add(path, data, content_type="image/jpeg", delay_s=delay_s)


def _jpeg(spec: ShapeSpec, side: int, seed: int) -> bytes:
    buf = io.BytesIO()
    render(spec, size=side, seed=seed).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _page(page_id: int, images_per_page: int, image_base: str, specs: list[ShapeSpec]) -> tuple[str, list]:
    imgs = []
    for k in range(images_per_page):
        spec = specs[(page_id * 7 + k) % len(specs)]
        alt_spec = ShapeSpec(_OTHER[spec.colour], spec.shape) if (page_id + k) % 5 == 0 else spec
        url = f"{image_base}/img/p{page_id:06d}-{k:02d}.jpg"
        imgs.append((url, caption(alt_spec, "en", (page_id + k) % 3), spec))
    return f"http://site{page_id % 97}.crawl.test/page/{page_id}.html", imgs


def _html(page_url: str, imgs: list) -> bytes:
    body = "".join(f'<p>Item {i}</p><img src="{u}" alt="{a}" width="64" height="64">\n'
                   for i, (u, a, _) in enumerate(imgs))
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{page_url}</title></head>"
            f"<body><h1>Shapes</h1>{body}</body></html>").encode("utf-8")


def _write(path: Path, pages: list[tuple[str, list]], seed: int) -> None:
    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=True)
        for n, (page_url, imgs) in enumerate(pages):
            html = _html(page_url, imgs)
            http = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
                    + f"Content-Length: {len(html)}\r\n\r\n".encode() + html)
            rid = f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{seed}/{path.name}/{n}')}>"
            writer.write_record(writer.create_warc_record(
                page_url, "response", payload=io.BytesIO(http), length=len(http),
                warc_headers_dict={"WARC-Record-ID": rid, "WARC-Date": "2024-05-18T01:00:00Z",
                                   "Content-Type": "application/http; msgtype=response"}))


def build_crawl(out_dir: str, *, n_files: int, pages_per_file: int = 12, images_per_page: int = 10,
                recrawl_fraction: float = 0.3, image_base: str = "http://images.crawl.test", seed: int = 0,
                first_file: int = 0, image_side: int = 64) -> SyntheticCrawl:
    """Write ``n_files`` WARCs named ``crawl-<first_file + i>.warc.gz`` below ``out_dir``.

    Page ids continue from ``first_file`` (pages of files built by another call with a
    lower ``first_file`` can be re-crawled), so a crawl can grow by later calls.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed * 1_000_003 + first_file)
    specs = all_specs()
    jpegs = {s: _jpeg(s, image_side, i) for i, s in enumerate(specs)}
    image_base = image_base.rstrip("/")
    crawl = SyntheticCrawl([], {}, host=image_base.split("://", 1)[1].split(":")[0].split("/")[0])
    fresh = max(1, pages_per_file - int(round(recrawl_fraction * pages_per_file)))
    for f in range(first_file, first_file + n_files):
        ids = [f * pages_per_file + j for j in range(fresh)]
        earlier = f * pages_per_file
        while len(ids) < pages_per_file and earlier:
            ids.append(rng.randrange(earlier))  # a page of an earlier file, crawled again
        while len(ids) < pages_per_file:
            ids.append(f * pages_per_file + len(ids))
        pages = [_page(pid, images_per_page, image_base, specs) for pid in ids]
        for _, imgs in pages:
            for url, alt, spec in imgs:
                crawl.pairs.add((url, alt))
                crawl.images["/" + url.split("/", 3)[3]] = jpegs[spec]
        path = out / f"crawl-{f:05d}.warc.gz"
        _write(path, pages, seed)
        crawl.warc_paths.append(str(path))
    return crawl
