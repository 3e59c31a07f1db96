"""Machine-readable opt-outs beyond ``X-Robots-Tag``: TDMRep and robots.txt.

Pure parsing and matching, used by :class:`laionbuild.stages.fetch.ImageFetcher`
(which downloads the files through its own SSRF-safe connection logic and
caches one outcome per origin with :class:`OriginCache`).

TDM Reservation Protocol (W3C TDMRep community group report)
    * the ``tdm-reservation`` response header of the image: ``1`` reserves
      text-and-data-mining rights (the image is skipped), ``0`` does not;
    * ``/.well-known/tdmrep.json`` of the origin: a JSON array of rules
      ``{"location": "/images/*", "tdm-reservation": 1, "tdm-policy": "..."}``.
      ``location`` is a path pattern as in robots.txt (``*`` any characters,
      a final ``$`` anchors the end, otherwise a prefix); the first rule whose
      location matches the image path decides. A missing (4xx), unreadable or
      malformed file reserves nothing.

robots.txt (RFC 9309, our own parser and matcher)
    * groups: consecutive ``User-agent`` lines share the rules that follow them;
      the rules of every group naming our product token (compared
      case-insensitively and whole: ``laion`` is not ``laionbuild``) are
      combined, else those of the ``*`` groups, else there are none;
    * ``Allow`` / ``Disallow`` paths with ``*`` (any characters) and a final
      ``$`` (end of the path); the query is part of the path matched. Both the
      rule and the path are compared in one percent-encoded form (non-ASCII
      octets and characters not allowed in a URI encoded, encoded unreserved
      characters decoded, RFC 9309 section 2.2.2); ``%2A`` / ``%24`` in a rule
      match a ``*`` / ``$`` of the path;
    * the rule with the most octets that matches decides, ``Allow`` wins a
      tie, an empty ``Disallow`` allows, no matching rule allows;
      ``/robots.txt`` itself is always allowed;
    * comments, a byte order mark, CR / LF / CRLF line ends and lines without
      a colon are handled; ``Crawl-delay``, ``Sitemap`` and other records are
      not used (``fetch.per_host_concurrency`` limits the load on a host).

    A 4xx answer means no rules; a 5xx answer, a 429 (too many requests) or an
    unreachable host means everything is disallowed, as RFC 9309 asks for a
    server error (the fetcher's status ``robots_txt_unavailable``: not an
    opt-out). Redirects are followed up to :data:`ROBOTS_MAX_REDIRECTS` (5) in
    a row, across hosts too; a further one, or one that cannot be followed (to
    another scheme, a blocked address, a malformed URL), leaves the file
    "unavailable" (RFC 9309 section 2.3.1.2), which is handled like a 4xx: no
    rules. The fetcher keeps a file it read for :data:`ROBOTS_KEEP_S`
    (24 hours) and one it could not read for ``fetch.policy_retry_s`` only. The fetcher reads at most
    ``fetch.policy_max_bytes`` of the file and uses what it read.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

TDMREP_PATH = "/.well-known/tdmrep.json"
ROBOTS_PATH = "/robots.txt"
#: seconds a robots.txt that was read is used before it is read again (RFC 9309 section 2.4:
#: a cached copy should not be used for more than 24 hours)
ROBOTS_KEEP_S = 24 * 3600.0
#: redirects followed in a row for a robots.txt (and a tdmrep.json): RFC 9309 section 2.3.1.2
#: asks for at least five; beyond them, or at one that cannot be followed, the file is
#: unavailable (no rules)
ROBOTS_MAX_REDIRECTS = 5


# --------------------------------------------------------------------------- TDMRep
def tdm_header_reserved(values: Iterable[str]) -> bool:
    """Whether ``tdm-reservation`` header values reserve TDM rights (value ``1``)."""
    for value in values:
        if str(value).strip().strip('"') == "1":
            return True
    return False


@dataclass(frozen=True)
class TdmRule:
    location: str
    reserved: bool
    policy: str = ""


def parse_tdmrep(data: bytes) -> list[TdmRule]:
    """Rules of a ``tdmrep.json`` body; malformed input gives no rules."""
    try:
        doc = json.loads(data.decode("utf-8-sig", errors="replace"))
    except (ValueError, UnicodeError):
        return []
    if isinstance(doc, dict):  # tolerate a single rule object
        doc = [doc]
    if not isinstance(doc, list):
        return []
    rules = []
    for item in doc:
        if not isinstance(item, dict):
            continue
        location = item.get("location")
        if not isinstance(location, str) or not location:
            continue
        value = item.get("tdm-reservation")
        reserved = str(value).strip() == "1" if value is not None else False
        policy = item.get("tdm-policy") if isinstance(item.get("tdm-policy"), str) else ""
        rules.append(TdmRule(location.strip(), reserved, policy))
    return rules


# --------------------------------------------------------------------------- path patterns
#: RFC 3986 characters that stand for themselves in a URI; a percent-encoded one is decoded
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
#: RFC 3986 reserved characters: kept as written, and never equal to their percent-encoded form,
#: except ``*`` and ``$`` (see :func:`canonical_path`)
_RESERVED = frozenset(":/?#[]@!&'()+,;=")
_HEX = frozenset("0123456789abcdefABCDEF")


def _octets(char: str) -> str:
    """``%XX`` for each octet of one character (a lone surrogate from ``surrogateescape``
    stands for the undecodable octet it replaced)."""
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        return f"%{code - 0xDC00:02X}"
    return "".join(f"%{b:02X}" for b in char.encode("utf-8", errors="surrogatepass"))


def _canonical(text: str, pattern: bool) -> tuple[list[str], bool, int]:
    """``(literal pieces between wildcards, anchored at the end, octets)`` of a path or pattern.

    The form RFC 9309 section 2.2.2 compares: non-ASCII octets and characters that may not
    stand in a URI percent-encoded, percent-encoded unreserved characters decoded, the hex
    digits of the others upper-cased. In a ``pattern`` a ``*`` matches any characters and a
    final ``$`` anchors the end; a ``*`` or ``$`` meant as itself is written ``%2A`` / ``%24``
    there, so a literal ``*`` / ``$`` of a path is compared as ``%2A`` / ``%24``.
    """
    pieces: list[str] = []
    out: list[str] = []
    anchored = False
    octets = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "%" and i + 2 < n and text[i + 1] in _HEX and text[i + 2] in _HEX:
            char = chr(int(text[i + 1:i + 3], 16))
            token = char if char in _UNRESERVED else "%" + text[i + 1:i + 3].upper()
            i += 3
        elif pattern and c == "*":
            pieces.append("".join(out))
            out = []
            octets += 1
            i += 1
            continue
        elif pattern and c == "$" and i == n - 1:
            anchored = True
            octets += 1
            break
        elif c in _UNRESERVED or c in _RESERVED:
            token = c
            i += 1
        else:  # "%" not starting an escape, "*", "$", space, controls, non-ASCII...
            token = _octets(c)
            i += 1
        out.append(token)
        octets += 1 if len(token) == 1 else len(token) // 3
    pieces.append("".join(out))
    return pieces, anchored, octets


def canonical_path(path: str) -> str:
    """A URI path (and query) in the form rules are compared with (see :func:`_canonical`)."""
    return _canonical(path or "/", False)[0][0]


class PathPattern:
    """A robots.txt path pattern (RFC 9309 section 2.2.3): ``*`` matches any characters, a
    final ``$`` anchors the end, otherwise the pattern is a prefix. Matching is linear in
    the path's length whatever the number of ``*``.
    """

    __slots__ = ("pieces", "anchored", "octets")

    def __init__(self, pattern: str):
        if not pattern.startswith(("/", "*")):
            pattern = "/" + pattern
        pieces, anchored, octets = _canonical(pattern, True)
        self.pieces = tuple(pieces)
        self.anchored = anchored
        #: specificity: octets of the pattern (a ``*`` or ``$`` counts one)
        self.octets = octets

    def matches(self, path: str) -> bool:
        """Whether the canonical ``path`` (:func:`canonical_path`) matches."""
        pieces = self.pieces
        if not path.startswith(pieces[0]):
            return False
        if len(pieces) == 1:
            return not self.anchored or len(path) == len(pieces[0])
        pos = len(pieces[0])
        middle = pieces[1:-1] if self.anchored else pieces[1:]
        for piece in middle:  # the leftmost place of each piece leaves the most room for the rest
            pos = path.find(piece, pos)
            if pos < 0:
                return False
            pos += len(piece)
        if not self.anchored:
            return True
        last = pieces[-1]
        return path.endswith(last) and len(path) - len(last) >= pos


_PATTERNS: "OrderedDict[str, PathPattern]" = OrderedDict()
_PATTERNS_LOCK = threading.Lock()


def _pattern(pattern: str) -> PathPattern:
    with _PATTERNS_LOCK:
        compiled = _PATTERNS.get(pattern)
    if compiled is None:
        compiled = PathPattern(pattern)
        with _PATTERNS_LOCK:
            _PATTERNS[pattern] = compiled
            if len(_PATTERNS) > 4096:
                _PATTERNS.popitem(last=False)
    return compiled


def path_matches(pattern: str, path: str) -> bool:
    """robots.txt-style path pattern: ``*`` matches anything, a final ``$`` anchors the end,
    otherwise a prefix; percent-encoding is normalised on both sides (RFC 9309)."""
    return _pattern(pattern).matches(canonical_path(path))


def tdm_reserved(rules: Iterable[TdmRule], path: str) -> Optional[TdmRule]:
    """The first rule matching ``path`` if it reserves TDM rights, else None."""
    canon = None  # put in the compared form once, for every rule
    for rule in rules:
        if canon is None:
            canon = canonical_path(path or "/")
        if _pattern(rule.location).matches(canon):
            return rule if rule.reserved else None
    return None


# --------------------------------------------------------------------------- robots.txt
_LINE_END = re.compile(rb"\r\n|\r|\n")
_AGENT_TOKEN = re.compile(r"[^\s/]*")


@dataclass(frozen=True)
class RobotsRule:
    allow: bool
    pattern: PathPattern
    text: str


def _agent_token(value: str) -> str:
    """The product token a ``User-agent`` line names, lower-cased (``Foo/1.0`` names ``foo``)."""
    return _AGENT_TOKEN.match(value.strip()).group().lower()


def _parse_groups(body: bytes) -> list[tuple[frozenset[str], list[RobotsRule]]]:
    """The groups of a robots.txt (RFC 9309 section 2.1): ``(product tokens, rules)``.

    Consecutive ``User-agent`` lines open one group; its ``Allow`` / ``Disallow`` lines follow
    until the next ``User-agent`` line. Keys are matched case-insensitively; comments, a
    byte order mark, lines without a colon, rules before any ``User-agent`` line and other
    records (``Sitemap``, ``Crawl-delay``...) are passed over. Undecodable octets are kept as
    the octets they are.
    """
    if body.startswith(b"\xef\xbb\xbf"):
        body = body[3:]
    groups: list[tuple[frozenset[str], list[RobotsRule]]] = []
    agents: set[str] = set()
    rules: list[RobotsRule] = []
    in_group = False  # a User-agent line has been read
    in_rules = False  # the current group has had a rule: a User-agent line opens a new one
    for raw in _LINE_END.split(body):
        line = raw.split(b"#", 1)[0].decode("utf-8", errors="surrogateescape")
        key, colon, value = line.partition(":")
        if not colon:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "user-agent":
            if in_rules:
                groups.append((frozenset(agents), rules))
                agents, rules, in_rules = set(), [], False
            in_group = True
            token = _agent_token(value)
            if token:
                agents.add(token)
        elif key in ("allow", "disallow"):
            if not in_group:
                continue  # before the first group
            in_rules = True
            if value:  # an empty rule matches nothing ("Disallow:" allows everything)
                rules.append(RobotsRule(key == "allow", PathPattern(value), value))
    if in_group:
        groups.append((frozenset(agents), rules))
    return groups


class RobotsRules:
    """Outcome of one origin's robots.txt.

    ``allowed(agent, path_and_query)`` follows RFC 9309: the rules of every group naming
    ``agent`` (the product token, compared case-insensitively and whole), else those of the
    ``*`` groups; the rule matching the most octets of its pattern decides, ``Allow`` winning
    a tie; no matching rule allows. ``/robots.txt`` itself is always allowed.
    """

    def __init__(self, groups: list[tuple[frozenset[str], list[RobotsRule]]] | None = None,
                 disallow_all: bool = False, note: str = ""):
        self.groups = groups or []
        self.disallow_all = disallow_all
        self.note = note
        self._by_agent: dict[str, list[RobotsRule]] = {}
        self._lock = threading.Lock()

    def rules_for(self, agent: str) -> list[RobotsRule]:
        """The rules ``agent`` obeys, most specific first (an ``Allow`` before a ``Disallow``
        of the same length)."""
        agent = (agent or "*").lower()
        with self._lock:
            rules = self._by_agent.get(agent)
        if rules is None:
            chosen = [r for names, group in self.groups if agent in names for r in group]
            if not any(agent in names for names, _ in self.groups):
                chosen = [r for names, group in self.groups if "*" in names for r in group]
            unique = {(r.allow, r.text): r for r in chosen}
            rules = sorted(unique.values(), key=lambda r: (-r.pattern.octets, not r.allow))
            with self._lock:
                self._by_agent[agent] = rules
        return rules

    def allowed(self, agent: str, path_and_query: str) -> bool:
        if self.disallow_all:
            return False
        path = canonical_path(path_and_query or "/")
        if path == ROBOTS_PATH:
            return True
        for rule in self.rules_for(agent):
            if rule.pattern.matches(path):
                return rule.allow
        return True


def unreadable(status: int | None) -> bool:
    """An opt-out file's answer that says nothing of the publisher's wishes: no answer (None), a
    server error, or too many requests (429: the server is overloaded, as with a 5xx)."""
    return status is None or status >= 500 or status == 429


def parse_robots(status: int | None, body: bytes = b"", note: str = "") -> RobotsRules:
    """Rules from a robots.txt answer (``status`` None: the host could not be reached).

    5xx, 429 (too many requests: the server is overloaded, as with a 5xx) and an
    unreachable host disallow everything; any other 4xx means there are no rules, and so
    does a 3xx: a redirect that was not followed (more than :data:`ROBOTS_MAX_REDIRECTS`,
    or one that cannot be), which RFC 9309 section 2.3.1.2 calls unavailable.
    """
    if unreadable(status):
        why = "unreachable" if status is None else f"HTTP {status}"
        return RobotsRules(None, disallow_all=True, note=note or f"{ROBOTS_PATH} unavailable ({why})")
    if status >= 300:
        return RobotsRules(None)
    return RobotsRules(_parse_groups(body))


# --------------------------------------------------------------------------- cache
class OriginCache:
    """Thread-safe LRU of per-origin outcomes; one load per key even under concurrency.

    ``get(key, loader, keep_s)``: ``keep_s(value)`` is how many seconds a loaded value is
    used (None: as long as it stays in the cache); after that the next ``get`` loads it again.
    """

    def __init__(self, size: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.size = max(1, int(size))
        self.clock = clock
        self._data: OrderedDict[Any, tuple[Any, Optional[float]]] = OrderedDict()  # key -> (value, expiry)
        self._loading: dict[Any, threading.Event] = {}
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, key, loader: Callable[[], Any],
            keep_s: Optional[Callable[[Any], Optional[float]]] = None) -> Any:
        while True:
            with self._lock:
                entry = self._data.get(key)
                if entry is not None:
                    value, expiry = entry
                    if expiry is None or self.clock() < expiry:
                        self._data.move_to_end(key)
                        return value
                    del self._data[key]  # expired: load it again
                event = self._loading.get(key)
                if event is None:
                    event = threading.Event()
                    self._loading[key] = event
                    owner = True
                else:
                    owner = False
            if not owner:
                event.wait()
                continue  # loaded (or evicted already: then load again)
            loaded = False
            try:
                value = loader()
                loaded = True
                return value
            finally:  # a loader that raised leaves nothing behind: the next get loads again
                seconds = keep_s(value) if loaded and keep_s is not None and value is not None else None
                with self._lock:
                    self.loads += 1
                    if loaded:
                        self._data[key] = (value, None if seconds is None else self.clock() + seconds)
                        self._data.move_to_end(key)
                        while len(self._data) > self.size:
                            self._data.popitem(last=False)
                    self._loading.pop(key, None)
                event.set()


__all__ = ["OriginCache", "RobotsRules", "TdmRule", "parse_robots", "parse_tdmrep", "path_matches",
           "tdm_header_reserved", "tdm_reserved", "ROBOTS_KEEP_S", "ROBOTS_MAX_REDIRECTS", "ROBOTS_PATH",
           "TDMREP_PATH"]
