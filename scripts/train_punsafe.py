#!/usr/bin/env python
"""Train a ``punsafe`` head: a small MLP on L2-normalised CLIP image embeddings.

Input is a file of labelled embeddings (label 1 = unsafe):

* ``.npz`` with arrays ``embeddings`` ``[N, D]`` and ``labels`` ``[N]``;
* ``.parquet`` with a list column ``embedding`` (or ``image_embedding``, as
  written by ``clip.save_embeddings``) and an integer column ``label``.

The embeddings must come from the CLIP model named with ``--clip-model``
(recorded in the checkpoint; the CLIP stage refuses a head whose input size
differs from its model's embedding size). Rows are L2-normalised before
training, as in the pipeline. A seeded random ``--val-fraction`` is held out;
the held-out ROC AUC is printed (JSON) and stored in the checkpoint's metrics.

``--demo-shapes`` makes its own data instead: embeddings of freshly rendered
demo shapes (``laionbuild.demo.shapes``) under the tiny demo CLIP, with the
colours given by ``--unsafe-colours`` as the positive class. It exercises the
whole mechanism without external weights.

    python scripts/train_punsafe.py --data emb.npz --clip-model ViT-L-14/openai --out punsafe-l14.pt
    python scripts/train_punsafe.py --demo-shapes --out /tmp/punsafe-shapes.pt
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from laionbuild.stages.safety import MLPHead, roc_auc, save_punsafe_head  # noqa: E402

DEMO_CLIP_ARCH = "tiny-clip-shapes"
DEMO_CLIP_WEIGHTS = "builtin:tiny-clip-shapes.pt"
DEMO_UNSAFE = ("red", "purple")


# --------------------------------------------------------------------------- data
def load_labelled_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32 [N, D], labels int64 [N]) from an .npz or .parquet file."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as data:
            x, y = data["embeddings"], data["labels"]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        col = next((c for c in ("embedding", "image_embedding") if c in table.column_names), None)
        if col is None or "label" not in table.column_names:
            raise SystemExit(f"{path}: needs an 'embedding' (or 'image_embedding') column and a 'label' column")
        x = np.asarray(table.column(col).to_pylist(), dtype=np.float32)
        y = np.asarray(table.column("label").to_pylist())
    else:
        raise SystemExit(f"{path}: expected .npz or .parquet")
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y).astype(np.int64)
    if x.ndim != 2 or len(x) != len(y):
        raise SystemExit(f"{path}: embeddings must be [N, D] with one label per row")
    if set(np.unique(y)) - {0, 1}:
        raise SystemExit(f"{path}: labels must be 0 (safe) or 1 (unsafe)")
    return x, y


def shapes_embeddings(n_per_spec: int = 20, *, seed: int = 0, unsafe_colours: Sequence[str] = DEMO_UNSAFE,
                      image_size: int = 32, render_size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Image embeddings of rendered demo shapes under the tiny demo CLIP; label 1 = an unsafe colour."""
    from PIL import Image

    from laionbuild.config import ClipModelConfig
    from laionbuild.demo import shapes
    from laionbuild.models.clip import load_clip

    loaded = load_clip(ClipModelConfig(DEMO_CLIP_ARCH, DEMO_CLIP_WEIGHTS), "cpu")
    images, labels = [], []
    for k, spec in enumerate(shapes.all_specs()):
        for j in range(n_per_spec):
            img = shapes.render(spec, size=render_size, seed=seed * 1_000_003 + k * 10_007 + j)
            images.append(np.asarray(img.resize((image_size, image_size), Image.BICUBIC), dtype=np.uint8))
            labels.append(int(spec.colour in unsafe_colours))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        emb = F.normalize(loaded.model.encode_image((x - mean) / std).float(), dim=-1)
    return emb.numpy().astype(np.float32), np.asarray(labels, dtype=np.int64)


def split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.RandomState(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return order[n_val:], order[:n_val]


# --------------------------------------------------------------------------- training
def train_punsafe_head(x: np.ndarray, y: np.ndarray, *, hidden: Sequence[int] = (64,), epochs: int = 200,
                       lr: float = 3e-3, weight_decay: float = 1e-4, batch_size: int = 512, dropout: float = 0.1,
                       seed: int = 0, val_fraction: float = 0.2) -> tuple[MLPHead, dict]:
    """Train an :class:`MLPHead` ``D -> hidden -> 1`` with BCE; returns it (eval mode) and held-out metrics."""
    torch.manual_seed(seed)
    x = F.normalize(torch.as_tensor(x, dtype=torch.float32), dim=-1)
    y = torch.as_tensor(y, dtype=torch.float32)
    train_idx, val_idx = split(len(x), val_fraction, seed)
    xt, yt = x[train_idx], y[train_idx]
    head = MLPHead([x.shape[1], *hidden, 1], dropout=dropout)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    pos = float(yt.sum())
    pos_weight = torch.tensor((len(yt) - pos) / max(pos, 1.0))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), batch_size):
            b = order[start : start + batch_size]
            loss = F.binary_cross_entropy_with_logits(head(xt[b]).reshape(-1), yt[b], pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    with torch.no_grad():
        p_val = torch.sigmoid(head(x[val_idx]).reshape(-1)).numpy()
        p_train = torch.sigmoid(head(xt).reshape(-1)).numpy()
    y_val = y[val_idx].numpy().astype(int)
    metrics = {
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
        "train_seconds": round(time.perf_counter() - t0, 2),
        "train_auc": _auc(p_train, yt.numpy().astype(int)),
        "val_auc": _auc(p_val, y_val),
        "val_accuracy_at_0.5": float(((p_val >= 0.5) == (y_val == 1)).mean()),
    }
    return head, metrics


def _auc(p: np.ndarray, y: np.ndarray) -> float | None:
    return roc_auc(p, y) if 0 < y.sum() < len(y) else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help=".npz (embeddings, labels) or .parquet (embedding, label)")
    src.add_argument("--demo-shapes", action="store_true", help="embeddings of rendered demo shapes (tiny CLIP)")
    ap.add_argument("--clip-model", default="", help="the CLIP model of the embeddings, e.g. ViT-L-14/openai")
    ap.add_argument("--unsafe-colours", default=",".join(DEMO_UNSAFE), help="--demo-shapes: positive colours")
    ap.add_argument("--per-spec", type=int, default=20, help="--demo-shapes: images per colour x shape")
    ap.add_argument("--out", required=True, help="checkpoint to write (laionbuild.punsafe/1)")
    ap.add_argument("--hidden", default="64", help="hidden layer sizes, comma separated ('' = linear)")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    if args.demo_shapes:
        x, y = shapes_embeddings(args.per_spec, seed=args.seed, unsafe_colours=tuple(args.unsafe_colours.split(",")))
        clip_model = args.clip_model or f"{DEMO_CLIP_ARCH}/{DEMO_CLIP_WEIGHTS}"
    else:
        if not args.clip_model:
            ap.error("--clip-model is required with --data (the model the embeddings come from)")
        x, y = load_labelled_embeddings(args.data)
        clip_model = args.clip_model
    hidden = [int(h) for h in args.hidden.split(",") if h.strip()]
    head, metrics = train_punsafe_head(x, y, hidden=hidden, epochs=args.epochs, lr=args.lr, seed=args.seed,
                                       val_fraction=args.val_fraction)
    save_punsafe_head(args.out, head, clip_model=clip_model, name=Path(args.out).stem, metrics=metrics)
    print(json.dumps({"out": args.out, "clip_model": clip_model, "embed_dim": int(x.shape[1]),
                      "n": int(len(x)), "positives": int(y.sum()), **metrics}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
