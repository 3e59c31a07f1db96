#!/usr/bin/env python
"""Train the tiny demo CLIP on the synthetic coloured shapes of ``laionbuild.demo.shapes``.

The model only has to tell colours apart reliably: a caption naming the
right colour scores above the LAION thresholds (0.28 en, 0.26 multi/nolang)
and a caption naming another colour scores below them, in every demo
language and for the emoji captions.

Images go through the same path as in the demo pipeline: rendered by
``shapes.render`` at random sizes and aspect ratios, JPEG encoded and decoded,
then resized with PIL bicubic (shortest side to ``--image-size``) and centre
cropped. Training is seeded and runs on CPU.

Unrelated web-like alt texts (file names, dates, other objects, emoji) are
pushed below the thresholds too, and a random fifth of their words are replaced
by the unknown token so that words outside the cut-down vocabulary score low.

Writes ``laionbuild/assets/tiny-clip-shapes.pt`` (checkpoint in the format
documented in docs/clip.md) and ``tiny-clip-shapes.json`` (its open_clip model
config) and prints held-out accuracy as JSON.

    python scripts/train_tiny_clip.py                # defaults used for the committed model
    python scripts/train_tiny_clip.py --steps 200 --out /tmp/tiny   # quick try
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from laionbuild.demo import shapes  # noqa: E402
from laionbuild.models.clip import (  # noqa: E402
    CHECKPOINT_FORMAT,
    RemappedTokenizer,
    build_clip_from_config,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
THRESHOLDS = {"en": 0.28, "de": 0.26, "fr": 0.26, "es": 0.26, "nolang": 0.26}
EVAL_LANGUAGES = ("en", "de", "fr", "es", "nolang")


# --------------------------------------------------------------------------- images
def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Shortest side to ``size`` (PIL bicubic), then a centred ``size`` x ``size`` crop."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def pipeline_image(spec: shapes.ShapeSpec, seed: int, image_size: int, rng: random.Random) -> np.ndarray:
    """Render at a random size / aspect, JPEG round trip, centre-crop resize -> uint8 [S, S, 3]."""
    side = rng.choice((64, 96, 128, 160, 200, 256, 320))
    width = side if rng.random() < 0.5 else int(side * rng.uniform(0.75, 1.4))
    img = shapes.render(spec, size=side, seed=seed, width=width)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(60, 95))
    buf.seek(0)
    img = Image.open(buf).convert("RGB")
    return np.asarray(center_crop_resize(img, image_size), dtype=np.uint8)


def make_images(specs, seeds, image_size: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
    rng = random.Random(salt)
    images, labels = [], []
    for seed in seeds:
        for k, spec in enumerate(specs):
            images.append(pipeline_image(spec, seed, image_size, rng))
            labels.append(k)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def to_input(images: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------- text
def build_token_map(texts: list[str]) -> dict:
    """Compact vocabulary of the BPE tokens the captions use.

    Layout: 0 padding, 1 unknown, 2 start, 3.. used tokens, last id end (the text
    tower pools at the highest id, so the end token must be the largest).
    """
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    used = sorted({t for text in texts for t in bpe.encode(text)})
    first = 3
    return {
        "base": "open_clip.SimpleTokenizer",
        "pad_id": 0,
        "unknown_id": 1,
        "sot_id": 2,
        "eot_id": first + len(used),
        "source_ids": torch.tensor(used, dtype=torch.long),
        "target_ids": torch.arange(first, first + len(used), dtype=torch.long),
    }


def caption_table(specs):
    """All captions with (spec index, language, text)."""
    rows = []
    for k, spec in enumerate(specs):
        for lang in shapes.LANGUAGES:
            for v in range(len(shapes.TEMPLATES[lang])):
                rows.append((k, lang, shapes.caption(spec, lang, v)))
        for v in range(3):
            rows.append((k, "nolang", shapes.caption(spec, "nolang", v)))
    return rows


_DISTRACTOR_WORDS = (
    "dog cat house car shoes dress garden kitchen sofa table lamp phone laptop book coffee beach mountain "
    "city street wedding cake flower tree bird horse boat train bike guitar pizza bread watch ring bag "
    "Haus Hund Katze Auto Schuhe Garten Küche Tisch Buch Stadt Straße Blume Baum Fahrrad Kaffee "
    "maison chien chat voiture chaussures jardin cuisine livre ville rue fleur arbre vélo gâteau "
    "casa perro gato coche zapatos jardín cocina mesa libro ciudad calle flor árbol bicicleta "
    "cheap sale new best online free download vintage modern wooden leather cotton summer winter "
    "logo icon banner header footer thumbnail avatar profile gallery slide image picture photo"
).split()
_DISTRACTOR_EMOJI = ("😀", "🎉", "🐶", "🌲", "🏠", "⭐", "👍", "🚗", "📷", "❤")


def distractor_texts(n: int, seed: int) -> list[str]:
    """Alt texts unrelated to any shape or colour (web-like noise); they must score low."""
    rng = random.Random(seed)
    w = lambda: rng.choice(_DISTRACTOR_WORDS)  # noqa: E731
    makers = (
        lambda: f"a photo of a {w()}",
        lambda: " ".join(w() for _ in range(rng.randint(1, 6))),
        lambda: f"IMG_{rng.randint(0, 9999):04d}.jpg",
        lambda: f"DSC{rng.randint(0, 99999):05d}",
        lambda: f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        lambda: f"buy {w()} {w()} online",
        lambda: "".join(rng.choice(_DISTRACTOR_EMOJI) for _ in range(rng.randint(1, 4))),
        lambda: f"{w()} - {w()} | {w()}",
        lambda: f"ein {w()} auf weißem Hintergrund",
        lambda: f"photo d'un {w()} sur un fond blanc",
    )
    return [rng.choice(makers)() for _ in range(n)]


# --------------------------------------------------------------------------- eval
@torch.inference_mode()
def evaluate(model, tokenizer, specs, images, labels, mean, std, distractors=()) -> dict:
    model.eval()
    rows = caption_table(specs)
    texts = [r[2] for r in rows]
    cap_spec = torch.tensor([r[0] for r in rows])
    cap_lang = [r[1] for r in rows]
    img = F.normalize(model.encode_image(to_input(images, mean, std)), dim=-1)
    txt = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
    sim = img @ txt.T
    colour = torch.tensor([list(shapes.COLOURS).index(s.colour) for s in specs])
    img_spec = torch.from_numpy(labels)
    match = img_spec[:, None] == cap_spec[None, :]
    same_colour = colour[img_spec][:, None] == colour[cap_spec][None, :]
    out = {}
    for lang in EVAL_LANGUAGES:
        cols = torch.tensor([l == lang for l in cap_lang])
        thr = THRESHOLDS[lang]
        m = match & cols
        oc = ~same_colour & cols
        os_ = same_colour & ~match & cols
        out[lang] = {
            "threshold": thr,
            "match_kept": round(float((sim[m] >= thr).float().mean()), 4),
            "other_colour_dropped": round(float((sim[oc] < thr).float().mean()), 4),
            "other_shape_dropped": round(float((sim[os_] < thr).float().mean()), 4),
            "mean_match_sim": round(float(sim[m].mean()), 4),
            "mean_other_colour_sim": round(float(sim[oc].mean()), 4),
        }
    if distractors:
        d = F.normalize(model.encode_text(tokenizer(list(distractors))), dim=-1)
        ds = img @ d.T
        out["distractors"] = {
            "threshold": 0.26,
            "dropped": round(float((ds < 0.26).float().mean()), 4),
            "images_keeping_any": round(float((ds >= 0.26).any(dim=1).float().mean()), 4),
            "mean_sim": round(float(ds.mean()), 4),
        }
    return out


# --------------------------------------------------------------------------- main
# --------------------------------------------------------------------------- multilingual text model
def _wordpiece_vocab(texts: list[str]) -> list[str]:
    """Whole words of ``texts`` (as BERT's pre-tokenizer splits them) plus every character as a piece."""
    from tokenizers.pre_tokenizers import BertPreTokenizer

    pre = BertPreTokenizer()
    words, chars = set(), set()
    for t in texts:
        for w, _ in pre.pre_tokenize_str(t):
            words.add(w)
            chars.update(w)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return list(dict.fromkeys(specials + sorted(words) + sorted(chars) + [f"##{c}" for c in sorted(chars)]))


def train_text_model(args) -> int:
    """Distil the tiny CLIP's text tower into a tiny multilingual DistilBERT + mean pooling + Dense,
    saved in the sentence-transformers layout of clip-ViT-B-32-multilingual-v1 (the way that model
    was made: a student text encoder trained to put texts where the CLIP text tower puts them)."""
    import transformers

    from laionbuild.config import ClipModelConfig
    from laionbuild.models.clip import load_clip

    teacher = load_clip(ClipModelConfig(args.name, f"builtin:{args.name}.pt"), "cpu")
    specs = shapes.all_specs()
    texts = [r[2] for r in caption_table(specs)]
    distractors = distractor_texts(args.distractors, seed=args.seed)
    train_texts = texts + distractors
    with torch.no_grad():
        target = F.normalize(teacher.model.encode_text(teacher.tokenizer(train_texts)).float(), dim=-1)
    out = Path(args.out) / args.text_name
    out.mkdir(parents=True, exist_ok=True)
    vocab = _wordpiece_vocab(train_texts)
    tok = transformers.DistilBertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=False)
    assert tok.convert_ids_to_tokens(tok("red circle")["input_ids"])[1:3] == ["red", "circle"]
    torch.manual_seed(args.seed)
    cfg = transformers.DistilBertConfig(vocab_size=len(tok), dim=64, n_layers=2, n_heads=2, hidden_dim=128,
                                        max_position_embeddings=64, dropout=0.0, attention_dropout=0.0)
    student = transformers.DistilBertModel(cfg)
    dense = torch.nn.Linear(64, int(teacher.embed_dim), bias=False)
    params = list(student.parameters()) + list(dense.parameters())
    opt = torch.optim.Adam(params, lr=args.text_lr)
    enc = tok(train_texts, padding=True, truncation=True, max_length=32, return_tensors="pt")

    def embed(ids, mask):
        h = student(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        return dense((h * m).sum(1) / m.sum(1).clamp(min=1e-9))

    rng = np.random.RandomState(args.seed)
    n = len(train_texts)
    for step in range(args.text_steps):
        # every caption each step (they are what the demo scores), plus a sample of distractors
        idx = np.concatenate([np.arange(len(texts)), len(texts) + rng.choice(n - len(texts), 64, replace=False)])
        idx_t = torch.from_numpy(idx)
        pred = F.normalize(embed(enc["input_ids"][idx_t], enc["attention_mask"][idx_t]), dim=-1)
        gap = 1 - (pred * target[idx_t]).sum(-1)
        loss = gap[: len(texts)].mean() * 3 + gap[len(texts):].mean()  # the captions matter most
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"text step {step} loss {loss.item():.5f}", file=sys.stderr, flush=True)
    student.eval()
    with torch.no_grad():
        pred = F.normalize(embed(enc["input_ids"], enc["attention_mask"]), dim=-1)
    agreement = (pred * target).sum(-1)
    student.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": False}))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    (out / "2_Dense").mkdir(exist_ok=True)
    (out / "2_Dense" / "config.json").write_text(json.dumps({
        "in_features": 64, "out_features": int(teacher.embed_dim), "bias": False,
        "activation_function": "torch.nn.modules.linear.Identity"}))
    from safetensors.torch import save_file

    save_file({"linear.weight": dense.weight.detach().contiguous()}, str(out / "2_Dense" / "model.safetensors"))
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ]))
    report = {"text_model": str(out), "captions_cosine_to_teacher_min": float(agreement[: len(texts)].min()),
              "captions_cosine_to_teacher_mean": float(agreement[: len(texts)].mean()),
              "distractors_cosine_to_teacher_mean": float(agreement[len(texts):].mean()),
              "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file())}
    print(json.dumps(report, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "laionbuild" / "assets"))
    ap.add_argument("--name", default="tiny-clip-shapes")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--train-seeds", type=int, default=200)
    ap.add_argument("--eval-seeds", type=int, default=40)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--pos-margin", type=float, default=0.45)
    ap.add_argument("--neg-margin", type=float, default=0.05)
    ap.add_argument("--shape-margin", type=float, default=0.2)
    ap.add_argument("--distractors", type=int, default=400, help="unrelated alt texts pushed below the thresholds")
    ap.add_argument("--distractors-per-step", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--multilingual-text", action="store_true",
                    help="distil the committed model's text tower into a tiny multilingual text model "
                         "(sentence-transformers layout) instead of training the CLIP model")
    ap.add_argument("--text-name", default="tiny-text-shapes")
    ap.add_argument("--text-steps", type=int, default=600)
    ap.add_argument("--text-lr", type=float, default=3e-3)
    args = ap.parse_args(argv)
    if args.multilingual_text:
        torch.set_num_threads(args.threads)
        return train_text_model(args)

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    specs = shapes.all_specs()
    rows = caption_table(specs)
    texts = [r[2] for r in rows]
    distractors = distractor_texts(args.distractors, seed=args.seed)
    heldout_distractors = distractor_texts(200, seed=args.seed + 99_999)
    # half of the training distractors stay out of the vocabulary: their tokens train the unknown id
    token_map = build_token_map(texts + distractors[: len(distractors) // 2])
    context_length = 32
    tokenizer = RemappedTokenizer(token_map, context_length)
    vocab_size = int(token_map["eot_id"]) + 1
    model_cfg = {
        "embed_dim": 64,
        "vision_cfg": {
            "image_size": args.image_size,
            "patch_size": 8,
            "width": 128,
            "head_width": 64,
            "layers": 2,
            "mlp_ratio": 2.0,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": vocab_size,
            "width": 128,
            "heads": 2,
            "layers": 2,
            "mlp_ratio": 2.0,
        },
    }
    model = build_clip_from_config(model_cfg)
    n_params = sum(p.numel() for p in model.parameters())

    train_x, train_y = make_images(specs, range(args.train_seeds), args.image_size, salt=args.seed)
    eval_x, eval_y = make_images(
        specs, range(100_000, 100_000 + args.eval_seeds), args.image_size, salt=args.seed + 1
    )
    t_data = time.time() - t0

    tokens = tokenizer(texts)
    d_tokens = tokenizer(distractors)
    cap_spec = torch.tensor([r[0] for r in rows])
    colour_of = torch.tensor([list(shapes.COLOURS).index(s.colour) for s in specs])
    x_all = to_input(train_x, OPENAI_MEAN, OPENAI_STD)
    y_all = torch.from_numpy(train_y)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    log = []
    for step in range(args.steps):
        idx = torch.randint(0, len(x_all), (args.batch_size,), generator=gen)
        x = x_all[idx]
        flip = torch.rand(len(x), generator=gen) < 0.5
        x[flip] = x[flip].flip(-1)
        y = y_all[idx]
        img = F.normalize(model.encode_image(x), dim=-1)
        d_idx = torch.randint(0, len(d_tokens), (args.distractors_per_step,), generator=gen)
        dt = d_tokens[d_idx].clone()
        # random word dropout to the unknown id (inside the text, not start / end / padding)
        inner = (dt > token_map["sot_id"]) & (dt < token_map["eot_id"])
        dt[inner & (torch.rand(dt.shape, generator=gen) < 0.2)] = token_map["unknown_id"]
        txt_all = F.normalize(model.encode_text(torch.cat([tokens, dt])), dim=-1)
        txt, d_txt = txt_all[: len(tokens)], txt_all[len(tokens) :]
        sim = img @ txt.T  # [B, captions]
        d_sim = img @ d_txt.T
        match = y[:, None] == cap_spec[None, :]
        same_colour = colour_of[y][:, None] == colour_of[cap_spec][None, :]
        pos = F.relu(args.pos_margin - sim[match]).pow(2).mean()
        neg = F.relu(sim[~same_colour] - args.neg_margin).pow(2).mean()
        neg_shape = F.relu(sim[same_colour & ~match] - args.shape_margin).pow(2).mean()
        neg_d = F.relu(d_sim - args.neg_margin).pow(2).mean()
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * torch.cat([sim, d_sim], dim=1)
        target = torch.cat([match.float(), torch.zeros_like(d_sim)], dim=1)
        target = target / target.sum(1, keepdim=True)
        ce_img = -(target * logits.log_softmax(1)).sum(1).mean()
        # caption -> image direction over the captions' own spec classes in the batch
        ce_txt = F.cross_entropy(
            scale * sim.T, (match.T.float() / match.T.float().sum(1, keepdim=True).clamp(min=1))
        )
        loss = 4.0 * (pos + neg + neg_d) + 1.0 * neg_shape + 0.5 * (ce_img + ce_txt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            log.append({"step": step, "loss": round(float(loss.detach()), 4), "t": round(time.time() - t0, 1)})
            print(json.dumps(log[-1]), file=sys.stderr, flush=True)
    t_train = time.time() - t0 - t_data

    metrics = evaluate(
        model, tokenizer, specs, eval_x, eval_y, OPENAI_MEAN, OPENAI_STD, distractors=heldout_distractors
    )
    state = {k: v.detach().to(torch.float16) for k, v in model.state_dict().items()}
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "name": args.name,
        "model_config": model_cfg,
        "state_dict": state,
        "token_map": token_map,
        "image_mean": list(OPENAI_MEAN),
        "image_std": list(OPENAI_STD),
        "trained_on": "laionbuild.demo.shapes",
        "metrics": metrics,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / f"{args.name}.pt"
    torch.save(ckpt, ckpt_path)
    cfg_path = out / f"{args.name}.json"
    cfg_path.write_text(
        json.dumps(
            {
                "model_cfg": model_cfg,
                "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic",
                                   "resize_mode": "shortest"},
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    report = {
        "checkpoint": str(ckpt_path),
        "checkpoint_bytes": ckpt_path.stat().st_size,
        "params": n_params,
        "vocab_size": vocab_size,
        "train_images": len(train_x),
        "eval_images": len(eval_x),
        "eval_seeds": [100_000, 100_000 + args.eval_seeds],
        "steps": args.steps,
        "data_s": round(t_data, 1),
        "train_s": round(t_train, 1),
        "heldout": metrics,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
