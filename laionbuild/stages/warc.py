"""Stream HTML ``response`` records out of a WARC file.

Two reader engines are supported (``extract.reader``):

* ``warcio`` (pure Python, the reference), run with ``no_record_parse`` so that
  the HTTP block is parsed here and a bogus HTTP header never stops the file;
* ``fastwarc`` (C++), faster (about 1.4x through this stage);
* ``auto`` (the default): fastwarc when it is installed, else warcio. fastwarc
  cannot read WARC header blocks with bare LF line ends (old crawls); when
  fastwarc stops early (at the first record or a later one), warcio reads the
  file again and goes on from the record fastwarc stopped at, the records
  before it neither yielded nor counted twice (``reader_fallback_warcio``);
  when warcio gets no further, fastwarc's account of the file stands.

Both engines hand the raw HTTP block of each record to the same code
(:func:`parse_http_block` and :func:`decode_body`), so the two give the same
documents. Only ``response`` records whose HTTP ``Content-Type`` is an HTML type
are yielded; payloads are cut at ``extract.max_html_bytes``.

Problems are data, never exceptions:

* a bad *record* (bogus HTTP header, binary payload, missing target URI...) is
  skipped and counted as ``record_skipped:<reason>`` in the counters;
* a bad *file* sets the :class:`~laionbuild.stats.FileResult`: ``failed`` when
  nothing could be read (``not_warc``, ``unreadable``), ``partial`` when the
  file ends inside a record (``truncated``) or a later record cannot be parsed
  (``bad_record``); what was read before is kept.
"""

from __future__ import annotations

import gzip
import io
import logging
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from ..config import ExtractConfig
from ..stats import FileResult, StageCounters

log = logging.getLogger(__name__)

#: HTTP header blocks larger than this are treated as bogus
MAX_HTTP_HEADER_BYTES = 65_536
_HEADER_READ = 16_384
_DRAIN_CHUNK = 1 << 20
#: a NUL byte in the first bytes of the payload marks binary content labelled as HTML
_BINARY_SNIFF_BYTES = 1024

_NEEDED_HEADERS_RE = re.compile(
    rb"^(content-type|transfer-encoding|content-encoding)[ \t]*:([^\r\n]*)", re.IGNORECASE | re.MULTILINE
)
#: a line break followed by a space or a tab: the next line continues the header (obs-fold)
_OBS_FOLD_RE = re.compile(rb"\r?\n[ \t]+")
#: the empty line that ends an HTTP header block, with CRLF or bare LF line ends (old
#: crawls, e.g. WARC/0.18 files, wrote LF-only HTTP headers)
_HEADER_END_RE = re.compile(rb"\r?\n\r?\n")
_CHARSET_RE = re.compile(r"""charset\s*=\s*["']?\s*([^\s;"',]+)""", re.IGNORECASE)
#: an HTTP token (the type and subtype of a MIME type)
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HTTP_WS = " \t\r\n"


@dataclass
class HtmlDocument:
    """One HTML page taken from a WARC ``response`` record."""

    page_url: str
    #: the HTTP payload, transfer/content encodings removed, cut at ``max_html_bytes``
    html: bytes
    #: charset named by the HTTP ``Content-Type`` header, if any
    http_charset: str | None
    record_id: str
    #: byte offset of the record in the (compressed) WARC file
    offset: int
    warc_path: str


class _BadRecord(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- input
def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def open_input(path: str, timeout_s: float | None = None, cfg: ExtractConfig | None = None) -> BinaryIO:
    """Open a local path or a URL for reading.

    ``http(s)://`` URLs and other schemes (``s3://``, ``gs://``... through fsspec)
    are read by :func:`laionbuild.remote.open_remote`, which resumes a broken read
    where it stopped (``extract.input_retries`` / ``input_backoff_s`` from ``cfg``;
    ``timeout_s`` for connect and each read).
    """
    if _is_url(path):
        from ..remote import RetryPolicy, open_remote

        cfg = cfg or ExtractConfig()
        return open_remote(path, RetryPolicy(cfg.input_retries, cfg.input_backoff_s, cfg.input_max_backoff_s,
                                             timeout_s))
    if path.startswith("file://"):
        path = path[len("file://"):]
    return open(path, "rb", buffering=1 << 20)


# --------------------------------------------------------------------------- HTTP block
def parse_http_block(head: bytes) -> tuple[int, dict[str, str], int]:
    """Parse the status line and headers at the start of an HTTP response block.

    Returns ``(status, headers, body_start)`` with lower-cased header names.
    Raises :class:`_BadRecord` when the block does not start with an HTTP header.
    """
    end, body_start = _header_end(head)
    lines = _unfold(head[:end]).decode("latin-1").splitlines()
    status_line = lines[0].strip() if lines else ""
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].upper().startswith("HTTP/"):
        raise _BadRecord("bad_http_header")
    try:
        status = int(parts[1])
    except ValueError:
        raise _BadRecord("bad_http_header") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            continue
        name = name.strip().lower()
        if name in headers:
            headers[name] = headers[name] + ", " + value.strip()
        else:
            headers[name] = value.strip()
    return status, headers, body_start


def _header_end(head: bytes) -> tuple[int, int]:
    """``(end of the header lines, start of the body)``: the FIRST empty line, whatever
    its line ends. Looking for ``\\r\\n\\r\\n`` first would skip an LF-only header
    block and cut the body at its first CRLF blank line."""
    m = _HEADER_END_RE.search(head)
    if m is None:
        raise _BadRecord("bad_http_header")
    return m.start(), m.end()


def _unfold(block: bytes) -> bytes:
    """Header lines with folded values (a line that starts with a space or a tab continues
    the one before, RFC 7230's obs-fold) joined as one line each."""
    if b"\n " in block or b"\n\t" in block:
        return _OBS_FOLD_RE.sub(b" ", block)
    return block


def _scan_http_head(head: bytes) -> tuple[dict[str, str], int]:
    """The part of :func:`parse_http_block` the extractor needs: the status line is
    checked, and only ``Content-Type`` and the two coding headers are read."""
    end, body_start = _header_end(head)
    head = _unfold(head[:end])
    end = len(head)
    eol = head.find(b"\n", 0, end)
    status_line = head[: eol if eol >= 0 else end]
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0][:5].upper() == b"HTTP/" or not parts[1].isdigit():
        raise _BadRecord("bad_http_header")
    headers: dict[str, str] = {}
    if eol >= 0:
        for m in _NEEDED_HEADERS_RE.finditer(head, eol, end):
            name = m.group(1).lower().decode("ascii")
            value = m.group(2).decode("latin-1").strip()
            headers[name] = headers[name] + ", " + value if name in headers else value
    return headers, body_start


def _header_values(value: str) -> list[str]:
    """A combined header value split at its commas, those inside a quoted string excepted."""
    if "," not in value:
        return [value]
    values, start, quoted, escaped = [], 0, False, False
    for i, ch in enumerate(value):
        if escaped:
            escaped = False
        elif quoted:
            if ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == ",":
            values.append(value[start:i])
            start = i + 1
    values.append(value[start:])
    return values


def _parse_mime(value: str) -> tuple[str, str] | None:
    """``(essence, parameters)`` of one MIME type (``type/subtype``, lower-cased), else None."""
    value = value.strip(_HTTP_WS)
    typ, slash, rest = value.partition("/")
    if not slash or not _TOKEN_RE.fullmatch(typ):
        return None
    subtype, _, params = rest.partition(";")
    subtype = subtype.rstrip(_HTTP_WS)
    if not _TOKEN_RE.fullmatch(subtype):
        return None
    return f"{typ}/{subtype}".lower(), params


def split_content_type(value: str) -> tuple[str, str | None]:
    """``text/html; charset=UTF-8`` -> ``("text/html", "UTF-8")``; ``("", None)`` when no MIME type.

    A header sent twice arrives joined by a comma (``text/html, text/html; charset=UTF-8``):
    the MIME type is read as browsers read it (WHATWG Fetch, "extract a MIME type"): the last
    value that is a ``type/subtype`` (``*/*`` excepted); its charset, else the charset of the
    value that started the run of values of that same type before it.
    """
    mime, charset, carried = "", None, None
    for part in _header_values(value):
        parsed = _parse_mime(part)
        if parsed is None or parsed[0] == "*/*":
            continue
        essence, params = parsed
        m = _CHARSET_RE.search(params) if params else None
        own = m.group(1) if m else None
        if essence != mime:
            mime, carried = essence, own
        charset = own if own is not None else carried
    return mime, charset


def _dechunk(data: bytes) -> bytes | None:
    """Remove HTTP chunked transfer coding; ``None`` when ``data`` is not chunked."""
    out = []
    pos = 0
    n = len(data)
    while pos < n:
        eol = data.find(b"\n", pos, pos + 64)
        if eol < 0:
            return None if not out else b"".join(out)
        size_field = data[pos:eol].split(b";", 1)[0].strip()
        try:
            size = int(size_field, 16)
        except ValueError:
            return None if not out else b"".join(out)
        if size == 0:
            break
        start = eol + 1
        out.append(data[start:start + size])
        pos = start + size
        if data[pos:pos + 2] == b"\r\n":
            pos += 2
        elif data[pos:pos + 1] == b"\n":
            pos += 1
    return b"".join(out)


#: input given at first to the inflater of a gzip member after the first one, doubled while the
#: member goes on (up to :data:`_MEMBER_MAX_CHUNK`): the input left past a member's end is
#: copied, so a body of many tiny members costs time linear in its size
_MEMBER_FIRST_CHUNK = 1 << 10
_MEMBER_MAX_CHUNK = 1 << 20


def _later_gzip_members(data: bytes, pos: int, out: bytes, limit: int) -> bytes:
    """``out`` (the first member's bytes) followed by those of the gzip members in ``data`` from
    ``pos`` on, at most ``limit + 1`` bytes in all. RFC 1952 makes a gzip file a series of
    members, and browsers and urllib3 decode every one (``zlib`` stops at the end of the first).
    As urllib3 does, the output ends without an error at what is not a member (NUL padding,
    trailing garbage), at a damaged member and where the data ends inside one."""
    parts, total, n = [out], len(out), len(data)
    view = memoryview(data)
    while total <= limit and data[pos:pos + 2] == b"\x1f\x8b":
        d = zlib.decompressobj(31)
        chunk = _MEMBER_FIRST_CHUNK
        while True:
            end = min(n, pos + chunk)
            try:
                piece = d.decompress(view[pos:end], limit + 1 - total)
            except zlib.error:
                return b"".join(parts)
            parts.append(piece)
            total += len(piece)
            if d.eof:
                pos = end - len(d.unused_data)
                break
            if total > limit or end >= n:  # at the limit, or the data ends inside this member
                return b"".join(parts)
            pos = end  # below the limit, the inflater took all it was given
            chunk = min(2 * chunk, _MEMBER_MAX_CHUNK)
    return b"".join(parts)


def decompress_content(data: bytes, coding: str, limit: int) -> bytes | None:
    """Undo a ``Content-Encoding`` (a lower-cased ``gzip``, ``x-gzip``, ``deflate`` or ``br``);
    at most ``limit + 1`` bytes, so a caller tells a body over its limit without inflating a
    bomb; ``None`` when the body is not encoded as claimed (``gzip`` without gzip's magic bytes
    included). Every member of a gzip body is decoded. Used for WARC payloads and downloaded
    images alike."""
    if coding in ("gzip", "x-gzip") and data[:2] != b"\x1f\x8b":
        return None
    try:
        if coding in ("gzip", "x-gzip", "deflate"):
            # 47: gzip or zlib header, auto-detected; raw deflate as a fallback
            for wbits in (47, -15):
                try:
                    d = zlib.decompressobj(wbits)
                    out = d.decompress(data, limit + 1)
                except zlib.error:
                    continue
                if d.eof and wbits == 47 and data[:2] == b"\x1f\x8b" and len(out) <= limit:
                    # a gzip body may hold several members (RFC 1952): decode them all
                    return _later_gzip_members(data, len(data) - len(d.unused_data), out, limit)
                return out
            return None
        if coding == "br":
            import brotli

            inflater = brotli.Decompressor()
            try:  # the output stops growing at the limit (brotli >= 1.2)
                out = inflater.process(data, output_buffer_limit=limit + 1)
            except TypeError:  # an older brotli: whole
                out = inflater.process(data)
            return out[: limit + 1]
    except Exception:  # noqa: BLE001 - any decoder error means "not encoded as claimed"
        return None
    return None


def decode_body(body: bytes, headers: dict[str, str], limit: int, counters: StageCounters) -> bytes:
    """Remove transfer and content codings that the headers claim, when they really apply.

    Common Crawl stores payloads already decoded (it renames the original
    headers), other crawlers keep them encoded; a header that lies is counted
    and the body is used as it is.
    """
    te = headers.get("transfer-encoding", "").lower()
    if "chunked" in te:
        dechunked = _dechunk(body)
        if dechunked is None:
            counters.count("transfer_encoding_mismatch")
        else:
            body = dechunked
    ce = headers.get("content-encoding", "").strip().lower()
    if ce and ce not in ("identity", "none", "utf-8", "utf8"):
        decoded = decompress_content(body, ce, limit)
        if decoded is None:
            counters.count("content_encoding_mismatch")
        else:
            body = decoded
    return body


# --------------------------------------------------------------------------- records
class _RecordReader:
    """Counts the bytes read from a record block so that truncation can be detected."""

    __slots__ = ("raw", "n")

    def __init__(self, raw):
        self.raw = raw
        self.n = 0

    def read(self, size: int) -> bytes:
        data = self.raw.read(size)
        self.n += len(data)
        return data


#: WHATWG labels of UTF-16: an HTTP header's label is followed (a ``<meta>`` one reads as UTF-8)
UTF16_LABELS = {
    **dict.fromkeys(("utf-16", "utf-16le", "unicode", "ucs-2", "csunicode", "iso-10646-ucs-2", "unicodefeff"),
                    "utf-16-le"),
    **dict.fromkeys(("utf-16be", "unicodefffe"), "utf-16-be"),
}


def utf16_codec(label: str | None) -> str | None:
    """The UTF-16 codec an HTTP charset label names, else None."""
    return UTF16_LABELS.get(label.strip().strip("\"'").lower()) if label else None


def _html_from_block(
    reader: _RecordReader, cfg: ExtractConfig, counters: StageCounters
) -> tuple[bytes, str | None] | None:
    """Read the HTTP block of a response record; ``(payload, http_charset)`` for HTML, else None."""
    head = reader.read(_HEADER_READ)
    if not head:
        raise _BadRecord("empty_record")
    while _HEADER_END_RE.search(head) is None:
        if len(head) >= MAX_HTTP_HEADER_BYTES:
            raise _BadRecord("bad_http_header")
        more = reader.read(_HEADER_READ)
        if not more:
            break
        head += more
    headers, body_start = _scan_http_head(head)
    content_type = headers.get("content-type", "")
    mime, charset = split_content_type(content_type)
    if mime not in cfg.html_mime_types:
        if content_type and any(t in content_type.lower() for t in cfg.html_mime_types):
            # names an HTML type but does not read as one (``text/html charset=...``): said, not silent
            raise _BadRecord("bad_content_type")
        return None
    counters.count("html_responses")
    limit = cfg.max_html_bytes
    body = head[body_start:]
    if len(body) <= limit:
        body += reader.read(limit + 1 - len(body))
    body = decode_body(body, headers, limit, counters)
    if len(body) > limit:
        counters.count("html_truncated")
        body = body[:limit]
    if not body or body.isspace():
        raise _BadRecord("empty_payload")
    sniff = body[:_BINARY_SNIFF_BYTES]
    if b"\x00" in sniff and not sniff.startswith((b"\xff\xfe", b"\xfe\xff")) and utf16_codec(charset) is None:
        raise _BadRecord("binary_payload")
    return body, charset


def _set_partial(file_result: FileResult, reason: str, message: str) -> None:
    if file_result.status == "ok":
        file_result.status = "partial"
        file_result.reason = reason
        file_result.message = message


def _set_failed(file_result: FileResult, reason: str, message: str) -> None:
    file_result.status = "failed"
    file_result.reason = reason
    file_result.message = message


def _drained_short(raw, content_length: int | None, already: int = 0) -> int | None:
    """Read a record block to its end; the number of bytes read when it is shorter than declared."""
    n = already
    if content_length is not None and n >= content_length:
        return None
    read = raw.read
    while True:
        chunk = read(_DRAIN_CHUNK)
        if not chunk:
            break
        n += len(chunk)
    if content_length is not None and n < content_length:
        return n
    return None


def _truncated(file_result: FileResult, counters: StageCounters, offset: int, got: int, declared) -> None:
    counters.count("record_skipped:truncated")
    _set_partial(file_result, "truncated", f"record at offset {offset} ends after {got} of {declared} bytes")


def _process_response(
    *,
    target_uri: str | None,
    record_id: str | None,
    content_length: int | None,
    raw,
    offset: int,
    path: str,
    cfg: ExtractConfig,
    counters: StageCounters,
    file_result: FileResult,
) -> HtmlDocument | None:
    """Shared ``response`` logic of both engines; drains the record and checks its length."""
    counters.count("responses")
    reader = _RecordReader(raw)
    doc = None
    try:
        if not target_uri:
            raise _BadRecord("missing_target_uri")
        got = _html_from_block(reader, cfg, counters)
        if got is not None:
            html, charset = got
            doc = HtmlDocument(
                page_url=target_uri.strip().strip("<>"),
                html=html,
                http_charset=charset,
                record_id=record_id or "",
                offset=offset,
                warc_path=path,
            )
    except _BadRecord as exc:
        counters.count(f"record_skipped:{exc.reason}")
    short = _drained_short(raw, content_length, reader.n)
    if short is not None:
        _truncated(file_result, counters, offset, short, content_length)
        return None
    return doc


class GunzipMembers(io.RawIOBase):
    """The decompressed bytes of a stream of gzip members, for a file compressed as one member
    (which warcio cannot read record by record). Unlike ``gzip.GzipFile`` it gives everything that
    decompresses when the file is cut short (even a missing 8-byte trailer), and then says so:
    :attr:`complete` is false when the last member did not end."""

    _IN = 1 << 16
    _OUT = 1 << 20

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self._d = zlib.decompressobj(31)
        self._fed = False
        self._pending = b""
        self._raw_done = False
        self.complete = True

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            data = self._d.unconsumed_tail
            if not data:
                if self._d.eof:
                    data, self._d, self._fed = self._d.unused_data, zlib.decompressobj(31), False
                if not data:
                    if self._raw_done:
                        self.complete = self._d.eof or not self._fed
                        return 0
                    data = self.raw.read(self._IN)
                    if not data:
                        self._raw_done = True
                        continue
            if not self._fed:
                data = data.lstrip(b"\0")  # zero padding after a member (tape blocks), as gzip skips it
                if not data:
                    continue
            self._fed = True
            self._pending = self._d.decompress(data, self._OUT)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _content_length(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


#: characters of a file's first line quoted in a message (the rest would be escaped binary)
MAX_QUOTED_CHARS = 60


def _quote_cut(msg: str) -> str:
    """warcio's ``... first line: <the line>`` with the line cut at :data:`MAX_QUOTED_CHARS`."""
    head, sep, line = msg.partition("first line: ")
    if not sep or len(line) <= MAX_QUOTED_CHARS:
        return msg
    return f"{head}{sep}{line[:MAX_QUOTED_CHARS]}... ({len(line) - MAX_QUOTED_CHARS} more characters)"


def _iter_warcio(
    stream: BinaryIO, path: str, cfg: ExtractConfig, counters: StageCounters, file_result: FileResult,
    skip: int = 0, unpacked: bool = False, progress: dict | None = None,
) -> Iterator[HtmlDocument]:
    """``skip``: records read before (not counted again); ``unpacked``: ``stream`` is the
    decompressed bytes of a file of gzip members; ``progress["seen"]``: records met so far."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    seen = 0
    it = ArchiveIterator(stream, no_record_parse=True, check_digests=False)
    try:
        for record in it:
            seen += 1
            if progress is not None:
                progress["seen"] = max(progress.get("seen", 0), seen)
            if seen <= skip:
                continue
            if record.format != "warc":
                if seen == 1:
                    _set_failed(file_result, "not_warc", "not a WARC file: its first line is no WARC/1.x header "
                                f"(read as {record.format.upper()}: a text file, an old ARC file or another format)")
                else:
                    counters.count("record_skipped:not_warc_record")
                    _set_partial(file_result, "bad_record", f"non-WARC data after record {seen - 1}")
                return
            counters.count("records")
            h = record.rec_headers
            content_length = _content_length(h.get_header("Content-Length"))
            if content_length is None:
                # the header block itself was cut short (or is malformed): nothing after it is reliable
                counters.count("record_skipped:missing_content_length")
                _set_partial(file_result, "truncated", f"record at offset {it.offset} has no valid Content-Length")
                return
            if (record.rec_type or "").lower() != "response":
                _note_other_record(counters, (record.rec_type or "").lower())
                short = _drained_short(record.raw_stream, content_length)
                if short is not None:
                    _truncated(file_result, counters, it.offset, short, content_length)
                continue
            doc = _process_response(
                target_uri=h.get_header("WARC-Target-URI"),
                record_id=h.get_header("WARC-Record-ID"),
                content_length=content_length,
                raw=record.raw_stream,
                offset=it.offset,
                path=path,
                cfg=cfg,
                counters=counters,
                file_result=file_result,
            )
            if doc is not None:
                yield doc
        if seen == 0 and skip == 0:
            _set_failed(file_result, "empty_file", "no record in the file")
    except ArchiveLoadFailed as exc:
        msg = _quote_cut(str(exc).strip().splitlines()[0]) if str(exc).strip() else "cannot parse"
        if "non-chunked gzip" in str(exc) and not unpacked:
            # a WARC compressed as one gzip member: valid, only not record-seekable
            counters.count("single_member_gzip")
            stream.seek(0)
            members = GunzipMembers(stream)
            yield from _iter_warcio(io.BufferedReader(members), path, cfg, counters, file_result,
                                    skip=max(seen, skip), unpacked=True, progress=progress)
            if not members.complete:
                _set_partial(file_result, "truncated", "the file ends inside its gzip member")
            return
        if seen == 0:
            _set_failed(file_result, "not_warc", msg)
        else:
            _set_partial(file_result, "bad_record", f"after record {seen}: {msg}")
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        if seen == 0:
            _set_failed(file_result, "not_warc", f"{type(exc).__name__}: {exc}")
        else:
            _set_partial(file_result, "truncated", f"after record {seen}: {type(exc).__name__}: {exc}")
    except OSError as exc:
        if seen == 0:
            _set_failed(file_result, "unreadable", f"{type(exc).__name__}: {exc}")
        else:
            _set_partial(file_result, "read_error", f"after record {seen}: {type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - a malformed file must not stop the run
        if seen == 0:
            _set_failed(file_result, "not_warc", f"{type(exc).__name__}: {exc}")
        else:
            _set_partial(file_result, "bad_record", f"after record {seen}: {type(exc).__name__}: {exc}")


def _iter_fastwarc(
    source, path: str, cfg: ExtractConfig, counters: StageCounters, file_result: FileResult,
    progress: dict | None = None,
) -> Iterator[HtmlDocument]:
    """``progress`` (with ``auto``): ``done``, the records read whole, and ``counters``, the
    counters as they were before the record after them (see :func:`_counters_state`)."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    response = WarcRecordType.response
    seen = 0
    try:
        it = ArchiveIterator(
            source, record_types=WarcRecordType.any_type, parse_http=False, fsspec_args=False
        )
        if progress is not None:
            progress["done"], progress["counters"] = 0, _counters_state(counters)
        for record in it:
            seen += 1
            content_length = record.content_length
            if not content_length and record.headers.get("Content-Length") is None:
                # the header block itself was cut short (or is malformed): nothing after it is reliable
                counters.count("record_skipped:missing_content_length")
                _set_partial(
                    file_result, "truncated", f"record at offset {record.stream_pos} has no valid Content-Length"
                )
                return
            if record.record_type != response:
                _note_other_record(counters, str(record.record_type))
                short = _drained_short(record.reader, content_length)
                if short is not None:
                    _truncated(file_result, counters, record.stream_pos, short, content_length)
            else:
                doc = _process_response(
                    target_uri=record.headers.get("WARC-Target-URI"),
                    record_id=record.record_id,
                    content_length=content_length,
                    raw=record.reader,
                    offset=record.stream_pos,
                    path=path,
                    cfg=cfg,
                    counters=counters,
                    file_result=file_result,
                )
                if doc is not None:
                    yield doc
            if progress is not None:
                # the record is read whole (and its page yielded): a reader taking over after a
                # failure in finding the next record starts after it, counting from here
                progress["done"], progress["counters"] = seen, _counters_state(counters)
    except Exception as exc:  # noqa: BLE001 - fastwarc reports every parse problem as OSError
        msg = f"{type(exc).__name__}: {exc}"
        if seen == 0:
            _set_failed(file_result, "not_warc", msg)
        else:
            _set_partial(file_result, "bad_record", f"after record {seen}: {msg}")
    else:
        if seen == 0 and file_result.status == "ok":
            # fastwarc yields nothing for data that is not a WARC; tell empty files apart
            _check_not_empty(source, file_result)
    finally:
        counters.count("records", seen)


#: record types that mark a file as a WAT (``metadata``) or WET (``conversion``) file
_OTHER_KIND_RECORDS = {"metadata": "wat_file", "conversion": "wet_file"}
_OTHER_KIND_HINT = {
    "wat_file": "name it *.wat.gz to read it as a WAT file",
    "wet_file": "WET files hold plain text without links: give the WARC or WAT file",
}


def _note_other_record(counters: StageCounters, rec_type: str) -> None:
    if rec_type in _OTHER_KIND_RECORDS:
        counters.count(f"records_{rec_type}")


def _check_kind(counters: StageCounters, file_result: FileResult) -> None:
    """A file of WAT ``metadata`` or WET ``conversion`` records and no ``response`` is the wrong kind."""
    if file_result.status not in ("ok", "partial") or counters.counts.get("responses", 0):
        return
    for rec_type, reason in _OTHER_KIND_RECORDS.items():
        if counters.counts.get(f"records_{rec_type}", 0):
            kind = reason.split("_")[0].upper()
            _set_failed(file_result, reason, f"a {kind} file ({rec_type} records, no response record) given "
                                             f"to the WARC reader; {_OTHER_KIND_HINT[reason]}")
            return


def _check_not_empty(source, file_result: FileResult) -> None:
    try:
        source.seek(0)
        first = source.read(64)
        if first[:2] == b"\x1f\x8b":  # gzip: empty when its members hold nothing, as warcio reads it
            source.seek(0)
            first = GunzipMembers(source).read(64)
    except zlib.error:
        pass  # not gzip after all: something, not a WARC
    except Exception:  # noqa: BLE001 - a stream that cannot seek is left as it is
        return
    if first:
        _set_failed(file_result, "not_warc", "no WARC record found")
    else:
        _set_failed(file_result, "empty_file", "no record in the file")


def iter_html_documents(
    path: str, cfg: ExtractConfig, counters: StageCounters, file_result: FileResult
) -> Iterator[HtmlDocument]:
    """Yield the HTML documents of one WARC file; never raises for a bad file.

    Counters: ``records``, ``responses``, ``html_responses``, ``html_truncated``,
    ``content_encoding_mismatch``, ``record_skipped:<reason>``.
    """
    from ..remote import RemoteReadError, network_error

    try:
        stream = open_input(path, cfg.input_timeout_s, cfg)
    except Exception as exc:  # noqa: BLE001 - missing file, bad URL, permission, network...
        reason = exc.reason if isinstance(exc, RemoteReadError) else "unreadable"
        _set_failed(file_result, reason, f"{type(exc).__name__}: {exc}")
        return
    reader = resolve_reader(cfg.reader)
    try:
        if reader == "fastwarc" and cfg.reader == "auto":
            progress = {"done": 0, "counters": _counters_state(counters)}
            yield from _iter_fastwarc(stream, path, cfg, counters, file_result, progress)
            if file_result.status != "ok" and network_error(stream) is None:
                # fastwarc stopped early (an old or LF-only WARC header, at the first record or a later
                # one): warcio reads the file again and goes on from the record fastwarc stopped at
                done = progress["done"]
                fastwarc_end = (_counters_state(counters), file_result.status, file_result.reason,
                                file_result.message)
                _set_counters(counters, progress["counters"])
                counters.count("records", done)
                file_result.status, file_result.reason, file_result.message = "ok", "", ""
                stream = _reopen_for_warcio(stream, path, cfg, counters, file_result)
                if stream is None:
                    return
                seen: dict = {}
                yield from _iter_warcio(stream, path, cfg, counters, file_result, skip=done, progress=seen)
                if done and seen.get("seen", 0) <= done and network_error(stream) is None:
                    # warcio got no further: fastwarc's account of the file stands
                    _set_counters(counters, fastwarc_end[0])
                    counters.count("reader_fallback_warcio")
                    file_result.status, file_result.reason, file_result.message = fastwarc_end[1:]
        elif reader == "fastwarc":
            yield from _iter_fastwarc(stream, path, cfg, counters, file_result)
        else:
            yield from _iter_warcio(stream, path, cfg, counters, file_result)
        broken = network_error(stream)
        if broken is not None:  # the network gave up, not the file: failed, so the next run reads it again
            _set_failed(file_result, broken.reason, str(broken))
        else:
            _check_kind(counters, file_result)
    finally:
        try:
            stream.close()
        except Exception:  # noqa: BLE001
            pass


def _counters_state(counters: StageCounters) -> tuple:
    return counters.kept, Counter(counters.counts), Counter(counters.dropped_by_reason)


def _set_counters(counters: StageCounters, state: tuple) -> None:
    counters.kept = state[0]
    counters.counts.clear()
    counters.counts.update(state[1])
    counters.dropped_by_reason.clear()
    counters.dropped_by_reason.update(state[2])


def _reopen_for_warcio(stream, path: str, cfg: ExtractConfig, counters: StageCounters, file_result: FileResult):
    """Open the input again for warcio (None: it failed)."""
    counters.count("reader_fallback_warcio")
    try:
        stream.close()
    except Exception:  # noqa: BLE001
        pass
    try:
        return open_input(path, cfg.input_timeout_s, cfg)
    except Exception as exc:  # noqa: BLE001
        _set_failed(file_result, "unreadable", f"{type(exc).__name__}: {exc}")
        return None


def fastwarc_available() -> bool:
    try:
        import fastwarc.warc  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_reader(name: str) -> str:
    """``extract.reader`` -> the engine used: ``auto`` is fastwarc when installed, else warcio."""
    if name == "auto":
        return "fastwarc" if fastwarc_available() else "warcio"
    return name


__all__ = [
    "HtmlDocument",
    "open_input",
    "iter_html_documents",
    "fastwarc_available",
    "resolve_reader",
    "parse_http_block",
    "split_content_type",
    "decode_body",
    "MAX_HTTP_HEADER_BYTES",
]
