"""The one Ray adapter: a stage object built once per actor, applied to every batch it receives.

``map_batches(StageActor, fn_constructor_args=(factory, cfg), compute=ActorPoolStrategy(...))``
runs ``factory(cfg)`` in each actor's constructor (models load once per actor) and
calls the resulting stage on numpy batches. Stages know nothing of Ray.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..config import Config

Batch = dict[str, np.ndarray]


#: prefix of the column in which an actor records the node it ran on (``_node_<stage>``)
NODE_COLUMN = "_node_"


class StageActor:
    def __init__(self, factory: Callable[[Config], Callable[[Batch], Batch]], cfg: Config, name: str = ""):
        self.stage = factory(cfg)
        self.name = name
        self.node = node_id()

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


def task_pool(size: int):
    """A task stage with at most ``size`` tasks at once. Ray Data warns when a stage gets fewer
    inputs than that (a run of one work shard): a cap, not a wish, so the warning is not shown."""
    import warnings

    import ray

    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks for", category=UserWarning)
    return ray.data.TaskPoolStrategy(size=max(1, int(size)))


def node_id() -> str:
    """The Ray node this code runs on ("" outside Ray): recorded per committed unit."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - outside a Ray worker
        return ""
