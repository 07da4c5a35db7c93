"""Per-peer token buckets for CreateSession: one client cannot flood a pod with sessions.

A peer is the client's IP address (its port changes per connection). Buckets of peers idle for
longer than a refill cycle are dropped by `prune`, so memory is bounded by recent peers.
"""

from __future__ import annotations

import time


def peer_address(peer: str) -> str:
    """'ipv4:10.1.2.3:51234' -> '10.1.2.3'; 'ipv6:[::1]:5000' -> '::1'; else as given."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        host = rest.rpartition(":")[0]
        return host.strip("[]") or rest
    return peer


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
