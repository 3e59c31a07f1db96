"""Before any work: every node gets the model files once and is checked where the models will load.

The driver's preflight checks the machine it runs on; on a cluster the models load
on the workers. One task per alive node copies the files of the model cache to the
node's local disk (``models.local_dir``, once per node) and loads what that node will
run: the language model everywhere, the CLIP and safety models on GPU nodes (or on
every node when the cluster has no GPU). A node that cannot is a setup error
(exit status 2) naming the node and the files, raised before any input is read.
"""

from __future__ import annotations

import logging
from typing import Any

from ..config import Config
from ..errors import SetupError

log = logging.getLogger(__name__)


def check_node(cfg: Config, load_clip: bool) -> dict[str, Any]:
    """Runs on one node: copy the models there and load them; returns what happened, never raises."""
    import socket

    from .adapter import node_id

    out: dict[str, Any] = {"node": node_id(), "host": socket.gethostname(), "error": ""}
    try:
        from ..models import localize_files, local_config
        from ..stages import registry

        out["files"] = localize_files(cfg)
        local = local_config(cfg)
        for spec in registry.STAGES:  # each stage's own node check, GPU stages where CLIP runs
            check = spec.function("check_node")
            if check is not None and (load_clip or spec.resources != "gpu") and spec.is_enabled(local):
                check(local)
    except Exception as exc:  # noqa: BLE001 - reported to the driver as data
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def prepare_nodes(cfg: Config, *, scoring: bool) -> list[dict[str, Any]]:
    """Run :func:`check_node` on every alive node; raise SetupError naming the nodes that failed."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    any_gpu = any(n.get("Resources", {}).get("GPU", 0) for n in nodes)
    task = ray.remote(num_cpus=0)(check_node)
    refs = []
    for n in nodes:
        gpu = bool(n.get("Resources", {}).get("GPU", 0))
        load_clip = scoring and (gpu or not any_gpu)
        strategy = NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)
        refs.append(task.options(scheduling_strategy=strategy).remote(cfg, load_clip))
    results = ray.get(refs)
    failed = [r for r in results if r["error"]]
    if failed:
        raise SetupError("model files missing or unusable on " + "; ".join(
            f"node {r['host']} ({r['node'][:12]}): {r['error']}" for r in failed))
    copied = sum(len(r.get("files", {}).get("copied", [])) for r in results)
    log.info("models ready on %d node(s)%s", len(results), f" ({copied} file(s) copied)" if copied else "")
    return results
