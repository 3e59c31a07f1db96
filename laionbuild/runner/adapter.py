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


def nodes_of(batch: Batch) -> dict[str, set[str]]:
    """``{stage: nodes}`` recorded in a batch by the actors it went through."""
    return {k[len(NODE_COLUMN):]: {str(v) for v in vals if v} for k, vals in batch.items() if k.startswith(NODE_COLUMN)}


def actor_pool(size: int, in_flight: int | None = None):
    """A fixed-size actor pool; ``in_flight=1`` for long units (an input file), so that
    work spreads over every actor instead of queueing at the first ones."""
    import ray

    kwargs = {} if in_flight is None else {"max_tasks_in_flight_per_actor": in_flight}
    return ray.data.ActorPoolStrategy(size=max(1, int(size)), **kwargs)


def node_id() -> str:
    """The Ray node this code runs on ("" outside Ray): recorded per committed unit."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - outside a Ray worker
        return ""
