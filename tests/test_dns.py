"""DNS at crawl scale: transient failures retried and cached briefly, NXDOMAIN cached, TTLs, counters."""

from __future__ import annotations

import io
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from laionbuild import schema as S
from laionbuild.config import FetchConfig, ResizeConfig, load_config
from laionbuild.demo.image_server import LoopbackServer
from laionbuild.errors import ConfigError
from laionbuild.stages.fetch import DNS_MS, ImageFetcher, ResolveError, Resolver, dns_failure_reason, fetch_counters


class Clock:
    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


class FakeGetaddrinfo:
    """Stands in for socket.getaddrinfo: per name, a list of outcomes (an exception or an IP)."""

    def __init__(self, plan: dict[str, list]):
        self.plan = {k: list(v) for k, v in plan.items()}
        self.calls: list[str] = []
        self.passthrough = socket.getaddrinfo    # IP literals: connecting to the pinned address

    def __call__(self, host, port, *args, **kwargs):
        if host not in self.plan:
            return self.passthrough(host, port, *args, **kwargs)
        self.calls.append(host)
        steps = self.plan[host]
        step = steps.pop(0) if len(steps) > 1 else steps[0]
        if isinstance(step, BaseException):
            raise step
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (step, 0))]


AGAIN = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
NONAME = socket.gaierror(socket.EAI_NONAME, "Name or service not known")


@pytest.fixture()
def clock():
    return Clock()


def _resolver(clock, **kw) -> Resolver:
    # the default lookup: socket.getaddrinfo (faked by the tests)
    return Resolver(ttl_s=100, negative_ttl_s=50, transient_ttl_s=5, retries=2, retry_backoff_s=0.5,
                    clock=clock, sleep=clock.sleep, **kw)


def test_transient_failure_is_retried_with_backoff(monkeypatch, clock):
    fake = FakeGetaddrinfo({"img.example": [AGAIN, AGAIN, "93.184.216.34"]})
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    r = _resolver(clock)
    assert r.resolve("img.example") == ("93.184.216.34",)
    assert fake.calls == ["img.example"] * 3
    assert clock.sleeps == [0.5, 1.0]                    # exponential back-off
    assert r.stats["retries"] == 2 and r.stats["lookup_ms"] == 1500
    assert r.resolve("IMG.example.") == ("93.184.216.34",)  # cached
    assert len(fake.calls) == 3


def test_transient_failure_cached_only_briefly(monkeypatch, clock):
    fake = FakeGetaddrinfo({"flaky.example": [AGAIN, AGAIN, AGAIN, "93.184.216.35"]})
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    r = _resolver(clock)
    with pytest.raises(ResolveError) as err:
        r.resolve("flaky.example")
    assert err.value.reason == "transient" and str(err.value).startswith("transient: ")
    assert len(fake.calls) == 3 and r.stats["failed:transient"] == 1
    with pytest.raises(ResolveError):
        r.resolve("flaky.example")                        # within transient_ttl_s: from the cache
    assert len(fake.calls) == 3
    clock.now += 6                                        # past transient_ttl_s: asked again
    assert r.resolve("flaky.example") == ("93.184.216.35",)
    assert len(fake.calls) == 4


def test_nxdomain_cached_longer_and_not_retried(monkeypatch, clock):
    fake = FakeGetaddrinfo({"gone.example": [NONAME, "93.184.216.36"]})
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    r = _resolver(clock)
    for _ in range(3):
        with pytest.raises(ResolveError) as err:
            r.resolve("gone.example")
        assert err.value.reason == "nxdomain"
    assert fake.calls == ["gone.example"] and clock.sleeps == []
    clock.now += 6                                        # a transient failure would have expired
    with pytest.raises(ResolveError):
        r.resolve("gone.example")
    assert len(fake.calls) == 1
    clock.now += 50                                       # past negative_ttl_s
    assert r.resolve("gone.example") == ("93.184.216.36",)
    assert len(fake.calls) == 2


def test_positive_answers_expire_after_the_ttl(monkeypatch, clock):
    fake = FakeGetaddrinfo({"a.example": ["93.184.216.1", "93.184.216.2"]})
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    r = _resolver(clock)
    assert r.resolve("a.example") == ("93.184.216.1",)
    clock.now += 99
    assert r.resolve("a.example") == ("93.184.216.1",)
    clock.now += 2
    assert r.resolve("a.example") == ("93.184.216.2",)
    assert len(fake.calls) == 2


def test_failure_reasons():
    assert dns_failure_reason(NONAME) == "nxdomain"
    assert dns_failure_reason(AGAIN) == "transient"
    assert dns_failure_reason(socket.gaierror(socket.EAI_FAIL, "SERVFAIL")) == "servfail"
    assert dns_failure_reason(socket.timeout("timed out")) == "timeout"
    assert dns_failure_reason(UnicodeError("label too long")) == "bad_name"
    assert dns_failure_reason(OSError("other")) == "error"


def test_concurrent_lookups_of_one_name_share_one_query(clock):
    started, release = threading.Event(), threading.Event()
    calls = []

    def slow_lookup(name):
        calls.append(name)
        started.set()
        release.wait(5)
        return ["93.184.216.40"]

    r = Resolver(lookup=slow_lookup)
    results = []
    threads = [threading.Thread(target=lambda: results.append(r.resolve("busy.example"))) for _ in range(8)]
    for t in threads:
        t.start()
    started.wait(5)
    time.sleep(0.05)
    release.set()
    for t in threads:
        t.join(5)
    assert calls == ["busy.example"]
    assert results == [("93.184.216.40",)] * 8


class HangingLookup:
    """A system resolver that never answers some names until the test lets it."""

    def __init__(self, hanging: set[str], answer: str = "127.0.0.1"):
        self.hanging, self.answer = hanging, answer
        self.release = threading.Event()
        self.calls: list[str] = []
        self.answered_late = 0

    def __call__(self, name):
        self.calls.append(name)
        if name in self.hanging:
            self.release.wait(30)
            self.answered_late += 1
        return [self.answer]


def test_a_lookup_ends_at_the_callers_deadline_and_its_answer_is_kept():
    lookup = HangingLookup({"slow.example"}, "93.184.216.50")
    r = Resolver(lookup=lookup)
    try:
        waiters = []
        for _ in range(3):   # the first caller and two waiting for the same lookup
            t = threading.Thread(target=lambda: waiters.append(_reason(r, "slow.example", 0.2)))
            t.start()
            waiters.append(t)
        for t in [w for w in waiters if isinstance(w, threading.Thread)]:
            t.join(10)
        assert [w for w in waiters if not isinstance(w, threading.Thread)] == ["timeout"] * 3
        assert lookup.answered_late == 0                   # all three gave up while it still hung
        assert r.stats["deadline_exceeded"] == 3
        assert r.resolve("fast.example", time.monotonic() + 5) == ("93.184.216.50",)  # not stuck behind it
    finally:
        lookup.release.set()
    assert r.resolve("slow.example", time.monotonic() + 5) == ("93.184.216.50",)
    assert lookup.calls.count("slow.example") == 1        # the late answer was cached, not asked again


def test_lookup_threads_are_bounded_and_end_when_idle(monkeypatch):
    from laionbuild.stages.fetch import dns

    monkeypatch.setattr(dns, "_IDLE_EXIT_S", 0.2)
    lock, running, most = threading.Lock(), [0], [0]

    def lookup(name):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return ["93.184.216.60"]

    r = Resolver(lookup=lookup, lookup_threads=2)
    answers = []
    callers = [threading.Thread(target=lambda i=i: answers.append(r.resolve(f"h{i}.example", time.monotonic() + 10)))
               for i in range(8)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(10)
    assert answers == [("93.184.216.60",)] * 8
    assert most[0] == 2                                   # eight names, two lookups at a time
    for _ in range(100):
        if not r._threads:
            break
        time.sleep(0.05)
    assert r._threads == 0                                # idle lookup threads end
    assert r.resolve("late.example", time.monotonic() + 5) == ("93.184.216.60",)  # and start again


def _reason(resolver, name, seconds):
    try:
        resolver.resolve(name, time.monotonic() + seconds)
    except ResolveError as exc:
        return exc.reason
    return "answered"


def test_fetch_rows_end_at_the_deadline_while_dns_hangs():
    lookup = HangingLookup({"hang.example"})
    with LoopbackServer("127.0.0.1") as server:
        server.add("/a.png", _png(), content_type="image/png")
        cfg = FetchConfig(allow_addresses=("127.0.0.1/32",), timeout_s=0.5, retries=1, retry_backoff_s=0.01,
                          threads=4)
        urls = [f"http://hang.example:{server.port}/a.png", f"http://ok.example:{server.port}/a.png",
                f"http://hang.example:{server.port}/b.png"]
        try:
            with ImageFetcher(cfg, ResizeConfig(image_size=16), resolver=Resolver(lookup=lookup)) as fetcher:
                out = fetcher({S.URL: np.array(urls, dtype=object)})
            answered_late = lookup.answered_late
        finally:
            lookup.release.set()
    assert answered_late == 0                               # the batch did not wait for the hung lookup
    assert list(out[S.STATUS]) == ["dns_error", "success", "dns_error"]
    assert out[S.ERROR_MESSAGE][0].startswith("timeout: ") and "deadline" in out[S.ERROR_MESSAGE][0]
    assert fetch_counters(out).counts["dns_error:timeout"] == 2
    assert lookup.calls.count("hang.example") == 1          # one lookup however many rows and retries wait


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_fetch_reports_dns_time_and_failures_by_reason(monkeypatch):
    with LoopbackServer("127.0.0.1") as server:
        server.add("/a.png", _png(), content_type="image/png")
        fake = FakeGetaddrinfo({
            "images.example": [AGAIN, "127.0.0.1"],
            "gone.example": [NONAME],
            "down.example": [AGAIN],
        })
        monkeypatch.setattr(socket, "getaddrinfo", fake)
        cfg = FetchConfig(allow_addresses=("127.0.0.1/32",), timeout_s=2.0, retries=0, threads=4,
                          dns_retries=1, dns_retry_backoff_s=0.05)
        urls = [f"http://images.example:{server.port}/a.png", f"http://gone.example:{server.port}/a.png",
                f"http://down.example:{server.port}/a.png", f"http://gone.example:{server.port}/b.png"]
        with ImageFetcher(cfg, ResizeConfig(image_size=16)) as fetcher:
            out = fetcher({S.URL: np.array(urls, dtype=object)})
            resolver_stats = dict(fetcher.resolver.stats)
    assert list(out[S.STATUS]) == ["success", "dns_error", "dns_error", "dns_error"]
    assert out[S.ERROR_MESSAGE][1].startswith("nxdomain: ") and out[S.ERROR_MESSAGE][2].startswith("transient: ")
    assert out[DNS_MS].dtype == np.int32 and out[DNS_MS][0] >= 40   # waited through one back-off
    assert fake.calls.count("gone.example") == 1                      # NXDOMAIN cached for the next row
    assert fake.calls.count("down.example") == 2                      # one retry, then given up
    counts = fetch_counters(out).counts
    assert counts["dns_error:nxdomain"] == 2 and counts["dns_error:transient"] == 1
    assert counts["dns_ms"] == int(out[DNS_MS].sum()) >= 40
    # three names looked up; the second gone.example row answered from the cache (or from the lookup it waited for)
    assert counts["dns_lookups"] == 3 and counts["dns_cache_hits"] == 1
    assert resolver_stats["retries"] == 2 and resolver_stats["failed:nxdomain"] == 1


def test_dns_config_keys_validated(tmp_path):
    cfg = load_config(None, ["fetch.dns_negative_ttl_s=120", "fetch.dns_retries=0"])
    r = Resolver.from_config(cfg.fetch)
    assert r.negative_ttl_s == 120 and r.retries == 0
    with pytest.raises(ConfigError):
        load_config(None, ["fetch.dns_transient_ttl_s=-1"])
