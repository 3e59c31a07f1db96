"""Downloading one file: resumable, verified, written atomically.

A download goes to a hidden partial file next to its target
(``.<name>.partial``). An interrupted transfer leaves that partial file, and the
next attempt asks the server for the rest with an HTTP ``Range`` request. Only a
complete file whose size (and, when known, sha256) checks out is renamed onto
the target, so the target is never half-written. A checksum or size mismatch
deletes the partial file and raises :class:`ModelDownloadError`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import SetupError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 16
USER_AGENT = "laionbuild-models/0.1"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class ModelDownloadError(SetupError):
    """A model file could not be downloaded or did not verify."""


class HTTPStatusError(ModelDownloadError):
    """The server answered with an error status (a 4xx is not retried)."""

    def __init__(self, url: str, status: int):
        self.status = status
        super().__init__(f"{url}: HTTP {status}")


@dataclass(frozen=True)
class Downloaded:
    path: Path
    url: str
    sha256: str
    size: int
    resumed_from: int = 0


def sha256_file(path: str | os.PathLike, chunk: int = CHUNK_BYTES) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def partial_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.partial")


def _progress(total: int | None, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=not enabled, leave=False)


def _transfer(url: str, part: Path, *, timeout: float, progress: bool) -> tuple[int | None, int]:
    """One HTTP attempt appending to ``part``; returns (total size or None, offset resumed from)."""
    import requests

    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    with requests.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=True) as resp:
        if start and resp.status_code == 416:
            # the partial file is already complete (or longer than the file): start over
            part.unlink()
            raise ModelDownloadError(f"{url}: the server refused to resume at byte {start}; starting over")
        if resp.status_code >= 400:
            raise HTTPStatusError(url, resp.status_code)
        total: int | None = None
        mode = "wb"
        if start and resp.status_code == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != start:
                part.unlink()
                raise ModelDownloadError(f"{url}: unexpected Content-Range {resp.headers.get('Content-Range')!r}")
            total = int(m.group(3)) if m.group(3) != "*" else None
            mode = "ab"
        else:
            if start:
                log.info("%s: the server ignored the Range request; downloading from the start", url)
            start = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        desc = url.rsplit("/", 1)[-1][:40]
        with open(part, mode) as f, _progress(total, start, desc, progress) as bar:
            for block in resp.iter_content(CHUNK_BYTES):
                f.write(block)
                bar.update(len(block))
            f.flush()
            os.fsync(f.fileno())
    return total, start


def download_url(url: str, dest: str | os.PathLike, *, expected_sha256: str = "", expected_size: int | None = None,
                 attempts: int = 3, timeout: float = 60.0, progress: bool = True, backoff_s: float = 1.0) -> Downloaded:
    """Download ``url`` to ``dest`` (resuming a partial file), verify it, rename it into place."""
    import requests

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = partial_path(dest)
    first_offset = part.stat().st_size if part.exists() else 0
    last_error: Exception | None = None
    for attempt in range(1, max(1, attempts) + 1):
        try:
            total, _ = _transfer(url, part, timeout=timeout, progress=progress)
        except (requests.RequestException, OSError, ModelDownloadError) as exc:
            last_error = exc
            if isinstance(exc, HTTPStatusError) and 400 <= exc.status < 500:
                raise  # not found / forbidden: retrying does not help
            got = part.stat().st_size if part.exists() else 0
            log.warning("download of %s interrupted at %d bytes (attempt %d/%d): %s", url, got, attempt, attempts,
                        exc)
            if attempt < attempts:
                time.sleep(backoff_s * attempt)
            continue
        size = part.stat().st_size
        if total is not None and size != total:
            last_error = ModelDownloadError(f"{url}: got {size} of {total} bytes")
            continue
        _verify(url, part, size, expected_size, expected_sha256)
        digest = sha256_file(part)
        os.replace(part, dest)
        log.info("downloaded %s -> %s (%d bytes, sha256 %s)", url, dest, size, digest[:12])
        return Downloaded(dest, url, digest, size, first_offset)
    raise ModelDownloadError(f"download of {url} failed: {last_error}")


def _verify(url: str, part: Path, size: int, expected_size: int | None, expected_sha256: str) -> None:
    if expected_size is not None and size != expected_size:
        part.unlink(missing_ok=True)
        raise ModelDownloadError(f"{url}: size {size} bytes, expected {expected_size}; the file was deleted")
    if expected_sha256:
        digest = sha256_file(part)
        if digest != expected_sha256.lower():
            part.unlink(missing_ok=True)
            raise ModelDownloadError(
                f"{url}: checksum mismatch (sha256 {digest}, expected {expected_sha256}); the file was deleted, "
                f"nothing was written to the cache"
            )
