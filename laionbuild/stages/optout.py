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

robots.txt (RFC 9309, parsed by :mod:`urllib.robotparser`)
    rules for our user-agent token (else ``*``). A 4xx answer means no rules;
    a 5xx answer or an unreachable host means everything is disallowed, as
    RFC 9309 asks. :mod:`urllib.robotparser` matches path prefixes only (no
    ``*`` / ``$`` patterns inside rules).
"""

from __future__ import annotations

import json
import re
import threading
import urllib.robotparser
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional
from urllib.parse import unquote

TDMREP_PATH = "/.well-known/tdmrep.json"
ROBOTS_PATH = "/robots.txt"


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


_PATTERNS: dict[str, re.Pattern] = {}


def path_matches(pattern: str, path: str) -> bool:
    """robots.txt-style path pattern: ``*`` matches anything, a final ``$`` anchors the end."""
    rx = _PATTERNS.get(pattern)
    if rx is None:
        pat = pattern if pattern.startswith(("/", "*")) else "/" + pattern
        anchored = pat.endswith("$")
        if anchored:
            pat = pat[:-1]
        rx = re.compile("".join(".*" if c == "*" else re.escape(c) for c in pat) + ("$" if anchored else ""),
                        re.DOTALL)
        if len(_PATTERNS) < 4096:
            _PATTERNS[pattern] = rx
    return rx.match(path) is not None or rx.match(unquote(path)) is not None


def tdm_reserved(rules: Iterable[TdmRule], path: str) -> Optional[TdmRule]:
    """The first rule matching ``path`` if it reserves TDM rights, else None."""
    for rule in rules:
        if path_matches(rule.location, path or "/"):
            return rule if rule.reserved else None
    return None


# --------------------------------------------------------------------------- robots.txt
class RobotsRules:
    """Outcome of one origin's robots.txt."""

    def __init__(self, parser: urllib.robotparser.RobotFileParser | None, disallow_all: bool = False,
                 note: str = ""):
        self.parser = parser
        self.disallow_all = disallow_all
        self.note = note

    def allowed(self, agent: str, path_and_query: str) -> bool:
        if self.disallow_all:
            return False
        if self.parser is None:
            return True
        return self.parser.can_fetch(agent, path_and_query or "/")


def parse_robots(status: int | None, body: bytes = b"", note: str = "") -> RobotsRules:
    """Rules from a robots.txt answer (``status`` None: the host could not be reached)."""
    if status is None or status >= 500:
        return RobotsRules(None, disallow_all=True, note=note or f"robots.txt unavailable ({status})")
    if status >= 400:
        return RobotsRules(None)
    parser = urllib.robotparser.RobotFileParser()
    parser.parse(body.decode("utf-8", errors="replace").splitlines())
    return RobotsRules(parser)


# --------------------------------------------------------------------------- cache
class OriginCache:
    """Thread-safe LRU of per-origin outcomes; one load per key even under concurrency."""

    def __init__(self, size: int = 10_000):
        self.size = max(1, int(size))
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._loading: dict[Any, threading.Event] = {}
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, key, loader: Callable[[], Any]) -> Any:
        while True:
            with self._lock:
                if key in self._data:
                    self._data.move_to_end(key)
                    return self._data[key]
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
            value = None
            try:
                value = loader()
                return value
            finally:
                with self._lock:
                    self.loads += 1
                    self._data[key] = value
                    self._data.move_to_end(key)
                    while len(self._data) > self.size:
                        self._data.popitem(last=False)
                    self._loading.pop(key, None)
                event.set()


__all__ = ["OriginCache", "RobotsRules", "TdmRule", "parse_robots", "parse_tdmrep", "path_matches",
           "tdm_header_reserved", "tdm_reserved", "ROBOTS_PATH", "TDMREP_PATH"]
