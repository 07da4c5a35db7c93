"""Per-peer token buckets for CreateSession: one client cannot flood a pod with sessions.

A peer is the client's IP address (its port changes per connection): the TCP peer, or behind
trusted proxies (``trusted_proxies``) the client they name in ``X-Forwarded-For``
(`client_address`). Buckets of peers idle for longer than a refill cycle are dropped by
`prune`, so memory is bounded by recent peers.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable

from pricestream.settings import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def peer_address(peer: str) -> str:
    """'ipv4:10.1.2.3:51234' -> '10.1.2.3'; 'ipv6:[::1]:5000' -> '::1'; else as given."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        host = rest.rpartition(":")[0]
        return host.strip("[]") or rest
    return peer


def _port(text: str) -> bool:
    return text.isascii() and text.isdigit() and int(text) <= 65535


def parse_address(text: str) -> IPAddress | None:
    """An address as a socket or a proxy spells it: ``10.1.2.3``, ``2001:db8::1``, or with a
    port ``10.1.2.3:5000``, ``[2001:db8::1]`` and ``[2001:db8::1]:5000`` (a bare IPv6 address
    is never read as having a port); an IPv4-mapped IPv6 address as its IPv4 address. None for
    anything else: host names, ``unknown``, obfuscated identifiers, zones (``fe80::1%eth0``)."""
    host = text
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]")
        if not bracket or (port and not (port.startswith(":") and _port(port[1:]))):
            return None
        if ":" not in host:  # only IPv6 goes in brackets
            return None
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not _port(port):
            return None
    if "%" in host:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: IPAddress, trusted: tuple[IPNetwork, ...]) -> bool:
    return any(address in network for network in trusted)


def client_address(
    peer: str, forwarded_for: Iterable[str] | str | None, trusted: tuple[IPNetwork, ...]
) -> str:
    """The client a request comes from, for the per-IP limit: ``peer`` (the TCP peer's IP
    address) unless it is a trusted proxy that sent ``X-Forwarded-For`` (``forwarded_for``:
    the header's lines, or one line).

    The addresses of all lines, joined with commas, are walked from the right (the hop nearest
    to us) to the left, past trusted proxies: the first untrusted one is the client. Everything
    left of it was written by that client, so it can be made up, and is never read. If all are
    trusted, the leftmost is the client. An entry that is no address (`parse_address`) ends the
    walk at the last trusted hop passed: nothing further left is believed. Empty entries are
    skipped. An address from the header is normalised (``str`` of the address: ``2001:db8::1``,
    IPv4-mapped addresses as IPv4, ports dropped), so one client has one bucket however it is
    spelled; the peer, when the walk ends there, is returned as given.

    A dual-stack socket shows an IPv4 peer as ``::ffff:10.1.2.3``: it is trusted as 10.1.2.3."""
    if not trusted or not forwarded_for:
        return peer
    hop = parse_address(peer)
    if hop is None or not _trusted(hop, trusted):
        return peer
    client = peer
    lines = [forwarded_for] if isinstance(forwarded_for, str) else forwarded_for
    entries = [entry.strip() for line in lines for entry in line.split(",")]
    for entry in reversed(entries):
        if not entry:
            continue
        address = parse_address(entry)
        if address is None:
            break
        client = str(address)
        if not _trusted(address, trusted):
            break
    return client


class PeerRateLimiter:
    def __init__(self, rate: float, burst: int) -> None:
        """`rate` sessions per second per peer, up to `burst` at once; rate 0 turns it off."""
        self.rate = rate
        self.burst = max(burst, 1)
        self._buckets: dict[str, tuple[float, float]] = {}  # peer -> (tokens, last refill)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def allow(self, peer: str, now: float | None = None) -> bool:
        if not self.enabled:
            return True
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(peer, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[peer] = (tokens, now)
            return False
        self._buckets[peer] = (tokens - 1.0, now)
        return True

    def prune(self, now: float | None = None) -> None:
        """Forget peers whose bucket has refilled completely (they are idle)."""
        if not self.enabled:
            return
        now = time.monotonic() if now is None else now
        full_after = self.burst / self.rate
        self._buckets = {p: b for p, b in self._buckets.items() if now - b[1] < full_after}

    def __len__(self) -> int:
        return len(self._buckets)
