"""The faithful image path (``resize.pixel_path: laion``) against LAION-5B's steps run on
the Pillow of LAION-5B's time.

    pip install --no-deps --no-binary :all: --target /tmp/pil8 "pillow==8.4.0"
    python scripts/check_pixel_path.py --reference-path /tmp/pil8 [--n 12]

LAION-5B's downloader ran an unpinned Pillow in late 2021 (8.4.0 was the release of
the time); its GPU step read the saved files with the same library and applied CLIP's
preprocessing (torchvision 0.8: bicubic resize of the short side, centre crop). Our
faithful path runs on the Pillow this project installs. This script builds images of
the kinds the web serves (JPEG: baseline, progressive, 4:4:4, greyscale, CMYK; PNG: RGB,
RGBA, LA, L, palette with and without transparency, 16-bit, 1-bit; WEBP: lossy, lossless
with alpha), sends each through ``decode_and_resize`` with ``configs/laion5b.yaml``'s
``resize`` settings, and through the same steps written out in a child process whose
``PYTHONPATH`` puts the older Pillow first. It prints, as JSON, per kind: images
compared, identical outputs, the largest difference of one channel value, the mean
difference, the sizes of the images that differ, and how many of ours equal the same
steps run on the installed Pillow (where the two Pillows differ, ours follows the old
one). WEBP is skipped (reported) when the older Pillow was built without libwebp
(``apt-get install libwebp-dev`` before building it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SIZE = 224
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- reference (child)
def reference_pixels(data: bytes, size: int = SIZE) -> np.ndarray:
    """LAION-5B's steps with whatever Pillow is imported: its downloader's resize in the
    image's own mode (short side above ``size``: bicubic to short side ``size``, both sides
    rounded, centre crop with a half-pixel box), ``convert("RGB")``, a save in the source
    format with Pillow's defaults; then CLIP's preprocessing of the saved file (torchvision
    0.8 on a PIL image: RGB, bicubic resize of the short side to ``size`` with the long side
    truncated, a no-op when it already is ``size``; centre crop at rounded offsets)."""
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    fmt = im.format
    w, h = im.size
    if min(w, h) > size:
        ratio = min(w, h) / size
        nw, nh = int(round(w / ratio)), int(round(h / ratio))
        im = im.resize((nw, nh), resample=Image.BICUBIC)
        if nw > size or nh > size:
            im = im.crop(((nw - size) / 2, (nh - size) / 2, (nw + size) / 2, (nh + size) / 2))
    if im.mode != "RGB":
        im = im.convert("RGB")
    saved = io.BytesIO()
    im.save(saved, fmt)
    im = Image.open(io.BytesIO(saved.getvalue())).convert("RGB")
    w, h = im.size
    if not ((w <= h and w == size) or (h <= w and h == size)):
        ow, oh = (size, int(size * h / w)) if w < h else (int(size * w / h), size)
        im = im.resize((ow, oh), Image.BICUBIC)
    w, h = im.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _child(folder: str) -> None:
    import PIL
    from PIL import features

    names = sorted(p for p in os.listdir(folder) if p.endswith(".img"))
    done = {}
    for name in names:
        data = Path(folder, name).read_bytes()
        try:
            np.save(Path(folder, name[:-4] + ".ref.npy"), reference_pixels(data))
            done[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, compared as a refusal
            done[name] = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"pillow": PIL.__version__, "pillow_file": PIL.__file__,
                      "webp": bool(features.check("webp")),
                      "libjpeg_turbo": features.version("libjpeg_turbo") if features.check("libjpeg_turbo") else None,
                      "results": done}))


# --------------------------------------------------------------------------- cases (parent)
def _photo(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
    blobs = 60 * np.sin(x / rng.uniform(4, 15)) * np.cos(y / rng.uniform(4, 15))
    return np.clip(base + blobs[..., None] + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)


def _size(rng: np.random.Generator) -> tuple[int, int]:
    """Short sides below, at and above 224 (where the downloader's resize starts), odd ones."""
    short = int(rng.choice([100, 223, 224, 225, 300, 449, 640, 1001]))
    long_ = short + int(rng.integers(0, short + 1))
    return (short, long_) if rng.random() < 0.5 else (long_, short)


def _save(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def cases(n: int, seed: int = 7) -> dict[str, list[bytes]]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out: dict[str, list[bytes]] = {}

    def add(kind: str, data: bytes) -> None:
        out.setdefault(kind, []).append(data)

    for _ in range(n):
        w, h = _size(rng)
        rgb = Image.fromarray(_photo(w, h, rng))
        alpha = Image.fromarray(np.tile(np.linspace(0, 255, w).astype(np.uint8)[None, :], (h, 1)), "L")
        add("jpeg_baseline", _save(rgb, "JPEG", quality=int(rng.integers(60, 96))))
        add("jpeg_progressive", _save(rgb, "JPEG", quality=85, progressive=True))
        add("jpeg_444", _save(rgb, "JPEG", quality=90, subsampling=0))
        add("jpeg_grey", _save(rgb.convert("L"), "JPEG", quality=85))
        add("jpeg_cmyk", _save(rgb.convert("CMYK"), "JPEG", quality=90))
        add("png_rgb", _save(rgb, "PNG"))
        rgba = rgb.copy()
        rgba.putalpha(alpha)
        add("png_rgba", _save(rgba, "PNG"))
        la = rgb.convert("L")
        la.putalpha(alpha)
        add("png_la", _save(la, "PNG"))
        add("png_grey", _save(rgb.convert("L"), "PNG"))
        add("png_palette", _save(rgb.quantize(int(rng.integers(16, 256))), "PNG"))
        pal = rgb.quantize(64)
        add("png_palette_transparent", _save(pal, "PNG", transparency=int(rng.integers(0, 64))))
        add("png_16bit", _save(Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257)), "PNG"))
        add("png_1bit", _save(rgb.convert("1"), "PNG"))
        add("webp_lossy", _save(rgb, "WEBP", quality=int(rng.integers(60, 96))))
        add("webp_lossless_alpha", _save(rgba, "WEBP", lossless=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference-path", help="a folder holding the older Pillow (put first on PYTHONPATH)")
    ap.add_argument("--n", type=int, default=12, help="images per kind")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child)
        return
    if not args.reference_path:
        ap.error("--reference-path is required")

    import PIL
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from laionbuild.config import load_config
    from laionbuild.stages.resize import ImageRejected, decode_and_resize

    resize_cfg = load_config(REPO / "configs" / "laion5b.yaml").resize
    limits = dict(max_pixels=89_478_484, min_size=10, formats=("JPEG", "PNG", "WEBP"))
    all_cases = cases(args.n)
    with tempfile.TemporaryDirectory() as tmp:
        names: dict[str, tuple[str, bytes]] = {}
        for kind, items in all_cases.items():
            for i, data in enumerate(items):
                name = f"{kind}-{i:03d}"
                names[name] = (kind, data)
                Path(tmp, name + ".img").write_bytes(data)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([args.reference_path, os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, __file__, "--child", tmp], env=env, capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            sys.exit(f"reference run failed: {proc.stderr.strip().splitlines()[-1:]}")
        child = json.loads(proc.stdout)
        if child["pillow"] == PIL.__version__:
            sys.exit(f"the reference path gives the same Pillow ({PIL.__version__}) as this interpreter")
        per_kind: dict[str, dict] = {}
        for name, (kind, data) in names.items():
            row = per_kind.setdefault(kind, {"compared": 0, "identical": 0, "max_diff": 0, "sum_diff": 0.0,
                                             "refused_by_reference": 0, "refused_by_ours": 0,
                                             "same_as_the_steps_on_this_pillow": 0, "differing_sizes": []})
            ref_status = child["results"][name + ".img"]
            if kind.startswith("webp") and not child["webp"]:
                row["skipped"] = "the reference Pillow has no WEBP support"
                continue
            try:
                ours, _, _ = decode_and_resize(data, resize_cfg, **limits)
            except ImageRejected:
                ours = None
            if ref_status != "ok" or ours is None:
                row["refused_by_reference"] += ref_status != "ok"
                row["refused_by_ours"] += ours is None
                continue
            ref = np.load(Path(tmp, name + ".ref.npy"))
            row["compared"] += 1
            if ref.shape != ours.shape:
                row["max_diff"] = 255
                row["sum_diff"] += 255.0
                continue
            diff = np.abs(ref.astype(np.int16) - ours.astype(np.int16))
            row["identical"] += int(not diff.any())
            row["same_as_the_steps_on_this_pillow"] += int(np.array_equal(reference_pixels(data), ours))
            if diff.any():
                row["differing_sizes"].append("x".join(map(str, Image.open(io.BytesIO(data)).size)))
            row["max_diff"] = max(row["max_diff"], int(diff.max()))
            row["sum_diff"] += float(diff.mean())
    for kind, row in per_kind.items():
        row["mean_diff"] = round(row.pop("sum_diff") / row["compared"], 4) if row["compared"] else None
        if not row["differing_sizes"]:
            del row["differing_sizes"]
        if "skipped" in row:
            per_kind[kind] = {"skipped": row["skipped"]}
    total = sum(r.get("compared", 0) for r in per_kind.values())
    same = sum(r.get("identical", 0) for r in per_kind.values())
    print(json.dumps({"ours": {"pillow": PIL.__version__},
                      "reference": {k: child[k] for k in ("pillow", "webp", "libjpeg_turbo")},
                      "resize": {"pixel_path": resize_cfg.pixel_path, "mode": resize_cfg.mode,
                                 "fast_decode": resize_cfg.fast_decode},
                      "images_compared": total, "identical": same, "kinds": per_kind}, indent=1))


if __name__ == "__main__":
    main()
