"""How much of the cluster each stage reserves, and whether CLIP runs on GPUs.

Actor pools hold their reservations for a whole phase; if the pools of a phase
and one task of each task stage did not fit the cluster together, the phase
would wait for resources forever, so reservations are scaled down (with a
warning) instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterShape:
    cpus: float
    gpus: float
    nodes: int = 1


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


def cluster_shape() -> ClusterShape:
    import ray

    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return ClusterShape(float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0)), max(1, nodes))


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
    actors = r.extract_actors or max(1, int(shape.cpus // max(r.extract_num_cpus, 1e-3)))
    actors = max(1, min(actors, n_inputs))
    cpus = _scale({"extract": r.extract_num_cpus}, actors * r.extract_num_cpus, shape.cpus, "the candidates phase")
    return actors, cpus["extract"]


def score_plan(cfg: Config, shape: ClusterShape) -> ScorePlan:
    """Phase 3: GPUs when the cluster has them (or clip.device=cuda asks an autoscaler for them)."""
    r, c = cfg.ray, cfg.clip
    use_gpu = c.device == "cuda" or (c.device == "auto" and shape.gpus > 0)
    tokenize = c.tokenize_upstream == "always" or (c.tokenize_upstream == "auto" and use_gpu)
    plan = {"fetch": r.fetch_num_cpus, "tokenize": r.tokenize_num_cpus, "clip": c.num_cpus_per_actor,
            "read": r.read_num_cpus, "write": r.write_num_cpus}
    need = plan["read"] + plan["write"] + r.fetch_actors * plan["fetch"]
    need += 0.0 if use_gpu else c.actors * plan["clip"]
    need += r.tokenize_actors * plan["tokenize"] if tokenize else 0.0
    plan = _scale(plan, need, shape.cpus, "the fetch-and-score phase")
    clip_resources = {"num_gpus": c.num_gpus_per_actor} if use_gpu else {"num_cpus": plan["clip"]}
    return ScorePlan(use_gpu, tokenize, r.fetch_actors, plan["fetch"], r.tokenize_actors, plan["tokenize"],
                     c.actors, clip_resources, plan["read"], plan["write"])
