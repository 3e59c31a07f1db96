"""Which resolved addresses the fetch stage may connect to (the SSRF guard's last check)."""

from __future__ import annotations

import ipaddress
from typing import Iterable

from ...errors import ConfigError


class AddressPolicy:
    """Which resolved addresses may be connected to."""

    def __init__(self, allow: Iterable[str] = ()):
        self.allow = []
        for item in allow:
            try:
                self.allow.append(ipaddress.ip_network(str(item).strip(), strict=False))
            except ValueError:
                raise ConfigError(f"fetch.allow_addresses: '{item}' is not an IP address or network") from None

    def check(self, address: str) -> str | None:
        """None when ``address`` may be used, else why not."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return f"{address!r} is not an IP address"
        if any(ip.version == net.version and ip in net for net in self.allow):
            return None
        if ip.version == 6 and ip.ipv4_mapped is not None:
            mapped = ip.ipv4_mapped
            if any(net.version == 4 and mapped in net for net in self.allow):
                return None
            ip = mapped
        for flag in ("is_loopback", "is_private", "is_link_local", "is_multicast", "is_reserved",
                     "is_unspecified"):
            if getattr(ip, flag):
                return f"{address} is {flag[3:].replace('_', '-')}"
        if not ip.is_global:
            return f"{address} is not globally routable"
        return None



__all__ = ["AddressPolicy"]
