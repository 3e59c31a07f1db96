"""Placement on a loopback cluster shaped like a real one: a head without CPUs, a CPU worker node
that advertises the CPU-node resource and a node that declares a GPU (CPU torch behind it).
The fetch-and-score stream, as the score phase builds it (its plan, its adapters, many streaming
fetch actors), must finish with every CPU stage on the CPU node and scoring on the GPU node."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from PIL import Image

from laionbuild import schema as S
from laionbuild.config import load_config
from laionbuild.demo.image_server import LoopbackServer
from helpers.clusters import start_cluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CPU_NODE_RESOURCE = "laionbuild_cpu_node"
N_ROWS = 96
FETCH_ACTORS = 6


def _start_cluster():
    cluster, _ = start_cluster({"num_cpus": 2, "resources": {CPU_NODE_RESOURCE: 1000}},
                               {"num_cpus": 1, "num_gpus": 1})
    return cluster


@pytest.fixture()
def shaped_cluster():
    import ray

    if ray.is_initialized():
        ray.shutdown()  # the test run's shared Ray: this test needs a cluster of its own shape
    cluster = _start_cluster()
    try:
        yield cluster
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


class _Scorer:
    """The GPU stage's stand-in: torch (CPU) over the rows' pixels, as CLIP reads them."""

    def __init__(self, cfg):
        import torch

        self.torch = torch
        self.size = cfg.resize.image_size

    def __call__(self, batch):
        idx = np.arange(S.batch_len(batch))
        images, bad = S.image_rows(batch[S.IMAGE], idx, self.size)
        alive = np.asarray(batch[S.DROP_REASON], dtype=object) == ""
        assert not (bad & alive).any()  # every alive row has its pixels, every failed row none
        mean = self.torch.from_numpy(images).float().mean(dim=(1, 2, 3)).numpy()
        out = {k: v for k, v in batch.items() if k != S.IMAGE}
        out["mean"] = np.where(alive, mean, np.nan).astype(np.float32)
        return out


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_cpu_stages_on_cpu_nodes_scoring_on_the_gpu_node(shaped_cluster):
    import ray

    from laionbuild.runner.adapter import NODE_COLUMN, StageActor, StreamStageActor, actor_pool
    from laionbuild.runner.resources import cluster_shape, score_plan
    from laionbuild.runner.score import FetchStage

    ray.init(address=shaped_cluster.address)
    alive = [n for n in ray.nodes() if n["Alive"]]
    cpu_node = next(n["NodeID"] for n in alive if n["Resources"].get(CPU_NODE_RESOURCE))
    gpu_node = next(n["NodeID"] for n in alive if n["Resources"].get("GPU"))
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests
    # a generous time limit: on a loaded machine a loopback answer can take seconds, and a row that
    # timed out would change the counts below
    cfg = load_config(None, ["fetch.allow_addresses=[127.0.0.1]", "fetch.retries=0", "fetch.timeout_s=120",
                             "fetch.threads=4",
                             "fetch.per_host_concurrency=8", "fetch.batch_size=8", "fetch.emit_after_s=0.05",
                             f"ray.fetch_actors={FETCH_ACTORS}", "clip.batch_size=16", "resize.image_size=32"])
    shape = cluster_shape(cfg.ray.cpu_node_resource)
    assert shape.placement and shape.cpu_node_cpus == 2 and shape.gpu_node_cpus == 1 and shape.gpus == 1
    plan = score_plan(cfg, shape)
    assert plan.use_gpu and plan.clip_resources["num_cpus"] <= shape.gpu_node_cpus  # GPU actors' CPUs counted
    assert FETCH_ACTORS * plan.fetch_cpus + plan.read_cpus + plan.write_cpus <= shape.cpu_node_cpus + 1e-6
    with LoopbackServer("127.0.0.1") as server:
        for i in range(N_ROWS):
            if i % 8 == 3:
                server.add(f"/{i}.png", b"gone", status=404, content_type="text/plain")
            else:
                server.add(f"/{i}.png", _png(i), content_type="image/png", delay_s=0.2 if i % 16 == 5 else 0.0)
        items = [{S.URL: f"{server.base_url}/{i}.png", S.ALT_TEXT: f"row {i}", S.DROP_REASON: ""}
                 for i in range(N_ROWS)]
        ds = ray.data.from_items(items, override_num_blocks=12)
        ds = ds.map_batches(lambda b: b, batch_format="numpy", num_cpus=plan.read_cpus, **plan.cpu_resources)
        ds = ds.map_batches(StreamStageActor, fn_constructor_args=(FetchStage, cfg, "fetch"), batch_format="numpy",
                            batch_size=cfg.fetch.batch_size,
                            compute=actor_pool(plan.fetch_actors, concurrent_calls=cfg.fetch.batches_in_flight),
                            num_cpus=plan.fetch_cpus, **plan.cpu_resources)
        ds = ds.map_batches(StageActor, fn_constructor_args=(_Scorer, cfg, "clip"), batch_format="numpy",
                            batch_size=cfg.clip.batch_size, compute=actor_pool(plan.clip_actors),
                            **plan.clip_resources)
        rows = ds.take_all()
    assert sorted(r[S.ALT_TEXT] for r in rows) == sorted(f"row {i}" for i in range(N_ROWS))
    failed = [r for r in rows if r[S.STATUS] != "success"]
    assert [r[S.DROP_REASON] for r in failed] == ["fetch:http_error_404"] * (N_ROWS // 8), \
        sorted({(r[S.STATUS], r[S.ERROR_MESSAGE]) for r in failed})
    assert {r[NODE_COLUMN + "fetch"] for r in rows} == {cpu_node}
    assert {r[NODE_COLUMN + "clip"] for r in rows} == {gpu_node}
    assert all(np.isfinite(r["mean"]) for r in rows if r[S.STATUS] == "success")


@pytest.mark.parametrize("device,mode,gpus,outcome", [
    ("cuda", "local", 0, "error"),     # a Ray this run started never gets a GPU
    ("cuda", "env", 0, "warning"),     # a cluster may: an autoscaler adds GPU nodes for waiting actors
    ("cuda", "connected", 0, "warning"),
    ("cuda", "local", 1, "quiet"),
    ("auto", "local", 0, "quiet"),     # auto scores on the CPU then
    ("cpu", "env", 0, "quiet"),
])
def test_cuda_without_a_gpu_is_refused_locally_and_said_on_a_cluster(device, mode, gpus, outcome, caplog):
    from laionbuild.errors import SetupError
    from laionbuild.runner.run import _check_gpus

    cfg = load_config(None, [f"clip.device={device}"])
    caplog.set_level("WARNING", logger="laionbuild")
    if outcome == "error":
        with pytest.raises(SetupError, match="clip.device=auto"):
            _check_gpus(cfg, mode, gpus)
        return
    _check_gpus(cfg, mode, gpus)
    warned = [r for r in caplog.records if "no GPU" in r.getMessage()]
    assert len(warned) == (1 if outcome == "warning" else 0)


def test_no_stage_gets_more_actors_than_it_has_batches():
    from laionbuild.runner.resources import ClusterShape, score_plan

    cfg = load_config(None, ["ray.fetch_actors=600", "clip.actors=64", "clip.device=cuda", "ray.tokenize_actors=40",
                             "fetch.batch_size=256", "clip.batch_size=512"])
    shape = ClusterShape(cpus=1600.0, gpus=64.0, nodes=100, cpu_node_cpus=1536.0, gpu_node_cpus=64.0)
    full = score_plan(cfg, shape)
    assert (full.fetch_actors, full.clip_actors, full.tokenize_actors) == (600, 64, 40)
    assert score_plan(cfg, shape, rows=10_000_000) == full
    small = score_plan(cfg, shape, rows=1000)  # 4 fetch batches, 2 CLIP batches
    assert (small.fetch_actors, small.clip_actors, small.tokenize_actors) == (4, 2, 2)
    assert score_plan(cfg, shape, rows=0).fetch_actors == 1
    assert small.fetch_cpus >= full.fetch_cpus  # fewer actors: nothing scaled down for them
