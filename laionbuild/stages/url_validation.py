"""The URL check LAION-5B ran on every link: Django's ``URLValidator`` (3.2 series, 2021).

LAION-5B's ``parse_wat`` kept a link only when ``URLValidator()(url)`` did not
raise. This module re-states that validator's documented rules as one pure
function, :func:`is_valid_url`, so that the faithful configuration decides
every link the same way without depending on Django:

* the value is a string of at most 2,048 characters with no tab, CR or LF;
* the scheme (the text before the first ``://``, lower-cased) is one of
  ``http``, ``https``, ``ftp``, ``ftps``;
* the whole value matches, case-insensitively: ``scheme://``, optional
  ``user[:password]@`` (no whitespace, ``:``, ``@`` or ``/`` in the user,
  no whitespace, ``@`` or ``/`` in the password), a host, an optional port of
  2 to 5 digits, then an optional part that starts with ``/``, ``?`` or ``#``
  and holds no whitespace;
* the host is an IPv4 address (four decimal octets 0-255, no leading zeros),
  a bracketed IPv6 literal (``[`` hex digits, ``:`` and ``.`` ``]``, then
  checked by Python's ``ipaddress``), ``localhost``, or a domain name: labels
  of letters (any character from U+00A1 to U+FFFF counts as a letter), digits
  and ``-`` that neither start nor end with ``-``, the first at most 63
  characters, and a last label (the TLD) of 2 to 63 letters or ``-``, or
  ``xn--`` and 1 to 59 ASCII letters or digits, optionally followed by a dot;
* when that match fails, the ``netloc`` is converted with Python's ``idna``
  codec (IDNA 2003: nameprep, then punycode per label; an empty or too long
  label is an error, and then the URL is invalid) and the URL put back
  together with ``urlunsplit`` is matched once more;
* finally the host name (``urlsplit(value).hostname``) is at most 253
  characters; a URL without one is invalid.

``\\d`` in the port and in the IPv4 octets is Python's Unicode ``\\d`` (any
decimal digit), as in the original. Everything here is a pure function of the
string.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit, urlunsplit

#: the schemes Django's URLValidator accepts by default
ALLOWED_SCHEMES = frozenset(("http", "https", "ftp", "ftps"))
#: URLValidator.max_length
MAX_URL_LENGTH = 2048
#: a full host name is at most 253 characters (RFC 1034 3.1)
MAX_HOST_NAME_LENGTH = 253
#: characters that fail the URL at once
UNSAFE_CHARACTERS = frozenset("\t\r\n")

_LETTER = "a-z\u00a1-\uffff"
_OCTET = r"(?:0|25[0-5]|2[0-4]\d|1\d?\d?|[1-9]\d?)"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_IPV6_LITERAL = r"\[[0-9a-f:.]+\]"
_FIRST_LABEL = rf"[{_LETTER}0-9](?:[{_LETTER}0-9-]{{0,61}}[{_LETTER}0-9])?"
_MIDDLE_LABELS = rf"(?:\.(?!-)[{_LETTER}0-9-]{{1,63}}(?<!-))*"
_TOP_LABEL = rf"\.(?!-)(?:[{_LETTER}-]{{2,63}}|xn--[a-z0-9]{{1,59}})(?<!-)\.?"
_HOST = rf"(?:{_FIRST_LABEL}{_MIDDLE_LABELS}{_TOP_LABEL}|localhost)"

_URL_RE = re.compile(
    r"^[a-z0-9.+-]*://"  # the scheme itself is checked apart
    r"(?:[^\s:@/]+(?::[^\s:@/]*)?@)?"  # user info
    rf"(?:{_IPV4}|{_IPV6_LITERAL}|{_HOST})"
    r"(?::\d{2,5})?"  # port
    r"(?:[/?#][^\s]*)?"  # path, query, fragment
    r"\Z",
    re.IGNORECASE,
)
_BRACKETED_NETLOC_RE = re.compile(r"^\[(.+)\](?::\d{2,5})?$")


def _matches(value: str) -> bool:
    return _URL_RE.match(value) is not None


def _idna_netloc(value: str) -> str | None:
    """``value`` with its netloc converted by the ``idna`` codec; None when that fails."""
    try:
        scheme, netloc, path, query, fragment = urlsplit(value)
    except ValueError:
        return None
    try:
        netloc = netloc.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    return urlunsplit((scheme, netloc, path, query, fragment))


def is_valid_url(value: object) -> bool:
    """True when Django 3.2's ``URLValidator()`` accepts ``value`` (see the module text)."""
    if not isinstance(value, str) or len(value) > MAX_URL_LENGTH:
        return False
    if not UNSAFE_CHARACTERS.isdisjoint(value):
        return False
    if value.split("://")[0].lower() not in ALLOWED_SCHEMES:
        return False
    try:
        if _matches(value):
            match = _BRACKETED_NETLOC_RE.search(urlsplit(value).netloc)
            if match is not None:
                try:
                    ipaddress.IPv6Address(match.group(1))
                except ValueError:
                    return False
        else:
            converted = _idna_netloc(value)
            if converted is None or not _matches(converted):
                return False
        host = urlsplit(value).hostname
    except ValueError:
        return False
    return host is not None and len(host) <= MAX_HOST_NAME_LENGTH


__all__ = ["ALLOWED_SCHEMES", "MAX_URL_LENGTH", "is_valid_url"]
