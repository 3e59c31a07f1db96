"""Offline model loading shared by the CLIP scorer and the safety models.

* open_clip models (image and text towers): :func:`load_clip`, see the
  ``clip.models.<subset>.arch`` / ``pretrained`` settings described in
  :mod:`laionbuild.stages.clip_score` and docs/clip.md;
* text-only models in the sentence-transformers folder layout (a Hugging Face
  transformer, pooling and a dense projection into a CLIP embedding space, e.g.
  ``sentence-transformers/clip-ViT-B-32-multilingual-v1``): :func:`load_text_model`,
  selected by ``clip.models.<subset>.text_model``.

Nothing is ever downloaded: weights are looked up in local folders and caches,
and a missing file raises :class:`~laionbuild.errors.ModelMissingError` naming
what is expected where. Nothing here imports Ray.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..config import ClipConfig, ClipModelConfig
from ..errors import ConfigError, ModelMissingError, SetupError

logger = logging.getLogger(__name__)

#: folder of the model files shipped with the package
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
BUILTIN_PREFIX = "builtin:"
LOCAL_DIR_PREFIX = "local-dir:"
HF_HUB_PREFIX = "hf-hub:"
#: ``format`` value of checkpoints written by scripts/train_tiny_clip.py
CHECKPOINT_FORMAT = "laionbuild.clip/1"

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


def open_clip_model_config(name: str) -> dict | None:
    """open_clip's config of architecture ``name``, or None when open_clip does not know it.

    Read from the JSON files open_clip ships, without importing it: the import pulls in
    torch and torchvision (seconds), which a driver checking its models does not need.
    Raises ImportError when open_clip is not installed.
    """
    module = sys.modules.get("open_clip")
    if module is None:
        spec = importlib.util.find_spec("open_clip")
        if spec is None:
            raise ImportError("open_clip is not installed")
        folders = [Path(p) / "model_configs" for p in (spec.submodule_search_locations or [])]
        folders = [f for f in folders if f.is_dir()]
        if folders:
            for folder in folders:
                path = folder / f"{name}.json"
                if path.is_file():
                    cfg = json.loads(path.read_text(encoding="utf-8"))
                    if all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
                        return cfg
            return None
        import open_clip as module  # an installation laid out otherwise: ask open_clip itself
    cfg = module.get_model_config(name)
    return dict(cfg) if cfg is not None else None


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
    name = arch.replace("/", "-")
    cfg = open_clip_model_config(name)
    if cfg is not None:
        return cfg, {}, name
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
        f"expected {' or '.join(expected) or 'a cached file'}. Run 'laionbuild models pull -c CONFIG' on a "
        f"machine with internet (or run without --offline / HF_HUB_OFFLINE) and copy the cache, set "
        f"clip.models.<subset>.cache_dir to the cache folder, or give the file with {how}"
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
    """Pre-flight: every distinct model of ``clip_cfg`` (open_clip models and separate text
    models) has its files locally; nothing is loaded.

    Every missing model is named in one :class:`ModelMissingError`; a ConfigError
    (an unknown architecture and the like) is raised as soon as it is found.
    """
    seen: set = set()
    missing: list[str] = []
    for subset, mcfg in clip_cfg.models.items():
        checks = [(_model_key(mcfg), check_model_available)]
        if _text_model_name(mcfg):
            checks.append((("text",) + _text_key(mcfg), check_text_model_available))
        for key, check in checks:
            if key in seen:
                continue
            seen.add(key)
            try:
                check(mcfg)
            except ModelMissingError as exc:
                missing.append(f"clip.models.{subset}: {exc}")
        if _text_model_name(mcfg) and not missing:
            text_dim = text_model_embed_dim(mcfg)
            image_dim = int(_resolve_arch(mcfg)[0]["embed_dim"])
            if text_dim != image_dim:
                raise ConfigError(
                    f"clip.models.{subset}: text_model {_text_model_name(mcfg)} gives {text_dim}-d embeddings but "
                    f"{mcfg.arch} gives {image_dim}-d ones; they must embed into the same space"
                )
    if missing:
        raise ModelMissingError("; ".join(missing) if len(missing) == 1 else
                                f"{len(missing)} models are missing:\n  " + "\n  ".join(missing))


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




# --------------------------------------------------------------------------- text towers of other models
_ST_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_ST_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "sentencepiece.bpe.model", "spiece.model")
_ST_ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": None,
    "torch.nn.Identity": None,
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.Tanh": "tanh",
}


def _text_model_name(model_cfg: ClipModelConfig) -> str:
    return model_cfg.text_model.strip()


def _text_key(model_cfg: ClipModelConfig) -> tuple:
    return (_text_model_name(model_cfg), model_cfg.text_cache_dir)


def resolve_text_model_folder(model_cfg: ClipModelConfig) -> Path:
    """Local folder of ``text_model`` (a folder path, or a Hugging Face id found in the local cache)."""
    name = _text_model_name(model_cfg)
    where = f"clip text model '{name}'"
    if name.startswith(BUILTIN_PREFIX):
        path = _asset_path(name)
        if not path.is_dir():
            raise ModelMissingError(f"{where}: the packaged folder {path} is missing "
                                    f"(regenerate it with scripts/train_tiny_clip.py --multilingual-text)")
        return path
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name.startswith(("/", "~", ".")):
        raise ModelMissingError(f"{where}: folder {path} does not exist (expected the sentence-transformers layout: "
                                f"modules.json, config.json + weights + tokenizer, 1_Pooling/, 2_Dense/)")
    found = _hf_cached(name, "modules.json", model_cfg.text_cache_dir)
    if found is None:
        raise ModelMissingError(
            f"{where}: not in the Hugging Face {_hf_cache_hint(model_cfg.text_cache_dir)} and downloads are "
            f"disabled; expected modules.json, config.json, {' or '.join(_ST_WEIGHT_FILES)}, tokenizer files, "
            f"1_Pooling/config.json, 2_Dense/config.json and 2_Dense/{' or '.join(_ST_WEIGHT_FILES)} of {name}. "
            f"Run 'laionbuild models pull -c CONFIG' on a machine with internet (or run without --offline / "
            f"HF_HUB_OFFLINE) and copy the "
            f"cache, set clip.models.<subset>.text_cache_dir, or give a local folder in clip.models.<subset>.text_model"
        )
    return Path(found).parent


@dataclass
class _StLayout:
    folder: Path
    transformer: Path
    pooling: str
    dense: list  # [(folder, config dict)]
    normalize: bool
    max_seq_length: int
    do_lower_case: bool


def _read_json(path: Path, where: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelMissingError(f"{where}: {path} is missing") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: {path} cannot be read ({exc})") from None


def _first_file(folder: Path, names: Sequence[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _read_st_layout(model_cfg: ClipModelConfig) -> _StLayout:
    """Parse and check the sentence-transformers folder of ``text_model`` (no weights are read)."""
    folder = resolve_text_model_folder(model_cfg)
    where = f"clip text model '{_text_model_name(model_cfg)}' ({folder})"
    modules = _read_json(folder / "modules.json", where)
    if not isinstance(modules, list) or not modules:
        raise ConfigError(f"{where}: modules.json must list the modules")
    transformer = None
    pooling = ""
    dense = []
    normalize = False
    missing = []
    for entry in sorted(modules, key=lambda m: int(m.get("idx", 0))):
        kind = str(entry.get("type", "")).rsplit(".", 1)[-1]
        sub = folder / str(entry.get("path", ""))
        if kind == "Transformer":
            if transformer is not None:
                raise ConfigError(f"{where}: more than one Transformer module")
            transformer = sub
            if not (sub / "config.json").is_file():
                missing.append(str(sub / "config.json"))
            if _first_file(sub, _ST_WEIGHT_FILES) is None:
                missing.append(f"{sub}/{' or '.join(_ST_WEIGHT_FILES)}")
            if _first_file(sub, _ST_TOKENIZER_FILES) is None:
                missing.append(f"{sub}/{' or '.join(_ST_TOKENIZER_FILES)}")
        elif kind == "Pooling":
            cfg = _read_json(sub / "config.json", where)
            modes = [m for m in ("cls_token", "mean_tokens", "max_tokens")
                     if cfg.get(f"pooling_mode_{m}") or cfg.get("pooling_mode") == m.split("_")[0]]
            if len(modes) != 1 or any(cfg.get(k) for k in ("pooling_mode_mean_sqrt_len_tokens",
                                                           "pooling_mode_weightedmean_tokens",
                                                           "pooling_mode_lasttoken")):
                raise ConfigError(f"{where}: pooling {cfg} is not one of cls / mean / max")
            pooling = modes[0].split("_")[0]
        elif kind == "Dense":
            cfg = _read_json(sub / "config.json", where)
            act = str(cfg.get("activation_function", "torch.nn.modules.activation.Tanh"))
            if act not in _ST_ACTIVATIONS:
                raise ConfigError(f"{where}: Dense activation {act} is not supported (Identity or Tanh)")
            if cfg.get("use_residual"):
                raise ConfigError(f"{where}: Dense with use_residual is not supported")
            if _first_file(sub, _ST_WEIGHT_FILES) is None:
                missing.append(f"{sub}/{' or '.join(_ST_WEIGHT_FILES)}")
            dense.append((sub, cfg))
        elif kind == "Normalize":
            normalize = True
        else:
            raise ConfigError(f"{where}: module type {entry.get('type')} is not supported "
                              f"(Transformer, Pooling, Dense, Normalize)")
    if transformer is None or not pooling:
        raise ConfigError(f"{where}: modules.json needs a Transformer and a Pooling module")
    if missing:
        raise ModelMissingError(f"{where}: missing {', '.join(missing)}; downloads are disabled")
    st_cfg = {}
    for cand in (transformer / "sentence_bert_config.json", folder / "sentence_bert_config.json"):
        if cand.is_file():
            st_cfg = _read_json(cand, where)
            break
    return _StLayout(folder, transformer, pooling, dense, normalize,
                     int(st_cfg.get("max_seq_length") or 128), bool(st_cfg.get("do_lower_case", False)))


def check_text_model_available(model_cfg: ClipModelConfig) -> None:
    """Raise ModelMissingError / ConfigError when ``text_model`` cannot be loaded offline."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ModelMissingError(
            f"clip text model '{_text_model_name(model_cfg)}' needs the 'transformers' package "
            f"(pip install 'laionbuild[multilingual]')"
        ) from None
    _read_st_layout(model_cfg)


class TextTokenizer:
    """The Hugging Face tokenizer of a text model: texts -> int64 ids ``[n, max_seq_length]``.

    Padding uses ``pad_id``; the attention mask is ``ids != pad_id``. Truncation at
    ``max_seq_length`` as sentence-transformers does; lower-cases first when the
    model says so (``do_lower_case``).
    """

    def __init__(self, folder: Path, max_seq_length: int, do_lower_case: bool = False):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.context_length = int(min(max_seq_length, getattr(self.hf, "model_max_length", max_seq_length) or max_seq_length))
        self.do_lower_case = do_lower_case
        self.pad_id = int(self.hf.pad_token_id if self.hf.pad_token_id is not None else 0)

    def __call__(self, texts: str | Sequence[str]):
        import torch

        if isinstance(texts, str):
            texts = [texts]
        texts = [t.lower() for t in texts] if self.do_lower_case else [str(t) for t in texts]
        enc = self.hf(texts, padding="max_length", truncation="longest_first", max_length=self.context_length,
                      return_tensors="np", return_attention_mask=True)
        ids = torch.from_numpy(enc["input_ids"].astype(np.int64))
        mask = torch.from_numpy(enc["attention_mask"].astype(bool))
        ids[~mask] = self.pad_id  # the mask is recovered from the ids
        return ids


class TextModel:
    """transformer -> pooling -> dense projection(s) [-> normalise], in the sentence-transformers order.

    ``encode_text(ids)`` takes the padded ids of :class:`TextTokenizer` and returns
    the text embedding (not normalised unless the model has a Normalize module).
    """

    def __init__(self, transformer, pooling: str, dense: Sequence[tuple[Any, Any]], normalize: bool, pad_id: int):
        import torch

        self.transformer = transformer
        self.pooling = pooling
        self.dense = list(dense)  # [(nn.Linear, activation name or None)]
        self.normalize = normalize
        self.pad_id = pad_id
        self._modules = torch.nn.ModuleList([transformer] + [lin for lin, _ in self.dense])

    def to(self, device):
        self._modules.to(device)
        return self

    def eval(self):
        self._modules.eval()
        return self

    def parameters(self):
        return self._modules.parameters()

    def encode_text(self, ids):
        import torch
        import torch.nn.functional as F

        mask = ids != self.pad_id
        width = int(mask.sum(dim=1).max()) if len(ids) else 1
        ids, mask = ids[:, : max(1, width)], mask[:, : max(1, width)]  # padding columns change nothing
        hidden = self.transformer(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        if self.pooling == "cls":
            x = hidden[:, 0]
        elif self.pooling == "max":
            x = hidden.masked_fill(~mask.unsqueeze(-1), torch.finfo(hidden.dtype).min).amax(dim=1)
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            x = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        for linear, act in self.dense:
            x = linear(x.to(linear.weight.dtype) if not torch.is_autocast_enabled(x.device.type) else x)
            if act == "tanh":
                x = torch.tanh(x)
        return F.normalize(x, dim=-1) if self.normalize else x


@dataclass
class LoadedTextModel:
    """A text tower from another model, embedding captions into an open_clip model's space."""

    model: TextModel
    tokenizer: TextTokenizer
    embed_dim: int
    name: str
    device: str = "cpu"


def _load_state(path: Path) -> dict:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_text_model(model_cfg: ClipModelConfig, device: str = "cpu") -> LoadedTextModel:
    """Load ``text_model`` (sentence-transformers layout), offline, in eval mode on ``device``."""
    import torch

    check_text_model_available(model_cfg)
    layout = _read_st_layout(model_cfg)
    from transformers import AutoModel

    name = _text_model_name(model_cfg)
    transformer = AutoModel.from_pretrained(str(layout.transformer), local_files_only=True)
    tokenizer = TextTokenizer(layout.transformer, layout.max_seq_length, layout.do_lower_case)
    dense = []
    dim = int(getattr(transformer.config, "hidden_size", 0) or getattr(transformer.config, "dim", 0))
    for sub, cfg in layout.dense:
        linear = torch.nn.Linear(int(cfg["in_features"]), int(cfg["out_features"]), bias=bool(cfg.get("bias", True)))
        state = _load_state(_first_file(sub, _ST_WEIGHT_FILES))
        state = {k[len("linear."):]: v for k, v in state.items() if k.startswith("linear.")}
        try:
            linear.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ConfigError(f"clip text model '{name}': {sub} weights do not fit its config ({exc})") from None
        dense.append((linear, _ST_ACTIVATIONS[str(cfg.get("activation_function", "torch.nn.modules.activation.Tanh"))]))
        dim = int(cfg["out_features"])
    model = TextModel(transformer, layout.pooling, dense, layout.normalize, tokenizer.pad_id)
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    logger.info("loaded clip text model %s (%s pooling, %d-d) from %s on %s", name, layout.pooling, dim,
                layout.folder, device)
    return LoadedTextModel(model, tokenizer, dim, name, device)


def load_text_tokenizer(model_cfg: ClipModelConfig) -> TextTokenizer:
    """Only the tokenizer of ``text_model`` (upstream tokenising)."""
    check_text_model_available(model_cfg)
    layout = _read_st_layout(model_cfg)
    return TextTokenizer(layout.transformer, layout.max_seq_length, layout.do_lower_case)


def text_model_embed_dim(model_cfg: ClipModelConfig) -> int:
    """Embedding size of ``text_model``, read from its configs (no weights are loaded)."""
    layout = _read_st_layout(model_cfg)
    if layout.dense:
        return int(layout.dense[-1][1]["out_features"])
    cfg = _read_json(layout.transformer / "config.json", f"clip text model '{_text_model_name(model_cfg)}'")
    return int(cfg.get("hidden_size") or cfg.get("dim") or 0)
