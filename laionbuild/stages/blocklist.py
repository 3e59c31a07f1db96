"""Block lists: URLs, domains and hashes whose rows are never fetched nor published.

A :class:`Blocklist` loads its lists once (construct it once per worker) and
answers, for a row, the first list that names it. Lists are plain text, one
entry per line, ``#`` lines ignored, ``.gz`` allowed, read through fsspec:

``url``
    image URLs. Both sides are compared in a normal form: surrounding blanks
    removed, scheme and host lower-cased, the default port and the
    ``#fragment`` dropped (path and query keep their case).
``domain``
    host names; an entry blocks the host and all its sub-domains
    (``example.com`` blocks ``example.com`` and ``img.cdn.example.com``, not
    ``badexample.com``). ``*.example.com``, ``.example.com`` and full URLs are
    read as ``example.com``; IP literals match exactly.
``hash``
    one hash per line, optionally prefixed ``laion:`` / ``md5:`` / ``sha1:`` /
    ``sha256:``. Without a prefix a decimal integer is LAION-5B's ``hash``
    column (:func:`laionbuild.schema.pair_hash` of URL and TEXT, signed 64-bit;
    an unsigned spelling is accepted too), and 32 / 40 / 64 hex digits are the
    md5 / sha1 / sha256 of the URL's UTF-8 bytes exactly as it appears in the
    data (not normalised).

Each list is named by its file name (``name#2`` on a clash); a row dropped by
a list gets ``DROP_REASON = "<prefix>:<name>"`` (prefix ``blocklist``), so the
pipeline counts removals per list. When several lists name a row, the first
list in configuration order (URL lists, then domain lists, then hash lists)
gets the count.

The same class filters published parquet tables (:meth:`Blocklist.table_matches`)
and the recorded removal lists of ``laionbuild remove`` (prefix ``removed``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import posixpath
import re
import tarfile
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Sequence
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pyarrow as pa

from .. import schema as S
from ..config import BlocklistConfig
from ..errors import ConfigError
from ..stats import StageCounters
from . import shards

logger = logging.getLogger(__name__)

STAGE = "blocklist"
KINDS = ("url", "domain", "hash")
_DIGESTS = {32: "md5", 40: "sha1", 64: "sha256"}
_HEX = re.compile(r"^[0-9a-f]+$")
_INT = re.compile(r"^[+-]?[0-9]{1,20}$")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_NO_MATCH = 1 << 62


@dataclass
class ListInfo:
    """What one loaded list holds (recorded in provenance)."""

    name: str
    kind: str
    path: str
    entries: int
    invalid: int
    sha256: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# --------------------------------------------------------------------------- normal forms
def normalize_url(url: str) -> str:
    """The form URL lists are compared in (see the module docstring)."""
    text = str(url).strip()
    try:
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        host = (parts.hostname or "").rstrip(".")
        port = parts.port
    except ValueError:
        return text
    if not parts.netloc:
        return text.split("#", 1)[0]
    netloc = host
    if ":" in host:  # IPv6 literal
        netloc = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        netloc = f"{netloc}:{port}"
    if "@" in parts.netloc:
        netloc = parts.netloc.rsplit("@", 1)[0] + "@" + netloc
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))


def url_host(url: str) -> str:
    """Lower-case host of ``url`` (IDNA-encoded), or ""."""
    try:
        host = urlsplit(str(url).strip()).hostname or ""
    except ValueError:
        return ""
    return _ascii_host(host)


def _ascii_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host and not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            pass
    return host


def normalize_domain(entry: str) -> str:
    entry = entry.strip()
    if "://" in entry:
        entry = url_host(entry)
    entry = entry.lower()
    while entry.startswith("*.") or entry.startswith("."):
        entry = entry[2:] if entry.startswith("*.") else entry[1:]
    if entry.startswith("[") and entry.endswith("]"):
        entry = entry[1:-1]
    return _ascii_host(entry.split("/", 1)[0])


def _host_suffixes(host: str) -> Iterable[str]:
    if not host:
        return ()
    if ":" in host or host.replace(".", "").isdigit():
        return (host,)
    labels = host.split(".")
    return (".".join(labels[i:]) for i in range(len(labels)))


def parse_hash(entry: str) -> tuple[str, int | str] | None:
    """``("laion", int)`` or ``(<digest name>, hex)`` for one hash-list entry, None if unreadable."""
    text = entry.strip().lower()
    kind = ""
    if ":" in text:
        kind, text = (p.strip() for p in text.split(":", 1))
        if kind not in ("laion", "md5", "sha1", "sha256"):
            return None
    if kind in ("", "laion") and _INT.match(text):
        value = int(text)
        if value >= 1 << 63:
            value -= 1 << 64  # unsigned spelling of the signed 64-bit hash
        if not -(1 << 63) <= value < (1 << 63):
            return None
        return "laion", value
    if kind == "laion":
        return None
    if _HEX.match(text) and len(text) in _DIGESTS and (not kind or _DIGESTS[len(text)] == kind):
        return _DIGESTS[len(text)], text
    return None


# --------------------------------------------------------------------------- reading lists
def read_list_bytes(path: str) -> bytes:
    from ..output.fs import open_fs

    fs, key = open_fs(path)
    with fs.open(key, "rb") as fh:
        return fh.read()


def list_lines(data: bytes, path: str = "") -> Iterable[str]:
    if path.endswith(".gz") or data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if b"\x00" in data:
        raise ValueError("binary data, not a text list")
    for line in data.decode("utf-8", errors="replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            yield line


def list_name(path: str) -> str:
    name = posixpath.basename(str(path).rstrip("/")) or str(path)
    return name[:-3] if name.endswith(".gz") else name


# --------------------------------------------------------------------------- the lists
class Blocklist:
    """URL, domain and hash lists loaded once; matches rows, batches and tables."""

    def __init__(self, prefix: str = STAGE):
        self.prefix = prefix
        self.lists: list[ListInfo] = []
        self._urls: dict[str, int] = {}
        self._domains: dict[str, int] = {}
        self._pairs: dict[int, int] = {}
        self._digests: dict[str, dict[str, int]] = {}

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, cfg: BlocklistConfig, prefix: str = STAGE) -> "Blocklist":
        """Load every list named in ``cfg``; a missing or unreadable file is a ConfigError."""
        bl = cls(prefix)
        for kind, paths in (("url", cfg.url_files), ("domain", cfg.domain_files), ("hash", cfg.hash_files)):
            for path in paths:
                bl.add_file(path, kind)
        return bl

    def add_file(self, path: str, kind: str, name: str | None = None) -> ListInfo:
        try:
            data = read_list_bytes(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"blocklist: cannot read {kind} list {path}: {exc}") from None
        return self.add_bytes(data, kind, name or list_name(path), path)

    def add_bytes(self, data: bytes, kind: str, name: str, path: str = "") -> ListInfo:
        if kind not in KINDS:
            raise ConfigError(f"blocklist: unknown list kind {kind!r} (one of {', '.join(KINDS)})")
        taken = {info.name for info in self.lists}
        base, k = name, 1
        while name in taken:
            k += 1
            name = f"{base}#{k}"
        index = len(self.lists)
        entries = invalid = 0
        try:
            lines = list(list_lines(data, path))
        except (OSError, EOFError, ValueError) as exc:  # a broken .gz
            raise ConfigError(f"blocklist: cannot read {kind} list {path or name}: {exc}") from None
        for line in lines:
            if kind == "url":
                self._urls.setdefault(normalize_url(line), index)
            elif kind == "domain":
                domain = normalize_domain(line.split()[0])
                if not domain:
                    invalid += 1
                    continue
                self._domains.setdefault(domain, index)
            else:
                parsed = parse_hash(line.split()[0])
                if parsed is None:
                    invalid += 1
                    continue
                algo, value = parsed
                if algo == "laion":
                    self._pairs.setdefault(int(value), index)
                else:
                    self._digests.setdefault(algo, {}).setdefault(str(value), index)
            entries += 1
        if invalid:
            logger.warning("blocklist %s: %d unreadable %s entries skipped", name, invalid, kind)
        info = ListInfo(name, kind, path, entries, invalid, hashlib.sha256(data).hexdigest())
        self.lists.append(info)
        logger.info("blocklist %s: %d %s entries", name, entries, kind)
        return info

    # ------------------------------------------------------------------ matching
    @property
    def empty(self) -> bool:
        return not (self._urls or self._domains or self._pairs or self._digests)

    def _index(self, url, pair_hash=None) -> int:
        best = _NO_MATCH
        if not isinstance(url, str):
            url = "" if url is None else str(url)
        if self._urls:
            best = min(best, self._urls.get(normalize_url(url), _NO_MATCH))
        if self._domains:
            for suffix in _host_suffixes(url_host(url)):
                best = min(best, self._domains.get(suffix, _NO_MATCH))
        if self._digests:
            raw = url.encode("utf-8", errors="surrogatepass")
            for algo, table in self._digests.items():
                best = min(best, table.get(hashlib.new(algo, raw).hexdigest(), _NO_MATCH))
        if self._pairs and pair_hash is not None:
            best = min(best, self._pairs.get(int(pair_hash), _NO_MATCH))
        return best

    def match(self, url, pair_hash: int | None = None) -> str | None:
        """Name of the first list naming this row, or None."""
        i = self._index(url, pair_hash)
        return None if i == _NO_MATCH else self.lists[i].name

    def match_url(self, url) -> str | None:
        """Like :meth:`match` from the URL alone (URL, domain and URL-hash lists)."""
        return self.match(url, None)

    def reason(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    # ------------------------------------------------------------------ batches
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Drop the live rows of a batch that a list names; other rows pass unchanged."""
        if self.empty:
            return batch
        n = S.batch_len(batch)
        drop = batch.get(S.DROP_REASON)
        drop = np.full(n, "", dtype=object) if drop is None else np.array(drop, dtype=object, copy=True)
        urls = batch.get(S.URL, np.full(n, "", dtype=object))
        hashes = self._pair_hashes(batch, n)
        for i in range(n):
            if drop[i]:
                continue
            name = self.match(urls[i], None if hashes is None else hashes[i])
            if name is not None:
                drop[i] = self.reason(name)
        out = dict(batch)
        out[S.DROP_REASON] = drop
        return out

    def _pair_hashes(self, batch, n: int):
        if not self._pairs:
            return None
        if S.HASH in batch:
            return np.asarray(batch[S.HASH], dtype=np.int64)
        if S.URL in batch and S.ALT_TEXT in batch:
            return S.pair_hashes(batch[S.URL], batch[S.ALT_TEXT])
        return None

    def counters(self, batch: dict[str, np.ndarray]) -> StageCounters:
        """Rows of ``batch`` (just out of this list) it dropped, by list; live rows as ``kept``."""
        return blocklist_counters(batch, self.prefix)

    # ------------------------------------------------------------------ published tables
    def table_matches(self, urls: Sequence, hashes: Sequence | None) -> list[str | None]:
        """Per row of a published table (``URL`` / ``hash`` columns): the list naming it, or None."""
        if self.empty:
            return [None] * len(urls)
        if hashes is None or not self._pairs:
            return [self.match(u) for u in urls]
        return [self.match(u, h) for u, h in zip(urls, hashes)]

    def describe(self) -> list[dict]:
        return [info.to_dict() for info in self.lists]


# --------------------------------------------------------------------------- per-process cache
_CACHE: dict[tuple, Blocklist] = {}
_CACHE_LOCK = threading.Lock()


def blocklist_counters(batch: dict[str, np.ndarray], prefix: str = STAGE, later: Sequence[str] = ()) -> StageCounters:
    """Counters of the block-list stage: rows it dropped by list; ``kept`` = rows it let through
    (alive, or dropped afterwards by one of the ``later`` stages)."""
    counters = StageCounters()
    drop = batch.get(S.DROP_REASON)
    if drop is None:
        counters.kept = S.batch_len(batch)
        return counters
    for reason in drop:
        stage, _, why = str(reason).partition(":")
        if not reason or stage in later:
            counters.kept += 1
        elif stage == prefix:
            counters.drop(why)
    return counters


# --------------------------------------------------------------------------- published tables and image tars
def filter_table(table: pa.Table, lists: Iterable[Blocklist]) -> tuple[pa.Table, Counter, set[str]]:
    """Rows of a published table that no list names; removed rows per ``<prefix>:<list>``; their keys.

    The first list set that names a row gets it (block lists before removal lists).
    """
    lists = [bl for bl in lists if not bl.empty]
    counts: Counter = Counter()
    if not lists or table.num_rows == 0 or "URL" not in table.column_names:
        return table, counts, set()
    urls = table.column("URL").to_pylist()
    hashes = table.column("hash").to_pylist() if "hash" in table.column_names else None
    names: list[str | None] = [None] * len(urls)
    for bl in lists:
        for i, name in enumerate(bl.table_matches(urls, hashes)):
            if name is not None and names[i] is None:
                names[i] = bl.reason(name)
    hit = [n is not None for n in names]
    if not any(hit):
        return table, counts, set()
    counts.update(n for n in names if n is not None)
    keys = set()
    if "key" in table.column_names:
        keys = {k for k, h in zip(table.column("key").to_pylist(), hit) if h}
    keep = pa.array([not h for h in hit], pa.bool_())
    return table.filter(keep), counts, keys


def filter_image_tar(fs, path: str, lists: Iterable[Blocklist], keys: Iterable[str] = (),
                     target: str | None = None, copy_unchanged: bool = True) -> int:
    """Drop the members of the tar ``path`` whose row a list names (or whose key is in ``keys``);
    the result goes to ``target`` (default: ``path`` itself). A tar with nothing to drop is left
    alone, or copied to ``target`` (on object stores a copy inside the store) unless not
    ``copy_unchanged``. Returns the rows dropped."""
    lists = [bl for bl in lists if not bl.empty]
    drop = set(keys)
    if not lists and not drop:
        if copy_unchanged and target is not None and target != path:
            fs.copy(path, target)
        return 0
    with fs.open(path, "rb") as fh:
        data = fh.read()
    members = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for info in tar.getmembers():
            members.append((info, tar.extractfile(info).read() if info.isfile() else b""))
    for info, payload in members:
        if lists and info.name.endswith(".json"):
            try:
                meta = json.loads(payload.decode("utf-8"))
                url, caption = meta.get("url", ""), meta.get("caption", "")
            except (ValueError, UnicodeError, AttributeError):
                continue
            h = S.pair_hash(url, caption)
            if any(bl.match(url, h) is not None for bl in lists):
                drop.add(info.name.rsplit(".", 1)[0])
    gone = {info.name.rsplit(".", 1)[0] for info, _ in members} & drop
    if not gone:
        if copy_unchanged and target is not None and target != path:
            fs.copy(path, target)
        return 0
    sink = io.BytesIO()
    with tarfile.open(fileobj=sink, mode="w") as tar:
        for info, payload in members:
            if info.name.rsplit(".", 1)[0] not in gone:
                tar.addfile(info, io.BytesIO(payload))
    shards.write_bytes_atomic(fs, target or path, sink.getvalue())
    return len(gone)


#: tars filtered at once by :func:`filter_image_tars` (object stores answer each in tens of ms)
TAR_THREADS = 16


def filter_image_tars(fs, folder: str, lists: Iterable[Blocklist], keys: set[str] | None = None,
                      paths: Iterable[str] | None = None, threads: int = TAR_THREADS) -> int:
    """:func:`filter_image_tar` for every tar of ``folder/*.tar`` (or the tars ``paths``), several
    at once; returns the rows dropped."""
    lists = [bl for bl in lists if not bl.empty]
    if not lists and not keys:
        return 0
    if paths is not None:
        tars = sorted(paths)
    else:
        try:
            tars = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".tar"))
        except FileNotFoundError:
            return 0
    if not tars:
        return 0
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(tars)))) as pool:
        return sum(pool.map(lambda p: filter_image_tar(fs, p, lists, keys or ()), tars))


def _signature(paths: Iterable[str]) -> tuple:
    from ..output.fs import open_fs

    sig = []
    for path in paths:
        try:
            fs, p = open_fs(path)
            info = fs.info(p)
            sig.append((path, info.get("size"), info.get("mtime") or info.get("LastModified") or info.get("ETag")))
        except (OSError, ValueError):
            sig.append((path, None, None))
    return tuple(sig)


def cached(cfg: BlocklistConfig, prefix: str = STAGE) -> Blocklist:
    """A :class:`Blocklist` for ``cfg``, loaded once per process while the files stay the same."""
    paths = (*cfg.url_files, *cfg.domain_files, *cfg.hash_files)
    if not paths:
        return Blocklist(prefix)
    key = (prefix, cfg.url_files, cfg.domain_files, cfg.hash_files, _signature(paths))
    with _CACHE_LOCK:
        bl = _CACHE.get(key)
    if bl is None:
        bl = Blocklist.from_config(cfg, prefix)
        with _CACHE_LOCK:
            if len(_CACHE) > 8:
                _CACHE.clear()
            _CACHE[key] = bl
    return bl



# --------------------------------------------------------------------------- registry hooks
def stage_counters(batch: dict[str, np.ndarray], later: Sequence[str] = ()) -> StageCounters:
    """The stage's counters for :mod:`.registry`."""
    return blocklist_counters(batch, later=later)


def check_config(cfg) -> None:
    """A missing or unreadable block list fails here, before any work."""
    Blocklist.from_config(cfg.blocklist)


__all__ = ["Blocklist", "ListInfo", "STAGE", "blocklist_counters", "cached", "filter_image_tar", "filter_image_tars", "filter_table", "normalize_domain", "normalize_url",
           "parse_hash", "url_host"]
