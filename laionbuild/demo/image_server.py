"""A small threaded HTTP server bound to a loopback address (127.0.0.x only).

Used by the fetch tests, the fetch benchmark and the embedded demo. Routes are
registered up front (or while running) and can misbehave on purpose: wrong
status codes, slow answers, redirects, a ``Content-Length`` that lies, or an
endless-looking body streamed chunk by chunk without being held in memory.

The server refuses to bind anything that is not a ``127.0.0.0/8`` IP literal
(no host names, no other interfaces), so it can never be reached from another
machine.

Example::

    with LoopbackServer() as srv:
        url = srv.add("/a.jpg", jpeg_bytes)
        srv.add_redirect("/r", "/a.jpg")
        ...
        assert srv.request_count("/a.jpg") == 1
"""

from __future__ import annotations

import ipaddress
import logging
import mimetypes
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit, unquote

logger = logging.getLogger(__name__)

_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")

_EXTRA_TYPES = {".webp": "image/webp", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}


@dataclass
class _Route:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/octet-stream"
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    #: Content-Length to announce; None = the real length (or chunked for streams)
    declared_length: int | None = None
    #: streamed body: ``chunk`` repeated ``n_chunks`` times
    chunk: bytes | None = None
    n_chunks: int = 0


def _check_host(host: str) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"LoopbackServer binds 127.0.0.x IP literals only, got {host!r}") from None
    if ip.version != 4 or ip not in _LOOPBACK:
        raise ValueError(f"LoopbackServer binds 127.0.0.x only, got {host!r}")
    return str(ip)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def handle_error(self, request, client_address):  # clients that hang up are expected
        logger.debug("loopback server: error while serving %s", client_address, exc_info=True)


class LoopbackServer:
    """Threaded HTTP server on ``127.0.0.x`` serving registered routes."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = _check_host(host)
        self._port = port
        self._routes: dict[str, _Route] = {}
        self._trees: list[tuple[str, Path]] = []
        self._counts: Counter = Counter()
        self._headers: dict[str, list[dict[str, str]]] = {}
        self._in_flight = 0
        self._max_in_flight = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ routes
    def add(
        self,
        path: str,
        body: bytes,
        content_type: str = "image/jpeg",
        status: int = 200,
        headers: dict[str, str] | None = None,
        delay_s: float = 0.0,
        declared_length: int | None = None,
    ) -> str:
        """Serve ``body`` at ``path``; returns the full URL."""
        path = _norm(path)
        self._routes[path] = _Route(
            status=status,
            body=bytes(body),
            content_type=content_type,
            headers=dict(headers or {}),
            delay_s=delay_s,
            declared_length=declared_length,
        )
        return self.url(path)

    def add_stream(
        self,
        path: str,
        chunk: bytes,
        n_chunks: int,
        content_type: str = "image/jpeg",
        declared_length: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        """Serve ``chunk`` repeated ``n_chunks`` times, written as it goes (never held whole).

        Without ``declared_length`` the body is sent with chunked transfer encoding,
        so the client only learns the size by reading it.
        """
        path = _norm(path)
        self._routes[path] = _Route(
            content_type=content_type,
            headers=dict(headers or {}),
            declared_length=declared_length,
            chunk=bytes(chunk),
            n_chunks=int(n_chunks),
        )
        return self.url(path)

    def add_redirect(self, path: str, location: str, status: int = 302) -> str:
        """Answer ``path`` with a redirect to ``location`` (absolute or relative)."""
        path = _norm(path)
        self._routes[path] = _Route(status=status, content_type="text/plain", headers={"Location": location})
        return self.url(path)

    def add_file_tree(self, prefix: str, folder: str) -> None:
        """Serve the files below ``folder`` under the URL prefix ``prefix``."""
        prefix = _norm(prefix).rstrip("/") + "/"
        self._trees.append((prefix, Path(folder).resolve()))

    # ------------------------------------------------------------------ info
    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("LoopbackServer is not started")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        if self._httpd is None:
            return _norm(path)
        return self.base_url + _norm(path)

    def request_count(self, path: str | None = None) -> int:
        with self._lock:
            if path is None:
                return sum(self._counts.values())
            return self._counts.get(_norm(path), 0)

    def request_headers(self, path: str) -> list[dict[str, str]]:
        """Headers of the requests received for ``path`` (oldest first)."""
        with self._lock:
            return [dict(h) for h in self._headers.get(_norm(path), [])]

    @property
    def max_in_flight(self) -> int:
        """Most requests waiting for their answer at the same time (received, headers
        not yet sent) since start / :meth:`reset_counts`."""
        with self._lock:
            return self._max_in_flight

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._headers.clear()
            self._max_in_flight = self._in_flight

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "LoopbackServer":
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self._httpd = _Server((self.host, self._port), _make_handler(self))
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="loopback-http", daemon=True
        )
        self._thread.start()
        logger.debug("loopback server listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ serving
    def _enter(self, path: str, headers) -> None:
        with self._lock:
            self._counts[path] += 1
            log = self._headers.setdefault(path, [])
            if len(log) < 1000:
                log.append({k: v for k, v in headers.items()})
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _lookup(self, path: str) -> _Route | None:
        route = self._routes.get(path)
        if route is not None:
            return route
        for prefix, folder in self._trees:
            if not path.startswith(prefix):
                continue
            target = (folder / path[len(prefix):]).resolve()
            if folder not in target.parents or not target.is_file():
                continue
            ctype = _EXTRA_TYPES.get(target.suffix.lower()) or mimetypes.guess_type(target.name)[0]
            return _Route(body=target.read_bytes(), content_type=ctype or "application/octet-stream")
        return None


def _norm(path: str) -> str:
    path = urlsplit(path).path if "://" in path else path.split("?", 1)[0]
    return "/" + unquote(path).lstrip("/")


def _make_handler(server: LoopbackServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "laionbuild-loopback/1"

        def log_message(self, fmt, *args):  # keep test output quiet
            logger.debug("loopback: " + fmt, *args)

        def do_HEAD(self):
            self._serve(head=True)

        def do_GET(self):
            self._serve(head=False)

        def _serve(self, head: bool) -> None:
            path = _norm(self.path)
            server._enter(path, self.headers)
            self._active = True
            try:
                self._answer(path, head)
            finally:
                self._done()

        def end_headers(self):
            self._done()  # the answer starts: the request no longer counts as in flight
            super().end_headers()

        def _done(self) -> None:
            if getattr(self, "_active", False):
                self._active = False
                server._leave()

        def _answer(self, path: str, head: bool) -> None:
            route = server._lookup(path)
            if route is None:
                self._simple(404, b"not found")
                return
            if route.delay_s > 0 and server._stopping.wait(route.delay_s):
                self.close_connection = True
                return
            if route.chunk is not None:
                self._stream(route, head)
                return
            body = route.body
            self.send_response(route.status)
            self.send_header("Content-Type", route.content_type)
            length = len(body) if route.declared_length is None else route.declared_length
            self.send_header("Content-Length", str(length))
            for k, v in route.headers.items():
                self.send_header(k, v)
            lying = route.declared_length is not None and route.declared_length != len(body)
            if lying:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _stream(self, route: _Route, head: bool) -> None:
            self.send_response(route.status)
            self.send_header("Content-Type", route.content_type)
            for k, v in route.headers.items():
                self.send_header(k, v)
            chunked = route.declared_length is None
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(route.declared_length))
            self.send_header("Connection", "close")
            self.close_connection = True
            self.end_headers()
            if head:
                return
            frame = (b"%x\r\n" % len(route.chunk)) + route.chunk + b"\r\n" if chunked else route.chunk
            try:
                for _ in range(route.n_chunks):
                    if server._stopping.is_set():
                        return
                    self.wfile.write(frame)
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError, socket.timeout, OSError):
                return  # the client stopped reading, as it should

        def _simple(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


__all__ = ["LoopbackServer"]
