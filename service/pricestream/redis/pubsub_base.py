"""What every Pub/Sub connection of pricestream does, whatever it subscribes with.

A connection keeps a desired set of channels and the set it has sent; a sync task (the
subclass's) sends (un)subscribe commands for the difference and waits for Redis to answer every
one within ``probe_timeout``. After any failure the connection is closed (always, in one
``finally``), and a new one is opened with exponential backoff and jitter; it starts with
nothing sent, so everything still desired is subscribed again. The connection itself is probed:
when nothing has been confirmed on it for ``probe_interval``, a PING is sent on it and must be
answered within ``probe_timeout``, or the connection is replaced. That tests both directions of
the socket: incoming messages alone prove only Redis→pod, so a socket whose pod→Redis direction
stalled would otherwise look healthy. A connection turns unhealthy within
``probe_interval + probe_timeout`` of its last confirmed reply.

Replies to our commands (subscribe, unsubscribe, pong) arrive in the order the commands were
sent, between messages; each command registers how many replies it expects in a FIFO
(``Owed``) before it is written (under a lock, so two writers cannot reorder), and the reader
settles them.

The subclasses: ``broker.PubSubConnection`` (SUBSCRIBE, standalone and sentinel) and
``shard_connection.ShardConnection`` (SSUBSCRIBE, one cluster master). Each keeps its own
reader, the hot path of every price message, and its own way of writing commands.
"""

from __future__ import annotations

import asyncio
import logging
import random
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Coroutine
from typing import Any, ClassVar

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError

from pricestream.observability.metrics import Metrics
from pricestream.settings import Settings
from pricestream.tasks import run_until_first_failure

log = logging.getLogger("pricestream.redis")

SUBSCRIBE_CHUNK = 512


def backoff_delay(failures: int, max_backoff: float) -> float:
    """Seconds to wait after the `failures`-th failure in a row: exponential from 0.1 s up to
    `max_backoff`, with jitter (uniform in the upper half) so clients do not retry in step."""
    ceiling = min(max_backoff, 0.1 * 2 ** (failures - 1))
    return random.uniform(ceiling / 2, ceiling)


class ProbeFailed(Exception):
    """A probe or a (un)subscribe was not answered in time: the connection is not working."""


class Owed:
    """A command written and not yet fully answered: the kind of its replies, its channels,
    replies left (one per channel, or one for a command without channels)."""

    __slots__ = ("channels", "done", "kind", "left")

    def __init__(self, kind: bytes, channels: list[bytes], done: asyncio.Future[None]) -> None:
        self.kind = kind
        self.channels = channels
        self.left = max(1, len(channels))
        self.done = done


class PubSubBase(ABC):
    """One Pub/Sub connection slot: it owns its socket and the tasks that serve it."""

    # What ends a connection and opens a new one after a backoff (anything else is a bug).
    RECONNECT_ON: ClassVar[tuple[type[Exception], ...]] = (
        TimeoutError,
        RedisError,
        OSError,
        ProbeFailed,
    )
    # Log lines, formatted with the connection's ``log_id`` first.
    LOST_LOG: ClassVar[str]
    RESTORED_LOG: ClassVar[str]

    def __init__(
        self, settings: Settings, metrics: Metrics, log_key: str, log_id: int | str, peer: str
    ) -> None:
        """``log_key``/``log_id``: the connection in log records (``extra``); ``peer``: named
        in error messages ("" when the log line already says which connection)."""
        self._settings = settings
        self._metrics = metrics
        self._log_key = log_key
        self._log_id = log_id
        self._on_peer = f" on {peer}" if peer else ""
        self._to_peer = f" to {peer}" if peer else ""
        self.desired: set[bytes] = set()
        self._changed = asyncio.Event()
        self._owed: deque[Owed] = deque()  # oldest first
        self._send_lock = asyncio.Lock()
        self._last_confirmed = 0.0
        self.connected = False
        self.live = False
        self._ever_connected = False

    def want(self, channel: bytes) -> None:
        if channel not in self.desired:
            self.desired.add(channel)
            self._changed.set()

    def unwant(self, channel: bytes) -> None:
        if channel in self.desired:
            self.desired.discard(channel)
            self._changed.set()

    # --- what a subclass provides ---------------------------------------------------------

    @abstractmethod
    def _open(self) -> AbstractConnection:
        """A new, not yet connected connection."""

    @abstractmethod
    def _forget_subscriptions(self) -> None:
        """Nothing is subscribed any more (a connection starts or ended)."""

    @abstractmethod
    async def _read(self, conn: AbstractConnection) -> None:
        """Own the socket's input: messages to the handler, replies to ``_confirmed``."""

    @abstractmethod
    async def _sync(self, conn: AbstractConnection) -> None:
        """Send what ``desired`` and the subscribed set differ by, at every ``_changed``."""

    @abstractmethod
    async def _ping(self, conn: AbstractConnection) -> asyncio.Future[None]:
        """Write a PING; the future settles when it is answered."""

    def _serving(self, conn: AbstractConnection) -> list[Coroutine[Any, Any, None]]:
        """The tasks of one connection; the first to end or fail ends them all."""
        return [self._read(conn), self._sync(conn), self._watch_liveness(conn)]

    def _after_failure(self) -> None:
        """Called once the loss of a connection is logged, before the backoff."""
        return None  # nothing by default

    # --- the shared discipline ------------------------------------------------------------

    async def run(self) -> None:
        """Keep a connection up until cancelled."""
        failures = 0
        while True:
            try:
                await self._connect_and_serve()
            except self.RECONNECT_ON as exc:
                failures += 1
                delay = backoff_delay(failures, self._settings.reconnect_max_backoff)
                log.warning(
                    self.LOST_LOG,
                    self._log_id,
                    exc or type(exc).__name__,
                    delay,
                    extra={"event": "redis_connection_lost", self._log_key: self._log_id},
                )
                self._after_failure()
                await asyncio.sleep(delay)
            else:
                failures = 0

    async def _connect_and_serve(self) -> None:
        conn = self._open()
        opened = False
        try:
            await conn.connect()
            opened = True
            self._metrics.connections_opened.inc()
            if self._ever_connected:
                self._metrics.redis_reconnects.inc()
                log.info(
                    self.RESTORED_LOG,
                    self._log_id,
                    extra={"event": "redis_connection_restored", self._log_key: self._log_id},
                )
            self._ever_connected = True
            self.connected = True
            self._forget_subscriptions()
            self._owed.clear()
            self._last_confirmed = asyncio.get_running_loop().time()
            self._changed.set()
            await run_until_first_failure(*self._serving(conn))
        finally:
            self.connected = False
            self.live = False
            self._forget_subscriptions()
            for owed in self._owed:
                owed.done.cancel()
            self._owed.clear()
            if opened:
                self._metrics.connections_closed.inc()
            await conn.disconnect(nowait=True)

    async def _next_change(self, conn: AbstractConnection) -> None:
        """Wait until ``desired`` changed (or a sync pass was asked for) on a live socket."""
        await self._changed.wait()
        self._changed.clear()
        if not conn.is_connected:
            raise ConnectionError("Pub/Sub connection closed")

    def _owe(self, kind: bytes, channels: list[bytes]) -> asyncio.Future[None]:
        """Register a command about to be written (under ``_send_lock``); the future settles
        when Redis has answered it."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._owed.append(Owed(kind, channels, done))
        return done

    def _confirmed(self) -> None:
        """One reply to our commands arrived: it settles the oldest command still owed."""
        self._last_confirmed = asyncio.get_running_loop().time()
        if not self._owed:
            return
        owed = self._owed[0]
        owed.left -= 1
        if owed.left <= 0:
            self._owed.popleft()
            if not owed.done.done():
                owed.done.set_result(None)

    async def _answered(self, owed: list[asyncio.Future[None]], what: str) -> None:
        timeout = self._settings.probe_timeout
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*owed)
        except TimeoutError:
            raise ProbeFailed(f"{what}{self._on_peer} not answered within {timeout:g}s") from None

    async def _watch_liveness(self, conn: AbstractConnection) -> None:
        loop = asyncio.get_running_loop()
        interval = self._settings.probe_interval
        while True:
            quiet = loop.time() - self._last_confirmed
            if quiet < interval:
                await asyncio.sleep(interval - quiet)
                continue
            timeout = self._settings.probe_timeout
            try:
                async with asyncio.timeout(timeout):  # the write too: it may be what is stuck
                    pong = await self._ping(conn)
                    await pong
            except TimeoutError:
                raise ProbeFailed(
                    f"PING on the Pub/Sub connection{self._to_peer} not answered "
                    f"within {timeout:g}s"
                ) from None
