"""A progress line per phase: units done (files, work shards) and rows as they finish."""

from __future__ import annotations

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
