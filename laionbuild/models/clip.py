"""Offline loading of open_clip models, shared by the CLIP scorer and the safety models.

* open_clip models (image and text towers): :func:`load_clip`, see the
  ``clip.models.<subset>.arch`` / ``pretrained`` settings described in
  :mod:`laionbuild.stages.clip_score` and docs/clip.md;
* :func:`check_models_available`: every model of a ``clip`` section, open_clip
  models and the text towers of :mod:`laionbuild.models.text_tower` alike.

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

from ..config import ClipConfig, ClipModelConfig
from ..errors import ConfigError, ModelMissingError, SetupError, first_line
from .hub import hf_cache_hint, hf_cached, quiet_library_handlers
from .names import ASSETS_DIR, BUILTIN_PREFIX, HF_HUB_PREFIX, LOCAL_DIR_PREFIX, asset_path
from .text_tower import (
    check_text_model_available,
    text_key,
    text_model_name,
    text_model_embed_dim,
)

logger = logging.getLogger(__name__)

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


def resolve_arch(model_cfg: ClipModelConfig) -> tuple[dict, dict, str | None]:
    """The open_clip model config dict of ``arch``: (model_cfg, preprocess_cfg, open_clip name or None)."""
    arch = model_cfg.arch.strip()
    if not arch:
        raise ConfigError("clip model: 'arch' is empty")
    if arch.startswith(BUILTIN_PREFIX):
        path = asset_path(arch)
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
        cached = hf_cached(repo, "open_clip_config.json", model_cfg.cache_dir)
        if cached is None:
            raise ModelMissingError(
                f"clip model arch '{arch}': open_clip_config.json of {repo} is not in the Hugging Face cache "
                f"({hf_cache_hint(model_cfg.cache_dir)}); downloads are disabled. Copy the repository into the "
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
    cfg, _, _ = resolve_arch(model_cfg)
    return _square_size(cfg["vision_cfg"].get("image_size", 224), f"clip model {model_cfg.arch}")






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
        path = asset_path(pretrained)
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
            found = hf_cached(repo, name, model_cfg.cache_dir)
            if found:
                return _Weights(Path(found), tag_cfg)
        expected.append(f"{' or '.join(names)} of the Hugging Face repo {repo} ({hf_cache_hint(model_cfg.cache_dir)})")
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
            found = hf_cached(repo, name, model_cfg.cache_dir)
            if found:
                return _Weights(Path(found))
        where = f"for {repo} in the Hugging Face {hf_cache_hint(model_cfg.cache_dir)}"
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
    config = hf_cached(hf_name, "config.json", model_cfg.cache_dir)
    tok = next((p for p in (hf_cached(hf_name, f, model_cfg.cache_dir) for f in _HF_TOKENIZER_FILES) if p), None)
    if config is None or tok is None:
        raise ModelMissingError(
            f"clip model {_model_name(model_cfg)}: the tokenizer/config files of '{hf_name}' are not in the "
            f"Hugging Face cache ({hf_cache_hint(model_cfg.cache_dir)}) and downloads are disabled; copy that "
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
            raise ModelMissingError(f"checkpoint {path} cannot be read ({first_line(exc)})") from None


def check_model_available(model_cfg: ClipModelConfig) -> None:
    """Raise ConfigError / ModelMissingError when ``model_cfg`` cannot be loaded offline."""
    cfg, _, oc_name = resolve_arch(model_cfg)
    from .weights_file import require_whole

    require_whole(_resolve_weights(model_cfg, oc_name).path, f"clip model {_model_name(model_cfg)}: checkpoint")
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
        checks = [(model_key(mcfg), check_model_available)]
        if text_model_name(mcfg):
            checks.append((("text",) + text_key(mcfg), check_text_model_available))
        for key, check in checks:
            if key in seen:
                continue
            seen.add(key)
            try:
                check(mcfg)
            except ModelMissingError as exc:
                missing.append(f"clip.models.{subset}: {exc}")
        if text_model_name(mcfg) and not missing:
            text_dim = text_model_embed_dim(mcfg)
            image_dim = int(resolve_arch(mcfg)[0]["embed_dim"])
            if text_dim != image_dim:
                raise ConfigError(
                    f"clip.models.{subset}: text_model {text_model_name(mcfg)} gives {text_dim}-d embeddings but "
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

    quiet_library_handlers()  # open_clip imported transformers
    arch_cfg, pre_cfg, oc_name = resolve_arch(model_cfg)
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


def model_key(m: ClipModelConfig) -> tuple:
    return (m.arch, m.pretrained, m.cache_dir, m.tokenizer_dir)


def context_length(tokenizer: Any) -> int:
    return int(getattr(tokenizer, "context_length", None) or 77)


def load_clip_tokenizer(model_cfg: ClipModelConfig):
    arch_cfg, _, oc_name = resolve_arch(model_cfg)
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
