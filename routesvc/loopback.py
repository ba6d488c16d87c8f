"""Whether a host is this one: the test that keeps calls to this host off the environment's proxy,
gRPC channels (``routesvc.client.is_loopback_target``) and provider HTTP clients alike
(``routesvc.providers._sending.direct_to_loopback``)."""

from __future__ import annotations

import ipaddress
import socket


def is_loopback_ip(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ``::1``, ``::ffff:127.x.y.z``)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped.is_loopback  # Python 3.11 calls ::ffff:127.0.0.1 not loopback
    return address.is_loopback


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (lower case, an IPv6 address without brackets) is a loopback address, or
    ``localhost`` when every address it resolves to is one. Other names are not trusted: what
    they resolve to is not this process's to pin (``dev.localhost`` may be any host's name)."""
    if host != "localhost":
        return is_loopback_ip(host)
    try:
        resolved = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(resolved) and all(is_loopback_ip(str(info[4][0]).partition("%")[0]) for info in resolved)
