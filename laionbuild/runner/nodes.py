"""Before any work: every node gets the model files once and is checked where the models will load.

The driver's preflight checks the machine it runs on; on a cluster the models load
on the workers. One task per alive node copies the files of the model cache to the
node's local disk (``models.local_dir``, once per node) and loads what that node will
run: the language model everywhere, the CLIP and safety models on GPU nodes (or on
every node when the cluster has no GPU). A node that cannot is a setup error
(exit status 2) naming the node and the files, raised before any input is read.

The same task reports the node's releases of the packages that decide the output
(:data:`CHECKED_PACKAGES`, and a digest of laionbuild's own code); any that differs
from the driver's is a setup error naming the node and both versions. Every node
installs configs/cluster/constraints.txt, so a mismatch means a node was set up by hand
or from another checkout.
"""

from __future__ import annotations

import logging
from typing import Any

from ..config import Config
from ..errors import SetupError

log = logging.getLogger(__name__)

#: compared between the driver and every node before any work (distribution names)
CHECKED_PACKAGES = ("ray", "torch", "open_clip_torch", "pyarrow")


def node_versions() -> dict[str, str]:
    """This process's laionbuild (version and a digest of its code) and :data:`CHECKED_PACKAGES`."""
    import hashlib
    import importlib.metadata
    from pathlib import Path

    from .. import __version__

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    out = {"laionbuild": __version__, "laionbuild code": digest.hexdigest()[:12]}
    for name in CHECKED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def version_mismatches(driver: dict[str, str], results: list[dict[str, Any]]) -> list[str]:
    """One phrase per node whose versions differ from the driver's, naming the node and both versions."""
    found = []
    for r in results:
        theirs = r.get("versions") or {}
        diff = [f"{name} {theirs.get(name, 'unknown')} (driver {mine})" for name, mine in driver.items()
                if theirs.get(name) != mine]
        if diff:
            found.append(f"node {r['host']} ({r['node'][:12]}): " + ", ".join(diff))
    return found


def check_node(cfg: Config, load_clip: bool, tokenize: bool = False) -> dict[str, Any]:
    """Runs on one node: copy the models there and load them (``tokenize``: the CLIP tokenizers too,
    from this node's copy, as an upstream tokenizer actor there would); returns what happened,
    never raises."""
    import socket

    from .adapter import node_id

    out: dict[str, Any] = {"node": node_id(), "host": socket.gethostname(), "error": ""}
    out["versions"] = node_versions()
    try:
        from ..models import localize_files, local_config
        from ..stages import registry

        out["files"] = localize_files(cfg)
        local = local_config(cfg)
        for spec in registry.STAGES:  # each stage's own node check, GPU stages where CLIP runs
            check = spec.function("check_node")
            if check is not None and (load_clip or spec.resources != "gpu") and spec.is_enabled(local):
                check(local)
        if tokenize:  # an upstream tokenizer actor may run here: its tokenizers from this node's copy
            from ..stages.clip_score import ClipTokenizer

            ClipTokenizer(local.clip)
    except Exception as exc:  # noqa: BLE001 - reported to the driver as data
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def check_output_location(output: str, nodes: list[dict[str, Any]]) -> None:
    """A local output folder works on one machine only: on a cluster of several machines each
    node would write its part to its own disk. Refused there, naming the hosts."""
    if "://" in output and not output.startswith("file://"):
        return
    hosts = sorted({n.get("NodeManagerHostname") or n.get("NodeManagerAddress", "?") for n in nodes})
    if len(hosts) > 1:
        raise SetupError(
            f"the output {output} is a local folder, but the Ray cluster spans {len(hosts)} machines "
            f"({', '.join(hosts[:3])}{', ...' if len(hosts) > 3 else ''}): each would write to its own disk. "
            "Fix: --output s3://BUCKET/PATH (or gs://), a location every node reaches")


def prepare_nodes(cfg: Config, *, scoring: bool, checked: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """Run :func:`check_node` on every alive node but those in ``checked`` (node ids: the nodes a
    phase before found ready; a node that joined since is checked before the next phase); raise
    SetupError naming the nodes that failed."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = [n for n in ray.nodes() if n.get("Alive")]
    any_gpu = any(n.get("Resources", {}).get("GPU", 0) for n in alive)
    check_output_location(cfg.run.output, alive)  # the whole cluster: a node that joined may be another machine
    nodes = [n for n in alive if n["NodeID"] not in checked]
    if not nodes:
        return []
    c = cfg.clip
    # upstream tokenizer actors are CPU actors: any node may host one (see resources.score_plan)
    tokenize = scoring and (c.tokenize_upstream == "always" or (
        c.tokenize_upstream == "auto" and (c.device == "cuda" or (c.device == "auto" and any_gpu))))
    task = ray.remote(num_cpus=0)(check_node)
    refs = []
    for n in nodes:
        gpu = bool(n.get("Resources", {}).get("GPU", 0))
        load_clip = scoring and (gpu or not any_gpu)
        strategy = NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)
        refs.append(task.options(scheduling_strategy=strategy).remote(cfg, load_clip, tokenize))
    results = ray.get(refs)
    mismatches = version_mismatches(node_versions(), results)
    if mismatches:
        raise SetupError("version mismatch between the driver and " + "; ".join(mismatches) + ". Fix: install "
                         "configs/cluster/constraints.txt on every node and the driver (pip install -c "
                         "configs/cluster/constraints.txt -e '.[cluster]' from the same checkout), then run again")
    failed = [r for r in results if r["error"]]
    if failed:
        raise SetupError("model files missing or unusable on " + "; ".join(
            f"node {r['host']} ({r['node'][:12]}): {r['error']}" for r in failed))
    copied = sum(len(r.get("files", {}).get("copied", [])) for r in results)
    log.info("models ready on %d %snode(s)%s", len(results), "new " if checked else "",
             f" ({copied} file(s) copied)" if copied else "")
    return results
