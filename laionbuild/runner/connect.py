"""Connect the driver to Ray: join the running cluster, or start a local instance.

Which Ray the run uses, in this order:

1. an explicit address (``--address`` on the command line, or ``ray.address`` in
   the config): it wins over ``RAY_ADDRESS``, as in ``ray.init(address=...)``;
2. ``RAY_ADDRESS`` (set by Ray for the driver of ``ray job submit`` / a KubeRay
   ``RayJob``, or by the user);
3. the cluster that ``ray start`` runs on this machine (Ray's ``auto``
   resolution: the address ``ray start`` records in ``<ray temp dir>/ray_current_cluster``),
   which is what ``ray exec`` and a shell on the head node see;
4. otherwise a new local Ray instance bound to 127.0.0.1, without dashboard.

``local=True`` (``--local``) skips 1-3 and always starts a local instance.
A connection to a loopback address stays on loopback (Ray would otherwise rewrite
it to the machine's outward IP).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import sys
import tempfile
from typing import Any

log = logging.getLogger(__name__)

#: how the address was chosen, reported in the summary ("connected": this process already was)
MODES = ("explicit", "env", "auto", "local", "connected")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def address_host(address: str) -> str:
    """The host part of ``[scheme://]host[:port]``."""
    rest = address.split("://", 1)[-1].split("/", 1)[0]
    if rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    return rest.rsplit(":", 1)[0] if rest.count(":") == 1 else rest


def running_cluster_address() -> str | None:
    """The address of the cluster ``ray start`` runs on this machine, if any.

    Ray records it in ``<ray temp dir>/ray_current_cluster`` and ``ray stop``
    removes the file; read here without importing Ray (Ray reads some settings at
    import, which must be set first).
    """
    base = os.environ.get("RAY_TMPDIR")
    if not base:
        base = os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None
        base = base or ("/tmp" if os.name == "posix" else tempfile.gettempdir())
    path = os.path.join(base, "ray", "ray_current_cluster")
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def choose_address(address: str | None, *, local: bool) -> tuple[str, str | None]:
    """``(mode, address)``: which Ray to use (see the module docstring); address None = start local."""
    if local:
        return "local", None
    if address:
        return "explicit", address
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env:
        return "env", env
    found = running_cluster_address()
    if found:
        if _accepts_connections(found):
            return "auto", found
        log.warning("the Ray cluster recorded at %s is not running (stale address file); starting a local one",
                    found)
    return "local", None


def _accepts_connections(address: str, timeout_s: float = 2.0) -> bool:
    """Whether the GCS port of ``host:port`` takes TCP connections."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _quiet_stderr(enabled: bool):
    """Silence the process's stderr (file descriptor 2) while Ray's engine starts: it announces its
    log level there. Errors still surface as exceptions."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cluster_summary() -> dict[str, Any]:
    """Alive nodes, CPUs and GPUs of the connected cluster."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    resources = ray.cluster_resources()
    return {
        "nodes": len(nodes),
        "cpus": float(resources.get("CPU", 0.0)),
        "gpus": float(resources.get("GPU", 0.0)),
        "node_ids": sorted(n["NodeID"] for n in nodes),
    }


def connect(address: str | None = None, *, local: bool = False, num_cpus: int = 0,
            verbose: bool = False) -> dict[str, Any]:
    """Connect this process to Ray (see the module docstring); returns the cluster summary.

    ``num_cpus`` sizes a local instance only (0 = every CPU of the machine).
    Already connected: nothing changes and the summary of that connection is returned.
    """
    mode, target = choose_address(address, local=local)
    loopback = target is None or is_loopback(address_host(target))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = logging.ERROR if not verbose else logging.INFO
    if not verbose:
        # a clean console: our progress and summary, not Ray's notices a user cannot act on
        # (token authentication, disabled progress bars, actor constructor arguments); -v shows them
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
        # the driver's own engine log (e.g. "constructor arguments in the object store" for every
        # actor pool); the workers' logs stay in Ray's session folder instead of the console
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    if loopback:
        # Ray rewrites a loopback cluster address to the machine's outward IP unless told
        # that this is a single-machine cluster; keep every connection on loopback
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        mode, target = "connected", ray.get_runtime_context().gcs_address
    else:
        kwargs: dict[str, Any] = {"logging_level": quiet, "log_to_driver": verbose}
        if target is not None:
            log.info("connecting to the Ray cluster at %s (%s)", target,
                     {"explicit": "--address / ray.address", "env": "RAY_ADDRESS",
                      "auto": "started on this machine with ray start"}[mode])
            if loopback and not target.startswith("ray://"):
                # the driver attaches to the node on that loopback address (a head started
                # with --node-ip-address=127.0.0.x), not to the machine's outward IP
                host = address_host(target)
                kwargs["_node_ip_address"] = "127.0.0.1" if host == "localhost" else host
            with _quiet_stderr(not verbose):
                ray.init(address=target, **kwargs)
        else:
            n = num_cpus or os.cpu_count() or 1
            log.info("starting a local Ray instance with %d CPUs%s", n,
                     " (--local)" if local else " (no running cluster found)")
            # "local" never reads RAY_ADDRESS; the instance stays on loopback, without dashboard
            with _quiet_stderr(not verbose):
                ray.init(address="local", num_cpus=n, include_dashboard=False, _node_ip_address="127.0.0.1",
                         **kwargs)
    for name in ("ray.data", "ray"):
        logging.getLogger(name).setLevel(quiet)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = False
    summary = {"mode": mode, "address": target or "local", **cluster_summary()}
    log.info("Ray cluster: %d node(s), %g CPUs, %g GPUs", summary["nodes"], summary["cpus"], summary["gpus"])
    return summary


__all__ = ["MODES", "choose_address", "cluster_summary", "connect", "running_cluster_address"]
