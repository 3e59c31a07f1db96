"""A progress bar per phase: units done (files, work shards) and rows per second."""

from __future__ import annotations

import time


class Progress:
    def __init__(self, total: int, enabled: bool, desc: str, unit: str):
        self.bar = None
        self.start = time.monotonic()
        self.rows = 0
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, units: int = 0, rows: int = 0) -> None:
        self.rows += rows
        if self.bar is not None:
            rate = self.rows / max(1e-6, time.monotonic() - self.start)
            self.bar.set_postfix(rows=self.rows, rows_per_s=f"{rate:.0f}", refresh=False)
            if units:
                self.bar.update(units)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
