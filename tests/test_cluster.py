"""A local two-node Ray cluster (loopback only): the run joins it via --address (which wins over
RAY_ADDRESS) and uses both nodes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_extract_runs_on_both_nodes(two_node_cluster, tmp_path):
    from laionbuild.demo.sample_warc import build_demo_sample

    sample = build_demo_sample(str(tmp_path / "sample"), image_base="http://images.demo.test:9")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i in range(6):
        shutil.copy(sample.warc_paths[0], inputs / f"part-{i}.warc.gz")
    out = tmp_path / "out"
    # RAY_ADDRESS names a port where nothing listens: the explicit --address must win
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9", "RAY_USAGE_STATS_ENABLED": "0"}
    r = subprocess.run(
        [sys.executable, "-m", "laionbuild", "extract", str(inputs), "--output", str(out), "--no-progress",
         "--address", two_node_cluster.address, "--set", "ray.extract_num_cpus=1"],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"connecting to the Ray cluster at {two_node_cluster.address} (--address" in r.stderr
    assert "Ray cluster: 2 node(s), 4 CPUs, 0 GPUs" in r.stderr
    markers = [json.loads(p.read_text()) for p in (out / "_work" / "done").glob("*.json")]
    assert len(markers) == 6
    nodes = {m["node"] for m in markers}
    cluster_nodes = {n.node_id for n in two_node_cluster.list_all_nodes()}
    assert nodes <= cluster_nodes
    assert len(nodes) == 2, f"extraction ran on {len(nodes)} node(s)"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["files"]["total"] == 6 and stats["files"]["failed"] == 0
    assert list((out / "candidates").glob("*.parquet"))
