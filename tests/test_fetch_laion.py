"""LAION-5B's download rules: byte minimum, truncated images, URL after redirects, resize rounding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from laionbuild import schema as S
from laionbuild.config import FetchConfig, ResizeConfig, config_from_dict, load_config
from laionbuild.demo.image_server import LoopbackServer
from laionbuild.errors import ConfigError
from helpers.dns import NoDNS
from helpers.images import encode
from laionbuild.stages.fetch import STATUSES, ImageFetcher, Resolver
from laionbuild.stages.resize import ImageRejected, decode_and_resize

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
LIMITS = dict(max_pixels=89_478_484, min_size=10, formats=("JPEG", "PNG", "WEBP"))


def noisy(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


BIG_JPEG = encode(noisy(400, 300), "JPEG", quality=90)  # far above 5,000 bytes
SMALL_JPEG = encode(Image.new("RGB", (64, 64), (200, 30, 30)), "JPEG")  # a real image under 5,000 bytes
TRUNCATED_JPEG = BIG_JPEG[: len(BIG_JPEG) * 2 // 3]
BIG_PNG = encode(noisy(300, 200, seed=1), "PNG")
TRUNCATED_PNG = BIG_PNG[: len(BIG_PNG) * 2 // 3]


@pytest.fixture(scope="module")
def server():
    with LoopbackServer(HOST) as srv:
        srv.add("/big.jpg", BIG_JPEG)
        srv.add("/small.jpg", SMALL_JPEG)
        srv.add("/truncated.jpg", TRUNCATED_JPEG)
        srv.add("/truncated.png", TRUNCATED_PNG, content_type="image/png")
        srv.add_redirect("/moved.jpg", "/cdn/big.jpg")
        srv.add("/cdn/big.jpg", BIG_JPEG)
        yield srv


def fetch(server, paths, **cfg):
    fetch_cfg = FetchConfig(allow_addresses=(f"{HOST}/32",), timeout_s=2.0, retries=0, threads=4, **cfg)
    urls = [server.base_url + p for p in paths]
    batch = {S.URL: np.array(urls, dtype=object), S.ALT_TEXT: np.array(["a caption"] * len(urls), dtype=object),
             S.HASH: np.array([S.pair_hash(u, "a caption") for u in urls], dtype=np.int64),
             S.DROP_REASON: np.array([""] * len(urls), dtype=object)}
    with ImageFetcher(fetch_cfg, ResizeConfig(), resolver=Resolver(lookup=NoDNS())) as f:
        return f(batch), urls


def test_faithful_config_holds_laion_download_rules():
    cfg = load_config(REPO / "configs" / "laion5b.yaml")
    assert (cfg.fetch.min_bytes, cfg.fetch.accept_truncated, cfg.fetch.url_after_redirects) == (5000, True, True)
    assert cfg.fetch.max_pixels == 89_478_484 and set(cfg.fetch.formats) == {"JPEG", "PNG", "WEBP"}
    assert not (cfg.fetch.honour_opt_out or cfg.fetch.honour_tdm_header or cfg.fetch.honour_tdmrep_json
                or cfg.fetch.honour_robots_txt)
    assert (cfg.resize.mode, cfg.resize.image_size, cfg.resize.fast_decode) == ("laion", 224, False)
    default = load_config(None)
    assert (default.fetch.min_bytes, default.fetch.accept_truncated, default.fetch.url_after_redirects) == (
        0, False, False)
    assert default.resize.mode == "center_crop"


def test_images_under_min_bytes_are_too_small_bytes(server):
    assert len(SMALL_JPEG) < 5000 < len(BIG_JPEG)
    out, _ = fetch(server, ["/small.jpg", "/big.jpg"], min_bytes=5000)
    assert list(out[S.STATUS]) == ["too_small_bytes", "success"]
    assert out[S.DROP_REASON][0] == "fetch:too_small_bytes" and "too_small_bytes" in STATUSES
    out, _ = fetch(server, ["/small.jpg"])
    assert list(out[S.STATUS]) == ["success"]


@pytest.mark.parametrize("path", ["/truncated.jpg", "/truncated.png"])
def test_truncated_images_are_accepted_only_when_asked(server, path):
    out, _ = fetch(server, [path])
    assert out[S.STATUS][0] == "decode_error" and "truncated" in out[S.ERROR_MESSAGE][0]
    flag_before = ImageFile.LOAD_TRUNCATED_IMAGES
    out, _ = fetch(server, [path], accept_truncated=True)
    assert out[S.STATUS][0] == "success" and S.image_rows(out[S.IMAGE], np.array([0]), 224)[0][0].std() > 5
    assert ImageFile.LOAD_TRUNCATED_IMAGES == flag_before  # PIL's process-wide flag is left as it was


def test_truncated_jpeg_gets_the_pixels_pil_gives_it():
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        expected, w, h = decode_and_resize(TRUNCATED_JPEG, ResizeConfig(fast_decode=False), **LIMITS)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    got, w2, h2 = decode_and_resize(TRUNCATED_JPEG, ResizeConfig(fast_decode=False), **LIMITS,
                                    accept_truncated=True)
    assert (w, h) == (w2, h2) == (400, 300)
    assert np.array_equal(expected, got)
    with pytest.raises(ImageRejected):
        decode_and_resize(TRUNCATED_JPEG, ResizeConfig(fast_decode=False), **LIMITS)


def test_url_after_redirects(server):
    out, urls = fetch(server, ["/moved.jpg", "/big.jpg"], url_after_redirects=True)
    assert list(out[S.STATUS]) == ["success", "success"]
    assert list(out[S.URL]) == [server.base_url + "/cdn/big.jpg", urls[1]]
    assert out[S.HASH][0] == S.pair_hash(server.base_url + "/cdn/big.jpg", "a caption")
    assert out[S.HASH][1] == S.pair_hash(urls[1], "a caption")
    out, urls = fetch(server, ["/moved.jpg"])
    assert list(out[S.URL]) == urls  # default: the URL the page linked


@pytest.mark.parametrize("size", [(1000, 501), (501, 1000), (300, 227), (225, 226), (200, 150)])
def test_laion_resize_rounds_the_long_side(size):
    w, h = size
    img = noisy(w, h, seed=w)
    data = encode(img, "PNG")
    got, _, _ = decode_and_resize(data, ResizeConfig(mode="laion", fast_decode=False), **LIMITS)
    short, long_ = min(w, h), max(w, h)
    if short > 224:  # LAION's downloader: bicubic to short side 224, long side rounded, centre crop
        ratio = short / 224
        nw, nh = int(round(w / ratio)), int(round(h / ratio))
    else:  # CLIP's preprocessing (torchvision): the long side truncated
        nw, nh = (224, int(224 * h / w)) if w <= h else (int(224 * w / h), 224)
    full = img.resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - 224) / 2)), int(round((nh - 224) / 2))
    expected = np.asarray(full.crop((left, top, left + 224, top + 224)))
    assert got.shape == (224, 224, 3)
    # the crop box is resampled directly (same filter, same geometry): equal up to rounding
    assert np.abs(got.astype(int) - expected.astype(int)).mean() < 2.0


def test_fetch_rule_config_validation():
    with pytest.raises(ConfigError):
        config_from_dict({"fetch": {"min_bytes": -1}})
    with pytest.raises(ConfigError):
        config_from_dict({"resize": {"mode": "stretch"}})
    assert config_from_dict({"resize": {"mode": "laion"}}).resize.mode == "laion"
