"""Turn the configured inputs into the ordered list of WARC files to process.

An input is one of:

* a local file path or a glob (``data/*.warc.gz``),
* a remote URL read through fsspec (``https://...``, ``s3://bucket/key``); on a
  filesystem that lists (``s3://``, ``gs://``...) also a glob or a folder, expanded
  from one listing, in sorted order,
* a Common Crawl listing (``warc.paths`` / ``warc.paths.gz``, local or remote):
  every line is a path relative to ``run.paths_base_url``.

``run.limit`` keeps the first N files, ``run.shard = "i/n"`` every n-th file
starting at i (applied after ``limit``), so that n independent jobs can split
one crawl.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .config import RunConfig
from .errors import SetupError, error_cause

_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
#: schemes read as single files: no listing, no folders (a ``*`` in such a URL is part of its name)
_PLAIN_URL_SCHEMES = ("http", "https")


def is_url(path: str) -> bool:
    return bool(_URL_RE.match(path)) and not path.startswith("file://")


def _is_listing(path: str) -> bool:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.endswith(".paths") or name.endswith(".paths.gz")


def _read_bytes(path: str) -> bytes:
    if is_url(path):
        from .output.fs import open_fs

        try:
            fs, key = open_fs(path)
            with fs.open(key, "rb") as fh:
                return fh.read()
        except Exception as exc:  # network / auth / missing: all a set-up problem
            raise SetupError(f"cannot read listing {path}: {error_cause(exc)}") from None
    try:
        return Path(path.removeprefix("file://")).read_bytes()
    except OSError as exc:
        raise SetupError(f"cannot read listing {path}: {error_cause(exc)}") from None


def read_listing(path: str, base_url: str) -> list[str]:
    """Paths of a ``warc.paths(.gz)`` listing, joined to ``base_url``."""
    raw = _read_bytes(path)
    if path.endswith(".gz"):
        try:
            raw = gzip.GzipFile(fileobj=io.BytesIO(raw)).read()
        except (OSError, EOFError) as exc:
            raise SetupError(f"listing {path} is not valid gzip: {exc}") from None
    if b"\x00" in raw:
        raise SetupError(f"listing {path} holds binary data, not one path per line")
    out = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if is_url(line) or line.startswith(("/", "file://")):
            out.append(line)
        else:
            out.append(base_url.rstrip("/") + "/" + line.lstrip("/"))
    return out


def _is_warc(path: str) -> bool:
    return ".warc" in path.rstrip("/").rsplit("/", 1)[-1]


def _expand_remote(url: str) -> list[str]:
    """A remote glob or folder (``s3://bucket/warc/*.warc.gz``, ``gs://bucket/crawl/``) as its files,
    sorted; anything else (an ``https://`` file, a remote key) as itself."""
    if url.split("://", 1)[0].lower() in _PLAIN_URL_SCHEMES:
        return [url]
    from .output.fs import open_fs, url_of

    try:
        fs, path = open_fs(url)
        if any(ch in path for ch in "*?["):
            found = sorted(fs.glob(path))  # one listing of the prefix before the first wildcard
            if not found:
                raise SetupError(f"input glob matches no file: {url}")
            return [url_of(fs, p) for p in found]
        if url.endswith("/") or fs.isdir(path):
            found = sorted(p for p in fs.find(path) if _is_warc(p))
            if not found:
                raise SetupError(f"input folder holds no *.warc* file: {url}")
            return [url_of(fs, p) for p in found]
    except SetupError:
        raise
    except Exception as exc:  # credentials, endpoint, missing bucket: a set-up problem
        raise SetupError(f"cannot list input {url}: {type(exc).__name__}: {exc}") from None
    return [url]


#: local input files checked at once before a run starts
CHECK_THREADS = 32


def _check_local_file(path: str, shown: str) -> None:
    """A local input file that is missing or cannot be read stops the run before any work."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # non-blocking: a FIFO does not wait for a writer
    except FileNotFoundError:
        raise SetupError(f"input path does not exist: {shown}") from None
    except IsADirectoryError:
        raise SetupError(f"input {shown} is a folder; list it as an input of its own") from None
    except OSError as exc:
        raise SetupError(f"cannot read input {shown}: {error_cause(exc)}") from None


def _check_not_around_output(folder: str, shown: str, output: str) -> None:
    """An input folder that is, or holds, the output folder would read the run's own files
    (named after its inputs) as inputs when the command is run again."""
    if not output or is_url(output):
        return
    inside, out = Path(folder).resolve(), Path(output).resolve()
    if out == inside or inside in out.parents:
        raise SetupError(f"input folder {shown} holds the output folder {output}: a rerun would read "
                         "the run's own files as inputs; give an output outside it")


def expand_inputs(inputs: tuple[str, ...] | list[str], run: RunConfig) -> list[str]:
    """Expand globs and listings, check local paths exist, apply limit and shard."""
    if not inputs:
        raise SetupError("no input given: pass --input PATH (or set run.inputs in the config)")
    files: list[str] = []
    #: local files named by a listing or a glob, checked once limit and shard chose the run's own
    shown: dict[str, str] = {}
    for item in inputs:
        if _is_listing(item):
            listed = read_listing(item, run.paths_base_url)
            if not listed:
                raise SetupError(f"listing {item} holds no path")
            for entry in listed:
                if not is_url(entry):
                    local = _absolute(entry)
                    shown.setdefault(local, f"{entry} (listed in {item})")
                    files.append(local)
                else:
                    files.append(entry)
        elif is_url(item):
            files.extend(_expand_remote(item))
        elif any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item))
            if not matches:
                raise SetupError(f"input glob matches no file: {item}")
            for match in matches:
                if not os.path.isdir(match):
                    shown.setdefault(_absolute(match), match)
            files.extend(_absolute(match) for match in matches)
        else:
            local = item.removeprefix("file://")
            try:
                is_dir = stat.S_ISDIR(os.stat(local).st_mode)
            except FileNotFoundError:
                raise SetupError(f"input path does not exist: {item}") from None
            except OSError as exc:
                raise SetupError(f"cannot read input {item}: {error_cause(exc)}") from None
            if is_dir:
                _check_not_around_output(local, item, run.output)
                if not os.access(local, os.R_OK | os.X_OK):
                    raise SetupError(f"cannot read input folder {item}: permission denied")
                found = sorted(_absolute(str(p)) for p in Path(local).rglob("*") if p.is_file() and _is_warc(p.name))
                if not found:
                    raise SetupError(f"input folder holds no *.warc* file: {item}")
                files.extend(found)
            else:
                _check_local_file(local, item)
                files.append(os.path.abspath(local))
    seen: set[str] = set()
    unique = [f for f in files if not (f in seen or seen.add(f))]
    if run.limit > 0:
        unique = unique[: run.limit]
    if run.shard:
        i, n = (int(x) for x in run.shard.split("/"))
        unique = unique[i::n]
    todo = [path for path in unique if path in shown]
    if todo:  # one open each, many at once: a listing of 100,000 files on a network filesystem
        with ThreadPoolExecutor(max_workers=min(CHECK_THREADS, len(todo))) as pool:
            for _ in pool.map(lambda path: _check_local_file(path.removeprefix("file://"), shown[path]), todo):
                pass  # the first file that fails, in input order, is the one reported
    return unique


def _absolute(local: str) -> str:
    """A local input as the run names it: an absolute path (``file://`` kept). An input is known
    by its name (:func:`file_id`): ``*.warc.gz`` matched in two folders, or ``a/x.warc.gz`` and
    ``./a/x.warc.gz``, must not be one input to a later run."""
    if local.startswith("file://"):
        return "file://" + os.path.abspath(local.removeprefix("file://"))
    return os.path.abspath(local)


def file_id(path: str) -> str:
    """Short, stable, file-system-safe identifier of an input (names its work files)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", path.rstrip("/").rsplit("/", 1)[-1])[:60]
    digest = hashlib.sha1(path.encode("utf-8")).hexdigest()[:12]
    return f"{base}-{digest}"
