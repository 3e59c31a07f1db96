"""How much of the cluster each stage reserves, and whether CLIP runs on GPUs.

Actor pools hold their reservations for a whole phase; if the pools of a phase
and one task of each task stage did not fit the cluster together, the phase
would wait for resources forever, so reservations are scaled down (with a
warning) instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..config import Config

log = logging.getLogger(__name__)


#: how much of the CPU-node resource one task or actor asks for: the resource only says
#: where CPU stages may run (nodes advertise far more of it, see configs/cluster/), the CPUs
#: themselves are reserved with ``num_cpus``
PLACEMENT_SHARE = 0.001


@dataclass(frozen=True)
class ClusterShape:
    """What the plans need of a cluster. ``cpu_node_cpus``: CPUs of the nodes that run CPU stages
    (those advertising ``ray.cpu_node_resource``; every node's when none does); ``gpu_node_cpus``:
    CPUs of the nodes with GPUs; ``placement``: some node advertises the CPU-node resource."""

    cpus: float
    gpus: float
    nodes: int = 1
    cpu_node_cpus: float | None = None
    gpu_node_cpus: float = 0.0
    placement: bool = False

    @property
    def cpu_stage_cpus(self) -> float:
        return self.cpus if self.cpu_node_cpus is None else self.cpu_node_cpus


@dataclass(frozen=True)
class ScorePlan:
    """Phase 3 (fetch and score): actors and the CPUs / GPUs each reserves."""

    use_gpu: bool
    tokenize_upstream: bool
    fetch_actors: int
    fetch_cpus: float
    tokenize_actors: int
    tokenize_cpus: float
    clip_actors: int
    clip_resources: dict
    read_cpus: float
    write_cpus: float
    #: concurrent read / write tasks at most: their CPU share is small (``ray.read_num_cpus``,
    #: ``ray.write_num_cpus``), and without a cap a node would start a worker process per share
    read_tasks: int = 2
    write_tasks: int = 2
    #: extra arguments of every CPU stage: the CPU-node resource when the cluster has such nodes
    cpu_resources: dict = field(default_factory=dict)


def cluster_shape(cpu_node_resource: str = "") -> ClusterShape:
    import ray

    res = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    cpu_nodes = [n for n in alive if cpu_node_resource and n.get("Resources", {}).get(cpu_node_resource, 0) > 0]
    cpu_node_cpus = sum(float(n["Resources"].get("CPU", 0.0)) for n in cpu_nodes) if cpu_nodes else None
    gpu_node_cpus = sum(float(n.get("Resources", {}).get("CPU", 0.0)) for n in alive
                        if n.get("Resources", {}).get("GPU", 0) > 0)
    return ClusterShape(float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0)), max(1, len(alive)),
                        cpu_node_cpus=cpu_node_cpus, gpu_node_cpus=gpu_node_cpus, placement=bool(cpu_nodes))


def cluster_room() -> str:
    """The cluster's free room now, in words (for a warning that work is waiting)."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    alive = sum(1 for n in ray.nodes() if n.get("Alive"))
    gpus = (f", {free.get('GPU', 0.0):g} of {total.get('GPU', 0.0):g} GPUs free" if total.get("GPU")
            else ", no GPU")
    return (f"the cluster has {alive} node(s), {free.get('CPU', 0.0):g} of {total.get('CPU', 0.0):g} CPUs free{gpus}: "
            "work that needs more room than that (the actors of a lost node, GPU actors) starts when a node "
            "with room joins")


def cpu_stage_resources(cfg: Config, shape: ClusterShape) -> dict:
    """``map_batches`` / remote arguments that keep a CPU stage on the CPU nodes (none when
    every node is one)."""
    return {"resources": {cfg.ray.cpu_node_resource: PLACEMENT_SHARE}} if shape.placement else {}


def _scale(plan: dict[str, float], need: float, cpus: float, what: str) -> dict[str, float]:
    if cpus > 0 and need > cpus:
        factor = cpus / need
        log.warning("%s reserves %.2f CPUs but the cluster has %.2f: scaling every reservation by %.2f "
                    "(set ray.* / clip.num_cpus_per_actor to choose yourself)", what, need, cpus, factor)
        return {k: round(v * factor, 4) for k, v in plan.items()}
    return plan


def candidates_plan(cfg: Config, shape: ClusterShape, n_inputs: int) -> tuple[int, float]:
    """Phase 1: (actors, CPUs per actor). One actor per CPU by default, never more than inputs."""
    r = cfg.ray
    cpus_there = shape.cpu_stage_cpus
    actors = r.extract_actors or max(1, int(cpus_there // max(r.extract_num_cpus, 1e-3)))
    actors = max(1, min(actors, n_inputs))
    cpus = _scale({"extract": r.extract_num_cpus}, actors * r.extract_num_cpus, cpus_there, "the candidates phase")
    return actors, cpus["extract"]


def score_plan(cfg: Config, shape: ClusterShape, rows: int | None = None) -> ScorePlan:
    """Phase 3: GPUs when the cluster has them (or clip.device=cuda asks an autoscaler for them).
    ``rows``: the rows to fetch; no stage gets more actors than it has batches of them (a small
    run on a cluster config would otherwise start hundreds of idle actor processes)."""
    r, c = cfg.ray, cfg.clip
    use_gpu = c.device == "cuda" or (c.device == "auto" and shape.gpus > 0)
    tokenize = c.tokenize_upstream == "always" or (c.tokenize_upstream == "auto" and use_gpu)

    def actors(wanted: int, batch_size: int) -> int:
        return wanted if rows is None else max(1, min(wanted, -(-rows // max(1, batch_size))))

    fetch_actors = actors(r.fetch_actors, cfg.fetch.batch_size)
    clip_actors = actors(c.actors, c.batch_size)
    tokenize_actors = actors(r.tokenize_actors, c.batch_size)
    plan = {"fetch": r.fetch_num_cpus, "tokenize": r.tokenize_num_cpus, "clip": c.num_cpus_per_actor,
            "read": r.read_num_cpus, "write": r.write_num_cpus}
    need = plan["read"] + plan["write"] + fetch_actors * plan["fetch"]
    need += 0.0 if use_gpu else clip_actors * plan["clip"]
    need += tokenize_actors * plan["tokenize"] if tokenize else 0.0
    # CPU stages fit the CPU nodes; GPU actors the CPUs of the GPU nodes
    plan = _scale(plan, need, shape.cpu_stage_cpus, "the fetch-and-score phase")
    cpu_resources = cpu_stage_resources(cfg, shape)
    if use_gpu:
        gpu_cpus = c.num_cpus_per_gpu_actor
        gpu_node_cpus = shape.gpu_node_cpus if shape.gpus > 0 else 0.0
        if gpu_node_cpus > 0:
            gpu_cpus = _scale({"clip": gpu_cpus}, clip_actors * gpu_cpus, gpu_node_cpus, "the GPU scoring actors")["clip"]
        clip_resources = {"num_gpus": c.num_gpus_per_actor, "num_cpus": gpu_cpus}
    else:
        clip_resources = {"num_cpus": plan["clip"], **cpu_resources}
    tasks = task_pool_size(shape.cpu_stage_cpus)
    return ScorePlan(use_gpu, tokenize, fetch_actors, plan["fetch"], tokenize_actors, plan["tokenize"],
                     clip_actors, clip_resources, plan["read"], plan["write"], tasks, tasks, cpu_resources)


def task_pool_size(cpus: float) -> int:
    """Concurrent tasks of a light task stage (reading or writing a work shard's rows): one per
    two CPUs of the nodes that run it, at least 2. Each concurrent task needs a worker process
    (≈ 2 CPU-seconds to start); a share of 0.1 CPU per task would otherwise start ten per CPU,
    which on a laptop or a test costs more than the run's work."""
    return max(2, int(cpus // 2))
