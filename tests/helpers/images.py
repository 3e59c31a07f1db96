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


def _jpeg_segment(marker: int, payload: bytes) -> bytes:
    return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload


def many_scans_jpeg(width: int, height: int, scans: int) -> bytes:
    """A greyscale progressive JPEG of ``scans`` copies of one AC scan that codes every block as
    part of an end-of-band run: a few bytes per scan, yet each is a decoder pass over all blocks."""
    dqt = _jpeg_segment(0xDB, b"\x00" + bytes([1] * 64))
    sof = _jpeg_segment(0xC2, struct.pack(">BHHB", 8, height, width, 1) + bytes([1, 0x11, 0]))
    # AC table 0: the 15 end-of-band-run symbols r << 4 (a run of 2**r plus r extra bits), each
    # coded as r in 4 bits
    dht = _jpeg_segment(0xC4, bytes([0x10, 0, 0, 0, 15] + [0] * 12) + bytes(r << 4 for r in range(15)))
    sos = _jpeg_segment(0xDA, bytes([1, 1, 0x00, 1, 63, 0]))  # component 1, AC coefficients 1..63
    blocks = -(-width // 8) * -(-height // 8)
    bits = ""
    while blocks > 0:
        run = min(blocks, 32767)
        r = run.bit_length() - 1
        bits += format(r, "04b") + (format(run - (1 << r), f"0{r}b") if r else "")
        blocks -= run
    bits += "1" * (-len(bits) % 8)
    coded = bytearray()
    for i in range(0, len(bits), 8):
        coded.append(int(bits[i:i + 8], 2))
        if coded[-1] == 0xFF:
            coded.append(0)  # byte stuffing
    return b"\xff\xd8" + dqt + sof + (dht + sos + bytes(coded)) * scans + b"\xff\xd9"
