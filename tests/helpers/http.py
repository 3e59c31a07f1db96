"""A loopback HTTP server around any request handler class, for the tests that need their own routes
(the demo's :class:`laionbuild.demo.image_server.LoopbackServer` serves plain files and redirects)."""

from __future__ import annotations

import contextlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

#: the only address the tests' servers bind
LOOPBACK = "127.0.0.1"


class LoopbackHTTP:
    """``handler`` served on 127.0.0.1 at a free port, in a daemon thread; a context manager."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], host: str = LOOPBACK):
        self.httpd = ThreadingHTTPServer((host, 0), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> "LoopbackHTTP":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "LoopbackHTTP":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[LoopbackHTTP]:
    with LoopbackHTTP(handler) as server:
        yield server
