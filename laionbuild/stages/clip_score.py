"""CLIP similarity scoring: the LAION-5B image-text filter.

Every alive row (``DROP_REASON == ""``) with a subset is scored with the open_clip
model configured for its subset (``clip.models.en`` / ``multi`` / ``nolang``):
the cosine similarity between the L2-normalised image and text embeddings is
written to ``SIMILARITY`` and rows under ``clip.thresholds[subset]`` are dropped
with ``clip:below_threshold``.

Images arrive as ``uint8 [N, S, S, 3]`` already resized on CPU by the fetch
stage; the conversion to float and the normalisation happen on the scoring
device. Nothing here imports Ray: :class:`ClipScorer` is a plain callable that
the pipeline wraps in an actor, and that tests and benchmarks call directly.

Model loading never downloads. ``clip.models.<subset>`` names

* ``arch``: an open_clip architecture (``ViT-B-32``), a model config JSON path
  (plain or ``builtin:<file>`` inside ``laionbuild/assets``), the name of a JSON
  file in ``laionbuild/assets`` (``tiny-clip-shapes``) or ``local-dir:<folder>``
  holding ``open_clip_config.json``;
* ``pretrained``: an open_clip pretrained tag looked up in the local caches
  (Hugging Face hub cache, then open_clip's URL cache), or a checkpoint path
  (``builtin:<file>`` for a file in ``laionbuild/assets``).

Missing weights or tokenizer files raise :class:`~laionbuild.errors.ModelMissingError`
saying which file is expected where. See docs/clip.md (checkpoint format, NSFW rule).

With ``safety.punsafe_heads`` the NSFW head of a subset reads the same
L2-normalised image embedding and writes ``punsafe``; with
``safety.watermark_model`` the watermark classifier scores the images of the
rows kept here and writes ``pwatermark`` (see :mod:`laionbuild.stages.safety`
and docs/safety_models.md).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..config import ClipConfig, ClipModelConfig, SafetyConfig
from ..errors import ConfigError, ModelMissingError, SetupError
from ..schema import DROP_REASON, IMAGE, NSFW, PUNSAFE, PWATERMARK, SIMILARITY, SUBSET, ALT_TEXT
from ..stats import StageCounters

logger = logging.getLogger(__name__)

#: folder of the model files shipped with the package
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
BUILTIN_PREFIX = "builtin:"
LOCAL_DIR_PREFIX = "local-dir:"
HF_HUB_PREFIX = "hf-hub:"
#: ``format`` value of checkpoints written by scripts/train_tiny_clip.py
CHECKPOINT_FORMAT = "laionbuild.clip/1"

IMAGE_EMBEDDING = "image_embedding"
TEXT_EMBEDDING = "text_embedding"
#: optional upstream-tokenised text column (see :class:`ClipTokenizer`)
CLIP_TOKENS = "clip_tokens"
BELOW_THRESHOLD = "below_threshold"
DROP_BELOW = f"clip:{BELOW_THRESHOLD}"
DROP_BAD_IMAGE = "clip:bad_image"
DROP_NO_SUBSET = "clip:no_subset"
NSFW_TAGS = ("UNLIKELY", "UNSURE", "NSFW")

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HF_TOKENIZER_FILES = ("tokenizer.json", "sentencepiece.bpe.model", "vocab.txt", "spiece.model")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt")


# --------------------------------------------------------------------------- tokenizer
class RemappedTokenizer:
    """open_clip's BPE tokenizer followed by a lookup into a compact vocabulary.

    ``source_ids`` / ``target_ids`` map BPE ids to compact ids; the BPE start and
    end tokens map to ``sot_id`` / ``eot_id``, padding to ``pad_id`` and every
    other token to ``unknown_id``.
    """

    def __init__(self, token_map: Mapping[str, Any], context_length: int):
        import torch
        from open_clip.tokenizer import SimpleTokenizer

        self.base = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        self.pad_id = int(token_map.get("pad_id", 0))
        self.unknown_id = int(token_map["unknown_id"])
        self.sot_id = int(token_map["sot_id"])
        self.eot_id = int(token_map["eot_id"])
        src = torch.as_tensor(token_map["source_ids"], dtype=torch.long)
        dst = torch.as_tensor(token_map["target_ids"], dtype=torch.long)
        table = torch.full((len(self.base.encoder),), self.unknown_id, dtype=torch.long)
        table[src] = dst
        table[self.base.sot_token_id] = self.sot_id
        table[self.base.eot_token_id] = self.eot_id
        self.table = table
        top = int(dst.max()) if len(dst) else 0
        self.vocab_size = max(top, self.sot_id, self.eot_id, self.unknown_id, self.pad_id) + 1

    def __call__(self, texts: str | Sequence[str]):
        import torch

        if isinstance(texts, str):
            texts = [texts]
        ids = self.base(list(texts), context_length=self.context_length)
        out = self.table[ids]
        # positions after the end token are padding (BPE id 0 is also a real token)
        is_end = (ids == self.base.eot_token_id).long()
        out[(torch.cumsum(is_end, dim=1) - is_end) > 0] = self.pad_id
        return out


# --------------------------------------------------------------------------- loading
@dataclass
class LoadedClip:
    """A ready-to-use open_clip model with its tokenizer and normalisation."""

    model: Any
    tokenizer: Callable[[Sequence[str]], Any]
    image_size: int
    mean: tuple
    std: tuple
    name: str
    embed_dim: int = 0
    device: str = "cpu"


def build_clip_from_config(model_cfg: Mapping[str, Any]):
    """Instantiate an open_clip model (random init) from an open_clip model config dict."""
    import open_clip

    cfg = copy.deepcopy(dict(model_cfg))
    cfg.pop("custom_text", None)
    custom_text = model_cfg.get("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return cls(**cfg)


def _asset_path(value: str) -> Path:
    return ASSETS_DIR / value[len(BUILTIN_PREFIX):]


def _model_name(model_cfg: ClipModelConfig) -> str:
    return f"{model_cfg.arch}/{model_cfg.pretrained}"


def _read_json_config(path: Path) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) of an open_clip model config JSON (plain or ``model_cfg`` form)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"clip model config {path}: cannot be read ({exc})") from None
    cfg = data.get("model_cfg", data)
    if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ConfigError(f"clip model config {path}: needs embed_dim, vision_cfg and text_cfg")
    return dict(cfg), dict(data.get("preprocess_cfg", {}))


def _resolve_arch(model_cfg: ClipModelConfig) -> tuple[dict, dict, str | None]:
    """The open_clip model config dict of ``arch``: (model_cfg, preprocess_cfg, open_clip name or None)."""
    arch = model_cfg.arch.strip()
    if not arch:
        raise ConfigError("clip model: 'arch' is empty")
    if arch.startswith(BUILTIN_PREFIX):
        path = _asset_path(arch)
        if not path.is_file():
            raise ConfigError(f"clip model arch '{arch}': {path} does not exist")
        cfg, pre = _read_json_config(path)
        return cfg, pre, None
    if arch.startswith(LOCAL_DIR_PREFIX):
        path = Path(arch[len(LOCAL_DIR_PREFIX):]).expanduser() / "open_clip_config.json"
        if not path.is_file():
            raise ModelMissingError(f"clip model arch '{arch}': expected {path}")
        cfg, pre = _read_json_config(path)
        return cfg, pre, None
    if arch.startswith(HF_HUB_PREFIX):
        repo = arch[len(HF_HUB_PREFIX):]
        cached = _hf_cached(repo, "open_clip_config.json", model_cfg.cache_dir)
        if cached is None:
            raise ModelMissingError(
                f"clip model arch '{arch}': open_clip_config.json of {repo} is not in the Hugging Face cache "
                f"({_hf_cache_hint(model_cfg.cache_dir)}); downloads are disabled. Copy the repository into the "
                f"cache or point arch at local-dir:/path/to/folder"
            )
        cfg, pre = _read_json_config(Path(cached))
        return cfg, pre, None
    if arch.endswith(".json") or os.sep in arch:
        path = Path(arch).expanduser()
        if not path.is_file():
            raise ConfigError(f"clip model arch '{arch}': model config file not found")
        cfg, pre = _read_json_config(path)
        return cfg, pre, None
    import open_clip

    name = arch.replace("/", "-")
    cfg = open_clip.get_model_config(name)
    if cfg is not None:
        return dict(cfg), {}, name
    asset = ASSETS_DIR / f"{arch}.json"
    if asset.is_file():
        cfg, pre = _read_json_config(asset)
        return cfg, pre, None
    raise ConfigError(
        f"clip model arch '{arch}' is neither an open_clip architecture, a model config JSON path nor a "
        f"file in {ASSETS_DIR} (open_clip knows e.g. ViT-B-32, ViT-L-14, xlm-roberta-base-ViT-B-32)"
    )


def _square_size(image_size: Any, where: str) -> int:
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise ConfigError(f"{where}: non-square model input {tuple(image_size)} is not supported")
        image_size = image_size[0]
    return int(image_size)


def model_input_size(model_cfg: ClipModelConfig) -> int:
    """Image side the model expects, read from its config (no weights are loaded)."""
    cfg, _, _ = _resolve_arch(model_cfg)
    return _square_size(cfg["vision_cfg"].get("image_size", 224), f"clip model {model_cfg.arch}")


def _hf_cache_hint(cache_dir: str) -> str:
    if cache_dir:
        return f"cache_dir {cache_dir}"
    default = os.path.join(os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
    return "cache " + os.environ.get("HF_HUB_CACHE", default)


def _hf_cached(repo_id: str, filename: str, cache_dir: str) -> str | None:
    """Path of ``filename`` of ``repo_id`` in the local Hugging Face cache, or None (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir or None)
    except Exception:  # malformed repo id and the like: treat as not cached
        return None
    return found if isinstance(found, str) and os.path.isfile(found) else None


@dataclass
class _Weights:
    path: Path
    tag_cfg: dict = field(default_factory=dict)


def _resolve_weights(model_cfg: ClipModelConfig, oc_name: str | None) -> _Weights:
    """Find the checkpoint file of ``pretrained`` locally; ModelMissingError when absent."""
    pretrained = model_cfg.pretrained.strip()
    how = f"--set clip.models.<subset>.pretrained=/path/to/checkpoint"
    if not pretrained and model_cfg.arch.startswith((LOCAL_DIR_PREFIX, HF_HUB_PREFIX)):
        return _weights_beside_config(model_cfg)
    if not pretrained:
        raise ConfigError(
            f"clip model {model_cfg.arch}: 'pretrained' is empty; name an open_clip pretrained tag or a checkpoint path"
        )
    if pretrained.startswith(BUILTIN_PREFIX):
        path = _asset_path(pretrained)
        if not path.is_file():
            raise ModelMissingError(
                f"clip model {_model_name(model_cfg)}: the packaged checkpoint {path} is missing "
                f"(regenerate it with scripts/train_tiny_clip.py)"
            )
        return _Weights(path)
    tag_cfg: dict = {}
    if oc_name is not None:
        import open_clip

        tag_cfg = dict(open_clip.get_pretrained_cfg(oc_name, pretrained) or {})
    looks_like_path = (
        os.sep in pretrained or pretrained.startswith(("~", ".")) or pretrained.endswith(_CHECKPOINT_SUFFIXES)
    )
    if not tag_cfg:
        path = Path(pretrained).expanduser()
        if path.is_file():
            return _Weights(path)
        if looks_like_path or oc_name is None:
            raise ModelMissingError(
                f"clip model {_model_name(model_cfg)}: checkpoint file {path} not found; "
                f"put the weights there or give another path with {how}"
            )
        import open_clip

        tags = ", ".join(open_clip.list_pretrained_tags_by_model(oc_name)) or "none"
        raise ConfigError(
            f"clip model {model_cfg.arch}: '{pretrained}' is neither a pretrained tag of this architecture "
            f"(known: {tags}) nor an existing checkpoint file"
        )
    # a known tag: look in the local caches only
    if "file" in tag_cfg and os.path.isfile(tag_cfg["file"]):
        return _Weights(Path(tag_cfg["file"]), tag_cfg)
    expected = []
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        names = (filename,) if filename else _HF_WEIGHT_FILES
        if filename.endswith((".bin", ".pth")):
            names = (filename[:-4] + ".safetensors", filename)
        for name in names:
            found = _hf_cached(repo, name, model_cfg.cache_dir)
            if found:
                return _Weights(Path(found), tag_cfg)
        expected.append(f"{' or '.join(names)} of the Hugging Face repo {repo} ({_hf_cache_hint(model_cfg.cache_dir)})")
    url = tag_cfg.get("url", "")
    if url:
        folder = Path(model_cfg.cache_dir or os.path.expanduser("~/.cache/clip"))
        target = folder / os.path.basename(url)
        if target.is_file():
            return _Weights(target, tag_cfg)
        expected.append(str(target))
    raise ModelMissingError(
        f"clip model {_model_name(model_cfg)}: weights are not in the local cache and downloads are disabled; "
        f"expected {' or '.join(expected) or 'a cached file'}. Download them on a machine with internet "
        f"(open_clip.create_model('{oc_name}', pretrained='{pretrained}', cache_dir=...)) and copy the file, "
        f"set clip.models.<subset>.cache_dir to the cache folder, or give the file with {how}"
    )


def _weights_beside_config(model_cfg: ClipModelConfig) -> _Weights:
    """Weights of a ``local-dir:`` folder or a cached ``hf-hub:`` repository (empty ``pretrained``)."""
    arch = model_cfg.arch
    names = _HF_WEIGHT_FILES + ("open_clip_pytorch_model.safetensors", "model.safetensors", "pytorch_model.bin")
    if arch.startswith(LOCAL_DIR_PREFIX):
        folder = Path(arch[len(LOCAL_DIR_PREFIX):]).expanduser()
        for name in names:
            if (folder / name).is_file():
                return _Weights(folder / name)
        where = f"in {folder}"
    else:
        repo = arch[len(HF_HUB_PREFIX):]
        for name in names:
            found = _hf_cached(repo, name, model_cfg.cache_dir)
            if found:
                return _Weights(Path(found))
        where = f"for {repo} in the Hugging Face {_hf_cache_hint(model_cfg.cache_dir)}"
    raise ModelMissingError(
        f"clip model {arch}: no weights file ({', '.join(names)}) {where}; downloads are disabled. "
        f"Give the checkpoint with --set clip.models.<subset>.pretrained=/path/to/checkpoint"
    )


def _resolve_hf_text(model_cfg: ClipModelConfig, text_cfg: Mapping[str, Any]) -> str:
    """Local folder holding the Hugging Face text tower's config and tokenizer files."""
    hf_name = text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ModelMissingError(
            f"clip model {_model_name(model_cfg)}: its text tower ({hf_name}) needs the 'transformers' package, "
            f"which is not installed (pip install 'laionbuild[multilingual]')"
        ) from None
    folder = model_cfg.tokenizer_dir
    if folder:
        path = Path(folder).expanduser()
        missing = []
        if not (path / "config.json").is_file():
            missing.append("config.json")
        if not any((path / f).is_file() for f in _HF_TOKENIZER_FILES):
            missing.append(" or ".join(_HF_TOKENIZER_FILES))
        if missing:
            raise ModelMissingError(
                f"clip model {_model_name(model_cfg)}: tokenizer_dir {path} lacks {', '.join(missing)} "
                f"(save them there with transformers' AutoTokenizer/AutoConfig .save_pretrained('{path}'))"
            )
        return str(path)
    config = _hf_cached(hf_name, "config.json", model_cfg.cache_dir)
    tok = next((p for p in (_hf_cached(hf_name, f, model_cfg.cache_dir) for f in _HF_TOKENIZER_FILES) if p), None)
    if config is None or tok is None:
        raise ModelMissingError(
            f"clip model {_model_name(model_cfg)}: the tokenizer/config files of '{hf_name}' are not in the "
            f"Hugging Face cache ({_hf_cache_hint(model_cfg.cache_dir)}) and downloads are disabled; copy that "
            f"cache from a machine with internet, or save them into a folder and set "
            f"clip.models.<subset>.tokenizer_dir=/path/to/folder"
        )
    if os.path.dirname(config) != os.path.dirname(tok):
        raise ModelMissingError(
            f"clip model {_model_name(model_cfg)}: config and tokenizer of '{hf_name}' are in different cache "
            f"snapshots; set clip.models.<subset>.tokenizer_dir to one folder holding both"
        )
    return os.path.dirname(config)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def _read_checkpoint(path: Path) -> Any:
    import torch

    if path.suffix in (".safetensors", ".npz", ".npy") or _is_torchscript(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelMissingError(f"checkpoint {path} cannot be read ({exc})") from None


def check_model_available(model_cfg: ClipModelConfig) -> None:
    """Raise ConfigError / ModelMissingError when ``model_cfg`` cannot be loaded offline."""
    cfg, _, oc_name = _resolve_arch(model_cfg)
    _resolve_weights(model_cfg, oc_name)
    if "hf_model_name" in cfg.get("text_cfg", {}):
        _resolve_hf_text(model_cfg, cfg["text_cfg"])


def check_models_available(clip_cfg: ClipConfig) -> None:
    """Pre-flight: every distinct model of ``clip_cfg`` has its files locally (nothing is loaded)."""
    seen = set()
    for subset, mcfg in clip_cfg.models.items():
        key = _model_key(mcfg)
        if key in seen:
            continue
        seen.add(key)
        check_model_available(mcfg)


def resolve_device(clip_cfg: ClipConfig) -> str:
    import torch

    if clip_cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if clip_cfg.device == "cuda" and not torch.cuda.is_available():
        raise SetupError("clip.device is 'cuda' but no CUDA device is visible")
    return clip_cfg.device


def resolve_precision(clip_cfg: ClipConfig, device: str) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for the autocast of the forward pass."""
    import torch

    if clip_cfg.precision != "auto":
        return clip_cfg.precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def load_clip(model_cfg: ClipModelConfig, device: str = "cpu") -> LoadedClip:
    """Load one open_clip model, offline, in eval mode on ``device`` (weights kept in fp32)."""
    import open_clip
    import torch

    arch_cfg, pre_cfg, oc_name = _resolve_arch(model_cfg)
    weights = _resolve_weights(model_cfg, oc_name)
    ckpt = _read_checkpoint(weights.path)
    ours = isinstance(ckpt, Mapping) and ckpt.get("format") == CHECKPOINT_FORMAT
    cfg = copy.deepcopy(arch_cfg)
    if ours and "model_config" in ckpt:
        if dict(ckpt["model_config"]) != cfg:
            raise ConfigError(
                f"clip model {_model_name(model_cfg)}: the checkpoint's model_config differs from arch "
                f"'{model_cfg.arch}'"
            )
    if weights.tag_cfg.get("quick_gelu", False):
        cfg["quick_gelu"] = True
    text_cfg = cfg.setdefault("text_cfg", {})
    hf_folder = None
    if "hf_model_name" in text_cfg:
        hf_folder = _resolve_hf_text(model_cfg, text_cfg)
        text_cfg["hf_model_name"] = hf_folder
        text_cfg["hf_tokenizer_name"] = hf_folder
        text_cfg["hf_model_pretrained"] = False  # the CLIP checkpoint holds the text weights
    vision_cfg = cfg.setdefault("vision_cfg", {})
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    model = build_clip_from_config(cfg)
    if ours:
        state = {k: v for k, v in ckpt["state_dict"].items()}
        model.load_state_dict(state, strict=True)
    elif _is_torchscript(weights.path):
        # OpenAI's original release: a TorchScript archive with the same parameter names
        state = torch.jit.load(str(weights.path), map_location="cpu").state_dict()
        own = model.state_dict()
        for key in list(state):
            if key in ("input_resolution", "context_length", "vocab_size") or (
                key not in own and key.endswith("attn_mask")
            ):
                state.pop(key)
        model.load_state_dict(state, strict=True)
    else:
        del ckpt
        open_clip.load_checkpoint(model, str(weights.path), strict=True, weights_only=True)
    model.eval().requires_grad_(False)
    model.to(device)

    context_length = int(text_cfg.get("context_length", 77))
    if ours and ckpt.get("token_map"):
        tokenizer = RemappedTokenizer(ckpt["token_map"], context_length)
    elif hf_folder is not None:
        from open_clip.tokenizer import HFTokenizer

        tokenizer = HFTokenizer(
            hf_folder, context_length=context_length, **dict(text_cfg.get("tokenizer_kwargs") or {})
        )
    elif oc_name is not None:
        tokenizer = open_clip.get_tokenizer(oc_name)
    else:
        from open_clip.tokenizer import SimpleTokenizer

        tokenizer = SimpleTokenizer(context_length=context_length, **dict(text_cfg.get("tokenizer_kwargs") or {}))

    mean = tuple(
        (ckpt.get("image_mean") if ours else None) or weights.tag_cfg.get("mean") or pre_cfg.get("mean") or _OPENAI_MEAN
    )
    std = tuple(
        (ckpt.get("image_std") if ours else None) or weights.tag_cfg.get("std") or pre_cfg.get("std") or _OPENAI_STD
    )
    size = _square_size(vision_cfg.get("image_size", 224), f"clip model {model_cfg.arch}")
    logger.info("loaded clip model %s from %s on %s", _model_name(model_cfg), weights.path, device)
    return LoadedClip(
        model=model,
        tokenizer=tokenizer,
        image_size=size,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        name=_model_name(model_cfg),
        embed_dim=int(cfg["embed_dim"]),
        device=device,
    )


def _model_key(m: ClipModelConfig) -> tuple:
    return (m.arch, m.pretrained, m.cache_dir, m.tokenizer_dir)


# --------------------------------------------------------------------------- upstream tokenising
class ClipTokenizer:
    """Tokenise texts upstream (CPU workers) into a ``clip_tokens`` int32 column.

    Loads only the tokenizers (no weights). :class:`ClipScorer` uses the column
    when present instead of tokenising in the scoring actor. Rows of a subset
    whose model has a shorter context are zero-padded to the longest context.
    """

    def __init__(self, clip_cfg: ClipConfig):
        self.tokenizers: dict[str, Any] = {}
        by_key: dict[tuple, Any] = {}
        for subset, mcfg in clip_cfg.models.items():
            key = _model_key(mcfg)
            if key not in by_key:
                by_key[key] = _load_tokenizer_only(mcfg)
            self.tokenizers[subset] = by_key[key]
        self.width = max(_context_length(t) for t in self.tokenizers.values())

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


def _context_length(tokenizer: Any) -> int:
    return int(getattr(tokenizer, "context_length", None) or 77)


def _load_tokenizer_only(model_cfg: ClipModelConfig):
    arch_cfg, _, oc_name = _resolve_arch(model_cfg)
    text_cfg = arch_cfg.get("text_cfg", {})
    ctx = int(text_cfg.get("context_length", 77))
    if "hf_model_name" in text_cfg:
        from open_clip.tokenizer import HFTokenizer

        return HFTokenizer(_resolve_hf_text(model_cfg, text_cfg), context_length=ctx)
    weights = _resolve_weights(model_cfg, oc_name)
    ckpt = _read_checkpoint(weights.path) if weights.path.stat().st_size < 64_000_000 else None
    if isinstance(ckpt, Mapping) and ckpt.get("format") == CHECKPOINT_FORMAT and ckpt.get("token_map"):
        return RemappedTokenizer(ckpt["token_map"], ctx)
    import open_clip

    if oc_name is not None:
        return open_clip.get_tokenizer(oc_name)
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=ctx)


# --------------------------------------------------------------------------- scoring
class _Runner:
    """One loaded model plus its device-side normalisation constants and NSFW prompt embeddings."""

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
        self.nsfw_embeddings = None
        self.nsfw_count = 0

    def autocast(self):
        import contextlib

        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

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
            return F.normalize(self.encode_text(tokens).float(), dim=-1)

    def set_nsfw_prompts(self, nsfw: Sequence[str], safe: Sequence[str]) -> None:
        tokens = self.loaded.tokenizer(list(nsfw) + list(safe))
        self.nsfw_embeddings = self.text_features(tokens.to(self.device))
        self.nsfw_count = len(nsfw)


class ClipScorer:
    """Scores alive rows with the model of their subset; see the module docstring.

    ``models`` (subset -> :class:`LoadedClip`) replaces loading from the config
    (benchmarks); ``keep_image`` keeps the ``IMAGE`` column in the output.
    ``safety`` adds the ``punsafe`` heads and the ``pwatermark`` classifier
    (``punsafe_heads`` / ``watermark`` replace loading them, like ``models``).
    """

    def __init__(
        self,
        clip_cfg: ClipConfig,
        image_size: int,
        *,
        keep_image: bool = False,
        models: Mapping[str, LoadedClip] | None = None,
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
        by_key: dict[Any, _Runner] = {}
        if models is None:
            for subset, mcfg in clip_cfg.models.items():
                expected = model_input_size(mcfg)
                if expected != self.image_size:
                    raise ConfigError(
                        f"clip.models.{subset} ({mcfg.arch}) expects {expected}x{expected} images but "
                        f"resize.image_size is {self.image_size}; set resize.image_size={expected}"
                    )
            for subset, mcfg in clip_cfg.models.items():
                key = _model_key(mcfg)
                if key not in by_key:
                    by_key[key] = _Runner(
                        load_clip(mcfg, self.device), self.device, self.precision, channels_last, compile_model
                    )
                self.runners[subset] = by_key[key]
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
                self.runners[subset] = by_key[key]
        distinct = list({id(r): r for r in self.runners.values()}.values())
        self.embed_dim = max(r.loaded.embed_dim for r in distinct)
        if clip_cfg.save_embeddings and len({r.loaded.embed_dim for r in distinct}) > 1:
            raise ConfigError("clip.save_embeddings needs all clip.models to have the same embedding size")
        if clip_cfg.nsfw_tag:
            if not clip_cfg.nsfw_prompts or not clip_cfg.safe_prompts:
                raise ConfigError("clip.nsfw_tag needs non-empty clip.nsfw_prompts and clip.safe_prompts")
            for r in distinct:
                r.set_nsfw_prompts(clip_cfg.nsfw_prompts, clip_cfg.safe_prompts)
        self._setup_safety(safety, punsafe_heads, watermark)
        #: seconds spent tokenising inside this object (measurement for the benchmark)
        self.tokenize_s = 0.0

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
        s = self.image_size
        if images.dtype != object and images.ndim == 4:
            if images.shape[1:] != (s, s, 3):
                return np.zeros((len(idx), s, s, 3), np.uint8), np.ones(len(idx), bool)
            if len(idx) and idx[-1] - idx[0] == len(idx) - 1:
                sel = images[idx[0] : idx[-1] + 1]  # a contiguous run: a view, no copy
            else:
                sel = images[idx]
            return (sel if sel.dtype == np.uint8 else np.clip(sel, 0, 255).astype(np.uint8)), np.zeros(len(idx), bool)
        out = np.zeros((len(idx), s, s, 3), np.uint8)
        bad = np.zeros(len(idx), bool)
        for j, i in enumerate(idx):
            img = images[i]
            a = np.asarray(img) if img is not None else None
            if a is None or a.shape != (s, s, 3):
                bad[j] = True
            else:
                out[j] = a
        return out, bad

    @staticmethod
    def _nsfw_votes(runner: _Runner, img_f):
        """How many of the 2 prompts closest to each image are nsfw prompts (device tensor)."""
        sims = img_f @ runner.nsfw_embeddings.T
        top = sims.topk(2, dim=1).indices
        return (top < runner.nsfw_count).sum(dim=1)

    # ..................................................................... call
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import time

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
        nsfw = np.full(n, "", dtype=object) if self.cfg.nsfw_tag else None
        punsafe = np.full(n, np.nan, dtype=np.float32) if self.punsafe_heads else None
        images = batch.get(IMAGE)
        tokens_col = batch.get(CLIP_TOKENS)
        texts = batch.get(ALT_TEXT)
        alive = drop == ""
        if images is None and alive.any():
            raise ConfigError(f"clip scoring needs the '{IMAGE}' column")

        groups: dict[int, tuple[_Runner, list[np.ndarray]]] = {}
        for subset, runner in self.runners.items():
            idx = np.flatnonzero(alive & (subsets == subset))
            if len(idx):
                groups.setdefault(id(runner), (runner, []))[1].append(idx)
        bs = max(1, int(self.cfg.batch_size))
        for runner, parts in groups.values():
            idx_all = np.sort(np.concatenate(parts))
            pending = []
            for start in range(0, len(idx_all), bs):
                idx = idx_all[start : start + bs]
                imgs, bad = self._image_rows(images, idx)
                if bad.any():
                    drop[idx[bad]] = DROP_BAD_IMAGE
                    idx, imgs = idx[~bad], imgs[~bad]
                    if not len(idx):
                        continue
                t0 = time.perf_counter()
                if tokens_col is not None:
                    ctx = _context_length(runner.loaded.tokenizer)
                    tok = torch.from_numpy(np.ascontiguousarray(tokens_col[idx, :ctx], dtype=np.int64))
                else:
                    tok = runner.loaded.tokenizer([str(t) for t in texts[idx]])
                self.tokenize_s += time.perf_counter() - t0
                tok = runner.upload(tok.numpy()) if runner.cuda else tok
                x = runner.images_to_input(imgs)
                with torch.inference_mode(), runner.autocast():
                    img_f = F.normalize(runner.encode_image(x).float(), dim=-1)
                    txt_f = F.normalize(runner.encode_text(tok).float(), dim=-1)
                    cos = (img_f * txt_f).sum(dim=-1)
                    votes = self._nsfw_votes(runner, img_f) if nsfw is not None else None
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
                pending.append((idx, cos, img_f if save else None, txt_f if save else None, votes, unsafe))
            for idx, cos, img_f, txt_f, votes, unsafe in pending:
                sim[idx] = cos.cpu().numpy()
                for rows, prob in unsafe:
                    punsafe[rows] = prob.float().cpu().numpy()
                if votes is not None:
                    nsfw[idx] = np.asarray(NSFW_TAGS, dtype=object)[votes.cpu().numpy()]
                if save:
                    img_emb[idx] = img_f.to(torch.float16).cpu().numpy()
                    txt_emb[idx] = txt_f.to(torch.float16).cpu().numpy()

        # an alive row that no model scores (no subset) cannot be published without a similarity
        drop[alive & ~np.isin(subsets, list(self.runners))] = DROP_NO_SUBSET
        scored = ~np.isnan(sim)
        thr = np.array([self.thresholds.get(s, np.inf) for s in subsets], dtype=np.float32) if n else np.zeros(0)
        below = scored & (sim < thr)
        drop[below] = DROP_BELOW
        out[DROP_REASON] = drop
        out[SIMILARITY] = sim
        if save:
            out[IMAGE_EMBEDDING] = img_emb
            out[TEXT_EMBEDDING] = txt_emb
        if nsfw is not None:
            out[NSFW] = nsfw
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

    ``kept`` / ``kept.<subset>``: rows alive after scoring; ``dropped_by_reason``:
    ``below_threshold``, ``bad_image`` (image of the wrong shape) and ``no_subset``; ``counts``: ``scored``, ``scored.<subset>``,
    ``below_threshold.<subset>``.
    """
    c = StageCounters()
    drop = np.asarray(batch[DROP_REASON], dtype=object)
    subsets = np.asarray(batch[SUBSET], dtype=object)
    sim = np.asarray(batch[SIMILARITY], dtype=np.float32)
    alive = drop == ""
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
