"""Download candidate images, safely and politely, then decode and resize them.

:class:`ImageFetcher` is a per-batch callable (construct it once per worker:
it owns a thread pool, a DNS cache and a keep-alive connection pool); its
``stream`` method keeps every download thread busy over several batches. For every
live row (``DROP_REASON == ""``) it downloads ``URL``, decodes and resizes the
image (:mod:`laionbuild.stages.resize`) and adds ``STATUS``, ``ERROR_MESSAGE``,
``WIDTH`` / ``HEIGHT`` (the original size), ``IMAGE`` (the resized pixels as raw
uint8 bytes; None for a failed row: no pixels travel with it) and optionally
``IMAGE_BYTES``. A failed row gets ``DROP_REASON = "fetch:<status>"``. Rows that
were already dropped pass through with ``STATUS = "skipped"``. Nothing raises.

Statuses
--------
``success``, ``timeout``, ``connection_error``, ``dns_error``, ``http_error_<code>``,
``too_many_redirects``, ``too_large_bytes``, ``opt_out`` (``X-Robots-Tag``),
``opt_out_tdm_header`` (``tdm-reservation: 1`` on the image), ``opt_out_tdmrep``
(the host's ``/.well-known/tdmrep.json`` reserves the path), ``opt_out_robots_txt``
(the host's ``robots.txt`` disallows the path; off by default), ``robots_txt_unavailable``
(the host's ``robots.txt`` could not be read, so nothing of the host is fetched),
``blocklisted:<list>`` (a redirect led to a block-listed URL), ``blocked_address``,
``bad_scheme``, ``bad_url`` and, from the decoder, ``not_an_image``,
``decode_error``, ``decoder_crashed`` (the decoder killed its process: see
:mod:`laionbuild.stages.isolate`), ``decode_timeout`` (the decode used more than
``fetch.decode_cpu_limit_s`` of CPU time), ``too_small``, ``too_large_pixels``, ``too_many_scans`` (a progressive JPEG of
more scans than ``fetch.max_jpeg_scans``), ``unsupported_format``,
and ``too_small_bytes`` (a body under ``fetch.min_bytes``; LAION-5B: 5,000).
Truncated images are used with ``fetch.accept_truncated`` (LAION-5B did);
with ``fetch.url_after_redirects`` the row's ``URL`` becomes the URL the image
was finally read from, and its ``hash`` is computed again (LAION-5B's ``URL``).
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

Modules
-------
:mod:`.dns` (the resolver and its cache), :mod:`.policy` (the address guard),
:mod:`.http` (pinned keep-alive connections), :mod:`.stage` (the stage).
"""

from .dns import DNS_MS, DNS_REASONS, TRANSIENT_DNS_REASONS, ResolveError, Resolver, dns_failure_reason, parse_ip_literal
from .http import ConnectionPool, FetchFailure
from .policy import AddressPolicy
from .stage import IO_COLUMNS, SKIPPED, STAGE, STATUSES, ImageFetcher, dns_counters, fetch_counters, is_transient

__all__ = [
    "AddressPolicy",
    "ConnectionPool",
    "DNS_MS",
    "DNS_REASONS",
    "FetchFailure",
    "IO_COLUMNS",
    "ImageFetcher",
    "ResolveError",
    "Resolver",
    "SKIPPED",
    "STAGE",
    "STATUSES",
    "TRANSIENT_DNS_REASONS",
    "dns_counters",
    "dns_failure_reason",
    "fetch_counters",
    "is_transient",
    "parse_ip_literal",
]
