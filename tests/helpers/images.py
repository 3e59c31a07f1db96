"""Images as the bytes a server would send."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    """``img`` encoded as ``fmt`` (``JPEG``, ``PNG``, ``WEBP``...), with PIL's save options ``kw``."""
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_file(width: int, height: int, idat: bytes, colour_type: int = 2, bit_depth: int = 8) -> bytes:
    """A PNG (``bit_depth`` bits per sample; colour type 2 RGB, 0 grey) whose header announces
    ``width`` x ``height`` and whose image data is ``idat`` (zlib-compressed filtered rows, or anything)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
