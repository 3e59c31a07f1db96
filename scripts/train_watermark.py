#!/usr/bin/env python
"""Train a ``pwatermark`` classifier, or convert LAION's released watermark detector.

Training data is either

* ``--images DIR`` with sub-folders ``watermark/`` and ``clear/`` (any images PIL reads), or
* ``--synthetic N``: demo shapes (``laionbuild.demo.shapes``) on textured
  backgrounds, half of them with a semi-transparent text or logo overlay drawn
  with PIL (the positive class), all made here from a seed.

Images are brought to ``--image-size`` the way the fetch stage does (shortest
side, centre crop) and then go through the classifier's own preprocessing
(:func:`laionbuild.stages.safety.preprocess_images`: resize to ``--input-size``,
normalise), exactly as in the pipeline. A seeded ``--val-fraction`` is held
out; its ROC AUC is printed (JSON) and kept in the checkpoint's metrics.

``--convert-laion watermark_model_v1.pt`` turns LAION's detector (a timm
EfficientNet-B3 state dict whose classifier is 1536 -> 625 -> 256 -> 2, class 0 =
watermark, 256 x 256 ImageNet-normalised input) into a ``laionbuild.watermark/1``
checkpoint.

    python scripts/train_watermark.py --synthetic 2000 --out /tmp/watermark-tiny.pt
    python scripts/train_watermark.py --images data/wm --arch torchvision:efficientnet_b3 --input-size 256 --out wm.pt
    python scripts/train_watermark.py --convert-laion watermark_model_v1.pt --out laion-watermark.pt
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from laionbuild.stages.safety import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    WatermarkNet,
    laion_watermark_state_dict,
    preprocess_images,
    roc_auc,
    save_watermark_model,
)

OVERLAY_WORDS = ("© stock", "SAMPLE", "watermark", "PREVIEW", "photo.com", "©2021", "proof", "images")
LAION_HEAD = (625, 256)
LAION_INPUT_SIZE = 256


# --------------------------------------------------------------------------- data
def fit_square(img: Image.Image, size: int) -> np.ndarray:
    """Shortest side to ``size`` (bicubic), centred crop: what the fetch stage hands on."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.convert("RGB").resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _background(rng: random.Random, size: int) -> Image.Image:
    from laionbuild.demo import shapes

    spec = rng.choice(shapes.all_specs())
    img = shapes.render(spec, size=size, seed=rng.randrange(1 << 30))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(0, 4)):  # opaque clutter, so that "any extra mark" is not the signal
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        r = rng.uniform(0.03, 0.12) * size
        colour = tuple(rng.randrange(256) for _ in range(3))
        if rng.random() < 0.5:
            draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)
        else:
            draw.line([x - r, y, x + r, y + r], fill=colour, width=max(1, int(r / 4)))
    return img


def add_watermark(img: Image.Image, rng: random.Random) -> Image.Image:
    """A semi-transparent text (sometimes tiled) or logo overlay."""
    size = img.size[0]
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    shade = rng.choice((255, 20))
    alpha = rng.randint(130, 200)
    fill = (shade, shade, shade, alpha)
    edge = (255 - shade, 255 - shade, 255 - shade, alpha // 2)  # faint outline of the other shade
    font = _font(max(8, int(size * rng.uniform(0.12, 0.2))))
    text = rng.choice(OVERLAY_WORDS)
    kind = rng.random()
    if kind < 0.45:  # one line of text anywhere
        draw.text((rng.uniform(0, 0.5) * size, rng.uniform(0.05, 0.8) * size), text, font=font, fill=fill,
                  stroke_width=1, stroke_fill=edge)
    elif kind < 0.75:  # tiled text
        step = int(size * rng.uniform(0.3, 0.45))
        off = rng.randrange(step)
        for y in range(-off, size, step):
            for x in range(-off, size, int(step * 1.6)):
                draw.text((x, y), text, font=font, fill=fill, stroke_width=1, stroke_fill=edge)
    else:  # logo: outlined box with text in a corner
        w, h = size * rng.uniform(0.35, 0.55), size * rng.uniform(0.15, 0.25)
        x = rng.choice((0.03 * size, size - w - 0.03 * size))
        y = rng.choice((0.03 * size, size - h - 0.03 * size))
        draw.rectangle([x, y, x + w, y + h], outline=fill, width=max(1, size // 40))
        draw.text((x + w * 0.08, y + h * 0.15), text, font=font, fill=fill, stroke_width=1, stroke_fill=edge)
    return Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")


def synthetic_watermark_images(n: int, *, image_size: int = 64, seed: int = 0,
                               render_size: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images ``[n, image_size, image_size, 3]`` and labels (1 = watermark), half each."""
    rng = random.Random(seed)
    images, labels = [], []
    for i in range(n):
        img = _background(rng, render_size)
        label = i % 2
        if label:
            img = add_watermark(img, rng)
        images.append(fit_square(img, image_size))
        labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def folder_images(root: str | Path, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Images of ``root/watermark`` (label 1) and ``root/clear`` (label 0)."""
    images, labels = [], []
    for label, sub in ((1, "watermark"), (0, "clear")):
        folder = Path(root) / sub
        if not folder.is_dir():
            raise SystemExit(f"{folder}: missing (expected sub-folders watermark/ and clear/)")
        for path in sorted(folder.iterdir()):
            try:
                with Image.open(path) as img:
                    images.append(fit_square(img, image_size))
            except OSError:
                continue
            labels.append(label)
    if not images:
        raise SystemExit(f"{root}: no readable images")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.RandomState(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return order[n_val:], order[:n_val]


# --------------------------------------------------------------------------- training
def train_watermark_model(images: np.ndarray, labels: np.ndarray, *, arch: str = "tiny-cnn",
                          arch_kwargs: Mapping[str, Any] | None = None, input_size: int = 64,
                          head_hidden: Sequence[int] = (32,), steps: int = 300, batch_size: int = 32,
                          lr: float = 3e-3, seed: int = 0, val_fraction: float = 0.2, mean=IMAGENET_MEAN,
                          std=IMAGENET_STD) -> tuple[WatermarkNet, dict]:
    """Train a one-logit :class:`WatermarkNet` (BCE, AdamW, random flips); returns it (eval) and held-out metrics."""
    torch.manual_seed(seed)
    net = WatermarkNet(arch, arch_kwargs, head_hidden, num_classes=1)
    train_idx, val_idx = split(len(images), val_fraction, seed)
    raw = torch.from_numpy(np.ascontiguousarray(images))
    # the preprocessing is deterministic: run it once
    x_all = torch.cat([preprocess_images(raw[i : i + 256], input_size, mean, std) for i in range(0, len(raw), 256)])
    y_all = torch.as_tensor(labels, dtype=torch.float32)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    net.train()
    for _ in range(steps):
        b = torch.from_numpy(train_idx)[torch.randint(len(train_idx), (batch_size,), generator=gen)]
        x = x_all[b]
        if torch.rand(1, generator=gen).item() < 0.5:
            x = x.flip(3)
        loss = F.binary_cross_entropy_with_logits(net(x).reshape(-1), y_all[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.inference_mode():
        p = torch.cat([torch.sigmoid(net(x_all[torch.from_numpy(val_idx[i : i + 256])]).reshape(-1))
                       for i in range(0, len(val_idx), 256)]).numpy()
    y_val = labels[val_idx].astype(int)
    metrics = {
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
        "steps": int(steps),
        "train_seconds": round(time.perf_counter() - t0, 2),
        "val_auc": roc_auc(p, y_val) if 0 < y_val.sum() < len(y_val) else None,
        "val_accuracy_at_0.5": float(((p >= 0.5) == (y_val == 1)).mean()),
    }
    return net, metrics


# --------------------------------------------------------------------------- conversion
def convert_laion(src: str | Path, out: str | Path, arch: str = "timm:efficientnet_b3") -> Path:
    """LAION's ``watermark_model_v1.pt`` (timm EfficientNet-B3 state dict) -> ``laionbuild.watermark/1``."""
    state = torch.load(src, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and not any(k.startswith("classifier.") for k in state):
        state = state["state_dict"]
    net = WatermarkNet(arch, head_hidden=LAION_HEAD, num_classes=2)
    renamed = laion_watermark_state_dict(state)
    net.load_state_dict(renamed, strict=True)  # fails loudly when the layout differs
    return save_watermark_model(out, net, input_size=LAION_INPUT_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                positive_index=0, name="laion-watermark-v1", metrics={"converted_from": str(src)})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", type=int, metavar="N", help="N synthetic images (half watermarked)")
    src.add_argument("--images", help="folder with watermark/ and clear/ sub-folders")
    src.add_argument("--convert-laion", metavar="PT", help="convert LAION's watermark_model_v1.pt")
    ap.add_argument("--out", required=True, help="checkpoint to write (laionbuild.watermark/1)")
    ap.add_argument("--arch", default="tiny-cnn", help="tiny-cnn, torchvision:<name> or timm:<name>")
    ap.add_argument("--widths", default="16,32,64", help="tiny-cnn channel widths")
    ap.add_argument("--image-size", type=int, default=64, help="side of the images as the fetch stage resizes them")
    ap.add_argument("--input-size", type=int, default=64, help="the classifier's own input side")
    ap.add_argument("--head-hidden", default="32", help="hidden sizes of the MLP classifier, comma separated")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    args = ap.parse_args(argv)
    if args.convert_laion:
        path = convert_laion(args.convert_laion, args.out)
        print(json.dumps({"out": str(path), "converted_from": args.convert_laion}, indent=1))
        return 0
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    if args.synthetic:
        images, labels = synthetic_watermark_images(args.synthetic, image_size=args.image_size, seed=args.seed)
    else:
        images, labels = folder_images(args.images, args.image_size)
    arch_kwargs = {"widths": [int(w) for w in args.widths.split(",")]} if args.arch == "tiny-cnn" else {}
    hidden = [int(h) for h in args.head_hidden.split(",") if h.strip()]
    net, metrics = train_watermark_model(images, labels, arch=args.arch, arch_kwargs=arch_kwargs,
                                         input_size=args.input_size, head_hidden=hidden, steps=args.steps,
                                         batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                         val_fraction=args.val_fraction)
    save_watermark_model(args.out, net, input_size=args.input_size, name=Path(args.out).stem, metrics=metrics)
    print(json.dumps({"out": args.out, "arch": args.arch, "n": int(len(images)), **metrics}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
