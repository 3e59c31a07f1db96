"""decode_and_resize: modes, shapes, original sizes and every rejection status."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from helpers.images import encode, many_scans_jpeg, png_file
from laionbuild.config import FetchConfig, ResizeConfig
from laionbuild.stages.resize import ImageRejected, decode_and_resize, encode_image

FETCH = FetchConfig()
LIMITS = dict(max_pixels=FETCH.max_pixels, min_size=FETCH.min_image_size, formats=FETCH.formats)


def halves(w: int, h: int, vertical_split: bool = True) -> Image.Image:
    """Left half red, right half blue (or top red, bottom blue)."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    if vertical_split:
        arr[:, : w // 2] = (255, 0, 0)
        arr[:, w // 2 :] = (0, 0, 255)
    else:
        arr[: h // 2] = (255, 0, 0)
        arr[h // 2 :] = (0, 0, 255)
    return Image.fromarray(arr)


def textured(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(1, h // 16), max(1, w // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def run(data: bytes, **cfg) -> tuple[np.ndarray, int, int]:
    return decode_and_resize(data, ResizeConfig(**cfg), **LIMITS)


def reject(data: bytes, **limits) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        decode_and_resize(data, ResizeConfig(), **{**LIMITS, **limits})
    assert info.value.message
    return info.value


@pytest.mark.parametrize("mode", ["center_crop", "keep_ratio", "border"])
@pytest.mark.parametrize("size", [224, 64])
def test_output_shape_and_dtype(mode, size):
    arr, w, h = run(encode(textured(500, 300), "JPEG"), mode=mode, image_size=size)
    assert arr.shape == (size, size, 3) and arr.dtype == np.uint8
    assert (w, h) == (500, 300)


@pytest.mark.parametrize("fast", [True, False])
def test_portrait_original_size_not_swapped(fast):
    # EXIF-less portrait JPEG: width < height must be reported as stored
    data = encode(textured(300, 600), "JPEG")
    assert b"Exif" not in data
    arr, w, h = run(data, fast_decode=fast)
    assert (w, h) == (300, 600)
    assert arr.shape == (224, 224, 3)


def test_exif_orientation_is_not_applied():
    # like LAION's metadata: the stored pixel grid decides width/height
    img = textured(400, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW" when displayed
    _, w, h = run(encode(img, "JPEG", exif=exif.tobytes()))
    assert (w, h) == (400, 200)


def test_center_crop_keeps_the_middle():
    # 3:1 landscape: left third red, middle green, right third blue -> centre crop is green
    arr = np.zeros((100, 300, 3), dtype=np.uint8)
    arr[:, :100] = (255, 0, 0)
    arr[:, 100:200] = (0, 255, 0)
    arr[:, 200:] = (0, 0, 255)
    out, _, _ = run(encode(Image.fromarray(arr), "PNG"), mode="center_crop", image_size=64)
    assert out[:, 4:60].reshape(-1, 3).mean(axis=0)[1] > 240
    assert out[:, 4:60, 0].max() < 30 and out[:, 4:60, 2].max() < 30


def test_center_crop_matches_clip_preprocessing():
    tv = pytest.importorskip("torchvision.transforms")
    img = textured(640, 427, seed=3)
    clip = tv.Compose([tv.Resize(224, interpolation=tv.InterpolationMode.BICUBIC), tv.CenterCrop(224)])
    expected = np.asarray(clip(img), dtype=np.int16)
    out, _, _ = run(encode(img, "PNG"), mode="center_crop", fast_decode=False)
    assert np.abs(out.astype(np.int16) - expected).mean() < 1.5


def test_fast_decode_is_close_to_full_decode():
    data = encode(textured(1600, 1000, seed=4), "JPEG", quality=92)
    fast, w1, h1 = run(data, fast_decode=True)
    full, w2, h2 = run(data, fast_decode=False)
    assert (w1, h1) == (w2, h2) == (1600, 1000)
    assert np.abs(fast.astype(np.int16) - full.astype(np.int16)).mean() < 4.0


def test_keep_ratio_pads_black_and_border_pads_white():
    data = encode(halves(400, 200), "PNG")  # landscape: bands above and below
    kr, _, _ = run(data, mode="keep_ratio", image_size=100)
    bd, _, _ = run(data, mode="border", image_size=100)
    assert (kr[:20] == 0).all() and (kr[-20:] == 0).all()
    assert (bd[:20] == 255).all() and (bd[-20:] == 255).all()
    # the image itself spans the full width: red on the left, blue on the right
    assert kr[50, 5, 0] > 200 and kr[50, 95, 2] > 200
    assert (kr[30:70] == bd[30:70]).all()


def test_keep_ratio_portrait_pads_left_and_right():
    out, w, h = run(encode(halves(100, 400, vertical_split=False), "PNG"), mode="keep_ratio", image_size=80)
    assert (w, h) == (100, 400)
    assert (out[:, :25] == 0).all() and (out[:, -25:] == 0).all()
    assert out[5, 40, 0] > 200 and out[75, 40, 2] > 200


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_accepted_formats(fmt):
    out, w, h = run(encode(textured(320, 240), fmt))
    assert (w, h) == (320, 240) and out.std() > 5


def test_upscales_small_images():
    out, w, h = run(encode(Image.new("RGB", (40, 30), (10, 200, 30)), "PNG"))
    assert (w, h) == (40, 30)
    assert np.abs(out.reshape(-1, 3).mean(axis=0) - (10, 200, 30)).max() < 2


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (50, 50), (255, 0, 0, 0))  # fully transparent red
    out, _, _ = run(encode(img, "PNG"))
    assert (out > 250).all()


@pytest.mark.parametrize(
    "img",
    [
        Image.new("L", (60, 60), 128),
        Image.new("P", (60, 60), 3),
        Image.new("CMYK", (60, 60), (0, 0, 0, 0)),
        Image.new("I;16", (60, 60), 40000),
        Image.new("1", (60, 60), 1),
    ],
    ids=["L", "P", "CMYK", "I16", "1bit"],
)
def test_other_modes_become_rgb(img):
    fmt = "JPEG" if img.mode == "CMYK" else "PNG"
    out, w, h = run(encode(img, fmt))
    assert out.shape == (224, 224, 3) and (w, h) == (60, 60)
    assert out.dtype == np.uint8


def test_not_an_image():
    assert reject(b"<html><body>hello</body></html>").status == "not_an_image"
    assert reject(b"").status == "not_an_image"


def test_truncated_is_decode_error():
    data = encode(textured(400, 400), "JPEG")
    assert reject(data[: len(data) // 2]).status == "decode_error"
    png = encode(textured(200, 200), "PNG")
    assert reject(png[: len(png) // 2]).status == "decode_error"


def test_too_small():
    assert reject(encode(Image.new("RGB", (9, 200)), "PNG")).status == "too_small"
    run(encode(Image.new("RGB", (10, 10)), "PNG"))  # exactly the minimum is fine


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_unsupported_format(fmt):
    assert reject(encode(Image.new("RGB", (50, 50)), fmt)).status == "unsupported_format"


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header announces width x height (the data is a few bytes)."""
    return png_file(width, height, zlib.compress(b"\0" * 64), colour_type=0)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_rejected_from_header():
    small = bomb_png(10_000, 10_000)  # 1e8 px: above 89,478,484, below PIL's own hard limit
    assert len(small) < 200
    assert reject(small).status == "too_large_pixels"
    assert reject(bomb_png(40_000, 40_000)).status == "too_large_pixels"  # PIL's hard limit
    # our limit is the configured one
    assert reject(encode(Image.new("RGB", (100, 100)), "PNG"), max_pixels=5000).status == "too_large_pixels"


def test_encode_image_round_trip():
    arr, _, _ = run(encode(textured(300, 300), "PNG"))
    for fmt, magic in (("jpeg", b"\xff\xd8"), ("png", b"\x89PNG"), ("webp", b"RIFF")):
        data = encode_image(arr, ResizeConfig(encode_format=fmt))
        assert data.startswith(magic)
        back = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert back.shape == arr.shape
        assert np.abs(back.astype(np.int16) - arr).mean() < 3


def _png_kinds() -> dict[str, bytes]:
    rng = np.random.default_rng(11)
    rgb = np.asarray(textured(300, 260, seed=3))
    grey = Image.fromarray(rgb[:, :, 0])
    wide = (rng.integers(0, 65536, (260, 300, 3))).astype(">u2")   # 16 bits per sample, big-endian
    rows = b"".join(b"\x00" + row.tobytes() for row in wide.reshape(260, -1))
    return {
        "rgb8": encode(Image.fromarray(rgb), "PNG"),
        "grey8": encode(grey, "PNG"),
        "grey4": encode(grey, "PNG", bits=4),
        "grey2": encode(grey, "PNG", bits=2),
        "rgb_trns": encode(Image.fromarray(rgb), "PNG", transparency=(1, 2, 3)),
        "rgb16": png_file(300, 260, zlib.compress(rows), bit_depth=16),
        "palette": encode(Image.fromarray(rgb).convert("P"), "PNG"),
        "rgba": encode(Image.fromarray(rgb).convert("RGBA"), "PNG"),
    }


@pytest.mark.parametrize("kind", list(_png_kinds()))
def test_png_decoders_give_the_same_pixels(kind, monkeypatch):
    """libspng, OpenCV and PIL decode every kind of PNG to the same pixels."""
    import laionbuild.stages.resize as R
    from laionbuild.stages import spng

    assert spng.available()                                        # installed with the fetch extra
    data = _png_kinds()[kind]
    if kind in ("rgb8", "grey8", "grey4", "rgb16", "rgb_trns"):
        assert spng.decode_rgb8(data, 300, 260) is not None         # libspng decodes it itself
        assert np.array_equal(spng.decode_rgb8(bytearray(data), 300, 260), spng.decode_rgb8(data, 300, 260))
    results = []
    for lib, cv2 in ((spng._lib, R._cv2), (None, R._cv2), (None, None)):
        monkeypatch.setattr(spng, "_lib", lib)
        monkeypatch.setattr(R, "_cv2", cv2)
        results.append(run(data, fast_decode=True)[0])
    assert all(np.array_equal(results[0], r) for r in results[1:])


def _outcome(data: bytes):
    try:
        return run(data, fast_decode=True)[0]
    except ImageRejected as exc:
        return exc.status


def test_damaged_pngs_get_the_same_answer_with_every_decoder(monkeypatch):
    """Cut or altered PNGs (a wrong CRC with the data intact, bytes changed inside the image
    data): with libspng the answer is the one OpenCV and PIL give, whatever the damage."""
    from laionbuild.stages import spng

    good = _png_kinds()["rgb8"]
    rng = np.random.default_rng(5)
    idat = good.index(b"IDAT")
    crc_at = idat + 4 + int.from_bytes(good[idat - 4:idat], "big")
    damaged = [good[:int(n)] for n in rng.integers(60, len(good), 8)]
    for at in [crc_at, *rng.integers(idat + 4, crc_at, 24)]:
        data = bytearray(good)
        data[int(at)] ^= int(rng.integers(1, 256))
        damaged.append(bytes(data))
    assert spng.decode_rgb8(good, 300, 260) is not None and spng.decode_rgb8(damaged[8], 300, 260) is None
    for data in damaged:
        with_spng = _outcome(data)
        monkeypatch.setattr(spng, "_lib", None)
        without = _outcome(data)
        monkeypatch.undo()
        assert type(with_spng) is type(without)
        assert (with_spng == without) if isinstance(without, str) else np.array_equal(with_spng, without)


def test_a_jpeg_of_too_many_scans_is_refused_before_decoding():
    hostile = many_scans_jpeg(2000, 2000, 600)  # 31 KB; every scan a pass over 62,500 blocks
    assert len(hostile) < 40_000
    got = reject(hostile, max_scans=500)
    assert got.status == "too_many_scans" and "600" in got.message
    # the same file is a valid image: it decodes when the limit allows it (flat grey)
    for limit in (0, 600):
        arr, w, h = decode_and_resize(hostile, ResizeConfig(), **LIMITS, max_scans=limit)
        assert (w, h) == (2000, 2000) and arr.shape == (224, 224, 3) and np.ptp(arr) == 0
    # ordinary progressive and sequential JPEGs, under the default limit of the fetch config
    for progressive in (True, False):
        data = encode(textured(640, 480), "JPEG", progressive=progressive)
        arr, w, h = decode_and_resize(data, ResizeConfig(), **LIMITS, max_scans=FETCH.max_jpeg_scans)
        assert (w, h) == (640, 480)
    # only progressive JPEGs are counted: the marker bytes in a sequential JPEG's comment are not scans
    plain = encode(textured(64, 64), "JPEG", comment=b"\xff\xda" * 100)
    assert plain.count(b"\xff\xda") > 100
    decode_and_resize(plain, ResizeConfig(), **LIMITS, max_scans=10)
