"""LAION-5B's prompt-based filter of illegal content, and its ``NSFW`` tag.

LAION-5B compared the CLIP image embedding of every pair that passed the
similarity threshold with three fixed lists of text prompts, encoded with the
ViT-B/32 text tower (rvencu/crawlingathome-gpu-hcloud, ``gpu_inference.py``:
class ``CLIP`` and ``df_clipfilter``; ``multigpu.py`` has the same rules). The
lists, the split indices and the words are data in
:class:`~laionbuild.config.LaionFilterConfig` (``safety.laion_filter``):

* ``NSFW`` tag from the top 2 category prompts: ``UNLIKELY`` when both are in
  the safe part (index < ``nsfw_from``), ``NSFW`` when both are in the NSFW
  part, else ``UNSURE``;
* a row that is not ``UNLIKELY`` is dropped with ``laion_filter:underage_prompt``
  when one of its top 2 prompts of the underage list is an underage one (index
  < ``underage_count``), else with ``laion_filter:underage_word`` when its TEXT
  contains one of the words (case-sensitive substring, as LAION's ``x in TEXT``),
  else with ``laion_filter:animal`` when its top prompt of the animal list is an
  animal (index >= ``animal_from``). ``UNLIKELY`` rows are never dropped here.

LAION ranked prompts by softmax(100 * cosine); softmax is increasing, so the
ranking by cosine used here is the same (and cannot collapse into ties when
small probabilities underflow). The filter runs inside
:class:`~laionbuild.stages.clip_score.ClipScorer`, which holds the image
embedding; :func:`decide` is the rule on the prompt indices, a pure function.
Nothing here imports Ray.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..config import ClipConfig, LaionFilterConfig, SafetyConfig
from ..schema import DROP_REASON
from ..stats import StageCounters

logger = logging.getLogger(__name__)

STAGE = "laion_filter"
UNDERAGE_PROMPT = "underage_prompt"
UNDERAGE_WORD = "underage_word"
ANIMAL = "animal"
DROP_UNDERAGE_PROMPT = f"{STAGE}:{UNDERAGE_PROMPT}"
DROP_UNDERAGE_WORD = f"{STAGE}:{UNDERAGE_WORD}"
DROP_ANIMAL = f"{STAGE}:{ANIMAL}"
UNLIKELY, UNSURE, NSFW_TAG = "UNLIKELY", "UNSURE", "NSFW"
NSFW_TAGS = (UNLIKELY, UNSURE, NSFW_TAG)


def top_matches(image_features, prompt_features, k: int):
    """Indices of the ``k`` prompts closest to each L2-normalised image embedding (torch, ``[n, k]``)."""
    import torch

    with torch.autocast(device_type=image_features.device.type, enabled=False):
        sims = image_features.float() @ prompt_features.float().T
    return sims.topk(k, dim=1).indices


def decide(category_top2: np.ndarray, underage_top2: np.ndarray, animal_top1: np.ndarray,
           texts: Sequence[str], cfg: LaionFilterConfig) -> tuple[np.ndarray, np.ndarray]:
    """LAION-5B's rule: (``NSFW`` tag, drop reason or "") per row from its prompt indices.

    ``category_top2`` / ``underage_top2``: ``[n, 2]`` indices of the two closest
    prompts of the category / underage lists, ``animal_top1``: ``[n]`` index of
    the closest animal-list prompt, ``texts``: the rows' TEXT.
    """
    cat = np.asarray(category_top2).reshape(-1, 2)
    und = np.asarray(underage_top2).reshape(-1, 2)
    ani = np.asarray(animal_top1).reshape(-1)
    n = len(cat)
    nsfw_votes = (cat >= cfg.nsfw_from).sum(axis=1)
    tags = np.asarray(NSFW_TAGS, dtype=object)[nsfw_votes]
    reasons = np.full(n, "", dtype=object)
    unlikely = nsfw_votes == 0
    words = tuple(cfg.underage_words)
    for i in np.flatnonzero(~unlikely):
        if (und[i] < cfg.underage_count).any():
            reasons[i] = DROP_UNDERAGE_PROMPT
        elif any(w in str(texts[i]) for w in words):
            reasons[i] = DROP_UNDERAGE_WORD
        elif ani[i] >= cfg.animal_from:
            reasons[i] = DROP_ANIMAL
    return tags, reasons


class LaionFilterPrompts:
    """The three prompt lists encoded by one text tower (L2-normalised, on its device).

    ``encode`` maps a list of prompts to their text embeddings (a torch tensor);
    :meth:`top` gives the prompt indices :func:`decide` reads.
    """

    def __init__(self, cfg: LaionFilterConfig, encode: Callable[[list[str]], Any]):
        import torch.nn.functional as F

        self.cfg = cfg
        self.category = F.normalize(encode(list(cfg.category_prompts)).float(), dim=-1)
        self.underage = F.normalize(encode(list(cfg.underage_prompts)).float(), dim=-1)
        self.animal = F.normalize(encode(list(cfg.animal_prompts)).float(), dim=-1)

    def top(self, image_features):
        """(category top 2, underage top 2, animal top 1) device tensors for L2-normalised image embeddings."""
        return (top_matches(image_features, self.category, 2), top_matches(image_features, self.underage, 2),
                top_matches(image_features, self.animal, 1)[:, 0])

    def apply(self, image_features, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tags and drop reasons of L2-normalised image embeddings and their texts."""
        cat, und, ani = self.top(image_features)
        return decide(cat.cpu().numpy(), und.cpu().numpy(), ani.cpu().numpy(), texts, self.cfg)


def model_warnings(clip_cfg: ClipConfig, safety_cfg: SafetyConfig) -> list[str]:
    """Start-up warnings: subsets whose image tower is not the model the prompts were written for."""
    lf = safety_cfg.laion_filter
    if not lf.enabled:
        return []
    want = lf.prompts_model.strip().replace("/", "-").lower()
    out = []
    for subset, m in sorted(clip_cfg.models.items()):
        name = f"{m.arch}/{m.pretrained}"
        if name.replace("/", "-").lower() != want:
            out.append(
                f"safety.laion_filter: subset {subset} is scored with {name}, but LAION-5B's filter prompts were "
                f"written for {lf.prompts_model}; its NSFW tags and drops only mean what LAION meant with that model"
            )
    return out


def summary(clip_cfg: ClipConfig, safety_cfg: SafetyConfig) -> dict[str, Any]:
    """What stats.json / provenance.json record about the filter (``enabled`` false = it was off)."""
    lf = safety_cfg.laion_filter
    return {
        "enabled": bool(lf.enabled),
        "stage": STAGE,
        "prompts_model": lf.prompts_model,
        "models": {s: f"{m.arch}/{m.pretrained}" for s, m in sorted(clip_cfg.models.items())},
        "warnings": model_warnings(clip_cfg, safety_cfg),
        **({} if lf.enabled else {"note": "off (safety.laion_filter.enabled=false): no NSFW column, "
                                          "no underage / animal drops"}),
    }


def laion_filter_counters(batch: Mapping[str, np.ndarray]) -> StageCounters:
    """Drops of the filter by reason (``underage_prompt``, ``underage_word``, ``animal``)."""
    c = StageCounters()
    drop = np.asarray(batch[DROP_REASON], dtype=object)
    for reason, k in Counter(str(r)[len(STAGE) + 1:] for r in drop if str(r).startswith(STAGE + ":")).items():
        c.drop(reason, k)
    c.kept = int((drop == "").sum())
    return c


def stage_counters(batch: Mapping[str, np.ndarray], later: Sequence[str] = ()) -> StageCounters:
    """The stage's counters for :mod:`.registry`."""
    return laion_filter_counters(batch)
