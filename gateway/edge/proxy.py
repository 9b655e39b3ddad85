"""Who is on the other end: the device's address and scheme, believing forwarded headers only from trusted proxies.

A header such as ``X-Forwarded-For`` is only as trustworthy as whoever sent it. The TCP peer is
checked against ``proxy.trusted_cidrs``; only then are ``X-Forwarded-For`` (walked from the right,
skipping trusted hops: the first untrusted address is the device), ``X-Forwarded-Proto`` and the
ALB's ``X-Amzn-Mtls-Clientcert`` believed. From anyone else they are ignored.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.edge.settings import ProxySettings

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
CLIENT_CERT_HEADER = "X-Amzn-Mtls-Clientcert"
_MAX_HEADER_CHARS = 4096  # an X-Forwarded-For longer than this is cut (from the left) before parsing


@dataclass(frozen=True, slots=True)
class Peer:
    address: str  # the device's address, as best we know it
    scheme: str  # "http" or "https", as the device used it
    trusted_proxy: bool  # the TCP peer is a trusted proxy (its forwarded headers were believed)


@functools.lru_cache(maxsize=8)
def _networks(cidrs: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _is_trusted(address: str, networks: tuple[IPNetwork, ...]) -> bool:
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def plain_address(address: str) -> str:
    """An IPv4 client on a dual-stack listener (``::``) as itself: ``::ffff:203.0.113.7`` is ``203.0.113.7``."""
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    return address


def resolve_peer(tcp_peer: str | None, tls: bool, headers: Mapping[str, str], settings: ProxySettings) -> Peer:
    peer = plain_address(tcp_peer or "")
    scheme = "https" if tls else "http"
    networks = _networks(tuple(settings.trusted_cidrs))
    if not _is_trusted(peer, networks):
        return Peer(peer, scheme, False)
    forwarded_proto = headers.get("X-Forwarded-Proto", "").rsplit(",", 1)[-1].strip().lower()
    if forwarded_proto in ("http", "https"):
        scheme = forwarded_proto
    address = peer
    chain = headers.get("X-Forwarded-For", "")[-_MAX_HEADER_CHARS:]
    for hop in reversed(chain.split(",")[-settings.max_forwarded_hops :]):
        hop = hop.strip()
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break  # garbage (or a cut entry): keep the last address a trusted hop vouched for
        address = hop
        if not _is_trusted(hop, networks):
            break
    return Peer(address, scheme, True)


def is_trusted_proxy(address: str, settings: ProxySettings) -> bool:
    """Whether ``address`` (a TCP peer) is one of the load balancers or proxies named in ``trusted_cidrs``."""
    return _is_trusted(address, _networks(tuple(settings.trusted_cidrs)))
