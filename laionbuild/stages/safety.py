"""Safety scores of LAION-5B: ``punsafe`` (NSFW probability) and ``pwatermark``.

* ``punsafe`` comes from a small MLP head on the L2-normalised CLIP image
  embedding (LAION's CLIP-based NSFW detector worked the same way). The head
  runs inside :class:`~laionbuild.stages.clip_score.ClipScorer`, which already
  holds the embedding; :class:`PunsafeHead` is the loaded head.
* ``pwatermark`` comes from an image classifier (LAION used an EfficientNet-B3
  with a three-layer MLP classifier). :class:`WatermarkScorer` runs it on the
  resized uint8 image the fetch stage hands to CLIP (``resize.image_size``),
  resized on the device to the classifier's own input size.

Both are loaded from our own checkpoint formats (``laionbuild.punsafe/1`` and
``laionbuild.watermark/1``, see docs/safety_models.md). A missing file raises
:class:`~laionbuild.errors.ModelMissingError`; a file of another format, or a
head whose input size differs from the CLIP model's embedding size, a
:class:`~laionbuild.errors.ConfigError`. Nothing is ever downloaded: torchvision
and timm backbones are built without pretrained weights and filled from the
checkpoint. Nothing here imports Ray.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import schema
from ..errors import ConfigError, ModelMissingError, first_line
from ..schema import DROP_REASON, IMAGE, PWATERMARK

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
BUILTIN_PREFIX = "builtin:"
PUNSAFE_FORMAT = "laionbuild.punsafe/1"
WATERMARK_FORMAT = "laionbuild.watermark/1"
ACTIVATIONS = ("relu", "gelu", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- helpers
def resolve_checkpoint(value: str, what: str) -> Path:
    """Local path of a checkpoint setting (``builtin:<file>`` = inside laionbuild/assets)."""
    value = (value or "").strip()
    if not value:
        raise ConfigError(f"{what}: no checkpoint configured")
    path = ASSETS_DIR / value[len(BUILTIN_PREFIX):] if value.startswith(BUILTIN_PREFIX) else Path(value).expanduser()
    if not path.is_file():
        raise ModelMissingError(
            f"{what}: checkpoint {path} not found; train one (scripts/train_punsafe.py, scripts/train_watermark.py) "
            f"or convert LAION's released model (docs/safety_models.md) and point the setting at it"
        )
    return path


def _read(path: Path, fmt: str, what: str) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelMissingError(f"{what}: checkpoint {path} cannot be read ({type(exc).__name__}: {first_line(exc)})") from None
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != fmt:
        found = ckpt.get("format") if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise ConfigError(
            f"{what}: {path} is not a '{fmt}' checkpoint (found {found!r}); convert it as described in "
            f"docs/safety_models.md"
        )
    return dict(ckpt)


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs both classes")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _act(name: str):
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    if name == "none":
        return None
    raise ConfigError(f"unknown activation '{name}' (known: {', '.join(ACTIVATIONS)})")


# --------------------------------------------------------------------------- MLP head
class MLPHead(nn.Module):
    """Linear layers ``dims[0] -> ... -> dims[-1]`` with ``activations[i]`` after layer ``i``.

    Parameters are named ``layers.<i>.weight`` / ``layers.<i>.bias`` (one index per
    linear layer), so any dense stack converts by listing its layers in order. With
    ``input_normalization`` the input is first standardised with the buffers
    ``input_mean`` / ``input_std`` (the Normalization layer of Keras heads).
    """

    def __init__(self, dims: Sequence[int], activations: Sequence[str] | None = None, dropout: float = 0.0,
                 input_normalization: bool = False):
        super().__init__()
        dims = [int(d) for d in dims]
        if len(dims) < 2 or min(dims) <= 0:
            raise ConfigError(f"MLP head: dims must list at least input and output sizes, got {dims}")
        n_hidden = len(dims) - 2
        activations = list(activations) if activations is not None else ["relu"] * n_hidden
        if len(activations) != n_hidden:
            raise ConfigError(f"MLP head: {n_hidden} activations expected for dims {dims}, got {len(activations)}")
        self.dims = dims
        self.activations = [str(a) for a in activations]
        self._acts = [_act(a) for a in self.activations]
        self.dropout = float(dropout)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.input_normalization = bool(input_normalization)
        if self.input_normalization:
            self.register_buffer("input_mean", torch.zeros(dims[0]))
            self.register_buffer("input_std", torch.ones(dims[0]))

    def forward(self, x):
        if self.input_normalization:
            x = (x - self.input_mean) / self.input_std
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self._acts):
                if self._acts[i] is not None:
                    x = self._acts[i](x)
                if self.dropout:
                    x = F.dropout(x, self.dropout, self.training)
        return x


# --------------------------------------------------------------------------- punsafe
@dataclass
class PunsafeHead:
    """A loaded NSFW head: ``probability(embeddings)`` -> P(unsafe) per row."""

    module: MLPHead
    embed_dim: int
    clip_model: str
    name: str
    path: str = ""
    metrics: dict = field(default_factory=dict)

    def probability(self, embeddings):
        """Sigmoid of the head's logit for L2-normalised image embeddings (device tensor), in fp32."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return torch.sigmoid(self.module(embeddings.float()).reshape(-1))


def save_punsafe_head(path: str | Path, module: MLPHead, *, clip_model: str, name: str = "punsafe",
                      metrics: Mapping[str, Any] | None = None) -> Path:
    """Write ``module`` as a ``laionbuild.punsafe/1`` checkpoint."""
    if module.dims[-1] != 1:
        raise ConfigError(f"punsafe head: the last layer must have one output (a logit), got {module.dims[-1]}")
    ckpt = {
        "format": PUNSAFE_FORMAT,
        "name": name,
        "clip_model": clip_model,
        "embed_dim": module.dims[0],
        "input": "l2_normalized_image_embedding",
        "dims": list(module.dims),
        "activations": list(module.activations),
        "input_normalization": module.input_normalization,
        "state_dict": {k: v.detach().cpu().float() for k, v in module.state_dict().items()},
        "metrics": dict(metrics or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def punsafe_checkpoint_from_dense(path: str | Path, kernels: Sequence[np.ndarray], biases: Sequence[np.ndarray], *,
                                  activations: Sequence[str], clip_model: str, input_mean=None, input_var=None,
                                  name: str = "punsafe", epsilon: float = 1e-7) -> Path:
    """Convert a dense stack (Keras layout: kernel ``[in, out]``) into a ``laionbuild.punsafe/1`` file.

    ``input_mean`` / ``input_var`` are the statistics of a leading Keras
    Normalization layer (std = sqrt(max(var, epsilon))); the last layer must
    produce the logit of P(unsafe) (the sigmoid of the Keras output layer is
    applied by :class:`PunsafeHead`).
    """
    dims = [int(np.asarray(kernels[0]).shape[0])] + [int(np.asarray(k).shape[1]) for k in kernels]
    norm = input_mean is not None
    module = MLPHead(dims, activations, input_normalization=norm)
    with torch.no_grad():
        for layer, k, b in zip(module.layers, kernels, biases):
            layer.weight.copy_(torch.as_tensor(np.asarray(k, dtype=np.float32).T))
            layer.bias.copy_(torch.as_tensor(np.asarray(b, dtype=np.float32)))
        if norm:
            module.input_mean.copy_(torch.as_tensor(np.asarray(input_mean, dtype=np.float32).reshape(-1)))
            var = np.maximum(np.asarray(input_var, dtype=np.float32).reshape(-1), epsilon)
            module.input_std.copy_(torch.as_tensor(np.sqrt(var)))
    return save_punsafe_head(path, module, clip_model=clip_model, name=name, metrics={"converted": True})


def _read_meta(value: str, fmt: str, what: str) -> dict:
    """The metadata of a checkpoint in format ``fmt`` (no module built), weights left out."""
    ckpt = _read(resolve_checkpoint(value, what), fmt, what)
    ckpt.pop("state_dict", None)
    return ckpt


def read_punsafe_meta(value: str, what: str = "punsafe head") -> dict:
    """The metadata of a punsafe checkpoint; raises like :func:`load_punsafe_head`."""
    return _read_meta(value, PUNSAFE_FORMAT, what)


def load_punsafe_head(value: str, device: str = "cpu", what: str = "punsafe head") -> PunsafeHead:
    """Load a ``laionbuild.punsafe/1`` checkpoint in eval mode on ``device``."""
    path = resolve_checkpoint(value, what)
    ckpt = _read(path, PUNSAFE_FORMAT, what)
    dims = [int(d) for d in ckpt.get("dims", [])]
    if not dims or int(ckpt.get("embed_dim", -1)) != dims[0]:
        raise ConfigError(f"{what}: {path}: embed_dim {ckpt.get('embed_dim')} does not match the head's input {dims[:1]}")
    module = MLPHead(dims, ckpt.get("activations"), input_normalization=bool(ckpt.get("input_normalization")))
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except (RuntimeError, KeyError) as exc:
        raise ConfigError(f"{what}: {path}: weights do not fit the described head ({exc})") from None
    module.eval().requires_grad_(False).to(device)
    logger.info("loaded punsafe head %s (%d-d, for %s) from %s", ckpt.get("name"), dims[0], ckpt.get("clip_model"), path)
    return PunsafeHead(module, dims[0], str(ckpt.get("clip_model", "")), str(ckpt.get("name", "")), str(path),
                       dict(ckpt.get("metrics") or {}))


# --------------------------------------------------------------------------- watermark
class TinyCNN(nn.Module):
    """A small convolutional backbone (stride-2 conv + BN + ReLU blocks, avg+max pooled)."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64)):
        super().__init__()
        blocks = []
        c = 3
        for w in widths:
            blocks += [nn.Conv2d(c, int(w), 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(int(w)), nn.ReLU()]
            c = int(w)
        self.features = nn.Sequential(*blocks)
        self.num_features = 2 * c

    def forward(self, x):
        x = self.features(x)
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


def _strip_classifier(model: nn.Module, name: str) -> tuple[nn.Module, int]:
    """Replace a torchvision model's classifier by Identity; return it and the feature size."""
    for attr in ("fc", "classifier", "head", "heads"):
        part = getattr(model, attr, None)
        if part is None:
            continue
        linears = [m for m in part.modules() if isinstance(m, nn.Linear)] if isinstance(part, nn.Module) else []
        if linears:
            setattr(model, attr, nn.Identity())
            return model, int(linears[0].in_features)
    raise ConfigError(f"watermark model: cannot find the classifier of torchvision model '{name}'")


def build_backbone(arch: str, arch_kwargs: Mapping[str, Any] | None = None) -> tuple[nn.Module, int]:
    """``tiny-cnn``, ``torchvision:<name>`` or ``timm:<name>`` without weights -> (module, feature size)."""
    kwargs = dict(arch_kwargs or {})
    if arch == "tiny-cnn":
        net = TinyCNN(**kwargs)
        return net, net.num_features
    if arch.startswith("torchvision:"):
        import torchvision

        name = arch.split(":", 1)[1]
        try:
            model = torchvision.models.get_model(name, weights=None, **kwargs)
        except ValueError as exc:
            raise ConfigError(f"watermark model: unknown torchvision architecture '{name}' ({exc})") from None
        return _strip_classifier(model, name)
    if arch.startswith("timm:"):
        try:
            import timm
        except ImportError:
            raise ModelMissingError(f"watermark model '{arch}' needs the 'timm' package") from None
        name = arch.split(":", 1)[1]
        try:
            model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        except RuntimeError as exc:
            raise ConfigError(f"watermark model: unknown timm architecture '{name}' ({exc})") from None
        return model, int(model.num_features)
    raise ConfigError(f"watermark model: architecture '{arch}' is not tiny-cnn, torchvision:<name> or timm:<name>")


class WatermarkNet(nn.Module):
    """``backbone`` (features) followed by an :class:`MLPHead` classifier."""

    def __init__(self, arch: str, arch_kwargs: Mapping[str, Any] | None = None, head_hidden: Sequence[int] = (),
                 num_classes: int = 1, head_dropout: float = 0.0):
        super().__init__()
        self.arch = arch
        self.arch_kwargs = dict(arch_kwargs or {})
        self.backbone, n_features = build_backbone(arch, self.arch_kwargs)
        self.head_hidden = [int(h) for h in head_hidden]
        self.num_classes = int(num_classes)
        self.head = MLPHead([n_features, *self.head_hidden, self.num_classes], dropout=head_dropout)

    def forward(self, x):
        return self.head(self.backbone(x))


@dataclass
class WatermarkModel:
    """A loaded watermark classifier and its preprocessing."""

    net: WatermarkNet
    input_size: int
    mean: tuple
    std: tuple
    positive_index: int
    name: str
    path: str = ""
    metrics: dict = field(default_factory=dict)

    def probability(self, logits):
        if logits.shape[1] == 1:
            return torch.sigmoid(logits[:, 0])
        return torch.softmax(logits.float(), dim=1)[:, self.positive_index]


def save_watermark_model(path: str | Path, net: WatermarkNet, *, input_size: int, mean=IMAGENET_MEAN,
                         std=IMAGENET_STD, positive_index: int = 0, name: str = "watermark",
                         metrics: Mapping[str, Any] | None = None, state_dict: Mapping[str, Any] | None = None) -> Path:
    """Write ``net`` as a ``laionbuild.watermark/1`` checkpoint."""
    if net.num_classes == 1 and positive_index != 0:
        raise ConfigError("watermark model: a one-logit classifier has positive_index 0")
    state = state_dict if state_dict is not None else net.state_dict()
    ckpt = {
        "format": WATERMARK_FORMAT,
        "name": name,
        "arch": net.arch,
        "arch_kwargs": dict(net.arch_kwargs),
        "head_hidden": list(net.head_hidden),
        "num_classes": net.num_classes,
        "positive_index": int(positive_index),
        "input_size": int(input_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "state_dict": {k: v.detach().cpu() for k, v in state.items()},
        "metrics": dict(metrics or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def read_watermark_meta(value: str, what: str = "watermark model") -> dict:
    """The metadata of a watermark checkpoint; raises like :func:`load_watermark_model`."""
    return _read_meta(value, WATERMARK_FORMAT, what)


def load_watermark_model(value: str, device: str = "cpu", what: str = "watermark model") -> WatermarkModel:
    """Load a ``laionbuild.watermark/1`` checkpoint in eval mode on ``device``."""
    path = resolve_checkpoint(value, what)
    ckpt = _read(path, WATERMARK_FORMAT, what)
    try:
        net = WatermarkNet(str(ckpt["arch"]), ckpt.get("arch_kwargs"), ckpt.get("head_hidden", ()),
                           int(ckpt.get("num_classes", 1)))
    except KeyError as exc:
        raise ConfigError(f"{what}: {path} lacks {exc}") from None
    try:
        net.load_state_dict(ckpt["state_dict"], strict=True)
    except (RuntimeError, KeyError) as exc:
        raise ConfigError(f"{what}: {path}: weights do not fit architecture {ckpt['arch']} ({exc})") from None
    positive = int(ckpt.get("positive_index", 0))
    if not 0 <= positive < max(1, net.num_classes):
        raise ConfigError(f"{what}: {path}: positive_index {positive} outside {net.num_classes} classes")
    net.eval().requires_grad_(False).to(device)
    logger.info("loaded watermark model %s (%s, %d px) from %s", ckpt.get("name"), ckpt["arch"],
                int(ckpt["input_size"]), path)
    return WatermarkModel(net, int(ckpt["input_size"]), tuple(ckpt.get("mean", IMAGENET_MEAN)),
                          tuple(ckpt.get("std", IMAGENET_STD)), positive, str(ckpt.get("name", "")), str(path),
                          dict(ckpt.get("metrics") or {}))


def laion_watermark_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """Rename a LAION watermark detector state dict (timm EfficientNet-B3 whose ``classifier`` is
    ``Sequential(Linear, ReLU, Dropout, Linear, ReLU, Linear)``) to :class:`WatermarkNet` names."""
    head_idx = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("classifier.")})
    rename = {old: new for new, old in enumerate(head_idx)}
    out = {}
    for key, value in state_dict.items():
        if key.startswith("classifier."):
            _, idx, rest = key.split(".", 2)
            out[f"head.layers.{rename[int(idx)]}.{rest}"] = value
        else:
            out[f"backbone.{key}"] = value
    return out


def preprocess_images(images, input_size: int, mean: Sequence[float], std: Sequence[float]):
    """uint8 NHWC tensor -> normalised float NCHW at ``input_size`` (bilinear, antialiased resize).

    The one preprocessing of the watermark classifier, used for training and scoring alike.
    """
    x = images.permute(0, 3, 1, 2).float()
    if x.shape[-1] != input_size or x.shape[-2] != input_size:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m * 255.0).div_(s * 255.0)


def image_rows(images: Any, idx: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``[k, size, size, 3]`` of rows ``idx`` and the mask of rows whose image is unusable."""
    return schema.image_rows(images, idx, size)


class WatermarkScorer:
    """Adds ``pwatermark`` (float32, NaN when not scored) for the alive rows of a batch.

    The images are the ``IMAGE`` column (uint8 ``[N, S, S, 3]``, ``S`` =
    ``image_size``); on the device they are resized (bilinear, antialiased) to
    the classifier's ``input_size`` and normalised with its mean / std.
    """

    def __init__(self, checkpoint: str, image_size: int, *, device: str = "cpu", precision: str = "fp32",
                 batch_size: int = 128, model: WatermarkModel | None = None):
        self.model = model if model is not None else load_watermark_model(checkpoint, device)
        self.model.net.to(device).eval()
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.image_size = int(image_size)
        self.batch_size = max(1, int(batch_size))
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def _input(self, images: np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(images))
        if self.cuda:
            t = t.pin_memory().to(self.device, non_blocking=True)
        return preprocess_images(t, self.model.input_size, self.model.mean, self.model.std)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """P(watermark) of uint8 images ``[k, S, S, 3]`` as float32."""
        import contextlib

        out = []
        pending = []
        for start in range(0, len(images), self.batch_size):
            x = self._input(images[start : start + self.batch_size])
            ctx = (torch.autocast(device_type=self.device.type, dtype=self.amp_dtype) if self.amp_dtype
                   else contextlib.nullcontext())
            with torch.inference_mode(), ctx:
                pending.append(self.model.probability(self.model.net(x).float()))
        for p in pending:
            out.append(p.float().cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)

    def score(self, batch: Mapping[str, np.ndarray], rows: np.ndarray | None = None) -> np.ndarray:
        """``pwatermark`` for every row of ``batch``: scored for ``rows`` (default: alive rows), else NaN."""
        drop = np.asarray(batch[DROP_REASON], dtype=object)
        n = len(drop)
        result = np.full(n, np.nan, dtype=np.float32)
        idx = np.flatnonzero(drop == "") if rows is None else np.asarray(rows, dtype=np.int64)
        images = batch.get(IMAGE)
        if not len(idx) or images is None:
            return result
        imgs, bad = image_rows(images, idx, self.image_size)
        good = idx[~bad]
        if len(good):
            result[good] = self.probabilities(imgs[~bad])
        return result

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(batch)
        out[PWATERMARK] = self.score(batch)
        return out


# --------------------------------------------------------------------------- set-up checks
def _clip_embed_dim(model_cfg) -> int:
    from ..models.clip import resolve_arch

    cfg, _, _ = resolve_arch(model_cfg)
    return int(cfg["embed_dim"])


def check_safety_models(safety_cfg, clip_cfg) -> None:
    """Pre-flight: every configured safety checkpoint exists, has our format and fits its CLIP model.

    Reads only the metadata; raises ModelMissingError / ConfigError.
    """
    for subset, value in sorted(safety_cfg.punsafe_heads.items()):
        if not value:
            continue
        what = f"safety.punsafe_heads.{subset}"
        meta = read_punsafe_meta(value, what)
        model_cfg = clip_cfg.models.get(subset)
        if model_cfg is None:
            raise ConfigError(f"{what}: subset '{subset}' has no clip model")
        dim = _clip_embed_dim(model_cfg)
        if int(meta.get("embed_dim", -1)) != dim:
            raise ConfigError(
                f"{what}: the head reads {meta.get('embed_dim')}-d embeddings but clip.models.{subset} "
                f"({model_cfg.arch}) gives {dim}-d ones; use a head trained on that model's embeddings"
            )
    if safety_cfg.watermark_model:
        read_watermark_meta(safety_cfg.watermark_model, "safety.watermark_model")


def same_clip_model(recorded: str, arch: str, pretrained: str) -> bool:
    """Whether a head's recorded ``clip_model`` names the model ``arch`` / ``pretrained``."""
    def norm(s: str) -> str:
        return s.strip().replace("/", "-").lower()

    if not recorded:
        return True
    rec = norm(recorded)
    return rec in (norm(f"{arch}-{pretrained}"), norm(arch)) or rec == norm(f"{arch}/{Path(pretrained).name}")
