"""Whether a host is this one: the test that keeps calls to this host off the environment's proxy,
gRPC channels (``routesvc.client.is_loopback_target``) and provider HTTP clients alike
(``routesvc.providers._sending.direct_to_loopback``)."""

from __future__ import annotations

import ipaddress
import socket


def is_loopback_ip(host: str) -> bool:
    """Whether ``host`` is an address of this host: loopback (127.0.0.0/8, ``::1``,
    ``::ffff:127.x.y.z``, and the short or numeric IPv4 forms a resolver reads as one, ``127.1``,
    ``2130706433``), or unspecified (``0.0.0.0``, ``::``: a connection to it reaches this host,
    as Docker and Ollama setups name a local server)."""
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(host)
    except ValueError:
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(host))
        except (OSError, ValueError):
            return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped  # Python 3.11 calls ::ffff:127.0.0.1 not loopback
    return address.is_loopback or address.is_unspecified


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
