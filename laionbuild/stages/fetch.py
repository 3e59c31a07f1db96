"""Download candidate images, safely and politely, then decode and resize them.

:class:`ImageFetcher` is a per-batch callable (construct it once per worker:
it owns a thread pool, a DNS cache and a keep-alive connection pool). For every
live row (``DROP_REASON == ""``) it downloads ``URL``, decodes and resizes the
image (:mod:`laionbuild.stages.resize`) and adds ``STATUS``, ``ERROR_MESSAGE``,
``WIDTH`` / ``HEIGHT`` (the original size), ``IMAGE`` and optionally
``IMAGE_BYTES``. A failed row gets ``DROP_REASON = "fetch:<status>"``. Rows that
were already dropped pass through with ``STATUS = "skipped"``. Nothing raises.

Statuses
--------
``success``, ``timeout``, ``connection_error``, ``dns_error``, ``http_error_<code>``,
``too_many_redirects``, ``too_large_bytes``, ``opt_out`` (``X-Robots-Tag``),
``opt_out_tdm_header`` (``tdm-reservation: 1`` on the image), ``opt_out_tdmrep``
(the host's ``/.well-known/tdmrep.json`` reserves the path), ``opt_out_robots_txt``
(the host's ``robots.txt`` disallows the path; off by default),
``blocklisted:<list>`` (a redirect led to a block-listed URL), ``blocked_address``,
``bad_scheme``, ``bad_url`` and, from the decoder, ``not_an_image``,
``decode_error``, ``too_small``, ``too_large_pixels``, ``unsupported_format``,
and ``too_small_bytes`` (a body under ``fetch.min_bytes``; LAION-5B: 5,000).
Truncated images are used with ``fetch.accept_truncated`` (LAION-5B did);
with ``fetch.url_after_redirects`` the row's ``URL`` becomes the URL the image
was finally read from, and its ``hash`` is computed again (LAION-5B's ``URL``);
``fetch.url_form: laion`` writes it as LAION-5B's downloader reported it
(:func:`~laionbuild.stages.url_normalization.laion_response_url`).
Only ``timeout``, ``connection_error``, ``http_error_5xx`` and ``http_error_429``
are retried (``fetch.retries`` times, exponential back-off from
``fetch.retry_backoff_s``).

Safety model (SSRF)
-------------------
Every hop (the first request and each redirect) is vetted before any socket is
opened: the scheme must be http(s); the host is turned into addresses by
:class:`Resolver` (IP literals -- including legacy spellings such as
``2130706433``, ``0x7f000001`` or ``127.1`` -- are parsed locally, ``localhost``
names are loopback by definition, ``fetch.host_map`` comes next, then DNS with a
per-worker LRU cache: answers kept ``fetch.dns_ttl_s``, NXDOMAIN ``fetch.dns_negative_ttl_s``,
transient failures retried ``fetch.dns_retries`` times and kept ``fetch.dns_transient_ttl_s``;
a ``dns_error`` row's message starts with the reason, its ``dns_ms`` column holds the
time spent resolving); if ANY address is loopback, private, link-local (cloud
metadata ``169.254.169.254`` included), multicast, reserved, unspecified or
otherwise not globally routable -- IPv4-mapped IPv6 addresses are judged by their
IPv4 address -- the row is ``blocked_address`` unless the address lies in
``fetch.allow_addresses`` (tests and the demo only). The TCP connection then goes
to the vetted IP itself (``http.client`` with a connection hook; the ``Host``
header, TLS SNI and certificate check keep the host name), so no second,
possibly different, name resolution happens between check and connect. Proxy
environment variables are not used.

Opt-out files (``tdmrep.json``, ``robots.txt``, see :mod:`laionbuild.stages.optout`)
are fetched the same way -- vetted, pinned, size-limited -- once per origin and
worker, before the image itself is requested, on every hop of a redirect chain.

Why ``http.client`` and not img2dataset's downloader or ``requests``
-----------------------------------------------------------------------
img2dataset's ``downloader.py`` works on whole shard files (reads an arrow
shard, writes output through its own writer) with ``urllib.request`` -- one new
connection per image, DNS resolved inside ``urlopen``, no address checks, no
byte limit, no per-host cap -- so it cannot be our batch-in / batch-out stage
and cannot pin the vetted IP. ``requests`` resolves the host itself (and honours
proxy variables), so pinning would need a custom adapter, and it adds Python
work per request. ``http.client`` lets us connect to the vetted IP with one hook
and is the cheapest client in CPU. ``scripts/bench_fetch.py`` measures the whole
stage against img2dataset's ``download()`` on the same URLs (see
``docs/fetch.md`` for the numbers).
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Mapping
from urllib.parse import quote, urljoin, urlsplit

import numpy as np

from .. import schema as S
from ..config import FetchConfig, ResizeConfig
from ..errors import ConfigError
from ..stats import StageCounters
from .optout import (
    ROBOTS_PATH,
    TDMREP_PATH,
    OriginCache,
    RobotsRules,
    parse_robots,
    parse_tdmrep,
    tdm_header_reserved,
    tdm_reserved,
)
from .resize import ImageRejected, decode_and_resize, encode_image
from .url_normalization import laion_response_url

logger = logging.getLogger(__name__)

STAGE = "fetch"
SKIPPED = "skipped"
STATUSES = (
    "success", "timeout", "connection_error", "dns_error", "too_many_redirects", "too_large_bytes",
    "opt_out", "opt_out_tdm_header", "opt_out_tdmrep", "opt_out_robots_txt", "blocked_address", "bad_scheme",
    "bad_url", "not_an_image", "decode_error", "too_small", "too_large_pixels", "unsupported_format",
    "too_small_bytes",
)  # plus http_error_<code> and blocklisted:<list>

_REDIRECTS = (301, 302, 303, 307, 308)
_READ_CHUNK = 1 << 18
# legacy IPv4 spellings accepted by inet_aton: 2130706433, 0x7f000001, 0177.0.0.1, 127.1
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?$", re.I)
# X-Robots-Tag directives that carry a value after a colon (not a user-agent prefix)
_VALUED_DIRECTIVES = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}


def is_transient(status: str) -> bool:
    """Failures worth retrying: timeouts, connection errors, 5xx and 429."""
    if status in ("timeout", "connection_error", "http_error_429"):
        return True
    return status.startswith("http_error_5")


# --------------------------------------------------------------------------- DNS
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
    ``stats`` counts ``lookups``, ``retries``, ``failed:<reason>`` and ``lookup_ms``.
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
    ):
        self.host_map = {k.lower().rstrip("."): v for k, v in (host_map or {}).items()}
        self.cache_size = max(0, int(cache_size))
        self._lookup = lookup or _system_lookup
        self.ttl_s, self.negative_ttl_s, self.transient_ttl_s = ttl_s, negative_ttl_s, transient_ttl_s
        self.retries, self.retry_backoff_s = max(0, int(retries)), retry_backoff_s
        self._clock, self._sleep = clock, sleep
        self._cache: OrderedDict[str, tuple[float, tuple[str, ...] | ResolveError]] = OrderedDict()
        self._inflight: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.stats: Counter = Counter()

    @classmethod
    def from_config(cls, cfg: FetchConfig, lookup: Callable[[str], Iterable[str]] | None = None) -> "Resolver":
        return cls(cfg.host_map, cfg.dns_cache_size, lookup, ttl_s=cfg.dns_ttl_s,
                   negative_ttl_s=cfg.dns_negative_ttl_s, transient_ttl_s=cfg.dns_transient_ttl_s,
                   retries=cfg.dns_retries, retry_backoff_s=cfg.dns_retry_backoff_s)

    def resolve(self, host: str) -> tuple[str, ...]:
        """Addresses of ``host`` (strings); raises :class:`ResolveError`."""
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
        while True:
            with self._lock:
                cached = self._cached(name)
                if cached is None:
                    waiting = self._inflight.get(name)
                    if waiting is None:
                        self._inflight[name] = threading.Event()
                        self.misses += 1
                        break
                else:
                    self.hits += 1
            if cached is not None:
                if isinstance(cached, ResolveError):
                    raise cached
                return cached
            waiting.wait()
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
        finally:
            with self._lock:
                self._inflight.pop(name).set()
        if isinstance(result, ResolveError):
            raise result
        return result

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


# --------------------------------------------------------------------------- address policy
class AddressPolicy:
    """Which resolved addresses may be connected to."""

    def __init__(self, allow: Iterable[str] = ()):
        self.allow = []
        for item in allow:
            try:
                self.allow.append(ipaddress.ip_network(str(item).strip(), strict=False))
            except ValueError:
                raise ConfigError(f"fetch.allow_addresses: '{item}' is not an IP address or network") from None

    def check(self, address: str) -> str | None:
        """None when ``address`` may be used, else why not."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return f"{address!r} is not an IP address"
        if any(ip.version == net.version and ip in net for net in self.allow):
            return None
        if ip.version == 6 and ip.ipv4_mapped is not None:
            mapped = ip.ipv4_mapped
            if any(net.version == 4 and mapped in net for net in self.allow):
                return None
            ip = mapped
        for flag in ("is_loopback", "is_private", "is_link_local", "is_multicast", "is_reserved",
                     "is_unspecified"):
            if getattr(ip, flag):
                return f"{address} is {flag[3:].replace('_', '-')}"
        if not ip.is_global:
            return f"{address} is not globally routable"
        return None


# --------------------------------------------------------------------------- results
class _Failure(Exception):
    def __init__(self, status: str, message: str):
        self.status = status
        self.message = message
        super().__init__(f"{status}: {message}")


class _Conn:
    """One pooled connection to a vetted address."""

    __slots__ = ("http", "key", "reused")

    def __init__(self, http_conn, key):
        self.http = http_conn
        self.key = key
        self.reused = False


def _pinned(conn: http.client.HTTPConnection, ip: str) -> http.client.HTTPConnection:
    """Make ``conn`` open its TCP connection to ``ip`` while Host / SNI keep the name."""

    def create_connection(address, timeout=None, source_address=None, *args, **kwargs):
        return socket.create_connection((ip, address[1]), timeout, source_address)

    conn._create_connection = create_connection  # type: ignore[attr-defined]
    return conn


def _opted_out(values: list[str], ua_token: str, directives: frozenset[str]) -> bool:
    for value in values:
        agent = None
        for item in value.split(","):
            item = item.strip().lower()
            if not item:
                continue
            if ":" in item:
                head, rest = (p.strip() for p in item.split(":", 1))
                if head not in _VALUED_DIRECTIVES:
                    agent, item = head, rest
            if (agent is None or agent == ua_token) and item in directives:
                return True
    return False


# --------------------------------------------------------------------------- fetcher
class ImageFetcher:
    """Batch callable: download + decode + resize the live rows of a batch."""

    def __init__(
        self,
        fetch_cfg: FetchConfig,
        resize_cfg: ResizeConfig,
        *,
        resolver: Resolver | None = None,
        keep_image_bytes: bool = False,
        url_filter: Callable[[str], str | None] | None = None,
    ):
        """``url_filter(url)`` names the block list holding a URL (or None); it is asked
        on every hop, so a redirect never leads to a block-listed URL."""
        self.cfg = fetch_cfg
        self.url_filter = url_filter
        self._policies = OriginCache(fetch_cfg.policy_cache_size)
        self.resize_cfg = resize_cfg
        self.keep_image_bytes = keep_image_bytes
        self.resolver = resolver or Resolver.from_config(fetch_cfg)
        self._dns = threading.local()  # seconds the current row spent resolving, per download thread
        self.policy = AddressPolicy(fetch_cfg.allow_addresses)
        self.formats = tuple(f.upper() for f in fetch_cfg.formats)
        self.opt_out_directives = frozenset(d.strip().lower() for d in fetch_cfg.opt_out_directives)
        self.ua_token = fetch_cfg.user_agent.split("/", 1)[0].split()[0].lower() if fetch_cfg.user_agent else ""
        self._headers = {
            "User-Agent": fetch_cfg.user_agent,
            "Accept": "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.8,*/*;q=0.5",
            "Accept-Encoding": "identity",
        }
        self._ssl = ssl.create_default_context()
        self._pool = ThreadPoolExecutor(max_workers=max(1, fetch_cfg.threads), thread_name_prefix="fetch")
        self._host_slots: dict[str, threading.BoundedSemaphore] = {}
        self._idle: dict[tuple, list[_Conn]] = {}
        self._lock = threading.Lock()
        self.stats: Counter = Counter()
        self._closed = False

    def _bump(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    # ------------------------------------------------------------------ batch
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = S.batch_len(batch)
        size = self.resize_cfg.image_size
        out = dict(batch)
        urls = batch.get(S.URL, np.full(n, "", dtype=object))
        drop = batch.get(S.DROP_REASON)
        drop = np.array([""] * n, dtype=object) if drop is None else np.array(drop, dtype=object, copy=True)
        status = np.full(n, SKIPPED, dtype=object)
        message = np.full(n, "", dtype=object)
        width = np.zeros(n, dtype=np.int32)
        height = np.zeros(n, dtype=np.int32)
        image = np.zeros((n, size, size, 3), dtype=np.uint8)
        blobs = np.full(n, b"", dtype=object) if self.keep_image_bytes else None
        dns_ms = np.zeros(n, dtype=np.int32)
        laion_form = self.cfg.url_form == "laion"
        final_urls = (np.array(urls, dtype=object, copy=True)
                      if self.cfg.url_after_redirects or laion_form else None)

        def work(i: int) -> None:
            st, msg = "success", ""
            self._dns.seconds = 0.0
            try:
                arr, w, h, final = self._fetch_image(urls[i])
                image[i] = arr
                width[i], height[i] = w, h
                if final_urls is not None and self.cfg.url_after_redirects:
                    final_urls[i] = final
                if blobs is not None:
                    blobs[i] = encode_image(arr, self.resize_cfg)
            except _Failure as exc:
                st, msg = exc.status, exc.message
            except ImageRejected as exc:
                st, msg = exc.status, exc.message
            except Exception as exc:  # noqa: BLE001 - one record never stops the batch
                logger.warning("unexpected error fetching %r", urls[i], exc_info=True)
                st, msg = "connection_error", f"unexpected {type(exc).__name__}: {exc}"
            status[i], message[i] = st, msg
            dns_ms[i] = int(round(self._dns.seconds * 1000))
            if st != "success":
                drop[i] = f"{STAGE}:{st}"

        live = [i for i in range(n) if not drop[i]]
        # one download per distinct URL of the batch (the same image under several alt texts
        # is common); the other rows get a copy of its result
        first: dict[str, int] = {}
        copies: list[tuple[int, int]] = []
        if self.cfg.dedup_urls_in_batch:
            todo = []
            for i in live:
                j = first.setdefault(urls[i], i)
                (todo.append(i) if j == i else copies.append((i, j)))
            live = todo
        if live:
            if self._closed:
                raise RuntimeError("ImageFetcher is closed")
            for _ in self._pool.map(work, live):
                pass
        for i, j in copies:
            status[i], message[i], drop[i] = status[j], message[j], drop[j]
            width[i], height[i], image[i] = width[j], height[j], image[j]
            if blobs is not None:
                blobs[i] = blobs[j]
            if final_urls is not None:
                final_urls[i] = final_urls[j]
        if copies:
            self.stats["url_reused"] += len(copies)
        if final_urls is not None:
            if laion_form:
                final_urls = np.array([laion_response_url(str(u)) for u in final_urls], dtype=object)
            changed = [i for i in range(n) if final_urls[i] != urls[i]]
            if changed:
                out[S.URL] = final_urls
                if S.HASH in batch and S.ALT_TEXT in batch:
                    hashes = np.array(batch[S.HASH], dtype=np.int64, copy=True)
                    for i in changed:
                        hashes[i] = S.pair_hash(str(final_urls[i]), str(batch[S.ALT_TEXT][i]))
                    out[S.HASH] = hashes
                self.stats["url_rewritten" if laion_form else "url_after_redirects"] += len(changed)
        out[S.STATUS] = status
        out[S.ERROR_MESSAGE] = message
        out[DNS_MS] = dns_ms
        out[S.WIDTH] = width
        out[S.HEIGHT] = height
        out[S.IMAGE] = image
        if blobs is not None:
            out[S.IMAGE_BYTES] = blobs
        out[S.DROP_REASON] = drop
        return out

    def fetch_image(self, url) -> tuple[np.ndarray, int, int]:
        """Download and decode one URL; raises ``_Failure`` / ``ImageRejected``."""
        return self._fetch_image(url)[:3]

    def _fetch_image(self, url) -> tuple[np.ndarray, int, int, str]:
        """``(image, width, height, URL after redirects)``; raises ``_Failure`` / ``ImageRejected``."""
        data, final = self._fetch_with_url(url)
        if len(data) < self.cfg.min_bytes:
            raise _Failure("too_small_bytes", f"{len(data)} bytes is less than {self.cfg.min_bytes}")
        arr, w, h = decode_and_resize(
            data,
            self.resize_cfg,
            max_pixels=self.cfg.max_pixels,
            min_size=self.cfg.min_image_size,
            formats=self.formats,
            accept_truncated=self.cfg.accept_truncated,
        )
        return arr, w, h, final

    # ------------------------------------------------------------------ download
    def fetch_bytes(self, url) -> bytes:
        """The body of ``url`` after redirects, with retries for transient failures."""
        return self._fetch_with_url(url)[0]

    def _fetch_with_url(self, url) -> tuple[bytes, str]:
        """``(body, URL it was read from after redirects)``, with retries for transient failures."""
        if not isinstance(url, str) or not url:
            raise _Failure("bad_url", f"not a URL: {url!r}")
        attempts = max(0, self.cfg.retries) + 1
        for attempt in range(attempts):
            try:
                return self._attempt(url)
            except _Failure as exc:
                if attempt + 1 >= attempts or not is_transient(exc.status):
                    raise
                self._bump("retries")
                delay = self.cfg.retry_backoff_s * (2 ** attempt)
                logger.debug("retrying %s after %s (%.2fs)", url, exc.status, delay)
                if delay > 0:
                    time.sleep(delay)
        raise AssertionError("unreachable")

    def _attempt(self, url: str, policy_file: bool = False) -> tuple[bytes, str]:
        """One download with its redirects: ``(body, final URL)``; ``policy_file``: an opt-out
        file, not an image."""
        deadline = time.monotonic() + self.cfg.timeout_s
        current = url
        for hop in range(self.cfg.max_redirects + 1):
            target = self._vet(current)
            if not policy_file:
                started = time.monotonic()
                self._check_opt_outs(current, target)
                deadline += time.monotonic() - started  # opt-out files do not eat the image's time
            slot = self._slot(target[1])
            with slot:
                location = self._request(target, deadline, policy_file)
            if isinstance(location, bytes):
                return location, current
            current = urljoin(current, location)
        raise _Failure("too_many_redirects", f"more than {self.cfg.max_redirects} redirects")

    def _vet(self, url: str) -> tuple[str, str, int, str, tuple[str, ...]]:
        """Check scheme, host and addresses of one hop BEFORE any connection."""
        try:
            parts = urlsplit(url.strip())
            scheme = parts.scheme.lower()
            if scheme not in ("http", "https"):
                raise _Failure("bad_scheme", f"scheme {scheme or '(none)'!r} is not fetched")
            host = parts.hostname or ""
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError as exc:
            raise _Failure("bad_url", f"{url[:200]!r}: {exc}") from None
        if not host:
            raise _Failure("bad_url", f"no host in {url[:200]!r}")
        try:
            host = host.encode("idna").decode("ascii") if not host.isascii() else host
        except UnicodeError as exc:
            raise _Failure("bad_url", f"host {host!r}: {exc}") from None
        started = time.monotonic()
        try:
            addresses = self.resolver.resolve(host)
        except ResolveError as exc:
            raise _Failure("dns_error", str(exc)) from None
        finally:
            self._dns.seconds = getattr(self._dns, "seconds", 0.0) + time.monotonic() - started
        for address in addresses:
            reason = self.policy.check(address)
            if reason is not None:
                self._bump("blocked")
                raise _Failure("blocked_address", f"{host} -> {reason}")
        path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
        if parts.query:
            path += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
        return scheme, host, port, path, addresses

    def _slot(self, host: str) -> threading.BoundedSemaphore:
        with self._lock:
            slot = self._host_slots.get(host)
            if slot is None:
                slot = threading.BoundedSemaphore(max(1, self.cfg.per_host_concurrency))
                self._host_slots[host] = slot
            return slot

    # ------------------------------------------------------------------ opt-out files
    def _check_opt_outs(self, url: str, target) -> None:
        """Block lists, tdmrep.json and robots.txt for one hop; raises ``_Failure``."""
        if self.url_filter is not None:
            name = self.url_filter(url)
            if name:
                raise _Failure(f"blocklisted:{name}", f"{url[:200]} is on block list {name}")
        if not (self.cfg.honour_tdmrep_json or self.cfg.honour_robots_txt):
            return
        scheme, host, port, path, _ = target
        if self.cfg.honour_tdmrep_json:
            rules = self._policies.get(("tdmrep", scheme, host, port),
                                       lambda: parse_tdmrep(self._policy_file(scheme, host, port, TDMREP_PATH)[1]))
            rule = tdm_reserved(rules, path.split("?", 1)[0])
            if rule is not None:
                raise _Failure("opt_out_tdmrep", f"{TDMREP_PATH}: location {rule.location!r} reserved"
                               + (f" (policy {rule.policy})" if rule.policy else ""))
        if self.cfg.honour_robots_txt:
            robots: RobotsRules = self._policies.get(("robots", scheme, host, port),
                                                     lambda: parse_robots(*self._policy_file(scheme, host, port,
                                                                                             ROBOTS_PATH)))
            if not robots.allowed(self.ua_token or "*", path):
                raise _Failure("opt_out_robots_txt", robots.note or f"{ROBOTS_PATH} disallows {path[:200]}")

    def _policy_file(self, scheme: str, host: str, port: int, path: str) -> tuple[int | None, bytes]:
        """(HTTP status, body) of an opt-out file; status None when the host cannot be reached."""
        netloc = f"[{host}]" if ":" in host else host
        url = f"{scheme}://{netloc}:{port}{path}"
        self._bump("policy_fetches")
        try:
            return 200, self._attempt(url, policy_file=True)[0]
        except _Failure as exc:
            if exc.status.startswith("http_error_") and exc.status[11:].isdigit():
                return int(exc.status[11:]), b""
            if exc.status == "too_large_bytes":
                return 200, b""
            logger.debug("opt-out file %s: %s", url, exc)
            return None, b""
        except Exception:  # noqa: BLE001 - an opt-out file never stops the batch
            logger.warning("unexpected error fetching %s", url, exc_info=True)
            return None, b""

    def _request(self, target, deadline: float, policy_file: bool = False) -> bytes | str:
        """One HTTP exchange; returns the body (bytes) or a redirect location (str)."""
        scheme, host, port, path, addresses = target
        for fresh_try in range(2):
            conn = self._checkout(scheme, host, port, addresses, deadline, fresh=fresh_try > 0)
            try:
                self._set_timeout(conn, deadline)
                conn.http.request("GET", path, headers=self._headers)
                resp = conn.http.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                conn.http.close()
                if conn.reused:
                    continue  # a kept-alive connection the server had closed: open a new one
                raise _Failure("connection_error", f"{type(exc).__name__}: {exc}") from None
            except Exception as exc:  # noqa: BLE001
                conn.http.close()
                raise self._net_failure(exc) from None
            try:
                return self._response(conn, resp, deadline, policy_file)
            except BaseException:
                conn.http.close()
                raise
        raise _Failure("connection_error", "connection closed by the server")

    def _response(self, conn: _Conn, resp: http.client.HTTPResponse, deadline: float,
                  policy_file: bool = False) -> bytes | str:
        code = resp.status
        if code in _REDIRECTS:
            location = resp.getheader("Location")
            self._discard(conn, resp, deadline)
            if not location:
                raise _Failure(f"http_error_{code}", f"HTTP {code} without Location")
            return location
        if not 200 <= code < 300:
            self._discard(conn, resp, deadline)
            raise _Failure(f"http_error_{code}", f"HTTP {code} {resp.reason}".strip())
        if self.cfg.honour_opt_out and self.opt_out_directives and not policy_file:
            tags = resp.headers.get_all("X-Robots-Tag") or []
            if tags and _opted_out(tags, self.ua_token, self.opt_out_directives):
                conn.http.close()
                raise _Failure("opt_out", f"X-Robots-Tag: {'; '.join(tags)[:200]}")
        if self.cfg.honour_tdm_header and not policy_file:
            reservation = resp.headers.get_all("tdm-reservation") or []
            if reservation and tdm_header_reserved(reservation):
                conn.http.close()
                raise _Failure("opt_out_tdm_header", f"tdm-reservation: {'; '.join(reservation)[:200]}")
        limit = self.cfg.policy_max_bytes if policy_file else self.cfg.max_bytes
        declared = resp.getheader("Content-Length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    conn.http.close()
                    raise _Failure("too_large_bytes", f"Content-Length {declared} > {limit}")
            except ValueError:
                pass
        body = self._read_body(resp, limit, deadline, conn)
        if resp.will_close:
            conn.http.close()
        else:
            self._checkin(conn)
        return body

    def _read_body(self, resp, limit: int, deadline: float, conn: _Conn) -> bytes:
        parts = []
        total = 0
        try:
            while True:
                self._set_timeout(conn, deadline)
                chunk = resp.read(min(_READ_CHUNK, limit + 1 - total))
                if not chunk:
                    break
                parts.append(chunk)
                total += len(chunk)
                if total > limit:
                    conn.http.close()
                    raise _Failure("too_large_bytes", f"body larger than {limit} bytes")
        except _Failure:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._net_failure(exc) from None
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _discard(self, conn: _Conn, resp, deadline: float) -> None:
        """Drop a small error / redirect body so the connection can be reused."""
        length = resp.getheader("Content-Length")
        if resp.will_close or length is None or not length.isdigit() or int(length) > 65536:
            conn.http.close()
            return
        try:
            self._set_timeout(conn, deadline)
            resp.read()
            self._checkin(conn)
        except Exception:  # noqa: BLE001
            conn.http.close()

    @staticmethod
    def _set_timeout(conn: _Conn, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Failure("timeout", "time limit reached")
        conn.http.timeout = remaining
        if conn.http.sock is not None:
            conn.http.sock.settimeout(remaining)

    def _net_failure(self, exc: BaseException) -> _Failure:
        if isinstance(exc, _Failure):
            return exc
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return _Failure("timeout", f"no answer within {self.cfg.timeout_s}s")
        if isinstance(exc, ssl.SSLError):
            return _Failure("connection_error", f"TLS: {exc}")
        return _Failure("connection_error", f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ connections
    def _checkout(self, scheme, host, port, addresses, deadline, fresh: bool) -> _Conn:
        if self.cfg.keep_alive and not fresh:
            for ip in addresses:
                key = (scheme, host, port, ip)
                with self._lock:
                    idle = self._idle.get(key)
                    conn = idle.pop() if idle else None
                if conn is not None:
                    conn.reused = True
                    self._bump("connections_reused")
                    return conn
        last: BaseException | None = None
        for ip in addresses:  # every one of them was vetted
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Failure("timeout", "time limit reached while connecting")
            if scheme == "https":
                hc = http.client.HTTPSConnection(host, port, timeout=remaining, context=self._ssl)
            else:
                hc = http.client.HTTPConnection(host, port, timeout=remaining)
            _pinned(hc, ip)
            try:
                hc.connect()
            except Exception as exc:  # noqa: BLE001
                hc.close()
                last = exc
                continue
            self._bump("connections_opened")
            return _Conn(hc, (scheme, host, port, ip))
        raise self._net_failure(last or OSError("no address"))

    def _checkin(self, conn: _Conn) -> None:
        if not self.cfg.keep_alive or self._closed:
            conn.http.close()
            return
        with self._lock:
            idle = self._idle.setdefault(conn.key, [])
            if len(idle) < max(1, self.cfg.per_host_concurrency):
                idle.append(conn)
                return
        conn.http.close()

    def close(self) -> None:
        """Stop the thread pool and close kept-alive connections."""
        self._closed = True
        self._pool.shutdown(wait=True)
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for c in conns:
            c.http.close()

    def __enter__(self) -> "ImageFetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            if not self._closed:
                self._pool.shutdown(wait=False)
        except Exception:  # noqa: BLE001
            pass


# --------------------------------------------------------------------------- counters
def fetch_counters(batch: Mapping[str, np.ndarray]) -> StageCounters:
    """Counters of one fetched batch: successes kept, failures by status."""
    counters = StageCounters()
    statuses = batch.get(S.STATUS)
    if statuses is None:
        return counters
    counts = Counter(str(s) for s in statuses)
    skipped = counts.pop(SKIPPED, 0)
    counters.kept = counts.pop("success", 0)
    for status, n in counts.items():
        counters.drop(status, n)
    counters.count("rows", len(statuses))
    counters.count("attempted", len(statuses) - skipped)
    counters.count("skipped", skipped)
    return counters.merge(dns_counters(batch))


def dns_counters(batch: Mapping[str, np.ndarray]) -> StageCounters:
    """DNS counters of one fetched batch: ``dns_ms`` (milliseconds spent resolving, summed
    over rows) and ``dns_error:<reason>`` (failed rows by :data:`DNS_REASONS`)."""
    counters = StageCounters()
    statuses = batch.get(S.STATUS)
    if statuses is None:
        return counters
    ms = batch.get(DNS_MS)
    if ms is not None:
        counters.count("dns_ms", int(np.asarray(ms, dtype=np.int64).sum()))
    messages = batch.get(S.ERROR_MESSAGE)
    if messages is not None:
        for status, message in zip(statuses, messages):
            if status == "dns_error":
                reason = str(message).partition(":")[0]
                counters.count(f"dns_error:{reason if reason in DNS_REASONS else 'error'}")
    return counters


__all__ = [
    "AddressPolicy",
    "DNS_MS",
    "DNS_REASONS",
    "ImageFetcher",
    "ResolveError",
    "Resolver",
    "STATUSES",
    "dns_counters",
    "dns_failure_reason",
    "fetch_counters",
    "is_transient",
    "parse_ip_literal",
]
