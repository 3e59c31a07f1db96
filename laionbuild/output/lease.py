"""One run per output folder: the lease a run holds on its output while it writes there.

* a local folder: an exclusive OS lock (``flock``) on ``OUTPUT/_lease.lock``, released by the
  OS when the process ends, however it ends; ``OUTPUT/_lease.json`` names the holder;
* an S3 bucket: ``OUTPUT/_lease.json`` created with a conditional PUT (``If-None-Match: *``),
  renewed every ``heartbeat_s`` by a conditional PUT on its own ETag (``If-Match``) and taken
  over by another run only once it has not been renewed for ``expiry_s`` (again ``If-Match`` on
  the stale lease's ETag, so that of two runs taking over one wins);
* any other fsspec filesystem (no conditional write through fsspec): the lease is written only
  when none is live and read back after ``settle_s``; the one whose token is read back holds it.
  Two runs starting within the same instant can still both pass: this is emulation, and said so
  in the log.

A second run refuses to start with one line naming the holder (host, PID, start time).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from ..errors import SetupError
from .fs import is_local, precondition_failed, put_if, require_bucket, takes_conditional_writes

log = logging.getLogger(__name__)

LEASE = "_lease.json"
LOCK = "_lease.lock"
#: seconds between the write and the read-back of an emulated lease
SETTLE_S = 1.0
#: a run stops committing once its lease was last renewed this share of the expiry ago
EXPIRY_MARGIN = 0.9


class LeaseHeld(SetupError):
    """Another run holds the output folder."""


def _holder_line(url: str, holder: dict | None) -> str:
    if not holder:
        return f"{url} is in use by another run (its lease names no holder)"
    return (f"{url} is in use by another run (host {holder.get('host', '?')}, PID {holder.get('pid', '?')}, "
            f"started {holder.get('started', '?')}); wait for it to end or choose another --output")


def _gone(exc: BaseException) -> bool:
    """The lease object no longer exists (a conditional renewal of a deleted key)."""
    if isinstance(exc, FileNotFoundError):
        return True
    text = f"{type(exc).__name__} {exc}"
    return "NoSuchKey" in text or "does not exist" in text or "404" in text



class RunLease:
    """``with RunLease(layout, expiry_s, heartbeat_s):`` the run's exclusive hold on its output."""

    def __init__(self, layout, expiry_s: float, heartbeat_s: float, *, clock: Callable[[], float] = time.time):
        self.layout = layout
        self.expiry_s = expiry_s
        self.heartbeat_s = heartbeat_s
        self.clock = clock
        self.token = uuid.uuid4().hex
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "token": self.token}
        self.path = layout.path(LEASE)
        self._fd: int | None = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: set when the heartbeat found the lease taken by another run: stop writing
        self.lost = False
        #: when the lease was last written (object stores, emulated): past ``expiry_s`` another run
        #: may hold it, whatever this run's heartbeat thread knows (a process paused that long)
        self._renewed: float | None = None

    # ------------------------------------------------------------------ public
    def __enter__(self) -> "RunLease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        fs = self.layout.fs
        require_bucket(fs, self.layout.root)
        fs.makedirs(self.layout.root, exist_ok=True)
        if is_local(fs):
            self._acquire_local()
        elif takes_conditional_writes(self.layout.fs):
            self._acquire_s3()
        else:
            self._acquire_emulated()
        log.debug("holding %s (lease %s)", self.layout.url, self.token[:8])

    def check(self) -> None:
        """Raise when the lease was lost (another run took it over), or when it was last renewed so
        long ago that another run may have taken it (a process paused past the expiry, a heartbeat
        that could not write): the caller stops writing before its next commit."""
        if not self.lost and self._renewed is not None and self.clock() > self._renewed + self.expiry_s * EXPIRY_MARGIN:
            self.lost = True
            log.error("the lease on %s was last renewed %.0f s ago (expiry %.0f s): another run may hold it",
                      self.layout.url, self.clock() - self._renewed, self.expiry_s)
        if self.lost:
            raise LeaseHeld(f"{self.layout.url}: this run's lease was taken over by another run, or not renewed "
                            "within its expiry; stopping (rerun the same command to resume)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        fs = self.layout.fs
        try:
            if self._fd is not None:
                import fcntl

                self.layout.rm(self.path)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None
            elif not self.lost and (self._read() or {}).get("token") == self.token:
                fs.rm(self.path)
        except OSError as exc:  # the lease expires on its own
            log.warning("could not release the lease on %s (%s)", self.layout.url, exc)

    # ------------------------------------------------------------------ local: an OS lock
    def _acquire_local(self) -> None:
        import fcntl

        fd = os.open(self.layout.path(LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise LeaseHeld(_holder_line(self.layout.url, self._read())) from None
        self._fd = fd
        from ..stages import shards

        shards.write_json_atomic(self.layout.fs, self.path, self.holder)

    # ------------------------------------------------------------------ S3: conditional writes
    def _body(self) -> bytes:
        now = self.clock()
        return json.dumps({**self.holder, "renewed": now, "expires": now + self.expiry_s}).encode("utf-8")

    def _put(self, **condition: str) -> str:
        written = self.clock()
        etag = put_if(self.layout.fs, self.path, self._body(), **condition)
        self._renewed = written
        return etag

    def _get(self) -> tuple[dict | None, str | None]:
        """The lease and its ETag. The ETag is read first: a takeover conditioned on it fails if the
        lease changed after, so a body read later never lets a run take a lease renewed meanwhile."""
        fs = self.layout.fs
        try:
            etag = fs.info(self.path)["ETag"]
            body = fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None
        try:
            return json.loads(body), etag
        except ValueError:
            return {}, etag

    def _acquire_s3(self) -> None:
        try:
            self._etag = self._put(IfNoneMatch="*")
        except Exception as exc:  # noqa: BLE001 - only a failed precondition means "held"
            if not precondition_failed(exc):
                raise
            holder, etag = self._get()
            if holder is not None and self.clock() <= float(holder.get("expires", 0)):
                raise LeaseHeld(_holder_line(self.layout.url, holder)) from None
            try:  # expired (or gone since): take it over, unless another run just did
                self._etag = self._put(IfMatch=etag) if etag else self._put(IfNoneMatch="*")
            except Exception as exc2:  # noqa: BLE001
                if not precondition_failed(exc2):
                    raise
                raise LeaseHeld(_holder_line(self.layout.url, self._get()[0])) from None
            log.warning("took over the expired lease of %s (host %s, PID %s, started %s)", self.layout.url,
                        (holder or {}).get("host", "?"), (holder or {}).get("pid", "?"),
                        (holder or {}).get("started", "?"))
        self._thread = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._etag = self._put(IfMatch=self._etag)
            except Exception as exc:  # noqa: BLE001
                if precondition_failed(exc) or _gone(exc):  # taken over, or taken over and released since
                    self.lost = True
                    log.error("the lease on %s was taken over by another run", self.layout.url)
                    return
                log.warning("lease heartbeat on %s failed (%s); retrying", self.layout.url, exc)

    # ------------------------------------------------------------------ other filesystems: emulated
    def _read(self) -> dict[str, Any] | None:
        from ..stages import shards

        try:
            return shards.read_json(self.layout.fs, self.path)
        except (FileNotFoundError, ValueError):
            return None

    def _acquire_emulated(self) -> None:
        from ..stages import shards

        log.warning("%s: no conditional write on this filesystem; the one-run lease is emulated "
                    "(write, then read back)", self.layout.url)
        holder = self._read()
        if holder is not None and self.clock() <= float(holder.get("expires", 0)):
            raise LeaseHeld(_holder_line(self.layout.url, holder))
        self._renewed = self.clock()
        shards.write_bytes_atomic(self.layout.fs, self.path, self._body())
        time.sleep(SETTLE_S)
        if (self._read() or {}).get("token") != self.token:
            raise LeaseHeld(_holder_line(self.layout.url, self._read()))
        self._thread = threading.Thread(target=self._heartbeat_emulated, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _heartbeat_emulated(self) -> None:
        from ..stages import shards

        while not self._stop.wait(self.heartbeat_s):
            if (self._read() or {}).get("token") != self.token:
                self.lost = True
                log.error("the lease on %s was taken over by another run", self.layout.url)
                return
            renewed = self.clock()
            shards.write_bytes_atomic(self.layout.fs, self.path, self._body())
            self._renewed = renewed


__all__ = ["LEASE", "LeaseHeld", "RunLease"]
