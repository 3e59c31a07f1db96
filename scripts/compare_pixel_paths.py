"""How far our image path is from LAION-5B's (``resize.pixel_path``), in pixel levels.

Builds synthetic images of each kind LAION met (photo-like JPEG above and below
224 px, RGBA PNG with an alpha gradient, palette PNG, WEBP, greyscale PNG),
sends each through ``decode_and_resize`` with LAION's path and with ours
(``configs/laion5b.yaml``'s ``mode: laion, fast_decode: false``, and the package
defaults), and prints, as JSON, the mean absolute difference per channel value
(0-255) and the share of values that differ by more than 8.
"""

from __future__ import annotations

import io
import json
import sys

import numpy as np
from PIL import Image

from laionbuild.config import ResizeConfig
from laionbuild.stages.resize import decode_and_resize

LIMITS = dict(max_pixels=89_478_484, min_size=10, formats=("JPEG", "PNG", "WEBP"))
BIG_DIFF = 8


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(w: int, h: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
    blobs = 60 * np.sin(x / 9.0 + seed) * np.cos(y / 13.0)
    return np.clip(base + blobs[..., None] + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)


def cases(n: int) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {k: [] for k in ("jpeg_large", "jpeg_small", "png_rgba", "png_palette",
                                                     "webp", "png_gray")}
    for i in range(n):
        out["jpeg_large"].append(_encode(Image.fromarray(_photo(640, 480, i)), "JPEG", quality=90))
        out["jpeg_small"].append(_encode(Image.fromarray(_photo(200, 150, i)), "JPEG", quality=90))
        alpha = np.tile(np.linspace(0, 255, 400).astype(np.uint8)[None, :], (300, 1))
        out["png_rgba"].append(_encode(Image.fromarray(np.dstack([_photo(400, 300, i), alpha]), "RGBA"), "PNG"))
        out["png_palette"].append(_encode(Image.fromarray(_photo(500, 400, i)).quantize(128), "PNG"))
        out["webp"].append(_encode(Image.fromarray(_photo(480, 360, i)), "WEBP", quality=90))
        out["png_gray"].append(_encode(Image.fromarray(_photo(300, 400, i)[..., 1], "L"), "PNG"))
    return out


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    laion = ResizeConfig(pixel_path="laion", fast_decode=False)
    ours = {"faithful_ours": ResizeConfig(mode="laion", fast_decode=False), "package_default": ResizeConfig()}
    result = {}
    for kind, blobs in cases(n).items():
        row = {}
        for name, cfg in ours.items():
            diffs = []
            for data in blobs:
                a, _, _ = decode_and_resize(data, laion, **LIMITS)
                b, _, _ = decode_and_resize(data, cfg, **LIMITS)
                diffs.append(np.abs(a.astype(np.int16) - b.astype(np.int16)))
            d = np.stack(diffs)
            row[name] = {"mean_abs_diff": round(float(d.mean()), 2),
                         "share_over_8": round(float((d > BIG_DIFF).mean()), 4)}
        result[kind] = row
    print(json.dumps({"images_per_kind": n, "laion_vs": result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
