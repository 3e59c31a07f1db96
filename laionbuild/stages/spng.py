"""PNG decoding with libspng, the library the ``pyspng`` wheel ships, called through its C API.

libspng decodes PNG in about two thirds of the CPU time libpng (OpenCV, PIL) takes, with the
same pixels. ``pyspng``'s own ``load`` holds the interpreter lock while it decodes, which
stalls every other download thread of a fetch worker, and it uses chunks whose CRC is wrong.
Here the wheel's shared object is loaded with ``ctypes`` (its Python module is never imported)
and libspng's C functions are called: the lock is released for the decode, and the CRC of
every chunk the decoder reads is checked (a mismatch fails the decode; the caller then asks the
other decoders, which give the answer they always gave).

:func:`decode_rgb8` returns ``None`` whenever libspng is not installed or does not decode the
data; it never raises for bad data.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import logging
import os

import numpy as np

logger = logging.getLogger(__name__)

#: ``enum spng_format``: 8-bit RGB; palette, grey and 16-bit images are converted, alpha dropped
_FMT_RGB8 = 4
#: ``enum spng_crc_action``: a chunk whose CRC is wrong fails the decode
_CRC_ERROR = 0
#: bytes one chunk (and all the ancillary chunks together) may hold; a fetched body is smaller
_CHUNK_LIMIT = 64 << 20


def _library_path() -> str | None:
    """The shared object of the ``pyspng`` wheel, found without importing it: its Python
    module (pybind11) is never initialised, only libspng's C functions are called."""
    try:
        spec = importlib.util.find_spec("pyspng")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        found = sorted(glob.glob(os.path.join(folder, "_pyspng_c*.so")))
        if found:
            return found[0]
    return None


def _load() -> ctypes.CDLL | None:
    path = _library_path()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
        lib.spng_ctx_new.restype = ctypes.c_void_p
        lib.spng_ctx_new.argtypes = [ctypes.c_int]
        lib.spng_ctx_free.restype = None
        lib.spng_ctx_free.argtypes = [ctypes.c_void_p]
        lib.spng_set_png_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        lib.spng_set_crc_action.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.spng_set_chunk_limits.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        lib.spng_decoded_image_size.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_size_t)]
        lib.spng_decode_image.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                          ctypes.c_int]
    except (OSError, AttributeError) as exc:  # a build without the C API's symbols
        logger.debug("libspng is not usable (%s); PNG goes to the other decoders", exc)
        return None
    return lib


_lib = _load()


def available() -> bool:
    return _lib is not None


def decode_rgb8(data: bytes, width: int, height: int) -> np.ndarray | None:
    """``uint8 [height, width, 3]`` pixels of the PNG ``data`` (whose header announces ``width`` x
    ``height``), or ``None`` when libspng is missing or the data does not decode."""
    lib = _lib
    if lib is None:
        return None
    if not isinstance(data, bytes):  # bytearray, memoryview: ctypes passes bytes without a copy
        data = bytes(data)
    ctx = lib.spng_ctx_new(0)
    if not ctx:
        return None
    try:
        if lib.spng_set_crc_action(ctx, _CRC_ERROR, _CRC_ERROR) or \
                lib.spng_set_chunk_limits(ctx, _CHUNK_LIMIT, _CHUNK_LIMIT) or \
                lib.spng_set_png_buffer(ctx, data, len(data)):
            return None
        size = ctypes.c_size_t()
        if lib.spng_decoded_image_size(ctx, _FMT_RGB8, ctypes.byref(size)) or size.value != width * height * 3:
            return None
        out = np.empty((height, width, 3), np.uint8)
        if lib.spng_decode_image(ctx, out.ctypes.data, size.value, _FMT_RGB8, 0):
            return None
        return out
    finally:
        lib.spng_ctx_free(ctx)


__all__ = ["available", "decode_rgb8"]
