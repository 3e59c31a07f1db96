"""Test-wide guards: no traffic beyond loopback, no hub access, no Ray usage stats."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# every Ray node the tests start (in process or in subprocesses) uses 127.0.0.1, never the
# machine's outward address; read by Ray at import, so set before anything imports it
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Isolation: the tests never join a Ray cluster they did not start. Every Ray the tests start
# (in process, in CLI subprocesses, with `ray start`) records itself under this run's own temp
# folder, and neither Ray's `auto` discovery nor ours finds a cluster of another process there.
os.environ.pop("RAY_ADDRESS", None)
os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="lbt-", dir="/tmp" if os.name == "posix" else None)

REPO = Path(__file__).resolve().parents[1]
SHARED_WARC = REPO.parent / "shared" / "data" / "warc"

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


def _is_loopback(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _guard_address(address) -> None:
    if isinstance(address, tuple) and address:
        if not _is_loopback(address[0]):
            raise ConnectionRefusedError(f"tests may only connect to loopback addresses, not {address[0]!r}")


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _guard_address(address)
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _guard_address(address)
    return _real_connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if host is not None and not _is_loopback(host) and host not in ("", "0.0.0.0", "::"):
        raise socket.gaierror(socket.EAI_NONAME, f"tests perform no DNS lookups ({host!r})")
    return _real_getaddrinfo(host, *args, **kwargs)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Like cc_net's test fixture: any non-loopback connection or DNS lookup fails the test."""
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", _guarded_connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", _guarded_getaddrinfo)
    yield


@pytest.fixture(scope="session")
def shared_warc_dir() -> Path:
    if not SHARED_WARC.is_dir():
        pytest.skip(f"real Common Crawl samples not available ({SHARED_WARC})")
    return SHARED_WARC


@pytest.fixture(scope="session")
def _ray_session_end():
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_session(_ray_session_end):
    """The test run's one Ray, in this process: started by the first module that needs it, the way a
    run starts its local Ray (loopback, this run's temp folder), and shared by every later one; the
    pipeline runs of the tests join it as a run joins a Ray its process already uses. A test that needs
    a Ray of another shape (several nodes, other environment variables) stops it; the next module
    that needs it starts it again."""
    import ray

    if not ray.is_initialized():
        from laionbuild.runner.connect import connect

        connect(local=True)
    return ray


def pytest_sessionfinish(session, exitstatus):
    """Remove this run's Ray temp folder (sessions, logs, address records) once every test is done."""
    import shutil

    shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    # Order: the Ray tests that start their own Ray (CLI runs, killed runs, clusters), slow ones first,
    # so that in parallel runs (pytest-xdist, ``--dist loadfile``: a file's tests in one process, its
    # module-wide fixtures built once) the long ones start at once and the quick tests fill the gaps;
    # then the tests without Ray; last the tests on the test process's one Ray (``ray_session``).
    def order(item) -> int:
        if "ray" not in item.keywords:
            return 2
        if "ray_session" in item.fixturenames:
            return 3
        return 0 if "slow" in item.keywords else 1

    items.sort(key=order)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

