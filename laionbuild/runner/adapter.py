"""The one Ray adapter: a stage object built once per actor, applied to every batch it receives.

``map_batches(StageActor, fn_constructor_args=(factory, cfg), compute=ActorPoolStrategy(...))``
runs ``factory(cfg)`` in each actor's constructor (models load once per actor) and
calls the resulting stage on numpy batches. Stages know nothing of Ray.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np

from ..config import Config

Batch = dict[str, np.ndarray]


#: prefix of the column in which an actor records the node it ran on (``_node_<stage>``)
NODE_COLUMN = "_node_"


class StageActor:
    """A stage built by ``factory(cfg)``. When Ray restarted this actor after its process died
    (:func:`actor_restarted`), a stage with an ``isolate()`` method is told to run its native
    code in child processes from now on: the batches Ray hands it again may hold the row that
    killed the process, which then becomes a row with a reason instead of a death without end.
    Otherwise a stage with a ``watch()`` method is told that it runs in a worker process of its
    own, which it may end when its native code is stuck (Ray restarts it, isolated)."""

    def __init__(self, factory: Callable[[Config], Callable[[Batch], Batch]], cfg: Config, name: str = ""):
        self.stage = factory(cfg)
        self.name = name
        self.node = node_id()
        if actor_restarted() and hasattr(self.stage, "isolate"):
            self.stage.isolate()
        elif hasattr(self.stage, "watch"):
            self.stage.watch()

    def __call__(self, batch: Batch) -> Batch:
        out = self.stage(batch)
        if self.name:
            out[NODE_COLUMN + self.name] = np.full(len(next(iter(out.values()))), self.node, dtype=object)
        return out


class StreamStageActor(StageActor):
    """A stage that yields its output as rows complete (``stage.stream(batch)``, a generator):
    fast rows move on while slow ones of the same batch are still in work. Run it in a pool
    from :func:`actor_pool` with ``concurrent_calls`` > 1, so that one actor works on several
    batches at once (the stage must be thread-safe)."""

    def __call__(self, batch: Batch):
        for out in self.stage.stream(batch):
            if self.name:
                out[NODE_COLUMN + self.name] = np.full(len(next(iter(out.values()))), self.node, dtype=object)
            yield out


@contextlib.contextmanager
def streaming_blocks(block_bytes: int):
    """Datasets created inside this block send on what a streaming stage yields in blocks of
    ``block_bytes`` (a dataset keeps the Ray Data context it was created with). Ray Data gathers
    what a ``map_batches`` call yields into blocks of ``target_max_block_size`` (128 MiB by
    default) and sends a block on only when it is full or the call ends: a batch's fast rows
    waited for its slowest one (see :func:`laionbuild.runner.score.stream_block_bytes`)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    before = ctx.target_max_block_size
    ctx.target_max_block_size = int(block_bytes)
    try:
        yield
    finally:
        ctx.target_max_block_size = before


def nodes_of(batch: Batch) -> dict[str, set[str]]:
    """``{stage: nodes}`` recorded in a batch by the actors it went through."""
    return {k[len(NODE_COLUMN):]: {str(v) for v in vals if v} for k, vals in batch.items() if k.startswith(NODE_COLUMN)}


def actor_pool(size: int, in_flight: int | None = None, concurrent_calls: int = 1):
    """A fixed-size actor pool; ``in_flight=1`` for long units (an input file), so that
    work spreads over every actor instead of queueing at the first ones; ``concurrent_calls``
    > 1 lets each actor run that many batches at once, in threads."""
    import ray

    kwargs = {} if in_flight is None else {"max_tasks_in_flight_per_actor": in_flight}
    if concurrent_calls > 1:
        kwargs = {"max_tasks_in_flight_per_actor": max(concurrent_calls, in_flight or 0),
                  "max_concurrent_calls_per_actor": int(concurrent_calls), "enable_true_multi_threading": True}
    return ray.data.ActorPoolStrategy(size=max(1, int(size)), **kwargs)


def retries(cfg: Config, actors: bool = True) -> dict[str, int]:
    """``map_batches`` arguments that bound how often Ray runs one batch again after the process
    running it died (``ray.max_task_retries``). Ray Data's default is without end: work whose
    process dies each time (a crash on one row, memory it can never get) would run for ever.
    Restarted fetch and candidates workers isolate their native code, so the work they get
    again ends; past the bound the run stops with one line and keeps what it committed."""
    import warnings

    # Ray Data 2.60 has no named parameter for these and warns on every remote argument passed on
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", module=r"laionbuild\.")
    n = int(cfg.ray.max_task_retries)
    return {"max_task_retries": n} if actors else {"max_retries": n}


def task_pool(size: int):
    """A task stage with at most ``size`` tasks at once. Ray Data warns when a stage gets fewer
    inputs than that (a run of one work shard): a cap, not a wish, so the warning is not shown."""
    import warnings

    import ray

    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks for", category=UserWarning)
    return ray.data.TaskPoolStrategy(size=max(1, int(size)))


def actor_restarted() -> bool:
    """True in a Ray actor that Ray restarted after its process died (a crash, the kernel's
    out-of-memory killer, a lost node); False in its first life and outside Ray."""
    import warnings

    try:
        import ray

        if not ray.is_initialized():
            return False
        with warnings.catch_warnings():  # deprecated in Ray 2.x without a replacement
            warnings.simplefilter("ignore")
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - not an actor, or a Ray without the attribute
        return False


def node_id() -> str:
    """The Ray node this code runs on ("" outside Ray): recorded per committed unit."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - outside a Ray worker
        return ""
