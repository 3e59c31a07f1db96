"""Loopback test clusters of a given shape (``ray.cluster_utils.Cluster``): a head without CPUs and
worker nodes, all on 127.0.0.1."""

from __future__ import annotations

#: attempts at starting a test cluster: Ray gives a node 30 s to register, which a loaded machine
#: can exceed; such a start is retried from scratch
CLUSTER_STARTS = 3


def start_cluster(*nodes: dict):
    """A cluster with a 0-CPU head and one worker node per ``nodes`` entry (``add_node`` keyword
    arguments); returns ``(cluster, [worker nodes])`` once every node has registered."""
    from ray.cluster_utils import Cluster

    for attempt in range(CLUSTER_STARTS):
        cluster = None
        try:
            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False})
            workers = [cluster.add_node(node_ip_address="127.0.0.1", **node) for node in nodes]
            cluster.wait_for_nodes()
            return cluster, workers
        except Exception as exc:  # noqa: BLE001
            if "timed out during startup" not in str(exc) or attempt + 1 == CLUSTER_STARTS:
                raise
            if cluster is not None:
                cluster.shutdown()
    raise AssertionError("unreachable")
