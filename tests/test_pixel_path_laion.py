"""LAION-5B's image path into CLIP (``resize.pixel_path: laion``) against our default path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

T = pytest.importorskip("torchvision.transforms")

from laionbuild.config import ResizeConfig, config_from_dict, load_config
from laionbuild.errors import ConfigError
from laionbuild.stages.resize import ImageRejected, decode_and_resize

REPO = Path(__file__).resolve().parents[1]
LIMITS = dict(max_pixels=89_478_484, min_size=10, formats=("JPEG", "PNG", "WEBP"))
LAION = ResizeConfig(pixel_path="laion", fast_decode=False)
OURS = ResizeConfig(mode="laion", fast_decode=False)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo_like(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients with texture: an image whose JPEG re-encoding changes little."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def reference(data: bytes, size: int = 224, opened_as: str | None = None) -> np.ndarray:
    """LAION's steps written out with Pillow, then CLIP's preprocessing (torchvision resize, crop).
    ``opened_as``: the mode an older Pillow opened the file in."""
    im = Image.open(io.BytesIO(data))
    fmt = im.format
    if opened_as is not None:
        im = im.convert(opened_as)
    w, h = im.size
    if min(w, h) > size:
        r = min(w, h) / size
        nw, nh = int(round(w / r)), int(round(h / r))
        im = im.resize((nw, nh), resample=Image.BICUBIC)
        if nw > size or nh > size:
            im = im.crop(((nw - size) / 2, (nh - size) / 2, (nw + size) / 2, (nh + size) / 2))
    if im.mode != "RGB":
        im = im.convert("RGB")
    saved = io.BytesIO()
    im.save(saved, fmt)
    im = Image.open(io.BytesIO(saved.getvalue())).convert("RGB")
    clip_preprocess = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])
    return np.asarray(clip_preprocess(im))


CASES = {
    "jpeg_large": lambda: encode(Image.fromarray(photo_like(500, 360)), "JPEG", quality=92),
    "jpeg_small": lambda: encode(Image.fromarray(photo_like(180, 120, 1)), "JPEG", quality=92),
    "png_rgba": lambda: encode(Image.fromarray(np.dstack([photo_like(300, 260, 2),
                                                          np.tile(np.arange(300, dtype=np.uint8)[None, :], (260, 1))]),
                                               "RGBA"), "PNG"),
    "png_palette": lambda: encode(Image.fromarray(photo_like(400, 300, 3)).quantize(64), "PNG"),
    "webp": lambda: encode(Image.fromarray(photo_like(320, 240, 4)), "WEBP", quality=95),
    "png_gray": lambda: encode(Image.fromarray(photo_like(260, 300, 5)[..., 0], "L"), "PNG"),
    # short side under 224: only CLIP's resize scales it, up, the long side to a fraction of a pixel
    "jpeg_upscaled": lambda: encode(Image.fromarray(photo_like(289, 223, 6)), "JPEG", quality=90),
    "png_upscaled": lambda: encode(Image.fromarray(photo_like(100, 138, 7)), "PNG"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_laion_pixel_path_equals_the_reference(name):
    data = CASES[name]()
    got, w, h = decode_and_resize(data, LAION, **LIMITS)
    assert got.shape == (224, 224, 3)
    assert np.array_equal(got, reference(data))
    assert (w, h) == Image.open(io.BytesIO(data)).size


def _mean_diff(name: str) -> float:
    data = CASES[name]()
    a, _, _ = decode_and_resize(data, LAION, **LIMITS)
    b, _, _ = decode_and_resize(data, OURS, **LIMITS)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_16_bit_greyscale_png_is_read_as_the_pillow_of_laions_time_read_it():
    """Pillow 8 opened a 16-bit greyscale PNG in mode ``I`` (32-bit integers), resized it there and
    clipped it to 0-255 in ``convert("RGB")``; Pillow 13 opens it as ``I;16``, whose resize and
    conversion give other pixels. The faithful path reads it as LAION-5B's Pillow did
    (``scripts/check_pixel_path.py`` compares with Pillow 8.4.0 itself)."""
    levels = np.random.default_rng(0).integers(0, 400, (400, 600))  # in and above 0-255: some are clipped
    img = Image.fromarray(levels.astype(np.uint16))
    assert img.mode == "I;16"
    data = encode(img, "PNG")
    got, w, h = decode_and_resize(data, LAION, **LIMITS)
    assert (w, h) == (600, 400)
    assert np.array_equal(got, reference(data, opened_as="I"))
    assert not np.array_equal(got, reference(data))  # what Pillow 13's own mode would give


def test_alpha_is_dropped_not_composited_on_white():
    rgba = np.zeros((200, 200, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red under a fully transparent alpha
    data = encode(Image.fromarray(rgba, "RGBA"), "PNG")
    laion, _, _ = decode_and_resize(data, LAION, **LIMITS)
    ours, _, _ = decode_and_resize(data, OURS, **LIMITS)
    assert np.all(laion[..., 0] == 200) and np.all(laion[..., 1:] == 0)  # the hidden colour shows
    assert np.all(ours == 255)
    # scaled down first (short side above 224), Pillow premultiplies alpha: transparent turns black
    rgba = np.zeros((240, 240, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    laion, _, _ = decode_and_resize(encode(Image.fromarray(rgba, "RGBA"), "PNG"), LAION, **LIMITS)
    assert np.all(laion == 0)
    assert _mean_diff("png_rgba") > 10


def test_palette_images_are_resized_with_nearest_neighbour():
    img = Image.fromarray(photo_like(448, 448, 7)).quantize(16)
    colours = {tuple(c) for c in np.asarray(img.convert("RGB")).reshape(-1, 3)}
    got, _, _ = decode_and_resize(encode(img, "PNG"), LAION, **LIMITS)
    assert {tuple(c) for c in got.reshape(-1, 3)} <= colours  # no new colours: nearest neighbour
    assert _mean_diff("png_palette") > 0.5


def test_jpeg_re_encoding_shifts_pixels_a_little():
    diff = _mean_diff("jpeg_large")
    assert 0.2 < diff < 10


def test_corrupt_but_decodable_png_is_accepted_only_in_laion_mode():
    data = bytearray(encode(Image.fromarray(photo_like(300, 300, 8)), "PNG"))
    idat = data.find(b"IDAT")
    for i in range(idat + 2000, idat + 2400):
        data[i] ^= 0x5A  # corrupt the compressed stream in the middle
    data = bytes(data)
    with pytest.raises(ImageRejected):
        decode_and_resize(data, OURS, accept_truncated=True, **LIMITS)
    got, _, _ = decode_and_resize(data, LAION, accept_truncated=True, **LIMITS)
    assert got.shape == (224, 224, 3)
    with pytest.raises(ImageRejected):
        decode_and_resize(data, LAION, accept_truncated=False, **LIMITS)


def test_pixel_path_setting():
    assert load_config(REPO / "configs" / "laion5b.yaml").resize.pixel_path == "laion"
    assert load_config(None).resize.pixel_path == "ours"
    with pytest.raises(ConfigError):
        config_from_dict({"resize": {"pixel_path": "pil"}})


def test_a_long_narrow_image_is_never_resized_whole(monkeypatch):
    """10 x 100,000 px (7 KB of PNG): CLIP's resize of the short side would make it 224 x 2,240,000
    (1.5 GB) before the crop; only the crop's box is resized, the same pixels up to rounding."""
    from laionbuild.stages import resize

    sizes = []
    real_resize = Image.Image.resize

    def recording(self, size, *args, **kwargs):
        sizes.append(size)
        return real_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    narrow = encode(Image.fromarray(photo_like(10, 100_000)), "PNG")
    got, w, h = decode_and_resize(narrow, LAION, **dict(LIMITS, min_size=1))
    assert (got.shape, w, h) == ((224, 224, 3), 10, 100_000)
    assert max(a * b for a, b in sizes) <= resize._WHOLE_RESIZE_MAX_PIXELS

    # below the limit both ways give the same pixels, up to a level here and there
    data = encode(Image.fromarray(photo_like(20, 2_000, seed=3)), "PNG")
    whole, _, _ = decode_and_resize(data, LAION, **dict(LIMITS, min_size=1))
    monkeypatch.setattr(resize, "_WHOLE_RESIZE_MAX_PIXELS", 1000)
    boxed, _, _ = decode_and_resize(data, LAION, **dict(LIMITS, min_size=1))
    diff = np.abs(whole.astype(int) - boxed.astype(int))
    assert diff.mean() < 1.0 and diff.max() <= 8, (diff.mean(), diff.max())
