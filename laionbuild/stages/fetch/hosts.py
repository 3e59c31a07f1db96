"""Per-host turns without holding download threads.

A row whose host already has ``fetch.per_host_concurrency`` downloads running waits in that
host's queue, not on a download thread: a slow or popular host (a CDN holding a few percent of
the rows) never takes every thread while rows of other hosts could run. A row that has to wait
for a time (a retry's back-off, a host's ``Retry-After``) waits on one timer thread, not on a
download thread either.

Turns are kept per host name. What a server says of itself -- a ``Retry-After`` pause, and
the "down" state of a server that does not answer -- is kept per origin (scheme, host, port,
:func:`origin_key`): a closed or throttling port says nothing of another port of the same host.

:class:`HostTurns` is given the function that runs a job on a download thread (the
fetcher's thread pool); every job it runs holds one of its host's turns until it returns.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from typing import Callable
from urllib.parse import urlsplit


#: the longest one ``Retry-After`` pauses an origin (10 minutes): a server may ask for any time
#: (400 digits are infinity, a date in the year 9999), and without a bound one answer left its
#: origin alone for the worker's whole life. A row still ends, without another request, when its
#: wait would pass ``fetch.max_retry_after_s``.
MAX_PAUSE_S = 600.0


def host_key(host: str) -> str:
    """The name a host's turns and pauses are kept under: lower case, without the trailing dot
    of a fully qualified name (``img.test.`` and ``img.test`` are one host)."""
    return host.rstrip(".").lower()


def origin_key(scheme: str, host: str, port: int) -> str:
    """The name an origin's pauses and down state are kept under (``http://img.test:8080``):
    its scheme, :func:`host_key` and port; also how messages name it."""
    host = host_key(host)
    return f"{scheme.lower()}://{f'[{host}]' if ':' in host else host}:{port}"


def url_host(url) -> str:
    """:func:`host_key` of a URL's host as the download will see it; ``""`` when it has none
    (the download itself reports why)."""
    if not isinstance(url, str):
        return ""
    try:
        host = urlsplit(url.strip()).hostname or ""
        if not host.isascii():
            host = host.encode("idna").decode("ascii")
    except (ValueError, UnicodeError):
        return ""
    return host_key(host)


class HostTurns:
    """Runs jobs through ``run_on_thread`` with at most ``per_host`` of one host at a time; the
    others wait in a queue per host, in order. Thread-safe."""

    def __init__(self, run_on_thread: Callable[[Callable[[], None]], None], per_host: int,
                 clock: Callable[[], float] = time.monotonic):
        self._run_on_thread = run_on_thread
        self._cap = max(1, int(per_host))
        self._clock = clock
        self._lock = threading.Condition()
        self._running: dict[str, int] = {}
        self._waiting: dict[str, deque] = {}
        self._timers: list[tuple[float, int, str, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._timer_thread: threading.Thread | None = None
        self._pauses: dict[str, tuple[float, str]] = {}
        self._failures: dict[str, int] = {}
        self._down: dict[str, tuple[float, str]] = {}
        self._closed = False

    # ------------------------------------------------------------------ turns
    def submit(self, host: str, job: Callable[[], None]) -> None:
        """Run ``job`` on a download thread once ``host`` has a free turn (``""``: at once)."""
        with self._lock:
            if host and self._running.get(host, 0) >= self._cap:
                self._waiting.setdefault(host, deque()).append(job)
                return
            if host:
                self._running[host] = self._running.get(host, 0) + 1
        self._start(host, job)

    def _start(self, host: str, job: Callable[[], None]) -> None:
        def turn() -> None:
            try:
                job()
            finally:
                self._done(host)

        try:
            self._run_on_thread(turn)
        except RuntimeError:  # the pool is shut down: the fetcher is closing
            self._done(host)

    def _done(self, host: str) -> None:
        if not host:
            return
        with self._lock:
            queue = self._waiting.get(host)
            if queue:
                job = queue.popleft()  # the turn passes on to the host's next row
                if not queue:
                    del self._waiting[host]
            else:
                job = None
                left = self._running.get(host, 1) - 1
                if left > 0:
                    self._running[host] = left
                else:
                    self._running.pop(host, None)
        if job is not None:
            self._start(host, job)

    # ------------------------------------------------------------------ pauses
    def pause(self, origin: str, seconds: float, status: str) -> None:
        """``origin`` (:func:`origin_key`) asked to be left alone for ``seconds`` (``Retry-After``,
        at most :data:`MAX_PAUSE_S`) with ``status``."""
        if not origin or not seconds > 0:
            return
        with self._lock:
            self._set_until(self._pauses, origin, min(seconds, MAX_PAUSE_S), status)

    def paused(self, origin: str) -> tuple[float, str] | None:
        """``(seconds left, status)`` while ``origin`` is paused, else None."""
        return self._left(self._pauses, origin)

    def _set_until(self, table: dict, host: str, seconds: float, why: str) -> None:
        """``table[host]`` ends ``seconds`` from now (a later end is kept); the caller holds the lock."""
        now = self._clock()
        if len(table) > 10_000:  # ended entries are forgotten
            for h in [h for h, entry in table.items() if entry[0] <= now]:
                del table[h]
        if now + seconds > table.get(host, (0.0, ""))[0]:
            table[host] = (now + seconds, why)

    def _left(self, table: dict, host: str) -> tuple[float, str] | None:
        """``(seconds left, why)`` of ``table[host]`` while it has not ended, else None."""
        with self._lock:
            entry = table.get(host)
            if entry is None:
                return None
            left = entry[0] - self._clock()
            if left <= 0:
                del table[host]
                return None
            return left, entry[1]

    # ------------------------------------------------------------------ servers that do not answer
    def answered(self, origin: str) -> None:
        """``origin`` (:func:`origin_key`) answered (any HTTP status): its count of failures in a
        row starts again."""
        if origin and origin in self._failures:
            with self._lock:
                self._failures.pop(origin, None)

    def failed(self, origin: str, status: str, after: int, down_s: float) -> None:
        """A request to ``origin`` got no answer (``status``); ``after`` such failures in a row put
        it down for ``down_s`` seconds (``after`` 0: never)."""
        if not origin or after <= 0 or down_s <= 0:
            return
        with self._lock:
            n = self._failures.get(origin, 0) + 1
            if n < after:
                self._failures[origin] = n
                return
            self._failures.pop(origin, None)
            self._set_until(self._down, origin, down_s, f"{after} requests in a row ended in {status}")

    def down(self, origin: str) -> tuple[float, str] | None:
        """``(seconds left, why)`` while ``origin`` counts as down, else None."""
        return self._left(self._down, origin)

    def waiting(self) -> int:
        """Jobs waiting for their host's turn or for their time."""
        with self._lock:
            return sum(len(q) for q in self._waiting.values()) + len(self._timers)

    # ------------------------------------------------------------------ timers
    def later(self, delay_s: float, host: str, job: Callable[[], None]) -> None:
        """:meth:`submit` ``job`` after ``delay_s`` seconds, waiting on the timer thread."""
        if delay_s <= 0:
            self.submit(host, job)
            return
        with self._lock:
            heapq.heappush(self._timers, (self._clock() + delay_s, next(self._seq), host, job))
            if self._timer_thread is None:
                self._timer_thread = threading.Thread(target=self._tick, name="fetch-timers", daemon=True)
                self._timer_thread.start()
            self._lock.notify()

    def _tick(self) -> None:
        while True:
            with self._lock:
                while not self._closed and (not self._timers or self._timers[0][0] > self._clock()):
                    self._lock.wait(None if not self._timers else max(0.0, self._timers[0][0] - self._clock()))
                if self._closed:
                    return
                _, _, host, job = heapq.heappop(self._timers)
            self.submit(host, job)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._timers.clear()
            self._waiting.clear()
            self._lock.notify_all()
