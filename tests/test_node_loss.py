"""A worker node lost during phase 3 costs only the rows it had in flight: the run goes on, Ray
Data runs those rows again on the node that is left, and the run publishes the same pairs as a
run without the loss. A node lost during phase 1 costs the inputs it was reading, read again on the
node that is left.

A loopback cluster shaped like a small real one (a head without CPUs, two worker nodes) runs
``laionbuild run`` on a synthetic crawl. The image server answers the first images, then holds
every request until the node is gone: once it holds more requests than one fetch actor can have
in flight, both nodes' fetch actors wait on it, and the node whose raylet runs a fetch actor (and
the CLIP actor, when one does) is killed, raylet and workers, without warning. Ray then sends the
lost actors' calls again at once and fails them until it marks the node dead (15 s here), which
used up ``ray.max_task_retries`` and stopped the run before the stage actors counted the deaths of
their processes themselves (see ``laionbuild.runner.adapter.ProcessDeaths``). Nothing here waits
for a time: the kill follows request counts, the end is the run's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laionbuild.demo.crawl import build_crawl
from laionbuild.demo.image_server import LoopbackServer
from helpers.clusters import start_cluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
#: images answered before the server holds the rest (the phase is well under way)
ANSWERED_FIRST = 24
#: rows one fetch actor has in flight at most: its calls at once times the rows of a call
FETCH_BATCH, FETCH_CALLS = 4, 2
PER_ACTOR = FETCH_BATCH * FETCH_CALLS


class HoldingServer(LoopbackServer):
    """Answers the first ``answer_first`` requests, then holds each until :meth:`release`."""

    def __init__(self, answer_first: int):
        super().__init__("127.0.0.1")
        self.answer_first = answer_first
        self.received = 0
        self.held = 0
        self.released = threading.Event()
        self.changed = threading.Condition()

    def _enter(self, path, headers):
        super()._enter(path, headers)
        with self.changed:
            self.received += 1
            hold = self.received > self.answer_first and not self.released.is_set()
            self.held += hold
            self.changed.notify_all()
        if hold:
            self.released.wait()

    def release(self) -> None:
        self.released.set()


def _start_cluster():
    return start_cluster({"num_cpus": 2}, {"num_cpus": 2})


@pytest.fixture()
def two_worker_cluster():
    import ray

    if ray.is_initialized():
        ray.shutdown()  # the test run's shared Ray: this test needs a cluster of its own shape
    cluster, workers = _start_cluster()
    try:
        yield cluster, workers
    finally:
        cluster.shutdown()


def _children(pid: int) -> list[str]:
    """The command lines of ``pid``'s child processes (a raylet's: its workers, named by their actor)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found.append(Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _actors_on(node) -> tuple[int, int]:
    """(fetch actors, CLIP actors) whose processes the node's raylet runs."""
    kids = _children(node.all_processes["raylet"][0].process.pid)
    return (sum("MapBatches(StreamStageActor)" in k for k in kids),
            sum("MapBatches(StageActor)" in k for k in kids))


def _command(crawl, address: str, out: Path, inputs: list[str] | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "laionbuild", "run", "--config", str(REPO / "configs" / "smoke.yaml"),
           "--output", str(out), "--no-progress", "--address", address]
    for path in inputs or crawl.warc_paths:
        cmd += ["--input", path]
    # several work shards, two fetch actors (one per node) of two calls of 4 rows each; a long
    # fetch time limit: a held request must not time out on a loaded machine
    for s in [*crawl.config_overrides("127.0.0.1"), "run.work_shard_rows=16", "ray.fetch_actors=2",
              f"fetch.batch_size={FETCH_BATCH}", f"fetch.batches_in_flight={FETCH_CALLS}", "clip.batch_size=8",
              "fetch.timeout_s=300"]:
        cmd += ["--set", s]
    return cmd


def _published(out: Path) -> set[tuple[str, str, str]]:
    return {(subset, r["URL"], r["TEXT"]) for subset in ("en", "multi", "nolang")
            for f in sorted((out / subset).glob("*.parquet")) for r in pq.read_table(f).to_pylist()}


def _run_and_kill(cmd: list[str], cluster, server: HoldingServer, enough, victim_of) -> tuple[int, str]:
    """Runs ``cmd``; once ``enough(server)`` holds (the requests it holds), kills the node that
    ``victim_of()`` picks (raylet and workers, without warning), then lets the server answer.
    Returns the run's exit status and output."""
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    output: list[str] = []
    readers = [threading.Thread(target=lambda s=s: output.extend(s), daemon=True) for s in (proc.stdout, proc.stderr)]
    for reader in readers:
        reader.start()
    try:
        with server.changed:
            server.changed.wait_for(lambda: enough(server) or proc.poll() is not None, timeout=600)
        assert enough(server), ("the run never reached the moment of the kill", proc.poll(), "".join(output)[-3000:])
        cluster.remove_node(victim_of(), allow_graceful=False)
    finally:
        server.release()
        try:
            code = proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
    for reader in readers:
        reader.join(timeout=10)
    return code, "".join(output)


def test_a_node_lost_in_phase_3_costs_only_its_rows_in_flight(two_worker_cluster, tmp_path):
    cluster, workers = two_worker_cluster
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with HoldingServer(ANSWERED_FIRST) as server:
        crawl = build_crawl(str(tmp_path / "inputs"), n_files=2, pages_per_file=6, images_per_page=8,
                            image_base=f"http://images.crawl.test:{server.port}")
        crawl.register(server)
        n_images = len(crawl.images)
        assert n_images > ANSWERED_FIRST + 2 * PER_ACTOR
        lost = tmp_path / "lost"

        def victim():
            actors = {id(node): _actors_on(node) for node in workers}
            node = max(workers, key=lambda n: actors[id(n)])  # a fetch actor, and CLIP's when it can
            assert actors[id(node)][0] >= 1, actors
            return node

        # more requests held than one fetch actor can have in flight: both nodes' fetch actors wait
        # on the server, each with rows in flight
        code, log = _run_and_kill(_command(crawl, cluster.address, lost), cluster, server,
                                  lambda srv: srv.held > PER_ACTOR, victim)
        assert code == 0, log[-4000:]
        # the lost node's rows in flight were fetched again on the node that is left
        assert server.request_count() > n_images, (server.request_count(), n_images)
        # the same command on what is left of the cluster, nothing lost: the same pairs
        server.reset_counts()
        whole = tmp_path / "whole"
        again = subprocess.run(_command(crawl, cluster.address, whole), cwd=REPO, env=env, text=True,
                               capture_output=True, timeout=900)
        assert again.returncode == 0, again.stderr[-4000:]
        assert server.request_count() == n_images
    assert "laionbuild: error" not in log, log[-4000:]
    stats, plain = (json.loads((out / "stats.json").read_text()) for out in (lost, whole))
    assert stats["stages"]["fetch"]["kept"] == plain["stages"]["fetch"]["kept"] == n_images
    assert stats["kept_per_subset"] == plain["kept_per_subset"] and sum(plain["kept_per_subset"].values()) > 0
    assert _published(lost) == _published(whole)
    assert (lost / "_SUCCESS").is_file()


def test_a_node_lost_in_phase_1_costs_only_the_inputs_it_was_reading(two_worker_cluster, tmp_path):
    """The inputs are read over HTTP from a server that holds every request until the node is gone:
    both candidates actors wait on it, and the node whose raylet runs one is killed."""
    cluster, workers = two_worker_cluster
    with LoopbackServer("127.0.0.1") as images, HoldingServer(0) as inputs:
        crawl = build_crawl(str(tmp_path / "inputs"), n_files=2, pages_per_file=3, images_per_page=4,
                            image_base=f"http://images.crawl.test:{images.port}")
        crawl.register(images)
        urls = []
        for path in crawl.warc_paths:
            urls.append(inputs.add(f"/warc/{Path(path).name}", Path(path).read_bytes(),
                                   content_type="application/warc"))
        lost = tmp_path / "lost"
        cmd = [*_command(crawl, cluster.address, lost, urls), "--set", "ray.extract_actors=2",
               "--set", "extract.input_timeout_s=300"]

        def victim():
            readers_on = {id(node): sum("MapBatches(CandidatesWorker)" in k
                                        for k in _children(node.all_processes["raylet"][0].process.pid))
                          for node in workers}
            node = max(workers, key=lambda n: readers_on[id(n)])
            assert readers_on[id(node)] >= 1, readers_on
            return node

        # both inputs are being read, each by a candidates actor
        code, log = _run_and_kill(cmd, cluster, inputs, lambda srv: srv.held >= 2, victim)
        assert code == 0, log[-4000:]
        assert "laionbuild: error" not in log, log[-4000:]
    stats = json.loads((lost / "stats.json").read_text())
    assert stats["files"]["total"] == 2 and stats["files"]["failed"] == 0, stats["files"]
    assert stats["stages"]["fetch"]["kept"] == len(crawl.images) == stats["stages"]["dedup"]["kept"]
    assert (lost / "_SUCCESS").is_file()
