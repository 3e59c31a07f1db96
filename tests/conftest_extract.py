"""Helpers shared by the extraction tests: build small WARC files in a temp folder.

Well-formed records are written with warcio's ``WARCWriter``; the malformed
ones (bogus HTTP header, wrong version line...) with :func:`raw_record`, which
writes the bytes exactly as given.
"""

from __future__ import annotations

import gzip
import io
import uuid
from pathlib import Path

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

REPO = Path(__file__).resolve().parents[1]
SHARED_WARC = REPO.parent / "shared" / "data" / "warc"
SAMPLE_2020 = SHARED_WARC / "cc-main-2020-34-sample.warc.gz"
SAMPLE_2022 = SHARED_WARC / "cc-main-2022-05-cmoncrawl-mini.warc.gz"
SAMPLE_2024 = SHARED_WARC / "cc-main-2024-22-whirlwind.warc.gz"


def html_page(body: str, head: str = "", lang: str = "en") -> str:
    return f"<!DOCTYPE html><html lang='{lang}'><head>{head}<title>t</title></head><body>{body}</body></html>"


def write_warc(path: Path, pages: list[dict], gzip_records: bool = True) -> Path:
    """``pages``: dicts with ``url``, ``html`` (bytes or str), optional ``content_type``,
    ``headers`` (extra HTTP headers), ``status``, ``record_type`` (default response)."""
    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=gzip_records)
        writer.write_record(
            writer.create_warcinfo_record(path.name, {"software": "laionbuild-tests", "format": "WARC/1.1"})
        )
        for page in pages:
            body = page["html"]
            if isinstance(body, str):
                body = body.encode("utf-8")
            headers = [("Content-Type", page.get("content_type", "text/html; charset=utf-8"))]
            headers += list(page.get("headers", []))
            headers.append(("Content-Length", str(len(body))))
            status = page.get("status", "200 OK")
            rtype = page.get("record_type", "response")
            if rtype == "request":
                http = StatusAndHeaders(f"GET {page['url']} HTTP/1.1", [("Host", "example.com")],
                                        is_http_request=True)
                rec = writer.create_warc_record(page["url"], "request", payload=io.BytesIO(b""),
                                                http_headers=http)
            else:
                http = StatusAndHeaders(status, headers, protocol="HTTP/1.1")
                rec = writer.create_warc_record(page["url"], rtype, payload=io.BytesIO(body), http_headers=http)
            writer.write_record(rec)
    return path


def raw_record(
    block: bytes,
    url: str | None = "http://example.com/",
    rtype: str = "response",
    version: str = "WARC/1.0",
    extra: list[tuple[str, str]] | None = None,
    content_length: int | None = None,
) -> bytes:
    """One WARC record written byte for byte (for malformed inputs)."""
    lines = [version, f"WARC-Type: {rtype}", f"WARC-Record-ID: <urn:uuid:{uuid.uuid4()}>",
             "WARC-Date: 2024-05-18T01:02:03Z"]
    if url is not None:
        lines.append(f"WARC-Target-URI: {url}")
    lines.append("Content-Type: application/http; msgtype=response")
    lines += [f"{k}: {v}" for k, v in (extra or [])]
    lines.append(f"Content-Length: {len(block) if content_length is None else content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + block + b"\r\n\r\n"


def http_block(body: bytes, content_type: str = "text/html; charset=utf-8",
               status_line: str = "HTTP/1.1 200 OK", headers: list[tuple[str, str]] | None = None) -> bytes:
    head = [status_line, f"Content-Type: {content_type}"] + [f"{k}: {v}" for k, v in (headers or [])]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def write_raw(path: Path, records: list[bytes], gzip_records: bool = True) -> Path:
    with open(path, "wb") as fh:
        for rec in records:
            fh.write(gzip.compress(rec) if gzip_records else rec)
    return path


def write_wat(path: Path, pages: list[dict], extra_records: list[tuple[str, bytes]] = ()) -> Path:
    """A WAT file in Common Crawl's layout: a ``warcinfo`` record, then one ``metadata``
    record of JSON per page. ``pages``: dicts with ``url`` and ``links`` (entries as
    Common Crawl writes them: ``path``, ``url``, optional ``alt`` / ``text``).
    ``extra_records``: ``(warc type, payload)`` written after the pages."""
    from laionbuild.stages.wat import wat_json

    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=True)
        writer.write_record(
            writer.create_warcinfo_record(path.name, {"software": "laionbuild-tests", "format": "WARC Metadata"})
        )
        for page in pages:
            payload = wat_json(page["url"], page["links"], record_id=f"<urn:uuid:{uuid.uuid4()}>")
            rec = writer.create_warc_record(page["url"], "metadata", payload=io.BytesIO(payload),
                                            warc_content_type="application/json")
            writer.write_record(rec)
        for rtype, payload in extra_records:
            rec = writer.create_warc_record("http://example.com/x", rtype, payload=io.BytesIO(payload),
                                            warc_content_type="text/plain")
            writer.write_record(rec)
    return path
