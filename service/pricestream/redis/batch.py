"""One round trip for the Redis commands of one event-loop turn.

Thousands of streams starting or ending at once each want a command (a session claim or
release, the last prices of their tickers). Sent one by one they queue for the connection
pool and time out in bulk; here every command asked for during one turn goes into pipelines
of up to ``BATCH_LIMIT`` (one pooled connection and one round trip each), and each caller gets
its own result or error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError

from pricestream.tasks import cancel_and_wait

BATCH_LIMIT = 500  # commands per pipeline

# Adds exactly one command to the pipeline (its result is the caller's).
Queue = Callable[[Pipeline], Awaitable[Any]]


class CommandBatcher:
    def __init__(self, client: Redis | RedisCluster, *, cluster: bool = False) -> None:
        """``cluster``: the client is a ``RedisCluster``. Its pipeline refuses EVALSHA, so
        scripts go as EVAL with their body (a master promoted by a failover may not have a
        script cached anyway), and commands are queued without awaiting them (in redis-py
        8.1 awaiting a ``ClusterPipeline`` re-initializes it, dropping what was queued). And
        one pipeline per master (by the client's slot map): redis-py fails a whole cluster
        pipeline when one node in it is down, so a shard failing over would otherwise fail
        every session call of the pod, not just those whose keys live on that shard."""
        self._client = client
        self._cluster = cluster
        self._pending: list[tuple[Queue, asyncio.Future[Any], str]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def script(
        self, script: AsyncScript, keys: list[str], args: Sequence[str | int]
    ) -> Awaitable[Any]:
        """Run a registered Lua script in the next pipeline."""

        async def queue(pipe: Pipeline) -> Any:
            if self._cluster:
                return pipe.eval(script.script, len(keys), *keys, *args)
            return await script(keys=keys, args=list(args), client=pipe)

        return self._call(queue, keys[0] if keys else "")

    def get(self, key: str) -> Awaitable[bytes | None]:
        async def queue(pipe: Pipeline) -> Any:
            return pipe.get(key) if self._cluster else await pipe.get(key)

        return self._call(queue, key)

    def mget(self, keys: list[str]) -> Awaitable[list[bytes | None]]:
        async def queue(pipe: Pipeline) -> Any:
            return await pipe.mget(keys)

        return self._call(queue, keys[0] if keys else "")

    def _call(self, queue: Queue, key: str) -> Awaitable[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._start)
        self._pending.append((queue, future, key))
        return future

    def _node_of(self, key: str) -> str:
        """The master the client's slot map names for a key ("" while it has none)."""
        assert isinstance(self._client, RedisCluster)
        try:
            return self._client.nodes_manager.get_node_from_slot(key_slot(key.encode())).name
        except (RedisClusterException, LookupError):
            return ""

    def _start(self) -> None:
        batch, self._pending = self._pending, []
        groups: dict[str, list[tuple[Queue, asyncio.Future[Any]]]] = {}
        for queue, future, key in batch:
            node = self._node_of(key) if self._cluster else ""
            groups.setdefault(node, []).append((queue, future))
        for group in groups.values():
            for start in range(0, len(group), BATCH_LIMIT):
                task = asyncio.create_task(self._run(group[start : start + BATCH_LIMIT]))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[Queue, asyncio.Future[Any]]]) -> None:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for queue, _ in batch:
                    await queue(pipe)
                results = await pipe.execute(raise_on_error=False)
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RedisError(exc))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # its caller gave up waiting
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def aclose(self) -> None:
        await cancel_and_wait(list(self._tasks))
