"""The processes of one Ray the tests started, found by its own temp folder (never ``ray stop``,
which would stop every Ray on the machine)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def own_processes(marker: str) -> list[int]:
    """Live processes whose command line or environment names ``marker`` (a Ray temp folder), and
    their children. The environment finds the workers too: they rename themselves (``ray::IDLE``)
    and, once their raylet is gone, are no one's children."""
    found, parents = set(), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().decode(errors="replace")
        except OSError:
            env = ""
        parents[int(entry)] = ppid
        if marker in cmd or marker in env:
            found.add(int(entry))
    changed = True
    while changed:
        kids = {pid for pid, ppid in parents.items() if ppid in found} - found
        changed = bool(kids)
        found |= kids
    return sorted(p for p in found if _alive(p))


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_processes(marker: str) -> None:
    """SIGTERM, then SIGKILL, the processes of ``marker``; returns once they are gone."""
    pids = own_processes(marker)
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            if not pids:
                return
            time.sleep(0.2)
