"""SSRF safety: blocked addresses are refused before any connection, on every hop.

Setup: the fetcher may only reach 127.0.0.2 (``allow_addresses``), where server A
runs. Server B listens on 127.0.0.1 and plays the internal service under
attack: every trick below must leave it with ZERO requests. A guard on
``socket.socket.connect`` records every outgoing connection and refuses any
that is not to 127.0.0.2, so a check that happened "after connecting" would
fail the test, and no packet ever leaves the machine.
"""

from __future__ import annotations

import io
import socket

import numpy as np
import pytest
from PIL import Image

from laionbuild import schema as S
from laionbuild.config import FetchConfig, ResizeConfig
from laionbuild.demo.image_server import LoopbackServer
from laionbuild.errors import ConfigError
from helpers.dns import NoDNS
from laionbuild.stages.fetch import AddressPolicy, ImageFetcher, Resolver

ALLOWED = "127.0.0.2"
TARGET = "127.0.0.1"


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (0, 128, 255)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def servers():
    with LoopbackServer(ALLOWED) as a, LoopbackServer(TARGET) as b:
        b.add("/secret.png", png(), content_type="image/png")
        b.add("/latest/meta-data/", png(), content_type="image/png")
        a.add("/ok.png", png(), content_type="image/png")
        yield a, b


@pytest.fixture
def connects(monkeypatch):
    """Record every socket connect; refuse (and fail) any not aimed at 127.0.0.2."""
    seen: list[tuple] = []
    real_connect = socket.socket.connect

    def guarded(sock, address):
        seen.append(address)
        if address[0] != ALLOWED:
            raise AssertionError(f"connection attempted to {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return seen


def make_fetcher(lookup=None, **kw) -> ImageFetcher:
    cfg = FetchConfig(
        allow_addresses=(ALLOWED,),
        host_map={"internal.test": TARGET, "images.test": ALLOWED},
        timeout_s=2.0,
        retries=0,
        threads=4,
        **kw,
    )
    resolver = Resolver(cfg.host_map, lookup=lookup or NoDNS())
    return ImageFetcher(cfg, ResizeConfig(image_size=32), resolver=resolver)


def run(urls, **kw):
    batch = {S.URL: np.array(urls, dtype=object), S.DROP_REASON: np.array([""] * len(urls), dtype=object)}
    with make_fetcher(**kw) as f:
        return f(batch)


def test_allowed_server_works(servers, connects):
    a, _ = servers
    out = run([a.base_url + "/ok.png", f"http://images.test:{a.port}/ok.png"])
    assert list(out[S.STATUS]) == ["success", "success"]
    assert connects and all(addr[0] == ALLOWED for addr in connects)


@pytest.mark.parametrize(
    "location",
    [
        "http://127.0.0.1:{port}/secret.png",
        "http://localhost:{port}/secret.png",
        "http://LOCALHOST.:{port}/secret.png",
        "http://sub.localhost:{port}/secret.png",
        "http://[::1]:{port}/secret.png",
        "http://[::ffff:127.0.0.1]:{port}/secret.png",
        "http://2130706433:{port}/secret.png",
        "http://0x7f000001:{port}/secret.png",
        "http://0177.0.0.1:{port}/secret.png",
        "http://127.1:{port}/secret.png",
        "http://internal.test:{port}/secret.png",
        "http://user:pw@127.0.0.1:{port}/secret.png",
        "http://0.0.0.0:{port}/secret.png",
        "//127.0.0.1:{port}/secret.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/x.png",
    ],
)
def test_redirect_to_blocked_address_is_refused(servers, connects, location):
    a, b = servers
    location = location.format(port=b.port)
    path = f"/redir-{abs(hash(location))}"
    url = a.add_redirect(path, location)
    before_b = b.request_count()
    out = run([url])
    assert out[S.STATUS][0] == "blocked_address", out[S.ERROR_MESSAGE][0]
    assert out[S.DROP_REASON][0] == "fetch:blocked_address"
    assert a.request_count(path) == 1  # the first hop was made...
    assert b.request_count() == before_b == 0  # ...the second never reached its target
    assert all(addr[0] == ALLOWED for addr in connects)


@pytest.mark.parametrize("location", ["file:///etc/passwd", "gopher://127.0.0.1:70/x", "ftp://127.0.0.2/x"])
def test_redirect_to_other_scheme_is_refused(servers, connects, location):
    a, b = servers
    url = a.add_redirect(f"/scheme-{location.split(':')[0]}", location)
    out = run([url])
    assert out[S.STATUS][0] == "bad_scheme"
    assert b.request_count() == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/x.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://192.168.1.1/",
        "http://172.16.0.1/",
        "http://100.64.0.1/",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "http://255.255.255.255/",
        "http://240.0.0.1/",
        "http://[fe80::1]/",
        "http://[fc00::1]/",
        "http://[::]/",
        "https://127.0.0.1/",
        "http://2130706433/",
        "http://internal.test/",
    ],
)
def test_direct_blocked_url_never_connects(servers, connects, url):
    out = run([url])
    assert out[S.STATUS][0] == "blocked_address", out[S.ERROR_MESSAGE][0]
    assert connects == []
    assert servers[1].request_count() == 0


def test_name_with_any_blocked_address_is_refused(connects):
    # a name that resolves to a public AND a private address is refused as a whole
    lookups = []

    def lookup(name):
        lookups.append(name)
        return ["93.184.216.34", "10.0.0.5"]

    out = run(["http://mixed.test/a.jpg"], lookup=lookup)
    assert out[S.STATUS][0] == "blocked_address" and "10.0.0.5" in out[S.ERROR_MESSAGE][0]
    assert lookups == ["mixed.test"] and connects == []


def test_connects_to_the_vetted_address_without_second_lookup(servers, connects):
    # DNS rebinding: the first answer is the allowed address, any later one is the target.
    a, b = servers
    answers = iter([[ALLOWED]] + [[TARGET]] * 10)
    lookups = []

    def lookup(name):
        lookups.append(name)
        return next(answers)

    cfg = FetchConfig(allow_addresses=(ALLOWED,), timeout_s=2.0, retries=0, threads=1, dns_cache_size=0)
    with ImageFetcher(cfg, ResizeConfig(image_size=32), resolver=Resolver(lookup=lookup, cache_size=0)) as f:
        out = f({S.URL: np.array([f"http://rebind.test:{a.port}/ok.png"], dtype=object)})
    assert out[S.STATUS][0] == "success"
    assert lookups == ["rebind.test"]  # resolved once, for the check
    assert connects == [(ALLOWED, a.port)]  # and the connection went to the checked address
    assert a.request_headers("/ok.png")[-1]["Host"] == f"rebind.test:{a.port}"
    assert b.request_count() == 0


def test_every_redirect_hop_is_resolved_and_checked(servers, connects):
    a, b = servers
    hop2 = a.add_redirect("/hop2", f"http://internal.test:{b.port}/secret.png")
    hop1 = a.add_redirect("/hop1", f"http://images.test:{a.port}/hop2")
    out = run([hop1])
    assert out[S.STATUS][0] == "blocked_address"
    assert a.request_count("/hop1") == 1 and a.request_count("/hop2") == 1
    assert b.request_count() == 0
    assert hop2.endswith("/hop2")


def test_allow_list_is_exact():
    policy = AddressPolicy(["127.0.0.2/32", "10.1.0.0/16"])
    assert policy.check("127.0.0.2") is None
    assert policy.check("10.1.200.3") is None
    assert policy.check("127.0.0.1") is not None
    assert policy.check("10.2.0.1") is not None
    assert policy.check("::ffff:127.0.0.2") is None  # mapped form of an allowed address
    assert policy.check("::ffff:127.0.0.1") is not None
    default = AddressPolicy()
    for ip in ("127.0.0.2", "10.0.0.1", "169.254.169.254", "::1", "fe80::1", "0.0.0.0", "224.0.0.1",
               "100.64.0.1", "198.18.0.1", "::ffff:10.0.0.1", "192.0.2.1"):
        assert default.check(ip) is not None, ip
    for ip in ("93.184.216.34", "8.8.8.8", "2606:4700::1111"):
        assert default.check(ip) is None, ip


def test_ipv6_forms_of_ipv4_addresses_are_judged_by_the_address_they_reach():
    """NAT64 (64:ff9b::/96, what DNS64 answers on IPv6-only networks) and 6to4 (2002::/16) carry
    an IPv4 address: a private one is refused, a public one allowed, like the plain address."""
    default = AddressPolicy()
    for ip in ("64:ff9b::a9fe:a9fe", "64:ff9b::7f00:1", "64:ff9b::a00:1", "2002:a9fe:a9fe::1", "2002:7f00:1::",
               "2002:c0a8:101::1"):
        assert default.check(ip) is not None, ip
    for ip in ("64:ff9b::808:808", "64:ff9b::5db8:d822", "2002:808:808::1"):
        assert default.check(ip) is None, ip
    assert AddressPolicy(["10.1.0.0/16"]).check("64:ff9b::a01:203") is None  # NAT64 form of an allowed address
    assert default.check("64:ff9b:1::808:808") is not None  # local-use NAT64 prefix: not the well-known one


def test_bad_allow_list_entry_is_a_config_error():
    with pytest.raises(ConfigError):
        AddressPolicy(["not-an-ip"])
