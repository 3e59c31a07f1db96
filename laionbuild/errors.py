"""Error types, ordered by how much of a run they stop.

* :class:`ConfigError` / :class:`SetupError` are found before any work starts
  (bad config, missing input, missing model file). The CLI prints them as one
  line and exits with status 2.
* One input file that cannot be read (a WARC that is not a WARC, an unreadable
  path) never raises: it is listed as failed in the stats with its reason, the
  run goes on and ends with status 1.
* Record-level problems never raise: they become a row with a ``status`` /
  ``drop_reason`` (see :mod:`laionbuild.schema`) and are counted.
"""

from __future__ import annotations


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


def _chain(exc: BaseException):
    """``exc`` and every exception it wraps (``__cause__``, ``__context__``, ``reason``, ``args``), once each."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        for inner in (e.__cause__, e.__context__, getattr(e, "reason", None), *getattr(e, "args", ())):
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
