"""Images as the bytes a server would send."""

from __future__ import annotations

import io

from PIL import Image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    """``img`` encoded as ``fmt`` (``JPEG``, ``PNG``, ``WEBP``...), with PIL's save options ``kw``."""
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()
