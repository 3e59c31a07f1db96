"""Error types, ordered by how much of a run they stop.

* :class:`ConfigError` / :class:`SetupError` are found before any work starts
  (bad config, missing input, missing model file). The CLI prints them as one
  line and exits with status 2.
* :class:`FileFailure` stops one input file (a WARC that is not a WARC, an
  unreadable path). The file is listed as failed in the stats, the run goes on
  and ends with status 1.
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


class ModelMissingError(SetupError):
    """Model weights or tokenizer files are not available locally."""


class FileFailure(LaionBuildError):
    """One input file cannot be processed; the run continues without it."""

    def __init__(self, path: str, reason: str, message: str = ""):
        self.path = path
        self.reason = reason
        self.message = message
        super().__init__(f"{path}: {reason}" + (f" ({message})" if message else ""))
