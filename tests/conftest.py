"""Fixtures and hooks only: real redis-server processes on free loopback ports, servers, gRPC
clients, TLS material. The helpers they use live in tests/support/, which tests import directly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from pricestream.api.server import Server
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from support.redis_server import RedisProcess
from support.servers import ready_server
from support.settings import fast_settings
from support.tls import make_pki


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    redis = RedisProcess(tmp_path_factory.mktemp("redis"))
    redis.start()
    yield redis
    redis.stop()


@pytest.fixture
def redis(shared_redis: RedisProcess) -> RedisProcess:
    """The session-wide redis-server, emptied for this test."""
    client = shared_redis.client()
    client.flushall()
    client.close()
    return shared_redis


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server for this test alone (tests that kill or restart it)."""
    redis = RedisProcess(tmp_path)
    redis.start()
    yield redis
    redis.kill()


@pytest.fixture
async def server(redis: RedisProcess) -> AsyncIterator[Server]:
    async with ready_server(fast_settings(redis.url, pod_name="pod-a")) as srv:
        yield srv


@pytest.fixture
async def stub(server: Server) -> AsyncIterator[PriceStreamServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield PriceStreamServiceStub(channel)


@pytest.fixture(autouse=True)
async def dump_tasks_if_stuck(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """If a test hangs, print every asyncio task's stack once, to show what it waits for:
    after 60 s, or 80% of a longer `@pytest.mark.timeout`."""

    marker = request.node.get_closest_marker("timeout")
    dump_after = max(60.0, 0.8 * float(marker.args[0])) if marker else 60.0

    async def watchdog() -> None:
        await asyncio.sleep(float(os.environ.get("TEST_DUMP_AFTER", dump_after)))
        out = sys.__stderr__  # past pytest's capture
        for task in asyncio.all_tasks():
            print(f"--- task {task.get_name()}: {task!r}", file=out)
            with contextlib.suppress(Exception):
                task.print_stack(limit=8, file=out)

    task = asyncio.create_task(watchdog())
    yield
    task.cancel()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    return make_pki(tmp_path_factory.mktemp("pki"))
