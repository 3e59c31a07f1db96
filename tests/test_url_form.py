"""LAION-5B's ``URL`` column: ``asks``' ``response.url`` (``fetch.url_form: laion``)."""

from __future__ import annotations

import pytest

from laionbuild import schema as S
from laionbuild.config import config_from_dict
from laionbuild.errors import ConfigError
from laionbuild.stages.url_normalization import laion_response_url, requote
from test_fetch_laion import fetch, server  # noqa: F401 - the loopback image server fixture

# values: what asks 2.4.12 (LAION-5B's downloader client) reports as response.url for a request
# of the URL, without a redirect
# (requested URL, response.url)
ASKS_CASES = [
    ('http://example.com/a.jpg', 'http://example.com/a.jpg'),
    ('http://example.com', 'http://example.com/'),
    ('http://example.com?x=1', 'http://example.com/?x=1'),
    ('HTTP://Example.COM/A.jpg', 'http://Example.COM/A.jpg'),
    ('http://example.com/a b.jpg', 'http://example.com/a%20b.jpg'),
    ('http://example.com/été.jpg', 'http://example.com/%C3%A9t%C3%A9.jpg'),
    ('http://example.com/a%20b.jpg', 'http://example.com/a%20b.jpg'),
    ('http://example.com/%7Euser/a.jpg', 'http://example.com/~user/a.jpg'),
    ('http://example.com/%41%42c.jpg', 'http://example.com/ABc.jpg'),
    ('http://example.com/a%zzb.jpg', 'http://example.com/a%25zzb.jpg'),
    ('http://example.com/a%2', 'http://example.com/a%2'),
    ('http://example.com/a%2F%3Fb', 'http://example.com/a%2F%3Fb'),
    ('http://example.com/a;p=1 2?q=é#frag', 'http://example.com/a;p=1%202?q=%C3%A9'),
    ('http://example.com:8080?x', 'http://example.com:8080/?x'),
    ('http://example.com/a.jpg#frag', 'http://example.com/a.jpg'),
    ('http://example.com/a.jpg?', 'http://example.com/a.jpg'),
    ('http://example.com/a.jpg#', 'http://example.com/a.jpg'),
    ('http://example.com/a?b=c|d&e=f g', 'http://example.com/a?b=c%7Cd&e=f%20g'),
    ('http://example.com/[x]/a.jpg', 'http://example.com/[x]/a.jpg'),
    ('http://example.com/a"b<c>.jpg', 'http://example.com/a%22b%3Cc%3E.jpg'),
    ('http://example.com/a^b`c{d}.jpg', 'http://example.com/a%5Eb%60c%7Bd%7D.jpg'),
    ('ftp://example.com/x y.jpg', 'ftp://example.com/x%20y.jpg'),
    ('http://user:pw@example.com/a.jpg', 'http://user:pw@example.com/a.jpg'),
    ('http://bücher.de/ü.jpg', 'http://bücher.de/%C3%BC.jpg'),
    ('http://example.com/a.jpg?x=1&amp;y=2', 'http://example.com/a.jpg?x=1&amp;y=2'),
    ('http://example.com/%E2%82%AC.jpg', 'http://example.com/%E2%82%AC.jpg'),
    ('http://example.com/a+b.jpg', 'http://example.com/a+b.jpg'),
    ('http://example.com/a%25b.jpg', 'http://example.com/a%25b.jpg'),
    ('http://example.com/a%gg%20b', 'http://example.com/a%25gg%2520b'),
    ('http://example.com/例.jpg?q=例', 'http://example.com/%E4%BE%8B.jpg?q=%E4%BE%8B'),
    ('https://example.com/a.jpg?x=%2f', 'https://example.com/a.jpg?x=%2f'),
    ('http://example.com/a.jpg\x00', 'http://example.com/a.jpg%00'),
    ('http://example.com/a\\b.jpg', 'http://example.com/a%5Cb.jpg'),
    ('http://example.com/~user/a.jpg', 'http://example.com/~user/a.jpg'),
    ('http://example.com/a.jpg?q=a%20b+c', 'http://example.com/a.jpg?q=a%20b+c'),
]


@pytest.mark.parametrize("url, expected", ASKS_CASES, ids=[repr(u)[:60] for u, _ in ASKS_CASES])
def test_response_url_as_asks_wrote_it(url, expected):
    assert laion_response_url(url) == expected


def test_requote_is_stable():
    for url, expected in ASKS_CASES:
        if "%25" not in expected:  # an undecodable escape is quoted again on every pass
            assert laion_response_url(expected) == expected
    assert requote("a%7e%41") == "a~A"


def test_fetch_writes_the_laion_url_and_hash(server):  # noqa: F811
    out, urls = fetch(server, ["/big.jpg#frag", "/moved.jpg"], url_form="laion", url_after_redirects=True)
    assert list(out[S.STATUS]) == ["success", "success"]
    assert list(out[S.URL]) == [server.base_url + "/big.jpg", server.base_url + "/cdn/big.jpg"]
    assert out[S.HASH][0] == S.pair_hash(server.base_url + "/big.jpg", "a caption")
    out, urls = fetch(server, ["/big.jpg#frag"], url_form="raw")
    assert list(out[S.URL]) == urls


def test_url_form_setting_is_checked():
    with pytest.raises(ConfigError):
        config_from_dict({"fetch": {"url_form": "asks"}})
