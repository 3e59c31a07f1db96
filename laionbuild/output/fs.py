"""The one way to open a filesystem: a local path, ``file://``, ``s3://``, ``gs://`` or any fsspec URL.

Every reader and writer of an output folder, an input, a model cache or a reference
goes through :func:`open_fs`, so that options (credentials, endpoints, caching) are
set in one place.
"""

from __future__ import annotations

import logging

import fsspec

from ..errors import SetupError

#: client libraries that log each credential and endpoint lookup at INFO: kept to warnings, so
#: that a refused invocation stays one line and a run's log says what the run does
QUIET_LOGGERS = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google.auth")
for _name in QUIET_LOGGERS:
    logging.getLogger(_name).setLevel(logging.WARNING)


#: protocols whose filesystems keep no listing cache of their own
_NO_LISTING_CACHE = ("file", "local", "memory")


def open_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path inside it)`` of a local path or an fsspec URL; the path has no trailing slash.

    Listings are never cached: markers are written by other processes (Ray workers, another
    run), and a listing remembered from before they were would hide committed units.
    """
    url = str(url)
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    options = {} if protocol in _NO_LISTING_CACHE else {"use_listings_cache": False}
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path.rstrip("/") or path


def protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    """The protocol names of ``fs`` (fsspec gives one name or a tuple of them)."""
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return bool({"file", "local"} & set(protocols(fs)))


def takes_conditional_writes(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` can write an object only if it is absent or unchanged (S3 through s3fs)."""
    return bool({"s3", "s3a"} & set(protocols(fs))) and hasattr(fs, "call_s3")


def put_if(fs: fsspec.AbstractFileSystem, path: str, body: bytes, **condition: str) -> str:
    """Write ``body`` to ``path`` of a filesystem that :func:`takes_conditional_writes`, under
    ``condition`` (``IfNoneMatch="*"``: only if absent; ``IfMatch=etag``: only if unchanged);
    returns the new ETag. A failed condition raises what :func:`precondition_failed` tells."""
    bucket, key, _ = fs.split_path(path)
    out = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **condition)
    fs.invalidate_cache(path.rsplit("/", 1)[0])
    return out["ETag"]


def precondition_failed(exc: BaseException) -> bool:
    """The error of a conditional write whose condition did not hold (HTTP 412)."""
    text = f"{type(exc).__name__} {exc} {getattr(exc, '__cause__', '')}"
    return "PreconditionFailed" in text or "412" in text or "pre-conditions" in text


#: object stores whose filesystems create a missing bucket (container) when asked for a folder in it
_BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "abfs", "abfss", "az")


def require_bucket(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Refuse an output in a bucket that does not exist. The object-store filesystems would
    create it when the output folder is made: a misspelt name would become a new bucket, its
    data written where nobody looks (and billed)."""
    if not set(protocols(fs)) & set(_BUCKET_PROTOCOLS):
        return
    bucket = path.split("/", 1)[0]
    if not fs.exists(bucket):  # the filesystem answers False for a bucket its probes cannot reach too
        raise SetupError(f"the bucket of the output {url_of(fs, path)} does not exist or cannot be reached with "
                         f"these credentials ({bucket}); create it first (laionbuild never creates buckets), or "
                         "check the credentials and the endpoint")


def has_folders(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether a file's folder must exist before it is written. Object stores have none: asking
    for one costs a request per write (s3fs checks the bucket each time) and could create a
    bucket that was deleted meanwhile."""
    return not set(protocols(fs)) & set(_BUCKET_PROTOCOLS)


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path of ``fs`` as a URL that another process (a Ray worker) can open."""
    if is_local(fs):
        return path
    return f"{protocols(fs)[0]}://{path}"
