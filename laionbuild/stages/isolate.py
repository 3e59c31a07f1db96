"""Calls into native code that may kill their process, run in a child process.

A decoder or parser written in C can crash on hostile bytes (a segfault, an abort) or be
killed for its memory. In a Ray worker that kills the worker: Ray restarts it and runs the
same work again, which kills it again, for ever. A worker that was restarted therefore runs
its risky calls through this module (see :func:`laionbuild.runner.adapter.actor_restarted`):

* :func:`run_alone` runs one call in a fresh child process and raises :class:`ChildDied`
  (with the signal or exit status) when the child ends without an answer;
* :class:`IsolatedCalls` runs many calls in a small pool of child processes; when a child dies,
  the calls it took down with it are run again each alone, so that only the call that kills
  its process is reported (:class:`ChildDied`), and every other call gets its answer.

Children come from a fork server (a clean process that imported the modules named in
:data:`PRELOAD`), never from a fork of the multi-threaded worker.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

log = logging.getLogger(__name__)

#: modules the fork server imports once, so that each child starts with them loaded
PRELOAD = ["laionbuild.stages.resize", "laionbuild.stages.candidates"]
#: how children are started: ``forkserver``, or ``fork`` (tests whose patched functions must reach the child)
START_METHOD = "forkserver"


class ChildDied(Exception):
    """The child process ended without an answer: ``exitcode`` < 0 is the signal that killed it."""

    def __init__(self, exitcode: int | None, what: str = ""):
        self.exitcode = exitcode
        self.what = what
        super().__init__(what or describe_exit(exitcode))

    def __reduce__(self):
        return type(self), (self.exitcode, self.what)


def describe_exit(exitcode: int | None) -> str:
    """``killed by SIGSEGV`` / ``exited with status 1`` / ``ended without an answer``."""
    if exitcode is None:
        return "ended without an answer"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


_context_lock = threading.Lock()
_context = None


def _mp_context():
    global _context
    with _context_lock:
        if _context is None or _context.get_start_method() != START_METHOD:
            ctx = multiprocessing.get_context(START_METHOD)
            if START_METHOD == "forkserver":
                ctx.set_forkserver_preload(PRELOAD)
            _context = ctx
        return _context


def _child_main(conn, fn: Callable, args: tuple, kwargs: dict) -> None:
    try:
        answer = (True, fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - handed to the parent
        answer = (False, exc)
    try:
        conn.send(answer)
    except Exception as exc:  # noqa: BLE001 - an answer that does not pickle
        conn.send((False, RuntimeError(f"{type(exc).__name__}: {exc}")))
    conn.close()


def run_alone(fn: Callable, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a fresh child process: its value, or the exception it raised;
    :class:`ChildDied` when the child ends without an answer (or takes more than ``timeout_s``,
    then it is killed). ``fn`` and its arguments must pickle (a module-level function)."""
    ctx = _mp_context()
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_main, args=(send, fn, args, kwargs), daemon=True)
    child.start()
    send.close()
    try:
        if timeout_s is not None and not receive.poll(timeout_s):
            child.kill()
            child.join()
            raise ChildDied(child.exitcode, f"took more than {timeout_s:g} s and was stopped")
        try:
            ok, value = receive.recv()
        except (EOFError, OSError):
            child.join()
            raise ChildDied(child.exitcode) from None
    finally:
        receive.close()
    child.join()
    if ok:
        return value
    raise value


class IsolatedCalls:
    """Calls run in a pool of ``workers`` child processes (thread-safe): ``calls(fn, *args)``
    returns ``fn(*args)``'s value or raises what it raised; raises :class:`ChildDied` for the
    call that killed its child (that call was run again alone and killed that child too)."""

    def __init__(self, workers: int = 2):
        self.workers = max(1, int(workers))
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._alone = threading.BoundedSemaphore(self.workers)
        #: children that died, calls run again alone, calls that killed their child alone too
        self.stats = {"children_died": 0, "calls_rerun_alone": 0, "calls_killed_child": 0}

    def _current(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=_mp_context())
            return self._pool

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
                self.stats["children_died"] += 1
        pool.shutdown(wait=False, cancel_futures=True)

    def __call__(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        pool = self._current()
        try:
            return pool.submit(fn, *args, **kwargs).result()
        except BrokenProcessPool:
            self._discard(pool)
        except RuntimeError as exc:  # another call shut this pool down as it broke
            if "after shutdown" not in str(exc):
                raise
        with self._alone:  # the pool died under this call or under another one: find out alone
            with self._lock:
                self.stats["calls_rerun_alone"] += 1
            try:
                return run_alone(fn, *args, **kwargs)
            except ChildDied:
                with self._lock:
                    self.stats["calls_killed_child"] += 1
                raise

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
