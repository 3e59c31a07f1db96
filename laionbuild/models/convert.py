"""Converters from LAION's released safety model files to laionbuild's checkpoint formats.

* NSFW heads (``laionbuild.punsafe/1``): LAION's CLIP-based NSFW detector was
  released as AutoKeras models zipped as Keras SavedModel folders
  (``clip_autokeras_nsfw_b32.zip`` for ViT-B/32, ``clip_autokeras_binary_nsfw.zip``
  for ViT-L/14) and later ported by LAION to PyTorch state dicts
  (``clip_<model>_openai_binary_nsfw_head.pth``: ``norm.mean``, ``norm.variance``,
  ``linear_<i>.weight`` / ``.bias``). Both are read here without TensorFlow: the
  SavedModel's variables are read from its TensorFlow checkpoint
  (``variables/variables.index`` + ``variables.data-*``) by :func:`read_tf_checkpoint`.
  Each head is Normalization -> Dense (ReLU) ... -> Dense (sigmoid), so every gap
  between two dense layers gets a ReLU.
* The watermark detector (``laionbuild.watermark/1``): ``watermark_model_v1.pt``,
  a timm EfficientNet-B3 state dict with a 1536 -> 625 -> 256 -> 2 classifier.
"""

from __future__ import annotations

import re
import struct
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import ConfigError

#: layout of LAION's watermark detector (see docs/safety_models.md)
LAION_WATERMARK_ARCH = "timm:efficientnet_b3"
LAION_WATERMARK_HEAD = (625, 256)
LAION_WATERMARK_INPUT = 256

_TABLE_MAGIC = 0xDB4775248B80FB57
_TF_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64, 19: np.float16}
_KERAS_VAR = re.compile(r"^layer_with_weights-(\d+)/(\w+)/\.ATTRIBUTES/VARIABLE_VALUE$")


# --------------------------------------------------------------------------- protobuf / table reading
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs of a serialized protobuf message (varint, fixed and bytes fields)."""
    out, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _varint(buf, pos)
        elif wire == 1:
            val, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 5:
            val, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        elif wire == 2:
            n, pos = _varint(buf, pos)
            val, pos = buf[pos:pos + n], pos + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((num, val))
    return out


def _block_entries(table: bytes, offset: int, size: int) -> list[tuple[bytes, bytes]]:
    if table[offset + size] != 0:
        raise ValueError("compressed checkpoint index blocks are not supported")
    block = table[offset:offset + size]
    n_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 - 4 * n_restarts
    entries, pos, key = [], 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        vlen, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        entries.append((key, block[pos:pos + vlen]))
        pos += vlen
    return entries


def _table_entries(table: bytes) -> list[tuple[bytes, bytes]]:
    """Key/value pairs of a LevelDB-format table (a TensorFlow checkpoint's ``.index``)."""
    if len(table) < 48 or struct.unpack_from("<Q", table, len(table) - 8)[0] != _TABLE_MAGIC:
        raise ValueError("not a TensorFlow checkpoint index (bad table magic)")
    footer = table[len(table) - 48:]
    _, pos = _varint(footer, 0)
    _, pos = _varint(footer, pos)
    idx_off, pos = _varint(footer, pos)
    idx_size, _ = _varint(footer, pos)
    out = []
    for _, handle in _block_entries(table, idx_off, idx_size):
        off, p = _varint(handle, 0)
        size, _ = _varint(handle, p)
        out.extend(_block_entries(table, off, size))
    return out


def read_tf_checkpoint(index: bytes, data: Mapping[int, bytes] | bytes) -> dict[str, np.ndarray]:
    """Tensors of a TensorFlow checkpoint (``variables.index`` + ``variables.data-NNNNN-of-MMMMM``).

    ``data`` is the bytes of the one data shard, or shard number -> bytes.
    """
    shards = {0: data} if isinstance(data, (bytes, bytearray)) else dict(data)
    tensors: dict[str, np.ndarray] = {}
    for key, value in _table_entries(index):
        if not key:
            continue  # the bundle header
        fields = _proto_fields(value)
        dtype, shape, shard, offset, size = 0, [], 0, 0, 0
        for num, val in fields:
            if num == 1:
                dtype = int(val)
            elif num == 2:
                for dnum, dim in _proto_fields(val):
                    if dnum == 2:
                        shape.append(next((int(v) for n, v in _proto_fields(dim) if n == 1), 0))
            elif num == 3:
                shard = int(val)
            elif num == 4:
                offset = int(val)
            elif num == 5:
                size = int(val)
        if dtype not in _TF_DTYPES:
            continue  # strings and other non-numeric entries (object graph, Keras metadata)
        raw = shards[shard][offset:offset + size]
        tensors[key.decode("utf-8")] = np.frombuffer(raw, dtype=_TF_DTYPES[dtype]).reshape(shape).copy()
    return tensors


# --------------------------------------------------------------------------- NSFW heads
def _dense_stack_from_keras(tensors: Mapping[str, np.ndarray]) -> tuple[list, list, np.ndarray | None, np.ndarray | None]:
    layers: dict[int, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _KERAS_VAR.match(key)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    kernels, biases, mean, var = [], [], None, None
    for idx in sorted(layers):
        layer = layers[idx]
        if "mean" in layer and "variance" in layer:
            mean, var = layer["mean"].reshape(-1), layer["variance"].reshape(-1)
        elif "kernel" in layer and "bias" in layer:
            kernels.append(layer["kernel"])
            biases.append(layer["bias"])
    if not kernels:
        raise ConfigError(f"Keras NSFW head: no dense layers among {sorted(tensors)[:8]}...")
    return kernels, biases, mean, var


def _dense_stack_from_torch(state: Mapping[str, object]) -> tuple[list, list, np.ndarray | None, np.ndarray | None]:
    linear = sorted({int(m.group(1)) for k in state if (m := re.match(r"linear_(\d+)\.weight$", k))})
    if not linear:
        raise ConfigError(f"NSFW head state dict: no linear_<i>.weight among {sorted(state)[:8]}")
    kernels = [np.asarray(state[f"linear_{i}.weight"], dtype=np.float32).T for i in linear]
    biases = [np.asarray(state[f"linear_{i}.bias"], dtype=np.float32) for i in linear]
    mean = np.asarray(state["norm.mean"], dtype=np.float32).reshape(-1) if "norm.mean" in state else None
    var = np.asarray(state["norm.variance"], dtype=np.float32).reshape(-1) if "norm.variance" in state else None
    return kernels, biases, mean, var


def _keras_zip_tensors(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        index = next((n for n in names if n.endswith("variables/variables.index")), None)
        if index is None:
            raise ConfigError(f"{path}: no Keras SavedModel (variables/variables.index) inside the zip")
        prefix = index[: -len("index")]
        shards = {}
        for n in names:
            m = re.match(re.escape(prefix) + r"data-(\d+)-of-(\d+)$", n)
            if m:
                shards[int(m.group(1))] = zf.read(n)
        return read_tf_checkpoint(zf.read(index), shards)


def convert_nsfw_head(src: str | Path, out: str | Path, *, clip_model: str, name: str) -> Path:
    """LAION's NSFW head (Keras SavedModel zip or its PyTorch port) -> ``laionbuild.punsafe/1``."""
    from ..stages.safety import punsafe_checkpoint_from_dense

    src = Path(src)
    if zipfile.is_zipfile(src) and any(n.endswith("variables/variables.index") for n in zipfile.ZipFile(src).namelist()):
        kernels, biases, mean, var = _dense_stack_from_keras(_keras_zip_tensors(src))
    else:
        import torch

        state = torch.load(src, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and "state_dict" in state:
            state = state["state_dict"]
        kernels, biases, mean, var = _dense_stack_from_torch({k: v.numpy() for k, v in state.items()})
    acts = ["relu"] * (len(kernels) - 1)
    return punsafe_checkpoint_from_dense(out, kernels, biases, activations=acts, clip_model=clip_model,
                                         input_mean=mean, input_var=var, name=name)


# --------------------------------------------------------------------------- watermark
def convert_laion_watermark(src: str | Path, out: str | Path, *, name: str = "laion-watermark-v1") -> Path:
    """LAION's ``watermark_model_v1.pt`` -> ``laionbuild.watermark/1`` (loaded strictly, so a layout change fails)."""
    import torch

    from ..stages.safety import IMAGENET_MEAN, IMAGENET_STD, WatermarkNet, laion_watermark_state_dict, save_watermark_model

    state = torch.load(src, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and not any(k.startswith("classifier.") for k in state):
        state = state["state_dict"]
    net = WatermarkNet(LAION_WATERMARK_ARCH, head_hidden=LAION_WATERMARK_HEAD, num_classes=2)
    try:
        net.load_state_dict(laion_watermark_state_dict(state), strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"{src}: not LAION's watermark detector layout ({str(exc)[:300]})") from None
    return save_watermark_model(out, net, input_size=LAION_WATERMARK_INPUT, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                positive_index=0, name=name, metrics={"converted_from": Path(src).name})


__all__ = ["convert_nsfw_head", "convert_laion_watermark", "read_tf_checkpoint"]
