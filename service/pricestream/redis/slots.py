"""The cluster's slot map as this pod last read it: which master owns each of the 16384 slots.

``SlotMap.read`` asks one node ``CLUSTER SLOTS`` over a connection of its own (opened, used
once, closed in the same call, with the Redis timeout on every step). It tries the node that
answered last time first, then every other node the last map named (replicas included: after a
master died its replica answers), then the seeds, so a map can be read as long as any node
the pod has heard of is up.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import RedisError

from pricestream.redis.cluster_client import Address, NodeOptions

log = logging.getLogger("pricestream.redis.slots")


class TopologyUnavailable(Exception):
    """No node the pod knows answered ``CLUSTER SLOTS`` with a full slot map."""


def channel_slot(channel: bytes) -> int:
    """The slot of a channel (or key): CRC16 of its hash tag, or of the whole name."""
    return key_slot(channel)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse_cluster_slots(reply: Iterable[list], default_host: str) -> tuple[list[Address], set]:
    """``CLUSTER SLOTS`` -> (owner of each slot, every node named). A node announced without
    an address (``''``, older versions) is the node that answered."""
    owners: list[Address | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
    nodes: set[Address] = set()
    for start, end, master, *replicas in reply:
        addresses = []
        for node in (master, *replicas):
            host = _text(node[0]) or default_host
            addresses.append((host, int(node[1])))
        nodes.update(addresses)
        for slot in range(int(start), int(end) + 1):
            owners[slot] = addresses[0]
    missing = owners.count(None)
    if missing:
        raise TopologyUnavailable(f"{missing} of {REDIS_CLUSTER_HASH_SLOTS} slots have no master")
    return owners, nodes  # type: ignore[return-value]


class SlotMap:
    def __init__(self, options: NodeOptions) -> None:
        self._options = options
        self._owners: list[Address] | None = None
        self._nodes: list[Address] = []
        self._last_answered: Address | None = None

    @property
    def known(self) -> bool:
        return self._owners is not None

    def owner(self, slot: int) -> Address:
        assert self._owners is not None, "slot map not read yet"
        return self._owners[slot]

    def masters(self) -> set[Address]:
        return set(self._owners or ())

    def _candidates(self) -> list[Address]:
        ordered: list[Address] = []
        for address in (self._last_answered, *self._nodes, *self._options.seeds):
            if address is not None and address not in ordered:
                ordered.append(address)
        return ordered

    async def read(self) -> None:
        """Replace the map with a fresh one, or raise TopologyUnavailable (the old one stays)."""
        errors: list[str] = []
        for address in self._candidates():
            try:
                reply = await self._ask(address)
                owners, nodes = parse_cluster_slots(reply, address[0])
            except (RedisError, OSError, TimeoutError, TopologyUnavailable) as exc:
                errors.append(f"{address[0]}:{address[1]}: {exc or type(exc).__name__}")
                continue
            self._owners = owners
            self._nodes = sorted(nodes)
            self._last_answered = address
            return
        raise TopologyUnavailable("no cluster node gave a slot map (" + "; ".join(errors) + ")")

    async def _ask(self, address: Address) -> list:
        conn = self._options.connection(address)
        try:
            await conn.connect()
            await conn.send_command("CLUSTER", "SLOTS", check_health=False)
            return await conn.read_response(timeout=self._options.timeout)
        finally:
            await conn.disconnect(nowait=True)
