"""HTTP connections for the fetch stage: pinned to a vetted address, kept alive per (host, address).

:class:`ConnectionPool` hands out ``http.client`` connections whose TCP socket goes
to an address the caller already vetted (the ``Host`` header, TLS SNI and
certificate check keep the host name), and keeps finished ones for reuse
(``fetch.keep_alive``), at most ``max_idle`` per (scheme, host, port, address).
Every connection opened or reused is counted, per pool and per download thread
(:meth:`ConnectionPool.take_row_counts`), so that each row can carry its own.

A kept connection is used again only while nothing waits to be read on it (:func:`readable`,
as urllib3 checks before reuse): bytes nobody asked for -- a ``408`` a server sends an idle
connection before it closes it, an extra response, a body longer than its ``Content-Length``
-- or the server's close would otherwise be read as the next request's answer. Such a
connection is closed when it is handed back, and again when it is taken from the pool.

A socket timeout bounds each ``recv``, not a request: a server that sends a byte now
and then (a body, a header line, endless ``100 Continue`` answers) would hold a download
thread for as long as it likes. Each checked-out connection is therefore armed on a
:class:`Watchdog`, which shuts its socket down at the request's deadline; the blocked
read returns at once and the row is a ``timeout``.
"""

from __future__ import annotations

import heapq
import http.client
import itertools
import select
import socket
import ssl
import threading
import time
from collections import Counter

#: bytes read per ``recv`` of a body
READ_CHUNK = 1 << 18
#: an error / redirect body up to this size is read and dropped so the connection can be reused
MAX_DISCARD_BYTES = 1 << 16
#: characters of a network error's text kept in the row's message
MAX_MESSAGE = 200


class FetchFailure(Exception):
    """A row's download failed with ``status`` (see the stage's statuses)."""

    def __init__(self, status: str, message: str, *, retry_after: float | None = None,
                 wait_s: float | None = None, redirect_status: int | None = None):
        self.status = status
        self.message = message
        #: seconds the server asked to wait before asking again (``Retry-After``)
        self.retry_after = retry_after
        #: no request was sent: the host is paused for this many more seconds
        self.wait_s = wait_s
        #: the last answer was a redirect (this status) that was not followed: one too many,
        #: or to a URL that is not fetched (another scheme, a blocked address, a bad URL)
        self.redirect_status = redirect_status
        super().__init__(f"{status}: {message}")


class Conn:
    """One checkout of a pooled connection to a vetted address; ``alarm`` while a request uses
    it. ``returned`` once :meth:`ConnectionPool.checkin` or :meth:`ConnectionPool.release` took
    it back: every later call of theirs on this checkout does nothing, so a thread never closes
    a connection that another thread has checked out since."""

    __slots__ = ("http", "key", "reused", "alarm", "returned")

    def __init__(self, http_conn, key, reused: bool = False):
        self.http = http_conn
        self.key = key
        self.reused = reused
        self.alarm: Alarm | None = None
        self.returned = False

    def hold_socket(self) -> None:
        """Let the watchdog reach the socket of the request just sent, whatever ``http.client``
        does with its own reference."""
        if self.alarm is not None:
            self.alarm.sock = self.http.sock

    @property
    def timed_out(self) -> bool:
        """The watchdog shut this connection down at its request's deadline."""
        return self.alarm is not None and self.alarm.fired


class Alarm:
    """A connection's deadline on the :class:`Watchdog`; ``sock``: the socket of the request
    in flight (``http.client`` lets go of it once a response that ends the connection starts,
    while the response reads on from it)."""

    __slots__ = ("conn", "fired", "done", "sock")

    def __init__(self, conn: Conn):
        self.conn = conn
        self.fired = False
        self.done = False
        self.sock = None


class InterimSkippingResponse(http.client.HTTPResponse):
    """An HTTP response that passes over every interim (1xx) answer before the final one, as
    RFC 9110 asks of a client: ``http.client`` skips only ``100 Continue``, so a ``103 Early
    Hints`` or ``102 Processing`` ahead of the image was taken for the answer."""

    def _read_status(self):
        while True:
            version, status, reason = super()._read_status()
            if status == http.client.CONTINUE or not 100 <= status < 200 or status == http.client.SWITCHING_PROTOCOLS:
                return version, status, reason
            http.client._read_headers(self.fp)  # the interim answer's header fields: not needed


class Watchdog:
    """One thread that shuts down the socket of every request still running at its deadline.

    ``arm`` / ``disarm`` are O(log n); disarmed alarms leave the heap when their deadline
    comes (at most ``fetch.timeout_s`` later).
    """

    def __init__(self):
        self._heap: list[tuple[float, int, Alarm]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    def arm(self, conn: Conn, deadline: float) -> Alarm:
        alarm = Alarm(conn)
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._seq), alarm))
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="fetch-watchdog", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is alarm:
                self._cond.notify()
        return alarm

    def disarm(self, alarm: Alarm) -> bool:
        """Stop ``alarm``; False when it had already fired (the socket is shut down)."""
        with self._cond:
            alarm.done = True
            return not alarm.fired

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].done or self._heap[0][0] <= now):
                    _, _, alarm = heapq.heappop(self._heap)
                    if not alarm.done:
                        alarm.fired = alarm.done = True
                        _shutdown(alarm.conn.http.sock or alarm.sock)
                    alarm.conn = alarm.sock = None  # type: ignore[assignment]
                self._cond.wait(self._heap[0][0] - now if self._heap else None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()


def _shutdown(sock) -> None:
    """End every read and write on ``sock`` now (its owner then closes it)."""
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def readable(sock) -> bool:
    """Whether ``sock`` has something to read now (bytes, the peer's close, an error), without
    waiting; True for no socket or a closed one. An idle kept-alive connection must have nothing:
    whatever is there is not the answer to a request not sent yet."""
    if sock is None:
        return True
    try:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True  # decrypted bytes already taken off the socket
        if hasattr(select, "poll"):  # no FD_SETSIZE limit, unlike select()
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLPRI)
            return bool(poller.poll(0))
        ready, _, _ = select.select([sock], [], [], 0)
        return bool(ready)
    except (OSError, ValueError):  # closed: fileno() -1
        return True


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
        return FetchFailure("connection_error", f"TLS: {str(exc)[:MAX_MESSAGE]}")
    # a bad status line quotes what the server sent (up to 64 KiB of it)
    return FetchFailure("connection_error", f"{type(exc).__name__}: {str(exc)[:MAX_MESSAGE]!s}")


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
        self._idle: dict[tuple, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._row = threading.local()
        self.stats: Counter = Counter()
        self.closed = False
        self.watchdog = Watchdog()

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1
        setattr(self._row, name, getattr(self._row, name, 0) + 1)

    def _count_pool(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def take_row_counts(self) -> tuple[int, int]:
        """(opened, reused) by this thread since its last call; resets them."""
        opened = getattr(self._row, "connections_opened", 0)
        reused = getattr(self._row, "connections_reused", 0)
        self._row.connections_opened = self._row.connections_reused = 0
        return opened, reused

    def checkout(self, scheme: str, host: str, port: int, addresses, deadline: float, fresh: bool) -> Conn:
        """A kept-alive connection to one of ``addresses`` (all vetted), else a new one, armed on
        the watchdog until ``deadline`` (:meth:`checkin` or :meth:`release` disarms it)."""
        if self.keep_alive and not fresh:
            for ip in addresses:
                key = (scheme, host, port, ip)
                while True:
                    with self._lock:
                        idle = self._idle.get(key)
                        hc = idle.pop() if idle else None
                    if hc is None or not readable(hc.sock):
                        break
                    hc.close()  # the server closed it, or sent what was not asked for: not reused
                    self._count_pool("connections_dropped")
                if hc is not None:
                    conn = Conn(hc, key, reused=True)
                    self._count("connections_reused")
                    conn.alarm = self.watchdog.arm(conn, deadline)
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
            hc.response_class = InterimSkippingResponse
            conn = Conn(pinned(hc, ip), (scheme, host, port, ip))
            conn.alarm = self.watchdog.arm(conn, deadline)  # a TLS handshake is many reads
            try:
                hc.connect()
            except Exception as exc:  # noqa: BLE001
                self.release(conn)
                if conn.timed_out:
                    raise FetchFailure("timeout", "time limit reached while connecting") from None
                last = exc
                continue
            self._count("connections_opened")
            return conn
        raise net_failure(last or OSError("no address"), self.timeout_s)

    def release(self, conn: Conn) -> None:
        """Close a connection that will not be reused (nothing when it was handed back)."""
        if conn.returned:
            return
        conn.returned = True
        if conn.alarm is not None:
            self.watchdog.disarm(conn.alarm)
        conn.http.close()

    def checkin(self, conn: Conn) -> None:
        """Keep a connection whose response was read completely (or close it); nothing when it
        was handed back already."""
        if conn.returned:
            return
        conn.returned = True
        alarm, conn.alarm = conn.alarm, None
        if alarm is not None and not self.watchdog.disarm(alarm):
            conn.http.close()  # shut down at the deadline: not reusable
            return
        if not self.keep_alive or self.closed:
            conn.http.close()
            return
        if readable(conn.http.sock):  # bytes past the response's end (or the server's close)
            conn.http.close()
            self._count_pool("connections_dropped")
            return
        with self._lock:
            idle = self._idle.setdefault(conn.key, [])
            if len(idle) < self.max_idle:
                idle.append(conn.http)
                return
        conn.http.close()

    def read_body(self, conn: Conn, resp, limit: int, deadline: float, truncate: bool = False) -> bytes:
        """The whole body, at most ``limit`` bytes (``too_large_bytes`` past it; with ``truncate``
        its first ``limit`` bytes instead, the connection left for the caller to release)."""
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
                if total > limit and truncate:
                    return b"".join(parts)[:limit]
                if total > limit:
                    self.release(conn)
                    raise FetchFailure("too_large_bytes", f"body larger than {limit} bytes")
        except FetchFailure:
            raise
        except Exception as exc:  # noqa: BLE001
            if not conn.timed_out:
                raise net_failure(exc, self.timeout_s) from None
        if conn.timed_out:  # the watchdog's shutdown ends the read early, or looks like the end of the body
            raise FetchFailure("timeout", f"body not complete within {self.timeout_s}s")
        missing = getattr(resp, "length", None)
        if missing:  # http.client returns what came when the server closes early
            self.release(conn)
            raise FetchFailure("connection_error", f"connection closed {missing} bytes before the end of the body")
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def discard(self, conn: Conn, resp, deadline: float) -> None:
        """Drop a small error / redirect body so the connection can be reused."""
        length = resp.getheader("Content-Length")
        if resp.will_close or length is None or not length.isdigit() or int(length) > MAX_DISCARD_BYTES:
            self.release(conn)
            return
        try:
            set_timeout(conn, deadline)
            resp.read()
            self.checkin(conn)
        except Exception:  # noqa: BLE001
            self.release(conn)

    def close(self) -> None:
        """Close every kept-alive connection; later check-ins close theirs."""
        self.closed = True
        self.watchdog.close()
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for c in conns:
            c.close()


__all__ = ["Alarm", "Conn", "ConnectionPool", "FetchFailure", "MAX_DISCARD_BYTES", "READ_CHUNK", "Watchdog",
           "net_failure", "pinned", "readable", "set_timeout"]
