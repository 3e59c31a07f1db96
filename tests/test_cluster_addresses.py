"""Cluster addresses a user may type: refused at once, in one line, when the run cannot work
through them (Ray Client, a dashboard URL, no port); a loopback address of the cluster that
``ray start`` runs on this machine joins it where Ray moved it; a CPU-node resource that only
CPU-less nodes advertise stops the run before it waits for ever."""

from __future__ import annotations

import pytest

from laionbuild.errors import ClusterJoinError
from laionbuild.runner import connect as C


@pytest.mark.parametrize("address,says", [
    ("ray://head:10001", "Ray Client"),
    ("RAY://127.0.0.1:10001", "Ray Client"),
    ("http://127.0.0.1:8265", "dashboard"),
    ("127.0.0.1", "not a HOST:PORT"),
    ("10.0.0.9:63x9", "not a HOST:PORT"),
    ("::1", "not a HOST:PORT"),
    ("2001:db8::10", "not a HOST:PORT"),
])
def test_addresses_the_run_cannot_use_are_refused_at_once(address, says, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ClusterJoinError, match=says) as err:
        C.choose_address(address, local=False)
    assert "\n" not in str(err.value) and "Fix:" in str(err.value)
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(ClusterJoinError, match="RAY_ADDRESS"):
        C.choose_address(None, local=False)


def test_a_loopback_address_of_the_cluster_on_this_machine_joins_it_where_ray_moved_it(tmp_path, monkeypatch):
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("192.0.2.2:26379")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert C.choose_address("127.0.0.1:26379", local=False) == ("explicit", "192.0.2.2:26379")
    assert C.choose_address("localhost:26379", local=False) == ("explicit", "192.0.2.2:26379")
    # another port, or a cluster that stayed on loopback: the address as given
    assert C.choose_address("127.0.0.1:6380", local=False) == ("explicit", "127.0.0.1:6380")
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.2:26379")
    assert C.choose_address("127.0.0.1:26379", local=False) == ("explicit", "127.0.0.1:26379")
    assert C.choose_address("10.1.2.3:26379", local=False) == ("explicit", "10.1.2.3:26379")
    assert C.choose_address("[2001:db8::10]:6379", local=False) == ("explicit", "[2001:db8::10]:6379")


@pytest.mark.ray
def test_a_cpu_node_resource_only_on_cpuless_nodes_stops_the_run(ray_session, tmp_path, monkeypatch, capsys):
    from laionbuild import cli
    from laionbuild.demo.sample_warc import build_demo_sample
    from laionbuild.runner import resources

    sample = build_demo_sample(str(tmp_path / "sample"))
    monkeypatch.setattr(resources, "cluster_shape", lambda resource="": resources.ClusterShape(
        2.0, 0.0, nodes=2, cpu_node_cpus=0.0, placement=True))
    code = cli.main(["extract", *sample.warc_paths, "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INVOCATION
    assert "have no CPUs" in err and "laionbuild_cpu_node" in err
