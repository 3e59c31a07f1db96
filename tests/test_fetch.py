"""ImageFetcher against a loopback server: one route per failure mode, each status asserted."""

from __future__ import annotations

import gzip
import io
import zlib

import numpy as np
import pytest
from PIL import Image

from laionbuild import schema as S
from laionbuild.config import FetchConfig, ResizeConfig, load_config
from laionbuild.demo.image_server import LoopbackServer
from helpers.dns import NoDNS
from helpers.images import encode, many_scans_jpeg, png_file
from laionbuild.stages.fetch import (
    ImageFetcher,
    Resolver,
    ResolveError,
    fetch_counters,
    is_transient,
    parse_ip_literal,
)

HOST = "127.0.0.1"


def pixels(out: dict, i: int, size: int = 224) -> np.ndarray:
    """Row ``i``'s resized image from a fetched batch (its ``IMAGE`` holds raw bytes)."""
    images, bad = S.image_rows(out[S.IMAGE], np.array([i]), size)
    assert not bad[0]
    return images[0]


def textured(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(1, h // 16), max(1, w // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header announces width x height (the data is a few bytes)."""
    return png_file(width, height, zlib.compress(b"\0" * 64))


JPEG = encode(textured(640, 480), "JPEG")
PORTRAIT = encode(textured(300, 700, seed=1), "JPEG")
PNG = encode(textured(200, 150, seed=2), "PNG")
WEBP = encode(textured(1000, 800, seed=3), "WEBP")
TRUNCATED = JPEG[: len(JPEG) // 2]
MAX_BYTES = 1_000_000


@pytest.fixture(scope="module")
def server():
    with LoopbackServer(HOST) as srv:
        srv.add("/ok.jpg", JPEG)
        srv.add("/portrait.jpg", PORTRAIT)
        srv.add("/ok.png", PNG, content_type="image/png")
        srv.add("/ok.webp", WEBP, content_type="image/webp")
        srv.add("/gif", encode(Image.new("RGB", (50, 50)), "GIF"), content_type="image/gif")
        srv.add("/tiny.png", encode(Image.new("RGB", (4, 4)), "PNG"), content_type="image/png")
        srv.add("/404", b"not here", status=404, content_type="text/plain")
        srv.add("/500", b"oops", status=500, content_type="text/plain")
        srv.add("/429", b"slow down", status=429, content_type="text/plain")
        srv.add("/slow.jpg", JPEG, delay_s=3.0)
        srv.add_redirect("/r1", "/r2")
        srv.add_redirect("/r2", "/r3", status=301)
        srv.add_redirect("/r3", "/ok.jpg", status=307)
        srv.add_redirect("/loop-a", "/loop-b")
        srv.add_redirect("/loop-b", "/loop-a")
        for i in range(8):
            srv.add_redirect(f"/long{i}", f"/long{i + 1}")
        srv.add("/long8", JPEG)
        srv.add("/no-location", b"", status=302, content_type="text/plain")
        srv.add_redirect("/to-file", "file:///etc/passwd")
        srv.add_redirect("/to-blocked", "http://10.0.0.1/x.jpg")
        srv.add_redirect("/to-bad-ipv6", "http://[::1")
        srv.add_redirect("/to-bad-ipv6-relative", "//[::1/x")
        srv.add_redirect("/to-bad-ipv6-backslash", "/\\[::1")
        srv.add("/huge-declared", JPEG, declared_length=50_000_000)
        srv.add_stream("/huge-actual", b"\xff" * 65536, n_chunks=400)  # 26 MB, chunked, no length
        srv.add("/bomb.png", bomb_png(10_000, 10_000), content_type="image/png")
        srv.add("/truncated.jpg", TRUNCATED)
        srv.add("/many-scans.jpg", many_scans_jpeg(1000, 1000, 600))  # 32 KB
        # compressed although we ask for identity: undone as a browser would; a bomb is cut
        srv.add("/gzip.png", gzip.compress(PNG), content_type="image/png", headers={"Content-Encoding": "gzip"})
        # RFC 1952: a gzip body may be several members (was decoded to the end of the first one)
        srv.add("/gzip-members.png", gzip.compress(PNG[:50]) + gzip.compress(PNG[50:]), content_type="image/png",
                headers={"Content-Encoding": "gzip"})
        raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        srv.add("/deflate.png", raw_deflate.compress(PNG) + raw_deflate.flush(), content_type="image/png",
                headers={"Content-Encoding": "deflate"})
        srv.add("/mislabelled.png", PNG, content_type="image/png", headers={"Content-Encoding": "gzip"})
        srv.add("/gzip-bomb.png", gzip.compress(b"\0" * (MAX_BYTES * 3)), content_type="image/png",
                headers={"Content-Encoding": "gzip"})
        srv.add("/text", b"<html><body>not an image</body></html>", content_type="image/jpeg")
        srv.add("/noai.jpg", JPEG, headers={"X-Robots-Tag": "noai"})
        srv.add("/noimageai.jpg", JPEG, headers={"X-Robots-Tag": "noindex, NoImageAI"})
        srv.add("/otherbot.jpg", JPEG, headers={"X-Robots-Tag": "otherbot: noai"})
        srv.add("/ourbot.jpg", JPEG, headers={"X-Robots-Tag": "laionbuild: noai"})
        srv.add("/noindex.jpg", JPEG, headers={"X-Robots-Tag": "noindex"})
        yield srv


def make_cfg(**kw) -> FetchConfig:
    base = dict(
        allow_addresses=(f"{HOST}/32",),
        timeout_s=1.0,
        retries=0,
        retry_backoff_s=0.01,
        max_bytes=MAX_BYTES,
        threads=8,
        per_host_concurrency=8,
    )
    base.update(kw)
    return FetchConfig(**base)


def fetch(server, paths, cfg: FetchConfig | None = None, resize: ResizeConfig | None = None, **kw):
    urls = [server.base_url + p if p.startswith("/") else p for p in paths]
    batch = {S.URL: np.array(urls, dtype=object), S.DROP_REASON: np.array([""] * len(urls), dtype=object)}
    with ImageFetcher(cfg or make_cfg(), resize or ResizeConfig(), resolver=Resolver(lookup=NoDNS()), **kw) as f:
        return f(batch)


def one(server, path, **cfg):
    out = fetch(server, [path], make_cfg(**cfg))
    return out[S.STATUS][0], out[S.ERROR_MESSAGE][0]


# --------------------------------------------------------------------------- successes
def test_good_images_all_formats(server):
    out = fetch(server, ["/ok.jpg", "/portrait.jpg", "/ok.png", "/ok.webp"])
    assert list(out[S.STATUS]) == ["success"] * 4
    assert list(out[S.ERROR_MESSAGE]) == [""] * 4
    assert list(out[S.DROP_REASON]) == [""] * 4
    assert out[S.WIDTH].dtype == np.int32 and out[S.HEIGHT].dtype == np.int32
    assert list(zip(out[S.WIDTH], out[S.HEIGHT])) == [(640, 480), (300, 700), (200, 150), (1000, 800)]
    images, bad = S.image_rows(out[S.IMAGE], np.arange(4), 224)
    assert not bad.any() and all(len(out[S.IMAGE][i]) == 224 * 224 * 3 for i in range(4))
    assert all(images[i].std() > 5 for i in range(4))
    assert S.IMAGE_BYTES not in out


def test_image_matches_direct_decode(server):
    from laionbuild.stages.resize import decode_and_resize

    cfg = make_cfg()
    out = fetch(server, ["/ok.webp"], cfg)
    expected, _, _ = decode_and_resize(
        WEBP, ResizeConfig(), max_pixels=cfg.max_pixels, min_size=cfg.min_image_size, formats=cfg.formats
    )
    assert np.array_equal(pixels(out, 0), expected)


def test_keep_image_bytes_and_image_size(server):
    out = fetch(server, ["/ok.jpg", "/404"], resize=ResizeConfig(image_size=96), keep_image_bytes=True)
    assert pixels(out, 0, 96).shape == (96, 96, 3) and out[S.IMAGE][1] is None
    blob = out[S.IMAGE_BYTES][0]
    assert Image.open(io.BytesIO(blob)).size == (96, 96) and blob[:2] == b"\xff\xd8"
    assert out[S.IMAGE_BYTES][1] == b""


def test_user_agent_and_host_header_sent(server):
    cfg = make_cfg(user_agent="testbot/9 (+https://example.org/contact)")
    fetch(server, ["/ok.png"], cfg)
    headers = server.request_headers("/ok.png")[-1]
    assert headers["User-Agent"] == "testbot/9 (+https://example.org/contact)"
    assert headers["Host"] == f"{HOST}:{server.port}"


def test_dropped_rows_pass_through_unchanged(server):
    urls = [server.base_url + p for p in ("/ok.jpg", "/404", "/ok.png", "/ok.jpg")]
    batch = {
        S.URL: np.array(urls, dtype=object),
        S.ALT_TEXT: np.array(["a", "b", "c", "d"], dtype=object),
        S.DROP_REASON: np.array(["", "", "langid:nolang_empty", ""], dtype=object),
    }
    before = server.request_count("/ok.png")
    with ImageFetcher(make_cfg(), ResizeConfig(), resolver=Resolver(lookup=NoDNS())) as f:
        out = f(batch)
    assert list(out[S.ALT_TEXT]) == ["a", "b", "c", "d"]
    assert list(out[S.STATUS]) == ["success", "http_error_404", "skipped", "success"]
    assert list(out[S.DROP_REASON]) == ["", "fetch:http_error_404", "langid:nolang_empty", ""]
    assert out[S.WIDTH][2] == 0 and out[S.IMAGE][2] is None and out[S.IMAGE][1] is None
    assert server.request_count("/ok.png") == before  # the dropped row was not fetched
    assert list(batch[S.DROP_REASON]) == ["", "", "langid:nolang_empty", ""]  # input untouched

    counters = fetch_counters(out)
    assert counters.kept == 2
    assert dict(counters.dropped_by_reason) == {"http_error_404": 1}
    assert counters.counts["skipped"] == 1 and counters.counts["attempted"] == 3


def test_empty_batch_and_missing_drop_reason(server):
    with ImageFetcher(make_cfg(), ResizeConfig(image_size=32), resolver=Resolver(lookup=NoDNS())) as f:
        out = f({S.URL: np.array([], dtype=object)})
        assert len(out[S.IMAGE]) == 0 and len(out[S.STATUS]) == 0
        out = f({S.URL: np.array([server.base_url + "/ok.png"], dtype=object)})
        assert list(out[S.STATUS]) == ["success"] and list(out[S.DROP_REASON]) == [""]


# --------------------------------------------------------------------------- failures
@pytest.mark.parametrize(
    "path, status",
    [
        ("/404", "http_error_404"),
        ("/500", "http_error_500"),
        ("/missing-route", "http_error_404"),
        ("/gif", "unsupported_format"),
        ("/tiny.png", "too_small"),
        ("/huge-declared", "too_large_bytes"),
        ("/huge-actual", "too_large_bytes"),
        ("/bomb.png", "too_large_pixels"),
        ("/truncated.jpg", "decode_error"),
        ("/many-scans.jpg", "too_many_scans"),
        ("/gzip.png", "success"),
        ("/gzip-members.png", "success"),
        ("/deflate.png", "success"),
        ("/mislabelled.png", "success"),
        ("/gzip-bomb.png", "too_large_bytes"),
        ("/text", "not_an_image"),
        ("/noai.jpg", "opt_out"),
        ("/noimageai.jpg", "opt_out"),
        ("/ourbot.jpg", "opt_out"),
        ("/otherbot.jpg", "success"),
        ("/noindex.jpg", "success"),
        ("/r1", "success"),
        ("/loop-a", "too_many_redirects"),
        ("/long0", "too_many_redirects"),
        ("/no-location", "http_error_302"),
        ("/to-file", "bad_scheme"),
        ("/to-blocked", "blocked_address"),
        ("/to-bad-ipv6", "bad_url"),
        # a malformed relative Location escaped urljoin as "unexpected ValueError"
        ("/to-bad-ipv6-relative", "bad_url"),
        ("/to-bad-ipv6-backslash", "bad_url"),
        ("ftp://127.0.0.1/x.jpg", "bad_scheme"),
        ("data:image/png;base64,iVBORw0KGgo=", "bad_scheme"),
        ("http://:80/x", "bad_url"),
        ("http://127.0.0.1:0/x.jpg", "bad_url"),  # no server listens on port 0 (was connection_error)
        ("http://nothing.invalid/x.jpg", "dns_error"),
    ],
)
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_status(server, path, status):
    got, message = one(server, path)
    assert got == status, message
    assert (message == "") == (status == "success")


def test_every_failure_sets_drop_reason_and_no_image(server):
    out = fetch(server, ["/404", "/text", "/ok.jpg"])
    assert list(out[S.DROP_REASON]) == ["fetch:http_error_404", "fetch:not_an_image", ""]
    assert out[S.IMAGE][0] is None and out[S.IMAGE][1] is None and pixels(out, 2).any()
    assert list(out[S.WIDTH][:2]) == [0, 0]


def test_redirect_chain_counts(server):
    before = {p: server.request_count(p) for p in ("/r1", "/r2", "/r3", "/ok.jpg")}
    assert one(server, "/r1")[0] == "success"
    assert {p: server.request_count(p) - n for p, n in before.items()} == {"/r1": 1, "/r2": 1, "/r3": 1, "/ok.jpg": 1}


def test_max_redirects_is_configurable(server):
    assert one(server, "/long0", max_redirects=8)[0] == "success"
    assert one(server, "/long0", max_redirects=7)[0] == "too_many_redirects"
    assert one(server, "/r1", max_redirects=2)[0] == "too_many_redirects"


def test_huge_declared_body_is_not_read(server):
    status, message = one(server, "/huge-declared")
    assert status == "too_large_bytes" and "Content-Length" in message


def test_max_bytes_is_configurable(server):
    assert one(server, "/ok.webp", max_bytes=len(WEBP) - 1)[0] == "too_large_bytes"
    assert one(server, "/ok.webp", max_bytes=len(WEBP))[0] == "success"


def test_opt_out_can_be_disabled(server):
    assert one(server, "/noai.jpg", honour_opt_out=False)[0] == "success"
    assert one(server, "/noindex.jpg", opt_out_directives=("noai", "noindex"))[0] == "opt_out"


def test_accepted_formats_are_configurable(server):
    assert one(server, "/ok.webp", formats=("JPEG", "PNG"))[0] == "unsupported_format"
    assert one(server, "/gif", formats=("GIF",))[0] == "success"


def test_slow_response_times_out(server):
    before = server.request_count("/slow.jpg")
    status, message = one(server, "/slow.jpg", timeout_s=0.3)
    assert status == "timeout", message
    assert server.request_count("/slow.jpg") - before == 1  # one attempt (retries=0 by default here)


def test_transient_failures_are_retried(server):
    for path in ("/500", "/429"):
        before = server.request_count(path)
        assert one(server, path, retries=2)[0] == f"http_error_{path[1:]}"
        assert server.request_count(path) - before == 3
    before = server.request_count("/404")
    assert one(server, "/404", retries=2)[0] == "http_error_404"
    assert server.request_count("/404") - before == 1  # a 404 is final


def test_only_transient_statuses_are_retried():
    assert is_transient("timeout") and is_transient("connection_error") and is_transient("http_error_503")
    assert not is_transient("http_error_404") and not is_transient("dns_error")
    assert not is_transient("blocked_address") and not is_transient("too_large_bytes")


def test_connection_refused_is_connection_error():
    with LoopbackServer(HOST) as srv:
        url = srv.base_url + "/gone.jpg"
    # the server is stopped now: nothing listens on that port
    batch = {S.URL: np.array([url], dtype=object)}
    with ImageFetcher(make_cfg(), ResizeConfig(), resolver=Resolver(lookup=NoDNS())) as f:
        out = f(batch)
    assert out[S.STATUS][0] == "connection_error"


def test_per_host_concurrency_cap():
    with LoopbackServer(HOST) as srv:
        paths = [srv.add(f"/paced{i}.png", PNG, content_type="image/png", delay_s=0.2) for i in range(8)]
        fetch(srv, paths, make_cfg(per_host_concurrency=2, threads=8))
        assert srv.max_in_flight == 2
        srv.reset_counts()
        fetch(srv, paths, make_cfg(per_host_concurrency=8, threads=8))
        assert srv.max_in_flight > 2


def test_keep_alive_reuses_connections(server):
    paths = ["/ok.png"] * 12  # the same URL each time: batch de-duplication off to count connections
    with ImageFetcher(make_cfg(threads=2, per_host_concurrency=2, dedup_urls_in_batch=False), ResizeConfig(image_size=32),
                      resolver=Resolver(lookup=NoDNS())) as f:
        urls = np.array([server.base_url + p for p in paths], dtype=object)
        out = f({S.URL: urls})
        assert set(out[S.STATUS]) == {"success"}
        assert f.stats["connections_opened"] <= 2 and f.stats["connections_reused"] >= 10
        # each row carries its own connection counts; their sum is the stage's counters (stats.json)
        counts = fetch_counters(out).counts
        assert counts["connections_opened"] == f.stats["connections_opened"]
        assert counts["connections_reused"] == f.stats["connections_reused"]
        assert counts["connections_opened"] + counts["connections_reused"] == len(paths)
        assert counts["dns_lookups"] == 0  # an IP literal: nothing to resolve
    with ImageFetcher(make_cfg(threads=2, keep_alive=False, dedup_urls_in_batch=False), ResizeConfig(image_size=32),
                      resolver=Resolver(lookup=NoDNS())) as f:
        f({S.URL: urls})
        assert f.stats["connections_opened"] == 12 and f.stats["connections_reused"] == 0


def test_an_error_answer_hands_its_connection_back_once(server):
    """A 404 with a small body leaves its connection in the pool, open: the row's own error path
    never closes it afterwards (another download thread may be using it by then)."""
    with ImageFetcher(make_cfg(threads=1, per_host_concurrency=1, dedup_urls_in_batch=False),
                      ResizeConfig(image_size=32), resolver=Resolver(lookup=NoDNS())) as f:
        out = f({S.URL: np.array([server.base_url + "/404"] * 3 + [server.base_url + "/ok.png"], dtype=object)})
        assert list(out[S.STATUS]) == ["http_error_404"] * 3 + ["success"]
        idle = [hc for conns in f.connections._idle.values() for hc in conns]
        assert len(idle) == 1 and idle[0].sock is not None            # kept, and still open
        assert f.stats["connections_opened"] == 1 and f.stats["connections_reused"] == 3


def test_fetcher_reused_across_batches(server):
    with ImageFetcher(make_cfg(), ResizeConfig(image_size=32), resolver=Resolver(lookup=NoDNS())) as f:
        for _ in range(3):
            out = f({S.URL: np.array([server.base_url + "/ok.png", server.base_url + "/404"], dtype=object)})
            assert list(out[S.STATUS]) == ["success", "http_error_404"]


def test_fetch_config_from_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "fetch:\n  allow_addresses: ['127.0.0.2']\n  host_map: {img.test: 127.0.0.2}\n"
        "  opt_out_directives: [noai]\n  keep_alive: false\nresize:\n  encode_format: png\n"
    )
    cfg = load_config(path)
    assert cfg.fetch.allow_addresses == ("127.0.0.2",) and cfg.fetch.host_map == {"img.test": "127.0.0.2"}
    assert cfg.fetch.opt_out_directives == ("noai",) and cfg.fetch.keep_alive is False
    assert cfg.resize.encode_format == "png"


# --------------------------------------------------------------------------- resolver
def test_resolver_host_map_cache_and_lru():
    calls = []

    def lookup(name):
        calls.append(name)
        if name == "fail.test":
            raise OSError("NXDOMAIN")
        return ["93.184.216.34"]

    r = Resolver(host_map={"Images.TEST": "127.0.0.2"}, cache_size=2, lookup=lookup)
    assert r.resolve("images.test.") == ("127.0.0.2",)
    assert r.resolve("a.test") == ("93.184.216.34",)
    assert r.resolve("A.test") == ("93.184.216.34",)
    assert calls == ["a.test"] and r.hits == 1
    with pytest.raises(ResolveError):
        r.resolve("fail.test")
    with pytest.raises(ResolveError):
        r.resolve("fail.test")  # negative answers are cached too
    assert calls == ["a.test", "fail.test"]
    r.resolve("b.test")  # evicts a.test (least recently used)
    r.resolve("a.test")
    assert calls == ["a.test", "fail.test", "b.test", "a.test"]
    with pytest.raises(ResolveError):
        r.resolve("x.invalid")
    assert "x.invalid" not in calls


@pytest.mark.parametrize(
    "host, ip",
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("::1", "::1"),
        ("example.test", None),
        ("1e100.test", None),
    ],
)
def test_ip_literal_spellings(host, ip):
    assert parse_ip_literal(host) == ip


def test_dns_failure_is_dns_error(server):
    def lookup(name):
        raise OSError("Name or service not known")

    batch = {S.URL: np.array(["http://nowhere.test/a.jpg"], dtype=object)}
    with ImageFetcher(make_cfg(), ResizeConfig(), resolver=Resolver(lookup=lookup)) as f:
        out = f(batch)
    assert out[S.STATUS][0] == "dns_error" and "nowhere.test" in out[S.ERROR_MESSAGE][0]
    assert fetch_counters(out).dropped_by_reason["dns_error"] == 1


def test_host_map_from_config_reaches_server(server):
    cfg = make_cfg(host_map={"images.test": HOST})
    batch = {S.URL: np.array([f"http://images.test:{server.port}/ok.png"], dtype=object)}
    with ImageFetcher(cfg, ResizeConfig()) as f:  # default resolver built from the config
        out = f(batch)
    assert out[S.STATUS][0] == "success"
    assert server.request_headers("/ok.png")[-1]["Host"] == f"images.test:{server.port}"


def test_same_url_in_a_batch_is_downloaded_once():
    with LoopbackServer(HOST) as srv:
        srv.add("/logo.jpg", JPEG)
        srv.add("/404", b"no", status=404, content_type="text/plain")
        paths = ["/logo.jpg", "/404", "/logo.jpg", "/logo.jpg", "/404"]
        out = fetch(srv, paths)
        assert srv.request_count("/logo.jpg") == 1 and srv.request_count("/404") == 1
        assert list(out[S.STATUS]) == ["success", "http_error_404", "success", "success", "http_error_404"]
        assert list(out[S.DROP_REASON])[1] == list(out[S.DROP_REASON])[4] == "fetch:http_error_404"
        assert np.array_equal(pixels(out, 0), pixels(out, 3)) and out[S.WIDTH][2] == 640
        srv.reset_counts()
        fetch(srv, paths, make_cfg(dedup_urls_in_batch=False))
        assert srv.request_count("/logo.jpg") == 3


def test_stream_lets_fast_rows_pass_a_slow_one():
    """A slow URL in the first batch holds back none of the other rows: every fast row of both
    batches is yielded before it; every row comes out once, with the same fate as a plain call."""
    with LoopbackServer(HOST) as srv:
        srv.add("/slow.png", PNG, content_type="image/png", delay_s=2.0)
        for i in range(12):
            srv.add(f"/fast{i}.png", PNG, content_type="image/png")
        srv.add("/404", b"not here", status=404, content_type="text/plain")

        def batch(paths, tag):
            return {S.URL: np.array([srv.base_url + p for p in paths], dtype=object),
                    S.ALT_TEXT: np.array([f"{tag}{i}" for i in range(len(paths))], dtype=object),
                    S.DROP_REASON: np.array(["langid:x" if p == "-" else "" for p in paths], dtype=object)}

        first = batch(["/fast0.png", "/slow.png", "/fast1.png", "/404", "-", "/fast2.png"], "a")
        second = batch([f"/fast{i}.png" for i in range(3, 12)], "b")
        cfg = make_cfg(threads=4, per_host_concurrency=4, timeout_s=10.0, emit_after_s=0.05, batches_in_flight=2)
        with ImageFetcher(cfg, ResizeConfig(image_size=32), resolver=Resolver(lookup=NoDNS())) as f:
            chunks = list(f.stream([first, second], emit_rows=4))
            plain = f(first)
    rows = [(str(t), str(s)) for c in chunks for t, s in zip(c[S.ALT_TEXT], c[S.STATUS])]
    assert sorted(t for t, _ in rows) == sorted([f"a{i}" for i in range(6)] + [f"b{i}" for i in range(9)])
    assert rows[-1] == ("a1", "success")  # the slow row comes out last ...
    assert len(chunks[-1][S.URL]) == 1  # ... alone: nothing waited for it
    assert all(len(c[S.URL]) <= 4 for c in chunks)
    assert {t: s for t, s in rows if t[0] == "a"} == dict(zip(plain[S.ALT_TEXT], plain[S.STATUS]))
    assert dict(rows)["a3"] == "http_error_404" and dict(rows)["a4"] == "skipped"
    for c in chunks:  # every chunk is a whole batch: fetch columns line up with the rows
        assert {len(v) for v in c.values()} == {len(c[S.URL])}
        ok = c[S.STATUS] == "success"
        assert all(len(p) == 32 * 32 * 3 for p in c[S.IMAGE][ok]) and all(p is None for p in c[S.IMAGE][~ok])


def test_failed_rows_carry_no_pixels_through_the_object_store(server):
    """What a fetched batch costs in the object store (its Arrow block, as Ray Data stores it):
    a failed row adds nothing beyond its metadata, a successful row its resized pixels."""
    from ray.data.block import BlockAccessor

    def block_bytes(batch) -> int:
        return BlockAccessor.for_block(BlockAccessor.batch_to_block(batch)).size_bytes()

    n = 64
    cfg = make_cfg(dedup_urls_in_batch=False)
    failed = fetch(server, ["/404"] * n, cfg)
    assert set(failed[S.STATUS]) == {"http_error_404"}
    without_image = {k: v for k, v in failed.items() if k != S.IMAGE}
    # the IMAGE column of n failed rows: an offset and a validity bit per row, no pixel data
    assert block_bytes(failed) - block_bytes(without_image) <= n * 8 + 64
    assert block_bytes(failed) < n * 1024  # the whole row, metadata included, is far below a KiB
    ok = fetch(server, ["/ok.png"] * n, cfg)
    per_row = (block_bytes(ok) - block_bytes({k: v for k, v in ok.items() if k != S.IMAGE})) / n
    assert 224 * 224 * 3 <= per_row <= 224 * 224 * 3 + 16


@pytest.mark.parametrize("override", ["fetch.batches_in_flight=0", "fetch.emit_after_s=-1",
                                      "fetch.max_jpeg_scans=-1", "clip.num_cpus_per_gpu_actor=-1",
                                      "ray.cpu_node_resource=' '"])
def test_streaming_and_placement_keys_validated(override):
    from laionbuild.errors import ConfigError

    with pytest.raises(ConfigError):
        load_config(None, [override])


def test_every_gzip_member_is_decoded_within_the_limit():
    """A gzip body of several members is decoded whole (zlib stops at the end of the first), to
    at most limit + 1 bytes whatever the members hold; bytes after the last member that are no
    member, a damaged member and data ending inside one end the output there (as urllib3)."""
    from laionbuild.stages.warc import decompress_content

    data = bytes(range(256)) * 40
    members = gzip.compress(data[:50]) + gzip.compress(b"") + gzip.compress(data[50:])
    assert decompress_content(members, "gzip", 1 << 20) == data
    assert decompress_content(members + b"\0\0 trailing", "x-gzip", 1 << 20) == data
    assert decompress_content(gzip.compress(data[:50]) + b"\x1f\x8b" + b"x" * 30, "gzip", 1 << 20) == data[:50]
    cut = decompress_content(members[:-100], "gzip", 1 << 20)
    assert 50 < len(cut) < len(data) and data.startswith(cut)
    assert decompress_content(members, "gzip", len(data)) == data
    assert decompress_content(members, "gzip", 100) == data[:101]  # limit + 1: too large
    bomb = b"".join(gzip.compress(b"\0" * 1_000_000) for _ in range(20))
    assert len(decompress_content(bomb, "gzip", 2_500_000)) == 2_500_001
