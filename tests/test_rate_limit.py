"""Session creation is rate limited per client IP (token bucket), over a real gRPC channel."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from pricestream.api.rate_limit import PeerRateLimiter, peer_address
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from support.invariants import wait_invariant
from support.servers import ready_server
from support.settings import fast_settings


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:10.1.2.3:51234", "10.1.2.3"),
        ("ipv6:[::1]:5000", "::1"),
        ("ipv6:[2001:db8::7]:443", "2001:db8::7"),
        ("unix:/tmp/socket", "unix:/tmp/socket"),
    ],
)
def test_peer_address_drops_the_port(peer: str, address: str) -> None:
    assert peer_address(peer) == address


def test_token_bucket_refills_and_forgets_idle_peers() -> None:
    limiter = PeerRateLimiter(rate=2.0, burst=3)
    assert [limiter.allow("a", now=0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b", now=0.0)  # another peer has its own bucket
    assert not limiter.allow("a", now=0.2)  # 0.4 token
    assert limiter.allow("a", now=0.6)  # 1.2 tokens
    limiter.prune(now=0.7)
    assert len(limiter) == 2
    limiter.prune(now=10.0)
    assert len(limiter) == 0
    assert PeerRateLimiter(rate=0, burst=1).allow("a")  # off


async def test_create_session_beyond_the_rate_is_resource_exhausted(redis) -> None:
    settings = fast_settings(redis.url, session_create_rate=4.0, session_create_burst=3)
    async with ready_server(settings) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = PriceStreamServiceStub(channel)
            request = pb.CreateSessionRequest(tickers=["AAPL"])
            sessions = [await stub.CreateSession(request) for _ in range(3)]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.CreateSession(request)
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.details() == (
                "too many sessions created from 127.0.0.1: at most 4 per second; retry later"
            )
            await asyncio.sleep(0.3)  # 1.2 tokens back
            sessions.append(await stub.CreateSession(request))
            for session in sessions:
                await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
        await wait_invariant(server)
