"""Per-host turns: rows wait for a busy or throttling host in a queue, never on a download thread.

* One slow host holding many rows never takes every download thread: the rows of other hosts
  are sent at once (the server's arrival order says so: counts, not times).
* ``Retry-After`` on a ``429`` / ``503`` is honoured: the retry waits for it, and the host's
  other rows send nothing until then; one longer than ``fetch.max_retry_after_s`` ends the
  row, and the host's other rows until then, without another request.
* Rows sharing one URL count its download's connections once.
* A ``Retry-After`` pause and the "down" state of a server that does not answer hold for its
  origin (scheme, host, port): another port of the same host name is another server.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler

import numpy as np
import pytest
from PIL import Image

from helpers.dns import NoDNS
from helpers.http import LOOPBACK, LoopbackHTTP
from helpers.images import encode
from laionbuild import schema as S
from laionbuild.config import FetchConfig, ResizeConfig
from laionbuild.stages.fetch import ImageFetcher, Resolver
from laionbuild.stages.fetch.hosts import HostTurns, host_key, url_host
from laionbuild.stages.fetch.stage import fetch_counters

PNG = encode(Image.new("RGB", (40, 30), (10, 200, 30)), "PNG")


class _Server:
    """Answers by host name; records the arrival order and the answers it gave."""

    def __init__(self, slow_s: float = 0.0, throttle: dict | None = None, hold_slow_for: int = 0):
        self.arrivals: list[tuple[str, str]] = []
        #: slow hosts answer only once this many requests of other hosts have arrived (or after 10 s)
        self.hold_slow_for = hold_slow_for
        self.others_arrived = threading.Event()
        self.answers: list[int] = []
        self.lock = threading.Lock()
        self.slow_s = slow_s
        #: host -> [Retry-After value, seconds the host keeps answering 429 after its first one]
        self.throttle = throttle or {}
        self.throttled_since: dict[str, float] = {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                host = self.headers.get("Host", "").split(":")[0]
                with owner.lock:
                    owner.arrivals.append((host, self.path))
                    code = 200
                    if host in owner.throttle:
                        value, window = owner.throttle[host]
                        since = owner.throttled_since.setdefault(host, time.monotonic())
                        if time.monotonic() - since < window:
                            code = 429
                    owner.answers.append(code)
                    others = sum(1 for h, _ in owner.arrivals if not h.startswith("slow"))
                    if owner.hold_slow_for and others >= owner.hold_slow_for:
                        owner.others_arrived.set()
                if host.startswith("slow") and owner.hold_slow_for:
                    owner.others_arrived.wait(10)
                if host.startswith("slow") and owner.slow_s:
                    time.sleep(owner.slow_s)
                if code == 429:
                    self.send_response(429)
                    self.send_header("Retry-After", owner.throttle[host][0])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(PNG)))
                self.end_headers()
                self.wfile.write(PNG)

        self.http = LoopbackHTTP(Handler)

    def __enter__(self):
        self.http.start()
        return self

    def __exit__(self, *exc):
        self.http.stop()

    def url(self, host: str, path: str) -> str:
        return f"http://{host}:{self.http.port}{path}"


def _fetch(urls, hosts, **cfg):
    base = dict(allow_addresses=(f"{LOOPBACK}/32",), timeout_s=5.0, retries=0, retry_backoff_s=0.01, threads=8,
                per_host_concurrency=2)
    base.update(cfg)
    resolver = Resolver(host_map={h: LOOPBACK for h in hosts}, lookup=NoDNS())
    with ImageFetcher(FetchConfig(**base), ResizeConfig(image_size=32), resolver=resolver) as fetcher:
        return fetcher({S.URL: np.array(urls, dtype=object)})


def test_a_slow_host_does_not_hold_back_other_hosts():
    fast = [f"fast{k}.test" for k in range(8)]
    # the slow host answers nothing until the 8 other hosts' requests have arrived: rows that
    # waited for its turns on download threads would hold them all, and those requests would
    # arrive only after 10 s, behind more of its own
    with _Server(slow_s=0.05, hold_slow_for=len(fast)) as srv:
        urls = [srv.url("slow.test", f"/s{i}.png") for i in range(24)] + [srv.url(h, "/f.png") for h in fast]
        out = _fetch(urls, ["slow.test", *fast], timeout_s=20.0)
    assert list(out[S.STATUS]) == ["success"] * 32
    hosts = [h for h, _ in srv.arrivals]
    last_fast = max(i for i, h in enumerate(hosts) if h != "slow.test")
    # the slow host's first turns (2), never more of its queue, reached the server before them
    assert hosts[:last_fast].count("slow.test") <= 2, hosts


def test_retry_after_pauses_the_host():
    with _Server(throttle={"busy.test": ("1", 0.8)}) as srv:
        urls = [srv.url("busy.test", f"/b{i}.png") for i in range(6)]
        out = _fetch(urls, ["busy.test"], retries=1, per_host_concurrency=1, max_retry_after_s=5)
    assert list(out[S.STATUS]) == ["success"] * 6
    # the first answer said "wait 1 s": nothing more was sent to that host while it throttled
    assert srv.answers.count(429) == 1 and len(srv.answers) == 7, srv.answers


def test_a_retry_after_beyond_the_limit_ends_the_host_rows_without_requests():
    with _Server(throttle={"busy.test": ("3600", 60)}) as srv:
        urls = [srv.url("busy.test", f"/b{i}.png") for i in range(5)] + [srv.url("calm.test", "/c.png")]
        out = _fetch(urls, ["busy.test", "calm.test"], retries=2, per_host_concurrency=1, max_retry_after_s=5)
    statuses = list(out[S.STATUS])
    assert statuses == ["http_error_429"] * 5 + ["success"], statuses
    assert [h for h, _ in srv.arrivals].count("busy.test") == 1  # one request; the other rows sent none
    assert "Retry-After" in out[S.ERROR_MESSAGE][1]


def test_rows_sharing_a_url_count_its_connection_once():
    with _Server() as srv:
        urls = [srv.url("one.test", "/same.png")] * 10
        out = _fetch(urls, ["one.test"])
    assert list(out[S.STATUS]) == ["success"] * 10 and len(srv.arrivals) == 1
    counts = fetch_counters(out).counts
    assert counts["connections_opened"] == 1 and counts["connections_reused"] == 0
    assert counts.get("dns_lookups", 0) + counts.get("dns_cache_hits", 0) <= 1


def test_host_turns_queue_per_host_in_order():
    ran: list[str] = []
    jobs: list = []

    def run_later(job):  # a pool that runs nothing until asked
        jobs.append(job)

    turns = HostTurns(run_later, per_host=2)
    for name in ("a1", "a2", "a3", "a4"):
        turns.submit("a.test", lambda name=name: ran.append(name))
    turns.submit("b.test", lambda: ran.append("b1"))
    assert len(jobs) == 3 and turns.waiting() == 2  # a1, a2 and b1 run; a3, a4 wait for a turn
    jobs.pop(0)()  # a1 ends: a3 takes its turn
    assert ran == ["a1"] and len(jobs) == 3
    while jobs:
        jobs.pop(0)()
    assert ran == ["a1", "a2", "b1", "a3", "a4"] and turns.waiting() == 0


def test_host_turns_timers_and_pauses():
    ran = threading.Event()
    clock = [100.0]
    turns = HostTurns(lambda job: job(), per_host=1, clock=lambda: clock[0])
    turns.pause("x.test", 30, "http_error_503")
    assert turns.paused("x.test") == (30.0, "http_error_503")
    clock[0] += 31
    assert turns.paused("x.test") is None
    turns.later(0, "x.test", ran.set)
    assert ran.is_set()
    real = HostTurns(lambda job: job(), per_host=1)
    done = threading.Event()
    real.later(0.05, "y.test", done.set)
    assert done.wait(10)
    real.close()


def test_host_keys():
    assert host_key("IMG.Test.") == "img.test" == url_host("http://img.test./a.jpg")
    assert url_host("https://Bücher.example/x") == "xn--bcher-kva.example"
    assert url_host(None) == "" and url_host("http://[::1/") == ""


def test_origin_cache_keeps_nothing_from_a_loader_that_raised():
    """A host paused by its Retry-After raises in the robots.txt loader (nothing was asked of it):
    the next row must ask again, not find a cached nothing."""
    from laionbuild.stages.optout import OriginCache

    cache = OriginCache()
    calls = []

    def failing():
        calls.append(1)
        raise RuntimeError("paused")

    try:
        cache.get("k", failing)
    except RuntimeError:
        pass
    assert cache.get("k", lambda: "rules") == "rules" and len(calls) == 1


def test_a_raw_utf8_location_is_read_as_utf8_and_messages_hold_no_control_characters():
    """A Location sent as raw UTF-8 bytes is the URL a browser asks for (http.client reads header
    bytes as Latin-1); a backslash before the query is a slash; a status line of raw bytes becomes
    a printable message."""
    import socket

    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    asked: list[str] = []

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                request = conn.recv(65536).split(b"\r\n", 1)[0].decode("latin-1")
                path = request.split(" ")[1]
                asked.append(path)
                if path == "/start":
                    conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: /bild-\xc3\xa4.png\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
                elif path == "/back":
                    conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: \\img\\b.png\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
                elif path == "/garbage":
                    conn.sendall(b"\x00\x01JUNK\r\n\xff\xd8\r\n\r\n")
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n"
                                 b"Connection: close\r\n\r\n" % len(PNG) + PNG)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        base = f"http://site.test:{port}"
        out = _fetch([base + "/start", base + "/back", base + "/garbage"], ["site.test"], url_after_redirects=True)
    finally:
        listener.close()
    assert list(out[S.STATUS][:2]) == ["success", "success"]
    assert "/bild-%C3%A4.png" in asked and "/img/b.png" in asked
    assert out[S.URL][0] == base + "/bild-ä.png"
    assert out[S.STATUS][2] == "connection_error" and out[S.ERROR_MESSAGE][2].isprintable()


def test_a_host_that_keeps_throttling_holds_its_rows_no_longer_than_the_wait_budget():
    """Every answer is 429 with Retry-After: 1. Rows waiting for the host keep their attempts, so
    without a budget each would wait (and then ask) until its retries ran out: 12 rows x 6
    attempts. With fetch.max_retry_after_s = 3 for all of a row's waits, the rows end after about
    three pauses, most of them without asking again."""
    with _Server(throttle={"busy.test": ("1", 10 ** 6)}) as srv:
        urls = [srv.url("busy.test", f"/b{i}.png") for i in range(12)]
        out = _fetch(urls, ["busy.test"], retries=5, per_host_concurrency=1, max_retry_after_s=3)
    assert list(out[S.STATUS]) == ["http_error_429"] * 12
    assert len(srv.arrivals) <= 12, len(srv.arrivals)


def test_messages_escape_c0_and_c1_controls():
    from laionbuild.stages.fetch.stage import _printable

    assert _printable("HTTP \x00bad\r\n") == "HTTP \\x00bad\\x0d\\x0a"
    assert _printable("NEL\x85 CSI\x9b[31m") == "NEL\\x85 CSI\\x9b[31m"
    assert _printable("ok: Größe ä") == "ok: Größe ä"


def test_a_host_that_never_answers_counts_as_down_after_failures_in_a_row():
    """Rows of a host where nothing listens: after fetch.host_down_after connection failures in a
    row, its other rows end as host_unreachable without a request; another host is not affected."""
    import socket

    closed = socket.socket()
    closed.bind((LOOPBACK, 0))
    dead_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: every connection is refused
    with _Server() as srv:
        dead = [f"http://dead.test:{dead_port}/d{i}.png" for i in range(12)]
        urls = dead + [srv.url("alive.test", "/a.png")]
        out = _fetch(urls, ["dead.test", "alive.test"], per_host_concurrency=1, retries=1, retry_backoff_s=0.01,
                     host_down_after=3, host_down_s=60)
    statuses = list(out[S.STATUS])
    assert statuses[-1] == "success"
    assert statuses[:12].count("connection_error") <= 3 and statuses[:12].count("host_unreachable") >= 9, statuses
    assert "3 requests in a row ended in connection_error" in out[S.ERROR_MESSAGE][11]
    # with the rule off, every row is asked for (and retried)
    out = _fetch(dead, ["dead.test"], per_host_concurrency=1, retries=1, retry_backoff_s=0.01, host_down_after=0)
    assert list(out[S.STATUS]) == ["connection_error"] * 12


def test_an_answer_starts_the_count_again():
    turns = HostTurns(lambda job: job(), per_host=1)
    for _ in range(4):
        turns.failed("x.test", "timeout", after=5, down_s=60)
    turns.answered("x.test")
    for _ in range(4):
        turns.failed("x.test", "timeout", after=5, down_s=60)
    assert turns.down("x.test") is None
    turns.failed("x.test", "timeout", after=5, down_s=60)
    left, why = turns.down("x.test")
    assert 0 < left <= 60 and why == "5 requests in a row ended in timeout"


def _closed_port() -> int:
    import socket

    closed = socket.socket()
    closed.bind((LOOPBACK, 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: every connection is refused
    return port


def test_a_closed_port_does_not_put_the_other_ports_of_its_host_down():
    """Down state per origin: 6 rows to a closed port of site.test put that port down; the rows
    of a live port of the same host name were host_unreachable (and a later batch too)."""
    dead_port = _closed_port()
    with _Server() as srv:
        dead = [f"http://site.test:{dead_port}/d{i}.png" for i in range(6)]
        live = [srv.url("site.test", f"/a{i}.png") for i in range(10)]
        resolver = Resolver(host_map={"site.test": LOOPBACK}, lookup=NoDNS())
        cfg = FetchConfig(allow_addresses=(f"{LOOPBACK}/32",), timeout_s=5.0, retries=1, retry_backoff_s=0.01,
                          threads=4, per_host_concurrency=4, host_down_after=3, host_down_s=60)
        with ImageFetcher(cfg, ResizeConfig(image_size=32), resolver=resolver) as fetcher:
            out = fetcher({S.URL: np.array(dead + live, dtype=object)})
            later = fetcher({S.URL: np.array([srv.url("site.test", "/late.png"), dead[0] + "?late"], dtype=object)})
    statuses = list(out[S.STATUS])
    assert statuses[6:] == ["success"] * 10, statuses
    assert set(statuses[:6]) <= {"connection_error", "host_unreachable"} and "host_unreachable" in statuses[:6]
    assert len(srv.arrivals) == 11  # every row of the live port, the later one too
    assert list(later[S.STATUS]) == ["success", "host_unreachable"]
    assert f"http://site.test:{dead_port}: 3 requests in a row ended in connection_error" in later[S.ERROR_MESSAGE][1]


def test_a_retry_after_pauses_its_port_only():
    """Retry-After per origin: a port answering 503 with a long Retry-After paused every port of
    the host name; the rows of another port of the host are asked for and succeed."""
    with _Server(throttle={"site.test": ("3600", 60)}) as busy, _Server() as calm:
        urls = [busy.url("site.test", f"/b{i}.png") for i in range(3)] + [calm.url("site.test", f"/c{i}.png")
                                                                          for i in range(3)]
        out = _fetch(urls, ["site.test"], retries=1, per_host_concurrency=1, max_retry_after_s=5)
    assert list(out[S.STATUS]) == ["http_error_429"] * 3 + ["success"] * 3, list(out[S.ERROR_MESSAGE])
    assert len(busy.arrivals) == 1 and len(calm.arrivals) == 3
    assert out[S.ERROR_MESSAGE][1].startswith(f"http://site.test:{busy.http.port} asked to be left alone")


def test_origin_keys():
    from laionbuild.stages.fetch.hosts import origin_key

    assert origin_key("HTTP", "IMG.Test.", 80) == "http://img.test:80"
    assert origin_key("https", "::1", 8443) == "https://[::1]:8443"
    assert origin_key("http", "a.test", 80) != origin_key("http", "a.test", 8080) != origin_key("https", "a.test", 8080)


@pytest.mark.parametrize("value", ["\u00b2", "1\u00b9"])
def test_a_retry_after_of_non_ascii_digits_is_ignored(value):
    """Retry-After "²" or "1¹" (Latin-1 bytes: str.isdigit() is true, float() refuses them) ended
    the row as "unexpected ValueError"; the header is ignored, the row keeps the answer's status
    and the host is not paused."""
    with _Server(throttle={"busy.test": (value, 60)}) as srv:
        urls = [srv.url("busy.test", f"/b{i}.png") for i in range(2)]
        out = _fetch(urls, ["busy.test"], per_host_concurrency=1)
    assert list(out[S.STATUS]) == ["http_error_429"] * 2, list(out[S.ERROR_MESSAGE])
    assert list(out[S.ERROR_MESSAGE]) == ["HTTP 429 Too Many Requests"] * 2
    assert len(srv.arrivals) == 2


@pytest.mark.parametrize("value", ["9" * 400, "Fri, 31 Dec 9999 23:59:59 GMT"])
def test_one_retry_after_pauses_its_origin_ten_minutes_at_most(value):
    """400 nines (infinity) or a date in the year 9999 paused the host for inf / 2.5e11 s, for the
    worker's life. The pause is cut to MAX_PAUSE_S (600 s); rows whose wait budget
    (fetch.max_retry_after_s) is shorter still end at once, without a request."""
    with _Server(throttle={"busy.test": (value, 60)}) as srv:
        urls = [srv.url("busy.test", f"/b{i}.png") for i in range(3)]
        out = _fetch(urls, ["busy.test"], retries=1, per_host_concurrency=1, max_retry_after_s=5)
    assert list(out[S.STATUS]) == ["http_error_429"] * 3
    assert len(srv.arrivals) == 1
    assert out[S.ERROR_MESSAGE][0].endswith(", cut to 600s)"), out[S.ERROR_MESSAGE][0]
    for message in out[S.ERROR_MESSAGE][1:]:
        left = float(message.rsplit(" for ", 1)[1].split("s more")[0])
        assert 0 < left <= 600, message


def test_host_turns_cap_a_pause():
    from laionbuild.stages.fetch.hosts import MAX_PAUSE_S

    assert MAX_PAUSE_S == 600  # docs/fetch.md says 10 minutes
    clock = [100.0]
    turns = HostTurns(lambda job: job(), per_host=1, clock=lambda: clock[0])
    turns.pause("http://x.test:80", float("inf"), "http_error_503")
    assert turns.paused("http://x.test:80") == (MAX_PAUSE_S, "http_error_503")
    clock[0] += MAX_PAUSE_S + 1
    assert turns.paused("http://x.test:80") is None
    turns.pause("http://x.test:80", float("nan"), "http_error_503")  # no pause from a value that is no time
    assert turns.paused("http://x.test:80") is None
