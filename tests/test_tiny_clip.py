"""The packaged tiny demo CLIP really tells the demo captions' colours apart.

Images are rendered with seeds the training never used, go through a JPEG round
trip and the pipeline's centre-crop resize, and are scored by ClipScorer with
LAION's real thresholds (0.28 en, 0.26 multi / nolang).
"""

from __future__ import annotations

import io
import random

import numpy as np
import pytest

pytest.importorskip("open_clip")

from laionbuild import schema as S  # noqa: E402
from laionbuild.config import ClipConfig, ClipModelConfig, ResizeConfig  # noqa: E402
from laionbuild.demo import shapes  # noqa: E402
from laionbuild.models import clip as mc  # noqa: E402
from laionbuild.stages import clip_score as cs  # noqa: E402
from laionbuild.stages.resize import decode_and_resize  # noqa: E402

TINY = ClipModelConfig(arch="tiny-clip-shapes", pretrained="builtin:tiny-clip-shapes.pt")
#: the demo's multi / nolang: the tiny CLIP image tower + the tiny multilingual text model distilled from it
TINY_MIXED = ClipModelConfig(arch="tiny-clip-shapes", pretrained="builtin:tiny-clip-shapes.pt",
                             text_model="builtin:tiny-text-shapes")
SUBSET_OF = {"en": "en", "de": "multi", "fr": "multi", "es": "multi", "nolang": "nolang"}


def _pipeline_image(spec, seed: int, size: int, side: int, width: int) -> np.ndarray:
    """Render, JPEG round trip, and the fetch stage's own decode + centre-crop resize."""
    buf = io.BytesIO()
    shapes.render(spec, size=side, seed=seed, width=width).save(buf, format="JPEG", quality=85)
    arr, _, _ = decode_and_resize(buf.getvalue(), ResizeConfig(image_size=size, mode="center_crop"),
                                  max_pixels=89_478_484, min_size=1, formats=("JPEG",))
    return arr


def test_packaged_files_are_small_and_consistent():
    assert (mc.ASSETS_DIR / "tiny-clip-shapes.pt").stat().st_size < 3_000_000
    text_folder = mc.ASSETS_DIR / "tiny-text-shapes"
    assert sum(f.stat().st_size for f in text_folder.rglob("*") if f.is_file()) < 2_000_000
    assert mc.model_input_size(TINY) == 32
    loaded = mc.load_clip(TINY, "cpu")
    assert loaded.image_size == 32 and loaded.embed_dim == 64
    assert isinstance(loaded.tokenizer, mc.RemappedTokenizer)
    ids = loaded.tokenizer(["a photo of a red circle", "zebra xylophone"])
    assert int(ids[1].eq(loaded.tokenizer.unknown_id).sum()) >= 1
    assert int(ids.max()) < loaded.tokenizer.vocab_size


@pytest.mark.parametrize("towers", ["own", "mixed"])
def test_tiny_clip_separates_colours_at_laion_thresholds(towers):
    size = mc.model_input_size(TINY)
    other_towers = TINY if towers == "own" else TINY_MIXED
    if towers == "mixed":
        pytest.importorskip("transformers")
    cfg = ClipConfig(models={"en": TINY, "multi": other_towers, "nolang": other_towers}, device="cpu")
    scorer = cs.ClipScorer(cfg, size)
    assert (scorer.text_runners["multi"].text is not None) == (towers == "mixed")
    rng = random.Random(12345)
    colours = list(shapes.COLOURS)
    images, texts, subsets, kinds, langs = [], [], [], [], []
    for i, spec in enumerate(shapes.all_specs() * 2):
        side = rng.choice((96, 160, 256))
        img = _pipeline_image(spec, 700_000 + i, size, side, int(side * rng.choice((1.0, 1.25, 0.8))))
        for lang in SUBSET_OF:
            n_var = 3 if lang == "nolang" else len(shapes.TEMPLATES[lang])
            other = shapes.ShapeSpec(rng.choice([c for c in colours if c != spec.colour]), spec.shape)
            other2 = shapes.ShapeSpec(rng.choice([c for c in colours if c != spec.colour]),
                                      rng.choice(shapes.SHAPES))
            for kind, s in (("match", spec), ("other_colour", other), ("other_colour", other2)):
                images.append(img)
                texts.append(shapes.caption(s, lang, rng.randrange(n_var)))
                subsets.append(SUBSET_OF[lang])
                kinds.append(kind)
                langs.append(lang)
    n = len(texts)
    batch = {
        S.ALT_TEXT: np.array(texts, dtype=object),
        S.SUBSET: np.array(subsets, dtype=object),
        S.DROP_REASON: np.array([""] * n, dtype=object),
        S.IMAGE: np.stack(images),
    }
    out = scorer(batch)
    kept = out[S.DROP_REASON] == ""
    kinds = np.array(kinds)
    langs = np.array(langs)
    assert set(out[S.DROP_REASON]) <= {"", cs.DROP_BELOW}
    match, other = kinds == "match", kinds == "other_colour"
    assert kept[match].mean() >= 0.9, kept[match].mean()
    assert (~kept[other]).mean() >= 0.9, (~kept[other]).mean()
    for lang in SUBSET_OF:
        sel = langs == lang
        assert kept[match & sel].mean() >= 0.8, (lang, kept[match & sel].mean())
        assert (~kept[other & sel]).mean() >= 0.8, (lang, (~kept[other & sel]).mean())


def test_tiny_clip_drops_unrelated_alt_texts():
    size = mc.model_input_size(TINY)
    scorer = cs.ClipScorer(ClipConfig(models={"en": TINY, "multi": TINY, "nolang": TINY}, device="cpu"), size)
    unrelated = ["photo of a dog", "IMG_2041.jpg", "Buy cheap shoes online", "ein Haus am See", "2019-05-01",
                 "a wooden table in the kitchen", "😀🎉", "logo", "Fahrrad kaufen", "casa en la playa"]
    rng = random.Random(7)
    images, texts = [], []
    for i, spec in enumerate(shapes.all_specs()):
        img = _pipeline_image(spec, 800_000 + i, size, 128, 160)
        for t in unrelated:
            images.append(img)
            texts.append(t)
    n = len(texts)
    out = scorer({
        S.ALT_TEXT: np.array(texts, dtype=object),
        S.SUBSET: np.array([rng.choice(("en", "multi", "nolang")) for _ in range(n)], dtype=object),
        S.DROP_REASON: np.array([""] * n, dtype=object),
        S.IMAGE: np.stack(images),
    })
    assert (out[S.DROP_REASON] == cs.DROP_BELOW).mean() >= 0.9
