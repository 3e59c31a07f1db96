"""Joining a Ray cluster or starting a local one."""

from __future__ import annotations

import logging
import os
from typing import Any

from ..config import Config

log = logging.getLogger(__name__)


def connect(cfg: Config) -> None:
    """Connect to ``RAY_ADDRESS`` / ``ray.address``, or start a local Ray."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not log.isEnabledFor(logging.DEBUG):
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # our own progress and stats say enough
    address = os.environ.get("RAY_ADDRESS") or cfg.ray.address
    loopback = bool(address) and _is_loopback(address.split("://")[-1].rsplit(":", 1)[0].strip("[]"))
    if loopback:
        # Ray rewrites a loopback cluster address to the machine's outward IP unless told
        # that this is a single-machine cluster; keep every connection on loopback
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        log.info("connecting to Ray cluster at %s", address)
        if loopback:
            kwargs["_node_ip_address"] = "127.0.0.1"
        ray.init(address=address, **kwargs)
    else:
        num_cpus = cfg.ray.num_cpus or os.cpu_count() or 1
        log.info("starting a local Ray instance with %d CPUs", num_cpus)
        # a local instance stays on loopback: no traffic to the machine's other addresses
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 **kwargs)
    for name in ("ray.data", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = False


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
