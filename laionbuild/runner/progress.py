"""A progress line per phase: units done (files, work shards) and rows as they finish."""

from __future__ import annotations

import logging
import threading
import time
from typing import TextIO

#: the rows count on a progress line is redrawn at most this often (seconds) between units done
REFRESH_INTERVAL_S = 0.5


class Progress:
    def __init__(self, total: int, enabled: bool, desc: str, unit: str, *, file: TextIO | None = None):
        self.bar = None
        self.start = time.monotonic()
        self.rows = 0
        self._drawn = float("-inf")
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=file)

    def update(self, units: int = 0, rows: int = 0) -> None:
        self.rows += rows
        if self.bar is None:
            return
        now = time.monotonic()
        rate = self.rows / max(1e-6, now - self.start)
        self.bar.set_postfix(rows=self.rows, rows_per_s=f"{rate:.0f}", refresh=False)
        if units:
            self.bar.update(units)
            self._drawn = now
        elif rows and now - self._drawn >= REFRESH_INTERVAL_S:
            # rows finish long before their unit commits (a work shard): show them as they come
            self.bar.refresh()
            self._drawn = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # before an error is reported: the line never lands after the message


class StallWatch:
    """A warning when a phase's rows stop coming: nothing finished for ``after_s`` seconds.

    Rows can stop for reasons the engine does not print: actors restarted after a lost node that
    wait for room on the nodes that are left, GPU actors waiting for a GPU node an autoscaler has
    not started yet, a storage that hangs. The phase goes on; the warning says how long nothing
    came, how many rows came before, and what ``describe()`` says (the cluster's free room), again
    every ``after_s`` while the stall lasts, and once more when rows come again. A thread reads
    ``rows()`` every ``check_s``; ``after_s`` 0 turns it off. ``clock`` is the test's seam.
    """

    def __init__(self, rows, after_s: float, phase: str, *, describe=None, emit=None, check_s: float | None = None,
                 clock=time.monotonic):
        self.rows = rows
        self.after_s = float(after_s)
        self.phase = phase
        self.describe = describe
        self.emit = emit or logging.getLogger(__name__).warning
        self.check_s = check_s if check_s is not None else max(1.0, min(30.0, self.after_s / 10))
        self.clock = clock
        self._last = (None, clock())
        self._warned_at: float | None = None
        #: warnings given (stalls and their repeats)
        self.warnings = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="laionbuild-stall-watch", daemon=True) \
            if self.after_s > 0 else None

    def __enter__(self) -> "StallWatch":
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.check_s):
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a warning that cannot be given never stops the phase
                logging.getLogger(__name__).debug("stall check failed", exc_info=True)

    def step(self) -> None:
        """One look at the rows count."""
        now, rows = self.clock(), self.rows()
        last_rows, since = self._last
        if rows != last_rows:
            if self._warned_at is not None:
                self.emit(f"{self.phase}: rows come again after {now - since:.0f} s ({rows} rows so far)")
            self._last, self._warned_at = (rows, now), None
            return
        quiet = now - since
        if quiet < self.after_s or (self._warned_at is not None and now - self._warned_at < self.after_s):
            return
        extra = ""
        if self.describe is not None:
            try:
                extra = self.describe()
            except Exception:  # noqa: BLE001 - the warning goes out without the cluster's room
                extra = ""
        self.warnings += 1
        self._warned_at = now
        self.emit(f"{self.phase}: no row has finished for {quiet:.0f} s ({rows} rows so far){'; ' + extra if extra else ''}"
                  "; the phase goes on: Ctrl-C stops it, the same command resumes")
