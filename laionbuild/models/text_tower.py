"""Offline loading of text towers of other models: a Hugging Face transformer, pooling and a dense
projection into a CLIP embedding space, in the sentence-transformers folder layout (e.g.
``sentence-transformers/clip-ViT-B-32-multilingual-v1``), selected by ``clip.models.<subset>.text_model``.

Nothing is ever downloaded: a missing file raises :class:`~laionbuild.errors.ModelMissingError`
naming what is expected where.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import ClipModelConfig
from ..errors import ConfigError, ModelMissingError
from .hub import hf_cache_hint, hf_cached, quiet_library_handlers
from .names import BUILTIN_PREFIX, asset_path

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- text towers of other models
_ST_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_ST_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "sentencepiece.bpe.model", "spiece.model")
_ST_ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": None,
    "torch.nn.Identity": None,
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.Tanh": "tanh",
}


def text_model_name(model_cfg: ClipModelConfig) -> str:
    return model_cfg.text_model.strip()


def text_key(model_cfg: ClipModelConfig) -> tuple:
    return (text_model_name(model_cfg), model_cfg.text_cache_dir)


def resolve_text_model_folder(model_cfg: ClipModelConfig) -> Path:
    """Local folder of ``text_model`` (a folder path, or a Hugging Face id found in the local cache)."""
    name = text_model_name(model_cfg)
    where = f"clip text model '{name}'"
    if name.startswith(BUILTIN_PREFIX):
        path = asset_path(name)
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
    found = hf_cached(name, "modules.json", model_cfg.text_cache_dir)
    if found is None:
        raise ModelMissingError(
            f"{where}: not in the Hugging Face {hf_cache_hint(model_cfg.text_cache_dir)} and downloads are "
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
    where = f"clip text model '{text_model_name(model_cfg)}' ({folder})"
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
            f"clip text model '{text_model_name(model_cfg)}' needs the 'transformers' package "
            f"(pip install 'laionbuild[multilingual]')"
        ) from None
    from .weights_file import require_whole

    layout = _read_st_layout(model_cfg)
    for sub in (layout.transformer, *(d for d, _ in layout.dense)):
        require_whole(_first_file(sub, _ST_WEIGHT_FILES), f"clip text model '{text_model_name(model_cfg)}'")


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

    quiet_library_handlers()
    name = text_model_name(model_cfg)
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
    cfg = _read_json(layout.transformer / "config.json", f"clip text model '{text_model_name(model_cfg)}'")
    return int(cfg.get("hidden_size") or cfg.get("dim") or 0)
