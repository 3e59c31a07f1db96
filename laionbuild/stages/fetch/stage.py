"""The fetch stage: download the live rows of a batch, decode and resize them.

See the package documentation (:mod:`laionbuild.stages.fetch`) for the statuses,
the safety model and the columns. :class:`ImageFetcher` is built once per worker;
``fetcher(batch)`` returns the batch with every row fetched, in order;
``fetcher.stream(batches)`` keeps ``fetch.threads`` downloads in flight over
several batches and yields the rows as they complete, so that a slow URL holds
back no other row.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import queue
import ssl
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable, Iterable, Iterator, Mapping
from urllib.parse import quote, urlsplit

import numpy as np

from ... import schema as S
from ...config import FetchConfig, ResizeConfig
from ...stats import StageCounters
from ..optout import (
    ROBOTS_KEEP_S,
    ROBOTS_MAX_REDIRECTS,
    ROBOTS_PATH,
    TDMREP_PATH,
    OriginCache,
    RobotsRules,
    parse_robots,
    parse_tdmrep,
    tdm_header_reserved,
    tdm_reserved,
    unreadable,
)
from ..isolate import ChildDied, CpuWatch, IsolatedCalls, over_cpu_limit
from ..resize import ImageRejected, PixelBudget, decode_and_resize, encode_image
from ..url_normalization import laion_response_url
from ..candidates import clean_url, resolve_url
from ..warc import decompress_content
from ...remote import parse_retry_after
from .dns import DNS_MS, DNS_REASONS, ResolveError, Resolver
from .hosts import MAX_PAUSE_S, HostTurns, host_key, origin_key, url_host
from .http import Conn, ConnectionPool, FetchFailure, net_failure, set_timeout
from .policy import AddressPolicy

logger = logging.getLogger(__name__)

STAGE = "fetch"
SKIPPED = "skipped"
STATUSES = (
    "success", "timeout", "connection_error", "dns_error", "too_many_redirects", "too_large_bytes",
    "opt_out", "opt_out_tdm_header", "opt_out_tdmrep", "opt_out_robots_txt", "blocked_address", "bad_scheme",
    "bad_url", "not_an_image", "decode_error", "too_small", "too_large_pixels", "unsupported_format",
    "too_small_bytes", "decoder_crashed", "too_many_scans", "decode_timeout", "robots_txt_unavailable",
    "host_unreachable",
)  # plus http_error_<code> and blocklisted:<list>

#: per-row columns counting the connections and DNS work of the row's download; summed into
#: the stage's counters (stats.json) by :func:`fetch_counters` under the key named here
IO_COLUMNS = {
    "connections_opened": "fetch_connections_opened",
    "connections_reused": "fetch_connections_reused",
    "dns_lookups": "fetch_dns_lookups",
    "dns_cache_hits": "fetch_dns_cache_hits",
}

_REDIRECTS = (301, 302, 303, 307, 308)
# X-Robots-Tag directives that carry a value after a colon (not a user-agent prefix)
_VALUED_DIRECTIVES = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}


#: what a kept-alive connection that the server had closed raises at the next request
_STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


def is_transient(status: str) -> bool:
    """Failures worth retrying: timeouts, connection errors, 5xx and 429."""
    if status in ("timeout", "connection_error", "http_error_429"):
        return True
    return status.startswith("http_error_5")


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


class _Row:
    """The outcome of one row's download."""

    __slots__ = ("status", "message", "pixels", "width", "height", "final_url", "blob", "dns_ms", "io", "waits")

    def __init__(self, status: str = SKIPPED, message: str = ""):
        self.status, self.message = status, message
        self.pixels: bytes | None = None
        self.width = self.height = self.dns_ms = 0
        self.final_url: str | None = None
        self.blob = b""
        #: connections opened, reused; names looked up, answered from the cache (IO_COLUMNS)
        self.io = (0, 0, 0, 0)
        #: the next try waits for a host that asked to be left alone (counted against its budget)
        self.waits = False

    def shared(self) -> "_Row":
        """This outcome for another row of the same URL: its download's connections, lookups and
        lookup time are counted on this row only."""
        other = _Row(self.status, self.message)
        other.pixels, other.width, other.height = self.pixels, self.width, self.height
        other.final_url, other.blob = self.final_url, self.blob
        return other


class _Pending:
    """One input batch whose rows are being downloaded."""

    __slots__ = ("batch", "n", "rows", "copies", "left")

    def __init__(self, batch: Mapping[str, np.ndarray]):
        self.batch = batch
        self.n = S.batch_len(batch)
        self.rows: list[_Row | None] = [None] * self.n
        self.copies: dict[int, list[int]] = {}  # row downloaded -> rows of the same URL that share it
        self.left = 0


# --------------------------------------------------------------------------- fetcher
class ImageFetcher:
    """Download + decode + resize the live rows of batches (see the module documentation)."""

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
        self.connections = ConnectionPool(keep_alive=fetch_cfg.keep_alive,
                                          max_idle=fetch_cfg.per_host_concurrency, timeout_s=fetch_cfg.timeout_s,
                                          ssl_context=ssl.create_default_context())
        self._pool = ThreadPoolExecutor(max_workers=max(1, fetch_cfg.threads), thread_name_prefix="fetch")
        self.pixel_budget = PixelBudget(fetch_cfg.decode_budget_pixels)
        self._host_slots: dict[str, threading.BoundedSemaphore] = {}
        # a row waits for its host's turn (and for a retry's time) here, not on a download thread
        self._turns = HostTurns(self._pool.submit, fetch_cfg.per_host_concurrency)
        self._lock = threading.Lock()
        self._stats: Counter = Counter()
        self._closed = False
        self._isolated: IsolatedCalls | None = None
        self._watch: CpuWatch | None = None

    def end_process_when_stuck(self, on_stuck: Callable[[str, float], None] | None = None) -> None:
        """From now on, an image whose decode uses more than ``fetch.decode_cpu_limit_s`` of CPU
        time ends this process (``on_stuck(url, seconds)`` instead, when given). A fetch worker
        of a run calls this: a decoder stuck in native code cannot be stopped from its thread,
        and the worker would hold that batch for ever. Ray restarts the process, and the
        restarted worker decodes in child processes (:meth:`isolate_decoding`) that the kernel
        stops at the limit: the image becomes a ``decode_timeout`` row."""
        limit = self.cfg.decode_cpu_limit_s
        if limit > 0 and self._watch is None and self._isolated is None:
            self._watch = CpuWatch(limit, on_stuck or _end_process)

    def isolate_decoding(self, workers: int | None = None) -> None:
        """Decode every image from now on in child processes (:mod:`..isolate`): an image whose
        decoder kills its process is a ``decoder_crashed`` row, not a dead worker. A worker that
        Ray restarted after its process died calls this (:func:`laionbuild.runner.adapter.actor_restarted`):
        the work it gets again may hold the image that killed it. ``workers``: child processes
        (default: up to 4, no more than the machine's CPUs); each decodes one image at a time."""
        if self._isolated is None:
            self._isolated = IsolatedCalls(workers or max(1, min(4, os.cpu_count() or 1)),
                                           cpu_limit_s=self.cfg.decode_cpu_limit_s or None)
            logger.warning("this fetch worker was restarted after its process died: it decodes images in "
                           "child processes from now on, so that an image that crashes its decoder is "
                           "reported as decoder_crashed, and one whose decode does not end as decode_timeout")

    @property
    def stats(self) -> Counter:
        """This worker's counters: retries, URLs shared, connections opened and reused..."""
        with self._lock:
            return self._stats + self.connections.stats

    def _bump(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._stats[name] += n

    # ------------------------------------------------------------------ batches
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every row of ``batch`` fetched, in order."""
        done: queue.SimpleQueue = queue.SimpleQueue()
        pend = self._start(batch, done)
        while pend.left:
            self._settle(done.get(), done)
        return self._assemble(pend, np.arange(pend.n))

    def stream(self, batches: Iterable[Mapping[str, np.ndarray]], emit_rows: int | None = None,
               emit_after_s: float | None = None) -> Iterator[dict[str, np.ndarray]]:
        """The rows of ``batches``, fetched with every download thread busy, in batches of rows
        that completed: a batch is yielded once ``emit_rows`` rows (default ``fetch.batch_size``)
        are done, or once its first row has waited ``emit_after_s`` (``fetch.emit_after_s``), or
        at the end. At most ``fetch.batches_in_flight`` input batches are read ahead.
        Rows keep their columns; their order changes (each carries its own identity)."""
        emit_rows = max(1, int(emit_rows or self.cfg.batch_size))
        wait_s = self.cfg.emit_after_s if emit_after_s is None else emit_after_s
        ahead = max(1, self.cfg.batches_in_flight)
        done: queue.SimpleQueue = queue.SimpleQueue()
        source = iter(batches)
        exhausted = False
        open_batches: set[int] = set()  # ids of batches with rows still downloading
        ready: list[tuple[_Pending, int]] = []
        first_ready = 0.0
        while True:
            while not exhausted and len(open_batches) < ahead:
                try:
                    batch = next(source)
                except StopIteration:
                    exhausted = True
                    break
                pend = self._start(batch, done)
                if pend.left:
                    open_batches.add(id(pend))
                before = len(ready)
                ready.extend((pend, i) for i in range(pend.n) if pend.rows[i] is not None)
                if ready and not before:
                    first_ready = time.monotonic()
            if ready and (len(ready) >= emit_rows or not open_batches
                          or time.monotonic() - first_ready >= wait_s):
                chunk, ready = ready[:emit_rows], ready[emit_rows:]
                first_ready = time.monotonic()
                yield self._assemble_rows(chunk)
                continue
            if not open_batches:
                if exhausted:
                    return
                continue
            timeout = max(0.0, first_ready + wait_s - time.monotonic()) if ready else None
            try:
                item = done.get(timeout=timeout)
            except queue.Empty:
                continue
            pend = item[0]
            settled = self._settle(item, done)
            if settled:
                if not ready:
                    first_ready = time.monotonic()
                ready.extend((pend, i) for i in settled)
            if not pend.left:
                open_batches.discard(id(pend))

    def _start(self, batch: Mapping[str, np.ndarray], done: queue.SimpleQueue) -> _Pending:
        """Submit the downloads of a batch; rows dropped earlier are settled at once."""
        if self._closed:
            raise RuntimeError("ImageFetcher is closed")
        pend = _Pending(batch)
        urls = batch.get(S.URL)
        drop = batch.get(S.DROP_REASON)
        first: dict = {}
        todo = []
        for i in range(pend.n):
            if drop is not None and drop[i]:
                pend.rows[i] = _Row()
                continue
            url = urls[i] if urls is not None else ""
            if self.cfg.dedup_urls_in_batch:
                j = first.setdefault(url, i)
                if j != i:
                    pend.copies.setdefault(j, []).append(i)
                    pend.left += 1
                    continue
            todo.append((i, url))
        pend.left += len(todo)
        for i, url in todo:
            self._turns.submit(url_host(url), partial(self._work, pend, i, url, done))
        return pend

    def _work(self, pend: _Pending, i: int, url, done: queue.SimpleQueue, attempt: int = 0,
              before: _Row | None = None, waited: float = 0.0) -> None:
        """One attempt at a row; a row to be tried again waits for its time on the host's turns.
        ``waited``: seconds the row has waited so far for hosts that asked to be left alone."""
        try:
            row, again_in, next_attempt = self._fetch_row(url, attempt, waited)
        except BaseException as exc:  # noqa: BLE001 - the row must settle whatever happens
            row, again_in, next_attempt = _Row("connection_error", f"unexpected {type(exc).__name__}: {exc}"), None, 0
        if before is not None:  # the connections and lookups of its earlier attempts
            row.dns_ms += before.dns_ms
            row.io = tuple(a + b for a, b in zip(row.io, before.io))
        if again_in is not None and not self._closed:
            waited += again_in if row.waits else 0.0
            self._turns.later(again_in, url_host(url),
                              partial(self._work, pend, i, url, done, next_attempt, row, waited))
            return
        done.put((pend, i, row))

    def _settle(self, item, done) -> list[int]:
        """Record a finished download (and the rows sharing its URL); returns the rows settled."""
        pend, i, row = item
        pend.rows[i] = row
        settled = [i] + pend.copies.pop(i, [])
        for j in settled[1:]:  # the same answer; the download's connections and lookups are counted once
            pend.rows[j] = row.shared()
        if len(settled) > 1:
            self._bump("url_reused", len(settled) - 1)
        pend.left -= len(settled)
        return settled

    def _fetch_row(self, url, attempt: int = 0, waited: float = 0.0) -> tuple[_Row, float | None, int]:
        """Download, decode and resize one URL, once; never raises. Returns the row, the seconds
        after which to try again (None: the row is settled) and that try's attempt number."""
        row = _Row("success")
        again: tuple[float | None, int] = (None, 0)
        self._dns.seconds = 0.0
        self.connections.take_row_counts()
        self.resolver.take_row_counts()
        try:
            arr, w, h, final = self._fetch_image(url)
            row.pixels = np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
            row.width, row.height, row.final_url = w, h, final
            if self.keep_image_bytes:
                row.blob = encode_image(arr, self.resize_cfg)
        except FetchFailure as exc:
            row.status, row.message = exc.status, _printable(exc.message)
            again = self._again(url, exc, attempt, waited)
            row.waits = again[0] is not None and (exc.wait_s is not None or exc.retry_after is not None)
        except ImageRejected as exc:
            row.status, row.message = exc.status, _printable(exc.message)
        except Exception as exc:  # noqa: BLE001 - one record never stops the batch
            logger.warning("unexpected error fetching %r", url, exc_info=True)
            row.status, row.message = "connection_error", f"unexpected {type(exc).__name__}: {exc}"
        row.dns_ms = int(round(self._dns.seconds * 1000))
        row.io = self.connections.take_row_counts() + self.resolver.take_row_counts()
        return row, *again

    def _again(self, url, exc: FetchFailure, attempt: int, waited: float = 0.0) -> tuple[float | None, int]:
        """When a failed attempt is tried again: ``(seconds from now, its attempt number)``, or
        ``(None, 0)``. A host that asked to wait (``Retry-After``) is waited for while the row's
        waits for it, all together, stay within ``fetch.max_retry_after_s`` (``waited``: so far);
        rows that sent nothing meanwhile keep their attempts."""
        limit = self.cfg.max_retry_after_s - waited
        if exc.wait_s is not None:  # nothing was sent: the host is paused
            return (exc.wait_s, attempt) if exc.wait_s <= limit else (None, 0)
        if attempt >= max(0, self.cfg.retries) or not is_transient(exc.status):
            return None, 0
        if exc.retry_after is not None and exc.retry_after > limit:
            return None, 0
        delay = self.cfg.retry_backoff_s * (2 ** attempt)
        if exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        self._bump("retries")
        logger.debug("retrying %s after %s (%.2fs)", url, exc.status, delay)
        return delay, attempt + 1

    def _assemble_rows(self, chunk: list[tuple[_Pending, int]]) -> dict[str, np.ndarray]:
        """One output batch from settled rows of (possibly) several input batches."""
        groups: dict[int, tuple[_Pending, list[int]]] = {}
        for pend, i in chunk:
            groups.setdefault(id(pend), (pend, []))[1].append(i)
        parts = [self._assemble(pend, np.asarray(idx, dtype=np.int64)) for pend, idx in groups.values()]
        if len(parts) == 1:
            return parts[0]
        keys = set(parts[0])
        if any(set(p) != keys for p in parts[1:]):  # batches of different columns: keep what all have
            keys = set.intersection(*(set(p) for p in parts))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k in keys}

    def _assemble(self, pend: _Pending, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``idx`` of a batch (all settled) with the fetch columns added."""
        batch = pend.batch
        k = len(idx)
        whole = k == pend.n and bool(np.all(idx == np.arange(pend.n)))
        out = {name: (np.asarray(col) if whole else np.asarray(col)[idx]) for name, col in batch.items()}
        rows = [pend.rows[i] for i in idx]
        status = np.array([r.status for r in rows], dtype=object)
        drop = (np.array(out[S.DROP_REASON], dtype=object, copy=True) if S.DROP_REASON in out
                else np.full(k, "", dtype=object))
        for j, r in enumerate(rows):
            if r.status != SKIPPED and r.status != "success":
                drop[j] = f"{STAGE}:{r.status}"
        laion_form = self.cfg.url_form == "laion"
        if (self.cfg.url_after_redirects or laion_form) and S.URL in out:
            urls = np.array(out[S.URL], dtype=object, copy=True)
            final = [r.final_url if self.cfg.url_after_redirects and r.final_url is not None else urls[j]
                     for j, r in enumerate(rows)]
            if laion_form:  # the URL as LAION-5B's downloader reported it, redirected or not
                final = [laion_response_url(str(u)) for u in final]
            changed = [j for j in range(k) if final[j] != urls[j]]
            if changed:
                for j in changed:
                    urls[j] = final[j]
                out[S.URL] = urls
                if S.HASH in out and S.ALT_TEXT in out:
                    hashes = np.array(out[S.HASH], dtype=np.int64, copy=True)
                    for j in changed:
                        hashes[j] = S.pair_hash(str(urls[j]), str(out[S.ALT_TEXT][j]))
                    out[S.HASH] = hashes
                self._bump("url_rewritten" if laion_form else "url_after_redirects", len(changed))
        out[S.STATUS] = status
        out[S.ERROR_MESSAGE] = np.array([r.message for r in rows], dtype=object)
        out[DNS_MS] = np.array([r.dns_ms for r in rows], dtype=np.int32)
        for c, column in enumerate(IO_COLUMNS.values()):
            out[column] = np.array([r.io[c] for r in rows], dtype=np.int16)
        out[S.WIDTH] = np.array([r.width for r in rows], dtype=np.int32)
        out[S.HEIGHT] = np.array([r.height for r in rows], dtype=np.int32)
        # resized RGB pixels of successful rows only; a failed row carries nothing
        pixels = np.empty(k, dtype=object)
        pixels[:] = [r.pixels for r in rows]
        out[S.IMAGE] = pixels
        if self.keep_image_bytes:
            blobs = np.empty(k, dtype=object)
            blobs[:] = [r.blob for r in rows]
            out[S.IMAGE_BYTES] = blobs
        out[S.DROP_REASON] = drop
        return out

    def _fetch_image(self, url) -> tuple[np.ndarray, int, int, str]:
        """``(image, width, height, URL after redirects)``; raises ``FetchFailure`` / ``ImageRejected``."""
        data, final = self._fetch_with_url(url)
        if len(data) < self.cfg.min_bytes:
            raise FetchFailure("too_small_bytes", f"{len(data)} bytes is less than {self.cfg.min_bytes}")
        limits = dict(max_pixels=self.cfg.max_pixels, min_size=self.cfg.min_image_size, formats=self.formats,
                      accept_truncated=self.cfg.accept_truncated, max_scans=self.cfg.max_jpeg_scans)
        if self._isolated is None:
            with self._watch.watching(url) if self._watch is not None else contextlib.nullcontext():
                arr, w, h = decode_and_resize(data, self.resize_cfg, budget=self.pixel_budget, **limits)
            return arr, w, h, final
        try:  # each child decodes one image at a time: no shared pixel budget is needed
            arr, w, h = self._isolated(decode_and_resize, data, self.resize_cfg, **limits)
        except ChildDied as exc:
            if over_cpu_limit(exc):
                raise ImageRejected("decode_timeout", f"decoding used more than {self.cfg.decode_cpu_limit_s:g} "
                                                      "CPU-seconds") from None
            raise ImageRejected("decoder_crashed", f"the decoder's process {exc}") from None
        return arr, w, h, final

    # ------------------------------------------------------------------ download
    def _fetch_with_url(self, url) -> tuple[bytes, str]:
        """``(body, URL it was read from after redirects)``: one attempt (:meth:`_work` retries)."""
        if not isinstance(url, str) or not url:
            raise FetchFailure("bad_url", f"not a URL: {url!r}")
        return self._attempt(url)

    def _attempt(self, url: str, policy_file: bool = False) -> tuple[bytes, str]:
        """One download with its redirects: ``(body, final URL)``; ``policy_file``: an opt-out
        file, not an image."""
        deadline = time.monotonic() + self.cfg.timeout_s
        current = url
        # RFC 9309 asks for at least five redirects of a robots.txt, whatever images get
        limit = ROBOTS_MAX_REDIRECTS if policy_file else self.cfg.max_redirects
        redirect: int | None = None  # the status of the redirect that led to this hop
        for hop in range(limit + 1):
            try:
                target = self._vet(current, deadline)
            except FetchFailure as exc:
                if redirect is not None and exc.status in _NOT_FOLLOWED:
                    exc.redirect_status = redirect  # a redirect that cannot be followed
                raise
            host = host_key(target[1])
            # what a server says of itself holds for its origin: another port may be another server
            origin = origin_key(*target[:3])
            paused = self._turns.paused(origin)
            if paused is not None:  # before its opt-out files too: nothing is asked of it
                left, status = paused
                raise FetchFailure(status, f"{origin} asked to be left alone (Retry-After) for {left:.0f}s more",
                                   wait_s=left)
            down = self._turns.down(origin)
            if down is not None:
                left, why = down
                raise FetchFailure("host_unreachable", f"{origin}: {why}; not asked again for {left:.0f}s")
            if not policy_file:
                started = time.monotonic()
                self._check_opt_outs(current, target)
                deadline += time.monotonic() - started  # opt-out files do not eat the image's time
            slot = self._slot(host)
            waiting = time.monotonic()
            with slot:
                deadline += time.monotonic() - waiting  # waiting for the host's turn is no server time
                try:
                    location = self._request(target, deadline, policy_file)
                except FetchFailure as exc:
                    if exc.retry_after is not None:  # the origin's other rows wait too
                        self._turns.pause(origin, exc.retry_after, exc.status)
                    if exc.status in _NO_ANSWER:
                        self._turns.failed(origin, exc.status, self.cfg.host_down_after, self.cfg.host_down_s)
                    elif exc.status.startswith("http_error_"):
                        self._turns.answered(origin)
                    raise
                self._turns.answered(origin)
            if isinstance(location, bytes):
                return location, current
            redirect = location.status
            try:  # urljoin parses the Location: a malformed one (``//[::1/x``) raises here
                current = resolve_url(clean_url(_location_text(location)), current)
            except ValueError as exc:
                raise FetchFailure("bad_url", f"Location {location[:200]!r}: {exc}",
                                   redirect_status=redirect) from None
        raise FetchFailure("too_many_redirects", f"more than {limit} redirects", redirect_status=redirect)

    def _vet(self, url: str, deadline: float | None = None) -> tuple[str, str, int, str, tuple[str, ...]]:
        """Check scheme, host and addresses of one hop BEFORE any connection; the host's
        lookup ends at ``deadline``."""
        try:
            parts = urlsplit(url.strip())
            scheme = parts.scheme.lower()
            if scheme not in ("http", "https"):
                raise FetchFailure("bad_scheme", f"scheme {scheme or '(none)'!r} is not fetched")
            host = parts.hostname or ""
            port = parts.port
        except ValueError as exc:
            raise FetchFailure("bad_url", f"{url[:200]!r}: {exc}") from None
        if port is None:
            port = 443 if scheme == "https" else 80
        elif port == 0:  # no server listens on port 0 (a connection to it goes nowhere)
            raise FetchFailure("bad_url", f"port 0 in {url[:200]!r}")
        if not host:
            raise FetchFailure("bad_url", f"no host in {url[:200]!r}")
        try:
            host = host.encode("idna").decode("ascii") if not host.isascii() else host
        except UnicodeError as exc:
            raise FetchFailure("bad_url", f"host {host!r}: {exc}") from None
        started = time.monotonic()
        try:
            addresses = self.resolver.resolve(host, deadline)
        except ResolveError as exc:
            raise FetchFailure("dns_error", str(exc)) from None
        finally:
            self._dns.seconds = getattr(self._dns, "seconds", 0.0) + time.monotonic() - started
        for address in addresses:
            reason = self.policy.check(address)
            if reason is not None:
                self._bump("blocked")
                raise FetchFailure("blocked_address", f"{host} -> {reason}")
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
        """Block lists, tdmrep.json and robots.txt for one hop; raises ``FetchFailure``."""
        if self.url_filter is not None:
            name = self.url_filter(url)
            if name:
                raise FetchFailure(f"blocklisted:{name}", f"{url[:200]} is on block list {name}")
        if not (self.cfg.honour_tdmrep_json or self.cfg.honour_robots_txt):
            return
        scheme, host, port, path, _ = target
        if self.cfg.honour_tdmrep_json:
            # (status, rules): a file that could not be read (no answer, a 5xx, a 429) reserves
            # nothing now and is asked for again after fetch.policy_retry_s, not for the worker's life
            status, rules = self._policies.get(
                ("tdmrep", scheme, host, port),
                lambda: _tdmrep_answer(*self._policy_file(scheme, host, port, TDMREP_PATH)),
                lambda answer: self.cfg.policy_retry_s if unreadable(answer[0]) else ROBOTS_KEEP_S)
            rule = tdm_reserved(rules, path.split("?", 1)[0])
            if rule is not None:
                raise FetchFailure("opt_out_tdmrep", f"{TDMREP_PATH}: location {rule.location!r} reserved"
                               + (f" (policy {rule.policy})" if rule.policy else ""))
        if self.cfg.honour_robots_txt:
            robots: RobotsRules = self._policies.get(("robots", scheme, host, port),
                                                     lambda: parse_robots(*self._policy_file(scheme, host, port,
                                                                                             ROBOTS_PATH)),
                                                     lambda r: self.cfg.policy_retry_s if r.disallow_all
                                                     else ROBOTS_KEEP_S)
            if robots.disallow_all:  # the file could not be read: no opt-out of the publisher's
                raise FetchFailure("robots_txt_unavailable", robots.note)
            if not robots.allowed(self.ua_token or "*", path):
                raise FetchFailure("opt_out_robots_txt", f"{ROBOTS_PATH} disallows {path[:200]}")

    def _policy_file(self, scheme: str, host: str, port: int, path: str) -> tuple[int | None, bytes]:
        """(HTTP status, body) of an opt-out file; status None when the host cannot be reached."""
        netloc = f"[{host}]" if ":" in host else host
        url = f"{scheme}://{netloc}:{port}{path}"
        self._bump("policy_fetches")
        try:
            return 200, self._read_policy_file(url)
        except FetchFailure as exc:
            if exc.wait_s is not None:
                raise  # nothing was asked: the host is paused (Retry-After); the row waits, nothing is cached
            if exc.redirect_status is not None:  # more redirects than followed, or one that cannot be:
                logger.debug("opt-out file %s: %s", url, exc)  # "unavailable" (RFC 9309 2.3.1.2), no rules
                return exc.redirect_status, b""
            if exc.status.startswith("http_error_") and exc.status[11:].isdigit():
                return int(exc.status[11:]), b""
            if exc.status == "too_large_bytes":
                return 200, b""
            logger.debug("opt-out file %s: %s", url, exc)
            return None, b""
        except Exception:  # noqa: BLE001 - an opt-out file never stops the batch
            logger.warning("unexpected error fetching %s", url, exc_info=True)
            return None, b""

    def _read_policy_file(self, url: str) -> bytes:
        """The body of an opt-out file, asked for again after a timeout, a connection error or a
        5xx (``fetch.retries`` times, back-off from ``fetch.retry_backoff_s``); not after a 429, nor
        when the host asked to be left alone (``Retry-After``: the row waits instead)."""
        retries = max(0, self.cfg.retries)
        for attempt in range(retries + 1):
            try:
                return self._attempt(url, policy_file=True)[0]
            except FetchFailure as exc:
                if (attempt >= retries or exc.status == "http_error_429" or not is_transient(exc.status)
                        or exc.wait_s is not None or exc.retry_after is not None):
                    raise
            delay = self.cfg.retry_backoff_s * (2 ** attempt)
            if delay > 0:
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _request(self, target, deadline: float, policy_file: bool = False) -> bytes | _Location:
        """One HTTP exchange; returns the body (bytes) or a redirect's location."""
        scheme, host, port, path, addresses = target
        for fresh_try in range(2):
            conn = self.connections.checkout(scheme, host, port, addresses, deadline, fresh=fresh_try > 0)
            try:
                set_timeout(conn, deadline)
                conn.http.request("GET", path, headers=self._headers)
                conn.hold_socket()
                resp = conn.http.getresponse()
            except Exception as exc:  # noqa: BLE001
                self.connections.release(conn)
                if conn.timed_out:  # e.g. header lines or "100 Continue" answers trickling in
                    raise FetchFailure("timeout", f"no complete answer within {self.cfg.timeout_s}s") from None
                if conn.reused and isinstance(exc, _STALE_CONNECTION):
                    continue  # a kept-alive connection the server had closed: open a new one
                raise net_failure(exc, self.cfg.timeout_s) from None
            try:
                return self._response(conn, resp, deadline, policy_file)
            except BaseException:
                if not conn.returned:  # an error answer's connection may be in the pool again
                    resp.close()  # a response read until the server closes holds the socket too
                    self.connections.release(conn)
                raise
        raise FetchFailure("connection_error", "connection closed by the server")

    def _response(self, conn: Conn, resp: http.client.HTTPResponse, deadline: float,
                  policy_file: bool = False) -> bytes | _Location:
        code = resp.status
        if code in _REDIRECTS:
            location = resp.getheader("Location")
            self.connections.discard(conn, resp, deadline)
            if not location:
                raise FetchFailure(f"http_error_{code}", f"HTTP {code} without Location")
            return _Location(location, code)
        if not 200 <= code < 300:
            asked = parse_retry_after(resp.getheader("Retry-After")) if code in (429, 503) else None
            self.connections.discard(conn, resp, deadline)
            # one answer pauses its origin (and this row's retry waits) MAX_PAUSE_S at most
            retry_after = None if asked is None else min(asked, MAX_PAUSE_S)
            note = ""
            if asked is not None:
                note = f" (Retry-After {asked:.0f}s" + (f", cut to {MAX_PAUSE_S:.0f}s)" if asked > MAX_PAUSE_S else ")")
            raise FetchFailure(f"http_error_{code}", f"HTTP {code} {resp.reason}".strip() + note,
                               retry_after=retry_after)
        if self.cfg.honour_opt_out and self.opt_out_directives and not policy_file:
            tags = resp.headers.get_all("X-Robots-Tag") or []
            if tags and _opted_out(tags, self.ua_token, self.opt_out_directives):
                self.connections.release(conn)
                raise FetchFailure("opt_out", f"X-Robots-Tag: {'; '.join(tags)[:200]}")
        if self.cfg.honour_tdm_header and not policy_file:
            reservation = resp.headers.get_all("tdm-reservation") or []
            if reservation and tdm_header_reserved(reservation):
                self.connections.release(conn)
                raise FetchFailure("opt_out_tdm_header", f"tdm-reservation: {'; '.join(reservation)[:200]}")
        limit = self.cfg.policy_max_bytes if policy_file else self.cfg.max_bytes
        declared = resp.getheader("Content-Length")
        if declared is not None and not policy_file:
            try:
                if int(declared) > limit:
                    self.connections.release(conn)
                    raise FetchFailure("too_large_bytes", f"Content-Length {declared} > {limit}")
            except ValueError:
                pass
        # an opt-out file is read up to the limit and used as far as it goes (RFC 9309 asks
        # crawlers to parse at least the first 500 KiB of a robots.txt, not to ignore it)
        body = self.connections.read_body(conn, resp, limit, deadline, truncate=policy_file)
        if len(body) >= limit and policy_file:
            self.connections.release(conn)  # the rest was not read: the connection cannot be reused
        elif resp.will_close:
            self.connections.release(conn)
        else:
            self.connections.checkin(conn)
        coding = (resp.getheader("Content-Encoding") or "").strip().lower()
        decoded = decompress_content(body, coding, limit) if coding in _DECOMPRESSED_CODINGS else None
        if decoded is not None:  # else not encoded as claimed: kept as it came, the decoder judges it
            if len(decoded) > limit and policy_file:
                decoded = decoded[:limit]
            elif len(decoded) > limit:  # a compression bomb is not inflated further
                raise FetchFailure("too_large_bytes", f"body larger than {limit} bytes once decompressed ({coding})")
            body = decoded
        return body

    # ------------------------------------------------------------------ life cycle
    def close(self) -> None:
        """Stop the thread pool and close kept-alive connections."""
        self._closed = True
        self._turns.close()
        self._pool.shutdown(wait=True)
        self.connections.close()
        if self._isolated is not None:
            self._isolated.close()
        if self._watch is not None:
            self._watch.close()

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


def _tdmrep_answer(status: int | None, body: bytes) -> tuple[int | None, list]:
    return status, parse_tdmrep(body) if status == 200 else []


#: failures in which the host gave no answer: enough of them in a row and it counts as down
_NO_ANSWER = ("timeout", "connection_error")
#: a redirect to a URL failing these is one that cannot be followed (an opt-out file that ends
#: there is unavailable: no rules); a network failure there (DNS, connection, timeout) is not
_NOT_FOLLOWED = ("bad_scheme", "bad_url", "blocked_address")


class _Location(str):
    """A redirect's ``Location`` header, with the redirect's HTTP ``status``."""

    def __new__(cls, location: str, status: int) -> "_Location":
        self = super().__new__(cls, location)
        self.status = status
        return self


def _location_text(location: str) -> str:
    """A ``Location`` header as browsers read it: ``http.client`` decodes header bytes as
    Latin-1, but a raw non-ASCII Location is UTF-8 (``/bild-ä.jpg``, sent as is, was asked for as
    ``/bild-%C3%83%C2%A4.jpg``); bytes that are not UTF-8 are percent-encoded, as browsers do."""
    if location.isascii():
        return location
    try:
        raw = location.encode("latin-1")
    except UnicodeEncodeError:
        return location
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(chr(b) if b < 0x80 else f"%{b:02X}" for b in raw)


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def _printable(message: str) -> str:
    """A row's message without control characters (a server's bad status line can hold NULs,
    CR / LF, C1 controls such as NEL and CSI once read as Latin-1, and image bytes): each is
    written as ``\\xNN``."""
    return message if message.isprintable() else message.translate(_CONTROL)


#: ``Content-Encoding`` values undone after download: we ask for ``identity``, but some servers
#: compress anyway, and browsers (and LAION-5B's client, which asked for gzip) decode them
_DECOMPRESSED_CODINGS = ("gzip", "x-gzip", "deflate")


#: exit status of a fetch worker that ends itself over a stuck decode
STUCK_DECODE_EXIT = 70


def _end_process(url: str, seconds: float) -> None:
    """A decode stuck in native code: log it and end this worker process (Ray restarts it)."""
    logger.error("decoding %s has used %.0f CPU-seconds (fetch.decode_cpu_limit_s): this fetch worker "
                 "ends itself; Ray restarts it and runs its work again, decoding in child processes that "
                 "stop such an image (decode_timeout)", url[:300], seconds)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(STUCK_DECODE_EXIT)


# --------------------------------------------------------------------------- counters
def fetch_counters(batch: Mapping[str, np.ndarray]) -> StageCounters:
    """Counters of one fetched batch: successes kept, failures by status, connection and DNS work."""
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
    for name, column in IO_COLUMNS.items():
        if column in batch:
            counters.count(name, int(np.asarray(batch[column], dtype=np.int64).sum()))
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



def stage_counters(batch: Mapping[str, np.ndarray], later=()) -> StageCounters:
    """The stage's counters for :mod:`..registry`."""
    return fetch_counters(batch)


__all__ = ["IO_COLUMNS", "ImageFetcher", "SKIPPED", "STAGE", "STATUSES", "dns_counters", "fetch_counters",
           "is_transient"]
