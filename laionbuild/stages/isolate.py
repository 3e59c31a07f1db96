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

:class:`CpuWatch` watches calls that run in the worker's own threads: one that has used more
than its CPU-time limit is reported (a worker process then ends itself, so that Ray restarts
it into the isolated mode above).

A call can also be given a CPU-time limit (``cpu_limit_s``): its child lowers its own
``RLIMIT_CPU`` to what it has used plus the limit before the call, so a call stuck in native
code is ended by the kernel (``SIGXCPU``) however busy the machine is; :func:`over_cpu_limit`
tells that death apart.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait
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


def over_cpu_limit(exc: ChildDied) -> bool:
    """True when the child was ended for using more CPU time than its call's limit."""
    return exc.exitcode == -signal.SIGXCPU


def _cpu_limited(fn: Callable, cpu_limit_s: float | None, args: tuple, kwargs: dict) -> Any:
    """``fn(*args, **kwargs)`` in a child process whose CPU time may grow by ``cpu_limit_s`` at
    most while it runs (then the kernel sends ``SIGXCPU``, which ends the process). A child
    that a crash or the limit ends writes no core file."""
    import math
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    if not cpu_limit_s:
        return fn(*args, **kwargs)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    cap = math.ceil(usage.ru_utime + usage.ru_stime + cpu_limit_s)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (cap, hard))
    try:
        return fn(*args, **kwargs)
    finally:
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


#: how often a caller waiting for a child's answer checks that the child is still alive
_POLL_S = 0.05

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


def _untracked(child):
    """``child``, started, that only the calling thread will ask about. ``multiprocessing`` asks
    every child it started for its end whenever any thread starts a process or calls
    ``active_children()``. With the fork server a child's status is 8 bytes on a pipe that only
    one reader gets: a second, concurrent reader finds the pipe empty and records status 255
    over the real one (a segfault read as ``exited with status 255``). Such a child is never
    left running: :func:`run_alone` joins or kills it before it returns."""
    children = getattr(multiprocessing.process, "_children", None)
    if children is not None:
        children.discard(child)
    return child


def _exit_status(child) -> int | None:
    """The ended child's exit code."""
    child.join()
    return child.exitcode


def run_alone(fn: Callable, *args: Any, timeout_s: float | None = None, cpu_limit_s: float | None = None,
              **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a fresh child process: its value, or the exception it raised;
    :class:`ChildDied` when the child ends without an answer (or takes more than ``timeout_s``
    of wall time, then it is killed, or more than ``cpu_limit_s`` of CPU time). ``fn`` and its
    arguments must pickle (a module-level function)."""
    ctx = _mp_context()
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_main, args=(send, _cpu_limited, (fn, cpu_limit_s, args, kwargs), {}),
                        daemon=True)
    child.start()
    _untracked(child)
    send.close()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    answered = False
    try:
        # the answer, or the child's end. With the ``fork`` start method (tests) a process forked
        # meanwhile by another thread may hold copies of the pipe's writing end and of the
        # child's sentinel, so neither ends: there the child's state is also asked for
        forked = ctx.get_start_method() == "fork"
        while True:
            ready = wait([receive, child.sentinel], _POLL_S)
            if receive in ready:
                break
            if child.sentinel in ready or (forked and not child.is_alive()):
                if receive.poll(0):
                    break
                raise ChildDied(_exit_status(child))
            if deadline is not None and time.monotonic() > deadline:
                child.kill()
                raise ChildDied(_exit_status(child), f"took more than {timeout_s:g} s and was stopped")
        try:
            ok, value = receive.recv()
            answered = True
        except (EOFError, OSError):
            raise ChildDied(_exit_status(child)) from None
    finally:
        receive.close()
        if not answered and child.exitcode is None:  # this thread was interrupted (KeyboardInterrupt)
            child.kill()
        child.join()
    if ok:
        return value
    raise value


class IsolatedCalls:
    """Calls run in a pool of ``workers`` child processes (thread-safe): ``calls(fn, *args)``
    returns ``fn(*args)``'s value or raises what it raised; raises :class:`ChildDied` for the
    call that killed its child (that call was run again alone and killed that child too)."""

    def __init__(self, workers: int = 2, cpu_limit_s: float | None = None):
        self.workers = max(1, int(workers))
        #: CPU seconds one call may use; a call over it ends its child (:func:`over_cpu_limit`)
        self.cpu_limit_s = cpu_limit_s or None
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
            return pool.submit(_cpu_limited, fn, self.cpu_limit_s, args, kwargs).result()
        except BrokenProcessPool:
            self._discard(pool)
        except RuntimeError as exc:  # another call shut this pool down as it broke
            if "after shutdown" not in str(exc):
                raise
        with self._alone:  # the pool died under this call or under another one: find out alone
            with self._lock:
                self.stats["calls_rerun_alone"] += 1
            try:
                return run_alone(fn, *args, cpu_limit_s=self.cpu_limit_s, **kwargs)
            except ChildDied:
                with self._lock:
                    self.stats["calls_killed_child"] += 1
                raise

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class CpuWatch:
    """Calls in progress in this process's threads, each with its thread's CPU clock: a call that
    has used more than ``limit_s`` CPU-seconds is passed to ``on_stuck(what, seconds)`` once, from
    a watcher thread (a native call cannot be stopped from outside, so the caller decides what
    to do, e.g. end the process). The CPU clock counts the call's own work only: a busy machine
    does not make a call look stuck."""

    def __init__(self, limit_s: float, on_stuck: Callable[[str, float], None], period_s: float | None = None):
        self.limit_s = float(limit_s)
        self.period_s = period_s or min(1.0, self.limit_s / 4)
        self._on_stuck = on_stuck
        self._calls: dict[int, tuple[int, float, str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watching(self, what: str):
        """Watch the calling thread's CPU time while the ``with`` block runs."""
        ident = threading.get_ident()
        try:
            clock = time.pthread_getcpuclockid(ident)
            start = time.clock_gettime(clock)
        except (AttributeError, OSError):  # no per-thread CPU clock on this platform
            yield
            return
        with self._lock:
            self._calls[ident] = (clock, start, what)
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="cpu-watch", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._calls.pop(ident, None)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            with self._lock:
                calls = list(self._calls.items())
            for ident, (clock, start, what) in calls:
                try:
                    used = time.clock_gettime(clock) - start
                except OSError:  # the thread is gone
                    continue
                if used <= self.limit_s:
                    continue
                with self._lock:
                    if self._calls.get(ident, (None,))[0] != clock:
                        continue  # it ended meanwhile
                    del self._calls[ident]
                self._on_stuck(what, used)

    def close(self) -> None:
        self._stop.set()
