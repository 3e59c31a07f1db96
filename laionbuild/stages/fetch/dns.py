"""Host names to addresses for the fetch stage: literals parsed locally, a static map, then
DNS through a per-worker LRU cache with TTLs, negative caching and retries of transient failures."""

from __future__ import annotations

import ipaddress
import queue
import re
import socket
import threading
import time
from collections import Counter, OrderedDict
from typing import Callable, Iterable, Mapping

from ...config import FetchConfig

#: seconds a lookup thread waits for work before it ends
_IDLE_EXIT_S = 30.0

# legacy IPv4 spellings accepted by inet_aton: 2130706433, 0x7f000001, 0177.0.0.1, 127.1
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?$", re.I)

#: per-row column: milliseconds this row's download spent resolving host names (0 when cached)
DNS_MS = "dns_ms"
#: why a lookup failed (the first word of a ``dns_error`` row's error message)
DNS_REASONS = ("nxdomain", "transient", "servfail", "timeout", "error", "bad_name")
#: reasons retried with back-off and cached only briefly
TRANSIENT_DNS_REASONS = frozenset({"transient", "servfail", "timeout"})


class ResolveError(Exception):
    """A host name has no usable address; ``reason`` is one of :data:`DNS_REASONS`."""

    def __init__(self, message: str, reason: str = "nxdomain"):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def dns_failure_reason(exc: BaseException) -> str:
    """Classify a lookup failure: ``nxdomain`` (the name does not exist, cached long),
    ``transient`` (``EAI_AGAIN``: SERVFAIL or no answer), ``servfail`` (``EAI_FAIL``),
    ``timeout`` (retried, cached briefly), ``bad_name`` or ``error`` (anything else)."""
    if isinstance(exc, socket.gaierror):
        code = exc.args[0] if exc.args else None
        nodata = getattr(socket, "EAI_NODATA", None)
        if code == socket.EAI_NONAME or (nodata is not None and code == nodata):
            return "nxdomain"
        if code == socket.EAI_AGAIN:
            return "transient"
        if code == socket.EAI_FAIL:
            return "servfail"
        return "error"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timeout"
    if isinstance(exc, (UnicodeError, ValueError)):
        return "bad_name"
    return "error"


class Resolver:
    """Host name -> IP addresses, with a static map and a thread-safe LRU cache with TTLs.

    Order: IP literals (and legacy numeric IPv4 spellings) are parsed without
    any lookup; ``localhost`` / ``*.localhost`` are loopback (RFC 6761);
    ``host_map`` (exact, case-insensitive names); ``*.invalid`` fails without a
    lookup (RFC 6761); the cache; finally ``lookup`` (``socket.getaddrinfo`` by
    default, which asks the node's resolver: a local caching resolver at crawl
    scale, see docs/cluster.md).

    Answers are cached for ``ttl_s``; a name that does not exist (NXDOMAIN) for
    ``negative_ttl_s``; a transient failure (SERVFAIL / ``EAI_AGAIN``, timeout) is
    first retried ``retries`` times with exponential back-off from
    ``retry_backoff_s`` and then cached for ``transient_ttl_s`` only. Threads asking
    for a name that is being looked up wait for that lookup instead of repeating it.

    Lookups run on up to ``lookup_threads`` threads of the resolver, so a caller with a
    ``deadline`` stops waiting when it passes (reason ``timeout``) whatever the system
    resolver does; the lookup goes on and its answer is cached for the callers after it.
    ``stats`` counts ``lookups``, ``retries``, ``failed:<reason>``, ``lookup_ms`` and
    ``deadline_exceeded`` (callers that stopped waiting).
    """

    def __init__(
        self,
        host_map: Mapping[str, str] | None = None,
        cache_size: int = 10_000,
        lookup: Callable[[str], Iterable[str]] | None = None,
        *,
        ttl_s: float = 3600.0,
        negative_ttl_s: float = 600.0,
        transient_ttl_s: float = 30.0,
        retries: int = 2,
        retry_backoff_s: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        lookup_threads: int = 32,
    ):
        self.host_map = {k.lower().rstrip("."): v for k, v in (host_map or {}).items()}
        self.cache_size = max(0, int(cache_size))
        self._lookup = lookup or _system_lookup
        self.ttl_s, self.negative_ttl_s, self.transient_ttl_s = ttl_s, negative_ttl_s, transient_ttl_s
        self.retries, self.retry_backoff_s = max(0, int(retries)), retry_backoff_s
        self._clock, self._sleep = clock, sleep
        self._cache: OrderedDict[str, tuple[float, tuple[str, ...] | ResolveError]] = OrderedDict()
        self._inflight: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self.lookup_threads = max(1, int(lookup_threads))
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = 0
        self._busy = 0  # lookups queued or running
        self._row = threading.local()  # lookups and cache hits of the calling thread's current row
        self.hits = 0
        self.misses = 0
        self.stats: Counter = Counter()

    @classmethod
    def from_config(cls, cfg: FetchConfig, lookup: Callable[[str], Iterable[str]] | None = None) -> "Resolver":
        return cls(cfg.host_map, cfg.dns_cache_size, lookup, ttl_s=cfg.dns_ttl_s,
                   negative_ttl_s=cfg.dns_negative_ttl_s, transient_ttl_s=cfg.dns_transient_ttl_s,
                   retries=cfg.dns_retries, retry_backoff_s=cfg.dns_retry_backoff_s,
                   lookup_threads=2 * max(1, cfg.threads))

    def resolve(self, host: str, deadline: float | None = None) -> tuple[str, ...]:
        """Addresses of ``host`` (strings); raises :class:`ResolveError`.

        ``deadline`` (``time.monotonic()`` seconds): give up waiting for a lookup then."""
        name = (host or "").strip().lower().rstrip(".")
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        if not name:
            raise ResolveError("empty host", "bad_name")
        literal = parse_ip_literal(name)
        if literal is not None:
            return (literal,)
        if name == "localhost" or name.endswith(".localhost"):
            return ("127.0.0.1", "::1")
        if name in self.host_map:
            return (self.host_map[name],)
        if name == "invalid" or name.endswith(".invalid"):
            raise ResolveError(f"{name}: .invalid names never resolve (RFC 6761)", "nxdomain")
        with self._lock:
            cached = self._cached(name)
            if cached is None:
                pending = self._inflight.get(name)
                if pending is None:
                    pending = self._inflight[name] = _Pending()
                    self.misses += 1
                    self._row.lookups = getattr(self._row, "lookups", 0) + 1
                    self._submit(name, pending)
                else:  # answered by the lookup another row started
                    self.hits += 1
                    self._row.hits = getattr(self._row, "hits", 0) + 1
            else:
                self.hits += 1
                self._row.hits = getattr(self._row, "hits", 0) + 1
        if cached is None:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not pending.done.wait(wait):
                with self._lock:
                    self.stats["deadline_exceeded"] += 1
                raise ResolveError(f"no answer for {name} within the request's deadline", "timeout")
            cached = pending.result
        if isinstance(cached, ResolveError):
            raise cached
        return cached

    def _submit(self, name: str, pending: "_Pending") -> None:
        """Queue one lookup (the lock held); a thread is started while fewer run than lookups wait."""
        self._queue.put((name, pending))
        self._busy += 1
        if self._threads < min(self._busy, self.lookup_threads):
            self._threads += 1
            threading.Thread(target=self._serve, name=f"dns-{self._threads}", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                name, pending = self._queue.get(timeout=_IDLE_EXIT_S)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():  # nothing was queued for this thread: it ends
                        self._threads -= 1
                        return
                continue
            result: tuple[str, ...] | ResolveError = ResolveError(f"cannot resolve {name}", "error")
            try:
                result = self._lookup_with_retries(name)
                if self.cache_size:
                    ttl = self.ttl_s if isinstance(result, tuple) else (
                        self.transient_ttl_s if result.reason in TRANSIENT_DNS_REASONS else self.negative_ttl_s)
                    with self._lock:
                        self._cache[name] = (self._clock() + ttl, result)
                        self._cache.move_to_end(name)
                        while len(self._cache) > self.cache_size:
                            self._cache.popitem(last=False)
            except Exception as exc:  # noqa: BLE001 - a failing lookup function fails the name, not the thread
                result = ResolveError(f"cannot resolve {name}: {type(exc).__name__}: {exc}", "error")
            finally:
                with self._lock:
                    self._inflight.pop(name, None)
                    self._busy -= 1
                pending.result = result
                pending.done.set()

    def take_row_counts(self) -> tuple[int, int]:
        """(names looked up, names answered from the cache) by this thread since its last call."""
        counts = getattr(self._row, "lookups", 0), getattr(self._row, "hits", 0)
        self._row.lookups = self._row.hits = 0
        return counts

    def _cached(self, name: str):
        entry = self._cache.get(name)
        if entry is None:
            return None
        expires, value = entry
        if self._clock() >= expires:
            del self._cache[name]
            return None
        self._cache.move_to_end(name)
        return value

    def _lookup_with_retries(self, name: str) -> tuple[str, ...] | ResolveError:
        started = self._clock()
        attempt = 0
        try:
            while True:
                with self._lock:
                    self.stats["lookups"] += 1
                try:
                    addrs = tuple(dict.fromkeys(str(a) for a in self._lookup(name)))
                    if addrs:
                        return addrs
                    reason, detail = "nxdomain", f"no address for {name}"
                except (OSError, UnicodeError, ValueError) as exc:
                    reason, detail = dns_failure_reason(exc), f"cannot resolve {name}: {exc}"
                if reason not in TRANSIENT_DNS_REASONS or attempt >= self.retries:
                    with self._lock:
                        self.stats[f"failed:{reason}"] += 1
                    return ResolveError(detail, reason)
                delay = self.retry_backoff_s * (2 ** attempt)
                attempt += 1
                with self._lock:
                    self.stats["retries"] += 1
                if delay > 0:
                    self._sleep(delay)
        finally:
            with self._lock:
                self.stats["lookup_ms"] += int(round((self._clock() - started) * 1000))


class _Pending:
    """One lookup in flight: its answer (or :class:`ResolveError`) once ``done`` is set."""

    __slots__ = ("done", "result")

    def __init__(self):
        self.done = threading.Event()
        self.result: tuple[str, ...] | ResolveError | None = None


def _system_lookup(name: str) -> list[str]:
    infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    return [info[4][0] for info in infos]


def parse_ip_literal(host: str) -> str | None:
    """The canonical address of an IP literal host, or None for a name.

    Legacy IPv4 forms (decimal, hex, octal, shortened) are canonicalised the way
    ``inet_aton`` and browsers read them, so they cannot slip past the checks.
    """
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if _NUMERIC_HOST.match(host):
        try:
            return socket.inet_ntoa(socket.inet_aton(host.rstrip(".")))
        except OSError:
            raise ResolveError(f"invalid numeric host {host!r}") from None
    return None



__all__ = ["DNS_MS", "DNS_REASONS", "TRANSIENT_DNS_REASONS", "ResolveError", "Resolver", "dns_failure_reason",
           "parse_ip_literal"]
