"""Large decodes share a per-worker pixel budget, so that many huge images at once cannot exhaust
a fetch worker's memory (a PNG of 81 MP is about 250 KB on the wire and 240 MB decoded)."""

from __future__ import annotations

import io
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from helpers.images import png_file
from laionbuild import schema as S
from laionbuild.config import FetchConfig, ResizeConfig
from laionbuild.demo.image_server import LoopbackServer
from laionbuild.stages.fetch import ImageFetcher
from laionbuild.stages.resize import BUDGET_THRESHOLD_PIXELS, PixelBudget, _decoded_pixels

HOST = "127.0.0.1"


def flat_png(width: int, height: int) -> bytes:
    """A grey RGB PNG written row by row (a few hundred KB however large)."""
    z = zlib.compressobj(9)
    row = b"\0" + b"\x80" * (width * 3)
    return png_file(width, height, b"".join(z.compress(row) for _ in range(height)) + z.flush())


def _fetch_copies(body: bytes, n: int, budget_pixels: int):
    """``n`` copies of a PNG fetched on ``n`` download threads with a decode budget; the fetch's
    output and its budget."""
    with LoopbackServer(HOST) as server:
        for i in range(n):
            server.add(f"/img{i}.png", body, content_type="image/png")
        cfg = FetchConfig(allow_addresses=(f"{HOST}/32",), threads=n, per_host_concurrency=n, retries=0,
                          timeout_s=30.0, decode_budget_pixels=budget_pixels)
        with ImageFetcher(cfg, ResizeConfig()) as fetcher:
            urls = np.array([f"{server.base_url}/img{i}.png" for i in range(n)], dtype=object)
            out = fetcher({S.URL: urls, S.DROP_REASON: np.full(n, "", dtype=object)})
            return out, fetcher.pixel_budget


def test_budget_bounds_the_pixels_held_at_once():
    budget = PixelBudget(100)
    budget.threshold = 10
    held, peak, lock = [0], [0], threading.Lock()

    def decode(pixels: int) -> None:
        counted = min(pixels, 100) if pixels > budget.threshold else 0  # an image larger than it all: alone
        with budget.reserve(pixels):
            with lock:
                held[0] += counted
                peak[0] = max(peak[0], held[0])
            time.sleep(0.02)
            with lock:
                held[0] -= counted

    sizes = [60, 60, 60, 30, 30, 500, 5, 5, 5]  # 500: more than the whole budget, runs alone
    threads = [threading.Thread(target=decode, args=(n,)) for n in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert budget.used == 0 and budget.waits >= 3
    # images above the threshold never overlap beyond the budget (the small ones do not wait)
    assert budget.peak == 100 and peak[0] <= 100


@pytest.mark.parametrize("w, h", [(4000, 3000), (3000, 4000), (16000, 1000), (6000, 300), (1000, 1000)])
def test_jpeg_reservation_covers_the_reduced_decode(w, h):
    """The pixels reserved for a JPEG decoded at reduced size are at least what libjpeg produces."""
    data = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(data, "JPEG", quality=50)
    img = Image.open(io.BytesIO(data.getvalue()))
    short = min(w, h)
    target = (224, int(224 * h / w)) if w <= h else (int(224 * w / h), 224)
    img.draft("RGB", target)
    got = img.size[0] * img.size[1]
    reserved = _decoded_pixels(w, h, "JPEG", ResizeConfig())
    assert reserved >= got and reserved <= 4 * got, (img.size, reserved, short)
    assert _decoded_pixels(w, h, "PNG", ResizeConfig()) == w * h


def test_an_image_with_transparency_reserves_what_its_composite_holds():
    """A palette PNG with a transparent colour is a few KB however large, and our path makes an RGBA
    copy, a white background and their composite of it: four 4 MP of them on four threads with a
    budget of 30 MP are decoded one at a time (each counts 20 MP), every image scored."""
    side, n = 2000, 4
    buf = io.BytesIO()
    img = Image.new("P", (side, side), 1)
    img.putpalette([255, 255, 255, 200, 30, 30] + [0] * 762)
    img.save(buf, "PNG", transparency=0)
    body = buf.getvalue()
    assert side * side < BUDGET_THRESHOLD_PIXELS < side * side * 5
    out, budget = _fetch_copies(body, n, budget_pixels=30_000_000)
    assert list(out[S.STATUS]) == ["success"] * n
    assert budget.peak == side * side * 5 and budget.used == 0


def test_many_huge_pngs_are_decoded_within_the_budget():
    """Four 18 MP PNGs on four download threads with a budget of 30 MP: one decode at a time,
    every image scored."""
    width, height, n = 4500, 4000, 4
    assert width * height > BUDGET_THRESHOLD_PIXELS
    out, budget = _fetch_copies(flat_png(width, height), n, budget_pixels=30_000_000)
    assert list(out[S.STATUS]) == ["success"] * n
    assert list(out[S.WIDTH]) == [width] * n
    assert budget.peak == width * height and budget.waits >= 1 and budget.used == 0
