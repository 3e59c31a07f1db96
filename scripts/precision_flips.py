#!/usr/bin/env python
"""How many keep/drop decisions flip between fp32, bf16 and fp16 (autocast) near the thresholds.

Scores the same pairs with :class:`~laionbuild.stages.clip_score.ClipScorer` at each
precision on the available device and compares with fp32:

* ``tiny-clip-shapes``: the trained demo model on rendered shapes with matching
  and mismatching captions in four languages and emoji (similarities spread
  around the real thresholds 0.28 / 0.26);
* the demo's mixed towers: the same image tower with ``tiny-text-shapes``, the tiny
  multilingual text model distilled from its text tower, for multi / nolang;
* ``tiny-mixed``: a random tiny open_clip image tower with a random tiny
  multilingual DistilBERT + mean pooling + Dense text tower (the mixed path),
  where the threshold is put at the fp32 median so that many pairs sit near it.

For each model and precision: the largest and mean absolute change of the
similarity, the decisions that flip at the thresholds, how many pairs lie within
0.01 / 0.001 of a threshold, and the LAION filter tags that flip (tiny models: the
tags themselves mean nothing, their stability does). Prints JSON.

    python scripts/precision_flips.py [--device cuda] [--n 600]
"""

from __future__ import annotations

import argparse
import atexit
import json
import platform
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from laionbuild import schema as S  # noqa: E402
from laionbuild.config import ClipConfig, ClipModelConfig, SafetyConfig  # noqa: E402
from laionbuild.demo import shapes  # noqa: E402
from laionbuild.stages.clip_score import ClipScorer, resolve_device  # noqa: E402

THRESHOLDS = {"en": 0.28, "multi": 0.26, "nolang": 0.26}


def shapes_batch(n: int, size: int, seed: int) -> dict:
    rng = random.Random(seed)
    specs = shapes.all_specs()
    images, texts, subsets = [], [], []
    for i in range(n):
        spec = rng.choice(specs)
        shown = spec if i % 2 == 0 else rng.choice(specs)  # half matching, half mostly not
        lang = rng.choice(shapes.LANGUAGES + ("nolang",))
        texts.append(shapes.caption(shown, lang, rng.randint(0, 2)))
        subsets.append("en" if lang == "en" else ("nolang" if lang == "nolang" else "multi"))
        images.append(np.asarray(shapes.render(spec, size=size, seed=i)))
    return {S.ALT_TEXT: np.array(texts, dtype=object), S.SUBSET: np.array(subsets, dtype=object),
            S.DROP_REASON: np.array([""] * n, dtype=object), S.IMAGE: np.stack(images).astype(np.uint8)}


def compare(name: str, cfg_of, batch: dict, thresholds: dict, precisions, device: str) -> dict:
    outs = {}
    for p in precisions:
        cfg = cfg_of(p, thresholds)
        try:
            outs[p] = ClipScorer(cfg, batch[S.IMAGE].shape[1], safety=SafetyConfig())(dict(batch))
        except Exception as exc:  # a precision the device does not support
            outs[p] = exc
    ref = outs["fp32"]
    thr = np.array([thresholds[s] for s in batch[S.SUBSET]], dtype=np.float64)
    sim32 = ref[S.SIMILARITY].astype(np.float64)
    res = {"model": name, "pairs": int(len(sim32)), "thresholds": thresholds,
           "near_0.01": int((np.abs(sim32 - thr) < 0.01).sum()),
           "near_0.001": int((np.abs(sim32 - thr) < 0.001).sum()), "vs_fp32": {}}
    for p, out in outs.items():
        if p == "fp32":
            continue
        if isinstance(out, Exception):
            res["vs_fp32"][p] = {"error": f"{type(out).__name__}: {out}"[:200]}
            continue
        sim = out[S.SIMILARITY].astype(np.float64)
        d = np.abs(sim - sim32)
        flips = (sim >= thr) != (sim32 >= thr)
        res["vs_fp32"][p] = {
            "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "decision_flips": int(flips.sum()),
            "flips_kept_to_dropped": int((flips & (sim32 >= thr)).sum()),
            "nsfw_tag_flips": int((out[S.NSFW] != ref[S.NSFW]).sum()),
            "drop_reason_flips": int((out[S.DROP_REASON] != ref[S.DROP_REASON]).sum()),
        }
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--n", type=int, default=600)
    args = ap.parse_args(argv)
    device = resolve_device(ClipConfig(device=args.device))
    precisions = ("fp32", "bf16", "fp16")
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else
              f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)", "torch": torch.__version__,
              "autocast": "weights fp32, forward under torch.autocast(dtype)", "results": []}

    tiny = ClipModelConfig("tiny-clip-shapes", "builtin:tiny-clip-shapes.pt")
    batch = shapes_batch(args.n, 32, seed=1)

    def tiny_cfg(p, thr):
        return ClipConfig(models={s: tiny for s in S.SUBSETS}, thresholds=thr, device=device, precision=p,
                          batch_size=128)

    report["results"].append(compare("tiny-clip-shapes (trained demo model)", tiny_cfg, batch, THRESHOLDS,
                                     precisions, device))
    print(json.dumps(report["results"][-1]), file=sys.stderr, flush=True)
    demo_text = ClipModelConfig("tiny-clip-shapes", "builtin:tiny-clip-shapes.pt", text_model="builtin:tiny-text-shapes")

    def demo_cfg(p, thr):
        return ClipConfig(models={"en": tiny, "multi": demo_text, "nolang": demo_text}, thresholds=thr, device=device,
                          precision=p, batch_size=128)

    report["results"].append(compare("demo mixed towers (tiny CLIP image + tiny-text-shapes text)", demo_cfg, batch,
                                     THRESHOLDS, precisions, device))

    from test_text_tower import _tiny_clip, build_tiny_st  # the tiny models the tests build

    tmp = Path(tempfile.mkdtemp(prefix="flips-"))
    atexit.register(shutil.rmtree, tmp, True)
    image = _tiny_clip(tmp)
    mixed = ClipModelConfig(image.arch, image.pretrained, text_model=str(build_tiny_st(tmp / "st")))
    rng = np.random.RandomState(3)
    mb = dict(batch)
    mb[S.IMAGE] = rng.randint(0, 256, size=batch[S.IMAGE].shape).astype(np.uint8)

    def mixed_cfg(p, thr):
        return ClipConfig(models={"en": image, "multi": mixed, "nolang": mixed}, thresholds=thr, device=device,
                          precision=p, batch_size=128)

    free = ClipScorer(mixed_cfg("fp32", {s: -1.0 for s in S.SUBSETS}), 32)(dict(mb))[S.SIMILARITY]
    thr = {s: round(float(np.median(free[mb[S.SUBSET] == s])), 6) for s in S.SUBSETS}
    report["results"].append(compare("tiny-mixed (random tiny image tower + tiny multilingual text model)",
                                     mixed_cfg, mb, thr, precisions, device))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
