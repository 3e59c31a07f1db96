"""Parallel tasks on Ray for the commands outside a run (``compare``): the runner is the only
package that imports Ray, so they reach it through here."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from ..errors import LaionBuildError


def map_with_shared(fn: Callable[..., Any], calls: Iterable[tuple[tuple, tuple]], shared: Any) -> list[Any]:
    """Run ``fn(*head, shared, *tail)`` for every ``(head, tail)`` of ``calls`` as Ray tasks, connected
    the way a run connects (``RAY_ADDRESS``, else the machine's cluster, else a local Ray); ``shared``
    goes into the object store once."""
    from .connect import connect

    connect(None, verbose=logging.getLogger("laionbuild").isEnabledFor(logging.DEBUG))
    import ray

    task = ray.remote(fn)
    ref = ray.put(shared)
    try:
        return ray.get([task.remote(*head, ref, *tail) for head, tail in calls])
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, LaionBuildError):
            raise cause from None  # the task's own one-line error, not Ray's traceback around it
        raise


__all__ = ["map_with_shared"]
