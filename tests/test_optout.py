"""Opt-outs beyond X-Robots-Tag: the TDMRep header and tdmrep.json, robots.txt, block-listed redirects."""

from __future__ import annotations

import http.server
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from laionbuild import schema as S
from laionbuild.config import FetchConfig, ResizeConfig, load_config
from laionbuild.errors import ConfigError
from laionbuild.demo.image_server import LoopbackServer
from laionbuild.stages.fetch import STATUSES, ImageFetcher, Resolver, fetch_counters, is_transient
from laionbuild.stages.optout import (
    OriginCache,
    parse_robots,
    parse_tdmrep,
    path_matches,
    tdm_header_reserved,
    tdm_reserved,
)

HOST = "127.0.0.1"


def _png(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()


def _no_dns(name):
    raise AssertionError(f"unexpected DNS lookup of {name!r}")


def cfg(**kw) -> FetchConfig:
    base = dict(allow_addresses=(f"{HOST}/32",), timeout_s=2.0, retries=0, threads=8, per_host_concurrency=8,
                host_map={"a.test": HOST, "b.test": HOST})
    base.update(kw)
    return FetchConfig(**base)


def _batch(urls):
    return {S.URL: np.array(urls, dtype=object), S.DROP_REASON: np.array([""] * len(urls), dtype=object)}


def fetcher(fetch_cfg: FetchConfig, **kw) -> ImageFetcher:
    return ImageFetcher(fetch_cfg, ResizeConfig(image_size=16), resolver=Resolver(fetch_cfg.host_map, lookup=_no_dns),
                        **kw)


def fetch(urls, fetch_cfg: FetchConfig, **kw):
    with fetcher(fetch_cfg, **kw) as f:
        return f(_batch(urls)), dict(f.stats)


# --------------------------------------------------------------------------- pure parts
def test_path_patterns_follow_robots_syntax():
    assert path_matches("/images/", "/images/a.jpg")
    assert path_matches("/images/*", "/images/x/a.jpg")
    assert path_matches("/*.jpg$", "/a/b.jpg")
    assert not path_matches("/*.jpg$", "/a/b.jpg?x=1")
    assert not path_matches("/images/", "/img/a.jpg")
    assert path_matches("*", "/anything")
    assert path_matches("images/", "/images/a.png")  # a location without its leading slash
    assert path_matches("/bilder/\u00e4", "/bilder/%C3%A4") and path_matches("/%7Euser/", "/~user/a.png")


def test_tdmrep_rules_first_match_decides():
    rules = parse_tdmrep(json.dumps([
        {"location": "/free/*", "tdm-reservation": 0},
        {"location": "/", "tdm-reservation": 1, "tdm-policy": "https://example.test/policy.json"},
    ]).encode())
    assert len(rules) == 2
    assert tdm_reserved(rules, "/free/a.jpg") is None
    hit = tdm_reserved(rules, "/other/a.jpg")
    assert hit is not None and hit.policy.endswith("policy.json")
    assert parse_tdmrep(b"{not json") == [] and parse_tdmrep(b"42") == []
    assert parse_tdmrep(b'[{"tdm-reservation": 1}]') == []  # no location: ignored


def test_tdm_header_values():
    assert tdm_header_reserved(["1"]) and tdm_header_reserved([" 1 "])
    assert not tdm_header_reserved(["0"]) and not tdm_header_reserved([])


def test_robots_status_handling():
    rules = parse_robots(200, b"User-agent: laionbuild\nDisallow: /private/\n")
    assert not rules.allowed("laionbuild", "/private/a.jpg") and rules.allowed("laionbuild", "/a.jpg")
    assert parse_robots(404).allowed("laionbuild", "/private/a.jpg")  # RFC 9309: 4xx = no rules
    assert not parse_robots(503).allowed("laionbuild", "/a.jpg")  # 5xx = everything disallowed
    assert not parse_robots(None).allowed("laionbuild", "/a.jpg")  # unreachable


def test_robots_txt_answered_429_disallows_everything(server):
    """429 (too many requests) is the server being overloaded, as a 5xx: not "no rules"."""
    assert not parse_robots(429).allowed("laionbuild", "/a.jpg")
    server.add("/robots.txt", b"", status=429, content_type="text/plain", headers={"Retry-After": "60"})
    out, _ = fetch([server.url("/public/a.png")], cfg(honour_robots_txt=True))
    assert out[S.STATUS][0] == "robots_txt_unavailable"
    assert server.request_count("/public/a.png") == 0


def test_a_robots_txt_that_asks_to_wait_is_not_asked_again_at_once(server):
    """503 with Retry-After on robots.txt: the host asked to be left alone, so the file is not
    asked for again after the usual back-off (the host is paused; its rows send nothing)."""
    server.add("/robots.txt", b"", status=503, content_type="text/plain", headers={"Retry-After": "30"})
    out, _ = fetch([server.url("/public/a.png"), server.url("/public/b.png")],
                   cfg(honour_robots_txt=True, retries=1, retry_backoff_s=0.01, max_retry_after_s=0))
    assert server.request_count("/robots.txt") == 1
    assert server.request_count("/public/a.png") == server.request_count("/public/b.png") == 0
    assert set(out[S.STATUS]) <= {"robots_txt_unavailable", "http_error_503"}


WILD = b"User-agent: *\nDisallow: /*.jpg$\nDisallow: /*?\n"
GROUPS = (b"User-agent: a\nUser-agent: LaionBuild/2.0\nDisallow: /a\n\nUser-agent: b\nDisallow: /b\n"
          b"User-agent: laionbuild\nDisallow: /c\nUser-agent: *\nDisallow: /\n")


@pytest.mark.parametrize("body,path,allowed", [
    (WILD, "/a.jpg", False), (WILD, "/x/a.jpg", False), (WILD, "/a.jpg?x=1", False), (WILD, "/a.jpgx", True),
    (WILD, "/b.png?x=1", False), (WILD, "/c.png", True),
    # the longest matching rule decides, Allow wins a tie
    (b"User-agent: *\nDisallow: /\nAllow: /images/\n", "/images/a.png", True),
    (b"User-agent: *\nDisallow: /\nAllow: /images/\n", "/other.png", False),
    (b"User-agent: *\nAllow: /images/\nDisallow: /images/*.png\n", "/images/a.png", False),
    (b"User-agent: *\nDisallow: /page\nAllow: /page\n", "/page", True),
    (b"User-agent: *\nDisallow: /p$\n", "/p", False), (b"User-agent: *\nDisallow: /p$\n", "/p/", True),
    (b"User-agent: *\nDisallow:\n", "/x", True),  # an empty Disallow allows
    (b"User-agent: *\nDisallow: /\n", "/robots.txt", True),
    # our product token, case-insensitive and whole; groups naming it are combined, else "*"
    (b"User-agent: laion\nDisallow: /\n", "/a.png", True),
    (b"User-agent: laionbuilder\nDisallow: /\n", "/a.png", True),
    (GROUPS, "/a", False), (GROUPS, "/b", True), (GROUPS, "/c", False), (GROUPS, "/d", True),
    (b"User-agent: other\nDisallow: /\n", "/a", True),  # no group for us nor for "*"
    (b"Disallow: /\nUser-agent: *\nDisallow: /x\n", "/a", True),  # a rule before any group
    # paths of two slashes are paths, not a host
    (b"User-agent: *\nDisallow: //cdn/\n", "//cdn/a.png", False),
    (b"User-agent: *\nDisallow: //cdn/\n", "/cdn/a.png", True),
    # byte order mark, CRLF, comments, lines without a colon, other records, key case
    (b"\xef\xbb\xbfUser-agent: *\r\nSitemap: /s.xml\r\nno colon\r\nDISALLOW : /x # note\r\n", "/x1", False),
    (b"\xef\xbb\xbfUser-agent: *\r\nSitemap: /s.xml\r\nno colon\r\nDISALLOW : /x # note\r\n", "/y", True),
    (b"User-agent: *\rDisallow: /x\r", "/x", False),
    # percent-encoding (RFC 9309 section 2.2.2)
    (b"User-agent: *\nDisallow: /foo/bar/%62%61%7A\n", "/foo/bar/baz", False),
    (b"User-agent: *\nDisallow: /foo/bar/baz\n", "/foo/bar/%62%61%7a", False),
    (b"User-agent: *\nDisallow: /foo/bar/\xe3\x83\x84\n", "/foo/bar/%E3%83%84", False),
    (b"User-agent: *\nDisallow: /foo/bar/%e3%83%84\n", "/foo/bar/%E3%83%84", False),
    (b"User-agent: *\nDisallow: /a%2Fb\n", "/a/b", True),  # an encoded reserved character is not itself
    (b"User-agent: *\nDisallow: /file-%2A.html\n", "/file-*.html", False),
    (b"User-agent: *\nDisallow: /file-%2A.html\n", "/file-a.html", True),
    (b"User-agent: *\nDisallow: /\xe9t\xe9\n", "/%E9t%E9", False),  # a Latin-1 file: octets as they are
])
def test_robots_txt_rules_follow_rfc_9309(body, path, allowed):
    assert parse_robots(200, body).allowed("laionbuild", path) is allowed


def test_robots_txt_patterns_cost_linear_time():
    rules = parse_robots(200, b"User-agent: *\nDisallow: /" + b"*a" * 40 + b"*b$\n")
    started = time.monotonic()
    assert rules.allowed("laionbuild", "/" + "a" * 5000) is True
    assert time.monotonic() - started < 1.0


def test_origin_cache_loads_again_after_keep_s():
    now = [0.0]
    cache = OriginCache(size=10, clock=lambda: now[0])
    calls = []

    def load(name):
        calls.append(name)
        return name

    def keep_s(value):
        return 5.0 if value == "short" else None

    for _ in range(3):
        assert cache.get("s", lambda: load("short"), keep_s) == "short"
        assert cache.get("l", lambda: load("long"), keep_s) == "long"
    assert calls == ["short", "long"]
    now[0] = 4.9
    cache.get("s", lambda: load("short"), keep_s)
    assert calls == ["short", "long"]
    now[0] = 5.0  # expired: loaded again, then kept another 5 s
    cache.get("s", lambda: load("short"), keep_s)
    cache.get("l", lambda: load("long"), keep_s)
    now[0] = 9.9
    cache.get("s", lambda: load("short"), keep_s)
    assert calls == ["short", "long", "short"]


def test_origin_cache_loads_once_and_evicts():
    cache = OriginCache(size=2)
    calls = []
    for key in ("a", "a", "b", "a", "c", "a"):
        assert cache.get(key, lambda k=key: calls.append(k) or k.upper()) == key.upper()
    assert calls == ["a", "b", "c"]
    cache.get("b", lambda: calls.append("b2"))  # least recently used: "b" went when "c" came
    assert calls[-1] == "b2"


# --------------------------------------------------------------------------- against a server
@pytest.fixture()
def server():
    with LoopbackServer(HOST) as srv:
        for p in ("/private/a.png", "/private/b.png", "/public/a.png", "/public/b.png", "/free/a.png"):
            srv.add(p, PNG, content_type="image/png")
        srv.add("/tdm1.png", PNG, content_type="image/png", headers={"tdm-reservation": "1"})
        srv.add("/tdm0.png", PNG, content_type="image/png", headers={"tdm-reservation": "0"})
        yield srv


def test_tdm_reservation_header(server):
    urls = [server.url("/tdm1.png"), server.url("/tdm0.png")]
    out, _ = fetch(urls, cfg())
    assert list(out[S.STATUS]) == ["opt_out_tdm_header", "success"]
    assert out[S.DROP_REASON][0] == "fetch:opt_out_tdm_header"
    assert fetch_counters(out).dropped_by_reason["opt_out_tdm_header"] == 1
    out, _ = fetch(urls, cfg(honour_tdm_header=False))
    assert list(out[S.STATUS]) == ["success", "success"]


def test_tdmrep_json_reserves_paths_without_requesting_them(server):
    server.add("/.well-known/tdmrep.json", json.dumps([
        {"location": "/private/", "tdm-reservation": 1},
        {"location": "/", "tdm-reservation": 0},
    ]).encode(), content_type="application/json")
    paths = ["/private/a.png", "/private/b.png", "/public/a.png", "/public/b.png"] * 3
    out, stats = fetch([server.url(p) for p in paths], cfg(honour_tdmrep_json=True))
    assert [s for s, p in zip(out[S.STATUS], paths) if p.startswith("/private")] == ["opt_out_tdmrep"] * 6
    assert [s for s, p in zip(out[S.STATUS], paths) if p.startswith("/public")] == ["success"] * 6
    assert server.request_count("/private/a.png") == server.request_count("/private/b.png") == 0
    assert server.request_count("/.well-known/tdmrep.json") == 1  # once per host, 8 threads at once
    assert stats["policy_fetches"] == 1
    # off: the file is never asked for and the images are fetched
    server.reset_counts()
    out, _ = fetch([server.url("/private/a.png")], cfg())
    assert out[S.STATUS][0] == "success" and server.request_count("/.well-known/tdmrep.json") == 0


def test_tdmrep_json_is_cached_per_host(server):
    server.add("/.well-known/tdmrep.json", b'[{"location": "/private/*", "tdm-reservation": 1}]',
               content_type="application/json")
    urls = [f"http://{h}:{server.port}/private/a.png" for h in ("a.test", "b.test", "a.test", "b.test")]
    out, _ = fetch(urls, cfg(honour_tdmrep_json=True))
    assert set(out[S.STATUS]) == {"opt_out_tdmrep"}
    hosts = sorted(h["Host"].split(":")[0] for h in server.request_headers("/.well-known/tdmrep.json"))
    assert hosts == ["a.test", "b.test"]


@pytest.mark.parametrize("body,status", [(b"{broken", 200), (b"gone", 404), (b"oops", 500)])
def test_tdmrep_json_missing_or_bad_reserves_nothing(server, body, status):
    server.add("/.well-known/tdmrep.json", body, status=status, content_type="application/json")
    out, _ = fetch([server.url("/private/a.png")], cfg(honour_tdmrep_json=True))
    assert out[S.STATUS][0] == "success"


def test_opt_out_files_use_the_same_address_checks(server):
    # the origin's tdmrep.json / robots.txt redirect to the cloud metadata address: never connected to
    server.add_redirect("/.well-known/tdmrep.json", "http://169.254.169.254/latest/meta-data/")
    server.add_redirect("/robots.txt", "http://10.0.0.1/robots.txt")
    out, stats = fetch([server.url("/public/a.png")], cfg(honour_tdmrep_json=True))
    assert out[S.STATUS][0] == "success"  # no readable tdmrep.json: nothing reserved
    assert stats["blocked"] == 1  # the redirect hop was refused before any connection
    out, stats = fetch([server.url("/public/a.png")], cfg(honour_robots_txt=True))
    # a redirect that cannot be followed: the file is unavailable (RFC 9309 2.3.1.2), no rules
    assert out[S.STATUS][0] == "success"
    assert stats["blocked"] == 1
    assert server.request_count("/public/a.png") == 2


def _redirect_chain(server, n: int, end: str) -> None:
    """/robots.txt redirects ``n`` times in a row, the last time to ``end``."""
    hops = ["/robots.txt"] + [f"/hop{i}" for i in range(1, n)] + [end]
    for here, there in zip(hops, hops[1:]):
        server.add_redirect(here, there)


@pytest.mark.parametrize("case,robots_requests,status", [
    ("loop", 6, "success"),  # itself: the first answer and five redirects followed, then given up
    ("six redirects", 1, "success"),  # one more than RFC 9309's five: unavailable, no rules
    ("five redirects", 1, "opt_out_robots_txt"),  # followed (whatever fetch.max_redirects says)
    ("to ftp", 1, "success"),
    ("to a blocked address", 1, "success"),
    ("to a malformed URL", 1, "success"),
])
def test_a_robots_txt_redirect_not_followed_leaves_no_rules(server, case, robots_requests, status):
    """RFC 9309 2.3.1.2: a crawler follows at least five redirects; beyond them the file is
    unavailable, which is handled like a 4xx (no rules). Such a robots.txt, and one whose redirect
    cannot be followed, made every row of its host robots_txt_unavailable ("unreachable")."""
    server.add("/rules.txt", b"User-agent: *\nDisallow: /private/\n", content_type="text/plain")
    if case == "loop":
        server.add_redirect("/robots.txt", "/robots.txt")
    elif case == "six redirects":
        _redirect_chain(server, 6, "/rules.txt")
    elif case == "five redirects":
        _redirect_chain(server, 5, "/rules.txt")
    else:
        server.add_redirect("/robots.txt", {"to ftp": "ftp://a.test/robots.txt",
                                            "to a blocked address": "http://10.0.0.1/robots.txt",
                                            "to a malformed URL": "//[::1/robots.txt"}[case])
    out, _ = fetch([server.url("/private/a.png"), server.url("/public/a.png")],
                   cfg(honour_robots_txt=True, max_redirects=2))
    assert list(out[S.STATUS]) == [status, "success"], list(out[S.ERROR_MESSAGE])
    assert server.request_count("/robots.txt") == robots_requests
    assert server.request_count("/rules.txt") == (1 if case == "five redirects" else 0)
    assert server.request_count("/public/a.png") == 1


def test_a_robots_txt_redirect_not_followed_is_unavailable():
    assert parse_robots(301).allowed("laionbuild", "/private/a.jpg")  # no rules (RFC 9309 2.3.1.2)
    assert not parse_robots(301).disallow_all


def test_robots_txt_honoured_when_enabled(server):
    server.add("/robots.txt", b"User-agent: otherbot\nDisallow: /\n\nUser-agent: laionbuild\nDisallow: /private/\n",
               content_type="text/plain")
    paths = ["/private/a.png", "/public/a.png", "/private/b.png", "/public/b.png"] * 2
    out, _ = fetch([server.url(p) for p in paths], cfg(honour_robots_txt=True))
    assert list(out[S.STATUS][:4]) == ["opt_out_robots_txt", "success", "opt_out_robots_txt", "success"]
    assert out[S.DROP_REASON][0] == "fetch:opt_out_robots_txt"
    assert server.request_count("/private/a.png") == 0 and server.request_count("/robots.txt") == 1
    server.reset_counts()
    out, _ = fetch([server.url("/private/a.png")], cfg())  # default: robots.txt not read
    assert out[S.STATUS][0] == "success" and server.request_count("/robots.txt") == 0


def test_robots_txt_wildcards_and_precedence_against_a_server(server):
    server.add("/robots.txt", b"User-agent: laion\nDisallow: /\n\nUser-agent: *\nDisallow: /\nAllow: /public/\n"
                              b"Disallow: /public/*?\nDisallow: /*/b.png$\n", content_type="text/plain")
    paths = ["/public/a.png", "/public/a.png?x=1", "/public/b.png", "/public/b.png?x=1", "/free/a.png"]
    out, _ = fetch([server.base_url + p for p in paths], cfg(honour_robots_txt=True))
    assert list(out[S.STATUS]) == ["success"] + ["opt_out_robots_txt"] * 4
    assert server.request_count("/public/a.png") == 1 and server.request_count("/public/b.png") == 0


@pytest.mark.parametrize("status", [500, 503])
def test_an_unreadable_robots_txt_is_not_a_publisher_opt_out(server, status):
    """A robots.txt that cannot be read disallows everything (RFC 9309), but the publisher
    said nothing: the rows get their own status, not ``opt_out_robots_txt``."""
    server.add("/robots.txt", b"", status=status, content_type="text/plain")
    out, _ = fetch([server.url("/public/a.png"), server.url("/public/b.png")], cfg(honour_robots_txt=True))
    assert list(out[S.STATUS]) == ["robots_txt_unavailable"] * 2
    assert out[S.DROP_REASON][0] == "fetch:robots_txt_unavailable"
    assert out[S.ERROR_MESSAGE][0] == f"/robots.txt unavailable (HTTP {status})"
    assert fetch_counters(out).dropped_by_reason == {"robots_txt_unavailable": 2}
    assert "robots_txt_unavailable" in STATUSES and not is_transient("robots_txt_unavailable")
    assert server.request_count("/public/a.png") == 0


def test_an_unreadable_robots_txt_is_read_again_after_policy_retry_s(server):
    """One failed robots.txt used to refuse the host's images for the worker's whole life."""
    server.add("/robots.txt", b"", status=503, content_type="text/plain")
    with fetcher(cfg(honour_robots_txt=True, policy_retry_s=0.5)) as f:
        assert f(_batch([server.url("/public/a.png")]))[S.STATUS][0] == "robots_txt_unavailable"
        assert f(_batch([server.url("/public/b.png")]))[S.STATUS][0] == "robots_txt_unavailable"
        assert server.request_count("/robots.txt") == 1  # remembered meanwhile: the host is not asked per image
        server.add("/robots.txt", b"User-agent: *\nDisallow: /private/\n", content_type="text/plain")
        time.sleep(0.6)
        out = f(_batch([server.url("/public/a.png"), server.url("/private/a.png")]))
        assert list(out[S.STATUS]) == ["success", "opt_out_robots_txt"]
        assert server.request_count("/robots.txt") == 2
        time.sleep(0.6)  # a file that was read is kept (24 hours)
        assert f(_batch([server.url("/private/b.png")]))[S.STATUS][0] == "opt_out_robots_txt"
        assert server.request_count("/robots.txt") == 2


def test_an_unreadable_tdmrep_json_is_read_again_after_policy_retry_s(server):
    """A tdmrep.json that could not be read reserves nothing for now, and was remembered for the
    worker's whole life: reservations the publisher made were never seen."""
    server.add("/.well-known/tdmrep.json", b"", status=503, content_type="application/json")
    with fetcher(cfg(honour_tdmrep_json=True, policy_retry_s=0.5)) as f:
        assert f(_batch([server.url("/private/a.png")]))[S.STATUS][0] == "success"
        assert f(_batch([server.url("/private/b.png")]))[S.STATUS][0] == "success"
        assert server.request_count("/.well-known/tdmrep.json") == 1  # remembered meanwhile
        server.add("/.well-known/tdmrep.json", b'[{"location": "/private/", "tdm-reservation": 1}]',
                   content_type="application/json")
        time.sleep(0.6)
        assert f(_batch([server.url("/private/c.png")]))[S.STATUS][0] == "opt_out_tdmrep"
        assert server.request_count("/.well-known/tdmrep.json") == 2
        time.sleep(0.6)  # a file that was read is kept (24 hours)
        assert f(_batch([server.url("/private/d.png")]))[S.STATUS][0] == "opt_out_tdmrep"
        assert server.request_count("/.well-known/tdmrep.json") == 2


class _FlakyRobots(http.server.BaseHTTPRequestHandler):
    """robots.txt answers 503 once, then its rules; any other path is an image."""

    robots_requests = 0

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/robots.txt":
            type(self).robots_requests += 1
            status, body = (503, b"") if type(self).robots_requests == 1 else (200, b"User-agent: *\nDisallow: /p/\n")
        else:
            status, body = 200, PNG
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize("retries,statuses,requests", [
    (1, ["success", "opt_out_robots_txt"], 2),
    (0, ["robots_txt_unavailable", "robots_txt_unavailable"], 1),
])
def test_a_robots_txt_failing_once_is_asked_for_again_at_once(retries, statuses, requests):
    handler = type("Flaky", (_FlakyRobots,), {"robots_requests": 0})
    with http.server.ThreadingHTTPServer((HOST, 0), handler) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        try:
            base = f"http://{HOST}:{httpd.server_address[1]}"
            out, _ = fetch([base + "/a.png", base + "/p/a.png"],
                           cfg(honour_robots_txt=True, retries=retries, retry_backoff_s=0))
        finally:
            httpd.shutdown()
    assert list(out[S.STATUS]) == statuses
    assert handler.robots_requests == requests


def test_robots_txt_for_all_agents(server):
    server.add("/robots.txt", b"User-agent: *\nDisallow: /private/\n", content_type="text/plain")
    out, _ = fetch([server.url("/private/a.png"), server.url("/free/a.png")], cfg(honour_robots_txt=True))
    assert list(out[S.STATUS]) == ["opt_out_robots_txt", "success"]


def test_redirect_to_block_listed_url_is_never_requested(server):
    server.add("/blocked/a.png", PNG, content_type="image/png")
    server.add_redirect("/r", "/blocked/a.png")
    blocked = server.url("/blocked/a.png")

    def url_filter(url):
        return "urls.txt" if url == blocked else None

    out, _ = fetch([server.url("/r"), server.url("/public/a.png")], cfg(), url_filter=url_filter)
    assert list(out[S.STATUS]) == ["blocklisted:urls.txt", "success"]
    assert out[S.DROP_REASON][0] == "fetch:blocklisted:urls.txt"
    assert server.request_count("/r") == 1 and server.request_count("/blocked/a.png") == 0


def test_opt_out_config_keys():
    c = load_config(None, ["fetch.honour_tdmrep_json=true", "fetch.honour_robots_txt=true"])
    assert c.fetch.honour_tdmrep_json and c.fetch.honour_robots_txt and c.fetch.honour_tdm_header
    d = load_config(None)
    assert not d.fetch.honour_tdmrep_json and not d.fetch.honour_robots_txt
    assert d.fetch.policy_retry_s == 300 and load_config(None, ["fetch.policy_retry_s=5"]).fetch.policy_retry_s == 5
    with pytest.raises(ConfigError, match="policy_retry_s"):
        load_config(None, ["fetch.policy_retry_s=-1"])


def test_a_robots_txt_over_the_size_limit_is_read_as_far_as_the_limit(server):
    """RFC 9309: parse at least the first 500 KiB; a larger file used to allow everything."""
    body = b"User-agent: *\nDisallow: /private/\n" + b"# padding\n" * 60_000  # 600 KB
    server.add("/robots.txt", body, content_type="text/plain")
    out, _ = fetch([server.url("/private/a.png"), server.url("/free/a.png")], cfg(honour_robots_txt=True))
    assert list(out[S.STATUS]) == ["opt_out_robots_txt", "success"]
    assert server.request_count("/private/a.png") == 0
