"""Read a remote file as one continuous stream, resuming where a broken read stopped.

Common Crawl answers ``503 Slow Down`` under load and long downloads lose their
connection now and then. :class:`ResumableHTTPReader` (``http(s)://``) and
:class:`ResumableFsspecReader` (``s3://`` and other fsspec filesystems, whose
files read byte ranges) hide both from the WARC reader above them:

* every failed attempt (connection refused or reset, timeout, a body cut short,
  ``429`` / ``5xx``) is retried after an exponential back-off with jitter, or
  after the server's ``Retry-After``;
* a retry asks for the bytes from the offset already delivered (HTTP
  ``Range: bytes=N-``), so the gzip / WARC parser sees each byte exactly once;
* a resumed HTTP answer must be ``206`` for the same object (``Content-Range``
  starts at N, same total length, same ``ETag``); a server that ignores ``Range``
  (``200``) is read from the start and the bytes already delivered are skipped;
  a changed object fails the read;
* ``retries`` failed attempts in a row (no byte delivered in between) raise
  :class:`RemoteReadError`, an ``OSError`` with ``reason = "network"``: the file
  is then ``failed`` (not ``partial``), gets no completion marker and the next run
  reads it again.

A file that itself ends early (a truncated gzip member or WARC record) still
reads as a short stream: that is the parser's ``partial``, not a network error.
"""

from __future__ import annotations

import email.utils
import io
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from .errors import name_not_found

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.I)
_SKIP_CHUNK = 1 << 20


class RemoteReadError(OSError):
    """A remote read gave up: the network or the server, not the file's content."""

    reason = "network"


class RemoteObjectChanged(RemoteReadError):
    """The object changed between two ranged reads (another ETag or length)."""

    reason = "changed"


@dataclass(frozen=True)
class RetryPolicy:
    """Back-off and budget of one remote read (``extract.input_*`` keys)."""

    #: failed attempts in a row (no byte delivered in between) before giving up
    retries: int = 8
    #: first back-off in seconds, doubled after each failed attempt
    backoff_s: float = 1.0
    #: longest back-off (also caps ``Retry-After``)
    max_backoff_s: float = 60.0
    #: connect / read timeout of one attempt
    timeout_s: float | None = 60.0

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait before the next attempt after ``failures`` failures in a row."""
        if retry_after is not None:
            return min(max(0.0, retry_after), self.max_backoff_s)
        base = min(self.backoff_s * (2 ** max(0, failures - 1)), self.max_backoff_s)
        return base * random.uniform(0.5, 1.0)


class _Retry(Exception):
    """One attempt failed in a way worth retrying."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta seconds or an HTTP date); None when it is
    neither. Delta seconds are ASCII digits only (RFC 9110): ``str.isdigit`` is also true of
    ``²``, ``1¹`` (Latin-1 superscripts, as ``http.client`` decodes header bytes) and other
    scripts' digits, which ``float`` refuses."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class _ResumableReader(io.RawIOBase):
    """A read-only raw stream over attempts that each deliver bytes from some offset on."""

    def __init__(self, name: str, policy: RetryPolicy, sleep: Callable[[float], None] = time.sleep):
        super().__init__()
        self.name = name
        self.policy = policy
        self._sleep = sleep
        self._pos = 0
        self._body: Any = None
        self._eof = False
        #: attempts that failed, whole read (for the counters)
        self.retries = 0
        #: attempts that resumed at an offset > 0
        self.resumes = 0
        #: the error that ended the read, when the budget ran out
        self.network_error: RemoteReadError | None = None

    # ------------------------------------------------------------------ subclass hooks
    def _open_at(self, pos: int) -> Any:
        """A file-like whose ``read`` delivers the object's bytes from ``pos`` on; raises :class:`_Retry`."""
        raise NotImplementedError

    def _read_body(self, n: int) -> bytes:
        """Up to ``n`` bytes of the current attempt; ``b""`` at its end; raises :class:`_Retry`."""
        raise NotImplementedError

    def _at_end(self) -> bool:
        """Whether an attempt that ended at ``self._pos`` ended with the object (not cut short)."""
        return True

    def _close_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close
                pass

    # ------------------------------------------------------------------ io
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Absolute or relative seeks; the next read starts a new attempt there."""
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("seek from the end is not supported")
        if offset < 0:
            raise ValueError("negative seek position")
        if offset != self._pos:
            self._close_body()
            self._pos = offset
            self._eof = False
        return self._pos

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        return n

    def read(self, size: int = -1) -> bytes:
        if self.closed:
            raise ValueError("read from a closed remote file")
        if size is None or size < 0:
            return self.readall()
        if size == 0 or self._eof:
            return b""

        def step() -> bytes:
            self._ensure_open()
            data = self._read_body(size)
            if data:
                self._pos += len(data)
                return data
            if self._at_end():
                self._eof = True
                self._close_body()
                return b""
            raise _Retry(f"connection closed at byte {self._pos} before the end")

        return self._with_retries(step)

    def _ensure_open(self) -> None:
        if self._body is None:
            if self._pos:
                self.resumes += 1
                log.info("resuming %s at byte %d", self.name, self._pos)
            self._body = self._open_at(self._pos)

    def _with_retries(self, action: Callable[[], Any]) -> Any:
        """Run ``action`` until it succeeds, backing off between failed attempts."""
        failures = 0
        while True:
            try:
                return action()
            except RemoteReadError as exc:
                self._close_body()
                self.network_error = exc
                raise
            except _Retry as exc:
                self._close_body()
                failures += 1
                self.retries += 1
                if failures > self.policy.retries:
                    self.network_error = RemoteReadError(
                        f"{self.name}: gave up after {failures} failed attempts at byte {self._pos}: {exc}"
                    )
                    raise self.network_error from None
                delay = self.policy.delay(failures, exc.retry_after)
                log.warning("reading %s at byte %d failed (%s); retry %d/%d in %.1fs",
                            self.name, self._pos, exc, failures, self.policy.retries, delay)
                if delay > 0:
                    self._sleep(delay)

    def readall(self) -> bytes:
        chunks = []
        while True:
            chunk = self.read(_SKIP_CHUNK)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def close(self) -> None:
        self._close_body()
        super().close()


class ResumableHTTPReader(_ResumableReader):
    """An ``http(s)://`` URL read with ``requests``; resumes with ``Range`` requests."""

    def __init__(self, url: str, policy: RetryPolicy | None = None, *, session=None,
                 sleep: Callable[[float], None] = time.sleep):
        super().__init__(url, policy or RetryPolicy(), sleep)
        import requests

        self._requests = requests
        self._session = session or requests.Session()
        self._own_session = session is None
        self.etag: str | None = None
        self.size: int | None = None
        #: the server answered a range request with the whole object; bytes were skipped
        self.range_ignored = 0
        # the first request now: a missing object fails at open, as a local file would
        self._with_retries(self._ensure_open)

    def _open_at(self, pos: int):
        headers = {"Accept-Encoding": "identity"}
        if pos:
            headers["Range"] = f"bytes={pos}-"
        req = self._requests
        try:
            resp = self._session.get(self.name, headers=headers, stream=True, timeout=self.policy.timeout_s)
        except (req.ConnectionError, req.Timeout, OSError) as exc:
            dns = name_not_found(exc)
            if dns:  # the name does not exist: no retry mends that
                raise RemoteReadError(f"{self.name}: the host name does not resolve ({dns})") from None
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        status = resp.status_code
        if status == 429 or 500 <= status <= 599:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            resp.close()
            raise _Retry(f"HTTP {status}", retry_after)
        if pos and status == 416 and self.size is not None and pos >= self.size:
            resp.close()
            return io.BytesIO(b"")
        if status not in (200, 206):
            resp.close()
            raise OSError(f"HTTP {status} for {self.name}")
        etag = resp.headers.get("ETag")
        if status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if m is None or int(m.group(1)) != pos:
                resp.close()
                raise RemoteObjectChanged(
                    f"{self.name}: asked for bytes {pos}- and got Content-Range "
                    f"{resp.headers.get('Content-Range')!r}"
                )
            total = None if m.group(3) == "*" else int(m.group(3))
        else:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() and "Content-Encoding" not in resp.headers else None
        self._check_same_object(etag, total, resp)
        raw = resp.raw
        raw.decode_content = False
        if status == 200 and pos:
            # the server ignored Range: read the object again from the start, skip what was delivered
            self.range_ignored += 1
            log.warning("%s ignores range requests; skipping %d bytes already read", self.name, pos)
            self._skip(raw, pos)
        return _Response(resp, raw)

    def _check_same_object(self, etag: str | None, total: int | None, resp) -> None:
        if self.etag is None and self.size is None:
            self.etag, self.size = etag, total
            return
        if (etag and self.etag and etag != self.etag) or (total is not None and self.size is not None
                                                            and total != self.size):
            resp.close()
            raise RemoteObjectChanged(
                f"{self.name} changed while it was read (ETag {self.etag!r} -> {etag!r}, "
                f"size {self.size} -> {total})"
            )
        if self.size is None:
            self.size = total
        if self.etag is None:
            self.etag = etag

    def _skip(self, raw, n: int) -> None:
        left = n
        try:
            while left:
                chunk = raw.read(min(left, _SKIP_CHUNK))
                if not chunk:
                    raise _Retry(f"connection closed while skipping to byte {n}")
                left -= len(chunk)
        except _Retry:
            raw.close()
            raise
        except Exception as exc:  # noqa: BLE001 - urllib3 / socket errors while skipping
            raw.close()
            raise _Retry(f"{type(exc).__name__}: {exc}") from None

    def _read_body(self, n: int) -> bytes:
        try:
            return self._body.read(n)
        except RemoteReadError:
            raise
        except Exception as exc:  # noqa: BLE001 - urllib3 ProtocolError / ReadTimeoutError, socket errors
            raise _Retry(f"{type(exc).__name__}: {exc}") from None

    def _at_end(self) -> bool:
        return self.size is None or self._pos >= self.size

    def close(self) -> None:
        super().close()
        if self._own_session:
            self._session.close()


class _Response:
    """The body of one HTTP answer; closing it releases the connection."""

    def __init__(self, resp, raw):
        self._resp = resp
        self._raw = raw

    def read(self, n: int) -> bytes:
        return self._raw.read(n)

    def close(self) -> None:
        self._resp.close()


class ResumableFsspecReader(_ResumableReader):
    """An fsspec URL (``s3://``...) read through files that read byte ranges; a broken read
    reopens the file and seeks to the offset already delivered."""

    def __init__(self, url: str, policy: RetryPolicy | None = None, *,
                 opener: Callable[[], Any] | None = None, sleep: Callable[[float], None] = time.sleep):
        super().__init__(url, policy or RetryPolicy(), sleep)
        if opener is None:
            from .output.fs import open_fs

            fs, path = open_fs(url)
            self.size = fs.size(path)

            def opener():
                return fs.open(path, "rb")
        else:
            self.size = None
        self._opener = opener
        self._with_retries(self._ensure_open)

    def _open_at(self, pos: int):
        try:
            fh = self._opener()
            if pos:
                fh.seek(pos)
            return fh
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise
        except (OSError, TimeoutError, ConnectionError) as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from None

    def _read_body(self, n: int) -> bytes:
        try:
            return self._body.read(n)
        except (FileNotFoundError, PermissionError):
            raise
        except Exception as exc:  # noqa: BLE001 - botocore / aiohttp / socket errors
            raise _Retry(f"{type(exc).__name__}: {exc}") from None

    def _at_end(self) -> bool:
        return self.size is None or self._pos >= self.size


def open_remote(url: str, policy: RetryPolicy | None = None) -> io.BufferedReader:
    """A buffered, resuming reader for ``http(s)://`` or another fsspec URL."""
    if url.startswith(("http://", "https://")):
        raw: _ResumableReader = ResumableHTTPReader(url, policy)
    else:
        raw = ResumableFsspecReader(url, policy)
    return io.BufferedReader(raw, buffer_size=1 << 20)


def network_error(stream) -> RemoteReadError | None:
    """The error that ended a remote read early (budget spent), or None."""
    raw = getattr(stream, "raw", stream)
    return getattr(raw, "network_error", None)


__all__ = [
    "RemoteObjectChanged",
    "RemoteReadError",
    "ResumableFsspecReader",
    "ResumableHTTPReader",
    "RetryPolicy",
    "network_error",
    "open_remote",
    "parse_retry_after",
]
