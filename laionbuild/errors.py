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
