"""Sentinel mode: connections go to the master the sentinels name, and follow it.

Every connection (commands and Pub/Sub) asks the sentinels for the master when it connects
(redis-py's ``SentinelManagedConnection``); the URL still gives credentials, TLS and the
database, its host and port are not used. The sentinels are asked with the same credentials
and TLS settings.

Asking at connect time is not enough. After a planned failover, or a partition that leaves the
old master running, a connection opened before the switch stays open to a node that is no
longer the master: a command connection gets READONLY on its next write (redis-py then
reconnects), but a Pub/Sub connection there answers PING and receives nothing, so its
liveness probe stays green. ``MasterWatch`` therefore keeps the current master: it listens
for ``+switch-master`` on one sentinel at a time (the switch is known within milliseconds)
and asks the sentinels every ``probe_interval`` as well (a missed event, or a sentinel that
is down, costs at most that long). Each change closes the idle command connections, makes
the pool close busy ones to the old master when they come back, and wakes the Pub/Sub
connections, which reconnect when their peer is not the new master (see
``PubSubConnection``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.asyncio import BlockingConnectionPool
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from pricestream.settings import Settings, sentinel_addresses
from pricestream.tasks import run_until_first_failure

log = logging.getLogger("pricestream.redis.sentinel")

SWITCH_MASTER = b"+switch-master"
Address = tuple[str, int]


class SentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """A blocking pool (as in standalone mode) of connections to the master the sentinels
    name; a connection handed back while it points to another node is closed."""

    async def release(self, connection: AbstractConnection) -> None:
        master = self.master_address
        if master is not None and (connection.host, connection.port) != master:
            await connection.disconnect()
        await super().release(connection)

    async def disconnect(self, inuse_connections: bool = True) -> None:
        if not inuse_connections:  # redis-py's own call when it sees a new master address
            await self._drop_idle()
            return
        await super().disconnect(inuse_connections)
        # Closing for good: the connections to the sentinels as well.
        for sentinel in self.sentinel_manager.sentinels:
            await sentinel.connection_pool.disconnect()

    async def follow(self, master: Address) -> None:
        """The sentinels name ``master`` now: close idle connections to any other node."""
        if self.master_address != master:
            self.master_address = master
            await self._drop_idle()

    async def _drop_idle(self) -> None:
        """Close the idle connections after taking them out of the pool: closing one awaits,
        and a command that picked it up meanwhile would write to a closing socket."""
        idle, self._available_connections = self._available_connections, []
        await asyncio.gather(*(c.disconnect() for c in idle), return_exceptions=True)


def _url_options(settings: Settings) -> tuple[dict[str, Any], bool]:
    """Connection options from the URL without its host and port, and whether it asks TLS."""
    options = parse_url(settings.redis_url)
    options.pop("host", None)
    options.pop("port", None)
    tls = options.pop("connection_class", Connection) is SSLConnection
    return options, tls


def sentinel_connection_options(settings: Settings) -> tuple[type[Connection], dict[str, Any]]:
    """Connection class and options for talking to a sentinel: the URL's credentials and TLS
    settings (not its database), the Redis timeout, RESP2."""
    options, tls = _url_options(settings)
    chosen = {k: v for k, v in options.items() if k in ("username", "password")}
    if tls:
        chosen.update({k: v for k, v in options.items() if k.startswith("ssl_")})
    chosen.update(
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        protocol=2,
    )
    return (SSLConnection if tls else Connection), chosen


def make_sentinel_pool(settings: Settings, **pool_options: Any) -> SentinelPool:
    """The pool; ``pool_options`` as for standalone, the URL's own options winning (as with
    ``from_url``)."""
    options, tls = _url_options(settings)
    connection_class, to_sentinels = sentinel_connection_options(settings)
    manager = Sentinel(
        sentinel_addresses(settings.redis_sentinels),
        sentinel_kwargs={
            **to_sentinels,
            "ssl": connection_class is SSLConnection,
            # No retries: asking the sentinels moves on to the next one at once, and every
            # caller retries with its own backoff. (redis-py's default, 10 retries with backoff,
            # spent up to 4 s on a sentinel that is down, each time the master was asked for.)
            "retry": Retry(NoBackoff(), 0),
        },
    )
    return SentinelPool(
        settings.redis_sentinel_master, manager, ssl=tls, **{**pool_options, **options}
    )


class MasterWatch:
    """The master's address as the sentinels name it, kept current by ``run``."""

    def __init__(self, pool: SentinelPool, settings: Settings) -> None:
        self._pool = pool
        self._settings = settings
        self._name = settings.redis_sentinel_master
        self._addresses = sentinel_addresses(settings.redis_sentinels)
        self._connection_class, options = sentinel_connection_options(settings)
        # Reads wait as long as _read_switches asks, which bounds them itself.
        self._connection_options = {**options, "socket_timeout": None}
        self.master: Address | None = None
        self._change = asyncio.Event()

    async def changed(self) -> None:
        """Return at the next change of master."""
        await self._change.wait()

    async def run(self) -> None:
        await run_until_first_failure(self._poll(), self._listen())

    async def _set(self, master: Address, how: str) -> None:
        if master == self.master:
            return
        old, self.master = self.master, master
        if old is not None:
            log.warning(
                "Redis master %s moved from %s:%d to %s:%d (%s)",
                self._name,
                *old,
                *master,
                how,
                extra={"event": "redis_master_switched", "master": f"{master[0]}:{master[1]}"},
            )
        await self._pool.follow(master)
        change, self._change = self._change, asyncio.Event()
        change.set()

    async def _poll(self) -> None:
        failing = False
        while True:
            try:
                master = await asyncio.wait_for(
                    self._pool.sentinel_manager.discover_master(self._name),
                    self._settings.redis_timeout * (len(self._addresses) + 1),
                )
            except (RedisError, OSError, TimeoutError) as exc:
                if not failing:  # once per outage
                    log.warning(
                        "no sentinel names a master for %s: %s",
                        self._name,
                        exc or type(exc).__name__,
                        extra={"event": "redis_master_unknown"},
                    )
                failing = True
            else:
                failing = False
                await self._set((str(master[0]), int(master[1])), "sentinels asked")
            await asyncio.sleep(self._settings.probe_interval)

    async def _listen(self) -> None:
        """``+switch-master`` from one sentinel at a time, the next one after a failure."""
        turn = 0
        while True:
            host, port = self._addresses[turn % len(self._addresses)]
            turn += 1
            conn = self._connection_class(host=host, port=port, **self._connection_options)
            try:
                await conn.connect()
                await conn.send_command("SUBSCRIBE", SWITCH_MASTER)
                await self._read_switches(conn)
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("sentinel %s:%d subscription ended: %s", host, port, exc)
            finally:
                await conn.disconnect(nowait=True)
            await asyncio.sleep(min(1.0, self._settings.probe_interval))

    async def _read_switches(self, conn: Connection) -> None:
        """Read events until the sentinel stops answering: after ``probe_interval`` of
        silence a PING must be answered within ``probe_timeout``."""
        pinged = False
        while True:
            wait = self._settings.probe_timeout if pinged else self._settings.probe_interval
            reply = await conn.read_response(timeout=wait, disconnect_on_error=False)
            if reply is None:  # nothing within ``wait``
                if pinged:
                    raise TimeoutError("PING to the sentinel not answered")
                await conn.send_command("PING", check_health=False)
                pinged = True
                continue
            pinged = False  # anything that arrives (the pong too) shows the sentinel answers
            if isinstance(reply, list) and reply[0] == b"message" and reply[1] == SWITCH_MASTER:
                fields = reply[2].split()
                if len(fields) == 5 and fields[0].decode() == self._name:
                    await self._set((fields[3].decode(), int(fields[4])), "+switch-master")
