"""HTTP connections for the fetch stage: pinned to a vetted address, kept alive per (host, address).

:class:`ConnectionPool` hands out ``http.client`` connections whose TCP socket goes
to an address the caller already vetted (the ``Host`` header, TLS SNI and
certificate check keep the host name), and keeps finished ones for reuse
(``fetch.keep_alive``), at most ``max_idle`` per (scheme, host, port, address).
Every connection opened or reused is counted, per pool and per download thread
(:meth:`ConnectionPool.take_row_counts`), so that each row can carry its own.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from collections import Counter

#: bytes read per ``recv`` of a body
READ_CHUNK = 1 << 18
#: an error / redirect body up to this size is read and dropped so the connection can be reused
MAX_DISCARD_BYTES = 1 << 16


class FetchFailure(Exception):
    """A row's download failed with ``status`` (see the stage's statuses)."""

    def __init__(self, status: str, message: str):
        self.status = status
        self.message = message
        super().__init__(f"{status}: {message}")


class Conn:
    """One pooled connection to a vetted address."""

    __slots__ = ("http", "key", "reused")

    def __init__(self, http_conn, key):
        self.http = http_conn
        self.key = key
        self.reused = False


def pinned(conn: http.client.HTTPConnection, ip: str) -> http.client.HTTPConnection:
    """Make ``conn`` open its TCP connection to ``ip`` while Host / SNI keep the name."""

    def create_connection(address, timeout=None, source_address=None, *args, **kwargs):
        return socket.create_connection((ip, address[1]), timeout, source_address)

    conn._create_connection = create_connection  # type: ignore[attr-defined]
    return conn


def set_timeout(conn: Conn, deadline: float) -> None:
    """Give the connection what is left until ``deadline``; ``timeout`` when nothing is."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise FetchFailure("timeout", "time limit reached")
    conn.http.timeout = remaining
    if conn.http.sock is not None:
        conn.http.sock.settimeout(remaining)


def net_failure(exc: BaseException | None, timeout_s: float) -> FetchFailure:
    """The row status of a network exception."""
    if isinstance(exc, FetchFailure):
        return exc
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return FetchFailure("timeout", f"no answer within {timeout_s}s")
    if isinstance(exc, ssl.SSLError):
        return FetchFailure("connection_error", f"TLS: {exc}")
    return FetchFailure("connection_error", f"{type(exc).__name__}: {exc}")


class ConnectionPool:
    """Pinned, kept-alive connections; thread-safe."""

    #: per-row counters (see :meth:`take_row_counts`)
    ROW_COUNTERS = ("connections_opened", "connections_reused")

    def __init__(self, *, keep_alive: bool, max_idle: int, timeout_s: float,
                 ssl_context: ssl.SSLContext | None = None):
        self.keep_alive = keep_alive
        self.max_idle = max(1, int(max_idle))
        self.timeout_s = timeout_s
        self._ssl = ssl_context or ssl.create_default_context()
        self._idle: dict[tuple, list[Conn]] = {}
        self._lock = threading.Lock()
        self._row = threading.local()
        self.stats: Counter = Counter()
        self.closed = False

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1
        setattr(self._row, name, getattr(self._row, name, 0) + 1)

    def take_row_counts(self) -> tuple[int, int]:
        """(opened, reused) by this thread since its last call; resets them."""
        opened = getattr(self._row, "connections_opened", 0)
        reused = getattr(self._row, "connections_reused", 0)
        self._row.connections_opened = self._row.connections_reused = 0
        return opened, reused

    def checkout(self, scheme: str, host: str, port: int, addresses, deadline: float, fresh: bool) -> Conn:
        """A kept-alive connection to one of ``addresses`` (all vetted), else a new one."""
        if self.keep_alive and not fresh:
            for ip in addresses:
                key = (scheme, host, port, ip)
                with self._lock:
                    idle = self._idle.get(key)
                    conn = idle.pop() if idle else None
                if conn is not None:
                    conn.reused = True
                    self._count("connections_reused")
                    return conn
        last: BaseException | None = None
        for ip in addresses:  # every one of them was vetted
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FetchFailure("timeout", "time limit reached while connecting")
            if scheme == "https":
                hc = http.client.HTTPSConnection(host, port, timeout=remaining, context=self._ssl)
            else:
                hc = http.client.HTTPConnection(host, port, timeout=remaining)
            pinned(hc, ip)
            try:
                hc.connect()
            except Exception as exc:  # noqa: BLE001
                hc.close()
                last = exc
                continue
            self._count("connections_opened")
            return Conn(hc, (scheme, host, port, ip))
        raise net_failure(last or OSError("no address"), self.timeout_s)

    def checkin(self, conn: Conn) -> None:
        """Keep a connection whose response was read completely (or close it)."""
        if not self.keep_alive or self.closed:
            conn.http.close()
            return
        with self._lock:
            idle = self._idle.setdefault(conn.key, [])
            if len(idle) < self.max_idle:
                idle.append(conn)
                return
        conn.http.close()

    def read_body(self, conn: Conn, resp, limit: int, deadline: float) -> bytes:
        """The whole body, at most ``limit`` bytes (``too_large_bytes`` past it)."""
        parts = []
        total = 0
        try:
            while True:
                set_timeout(conn, deadline)
                chunk = resp.read(min(READ_CHUNK, limit + 1 - total))
                if not chunk:
                    break
                parts.append(chunk)
                total += len(chunk)
                if total > limit:
                    conn.http.close()
                    raise FetchFailure("too_large_bytes", f"body larger than {limit} bytes")
        except FetchFailure:
            raise
        except Exception as exc:  # noqa: BLE001
            raise net_failure(exc, self.timeout_s) from None
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def discard(self, conn: Conn, resp, deadline: float) -> None:
        """Drop a small error / redirect body so the connection can be reused."""
        length = resp.getheader("Content-Length")
        if resp.will_close or length is None or not length.isdigit() or int(length) > MAX_DISCARD_BYTES:
            conn.http.close()
            return
        try:
            set_timeout(conn, deadline)
            resp.read()
            self.checkin(conn)
        except Exception:  # noqa: BLE001
            conn.http.close()

    def close(self) -> None:
        """Close every kept-alive connection; later check-ins close theirs."""
        self.closed = True
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for c in conns:
            c.http.close()


__all__ = ["Conn", "ConnectionPool", "FetchFailure", "MAX_DISCARD_BYTES", "READ_CHUNK", "net_failure", "pinned",
           "set_timeout"]
