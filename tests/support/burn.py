"""A real availability burn and the shipped Alertmanager routing it is judged by, shared by the
loopback test (tests/test_alerting_e2e.py) and the cluster's (tests/test_e2e.py, whose
Alertmanager runs the same file: tests/e2e/cluster/alertmanager-config.py).

The burn: a pricestream replica with max_sessions=1 whose only slot one stream holds, while
clients hammer CreateSession over gRPC (refused RESOURCE_EXHAUSTED) and POST /v1/sessions over
REST (refused 503 `pod_full`): every session start fails on the server's side.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub

from support.web_clients import rest

SHIPPED_ALERTMANAGER = Path(__file__).resolve().parents[2] / "deploy/alertmanager/alertmanager.yml"
BURN_ALERT = "PriceStreamAvailabilityErrorBudgetBurn"


def shipped_alertmanager_config(page_url: str, ticket_url: str) -> dict[str, Any]:
    """deploy/alertmanager/alertmanager.yml with only its receivers' URLs replaced."""
    config = yaml.safe_load(SHIPPED_ALERTMANAGER.read_text())
    urls = {"pricestream-pager": page_url, "pricestream-tickets": ticket_url}
    for receiver in config["receivers"]:
        for webhook in receiver.get("webhook_configs", []):
            webhook["url"] = urls.pop(receiver["name"])
    assert urls == {}, urls
    return config


@dataclass
class Refusals:
    """What the hammers got back: gRPC status names and REST statuses, counted."""

    grpc: Counter[str] = field(default_factory=Counter)
    rest: Counter[int] = field(default_factory=Counter)


async def hammer_grpc(target: str, until: float, refusals: Refusals) -> None:
    """CreateSession on ``target`` (host:port) until ``until`` (time.monotonic()); a session
    the server grants after all is closed again."""
    # A connection of its own: the server allows max_sessions (1) concurrent HTTP/2 streams per
    # connection, and grpc shares one connection per target unless told otherwise, so calls
    # would queue behind the holder's stream instead of reaching the server.
    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(target, own_connection) as channel:
        stub = PriceStreamServiceStub(channel)
        while time.monotonic() < until:
            try:
                session = await stub.CreateSession(
                    pb.CreateSessionRequest(tickers=["AAPL"]), timeout=5
                )
            except grpc.aio.AioRpcError as exc:
                refusals.grpc[exc.code().name] += 1
            else:  # the pod had room after all: give it back
                refusals.grpc["OK"] += 1
                await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
            await asyncio.sleep(0.05)


async def hammer_rest(
    web_port: int, until: float, refusals: Refusals, *, host: str = "127.0.0.1"
) -> None:
    """POST /v1/sessions on ``host:web_port`` until ``until`` (time.monotonic()); a session
    the server grants after all is deleted again."""
    while time.monotonic() < until:
        status, _, body = await rest(
            web_port, "POST", "/v1/sessions", {"tickers": ["AAPL"]}, host=host
        )
        refusals.rest[status] += 1
        if status == 201:
            await rest(web_port, "DELETE", f"/v1/sessions/{body['session_id']}", host=host)
        await asyncio.sleep(0.05)


async def read_until_cancelled(call: grpc.aio.UnaryStreamCall) -> None:
    """Read a stream's batches until it ends or the task is cancelled (the holder's stream)."""
    while await call.read() is not grpc.aio.EOF:
        pass


@dataclass
class Burn:
    """A burn under way: when it began (time.time()) and what the hammers got back."""

    started_at: float
    refusals: Refusals


@contextlib.asynccontextmanager
async def burning(
    stub: PriceStreamServiceStub,
    grpc_target: str,
    web_port: int,
    seconds: float,
    *,
    web_host: str = "127.0.0.1",
) -> AsyncIterator[Burn]:
    """Take the pod's only session slot with a streaming session (``stub``'s channel), then
    hammer CreateSession at ``grpc_target`` (3 clients) and POST /v1/sessions at
    ``web_host:web_port`` (2 clients) for at most ``seconds``: every other session start is
    refused as the pod is full, the server's fault. The hammers and the holder's stream end
    when the block does."""
    holder = await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL"]))
    stream = stub.StreamPriceUpdates(pb.StreamPriceUpdatesRequest(session_id=holder.session_id))
    reader = asyncio.create_task(read_until_cancelled(stream))
    burn = Burn(time.time(), Refusals())
    until = time.monotonic() + seconds
    tasks = [
        *(asyncio.create_task(hammer_grpc(grpc_target, until, burn.refusals)) for _ in range(3)),
        *(
            asyncio.create_task(hammer_rest(web_port, until, burn.refusals, host=web_host))
            for _ in range(2)
        ),
    ]
    try:
        yield burn
    finally:
        for task in [*tasks, reader]:
            task.cancel()
        await asyncio.gather(*tasks, reader, return_exceptions=True)
        stream.cancel()
