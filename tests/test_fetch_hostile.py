"""Servers that keep a download busy: every row ends by its deadline, whatever the server does.

A socket timeout bounds one read, not a request. Each server below keeps answering,
a little at a time so that no single read waits long: the body 16 bytes at a time, a
header line at a time, ``100 Continue`` answers without end. Each row must be a
``timeout``, and the server must see the connection given up near the deadline: it
counts the pieces it sent before the client went away (without a request deadline
the client reads on until the server stops, after ``MAX_PIECES``).
A server that closes the connection before the body's declared end gives a
``connection_error``, never a truncated image.

A kept-alive connection holding bytes nobody asked for (a ``408`` sent to an idle connection,
an extra response, a body longer than its ``Content-Length``) is not used again: those bytes
were read as the next row's answer.
"""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from helpers.images import encode
from laionbuild import schema as S
from laionbuild.config import FetchConfig, ResizeConfig
from laionbuild.stages.fetch import ImageFetcher

HOST = "127.0.0.1"
IMAGE = encode(Image.new("RGB", (64, 48), (200, 30, 30)), "JPEG")
#: seconds between two pieces of a slow answer
STEP_S = 0.05
TIMEOUT_S = 0.5
#: a slow answer stops after this many pieces (40 timeouts): only a client without a
#: request deadline reads that far
MAX_PIECES = 400
#: pieces a server may send before the client gives up: 10 fit in the deadline, the rest
#: is room for a loaded machine
PIECES_BOUND = 100


def _pieces(conn: socket.socket, piece: bytes, sent: list[int]) -> None:
    """Send ``piece`` every ``STEP_S`` until the client goes away (or ``MAX_PIECES``);
    the count sent goes to ``sent``."""
    n = 0
    try:
        for n in range(1, MAX_PIECES + 1):
            conn.sendall(piece)
            time.sleep(STEP_S)
    except OSError:
        pass
    sent.append(n)


def _head(n: int) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % n


def _endless_body(conn: socket.socket, sent: list[int]) -> None:
    conn.sendall(_head(16 * MAX_PIECES))
    _pieces(conn, b"\xff" * 16, sent)


def _endless_headers(conn: socket.socket, sent: list[int]) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    # one long header line, a few bytes at a time (http.client allows 100 lines of 64 KiB)
    conn.sendall(b"X-Slow: ")
    _pieces(conn, b"abcdefgh", sent)


def _endless_continue(conn: socket.socket, sent: list[int]) -> None:
    _pieces(conn, b"HTTP/1.1 100 Continue\r\n\r\n", sent)


def _closed_early(conn: socket.socket, sent: list[int]) -> None:
    conn.sendall(_head(len(IMAGE)) + IMAGE[: len(IMAGE) // 2])


def _whole(conn: socket.socket, sent: list[int]) -> None:
    conn.sendall(_head(len(IMAGE)) + IMAGE)


def _early_hints(conn: socket.socket, sent: list[int]) -> None:
    """Interim answers (RFC 9110: a client passes over them) before the image."""
    conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                 b"HTTP/1.1 102 Processing\r\n\r\n" + _head(len(IMAGE)) + IMAGE)


_busy = {"now": 0, "most": 0}
_busy_lock = threading.Lock()


def _slow_whole(conn: socket.socket, sent: list[int]) -> None:
    """The image after 0.3 s; counts the requests waiting for their answer at once (a request
    leaves the count before its answer is sent, so the client's next one cannot overlap it)."""
    with _busy_lock:
        _busy["now"] += 1
        _busy["most"] = max(_busy["most"], _busy["now"])
    time.sleep(0.3)
    with _busy_lock:
        _busy["now"] -= 1
    conn.sendall(_head(len(IMAGE)) + IMAGE)


ROUTES = {"/body": _endless_body, "/headers": _endless_headers, "/continue": _endless_continue,
          "/closed": _closed_early, "/ok": _whole, "/hints": _early_hints, "/slow": _slow_whole}


@pytest.fixture(scope="module")
def server():
    """A raw HTTP server on loopback: one thread per connection, the route picks the behaviour."""
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(64)
    requests: list[str] = []
    sent: dict[str, list[int]] = {path: [] for path in ROUTES}

    def handle(conn: socket.socket) -> None:
        with conn:
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    piece = conn.recv(4096)
                    if not piece:
                        return
                    data += piece
                path = data.split(b" ", 2)[1].decode().split("?", 1)[0]
                requests.append(path)
                ROUTES[path](conn, sent[path])
            except OSError:  # the client gave up: expected for the slow routes
                pass

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://{HOST}:{listener.getsockname()[1]}", requests, sent
    listener.close()


def _fetch(base: str, paths: list[str], **kw) -> dict:
    # host_down_after 0: every row here is asked for, however many time out before it (a host
    # counted down is another test's subject, tests/test_fetch_turns.py)
    kw.setdefault("host_down_after", 0)
    cfg = FetchConfig(allow_addresses=(f"{HOST}/32",), timeout_s=TIMEOUT_S, retries=0, threads=8,
                      per_host_concurrency=8, **kw)
    with ImageFetcher(cfg, ResizeConfig()) as fetcher:
        urls = np.array([base + p for p in paths], dtype=object)
        return fetcher({S.URL: urls, S.DROP_REASON: np.full(len(urls), "", dtype=object)})


def _given_up(sent: list[int], start: int, count: int) -> list[int]:
    """The piece counts of the ``count`` connections of a route after the first ``start``, once
    their servers noticed that the client went away."""
    for _ in range(200):
        if len(sent) >= start + count:
            break
        time.sleep(STEP_S)
    return sent[start:]


@pytest.mark.parametrize("path", ["/body", "/headers", "/continue"])
def test_an_answer_slower_than_the_deadline_is_a_timeout(server, path):
    base, requests, sent = server
    before, done = requests.count(path), len(sent[path])
    out = _fetch(base, [path, "/ok"])
    assert list(out[S.STATUS]) == ["timeout", "success"], list(out[S.ERROR_MESSAGE])
    assert out[S.IMAGE][0] is None and out[S.DROP_REASON][0] == "fetch:timeout"
    assert requests.count(path) - before == 1  # one attempt, not retried (retries=0)
    counts = _given_up(sent[path], done, 1)
    assert len(counts) == 1 and counts[0] < PIECES_BOUND, \
        f"the client read {counts} pieces: it did not give up at its deadline"


def test_the_deadline_holds_for_every_thread_at_once(server):
    """Six endless answers and two fast ones on eight threads: six timeouts, each connection
    given up near the deadline; the fast rows beside them succeed."""
    base, _, sent = server
    paths = ["/body", "/headers", "/continue", "/body", "/ok", "/headers", "/ok", "/continue"]
    done = {p: len(sent[p]) for p in ("/body", "/headers", "/continue")}
    out = _fetch(base, [f"{p}?{i}" for i, p in enumerate(paths)])  # eight URLs, eight downloads
    assert [s for p, s in zip(paths, out[S.STATUS]) if p != "/ok"] == ["timeout"] * 6
    assert [s for p, s in zip(paths, out[S.STATUS]) if p == "/ok"] == ["success"] * 2
    for p, n in done.items():
        counts = _given_up(sent[p], n, 2)
        assert len(counts) == 2 and all(k < PIECES_BOUND for k in counts), (p, counts)


@pytest.mark.parametrize("accept_truncated", [False, True])
def test_a_body_cut_by_the_server_is_a_connection_error(server, accept_truncated):
    """Not a truncated image, even where truncated images are accepted (LAION-5B's client failed
    such a download too)."""
    base, _, _ = server
    out = _fetch(base, ["/closed"], accept_truncated=accept_truncated)
    assert out[S.STATUS][0] == "connection_error", out[S.ERROR_MESSAGE][0]
    assert "before the end of the body" in out[S.ERROR_MESSAGE][0]


def test_interim_answers_before_the_image_are_passed_over(server):
    base, _, _ = server
    out = _fetch(base, ["/hints", "/hints"])
    assert list(out[S.STATUS]) == ["success", "success"]


def test_waiting_for_the_hosts_turn_is_no_server_time(server):
    """Eight images of one host, two at a time, each answered in 0.3 s with a 0.5 s deadline:
    the queued ones used to time out before they were even sent."""
    base, _, _ = server
    _busy["most"] = 0
    cfg = FetchConfig(allow_addresses=(f"{HOST}/32",), timeout_s=TIMEOUT_S, retries=0, threads=8,
                      per_host_concurrency=2)
    with ImageFetcher(cfg, ResizeConfig()) as fetcher:
        urls = np.array([f"{base}/slow?{i}" for i in range(8)], dtype=object)
        out = fetcher({S.URL: urls, S.DROP_REASON: np.full(len(urls), "", dtype=object)})
    assert list(out[S.STATUS]) == ["success"] * 8
    assert _busy["most"] <= 2  # the host never saw more than its share at once


def test_an_ipv6_site_local_address_is_refused():
    from laionbuild.stages.fetch.policy import AddressPolicy

    assert AddressPolicy(()).check("fec0::1") == "fec0::1 is site-local"
    assert AddressPolicy(("fec0::/10",)).check("fec0::1") is None


# --------------------------------------------------------------------------- kept-alive connections
RED = encode(Image.new("RGB", (64, 48), (255, 0, 0)), "JPEG")
BLUE = encode(Image.new("RGB", (64, 48), (0, 0, 255)), "JPEG")


def _kept(body: bytes, surplus: bytes = b"") -> bytes:
    """A keep-alive answer of ``body`` (``surplus`` sent after it, beyond its Content-Length)."""
    return b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(body) + body + surplus


#: what a keep-alive server does after its first answer on a connection: (surplus sent with the
#: answer, what it sends once the answer is out, whether it closes the connection then)
_AFTER = {
    # some servers and proxies tell an idle connection they close it: an unrequested 408
    "idle 408": (b"", b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", True),
    # an extra response nobody asked for: another image
    "extra answer": (b"", _kept(BLUE), False),
    # a body longer than its Content-Length (a common server bug): 48 KiB past the end
    "overlong body": (b"\x00" * (48 << 10), b"", False),
}


class _KeepAliveServer:
    """Raw HTTP/1.1 on loopback, connections kept alive; every request is answered with the red
    image, and the server's first answer is followed by ``_AFTER[case]``."""

    def __init__(self, case: str):
        self.surplus, self.after, self.close_after = _AFTER[case]
        self.connections = 0
        self.requests = 0
        self.first = True
        self.after_sent = threading.Event()
        self.listener = socket.socket()
        self.listener.bind((HOST, 0))
        self.listener.listen(16)
        self.base = f"http://{HOST}:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            try:
                while True:
                    while b"\r\n\r\n" not in data:
                        piece = conn.recv(4096)
                        if not piece:
                            return
                        data += piece
                    data = data.split(b"\r\n\r\n", 1)[1]
                    self.requests += 1
                    first, self.first = self.first, False  # one connection at a time
                    conn.sendall(_kept(RED, self.surplus if first else b""))
                    if first:
                        if self.after:
                            time.sleep(0.05)  # after the client has read its answer
                            conn.sendall(self.after)
                        if self.close_after:
                            conn.shutdown(socket.SHUT_WR)
                        self.after_sent.set()
                        if self.close_after:
                            return
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


def _colour(out: dict, i: int) -> tuple:
    pixels = np.frombuffer(out[S.IMAGE][i], np.uint8).reshape(-1, 3)
    return tuple(int(round(c)) for c in pixels.mean(axis=0))


@pytest.mark.parametrize("case", list(_AFTER))
def test_a_kept_connection_holding_unrequested_bytes_is_not_used_again(case):
    """One image per batch, one connection at a time. The first answer is followed by bytes the
    client did not ask for; the next batch's row used to read them as its answer (a 408, the
    other image, a bad status line). It must open a new connection and get its own image."""
    srv = _KeepAliveServer(case)
    cfg = FetchConfig(allow_addresses=(f"{HOST}/32",), timeout_s=5.0, retries=0, threads=1,
                      per_host_concurrency=1, host_down_after=0)
    try:
        with ImageFetcher(cfg, ResizeConfig(image_size=32)) as fetcher:
            outs = []
            for i in range(2):
                urls = np.array([f"{srv.base}/red.jpg?{i}"], dtype=object)
                outs.append(fetcher({S.URL: urls, S.DROP_REASON: np.full(1, "", dtype=object)}))
                assert srv.after_sent.wait(10)
                time.sleep(0.05)  # what the server sent has reached the client's socket
    finally:
        srv.close()
    assert [str(o[S.STATUS][0]) for o in outs] == ["success", "success"], [o[S.ERROR_MESSAGE][0] for o in outs]
    red = _colour(outs[0], 0)
    assert red[0] > 200 and red[2] < 50
    assert _colour(outs[1], 0) == red  # its own image, not the unrequested one
    assert int(outs[1]["fetch_connections_reused"][0]) == 0 and int(outs[1]["fetch_connections_opened"][0]) == 1
    assert srv.connections == 2 and srv.requests == 2


def test_an_overlong_body_does_not_reach_the_next_row_at_once():
    """Two rows of one host back to back on one thread: the first answer's body runs 48 KiB past
    its Content-Length. The connection is not put back with those bytes on it: the second row
    (sent at once, no wait) used to fail with a BadStatusLine connection_error."""
    srv = _KeepAliveServer("overlong body")
    cfg = FetchConfig(allow_addresses=(f"{HOST}/32",), timeout_s=5.0, retries=0, threads=1,
                      per_host_concurrency=1, host_down_after=0)
    try:
        with ImageFetcher(cfg, ResizeConfig(image_size=32)) as fetcher:
            urls = np.array([f"{srv.base}/red.jpg?{i}" for i in range(3)], dtype=object)
            out = fetcher({S.URL: urls, S.DROP_REASON: np.full(3, "", dtype=object)})
    finally:
        srv.close()
    assert list(out[S.STATUS]) == ["success"] * 3, list(out[S.ERROR_MESSAGE])
    assert list(out["fetch_connections_reused"]) == [0, 0, 1]  # the third row reuses the clean second one
    assert srv.connections == 2 and srv.requests == 3
