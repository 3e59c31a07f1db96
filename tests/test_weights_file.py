"""A damaged weights file is refused in the preflight, with one line, not by a GPU actor mid-run."""

from __future__ import annotations

import errno

import pytest
import torch

from laionbuild.config import ClipModelConfig
from laionbuild.errors import ModelMissingError, first_line, os_error_in, own_error_in
from laionbuild.models.names import asset_path
from laionbuild.models.clip import check_model_available
from laionbuild.models.weights_file import WeightsFileError, check_weights_file


def _torch_file(path, **kw):
    torch.save({"w": torch.arange(4096, dtype=torch.float32), "b": torch.ones(7)}, path, **kw)
    return path.read_bytes()


def test_a_torch_checkpoint_is_whole_and_every_cut_or_flipped_byte_is_found(tmp_path):
    path = tmp_path / "m.pt"
    data = _torch_file(path)
    check_weights_file(path)
    for n in [0, 1, 100, len(data) // 2, len(data) - 22, len(data) - 1]:
        path.write_bytes(data[:n])
        with pytest.raises(WeightsFileError):
            check_weights_file(path)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside the tensor data: only the checksum tells
    path.write_bytes(bytes(flipped))
    with pytest.raises(WeightsFileError, match="checksum"):
        check_weights_file(path)


def test_a_safetensors_file_must_end_where_its_tensors_end(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(64, 8)}, str(path))
    data = path.read_bytes()
    check_weights_file(path)
    for cut in (data[:4], data[:20], data[:-1], data + b"\0"):
        path.write_bytes(cut)
        with pytest.raises(WeightsFileError):
            check_weights_file(path)


def test_a_legacy_pickle_is_left_to_its_loader(tmp_path):
    path = tmp_path / "old.pt"
    _torch_file(path, _use_new_zipfile_serialization=False)
    check_weights_file(path)  # no structure to check without loading it


def test_the_preflight_refuses_a_cut_clip_checkpoint(tmp_path):
    data = asset_path("builtin:tiny-clip-shapes.pt").read_bytes()
    cut = tmp_path / "tiny.pt"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ModelMissingError, match="damaged") as err:
        check_model_available(ClipModelConfig("tiny-clip-shapes", str(cut)))
    assert str(cut) in str(err.value)
    cut.write_bytes(data)
    check_model_available(ClipModelConfig("tiny-clip-shapes", str(cut)))


def test_a_workers_own_error_reaches_the_command_as_its_one_line():
    from ray.exceptions import UserCodeException

    text = ("ray::MapWorker(MapBatches(StageActor)).__init__()\n"
            "  File \"clip.py\", line 389, in _read_checkpoint\n"
            "laionbuild.errors.ModelMissingError: checkpoint /m/ViT-B-32.pt cannot be read (bad data)\n")
    assert own_error_in(UserCodeException(text)) == "checkpoint /m/ViT-B-32.pt cannot be read (bad data)"
    assert own_error_in(ModelMissingError("x\ny")) == "x\ny" and first_line("\n x \ny") == "x"
    assert own_error_in(RuntimeError(text)) is None  # only Ray's errors carry a worker's as text
    # an errno inside our own message is not taken for an OSError of the worker
    wrapped = UserCodeException(text.replace("bad data", f"[Errno {errno.EINVAL}] Invalid argument"))
    assert os_error_in(wrapped) is None


def test_the_preflight_refuses_a_text_model_with_a_cut_weights_file(tmp_path):
    import shutil

    from laionbuild.models.text_tower import check_text_model_available

    folder = tmp_path / "st"
    shutil.copytree(asset_path("builtin:tiny-text-shapes"), folder)
    mcfg = ClipModelConfig("tiny-clip-shapes", "builtin:tiny-clip-shapes.pt", text_model=str(folder))
    check_text_model_available(mcfg)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelMissingError, match="damaged") as err:
        check_text_model_available(mcfg)
    assert str(weights) in str(err.value)
