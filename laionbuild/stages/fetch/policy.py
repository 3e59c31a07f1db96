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
        embedded = _embedded_ipv4(ip) if ip.version == 6 else None
        if embedded is not None:  # judged as the IPv4 address it reaches
            if any(net.version == 4 and embedded in net for net in self.allow):
                return None
            ip = embedded
        for flag in ("is_loopback", "is_private", "is_link_local", "is_site_local", "is_multicast", "is_reserved",
                     "is_unspecified"):
            if getattr(ip, flag, False):  # is_site_local: IPv6 fec0::/10, deprecated, never routed
                return f"{address} is {flag[3:].replace('_', '-')}"
        if not ip.is_global:
            return f"{address} is not globally routable"
        return None


#: the well-known NAT64 prefix (RFC 6052): its last 32 bits are the IPv4 address a NAT64
#: gateway connects to (DNS64 answers with such addresses on IPv6-only networks)
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for: IPv4-mapped (``::ffff:a.b.c.d``), NAT64
    (``64:ff9b::a.b.c.d``) and 6to4 (``2002:AABB:CCDD::``); None for any other."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in NAT64_PREFIX:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


__all__ = ["AddressPolicy", "NAT64_PREFIX"]
