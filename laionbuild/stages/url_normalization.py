"""LAION-5B's ``URL`` column: the URL as its downloader reported it (``fetch.url_form: laion``).

LAION-5B's downloader (``dbdl.py``) fetched with the ``asks`` client (2.4 series)
and wrote ``response.url`` into the ``URL`` column, also when there was no
redirect. ``asks`` builds that URL from the requested one:

1. split it with ``urllib.parse.urlparse`` (the scheme comes back lower-cased;
   the network location is kept as written: case, user info, port);
2. the path, ``/`` when empty; ``;`` and the re-quoted parameters when there
   are any; ``?`` and the query when it is not empty (an empty ``?`` vanishes);
   the fragment is dropped;
3. that path-and-query is *re-quoted*: percent escapes of unreserved characters
   (letters, digits, ``-._~``) are decoded, then every character outside the
   unreserved set and ``!#$%&'()*+,/:;=?@[]~`` is percent-encoded from UTF-8 (a
   space becomes ``%20``, ``é`` ``%C3%A9``). When the URL holds a ``%`` followed
   by two letters or digits that are not hex (``%zz``), the decoding step fails
   and ``asks`` quotes the whole path instead with ``%`` itself unsafe, so
   every ``%`` becomes ``%25``;
4. scheme, network location and path are joined again (``urlunparse``).

After a redirect the same is done with the ``Location`` joined to the current
URL. :func:`laion_response_url` is that function; the row's ``hash`` is then
computed from its result (``schema.pair_hash``).
"""

from __future__ import annotations

from urllib.parse import quote, urlparse, urlunparse

#: RFC 3986 unreserved characters: their percent escapes are decoded
UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
#: characters left as they are when re-quoting (reserved ones and ``%``)
SAFE_WITH_PERCENT = "!#$%&'()*+,/:;=?@[]~"
#: the same without ``%``, for text whose escapes could not be decoded
SAFE_WITHOUT_PERCENT = "!#$&'()*+,/:;=?@[]~"
_HEX_DIGITS = 2


class _BadEscape(ValueError):
    pass


def _decode_unreserved(text: str) -> str:
    """Decode ``%XX`` escapes of unreserved characters; others stay escaped.

    Raises :class:`_BadEscape` for ``%`` followed by two letters or digits that are not hex.
    """
    pieces = text.split("%")
    out = [pieces[0]]
    for piece in pieces[1:]:
        code = piece[:_HEX_DIGITS]
        if len(code) == _HEX_DIGITS and code.isalnum():
            try:
                char = chr(int(code, 16))
            except ValueError as exc:
                raise _BadEscape(code) from exc
            out.append(char + piece[_HEX_DIGITS:] if char in UNRESERVED else "%" + piece)
        else:
            out.append("%" + piece)
    return "".join(out)


def requote(text: str) -> str:
    """Percent-encode what is not allowed in a URL, keeping valid escapes (see the module text)."""
    try:
        return quote(_decode_unreserved(text), safe=SAFE_WITH_PERCENT)
    except _BadEscape:
        return quote(text, safe=SAFE_WITHOUT_PERCENT)


def laion_response_url(url: str) -> str:
    """The ``URL`` LAION-5B's downloader reported for a request of ``url``."""
    try:
        scheme, netloc, path, params, query, _fragment = urlparse(url)
    except ValueError:
        return url
    path = path or "/"
    if params:
        path = f"{path};{requote(params)}"
    if query:
        path = f"{path}?{query}"
    return urlunparse((scheme, netloc, requote(path), "", "", ""))


__all__ = ["laion_response_url", "requote"]
