"""CLIP similarity scoring: the LAION-5B image-text filter, and LAION-5B's safety filter.

Every alive row (``DROP_REASON == ""``) with a subset is scored with the models
configured for its subset (``clip.models.en`` / ``multi`` / ``nolang``): the image
embedding comes from the open_clip model (``arch`` / ``pretrained``), the text
embedding from that model's own text tower or, with ``text_model``, from another
model that embeds text into the same space (LAION-5B scored multi and nolang with
OpenAI's ViT-B/32 image tower and the multilingual
``sentence-transformers/clip-ViT-B-32-multilingual-v1`` text model). The cosine
similarity of the two L2-normalised embeddings is written to ``SIMILARITY`` and
rows under ``clip.thresholds[subset]`` are dropped with ``clip:below_threshold``.
Subsets that share an image tower share its forward pass: every row goes through
one image forward, whatever the subsets of the batch.

With ``safety.laion_filter.enabled`` (the default) the rows kept by the threshold
get LAION-5B's ``NSFW`` tag and the rows its rules reject are dropped with
``laion_filter:underage_prompt`` / ``underage_word`` / ``animal`` (see
:mod:`laionbuild.stages.laion_filter`).

Images arrive as ``uint8 [N, S, S, 3]`` already resized on CPU by the fetch
stage; the conversion to float and the normalisation happen on the scoring
device. Nothing here imports Ray: :class:`ClipScorer` is a plain callable that
the pipeline wraps in an actor, and that tests and benchmarks call directly.

Model loading never downloads (:mod:`laionbuild.models.clip`, :mod:`laionbuild.models.text_tower`). ``clip.models.<subset>`` names

* ``arch``: an open_clip architecture (``ViT-B-32``), a model config JSON path
  (plain or ``builtin:<file>`` inside ``laionbuild/assets``), the name of a JSON
  file in ``laionbuild/assets`` (``tiny-clip-shapes``) or ``local-dir:<folder>``
  holding ``open_clip_config.json``;
* ``pretrained``: an open_clip pretrained tag looked up in the local caches
  (Hugging Face hub cache, then open_clip's URL cache), or a checkpoint path
  (``builtin:<file>`` for a file in ``laionbuild/assets``);
* ``text_model``: empty, or a sentence-transformers model (Hugging Face id in the
  local cache, or a folder).

Missing weights or tokenizer files raise :class:`~laionbuild.errors.ModelMissingError`
saying which file is expected where. See docs/clip.md.

With ``safety.punsafe_heads`` the NSFW head of a subset reads the same
L2-normalised image embedding and writes ``punsafe``; with
``safety.watermark_model`` the watermark classifier scores the images of the
rows kept here and writes ``pwatermark`` (see :mod:`laionbuild.stages.safety`
and docs/safety_models.md).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Mapping

import numpy as np

from ..config import ClipConfig, LaionFilterConfig, SafetyConfig
from ..errors import ConfigError
from ..schema import ALT_TEXT, DROP_REASON, IMAGE, NSFW, PUNSAFE, PWATERMARK, SIMILARITY, SUBSET, image_rows
from ..stats import StageCounters
from ..models.clip import (  # noqa: F401  (check_models_available: the driver checks this stage's models through it)
    LoadedClip,
    check_models_available,
    context_length,
    load_clip,
    load_clip_tokenizer,
    model_input_size,
    model_key,
    resolve_device,
    resolve_precision,
)
from ..models.text_tower import LoadedTextModel, load_text_model, load_text_tokenizer, text_key, text_model_name
from . import laion_filter as lf

logger = logging.getLogger(__name__)

IMAGE_EMBEDDING = "image_embedding"
TEXT_EMBEDDING = "text_embedding"
#: optional upstream-tokenised text column (see :class:`ClipTokenizer`)
CLIP_TOKENS = "clip_tokens"
BELOW_THRESHOLD = "below_threshold"
DROP_BELOW = f"clip:{BELOW_THRESHOLD}"
DROP_BAD_IMAGE = "clip:bad_image"
DROP_NO_SUBSET = "clip:no_subset"
NSFW_TAGS = lf.NSFW_TAGS


# --------------------------------------------------------------------------- upstream tokenising
class ClipTokenizer:
    """Tokenise texts upstream (CPU workers) into a ``clip_tokens`` int32 column.

    Loads only the tokenizers (no weights), the one of each subset's text tower.
    :class:`ClipScorer` uses the column when present instead of tokenising in the
    scoring actor. Rows of a subset whose tokenizer has a shorter context are
    zero-padded to the longest context.
    """

    def __init__(self, clip_cfg: ClipConfig):
        self.tokenizers: dict[str, Any] = {}
        by_key: dict[tuple, Any] = {}
        for subset, mcfg in clip_cfg.models.items():
            key = ("text",) + text_key(mcfg) if text_model_name(mcfg) else model_key(mcfg)
            if key not in by_key:
                by_key[key] = load_text_tokenizer(mcfg) if text_model_name(mcfg) else load_clip_tokenizer(mcfg)
            self.tokenizers[subset] = by_key[key]
        self.width = max(context_length(t) for t in self.tokenizers.values())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[DROP_REASON])
        out = np.zeros((n, self.width), dtype=np.int32)
        alive = batch[DROP_REASON] == ""
        subsets = batch[SUBSET]
        for subset, tok in self.tokenizers.items():
            idx = np.flatnonzero(alive & (subsets == subset))
            if len(idx):
                ids = tok([str(t) for t in batch[ALT_TEXT][idx]]).numpy()
                out[idx, : ids.shape[1]] = ids
        res = dict(batch)
        res[CLIP_TOKENS] = out
        return res


# --------------------------------------------------------------------------- scoring
def _autocast(device, amp_dtype):
    import contextlib

    import torch

    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


class _Runner:
    """One loaded open_clip model (its image tower, and its own text tower) on the scoring device."""

    def __init__(self, loaded: LoadedClip, device: str, precision: str, channels_last: bool, compile_model: bool):
        import torch

        self.loaded = loaded
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        model = loaded.model
        if self.cuda and channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.encode_image = model.encode_image
        self.encode_text = model.encode_text
        if compile_model:
            self.encode_image = torch.compile(model.encode_image, dynamic=True)
            self.encode_text = torch.compile(model.encode_text, dynamic=True)
        self.channels_last = channels_last and self.cuda
        std = torch.tensor(loaded.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        mean = torch.tensor(loaded.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        # x_norm = (x / 255 - mean) / std = x * scale + shift
        self.scale = 1.0 / (255.0 * std)
        self.shift = -mean / std
        #: LAION-5B's filter prompts encoded by this model's own text tower
        self.filter_prompts: lf.LaionFilterPrompts | None = None

    def autocast(self):
        return _autocast(self.device, self.amp_dtype)

    def upload(self, array: np.ndarray):
        import torch

        t = torch.from_numpy(array)
        if self.cuda:
            t = t.pin_memory().to(self.device, non_blocking=True)
        return t

    def images_to_input(self, images: np.ndarray):
        x = self.upload(np.ascontiguousarray(images))  # uint8 [n, S, S, 3]
        x = x.permute(0, 3, 1, 2).float().mul_(self.scale).add_(self.shift)
        if self.channels_last:
            import torch

            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def text_features(self, tokens):
        import torch
        import torch.nn.functional as F

        with torch.inference_mode(), self.autocast():
            return F.normalize(self.encode_text(tokens.to(self.device)).float(), dim=-1)

    def encode_prompts(self, prompts: list[str]):
        return self.text_features(self.loaded.tokenizer(prompts))


class _TextRunner:
    """The text tower of a subset: an open_clip model's own tower or a separate text model."""

    def __init__(self, runner: _Runner, text: LoadedTextModel | None = None):
        self.runner = runner
        self.text = text
        self.tokenizer = text.tokenizer if text is not None else runner.loaded.tokenizer
        self.encode_text = text.model.encode_text if text is not None else runner.encode_text
        self.embed_dim = text.embed_dim if text is not None else runner.loaded.embed_dim
        self.name = text.name if text is not None else runner.loaded.name


class ClipScorer:
    """Scores alive rows with the models of their subset; see the module docstring.

    ``models`` (subset -> :class:`LoadedClip`) replaces loading the open_clip models
    from the config, ``text_models`` (subset -> :class:`LoadedTextModel`) the separate
    text towers (tests, benchmarks); with ``models`` given, a subset missing from
    ``text_models`` uses its open_clip model's own text tower. ``keep_image`` keeps
    the ``IMAGE`` column in the output. ``safety`` adds LAION-5B's filter
    (``safety.laion_filter``), the ``punsafe`` heads and the ``pwatermark``
    classifier (``punsafe_heads`` / ``watermark`` replace loading them, like
    ``models``); without ``safety`` none of them runs.
    """

    def __init__(
        self,
        clip_cfg: ClipConfig,
        image_size: int,
        *,
        keep_image: bool = False,
        models: Mapping[str, LoadedClip] | None = None,
        text_models: Mapping[str, LoadedTextModel] | None = None,
        channels_last: bool = True,
        compile_model: bool | None = None,
        safety: SafetyConfig | None = None,
        punsafe_heads: Mapping[str, Any] | None = None,
        watermark: Any = None,
    ):
        self.cfg = clip_cfg
        self.image_size = int(image_size)
        self.keep_image = keep_image
        self.device = resolve_device(clip_cfg)
        self.precision = resolve_precision(clip_cfg, self.device)
        compile_model = clip_cfg.compile if compile_model is None else compile_model
        self.thresholds = {k: float(v) for k, v in clip_cfg.thresholds.items()}
        self.runners: dict[str, _Runner] = {}
        self.text_runners: dict[str, _TextRunner] = {}
        by_key: dict[Any, _Runner] = {}
        text_by_key: dict[Any, _TextRunner] = {}
        loaded_text: dict[Any, LoadedTextModel] = {}
        if models is None:
            for subset, mcfg in clip_cfg.models.items():
                expected = model_input_size(mcfg)
                if expected != self.image_size:
                    raise ConfigError(
                        f"clip.models.{subset} ({mcfg.arch}) expects {expected}x{expected} images but "
                        f"resize.image_size is {self.image_size}; set resize.image_size={expected}"
                    )
            for subset, mcfg in clip_cfg.models.items():
                key = model_key(mcfg)
                if key not in by_key:
                    by_key[key] = _Runner(
                        load_clip(mcfg, self.device), self.device, self.precision, channels_last, compile_model
                    )
                self.runners[subset] = runner = by_key[key]
                if text_model_name(mcfg):
                    if text_key(mcfg) not in loaded_text:  # each text model once, even beside two image towers
                        loaded_text[text_key(mcfg)] = load_text_model(mcfg, self.device)
                    tkey = ("text",) + text_key(mcfg) + (id(runner),)
                    if tkey not in text_by_key:
                        text_by_key[tkey] = _TextRunner(runner, loaded_text[text_key(mcfg)])
                else:
                    tkey = ("own", id(runner))
                    text_by_key.setdefault(tkey, _TextRunner(runner))
                self.text_runners[subset] = text_by_key[tkey]
        else:
            for subset, loaded in models.items():
                if loaded.image_size != self.image_size:
                    raise ConfigError(
                        f"model for {subset} ({loaded.name}) expects {loaded.image_size}px images, got {self.image_size}"
                    )
                key = id(loaded)
                if key not in by_key:
                    loaded.model.to(self.device).eval()
                    by_key[key] = _Runner(loaded, self.device, self.precision, channels_last, bool(compile_model))
                self.runners[subset] = runner = by_key[key]
                text = (text_models or {}).get(subset)
                if text is not None:
                    text.model.to(self.device).eval()
                    tkey = ("text", id(text), id(runner))
                    text_by_key.setdefault(tkey, _TextRunner(runner, text))
                else:
                    tkey = ("own", id(runner))
                    text_by_key.setdefault(tkey, _TextRunner(runner))
                self.text_runners[subset] = text_by_key[tkey]
        for subset, tr in self.text_runners.items():
            if tr.embed_dim != tr.runner.loaded.embed_dim:
                raise ConfigError(
                    f"clip.models.{subset}: the text model {tr.name} gives {tr.embed_dim}-d embeddings but the image "
                    f"tower of {tr.runner.loaded.name} gives {tr.runner.loaded.embed_dim}-d ones"
                )
        distinct = list({id(r): r for r in self.runners.values()}.values())
        self.embed_dim = max(r.loaded.embed_dim for r in distinct)
        if clip_cfg.save_embeddings and len({r.loaded.embed_dim for r in distinct}) > 1:
            raise ConfigError("clip.save_embeddings needs all clip.models to have the same embedding size")
        # without a safety config (tests, benchmarks) no safety stage runs; the runner
        # passes cfg.safety, whose default has LAION-5B's filter on
        self.filter_cfg = safety.laion_filter if safety is not None else LaionFilterConfig(enabled=False)
        if self.filter_cfg.enabled:
            for r in distinct:
                r.filter_prompts = lf.LaionFilterPrompts(self.filter_cfg, r.encode_prompts)
            names = {s: r.loaded.name for s, r in self.runners.items()}
            want = self.filter_cfg.prompts_model.replace("/", "-").lower()
            for subset, name in sorted(names.items()):
                if name.replace("/", "-").lower() != want:
                    logger.warning("safety.laion_filter: subset %s is scored with %s, but LAION-5B's filter prompts "
                                   "were written for %s; its NSFW tags and drops only mean what LAION meant with "
                                   "that model", subset, name, self.filter_cfg.prompts_model)
        elif safety is not None:
            logger.warning("safety.laion_filter is off (safety.laion_filter.enabled=false): no NSFW column and no "
                           "underage / animal drops; LAION-5B applied this filter")
        self._setup_safety(safety, punsafe_heads, watermark)
        #: seconds spent tokenising inside this object (measurement for the benchmark)
        self.tokenize_s = 0.0
        #: image forwards run so far, in rows (measurement for tests and the benchmark)
        self.image_rows_encoded = 0

    def _setup_safety(self, safety: SafetyConfig | None, heads: Mapping[str, Any] | None, watermark: Any) -> None:
        """Load the punsafe head of each subset (each checkpoint once) and the watermark classifier."""
        from . import safety as sf

        self.punsafe_heads: dict[str, Any] = {}
        if heads is None and safety is not None:
            loaded: dict[str, Any] = {}
            heads = {}
            for subset, value in safety.punsafe_heads.items():
                if value:
                    if value not in loaded:
                        loaded[value] = sf.load_punsafe_head(value, self.device, f"safety.punsafe_heads.{subset}")
                    heads[subset] = loaded[value]
        for subset, head in (heads or {}).items():
            runner = self.runners.get(subset)
            if runner is None:
                raise ConfigError(f"safety.punsafe_heads.{subset}: no clip model scores subset '{subset}'")
            if head.embed_dim != runner.loaded.embed_dim:
                raise ConfigError(
                    f"safety.punsafe_heads.{subset}: the head reads {head.embed_dim}-d embeddings but the clip model "
                    f"of {subset} ({runner.loaded.name}) gives {runner.loaded.embed_dim}-d ones"
                )
            arch, _, pretrained = runner.loaded.name.partition("/")
            if not sf.same_clip_model(head.clip_model, arch, pretrained):
                logger.warning("punsafe head %s was trained on %s embeddings; subset %s is scored with %s",
                               head.path or head.name, head.clip_model, subset, runner.loaded.name)
            head.module.to(self.device)
            self.punsafe_heads[subset] = head
        # per runner: (head, subsets it serves)
        self._heads_of: dict[int, list[tuple[Any, list[str]]]] = {}
        for subset, head in self.punsafe_heads.items():
            entries = self._heads_of.setdefault(id(self.runners[subset]), [])
            for h, subs in entries:
                if h is head:
                    subs.append(subset)
                    break
            else:
                entries.append((head, [subset]))
        self.watermark = watermark
        if watermark is None and safety is not None and safety.watermark_model:
            self.watermark = sf.WatermarkScorer(
                safety.watermark_model, self.image_size, device=self.device, precision=self.precision,
                batch_size=safety.watermark_batch_size,
            )

    # ..................................................................... helpers
    def _image_rows(self, images: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [k, S, S, 3] for rows ``idx``; also the mask of rows whose image is unusable."""
        return image_rows(images, idx, self.image_size)

    # ..................................................................... call
    def _tokens(self, text_runner: _TextRunner, rows: np.ndarray, texts, tokens_col):
        import time

        import torch

        t0 = time.perf_counter()
        if tokens_col is not None:
            ctx = context_length(text_runner.tokenizer)
            tok = torch.from_numpy(np.ascontiguousarray(tokens_col[rows, :ctx], dtype=np.int64))
        else:
            tok = text_runner.tokenizer([str(t) for t in texts[rows]])
        self.tokenize_s += time.perf_counter() - t0
        runner = text_runner.runner
        return runner.upload(tok.numpy()) if runner.cuda else tok

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        import torch.nn.functional as F

        out = dict(batch)
        drop = np.asarray(batch[DROP_REASON], dtype=object).copy()
        n = len(drop)
        subsets = np.asarray(batch[SUBSET], dtype=object)
        sim = np.full(n, np.nan, dtype=np.float32)
        save = self.cfg.save_embeddings
        if save:
            img_emb = np.zeros((n, self.embed_dim), dtype=np.float16)
            txt_emb = np.zeros((n, self.embed_dim), dtype=np.float16)
        filtering = self.filter_cfg.enabled
        if filtering:
            cat2 = np.full((n, 2), -1, dtype=np.int64)
            und2 = np.full((n, 2), -1, dtype=np.int64)
            ani1 = np.full(n, -1, dtype=np.int64)
        punsafe = np.full(n, np.nan, dtype=np.float32) if self.punsafe_heads else None
        images = batch.get(IMAGE)
        tokens_col = batch.get(CLIP_TOKENS)
        texts = batch.get(ALT_TEXT)
        alive = drop == ""
        if images is None and alive.any():
            raise ConfigError(f"clip scoring needs the '{IMAGE}' column")

        # rows grouped by image tower: one image forward per row, whatever its subset
        groups: dict[int, tuple[_Runner, list[np.ndarray]]] = {}
        for subset, runner in self.runners.items():
            idx = np.flatnonzero(alive & (subsets == subset))
            if len(idx):
                groups.setdefault(id(runner), (runner, []))[1].append(idx)
        bs = max(1, int(self.cfg.batch_size))
        for runner, parts in groups.values():
            idx_all = np.sort(np.concatenate(parts))
            # the text towers used by this image tower's subsets
            text_groups: dict[int, tuple[_TextRunner, list[str]]] = {}
            for subset, tr in self.text_runners.items():
                if self.runners[subset] is runner:
                    text_groups.setdefault(id(tr), (tr, []))[1].append(subset)
            pending = []
            for start in range(0, len(idx_all), bs):
                idx = idx_all[start : start + bs]
                imgs, bad = self._image_rows(images, idx)
                if bad.any():
                    drop[idx[bad]] = DROP_BAD_IMAGE
                    idx, imgs = idx[~bad], imgs[~bad]
                    if not len(idx):
                        continue
                x = runner.images_to_input(imgs)
                with torch.inference_mode(), runner.autocast():
                    img_f = F.normalize(runner.encode_image(x).float(), dim=-1)
                    self.image_rows_encoded += len(idx)
                    if len(text_groups) == 1:
                        tr = next(iter(text_groups.values()))[0]
                        txt_f = F.normalize(tr.encode_text(self._tokens(tr, idx, texts, tokens_col)).float(), dim=-1)
                    else:
                        txt_f = torch.zeros_like(img_f)
                        for tr, subs in text_groups.values():
                            sel = np.flatnonzero(np.isin(subsets[idx], subs))
                            if len(sel):
                                feats = tr.encode_text(self._tokens(tr, idx[sel], texts, tokens_col))
                                txt_f[torch.from_numpy(sel).to(img_f.device)] = F.normalize(feats.float(), dim=-1)
                    cos = (img_f * txt_f).sum(dim=-1)
                    tops = runner.filter_prompts.top(img_f) if filtering else None
                    unsafe = []
                    for head, subs in self._heads_of.get(id(runner), ()):
                        sel = np.isin(subsets[idx], subs)
                        if sel.all():
                            unsafe.append((idx, head.probability(img_f)))
                        elif sel.any():
                            rows = torch.from_numpy(np.flatnonzero(sel)).to(img_f.device)
                            unsafe.append((idx[sel], head.probability(img_f[rows])))
                # results stay on the device until the group is done: the host keeps
                # preparing the next chunk while the device computes
                pending.append((idx, cos, img_f if save else None, txt_f if save else None, tops, unsafe))
            for idx, cos, img_f, txt_f, tops, unsafe in pending:
                sim[idx] = cos.cpu().numpy()
                for rows, prob in unsafe:
                    punsafe[rows] = prob.float().cpu().numpy()
                if tops is not None:
                    cat2[idx] = tops[0].cpu().numpy()
                    und2[idx] = tops[1].cpu().numpy()
                    ani1[idx] = tops[2].cpu().numpy()
                if save:
                    img_emb[idx] = img_f.to(torch.float16).cpu().numpy()
                    txt_emb[idx] = txt_f.to(torch.float16).cpu().numpy()

        # an alive row that no model scores (no subset) cannot be published without a similarity
        drop[alive & ~np.isin(subsets, list(self.runners))] = DROP_NO_SUBSET
        scored = ~np.isnan(sim)
        thr = np.array([self.thresholds.get(s, np.inf) for s in subsets], dtype=np.float32) if n else np.zeros(0)
        below = scored & (sim < thr)
        drop[below] = DROP_BELOW
        if filtering:
            # LAION-5B's filter: the NSFW tag for the rows the threshold keeps, and its drops
            nsfw = np.full(n, "", dtype=object)
            passed = np.flatnonzero(scored & ~below & (drop == ""))
            if len(passed):
                tags, reasons = lf.decide(cat2[passed], und2[passed], ani1[passed],
                                          [str(t) for t in texts[passed]] if texts is not None else [""] * len(passed),
                                          self.filter_cfg)
                nsfw[passed] = tags
                drop[passed] = reasons
            out[NSFW] = nsfw
        out[DROP_REASON] = drop
        out[SIMILARITY] = sim
        if save:
            out[IMAGE_EMBEDDING] = img_emb
            out[TEXT_EMBEDDING] = txt_emb
        if punsafe is not None:
            out[PUNSAFE] = punsafe
        if self.watermark is not None:
            # the rows kept by the similarity filter, on the same resized images
            out[PWATERMARK] = self.watermark.score({DROP_REASON: drop, IMAGE: images})
        if not self.keep_image:
            out.pop(IMAGE, None)
        out.pop(CLIP_TOKENS, None)
        return out


def clip_counters(batch: Mapping[str, np.ndarray]) -> StageCounters:
    """Counters of the clip stage from a scored batch (rows dropped before it are not counted).

    ``kept`` / ``kept.<subset>``: rows that passed the threshold (alive, or dropped afterwards by
    LAION-5B's safety filter, which has its own counters); ``dropped_by_reason``:
    ``below_threshold``, ``bad_image`` (image of the wrong shape) and ``no_subset``; ``counts``: ``scored``, ``scored.<subset>``,
    ``below_threshold.<subset>``.
    """
    c = StageCounters()
    drop = np.asarray(batch[DROP_REASON], dtype=object)
    subsets = np.asarray(batch[SUBSET], dtype=object)
    sim = np.asarray(batch[SIMILARITY], dtype=np.float32)
    alive = np.array([not r or str(r).startswith(lf.STAGE + ":") for r in drop], dtype=bool)
    c.kept = int(alive.sum())
    reasons = Counter(str(r)[len("clip:"):] for r in drop if str(r).startswith("clip:"))
    for reason, k in reasons.items():
        c.drop(reason, k)
    scored = ~np.isnan(sim)
    c.count("scored", int(scored.sum()))
    for subset in sorted({str(s) for s in subsets[scored | alive] if s}):
        in_subset = subsets == subset
        c.count(f"scored.{subset}", int((scored & in_subset).sum()))
        c.count(f"kept.{subset}", int((alive & in_subset).sum()))
        c.count(f"{BELOW_THRESHOLD}.{subset}", int((in_subset & (drop == DROP_BELOW)).sum()))
    return c


# --------------------------------------------------------------------------- registry hooks
def stage_counters(batch: Mapping[str, np.ndarray], later=()) -> StageCounters:
    """The stage's counters for :mod:`.registry`."""
    return clip_counters(batch)


def check_config(cfg) -> None:
    """Before any work: every model matches ``resize.image_size`` and every model file is usable."""
    for subset, model_cfg in cfg.clip.models.items():
        size = model_input_size(model_cfg)
        if size != cfg.resize.image_size:
            raise ConfigError(
                f"clip.models.{subset} ({model_cfg.arch}) expects {size} px images but "
                f"resize.image_size is {cfg.resize.image_size}; set --set resize.image_size={size}"
            )
    check_node_models(cfg)


def check_node_models(cfg) -> None:
    """The CLIP and safety model files of ``cfg`` load (on the node that runs this)."""
    check_models_available(cfg.clip)
    if cfg.safety.punsafe_heads or cfg.safety.watermark_model:
        from .safety import check_safety_models

        check_safety_models(cfg.safety, cfg.clip)
