"""Check that a weights file is whole before a worker loads it: the common damage is a cut (an
interrupted download or copy), and a damaged checkpoint found by a GPU actor stops the run
after the candidates and de-dup phases, with the loader's error in a worker.

:func:`check_weights_file` checks a zip archive (PyTorch's checkpoint format, TorchScript,
``.npz``) by its central directory, whose entries must lie inside the file, and by every
member's CRC-32 (one read of the file); a ``.safetensors`` file by its header, whose tensors
must end at the file's end. Other formats (a legacy pickle) are left to their loader.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
import zlib

#: the largest safetensors header the format allows (100 MB)
_SAFETENSORS_MAX_HEADER = 100_000_000


class WeightsFileError(ValueError):
    """The file is not whole; the message says what is wrong."""


def _check_zip(path: str, size: int) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            ends = [info.header_offset + info.compress_size for info in zf.infolist()]
            if ends and max(ends) > size:
                raise WeightsFileError(f"its archive lists data up to byte {max(ends)} of a {size}-byte file")
            bad = zf.testzip()  # every member's CRC-32: about a second per GB
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise WeightsFileError(f"not a whole zip archive ({exc}): an incomplete download or copy?") from None
    if bad is not None:
        raise WeightsFileError(f"its member {bad} does not match its checksum: damaged in a download or copy")


def _check_safetensors(path: str, size: int) -> None:
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise WeightsFileError(f"{size} bytes: shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(_SAFETENSORS_MAX_HEADER, size - 8):
            raise WeightsFileError(f"its header announces {n} bytes in a {size}-byte file")
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise WeightsFileError("its header is not JSON: not a safetensors file") from None
    if not isinstance(header, dict):
        raise WeightsFileError("its header is not a JSON object: not a safetensors file")
    end = max((int(t["data_offsets"][1]) for k, t in header.items()
               if k != "__metadata__" and isinstance(t, dict) and "data_offsets" in t), default=0)
    if 8 + n + end != size:
        raise WeightsFileError(f"its tensors end at byte {8 + n + end}, the file at byte {size}: "
                               "an incomplete download or copy?")


def check_weights_file(path: str | os.PathLike) -> None:
    """Raise :class:`WeightsFileError` when the weights file at ``path`` is visibly not whole."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size == 0:
        raise WeightsFileError("the file is empty")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if path.endswith(".safetensors"):
        _check_safetensors(path, size)
    elif magic[:2] == b"PK" or b"PK\x03\x04".startswith(magic) or zipfile.is_zipfile(path):
        _check_zip(path, size)  # a zip archive, or the first bytes of one


def require_whole(path: str | os.PathLike, what: str) -> None:
    """:func:`check_weights_file` for a preflight: ``ModelMissingError`` naming ``what`` and the file."""
    from ..errors import ModelMissingError

    try:
        check_weights_file(path)
    except (WeightsFileError, OSError) as exc:
        raise ModelMissingError(f"{what}: {os.fspath(path)} is damaged: {exc}; download or copy it again") from None


__all__ = ["WeightsFileError", "check_weights_file", "require_whole"]
