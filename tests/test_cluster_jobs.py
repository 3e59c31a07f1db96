"""Connecting to Ray, the same versions on every node, and the command sequence of
docs/cluster.md run for real on loopback.

The cluster test starts Ray as separate processes with Ray's default settings (``ray start
--head`` on a machine with a token, so token authentication is on; ``ray start --address``
for a second node), then runs the full ``laionbuild run`` on the head without an address and
through ``ray job submit``, and ``laionbuild extract`` with ``--address`` (with a RAY_ADDRESS it
must win over), and checks that both runs publish every pair and that every unit of every phase
was committed on the cluster's nodes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from laionbuild.errors import ClusterJoinError
from laionbuild.runner import connect as C
from helpers.processes import stop_processes

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
#: the head and the worker node on two loopback addresses: Ray rewrites 127.0.0.1 (only) to
#: the machine's outward IP when a second node joins
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"


# --------------------------------------------------------------------------- choosing the address
@pytest.fixture()
def no_cluster(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    return tmp_path


def test_explicit_address_wins_over_ray_address(no_cluster, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert C.choose_address("10.0.0.9:6379", local=False) == ("explicit", "10.0.0.9:6379")
    assert C.choose_address(None, local=False) == ("env", "10.0.0.5:6379")
    assert C.choose_address("10.0.0.9:6379", local=True) == ("local", None)


def test_ray_address_keywords(no_cluster, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert C.choose_address(None, local=False) == ("local", None)
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    with pytest.raises(ClusterJoinError, match=r"'auto' \(RAY_ADDRESS\): no Ray cluster runs on this machine"):
        C.choose_address(None, local=False)
    (no_cluster / "ray").mkdir()
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        address = f"127.0.0.1:{srv.getsockname()[1]}"
        (no_cluster / "ray" / "ray_current_cluster").write_text(address)
        assert C.choose_address(None, local=False) == ("auto", address)
        assert C.choose_address("auto", local=False) == ("auto", address)


def test_running_cluster_is_joined_and_stale_address_ignored(no_cluster):
    (no_cluster / "ray").mkdir()
    address_file = no_cluster / "ray" / "ray_current_cluster"
    assert C.choose_address(None, local=False) == ("local", None)        # nothing running
    with socket.socket() as srv:                                          # a "GCS" listening on loopback
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        address = f"127.0.0.1:{srv.getsockname()[1]}"
        address_file.write_text(address + "\n")
        assert C.choose_address(None, local=False) == ("auto", address)
        assert C.choose_address(None, local=True) == ("local", None)
    assert C.choose_address(None, local=False) == ("local", None)        # recorded, but gone


@pytest.fixture()
def no_token(monkeypatch, tmp_path):
    """A home without ~/.ray/auth_token and none of Ray's authentication variables."""
    for var in (C.AUTH_MODE_VAR, C.TOKEN_VAR, C.TOKEN_PATH_VAR):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def test_token_is_found_where_ray_looks(no_token, monkeypatch, tmp_path):
    assert C.token_source() is None and C.read_token() is None
    (no_token / ".ray").mkdir()
    (no_token / ".ray" / "auth_token").write_text("abc\n")
    assert C.token_source() == str(no_token / ".ray" / "auth_token") and C.read_token() == "abc"
    path = tmp_path / "elsewhere"
    monkeypatch.setenv(C.TOKEN_PATH_VAR, str(path))
    assert C.token_source() is None and C.read_token() is None    # the path Ray was told of wins
    path.write_text("def")
    assert C.token_source().startswith(C.TOKEN_PATH_VAR) and C.read_token() == "def"
    monkeypatch.setenv(C.TOKEN_VAR, "xyz")
    assert C.token_source() == C.TOKEN_VAR and C.read_token() == "xyz"


@pytest.fixture()
def fake_gcs(monkeypatch):
    """A cluster that wants ``state["token"]`` (None: no authentication); records the probes."""
    state = {"token": None, "probes": []}

    def probe(address, token=None, timeout_s=0):
        state["probes"].append(token)
        if state["token"] is None:
            return "accepted"
        return "accepted" if token == state["token"] else "refused"

    monkeypatch.setattr(C, "probe_authentication", probe)
    monkeypatch.delitem(sys.modules, "ray._raylet", raising=False)  # Ray's settings are not re-read here
    return state


def test_driver_takes_the_clusters_authentication_mode(no_token, fake_gcs, monkeypatch):
    # a token on the machine, a cluster without authentication: the driver must not send it
    (no_token / ".ray").mkdir()
    (no_token / ".ray" / "auth_token").write_text("abc")
    C.match_authentication("127.0.0.1:6379")
    assert os.environ[C.AUTH_MODE_VAR] == "disabled"
    # the cluster wants the token this machine has
    monkeypatch.delenv(C.AUTH_MODE_VAR)
    fake_gcs["token"] = "abc"
    C.match_authentication("127.0.0.1:6379")
    assert os.environ[C.AUTH_MODE_VAR] == "token" and fake_gcs["probes"][-1] == "abc"
    # a wrong token, or none: one line at once
    monkeypatch.delenv(C.AUTH_MODE_VAR)
    fake_gcs["token"] = "other"
    with pytest.raises(ClusterJoinError, match="authentication failed .the cluster refused the token from"):
        C.match_authentication("127.0.0.1:6379")
    (no_token / ".ray" / "auth_token").unlink()
    with pytest.raises(ClusterJoinError, match="this machine has no token"):
        C.match_authentication("127.0.0.1:6379")
    assert C.AUTH_MODE_VAR not in os.environ
    monkeypatch.setenv(C.TOKEN_PATH_VAR, str(no_token / "missing-token"))
    with pytest.raises(ClusterJoinError, match="RAY_AUTH_TOKEN_PATH names .*missing-token, which is no file"):
        C.match_authentication("127.0.0.1:6379")
    monkeypatch.delenv(C.TOKEN_PATH_VAR)
    # a mode set by the user is kept when it fits, and named when it cannot work
    monkeypatch.setenv(C.AUTH_MODE_VAR, "disabled")
    with pytest.raises(ClusterJoinError, match="RAY_AUTH_MODE=disabled sends no token"):
        C.match_authentication("127.0.0.1:6379")
    fake_gcs["token"] = None
    C.match_authentication("127.0.0.1:6379")
    monkeypatch.setenv(C.AUTH_MODE_VAR, "token")
    with pytest.raises(ClusterJoinError, match="authentication mismatch"):
        C.match_authentication("127.0.0.1:6379")


def test_probe_of_a_port_that_is_no_ray_gcs_is_unknown():
    with socket.socket() as srv:                       # listens, but speaks no gRPC
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        assert C.probe_authentication(f"127.0.0.1:{srv.getsockname()[1]}", timeout_s=1.0) == "unknown"
    assert C.probe_authentication(f"127.0.0.1:{_free_port('127.0.0.1')}", timeout_s=1.0) == "unknown"


def test_join_failures_name_address_cause_and_fix(no_token, monkeypatch):
    address = "10.1.2.3:6379"
    unreachable = str(C.join_failure(address, None))
    assert address in unreachable and "unreachable" in unreachable and "Fix:" in unreachable
    # what Ray 2.60 raises and prints when the cluster wants a token
    exc = ConnectionError(f"Failed to connect to Ray cluster at {address}")
    printed = ("gcs_client.cc:210: Failed to get cluster ID from GCS server: Unauthenticated: RPC error: "
               "InvalidAuthToken: Authentication token is missing or incorrect\n")
    auth = str(C.join_failure(address, exc, printed))
    assert address in auth and "authentication failed" in auth and "no token" in auth
    assert "~/.ray/auth_token" in auth and "RAY_AUTH_TOKEN" in auth
    monkeypatch.setenv(C.TOKEN_VAR, "wrong")
    monkeypatch.setenv(C.AUTH_MODE_VAR, "token")
    assert f"refused the token from {C.TOKEN_VAR}" in str(C.join_failure(address, exc, printed))
    mismatch = RuntimeError("Version mismatch: The cluster was started with:\n    Ray: 2.59.0\n    Python: 3.11.9\n"
                            "This process on node 10.1.2.4 was started with:\n    Ray: 2.60.0\n    Python: 3.11.9\n")
    version = str(C.join_failure(address, mismatch))
    assert "version mismatch" in version and "Ray: 2.59.0" in version and "Ray: 2.60.0" in version
    assert "constraints" in version
    for msg in (unreachable, auth, version):
        assert "\n" not in msg


def test_unreachable_address_is_one_line_and_exit_2(tmp_path):
    from laionbuild.demo.sample_warc import build_demo_sample

    sample = build_demo_sample(str(tmp_path / "sample"), image_base="http://images.demo.test:9")
    port = _free_port("127.0.0.1")  # nothing listens there
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    r = subprocess.run([sys.executable, "-m", "laionbuild", "extract", sample.warc_paths[0], "--output",
                        str(tmp_path / "out"), "--no-progress", "--address", f"127.0.0.1:{port}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert errors == [errors[0]] and f"127.0.0.1:{port}: unreachable" in errors[0]
    assert "Traceback" not in r.stderr


def test_cli_flags_reach_the_config():
    from laionbuild.cli import _overrides, build_parser
    from laionbuild.config import load_config

    for command in (["run", "--config", "configs/smoke.yaml"], ["extract", "x.warc.gz"]):
        ns = build_parser().parse_args([*command, "--address", "10.0.0.9:6379", "--local"])
        cfg = load_config(None, _overrides(ns))
        assert cfg.ray.address == "10.0.0.9:6379" and cfg.ray.local is True


def test_address_host():
    assert C.address_host("127.0.0.2:6379") == "127.0.0.2"
    assert C.address_host("ray://head:10001") == "head"
    assert C.address_host("http://127.0.0.1:8265") == "127.0.0.1"
    assert C.address_host("[::1]:6379") == "::1"


# --------------------------------------------------------------------------- the documented sequence
def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _run(args: list[str], env: dict, timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args[:4])} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _published(out: Path) -> dict:
    stats = json.loads((out / "stats.json").read_text())
    return {"kept": stats["kept_per_subset"], "fetched": stats["stages"]["fetch"]["kept"],
            "files": stats["files"]["total"], "failed": stats["files"]["failed"],
            "success": (out / "_SUCCESS").is_file()}


@pytest.mark.ray
@pytest.mark.slow
def test_documented_sequence_on_a_two_node_cluster(tmp_path):
    """docs/cluster.md, "The command sequence", as a user types it: Ray's defaults (token
    authentication on once the head has a token), a second node, then the full ``run`` on the
    head without an address and as a ``ray job submit``, and ``extract`` with ``--address``.

    Set here and not by the docs, for the harness only: RAY_TMPDIR (this cluster's own temp
    folder: nothing of another cluster on the machine is found, and the test finds only its own
    processes to stop), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 (two nodes on one machine's loopback
    addresses keep them), PATH/PYTHONPATH (the checkout instead of an installed package); the
    second node gets a temp folder of its own (``--temp-dir``), as a second machine has its own
    disk (sharing one, its runtime-env agent removes the job's working folder under the driver
    on the head once its own workers are done), and each node's dashboard agent a free port."""
    from laionbuild.demo.crawl import build_crawl
    from laionbuild.demo.image_server import LoopbackServer

    ray_tmp = tempfile.mkdtemp(prefix="lbr", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", C.AUTH_MODE_VAR, C.TOKEN_VAR,
                                                            C.TOKEN_PATH_VAR)}
    env.update({
        "RAY_TMPDIR": ray_tmp,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
    })
    # what docs/cluster.md tells the user to set on the commands that talk to a token cluster
    token_env = {**env, C.AUTH_MODE_VAR: "token"}
    port, dashboard = _free_port(HEAD_IP), _free_port(HEAD_IP)
    # each node's dashboard agent on a free port (Ray's default, 52365, may be taken by another
    # Ray on the machine; the job server then never finds an agent)
    agents = [f"--dashboard-agent-listen-port={_free_port(ip)}" for ip in (HEAD_IP, WORKER_IP)]
    with LoopbackServer("127.0.0.1") as server:
        crawl = build_crawl(str(tmp_path / "inputs"), n_files=2, pages_per_file=2, images_per_page=3,
                            image_base=f"http://images.crawl.test:{server.port}")
        crawl.register(server)
        sets = []
        for s in [*crawl.config_overrides("127.0.0.1"), "ray.extract_num_cpus=1", "clip.num_cpus_per_actor=0.5"]:
            sets += ["--set", s]
        run_args = ["run", "-c", "configs/smoke.yaml", "--input", str(tmp_path / "inputs"), "--no-progress", *sets]
        try:
            # 1. the cluster: a token on the head (Ray then turns token authentication on), the head,
            #    a second node
            _run([RAY, "get-auth-token", "--generate"], env, 60)
            head = _run([RAY, "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={port}", "--num-cpus=2",
                         "--include-dashboard=true", f"--dashboard-host={HEAD_IP}", f"--dashboard-port={dashboard}",
                         agents[0], "--disable-usage-stats"], env, 120)
            assert "Token authentication is enabled" in head.stdout + head.stderr
            assert C.probe_authentication(f"{HEAD_IP}:{port}") == "refused"   # it really wants the token
            _run([RAY, "start", f"--address={HEAD_IP}:{port}", f"--node-ip-address={WORKER_IP}", "--num-cpus=2",
                  agents[1], f"--temp-dir={ray_tmp}/w", "--disable-usage-stats"], token_env, 120)
            for _ in range(30):  # the autoscaler's status shows a joined node a few seconds later
                status = _run([RAY, "status", f"--address={HEAD_IP}:{port}"], token_env, 60).stdout
                if re.search(r"0\.0/4\.0 CPU", status):
                    break
                time.sleep(2)
            assert re.search(r"0\.0/4\.0 CPU", status), status

            results = {}
            # 2. on the head, no address: the run joins the cluster ray start runs here; de-dup and
            #    publish as Ray tasks on the engine, several work shards
            auto = tmp_path / "auto"
            r = _run([sys.executable, "-m", "laionbuild", *run_args, "--output", str(auto),
                      "--set", "ray.local_max_rows=0", "--set", "run.work_shard_rows=4"], env, 600)
            log = r.stdout + r.stderr
            assert f"connecting to the Ray cluster at {HEAD_IP}:{port} (started on this machine" in log, log[-3000:]
            results["auto"] = (log, _published(auto))
            # 3. --address, which wins over a RAY_ADDRESS where nothing listens (extract: the same
            #    connection and node checks, the candidates phase on the cluster's nodes)
            explicit = tmp_path / "explicit"
            r = _run([sys.executable, "-m", "laionbuild", "extract", "-c", "configs/smoke.yaml",
                      str(tmp_path / "inputs"), "--no-progress", *sets, "--output", str(explicit),
                      "--address", f"{HEAD_IP}:{port}"], {**env, "RAY_ADDRESS": "127.0.0.1:9"}, 600)
            extract_log = r.stdout + r.stderr
            assert f"connecting to the Ray cluster at {HEAD_IP}:{port} (--address" in extract_log, extract_log[-3000:]
            assert "Ray cluster: 2 node(s), 4 CPUs, 0 GPUs" in extract_log, extract_log[-3000:]
            # 4. the full run as a Ray job through the dashboard's job server
            submit = [RAY, "job", "submit", "--address", f"http://{HEAD_IP}:{dashboard}", "--working-dir", ".",
                      "--", "laionbuild", *run_args, "--output", str(tmp_path / "job")]
            for _ in range(30):  # the job server answers as soon as the head's dashboard agent is up
                job = subprocess.run(submit, cwd=REPO, env=token_env, capture_output=True, text=True, timeout=600)
                if "No available agent to submit job" not in job.stderr:
                    break
                time.sleep(2)
            log = job.stdout + job.stderr
            assert job.returncode == 0, log[-3000:]
            assert "connecting to the Ray cluster at" in log and "(RAY_ADDRESS)" in log, log[-3000:]
            results["job"] = (log, _published(tmp_path / "job"))
        finally:
            stop_processes(ray_tmp)  # `ray stop` would stop every Ray on the machine
            shutil.rmtree(ray_tmp, ignore_errors=True)
    for how, (log, published) in results.items():
        assert "Ray cluster: 2 node(s), 4 CPUs, 0 GPUs" in log, (how, log[-3000:])
        assert "models ready on 2 node(s)" in log, (how, log[-3000:])
        assert published["success"] and published["files"] == 2 and published["failed"] == 0, (how, published)
        assert published["fetched"] == len(crawl.pairs), (how, published)
        assert published["kept"] == results["auto"][1]["kept"], (how, published)
    assert sum(results["auto"][1]["kept"].values()) > 0
    # every unit of every phase of the run without an address committed, all of it on the cluster's
    # nodes (which node ran which download is the scheduler's choice under the machine's load)
    stats = json.loads((auto / "stats.json").read_text())
    cluster_nodes = set(stats["cluster"]["node_ids"])
    assert len(cluster_nodes) == 2
    markers = [json.loads(p.read_text()) for p in (auto / "candidates" / "_done").glob("*.json")]
    assert len(markers) == 2 and {m["node"] for m in markers} <= cluster_nodes
    manifest = json.loads(next((auto / "workshards").glob("_manifest-*.json")).read_text())
    assert manifest["engine"] == "ray" and set(manifest["nodes"]) <= cluster_nodes
    scored = [json.loads(p.read_text()) for p in (auto / "scored" / "_done").glob("*.json")]
    assert len(scored) == manifest["n_shards"] == stats["work_shards"]["total"] > 1
    for stage in ("fetch", "clip"):
        used = set().union(*(m["nodes"].get(stage, []) for m in scored))
        assert used and used <= cluster_nodes, (stage, [m["nodes"] for m in scored])
    assert stats["stages"]["dedup"]["kept"] == stats["stages"]["fetch"]["counts"]["rows"] == len(crawl.pairs)
    # the --address extract: both inputs' candidates committed on the cluster's nodes, as the runs'
    extracted = json.loads((explicit / "stats.json").read_text())
    assert extracted["cluster"]["mode"] == "explicit" and set(extracted["cluster"]["node_ids"]) == cluster_nodes
    markers = [json.loads(p.read_text()) for p in (explicit / "candidates" / "_done").glob("*.json")]
    assert len(markers) == 2 and {m["node"] for m in markers} <= cluster_nodes
    assert sum(m["counters"]["extract"]["counts"]["candidates"] for m in markers) == \
        stats["stages"]["extract"]["counts"]["candidates"] > 0


# --------------------------------------------------------------------------- the same versions everywhere
def test_version_mismatches_name_node_and_versions():
    from laionbuild.runner.nodes import node_versions, version_mismatches

    mine = node_versions()
    assert {"laionbuild", "laionbuild code", "ray", "torch", "open_clip_torch", "pyarrow"} <= set(mine)
    same = {"node": "a" * 40, "host": "head", "versions": dict(mine)}
    other = {"node": "b" * 40, "host": "gpu-7", "versions": {**mine, "torch": "2.1.0"}}
    assert version_mismatches(mine, [same]) == []
    [line] = version_mismatches(mine, [same, other])
    assert line == f"node gpu-7 ({'b' * 12}): torch 2.1.0 (driver {mine['torch']})"


@pytest.mark.ray
def test_a_node_with_other_versions_stops_the_run_before_any_work(tmp_path):
    """A worker whose Python finds another pyarrow release first (as a node set up by hand would):
    the run stops with a setup error (exit 2) naming the node and both versions."""
    import ray

    from laionbuild.config import load_config
    from laionbuild.errors import SetupError
    from laionbuild.runner.nodes import prepare_nodes

    fake = tmp_path / "site"
    (fake / "pyarrow-0.0.1.dist-info").mkdir(parents=True)
    (fake / "pyarrow-0.0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: pyarrow\nVersion: 0.0.1\n")
    path = os.pathsep.join([str(fake), str(REPO), os.environ.get("PYTHONPATH", "")])
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        cfg = load_config(REPO / "configs" / "smoke.yaml", [f"run.output={tmp_path / 'out'}"])
        with pytest.raises(SetupError, match=r"version mismatch between the driver and node .*: pyarrow 0\.0\.1 "
                                             r"\(driver \d+\.\d+\.\d+\)") as err:
            prepare_nodes(cfg, scoring=False)
        assert "constraints.txt" in str(err.value) and "\n" not in str(err.value)
    finally:
        ray.shutdown()


def test_local_output_refused_on_a_cluster_of_several_machines():
    from laionbuild.errors import SetupError
    from laionbuild.runner.nodes import check_output_location

    one_machine = [{"NodeManagerHostname": "box", "NodeManagerAddress": "127.0.0.2"},
                   {"NodeManagerHostname": "box", "NodeManagerAddress": "127.0.0.3"}]
    two_machines = [{"NodeManagerHostname": "head", "NodeManagerAddress": "10.0.0.1"},
                    {"NodeManagerHostname": "gpu-1", "NodeManagerAddress": "10.0.0.2"}]
    check_output_location("/data/out", one_machine)               # two nodes, one disk
    check_output_location("s3://bucket/out", two_machines)
    check_output_location("gs://bucket/out", two_machines)
    for local in ("/data/out", "out", "file:///data/out"):
        with pytest.raises(SetupError, match=r"local folder, but the Ray cluster spans 2 machines \(gpu-1, head\)"):
            check_output_location(local, two_machines)


def test_node_check_builds_the_tokenizers_from_the_nodes_copy(tmp_path):
    """A node that may host an upstream tokenizer actor builds the CLIP tokenizers in its check."""
    from laionbuild.config import load_config
    from laionbuild.runner.nodes import check_node

    cfg = load_config(REPO / "configs" / "smoke.yaml", [f"run.output={tmp_path / 'out'}"])
    result = check_node(cfg, load_clip=False, tokenize=True)
    assert result["error"] == "" and result["versions"]["ray"]


# --------------------------------------------------------------------------- isolation
def test_demo_uses_a_ray_of_its_own_unless_given_an_address(monkeypatch, tmp_path):
    """Even with a cluster recorded in the Ray temp folder and RAY_ADDRESS set, the demo starts
    its own Ray (``ray.local``) in a temp folder of its own, removed afterwards."""
    from laionbuild.demo.run import own_ray

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    monkeypatch.delitem(sys.modules, "ray", raising=False)      # this process has no Ray connection
    with own_ray("") as isolation:
        folder = os.environ["RAY_TMPDIR"]
        assert isolation == ["ray.local=true"] and folder != str(tmp_path) and Path(folder).is_dir()
        assert C.choose_address(None, local=True) == ("local", None)
    assert os.environ["RAY_TMPDIR"] == str(tmp_path) and not Path(folder).exists()
    with own_ray("127.0.0.1:6379") as isolation:                   # an address given: used as given
        assert isolation == [] and os.environ["RAY_TMPDIR"] == str(tmp_path)



def test_raylet_notices_go_to_the_log_not_to_standard_output(monkeypatch, capsys, caplog):
    """Ray prints a node's notices (a worker that died, a task run again) to standard output;
    without -v each becomes one line of the run's log and the whole text stays at debug level."""
    import logging

    from ray._private import worker as ray_worker

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # undone after
    assert C.route_engine_notices() and C.route_engine_notices()  # the second call changes nothing
    hook = ray_worker.print_to_stdstream
    assert hook._laionbuild_original is not None and not hasattr(hook._laionbuild_original, "_laionbuild_original")
    died = ("A worker died or was killed while executing a task by an unexpected system error. To troubleshoot "
            "the problem, check the logs for the dead worker. Worker PID: 12652 Worker exit type: SYSTEM_ERROR")
    retried = ("Task MapWorker(MapBatches(StreamStageActor)).submit failed. There are 4 retries remaining, so the "
               "task will be retried. Error: The actor is temporarily unavailable")
    with caplog.at_level(logging.DEBUG, logger=C.log.name):
        hook({"lines": [retried, died, "Something else happened. More detail."], "pid": "raylet", "is_err": False},
             ignore_prefix=False)
    assert capsys.readouterr().out == ""
    shown = [(r.levelno, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]
    assert shown == [
        (logging.INFO, "Ray runs a failed task again (4 more tries left)"),
        (logging.WARNING, "a worker process died; Ray runs its work again, at most ray.max_task_retries times "
                          "(-v shows Ray's report)"),
        (logging.WARNING, "Ray: Something else happened. (-v shows the whole report)")]
    assert any(died in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    # a lost node: Ray retries every task it ran at once; one line, then one every 10 s at most
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=C.log.name):
        hook({"lines": [retried] * 50, "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert [r.getMessage() for r in caplog.records] == []  # the first was shown above, within 10 s

    clock = [0.0]
    lines = []
    throttled = C._Throttled(lambda t, *a: lines.append(t % a), "again (%s left%s)", every_s=10.0,
                             clock=lambda: clock[0])
    for step in range(30):
        clock[0] = step * 0.5  # 30 notices over 15 s
        throttled.note(str(30 - step))
    assert lines == ["again (30 left)", "again (10 left; 19 more such notices in the last 10 s)"]
    # a worker's own output is printed as Ray prints it
    hook({"lines": ["hello from a worker"], "pid": 4242, "ip": "127.0.0.1", "is_err": False, "task_name": "t",
          "actor_name": "", "job": "01000000"}, ignore_prefix=False)
    assert "hello from a worker" in capsys.readouterr().out


def test_a_stage_actors_retry_without_end_is_one_throttled_line(monkeypatch, capsys, caplog):
    """A stage actor's calls run again without end (its actor counts the deaths, see
    adapter.ProcessDeaths): Ray says "infinite retries" for each, a burst when a node is lost."""
    import logging

    from ray._private import worker as ray_worker

    printer = ray_worker.print_to_stdstream
    # Ray's own printer (an earlier connect may have put a hook in place, with its throttles' clocks)
    monkeypatch.setattr(ray_worker, "print_to_stdstream", getattr(printer, "_laionbuild_original", printer))
    assert C.route_engine_notices()
    retried = ("Task MapWorker(MapBatches(StreamStageActor)).submit failed. There are infinite retries remaining, so "
               "the task will be retried. Error: The actor is temporarily unavailable: RpcError: Socket closed")
    with caplog.at_level(logging.INFO, logger=C.log.name):
        ray_worker.print_to_stdstream({"lines": [retried] * 7, "pid": "raylet", "is_err": False},
                                      ignore_prefix=False)
    assert capsys.readouterr().out == ""
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == [
        "Ray runs a failed task again (the work of a lost node or of a worker whose process died)"]


@pytest.mark.ray
def test_nodes_checked_by_an_earlier_phase_are_not_checked_again(tmp_path):
    """Each phase checks the nodes that joined since the last one (models, versions); a node
    already found ready gets no second check."""
    import ray

    from laionbuild.config import load_config
    from laionbuild.runner.nodes import prepare_nodes

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")  # RAY_TMPDIR
    try:
        cfg = load_config(REPO / "configs" / "smoke.yaml", [f"run.output={tmp_path / 'out'}"])
        [first] = prepare_nodes(cfg, scoring=False)
        assert first["node"] == ray.get_runtime_context().get_node_id() and not first["error"]
        assert prepare_nodes(cfg, scoring=False, checked=frozenset({first["node"]})) == []
    finally:
        ray.shutdown()
