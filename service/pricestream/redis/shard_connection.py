"""One sharded Pub/Sub connection to one cluster master: SSUBSCRIBE / SUNSUBSCRIBE / smessage.

The discipline is ``pubsub_base.PubSubBase``'s: a desired set and a sent set, a sync task that
sends the difference and waits (``probe_timeout``) until Redis has answered every command, a
reader that owns the socket's input, a PING when the connection was quiet for
``probe_interval``, and after any failure the socket closed in one ``finally`` and a new one
opened with backoff and jitter, starting from nothing so everything desired is subscribed
again. What a shard adds:

- A SSUBSCRIBE or SUNSUBSCRIBE may name channels of one slot only (Redis answers CROSSSLOT
  otherwise), so the difference goes out as one command per slot (up to 512 channels each);
  all the commands of one sync pass leave in one socket write.
- Redis may refuse a SSUBSCRIBE with an error reply (MOVED: the slot is not this node's any
  more; TRYAGAIN/ASK while it migrates; CLUSTERDOWN). Its channels count as not sent, and the
  broker is told (``on_stale``) so it reads the slot map again and routes them again.
- When a slot moves away (reshard, failover) Redis pushes ``sunsubscribe`` for each of its
  channels, unasked. A ``sunsubscribe`` that no SUNSUBSCRIBE of ours is waiting for is such a
  push: the channel is no longer subscribed here, and the broker is told (``on_stale``).
- After the last channel is gone the connection leaves subscribed mode, so a PING is answered
  ``+PONG`` instead of ``['pong', '']``; both count.

There is no probe channel: the PING on the socket, answered in order behind our (un)subscribe
commands, proves both directions, and the broker re-reads the slot map every
``probe_interval``, so a connection to a node that silently stopped owning a slot is noticed
within one interval even if its ``sunsubscribe`` push were lost.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

from pricestream.engine.broker import MessageHandler
from pricestream.observability.metrics import Metrics
from pricestream.redis.cluster_client import Address, NodeOptions
from pricestream.redis.pubsub_base import SUBSCRIBE_CHUNK, ProbeFailed, PubSubBase
from pricestream.redis.slots import channel_slot
from pricestream.settings import Settings

log = logging.getLogger("pricestream.redis")

_SMESSAGE = b"smessage"
_SSUBSCRIBE = b"ssubscribe"
_SUNSUBSCRIBE = b"sunsubscribe"
_PONG = b"pong"

# A command to write: the kind of its replies, its arguments, its channels.
Command = tuple[bytes, tuple[bytes | str, ...], list[bytes]]


def by_slot(channels: Iterable[bytes]) -> list[list[bytes]]:
    """Channels grouped into commands: one slot each, at most ``SUBSCRIBE_CHUNK`` channels."""
    slots: dict[int, list[bytes]] = defaultdict(list)
    for channel in sorted(channels):
        slots[channel_slot(channel)].append(channel)
    commands = []
    for _, group in sorted(slots.items()):
        for start in range(0, len(group), SUBSCRIBE_CHUNK):
            commands.append(group[start : start + SUBSCRIBE_CHUNK])
    return commands


class ShardConnection(PubSubBase):
    """The Pub/Sub connection of one pod to one master; owns its socket and its three tasks."""

    LOST_LOG = "Redis Pub/Sub connection to shard %s lost: %s; reconnecting in %.2fs"
    RESTORED_LOG = "Redis Pub/Sub connection to shard %s restored"

    def __init__(
        self,
        address: Address,
        options: NodeOptions,
        settings: Settings,
        metrics: Metrics,
        handler: MessageHandler,
        on_stale: Callable[[], None],
    ) -> None:
        self.address = address
        self.name = f"{address[0]}:{address[1]}"
        super().__init__(settings, metrics, "shard", self.name, f"shard {self.name}")
        self._options = options
        self._handler = handler
        self._on_stale = on_stale  # "the slot map may have changed: read it again"
        self._sent: set[bytes] = set()  # SSUBSCRIBE written (not refused), no SUNSUBSCRIBE since
        self.confirmed: set[bytes] = set()  # and Redis confirmed it

    def resync(self) -> None:
        """Send again whatever is desired and not subscribed (after a refusal or a lost slot)."""
        if self.desired - self._sent or self._sent - self.desired:
            self._changed.set()

    def _open(self) -> AbstractConnection:
        return self._options.connection(self.address)

    def _forget_subscriptions(self) -> None:
        self._sent = set()
        self.confirmed = set()

    def _after_failure(self) -> None:
        self._on_stale()  # a failover, perhaps

    async def _read(self, conn: AbstractConnection) -> None:
        while True:
            try:
                reply = await conn.read_response(timeout=math.inf, disconnect_on_error=False)
            except ResponseError as exc:
                self._refused(exc)
                continue
            if not isinstance(reply, list):
                if reply == b"PONG":  # a PING answered outside subscribed mode
                    self._settle(_PONG)
                continue
            kind = reply[0]
            if kind == _SMESSAGE:
                self._handler(reply[1], reply[2])
            elif kind == _SSUBSCRIBE:
                self._settle(kind)
                if reply[1] in self._sent:
                    self.confirmed.add(reply[1])
            elif kind == _SUNSUBSCRIBE:
                front = self._owed[0] if self._owed else None
                if front is not None and front.kind == _SUNSUBSCRIBE and reply[1] in front.channels:
                    self._settle(kind)
                else:
                    self._lost(reply[1])
            elif kind == _PONG:
                self._settle(kind)

    def _settle(self, kind: bytes) -> None:
        """One reply to our commands arrived: it must belong to the oldest command still owed."""
        if not self._owed or self._owed[0].kind != kind:
            self._last_confirmed = asyncio.get_running_loop().time()
            raise ProbeFailed(f"unexpected {kind.decode()} reply on shard {self.name}")
        self._confirmed()

    def _refused(self, error: ResponseError) -> None:
        """An error reply: the whole answer to the oldest command owed."""
        self._last_confirmed = asyncio.get_running_loop().time()
        if not self._owed:
            raise ProbeFailed(f"unexpected error reply on shard {self.name}: {error}")
        owed = self._owed.popleft()
        if owed.kind == _PONG:  # LOADING, NOAUTH, ...: this node does not serve us
            raise ProbeFailed(f"PING refused by shard {self.name}: {error}")
        if not owed.done.done():
            owed.done.set_result(None)
        if owed.kind == _SSUBSCRIBE:
            self._sent.difference_update(owed.channels)
            log.info(
                "shard %s refused SSUBSCRIBE of %d channel(s): %s",
                self.name,
                len(owed.channels),
                error,
                extra={"event": "shard_subscribe_refused", "shard": self.name},
            )
            self._on_stale()

    def _lost(self, channel: bytes) -> None:
        """Redis pushed ``sunsubscribe``: the channel's slot is not this node's any more."""
        self._sent.discard(channel)
        self.confirmed.discard(channel)
        self._on_stale()

    async def _send(
        self, conn: AbstractConnection, commands: list[Command]
    ) -> list[asyncio.Future[None]]:
        """Write commands in one write; one future per command, settled when Redis has
        answered it."""
        async with self._send_lock:
            futures = [self._owe(kind, channels) for kind, _, channels in commands]
            packed = conn.pack_commands([args for _, args, _ in commands])
            await conn.send_packed_command(packed, check_health=False)
        return futures

    async def _ping(self, conn: AbstractConnection) -> asyncio.Future[None]:
        (pong,) = await self._send(conn, [(_PONG, ("PING",), [])])
        return pong

    async def _sync(self, conn: AbstractConnection) -> None:
        await self._answered([await self._ping(conn)], "PING")
        self.live = True  # answered: the socket works both ways
        while True:
            await self._next_change(conn)
            commands: list[Command] = []
            add = self.desired - self._sent
            for group in by_slot(add):
                commands.append((_SSUBSCRIBE, ("SSUBSCRIBE", *group), group))
            self._sent |= add
            remove = self._sent - self.desired
            for group in by_slot(remove):
                commands.append((_SUNSUBSCRIBE, ("SUNSUBSCRIBE", *group), group))
            self._sent -= remove
            self.confirmed -= remove
            if commands:
                owed = await self._send(conn, commands)
                await self._answered(owed, "SSUBSCRIBE/SUNSUBSCRIBE")
