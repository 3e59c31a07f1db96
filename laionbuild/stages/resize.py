"""Decode a downloaded image and resize it to the CLIP input size.

:func:`decode_and_resize` turns encoded bytes into a ``uint8 [S, S, 3]`` RGB
array plus the ORIGINAL width and height (as stored in the file: no EXIF
rotation is applied, as LAION-5B's own downloader read them with PIL's
``im.size``, so a portrait image stays ``width < height``). Everything that can go wrong becomes an
:class:`ImageRejected` with a status code; no other exception leaves it.

Checks, in order, all made from the header before any pixel is decoded:
``not_an_image`` (no known image signature), ``unsupported_format`` (not in
``fetch.formats``), ``too_large_pixels`` (decompression-bomb guard: width x
height above ``fetch.max_pixels``), ``too_small`` (shortest side below
``fetch.min_image_size``), ``too_many_scans`` (a JPEG of more scans than
``fetch.max_jpeg_scans``: each scan of a progressive JPEG is one more pass over
all of the image's blocks, so a small file of many near-empty scans can keep a
decoder busy for minutes); then ``decode_error`` for a truncated or corrupt body.

Resize modes (``resize.mode``):

* ``center_crop`` -- CLIP's own preprocessing: the shortest side is scaled to
  ``S`` with bicubic filtering (the longer side to ``int(S * long / short)`` as
  torchvision computes it) and the centre ``S x S`` square is kept.
* ``keep_ratio`` -- the longest side is scaled to ``S`` and the image is centred
  on a black square (open_clip's "longest" mode with zero fill).
* ``border`` -- like ``keep_ratio`` but padded with white (img2dataset's
  ``border`` mode).
* ``laion`` -- LAION-5B's downloader followed by CLIP's preprocessing: an image
  whose short side is above ``S`` is scaled (bicubic) so that the short side is
  ``S`` and the long side ``round(long * S / short)`` and centre-cropped; smaller
  images go to CLIP's own resize, as ``center_crop``. It differs from
  ``center_crop`` only in that rounding of the long side (torchvision truncates).

Truncated images: with ``accept_truncated`` a JPEG whose data ends early is
decoded with an end-of-image marker appended (the same pixels as PIL's
``LOAD_TRUNCATED_IMAGES``, without touching that process-wide flag); other
formats are decoded once more with the flag set under a lock, because Pillow
has no per-image switch for them.

Why our own code instead of img2dataset's ``Resizer``
-----------------------------------------------------
img2dataset's resizer (``img2dataset/resizer.py``) decodes with OpenCV at full
resolution, resizes with albumentations (INTER_AREA down-scaling, not CLIP's
bicubic), and returns *re-encoded bytes*, not the array the CLIP stage needs --
so using it would cost a full decode, an encode and a second decode per image.
We instead (1) ask libjpeg for a reduced-size decode (PIL ``draft``: DCT
scaling by 1/2, 1/4 or 1/8 while staying at least as large as the target)
and (2) resample only the crop box straight to ``S x S`` (``Image.resize(...,
box=...)``), so the pixels that the centre crop throws away are never
resampled. Measured on this machine for a ~1 MP (1224x816, ~135 KB) JPEG, one
core, images/s: full decode + bicubic resize 66, OpenCV full decode + INTER_AREA
101, draft decode + full bicubic resize 217, draft + box resize 256, OpenCV
``IMREAD_REDUCED_COLOR_2`` + INTER_AREA + crop 249. ``scripts/bench_fetch.py``
re-measures plain versus draft decoding.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import warnings

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from ..config import ResizeConfig
from . import spng

logger = logging.getLogger(__name__)

try:  # optional: faster PNG / WEBP decoding (installed with img2dataset)
    import cv2 as _cv2

    _cv2.setNumThreads(1)
except ImportError:  # pragma: no cover - depends on the environment
    _cv2 = None

#: formats decoded with OpenCV when it is installed (same pixels, less CPU); JPEG
#: stays with PIL because reduced-size decoding is what makes it fast; PNG goes to
#: libspng first when it is installed (:mod:`.spng`)
_CV2_FORMATS = ("PNG", "WEBP")
#: PIL's ``reducing_gap``: big down-scales first average whole pixel blocks
_REDUCING_GAP = 3.0

# We make the pixel-count decision ourselves (fetch.max_pixels) before decoding;
# PIL's own warning for the same condition is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

#: statuses this module can produce
RESIZE_STATUSES = ("not_an_image", "decode_error", "too_small", "too_large_pixels", "unsupported_format",
                   "too_many_scans")
#: a JPEG's start-of-scan marker; entropy-coded data never holds it (a 0xFF byte there is
#: followed by 0x00 or a restart marker), so counting it over-counts only through embedded
#: data such as an EXIF thumbnail
_JPEG_SOS = b"\xff\xda"

_PAD = {"keep_ratio": 0, "border": 255}
#: JPEG end-of-image marker: appended to a truncated JPEG, libjpeg finishes the image
_JPEG_EOI = b"\xff\xd9"
_TRUNCATED_FLAG_LOCK = threading.Lock()


#: images of more pixels than this take their pixels from the decode budget (:class:`PixelBudget`)
BUDGET_THRESHOLD_PIXELS = 16_000_000


class PixelBudget:
    """Decodes of large images share a pixel budget, so that one worker's threads never hold
    more than about ``pixels`` decoded pixels of large images at once (a few hundred MB each
    at the size limit: 32 threads decoding such images at once would take tens of GB).

    An image above :data:`BUDGET_THRESHOLD_PIXELS` waits until its pixels fit; one larger than
    the whole budget runs alone. Smaller images never wait. Thread-safe.
    """

    def __init__(self, pixels: int, threshold: int = BUDGET_THRESHOLD_PIXELS):
        self.limit = max(1, int(pixels))
        self.threshold = threshold
        self.used = 0
        #: decodes that waited for room, and the most pixels held at once
        self.waits = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, pixels: int):
        if pixels <= self.threshold:
            yield
            return
        need = min(int(pixels), self.limit)
        with self._cond:
            if self.used + need > self.limit:
                self.waits += 1
                while self.used + need > self.limit:
                    self._cond.wait()
            self.used += need
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            _release_freed_memory()
            with self._cond:
                self.used -= need
                self._cond.notify_all()


def _libc_malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def _release_freed_memory() -> None:
    """Hand the memory of a large decode back to the system: Pillow allocates images in blocks
    small enough to come from the thread's malloc arena, which would otherwise keep them (one
    arena per download thread: hundreds of MB each after a large image)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class ImageRejected(Exception):
    """The bytes are not a usable image; ``status`` is the row's status code."""

    def __init__(self, status: str, message: str = ""):
        self.status = status
        self.message = message or status
        super().__init__(f"{status}: {self.message}")

    def __reduce__(self):  # raised in a child process (:mod:`.isolate`), re-raised in the worker
        return type(self), (self.status, self.message)


def decode_and_resize(
    data: bytes,
    cfg: ResizeConfig,
    *,
    max_pixels: int,
    min_size: int,
    formats: tuple[str, ...],
    accept_truncated: bool = False,
    budget: PixelBudget | None = None,
    max_scans: int = 0,
) -> tuple[np.ndarray, int, int]:
    """Decode ``data`` and resize it; returns ``(uint8 [S, S, 3], width, height)``.

    ``accept_truncated``: an image whose data ends early is used, the missing
    part filled as PIL's ``LOAD_TRUNCATED_IMAGES`` does (LAION-5B accepted them).
    ``budget``: the worker's :class:`PixelBudget` (large images wait for their pixels).
    ``max_scans``: a JPEG with more scans is ``too_many_scans`` (0: no limit).
    Raises :class:`ImageRejected` (only) when the image cannot be used.
    """
    limits = dict(max_pixels=max_pixels, min_size=min_size, formats=formats, budget=budget, max_scans=max_scans)
    try:
        return _decode_and_resize(data, cfg, **limits)
    except ImageRejected as exc:
        laion = cfg.pixel_path == "laion"
        if not (accept_truncated and exc.status == "decode_error" and ("truncated" in exc.message or laion)):
            raise
    if data[:2] == b"\xff\xd8" and cfg.pixel_path != "laion":  # JPEG
        return _decode_and_resize(data + _JPEG_EOI, cfg, **limits)
    with _load_truncated_images():
        return _decode_and_resize(data, cfg, **limits)


@contextlib.contextmanager
def _load_truncated_images():
    """PIL's process-wide ``LOAD_TRUNCATED_IMAGES`` set for one decode, then restored."""
    with _TRUNCATED_FLAG_LOCK:
        before = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = before


def _decode_and_resize(data: bytes, cfg: ResizeConfig, *, max_pixels: int, min_size: int,
                       formats: tuple[str, ...], budget: PixelBudget | None,
                       max_scans: int = 0) -> tuple[np.ndarray, int, int]:
    if not data:
        raise ImageRejected("not_an_image", "empty body")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_large_pixels", str(exc)) from None
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", f"unrecognised image data ({_head(data)})") from None
    except Exception as exc:  # noqa: BLE001 - a broken header is a decode error, never a crash
        raise ImageRejected("decode_error", f"{type(exc).__name__}: {exc}") from None
    img._laionbuild_bytes = data  # for the optional OpenCV decoder
    try:
        return _process(img, cfg, max_pixels=max_pixels, min_size=min_size, formats=formats, budget=budget,
                        max_scans=max_scans)
    finally:
        img.close()


def _process(img: Image.Image, cfg: ResizeConfig, *, max_pixels: int, min_size: int, formats,
             budget: PixelBudget | None = None, max_scans: int = 0) -> tuple:
    fmt = (img.format or "").upper()
    if fmt not in {f.upper() for f in formats}:
        raise ImageRejected("unsupported_format", f"format {fmt or 'unknown'} not accepted")
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRejected("too_large_pixels", f"{width}x{height} is more than {max_pixels} pixels")
    if min(width, height) < min_size:
        raise ImageRejected("too_small", f"{width}x{height} is smaller than {min_size} pixels")
    data = getattr(img, "_laionbuild_bytes", None)
    # a sequential JPEG has a scan per component at most, each with its blocks' data; only
    # progressive scans can be near-empty passes over every block
    if max_scans > 0 and fmt == "JPEG" and data is not None and img.info.get("progressive"):
        scans = data.count(_JPEG_SOS)
        if scans > max_scans:
            raise ImageRejected("too_many_scans", f"{scans} JPEG scans, more than {max_scans}")
    size = cfg.image_size
    try:
        with budget.reserve(_decoded_pixels(width, height, fmt, cfg, _alpha(img))) if budget is not None \
                else contextlib.nullcontext():
            if cfg.pixel_path == "laion":
                out = _laion_pixels(img, size, fmt)
            elif cfg.mode in ("center_crop", "laion"):
                out = _center_crop(img, size, cfg.fast_decode, round_long=cfg.mode == "laion")
            else:
                out = _fit(img, size, cfg.fast_decode, _PAD.get(cfg.mode, 0))
    except ImageRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt data
        raise ImageRejected("decode_error", f"{type(exc).__name__}: {exc}") from None
    return out, width, height


#: what an image with transparency holds at its peak, in RGB pixels of the same size: the RGBA
#: form, a white RGBA background, their composite and its RGB form (16 bytes a pixel, not 3)
_ALPHA_WEIGHT = 5


def _alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _decoded_pixels(width: int, height: int, fmt: str, cfg: ResizeConfig, alpha: bool = False) -> int:
    """RGB pixels a decode holds at its peak: JPEGs decoded at reduced size (``fast_decode``) are
    scaled by libjpeg by 1/2, 1/4 or 1/8 while the short side stays at least the target size; an
    image with transparency counts :data:`_ALPHA_WEIGHT` times (our path composites it on white)."""
    if fmt == "JPEG" and cfg.fast_decode and cfg.pixel_path != "laion":
        reduce = 1
        while reduce < 8 and min(width, height) // (reduce * 2) >= cfg.image_size:
            reduce *= 2
        return -(-width // reduce) * -(-height // reduce)
    if alpha and cfg.pixel_path != "laion":
        return width * height * _ALPHA_WEIGHT
    return width * height


def _center_crop(img: Image.Image, size: int, fast: bool, round_long: bool = False) -> np.ndarray:
    """``round_long``: LAION-5B's downloader rounded the long side of images it scaled
    down (short side above ``size``); torchvision (CLIP's preprocessing) truncates it."""
    width, height = img.size
    short, long_ = (width, height) if width <= height else (height, width)
    if round_long and short > size:
        new_long = int(round(long_ / (short / size)))
    else:
        new_long = int(size * long_ / short)
    tw, th = (size, new_long) if width <= height else (new_long, size)
    img = _decode(img, (tw, th), fast)
    # torchvision CenterCrop offsets, in the resized image's coordinates
    left = int(round((tw - size) / 2.0))
    top = int(round((th - size) / 2.0))
    sx, sy = img.size[0] / tw, img.size[1] / th
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    out = img.resize((size, size), Image.BICUBIC, box=box, reducing_gap=_REDUCING_GAP)
    return _as_array(out)


#: ``Image.save`` arguments of LAION-5B's downloader per format: none, so Pillow's
#: defaults (JPEG quality 75 with 4:2:0 chroma subsampling, lossy WEBP quality 80, PNG lossless)
_LAION_SAVE_FORMATS = ("JPEG", "PNG", "WEBP")


def _laion_pixels(img: Image.Image, size: int, fmt: str) -> np.ndarray:
    """LAION-5B's image path into CLIP (``resize.pixel_path: laion``).

    Its downloader scaled an image whose short side is above ``size`` in the
    image's own mode (``Image.resize`` bicubic: Pillow uses nearest-neighbour
    for palette images and scales RGBA with premultiplied alpha) to short side
    ``size``, long side rounded, and cut the centre (``Image.crop`` with the
    half-pixel box it computed); then ``convert("RGB")`` (alpha dropped, a
    palette's transparency ignored) and saved the result in the source format
    with Pillow's default settings. CLIP's preprocessing read that file back:
    RGB, bicubic resize of the short side to ``size`` (torchvision: long side
    truncated; a no-op when already ``size``), centre crop.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        img = img.convert("I")  # the Pillow of LAION-5B's time (8.x) opened 16-bit greyscale PNGs in mode I
    width, height = img.size
    short = min(width, height)
    if short > size:
        ratio = short / size
        new_w, new_h = int(round(width / ratio)), int(round(height / ratio))
        img = img.resize((new_w, new_h), resample=Image.BICUBIC)
        if new_w > size or new_h > size:
            img = img.crop(((new_w - size) / 2, (new_h - size) / 2, (new_w + size) / 2, (new_h + size) / 2))
    if img.mode != "RGB":
        img = img.convert("RGB")
    if fmt in _LAION_SAVE_FORMATS:
        buf = io.BytesIO()
        img.save(buf, fmt)
        buf.seek(0)
        img = Image.open(buf)
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
    return _clip_preprocess(img, size)


#: the largest image :func:`_clip_preprocess` resizes whole before its centre crop (48 MB of RGB; an
#: aspect ratio up to about 1:330 at 224 px)
_WHOLE_RESIZE_MAX_PIXELS = 1 << 24


def _clip_preprocess(img: Image.Image, size: int) -> np.ndarray:
    """CLIP's preprocessing of a PIL image as torchvision does it, step by step: bicubic resize
    of the whole image to short side ``size`` (long side truncated; none when the short side
    already is ``size``), then the centre crop at rounded offsets. (:func:`_center_crop`
    resizes only the cropped box in one call: the same up to rounding, a level here and there.)"""
    width, height = img.size
    if min(width, height) != size:
        tw, th = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
        if tw * th > _WHOLE_RESIZE_MAX_PIXELS:
            # a long, narrow image (10 x 100,000 px: 7 KB of PNG) would be resized to 224 x 2,240,000
            # first: gigabytes. Only the centre crop's box is resized (the same up to rounding)
            left, top = int(round((tw - size) / 2.0)), int(round((th - size) / 2.0))
            sx, sy = width / tw, height / th
            box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
            return _as_array(img.resize((size, size), Image.BICUBIC, box=box))
        img = img.resize((tw, th), Image.BICUBIC)
    width, height = img.size
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return _as_array(img.crop((left, top, left + size, top + size)))


def _fit(img: Image.Image, size: int, fast: bool, fill: int) -> np.ndarray:
    width, height = img.size
    scale = size / max(width, height)
    tw, th = max(1, round(width * scale)), max(1, round(height * scale))
    img = _decode(img, (tw, th), fast)
    resized = np.asarray(img.resize((tw, th), Image.BICUBIC, reducing_gap=_REDUCING_GAP))
    out = np.full((size, size, 3), fill, dtype=np.uint8)
    top, left = (size - th) // 2, (size - tw) // 2
    out[top:top + th, left:left + tw] = resized
    return out


def _decode(img: Image.Image, target: tuple[int, int], fast: bool) -> Image.Image:
    """Decode the pixels as RGB, at reduced size for JPEG when allowed."""
    if fast and img.format == "JPEG":
        img.draft("RGB", target)
        return _to_rgb(img)
    data = getattr(img, "_laionbuild_bytes", None) if fast and img.mode in ("RGB", "L") else None
    if data is not None and img.format == "PNG":
        arr = spng.decode_rgb8(data, *img.size)  # None when missing or refused: the decoders below say why
        if arr is not None:
            return Image.fromarray(arr, "RGB")
    if data is not None and _cv2 is not None and img.format in _CV2_FORMATS:
        arr = _cv2.imdecode(np.frombuffer(data, np.uint8), _cv2.IMREAD_COLOR)
        if arr is not None and arr.shape[1] == img.size[0] and arr.shape[0] == img.size[1]:
            # in place: a large image is not held three times over
            return Image.fromarray(_cv2.cvtColor(arr, _cv2.COLOR_BGR2RGB, dst=arr), "RGB")
    return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Load the pixels and convert them to RGB; transparency is composited on white."""
    img.load()
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.uint32)
        if arr.max(initial=0) > 255:
            arr = arr >> 8
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _as_array(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return arr


def encode_image(arr: np.ndarray, cfg: ResizeConfig) -> bytes:
    """Encode a resized ``uint8 [S, S, 3]`` array (``resize.encode_format``) for saving."""
    buf = io.BytesIO()
    img = Image.fromarray(arr, "RGB")
    if cfg.encode_format == "png":
        img.save(buf, "PNG", compress_level=6)
    elif cfg.encode_format == "webp":
        img.save(buf, "WEBP", quality=cfg.encode_quality)
    else:
        img.save(buf, "JPEG", quality=cfg.encode_quality)
    return buf.getvalue()


def _head(data: bytes) -> str:
    return repr(data[:16])

