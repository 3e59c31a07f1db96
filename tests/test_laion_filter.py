"""LAION-5B's safety filter: the rule on prompt indices and on constructed embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from laionbuild import schema as S
from laionbuild.config import ClipConfig, ClipModelConfig, LaionFilterConfig, SafetyConfig, load_config
from laionbuild.stages import laion_filter as lf

CFG = LaionFilterConfig()


def test_defaults_are_laions_lists():
    """The lists as gpu_inference.py ran them (35 / 8 / 33 prompts, split at 19 / 4 / 21)."""
    assert len(CFG.category_prompts) == 35 and CFG.nsfw_from == 19
    assert CFG.category_prompts[5] == "animal, bird, mammal, insectfashion, clothes"  # LAION's missing comma
    assert CFG.category_prompts[18].startswith("porn, sex, sperm, nipples, breats")  # in the safe part
    assert CFG.category_prompts[19] == "porn, sex, sperm, nipples"
    assert len(CFG.underage_prompts) == 8 and CFG.underage_count == 4
    assert CFG.underage_prompts[3] == "baby, toddler" and CFG.underage_prompts[4].startswith("adult")
    assert len(CFG.animal_prompts) == 33 and CFG.animal_from == 21
    assert CFG.animal_prompts[20] == "man, woman" and CFG.animal_prompts[21] == "animal"
    assert CFG.underage_words == ("teen", "kid", "child", "baby")
    assert CFG.enabled and load_config(None).safety.laion_filter == CFG


def test_rule_on_indices():
    cat = np.array([[0, 1], [19, 20], [5, 25], [19, 30], [19, 20], [18, 3], [18, 19], [2, 19], [20, 21]])
    und = np.array([[0, 1], [1, 5], [4, 5], [4, 6], [4, 5], [0, 2], [6, 3], [5, 6], [7, 6]])
    ani = np.array([25, 0, 0, 22, 3, 30, 0, 21, 20])
    texts = ["a teen", "x", "my baby", "x", "x", "x", "x", "Teenager Kid", "x"]
    tags, reasons = lf.decide(cat, und, ani, texts, CFG)
    assert list(tags) == ["UNLIKELY", "NSFW", "UNSURE", "NSFW", "NSFW", "UNLIKELY", "UNSURE", "UNSURE", "NSFW"]
    assert list(reasons) == [
        "",                       # UNLIKELY: never dropped, whatever the words or the animal match
        lf.DROP_UNDERAGE_PROMPT,  # an underage prompt (index 1) in the top 2
        lf.DROP_UNDERAGE_WORD,    # "baby" in the text
        lf.DROP_ANIMAL,           # top animal-list prompt is an animal
        "",                       # NSFW but adult, not an animal: kept with its tag
        "",                       # index 18 is in the safe part: UNLIKELY
        lf.DROP_UNDERAGE_PROMPT,  # second underage match (index 3) counts too
        lf.DROP_ANIMAL,           # words are case-sensitive, as LAION's `x in TEXT`; 21 is an animal
        "",                       # 20 ("man, woman") is not
    ]
    assert lf.DROP_UNDERAGE_PROMPT == "laion_filter:underage_prompt"


class _Basis:
    """Encodes every prompt of the three lists as its own basis vector (position-based)."""

    def __init__(self, cfg: LaionFilterConfig):
        self.offsets = {}
        k = 0
        for name in ("category_prompts", "underage_prompts", "animal_prompts"):
            self.offsets[name] = k
            k += len(getattr(cfg, name))
        self.dim = k + 4
        self.cfg = cfg
        self.calls = 0

    def encode(self, prompts):
        for name, off in self.offsets.items():
            if list(prompts) == list(getattr(self.cfg, name)):
                self.calls += 1
                return torch.eye(self.dim)[off:off + len(prompts)] * 3.0  # not normalised on purpose
        raise AssertionError("unexpected prompts")

    def image(self, cat, und, ani):
        v = torch.zeros(self.dim)
        for w, i in zip((1.0, 0.9), cat):
            v[self.offsets["category_prompts"] + i] = w
        for w, i in zip((1.0, 0.9), und):
            v[self.offsets["underage_prompts"] + i] = w
        v[self.offsets["animal_prompts"] + ani] = 1.0
        v[-1] = 0.5  # a component no prompt has
        return v / v.norm()


def test_rule_on_constructed_embeddings():
    basis = _Basis(CFG)
    prompts = lf.LaionFilterPrompts(CFG, basis.encode)
    assert basis.calls == 3
    cases = [  # (category top 2, underage top 2, animal top 1, text, tag, reason)
        ((0, 7), (0, 2), 22, "teen kid", "UNLIKELY", ""),
        ((21, 33), (2, 6), 3, "a photo", "NSFW", lf.DROP_UNDERAGE_PROMPT),
        ((12, 27), (5, 4), 3, "child actor", "UNSURE", lf.DROP_UNDERAGE_WORD),
        ((20, 25), (6, 7), 29, "a photo", "NSFW", lf.DROP_ANIMAL),
        ((20, 25), (6, 7), 2, "a photo", "NSFW", ""),
    ]
    images = torch.stack([basis.image(c, u, a) for c, u, a, *_ in cases])
    cat, und, ani = prompts.top(images)
    assert cat.tolist() == [list(c[0]) for c in cases]
    assert und.tolist() == [list(c[1]) for c in cases]
    assert ani.tolist() == [c[2] for c in cases]
    tags, reasons = prompts.apply(images, [c[3] for c in cases])
    assert list(tags) == [c[4] for c in cases]
    assert list(reasons) == [c[5] for c in cases]


def test_counters_summary_and_warnings():
    batch = {S.DROP_REASON: np.array(["", lf.DROP_ANIMAL, lf.DROP_ANIMAL, "clip:below_threshold",
                                      lf.DROP_UNDERAGE_WORD], dtype=object)}
    c = lf.laion_filter_counters(batch)
    assert c.dropped_by_reason == {"animal": 2, "underage_word": 1} and c.kept == 1
    faithful = load_config(None)
    assert lf.model_warnings(faithful.clip, faithful.safety) == []
    assert lf.summary(faithful.clip, faithful.safety)["enabled"] is True
    tiny = ClipConfig(models={s: ClipModelConfig("tiny-clip-shapes", "builtin:tiny-clip-shapes.pt")
                              for s in S.SUBSETS})
    warnings = lf.model_warnings(tiny, faithful.safety)
    assert len(warnings) == 3 and "ViT-B-32/openai" in warnings[0]
    off = SafetyConfig(laion_filter=LaionFilterConfig(enabled=False))
    s = lf.summary(tiny, off)
    assert s["enabled"] is False and "off" in s["note"] and lf.model_warnings(tiny, off) == []


def test_bad_split_refused():
    from laionbuild.errors import ConfigError

    for key, value in (("nsfw_from", 0), ("underage_count", 8), ("animal_from", 33)):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [f"safety.laion_filter.{key}={value}"])
