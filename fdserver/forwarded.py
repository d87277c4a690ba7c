"""Which peers may say who the client is (``fdapp --forwarded-allow-ips``).

Tornado's ``xheaders`` believe ``X-Real-Ip``/``X-Forwarded-For`` (and
``X-Scheme``/``X-Forwarded-Proto``) from anyone.  fdapp applies them only
to a connection whose peer is a listed proxy; a client that reaches the app
directly and forges the header keeps its own address.  Within an
``X-Forwarded-For`` list, the address taken is the last one that is not a
listed proxy (proxies chained behind each other are skipped).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .errors import UsageError

DEFAULT = "127.0.0.1,::1"        # uvicorn's default, plus IPv6 loopback

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """A set of IP networks, ``*`` for any address; ``ip in proxies`` tests one."""

    def __init__(self, networks: Iterable[Network] = (), everyone: bool = False) -> None:
        self.networks = tuple(networks)
        self.everyone = everyone

    @classmethod
    def parse(cls, text: str) -> TrustedProxies:
        """``"10.0.0.1,10.1.0.0/16,::1"`` or ``"*"``; raises UsageError naming the bad item."""
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise UsageError("--forwarded-allow-ips: give IPs or networks, e.g. 10.0.0.1,"
                             "10.1.0.0/16, or * for any peer")
        if "*" in items:
            return cls(everyone=True)
        networks = []
        for item in items:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise UsageError(f"--forwarded-allow-ips: {item!r} is not an IP address or "
                                 "network like 10.1.0.0/16") from None
        return cls(networks)

    def __contains__(self, ip: object) -> bool:
        if self.everyone:
            return True
        if not isinstance(ip, str):
            return False
        try:
            address = ipaddress.ip_address(ip.strip())
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def __repr__(self) -> str:
        return "*" if self.everyone else ",".join(str(n) for n in self.networks)
