"""The one Ray adapter: a stage object built once per actor, applied to every batch it receives.

``map_batches(StageActor, fn_constructor_args=(factory, cfg), compute=ActorPoolStrategy(...))``
runs ``factory(cfg)`` in each actor's constructor (models load once per actor) and
calls the resulting stage on numpy batches. Stages know nothing of Ray.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import numpy as np

from ..config import Config
from ..errors import WorkerDiedEachTime

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


#: prefix of the column in which an actor records the node it ran on (``_node_<stage>``)
NODE_COLUMN = "_node_"


class StageActor:
    """A stage built by ``factory(cfg)``. When Ray restarted this actor after its process died on a
    node that is still alive (:class:`ProcessDeaths`), a stage with an ``isolate()`` method is told
    to run its native code in child processes from now on: the batches Ray hands it again may hold
    the row that killed the process, which then becomes a row with a reason instead of a death
    without end. Otherwise (its first life, or a restart after its node was lost) a stage with a
    ``watch()`` method is told that it runs in a worker process of its own, which it may end when
    its native code is stuck (Ray restarts it, isolated). Run it in a pool with
    :func:`stage_retries`: the actor, not Ray, bounds how often its work is run again."""

    def __init__(self, factory: Callable[[Config], Callable[[Batch], Batch]], cfg: Config, name: str = ""):
        # a stage built without a config (``factory`` ignores it) runs under the default bound
        self.deaths = ProcessDeaths((cfg if cfg is not None else Config()).ray.max_task_retries)
        self.stage = factory(cfg)
        self.name = name
        self.node = node_id()
        if self.deaths.after_crash and hasattr(self.stage, "isolate"):
            self.stage.isolate()
        elif hasattr(self.stage, "watch"):
            self.stage.watch()

    def __call__(self, batch: Batch) -> Batch:
        with self.deaths.call():
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
        with self.deaths.call():
            for out in self.stage.stream(batch):
                if self.name:
                    out[NODE_COLUMN + self.name] = np.full(len(next(iter(out.values()))), self.node, dtype=object)
                yield out


#: the GCS key-value namespace in which actors count the deaths of their processes
DEATHS_NAMESPACE = "laionbuild_deaths"


class ProcessDeaths:
    """How often the work of one actor killed its process, counted by the actor itself, so that a
    lost node costs only the work it had in flight.

    A pool of these actors runs with :func:`stage_retries`: Ray runs an actor's calls again without
    end. It must, for a lost node: Ray sends the calls of the node's actors again at once, each try
    failing (``ActorUnavailableError``) until the cluster marks the node dead and restarts the
    actors elsewhere, which takes seconds (15 s on the loopback test cluster, 7 tries of one call);
    a bound there stopped the run. The bound on work that kills its process each time (a poison
    batch) is kept here instead: each life of the actor records its node in Ray's key-value store
    (one write per life), and a restarted life looks whether that node is still alive. If it is,
    the process died of its work (a crash, the kernel's out-of-memory killer): every call handed
    to this life again (Ray's attempt number above 0) counts one death under its task id, and a
    call whose count passes ``limit`` (``ray.max_task_retries``) raises
    :class:`~laionbuild.errors.WorkerDiedEachTime` instead of running, which stops the run with the
    one line of a worker death. If the node is gone, nothing is counted. A life that follows more
    than ``limit`` deaths without a finished call in between stops at once (work that kills the
    actor while it starts). Nothing is read or written per call in a life that follows no crash.
    Without Ray's key-value store, Ray's attempt number is the count (a lost node counts again)."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        restarted = actor_restarted()
        #: this life follows a death of the process on a node that is still alive (or, outside
        #: Ray's key-value store, any restart)
        self.after_crash = restarted
        #: deaths of this actor's process since its last finished call (lost nodes not counted)
        self.crashes = 0
        self.key = ""
        #: the node of this life; "" outside a Ray actor
        self.node = ""
        try:
            import ray

            if not ray.is_initialized():
                return
            ctx = ray.get_runtime_context()
            actor = ctx.get_actor_id()
            if not actor:
                return
            self.node = ctx.get_node_id()
            key = f"{ctx.get_job_id()}/actor/{actor}"
            if restarted:
                node, crashes = _parse_record(_kv_get(key))
                self.after_crash = not node or _node_alive(node)
                self.crashes = crashes + (1 if self.after_crash else 0)
            _kv_put(key, f"{self.node} {self.crashes}")
            self.key = key
        except Exception:  # noqa: BLE001 - without the store: Ray's attempt numbers count
            log.debug("actor deaths are counted by Ray's attempt numbers", exc_info=True)
        if self.limit >= 0 and self.crashes > self.limit:
            raise WorkerDiedEachTime(f"this actor's process died {self.crashes} times in a row on a live node "
                                     f"without finishing any work (ray.max_task_retries={self.limit})")
        if restarted:
            log.warning("this worker was restarted after its process died %s",
                        "(a crash or the out-of-memory killer)" if self.after_crash else "with its node")

    def begin(self) -> str:
        """At the start of a call: raises :class:`WorkerDiedEachTime` when the call's work killed this
        actor's process more than ``limit`` times; returns what :meth:`end` takes."""
        if not self.after_crash or self.limit < 0 or not self.node:  # (not in a Ray actor)
            return ""
        import ray

        attempt = int(ray._private.worker.global_worker.core_worker.get_current_task_attempt_number())
        if attempt <= 0:  # sent to this life first: not in flight when a process died
            return ""
        if not self.key:
            deaths, key = attempt, ""
        else:
            key = f"{self.key.split('/', 1)[0]}/task/{ray.get_runtime_context().get_task_id()}"
            deaths = int(_kv_get(key) or 0) + 1
            _kv_put(key, str(deaths))
        if deaths > self.limit:
            raise WorkerDiedEachTime(f"the process running this work died {deaths} times on nodes that stayed "
                                     f"alive (ray.max_task_retries={self.limit})")
        return key

    def end(self, key: str) -> None:
        """At the end of a call (finished or not)."""
        if key:
            _kv_del(key)
        if self.crashes and self.key:
            self.crashes = 0
            _kv_put(self.key, f"{self.node} 0")

    @contextlib.contextmanager
    def call(self):
        """``with deaths.call():`` around one call of the actor: :meth:`begin`, then :meth:`end`."""
        key = self.begin()
        try:
            yield
        finally:
            self.end(key)


def clear_deaths() -> None:
    """Forget the counts of :class:`ProcessDeaths` of this driver's job (after a phase)."""
    try:
        import ray

        if ray.is_initialized():
            _kv_del(f"{ray.get_runtime_context().get_job_id()}/", by_prefix=True)
    except Exception:  # noqa: BLE001 - a few keys left in the cluster's store
        log.debug("could not clear the death counts", exc_info=True)


def _parse_record(value: bytes | None) -> tuple[str, int]:
    node, _, crashes = (value or b"").decode().partition(" ")
    return node, int(crashes or 0)


def _node_alive(node: str) -> bool:
    import ray

    return any(n.get("NodeID") == node and n.get("Alive") for n in ray.nodes())


def _kv_get(key: str) -> bytes | None:
    from ray.experimental.internal_kv import _internal_kv_get

    return _internal_kv_get(key, namespace=DEATHS_NAMESPACE)


def _kv_put(key: str, value: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key, value, overwrite=True, namespace=DEATHS_NAMESPACE)


def _kv_del(key: str, by_prefix: bool = False) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(key, del_by_prefix=by_prefix, namespace=DEATHS_NAMESPACE)


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
    > 1 lets each actor run that many batches at once, in threads. The stage is called in the
    thread of Ray's task (``enable_true_multi_threading``; with one call at a time Ray Data would
    otherwise hand each call to a thread of its own, where Ray's task context, which
    :class:`ProcessDeaths` reads, is not set)."""
    import ray

    kwargs = {} if in_flight is None else {"max_tasks_in_flight_per_actor": in_flight}
    kwargs["enable_true_multi_threading"] = True
    if concurrent_calls > 1:
        kwargs.update({"max_tasks_in_flight_per_actor": max(concurrent_calls, in_flight or 0),
                       "max_concurrent_calls_per_actor": int(concurrent_calls)})
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


def stage_retries(cfg: Config) -> dict[str, int]:
    """``map_batches`` arguments for a pool of :class:`StageActor`: Ray runs a call again without end
    after the actor's process died, the actor bounds it (``ray.max_task_retries``, see
    :class:`ProcessDeaths`): a lost node costs only its calls in flight, work that kills its
    process each time still stops the run."""
    retries(cfg)  # the same warning filter
    return {"max_task_retries": -1}


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
