"""Read Common Crawl WAT files: each page's URL and its ``Links``, as LAION-5B did.

A WAT file is a WARC file of ``metadata`` records whose payload is one line of
JSON describing one record of the crawl's WARC. For an HTML ``response`` the
JSON holds, under ``Envelope.Payload-Metadata.HTTP-Response-Metadata.HTML-Metadata``,
the page's ``Links``: every URL the page names, in the order Common Crawl's
parser met them, each with its ``path`` (``IMG@/src``, ``A@/href``...) and, for
``<img>`` and ``<a>`` elements that carry one, the ``alt`` attribute as written
(entities not decoded). The page URL is
``Envelope.WARC-Header-Metadata.WARC-Target-URI``.

LAION-5B's parser looked only at records whose line contains ``IMG@`` and took
every link that has a ``url``; :func:`iter_wat_pages` yields the same records
with their links (:class:`~laionbuild.stages.laion_links.PageLink`, ``url`` and
``alt``). Links without a ``url`` key (CSS ``href`` entries) are left out.

Problems are data: a record whose JSON cannot be read is counted
(``record_skipped:bad_json``); a file that is not a WAT (no JSON ``metadata``
record at all: a WARC, a WET) is ``failed`` with reason ``not_wat``; a file cut
short keeps what was read (``partial``, ``truncated``).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from typing import Iterator

from ..config import ExtractConfig
from ..stats import FileResult, StageCounters
from .laion_links import IMG_PATH_MARKER, PageLink
from .surrogates import has_lone_surrogate, without_lone_surrogates
from .warc import GunzipMembers, open_input, resolve_reader

log = logging.getLogger(__name__)

#: file name endings read as WAT files
WAT_SUFFIXES = (".wat.gz", ".wat")
#: and as WET files (plain text: no links, refused)
WET_SUFFIXES = (".wet.gz", ".wet")
_IMG_MARKER = IMG_PATH_MARKER.encode("ascii")
#: WARC-Type of the records a WAT file is made of
WAT_RECORD_TYPE = "metadata"


@dataclass
class WatPage:
    """One page of a WAT file: its URL, its links in WAT order and where it was."""

    page_url: str
    links: list[PageLink]
    #: the WARC-Record-ID of the page's ``response`` record in the crawl's WARC
    record_id: str
    #: byte offset of the ``metadata`` record in the (compressed) WAT file
    offset: int
    wat_path: str


def input_kind(path: str) -> str:
    """``wat``, ``wet`` or ``warc``, from the file name (a listing entry or URL included)."""
    name = path.split("?", 1)[0].lower()
    if name.endswith(WAT_SUFFIXES):
        return "wat"
    if name.endswith(WET_SUFFIXES):
        return "wet"
    return "warc"


def _member(obj: dict, key: str, kind: type = dict):
    """``obj[key]`` when it is a ``kind``; empty when absent; ``ValueError`` for another shape."""
    value = obj.get(key)
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise ValueError(f"'{key}' is a JSON {type(value).__name__}, not a {kind.__name__}")
    return value


def page_from_json(payload: bytes) -> tuple[str, str, list[PageLink]] | None:
    """``(page URL, record id, links)`` of one WAT JSON payload; None when it names no page.

    Raises ``ValueError`` for a payload that is not JSON or not shaped as a WAT record (an
    object where Common Crawl writes one, a list of ``Links``). A link whose ``url`` holds a
    lone surrogate (``\\ud800``: no character, cannot be written) is left out, as links without
    a ``url`` are; such a surrogate in the page URL or record id becomes U+FFFD.
    """
    data = json.loads(payload)
    if not isinstance(data, dict):
        raise ValueError(f"the record is a JSON {type(data).__name__}, not an object")
    envelope = _member(data, "Envelope")
    header = _member(envelope, "WARC-Header-Metadata")
    page_url = header.get("WARC-Target-URI")
    if not isinstance(page_url, str):
        return None
    html_meta = _member(_member(_member(envelope, "Payload-Metadata"), "HTTP-Response-Metadata"), "HTML-Metadata")
    links = []
    for entry in _member(html_meta, "Links", list):
        if not isinstance(entry, dict):
            continue
        url = entry.get("url")
        if not isinstance(url, str) or has_lone_surrogate(url):
            continue
        alt = entry.get("alt")
        links.append(PageLink(url, alt if isinstance(alt, str) else None, str(entry.get("path") or "")))
    record_id = str(header.get("WARC-Record-ID") or "")
    return without_lone_surrogates(page_url), without_lone_surrogates(record_id), links


def _check_length(payload: bytes, declared) -> None:
    try:
        expected = int(declared)
    except (TypeError, ValueError):
        return
    if len(payload) < expected:
        raise EOFError(f"record cut short: {len(payload)} of {expected} bytes")


def _metadata_payloads(stream, reader: str, counters: StageCounters) -> Iterator[tuple[int, str, bytes]]:
    """``(offset, content type, payload)`` of every ``metadata`` record; other records are counted."""
    if reader == "fastwarc":
        from fastwarc.warc import ArchiveIterator, WarcRecordType

        for record in ArchiveIterator(stream, record_types=WarcRecordType.any_type, parse_http=False,
                                      fsspec_args=False):
            counters.count("records")
            if record.headers.get("Content-Length") is None:
                raise EOFError("a WARC header block cut short (no Content-Length)")
            if record.record_type != WarcRecordType.metadata:
                counters.count(f"records_{record.record_type}")
                continue
            payload = record.reader.read()
            _check_length(payload, record.content_length)
            yield record.stream_pos, record.headers.get("Content-Type", ""), payload
    else:
        yield from _warcio_metadata_payloads(stream, counters)


def _warcio_metadata_payloads(stream, counters: StageCounters, skip: int = 0) -> Iterator[tuple[int, str, bytes]]:
    """The warcio side of :func:`_metadata_payloads`. A file compressed as one gzip member (not
    record by record) is read again through ``gzip``, its first ``skip`` records passed over, as
    the WARC reader does."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    seen = 0
    it = ArchiveIterator(stream, no_record_parse=True, check_digests=False)
    try:
        for record in it:
            seen += 1
            if seen <= skip:
                continue
            counters.count("records")
            if record.rec_headers.get_header("Content-Length") is None:
                raise EOFError("a WARC header block cut short (no Content-Length)")
            rec_type = (record.rec_type or "").lower()
            if rec_type != WAT_RECORD_TYPE:
                counters.count(f"records_{rec_type or 'unknown'}")
                continue
            payload = record.raw_stream.read()
            _check_length(payload, record.rec_headers.get_header("Content-Length"))
            yield it.offset, record.rec_headers.get_header("Content-Type") or "", payload
    except ArchiveLoadFailed as exc:
        if "non-chunked gzip" not in str(exc) or skip:
            raise
        counters.count("single_member_gzip")
        stream.seek(0)
        members = GunzipMembers(stream)
        yield from _warcio_metadata_payloads(io.BufferedReader(members), counters, skip=seen)
        if not members.complete:
            raise EOFError("the file ends inside its gzip member")


def iter_wat_pages(path: str, cfg: ExtractConfig, counters: StageCounters, file_result: FileResult
                   ) -> Iterator[WatPage]:
    """Yield the pages of one WAT file that name an ``IMG@`` link; never raises for a bad file.

    Counters: ``records``, ``records_<type>`` (not ``metadata``), ``wat_json_records``,
    ``wat_pages``, ``pages_without_img_link``, ``record_skipped:bad_json``.
    """
    from ..remote import RemoteReadError, network_error

    try:
        stream = open_input(path, cfg.input_timeout_s, cfg)
    except Exception as exc:  # noqa: BLE001 - missing file, bad URL, permission, network...
        file_result.status = "failed"
        file_result.reason = exc.reason if isinstance(exc, RemoteReadError) else "unreadable"
        file_result.message = f"{type(exc).__name__}: {exc}"
        return
    json_records = 0
    reader = resolve_reader(cfg.reader)
    try:
        for offset, content_type, payload in _metadata_payloads(stream, reader, counters):
            if "json" not in content_type.lower():
                continue
            json_records += 1
            if _IMG_MARKER not in payload:
                counters.count("pages_without_img_link")
                continue
            try:
                page = page_from_json(payload)
            except ValueError:
                counters.count("record_skipped:bad_json")
                continue
            if page is None:
                counters.count("record_skipped:no_target_uri")
                continue
            counters.count("wat_pages")
            yield WatPage(page_url=page[0], record_id=page[1], links=page[2], offset=offset, wat_path=path)
    except Exception as exc:  # noqa: BLE001 - a malformed or cut file keeps what was read
        msg = f"{type(exc).__name__}: {exc}"
        if json_records or counters.counts.get("records"):
            file_result.status, file_result.reason, file_result.message = "partial", "truncated", msg
        else:
            file_result.status, file_result.reason, file_result.message = "failed", "not_wat", msg
    finally:
        counters.count("wat_json_records", json_records)
        broken = network_error(stream)
        try:
            stream.close()
        except Exception:  # noqa: BLE001
            pass
    if broken is not None:
        file_result.status, file_result.reason, file_result.message = "failed", broken.reason, str(broken)
    elif json_records == 0 and file_result.status in ("ok", "failed"):
        seen = counters.counts.get("records", 0)
        if counters.counts.get("records_conversion", 0) and not counters.counts.get("records_response", 0):
            file_result.status, file_result.reason = "failed", "wet_file"
            file_result.message = "a WET file (conversion records): WET files hold plain text without links"
        elif not seen and _is_empty(path, cfg):
            file_result.status, file_result.reason, file_result.message = "failed", "empty_file", "no record in the file"
        elif file_result.status == "ok" or file_result.reason == "not_wat":
            file_result.status, file_result.reason = "failed", "not_wat"
            file_result.message = (f"{seen} WARC records, none a JSON metadata record: not a WAT file"
                                   if seen else file_result.message or "no WARC record in the file")


def _is_empty(path: str, cfg: ExtractConfig) -> bool:
    """A file of no bytes, or of gzip members that hold none."""
    import gzip

    try:
        stream = open_input(path, cfg.input_timeout_s, cfg)
        try:
            head = stream.read(64)
            if not head or head[:2] != b"\x1f\x8b":
                return not head
            return not gzip.decompress(head + stream.read(1 << 20))
        finally:
            stream.close()
    except Exception:  # noqa: BLE001 - unreadable, or not (whole) gzip: not empty
        return False


def wat_json(
    page_url: str,
    links: list[dict],
    record_id: str = "",
    http_headers: dict[str, str] | None = None,
    warc_headers: dict[str, str] | None = None,
    title: str = "",
    metas: list[dict] | None = None,
) -> bytes:
    """One WAT ``metadata`` payload in Common Crawl's JSON layout (for test fixtures and benchmarks).

    ``links`` are entries as Common Crawl writes them (``path``, ``url``, optional
    ``alt``, ``text``, ``title``).
    """
    warc_meta = {"WARC-Type": "response", "WARC-Target-URI": page_url, "WARC-Record-ID": record_id}
    warc_meta.update(warc_headers or {})
    envelope = {
        "Format": "WARC",
        "WARC-Header-Length": "0",
        "Actual-Content-Length": "0",
        "WARC-Header-Metadata": warc_meta,
        "Payload-Metadata": {
            "Actual-Content-Type": "application/http; msgtype=response",
            "HTTP-Response-Metadata": {
                "Response-Message": {"Version": "HTTP/1.1", "Status": "200", "Reason": "OK"},
                "Headers": dict(http_headers or {}),
                "HTML-Metadata": {
                    "Head": {"Title": title, "Metas": list(metas or [])},
                    "Links": links,
                },
            },
        },
    }
    return json.dumps({"Container": {"Compressed": True}, "Envelope": envelope},
                      ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def write_wat_from_warc(warc_paths: list[str], out_path: str) -> int:
    """Write a WAT file for the records of ``warc_paths`` (for tests and benchmarks); returns its records.

    One JSON ``metadata`` record per WARC record in Common Crawl's layout: the
    WARC and HTTP headers and, for HTML responses, the title, ``<meta>``,
    ``<link>`` and ``<script>`` entries and the ``Links`` listed as Common
    Crawl's generator lists them (:func:`~laionbuild.stages.wat_links.page_links`: raw
    attribute values; anchor texts left out).
    """
    import io

    from warcio.archiveiterator import ArchiveIterator
    from warcio.warcwriter import WARCWriter

    from .candidates import decode_html, parse_html
    from .wat_links import page_links
    from .warc import split_content_type

    written = 0
    with open(out_path, "wb") as out:
        writer = WARCWriter(out, gzip=True)
        for path in warc_paths:
            with open(path, "rb") as fh:
                for record in ArchiveIterator(fh):
                    warc_headers = dict(record.rec_headers.headers)
                    uri = warc_headers.get("WARC-Target-URI", "")
                    http = dict(record.http_headers.headers) if record.http_headers is not None else {}
                    links: list[dict] = []
                    title, metas, head = "", [], {}
                    content_type = next((v for k, v in http.items() if k.lower() == "content-type"), "")
                    mime, charset = split_content_type(content_type)
                    if record.rec_type == "response" and mime in ("text/html", "application/xhtml+xml"):
                        body = record.content_stream().read()
                        try:
                            tree = parse_html(body, charset)
                        except Exception:  # noqa: BLE001 - a page that cannot be read has no links
                            tree = None
                        if tree is not None:
                            for link in page_links(decode_html(body, charset))[0]:
                                entry = {"path": link.path, "url": link.url}
                                if link.alt is not None:
                                    entry["alt"] = link.alt
                                links.append(entry)
                            node = tree.css_first("title")
                            title = node.text() if node is not None else ""
                            metas = [{k: v for k, v in m.attrs.items() if v is not None} for m in tree.tags("meta")]
                            head = {
                                "Link": [{"path": "LINK@/href", **{k: v for k, v in n.attrs.items() if v}}
                                         for n in tree.tags("link")],
                                "Scripts": [{"path": "SCRIPT@/src", "url": n.attrs.get("src")}
                                            for n in tree.tags("script") if n.attrs.get("src")],
                            }
                    payload = wat_json(uri, links, warc_headers.get("WARC-Record-ID", ""), http, warc_headers,
                                       title, metas)
                    if head:
                        data = json.loads(payload)
                        data["Envelope"]["Payload-Metadata"]["HTTP-Response-Metadata"]["HTML-Metadata"][
                            "Head"].update(head)
                        payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
                    writer.write_record(writer.create_warc_record(uri, "metadata", payload=io.BytesIO(payload),
                                                                  warc_content_type="application/json"))
                    written += 1
    return written


__all__ = ["WAT_SUFFIXES", "WET_SUFFIXES", "WatPage", "input_kind", "iter_wat_pages", "page_from_json", "wat_json", "write_wat_from_warc"]
