"""Error types, ordered by how much of a run they stop.

* :class:`ConfigError` / :class:`SetupError` are found before any work starts
  (bad config, missing input, missing model file). The CLI prints them as one
  line and exits with status 2.
* One input file that cannot be read (a WARC that is not a WARC, an unreadable
  path) never raises: it is listed as failed in the stats with its reason, the
  run goes on and ends with status 1.
* Record-level problems never raise: they become a row with a ``status`` /
  ``drop_reason`` (see :mod:`laionbuild.schema`) and are counted.
* Storage that takes no more writes (a full disk, a quota, a read-only mount) stops the run:
  nothing can be committed any more. :func:`storage_full` finds that cause, in the driver or
  in a worker (whose error reaches the driver as text), so the CLI says it in one line; what
  was committed is kept and a rerun resumes.
* A worker process that died on the same work more than ``ray.max_task_retries`` times stops
  the run (:func:`worker_died`; in phases 1 and 3 counted by the actors themselves, which raise
  :class:`WorkerDiedEachTime`): the CLI says so in one line; a rerun resumes.
* A cluster head (GCS) that stops answering stops the run before Ray would end the driver
  without a word (``runner.connect.HeadWatch``): one line, exit status 2; a rerun resumes.
"""

from __future__ import annotations

import errno as _errno
import re


class LaionBuildError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(LaionBuildError):
    """The configuration is invalid (unknown key, wrong type, inconsistent values)."""


class SetupError(LaionBuildError):
    """Something the run needs before it starts is missing (input path, model file...)."""


class ClusterJoinError(SetupError):
    """The driver cannot join the Ray cluster it was pointed at (authentication, unreachable,
    version mismatch); the message names the address, the cause and the fix."""


class ModelMissingError(SetupError):
    """Model weights or tokenizer files are not available locally."""


class WorkerDiedEachTime(RuntimeError):
    """Raised in a Ray actor (see :mod:`laionbuild.runner.adapter`) when the work it got again had
    killed its process more than ``ray.max_task_retries`` times on nodes that stayed alive.
    Not a :class:`LaionBuildError`: it stops the run as a worker death (:func:`worker_died`)."""


def first_line(text: object) -> str:
    """The first non-empty line of ``text``: what an error says in one line."""
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def _chain(exc: BaseException):
    """``exc`` and every exception it wraps (``__cause__``, ``__context__``, ``reason``, ``args``,
    Ray's ``cause``), once each."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        for inner in (e.__cause__, e.__context__, getattr(e, "reason", None), getattr(e, "cause", None),
                      *getattr(e, "args", ())):
            if isinstance(inner, BaseException):
                todo.append(inner)


def name_not_found(exc: BaseException) -> str | None:
    """The lookup error when ``exc`` (or what it wraps) is a DNS answer that the name does not
    exist, a failure that retrying does not mend; None for anything else (a transient
    ``EAI_AGAIN`` included)."""
    import socket

    permanent = {getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA", "EAI_FAIL") if hasattr(socket, n)}
    for e in _chain(exc):
        if isinstance(e, socket.gaierror) and e.errno in permanent:
            return e.strerror or str(e)
    return None


def error_cause(exc: BaseException) -> str:
    """Why an operation on a path or URL failed, in a few words (never just the path again)."""
    import socket

    dns = name_not_found(exc)
    if dns:
        return f"the host name does not resolve ({dns})"
    for e in _chain(exc):
        if isinstance(e, socket.gaierror):
            return f"the host name could not be looked up ({e.strerror or e})"
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, TimeoutError):
            return "timed out"
    if isinstance(exc, FileNotFoundError):
        return "not found"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a folder"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


#: errno values of storage that takes no more writes: full, over quota, read-only, file too large
STORAGE_FULL_ERRNOS = ("ENOSPC", "EDQUOT", "EROFS", "EFBIG")
#: an ``OSError`` as Python prints it, the form in which a worker's error reaches the driver:
#: ``OSError: [Errno 28] No space left on device: '/out/x.parquet'``
_PRINTED_OSERROR = re.compile(r"^(?:[\w.]*\.)?\w*(?:Error|OSError): \[Errno (\d+)\] ([^\n:]+?)(?:: '([^'\n]*)')?$",
                              re.MULTILINE)
#: the same without an errno, as object-store clients raise them (s3fs: ``PermissionError: Access Denied``)
_PRINTED_OSERROR_NO_ERRNO = re.compile(
    r"^(?:builtins\.)?(PermissionError|FileNotFoundError|FileExistsError|IsADirectoryError|NotADirectoryError): "
    r"(?!\[Errno)([^\n]+)$", re.MULTILINE)
#: one of this package's errors as Python prints it in a worker's traceback
_PRINTED_OWN_ERROR = re.compile(r"^laionbuild\.errors\.(\w+): (.+)$", re.MULTILINE)


def os_error_in(exc: BaseException) -> tuple[int, str, str] | None:
    """``(errno, reason, path)`` of the operating-system error that ``exc`` is, wraps, or carries
    as the text of a worker's error (Ray passes a worker's exception on as text); None when
    there is none. ``path`` is ``""`` when the error names none."""
    import errno

    for e in _chain(exc):
        if isinstance(e, OSError) and isinstance(e.errno, int) and e.errno > 0:
            return e.errno, e.strerror or errno.errorcode.get(e.errno, str(e.errno)), str(e.filename or "")
    found = _printed_in_worker(exc, _PRINTED_OSERROR, _PRINTED_OSERROR_NO_ERRNO)
    if found is None:
        return None
    if found.re is _PRINTED_OSERROR:
        return int(found.group(1)), found.group(2).strip(), found.group(3) or ""
    return _ERRNO_OF[found.group(1)], found.group(2).strip(), ""


#: the errno that each of Python's file errors stands for
_ERRNO_OF = {"PermissionError": _errno.EACCES, "FileNotFoundError": _errno.ENOENT,
             "FileExistsError": _errno.EEXIST, "IsADirectoryError": _errno.EISDIR,
             "NotADirectoryError": _errno.ENOTDIR}


def _printed_in_worker(exc: BaseException, *patterns: re.Pattern) -> re.Match | None:
    """The last line matching one of ``patterns`` in the text of a Ray error that ``exc`` is or
    wraps: Ray passes a worker's exception on as its printed traceback, whose wrapped errors come
    first and the one raised last. Other errors' messages are not read."""
    for e in _chain(exc):
        if type(e).__module__.startswith("ray."):
            text = str(e)
            found = [m for pattern in patterns for m in pattern.finditer(text)]
            if found:
                return max(found, key=lambda m: m.start())
    return None


def storage_full(exc: BaseException) -> tuple[str, str] | None:
    """``(reason, path)`` when ``exc`` is, wraps or carries storage refusing any more writes
    (:data:`STORAGE_FULL_ERRNOS`); None otherwise."""
    import errno

    found = os_error_in(exc)
    wanted = {getattr(errno, n) for n in STORAGE_FULL_ERRNOS if hasattr(errno, n)}
    return (found[1], found[2]) if found and found[0] in wanted else None


def own_error_in(exc: BaseException) -> str | None:
    """The one-line message of this package's own error (:class:`LaionBuildError`) that ``exc`` is,
    wraps, or carries as the text of a worker's error (a model that a Ray actor could not load);
    None when there is none."""
    for e in _chain(exc):
        if isinstance(e, LaionBuildError) and not type(e).__module__.startswith("ray."):
            return str(e)
    found = _printed_in_worker(exc, _PRINTED_OWN_ERROR)
    if found is None or not _is_own_error_name(found.group(1)):
        return None
    return found.group(2).strip()


def _is_own_error_name(name: str) -> bool:
    """Whether ``name`` (printed as ``laionbuild.errors.<name>``) is a :class:`LaionBuildError`."""
    cls = globals().get(name)
    return isinstance(cls, type) and issubclass(cls, LaionBuildError)


#: Ray's errors for work whose process died (or whose actor cannot be reached any more)
_WORKER_DEATHS = ("ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "OutOfMemoryError",
                  "NodeDiedError", "LocalRayletDiedError")


def worker_died(exc: BaseException) -> str | None:
    """The name of Ray's error when ``exc`` is, or wraps, work whose worker process died more
    often than it is run again (``ray.max_task_retries``); None otherwise."""
    for e in _chain(exc):
        if isinstance(e, WorkerDiedEachTime):  # counted by the actor itself: its process died each time
            return "ActorDiedError"
        if type(e).__module__.startswith("ray.") and any(c.__name__ in _WORKER_DEATHS for c in type(e).__mro__):
            return type(e).__name__
        if type(e).__module__.startswith("ray.") and _COUNTED_DEATH_IN_TEXT.search(str(e)):
            return "ActorDiedError"  # raised in a worker: Ray passes it on as its traceback's text
        if type(e).__name__ == "UnserializableException":  # Ray's error it could not rebuild: its text
            found = _DEATH_IN_TEXT.search(str(e))
            if found:
                return found.group(1)
    return None


#: one of :data:`_WORKER_DEATHS` named in a traceback's text
_DEATH_IN_TEXT = re.compile(r"\bray\.exceptions\.(" + "|".join(_WORKER_DEATHS) + r")\b")
#: :class:`WorkerDiedEachTime` named in a traceback's text
_COUNTED_DEATH_IN_TEXT = re.compile(r"\blaionbuild\.errors\.WorkerDiedEachTime\b")
