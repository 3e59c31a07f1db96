"""A local two-node Ray cluster (loopback only): the run joins it via --address (which wins over
RAY_ADDRESS), prepares both nodes, and every phase completes and commits every unit.

Which node runs which download is the scheduler's choice and depends on the machine's load;
the test asserts what is deterministic: both nodes are offered work (each is prepared by a
task pinned to it, and the candidates actors need more CPUs than one node has), every unit of
every phase is committed, and no node outside the cluster did any of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from laionbuild.demo.crawl import build_crawl
from laionbuild.demo.image_server import LoopbackServer

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def two_node_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def test_every_phase_runs_on_both_nodes(two_node_cluster, tmp_path):
    with LoopbackServer("127.0.0.1") as server:
        # images answered slowly enough that the downloads outlast the start of every actor: the
        # first actor ready would otherwise take all the work of so small a crawl
        crawl = build_crawl(str(tmp_path / "inputs"), n_files=8, pages_per_file=4, images_per_page=6,
                            image_base=f"http://images.crawl.test:{server.port}")
        crawl.register(server, delay_s=0.25)
        inputs = tmp_path / "inputs"
        out = tmp_path / "out"
        # RAY_ADDRESS names a port where nothing listens: the explicit --address must win
        env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9", "RAY_USAGE_STATS_ENABLED": "0"}
        sets = [*crawl.config_overrides("127.0.0.1"), "run.work_shard_rows=16", "ray.stream_rows=8",
                "ray.local_max_rows=0",  # de-dup and publish as Ray tasks on the engine
                "ray.extract_num_cpus=1", "ray.fetch_actors=2", "clip.actors=2", "clip.num_cpus_per_actor=0.5",
                "fetch.batch_size=4", "fetch.threads=2", "fetch.per_host_concurrency=4", "clip.batch_size=4"]
        cmd = [sys.executable, "-m", "laionbuild", "run", "-c", str(REPO / "configs" / "smoke.yaml"),
               "--input", str(inputs), "--output", str(out), "--no-progress", "--address", two_node_cluster.address]
        for s in sets:
            cmd += ["--set", s]
        # a safety net only: on a loaded machine the run may take minutes
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"connecting to the Ray cluster at {two_node_cluster.address} (--address" in r.stderr
    assert "Ray cluster: 2 node(s), 4 CPUs, 0 GPUs" in r.stderr
    assert "models ready on 2 node(s)" in r.stderr  # one task pinned to each node
    cluster_nodes = {n.node_id for n in two_node_cluster.list_all_nodes()}
    # phase 1: candidates, one marker per input; 4 one-CPU actors on two 2-CPU nodes span both
    markers = [json.loads(p.read_text()) for p in (out / "candidates" / "_done").glob("*.json")]
    assert len(markers) == 8
    assert {m["node"] for m in markers} <= cluster_nodes
    # phase 2: the de-dup units (hash ranges, groups of inputs) ran as tasks on the cluster's nodes
    manifest = json.loads(next((out / "workshards").glob("_manifest-*.json")).read_text())
    assert manifest["engine"] == "ray" and set(manifest["nodes"]) <= cluster_nodes
    # phase 3: every work shard downloaded, scored and committed
    scored = [json.loads(p.read_text()) for p in (out / "scored" / "_done").glob("*.json")]
    assert len(scored) == manifest["n_shards"] > 1
    for stage in ("fetch", "clip"):
        used = set().union(*(m["nodes"].get(stage, []) for m in scored))
        assert used and used <= cluster_nodes, (stage, [m["nodes"] for m in scored])
        print(stage, "ran on", len(used), "of", len(cluster_nodes), "nodes")  # the scheduler's choice
    stats = json.loads((out / "stats.json").read_text())
    print("phases", stats["phase_seconds"], stats["work_shards"])
    assert stats["files"]["total"] == 8 and stats["files"]["failed"] == 0
    assert stats["work_shards"]["total"] == manifest["n_shards"]
    assert stats["stages"]["dedup"]["kept"] == stats["stages"]["fetch"]["counts"]["rows"] == len(crawl.pairs)
    assert stats["stages"]["fetch"]["kept"] == len(crawl.pairs)
    assert (out / "_SUCCESS").exists()
