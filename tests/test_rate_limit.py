"""Session creation is rate limited per client IP (token bucket), over a real gRPC channel;
behind trusted proxies the client IP is the one they name in X-Forwarded-For."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pricestream.api.rate_limit import IPAddress, PeerRateLimiter, client_address, peer_address
from pricestream.settings import proxy_networks
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from support.invariants import wait_invariant
from support.servers import ready_server
from support.settings import fast_settings


@pytest.mark.unit
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


@pytest.mark.unit
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


# The ingress controller's pod network and a second proxy tier; the rest of the world is not.
PROXIES = proxy_networks("10.0.0.0/8, fd00::/8, 127.0.0.1")
CLIENT = "203.0.113.9"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("peer", "forwarded_for", "client"),
    [
        # no header: the peer
        ("10.0.0.5", None, "10.0.0.5"),
        ("10.0.0.5", [], "10.0.0.5"),
        ("10.0.0.5", "", "10.0.0.5"),
        # a peer that is no trusted proxy: its header is ignored
        ("198.51.100.7", CLIENT, "198.51.100.7"),
        ("198.51.100.7", ["10.1.1.1"], "198.51.100.7"),
        ("unknown", CLIENT, "unknown"),
        # one proxy, one client
        ("10.0.0.5", CLIENT, CLIENT),
        ("127.0.0.1", CLIENT, CLIENT),
        # spoofing: what the client wrote left of its own address is never read
        ("10.0.0.5", f"6.6.6.6, {CLIENT}", CLIENT),
        ("10.0.0.5", f"10.9.9.9, 127.0.0.1, {CLIENT}", CLIENT),
        ("10.0.0.5", f"unknown, {CLIENT}", CLIENT),
        # a chain of trusted proxies, with a made-up entry beyond the client
        ("10.0.0.5", f"{CLIENT}, 10.1.1.1, 10.2.2.2", CLIENT),
        ("10.0.0.5", f"1.1.1.1, {CLIENT}, 10.1.1.1", CLIENT),
        # every hop trusted: the leftmost is the client
        ("10.0.0.5", "10.3.3.3, 10.1.1.1", "10.3.3.3"),
        # several header lines count as one list, in order
        ("10.0.0.5", ["6.6.6.6", f"{CLIENT}, 10.1.1.1"], CLIENT),
        ("10.0.0.5", [CLIENT, "10.1.1.1", ""], CLIENT),
        ("10.0.0.5", ["10.1.1.1", CLIENT], CLIENT),
        # whitespace and empty entries
        ("10.0.0.5", f" {CLIENT} ,, 10.1.1.1 , ", CLIENT),
        ("10.0.0.5", " , ", "10.0.0.5"),
        # IPv6, normalised; IPv4-mapped addresses are their IPv4 address
        ("fd00::5", "2001:DB8:0:0::1", "2001:db8::1"),
        ("10.0.0.5", "2001:db8::1, fd00::7", "2001:db8::1"),
        ("::ffff:10.0.0.5", f"::ffff:{CLIENT}", CLIENT),
        ("fd00::5", "::ffff:10.1.1.1, 2001:db8::1", "2001:db8::1"),
        ("10.0.0.5", "fd00::1, ::ffff:10.1.1.2", "fd00::1"),
        # ports, as some proxies write them: IPv4 with a port, IPv6 in brackets
        ("10.0.0.5", f"{CLIENT}:5555", CLIENT),
        ("10.0.0.5", "[2001:db8::1]:4711, [fd00::7]", "2001:db8::1"),
        ("10.0.0.5", "2001:db8::1:443", "2001:db8::1:443"),  # a bare IPv6 is an address
        # garbage ends the walk at the last trusted hop passed
        ("10.0.0.5", f"{CLIENT}, unknown, 10.1.1.1", "10.1.1.1"),
        ("10.0.0.5", f"{CLIENT}, _hidden", "10.0.0.5"),
        ("10.0.0.5", f"{CLIENT}, proxy.example.com, 10.1.1.1", "10.1.1.1"),
        ("10.0.0.5", f"{CLIENT}:99999", "10.0.0.5"),
        ("10.0.0.5", f"[{CLIENT}]", "10.0.0.5"),
        ("10.0.0.5", "[2001:db8::1", "10.0.0.5"),
        ("10.0.0.5", "fe80::1%eth0", "10.0.0.5"),
        ("10.0.0.5", "10.1.1.1 10.2.2.2", "10.0.0.5"),
        ("::ffff:10.0.0.5", "garbage", "::ffff:10.0.0.5"),  # the peer as given
    ],
)
def test_client_address_walks_x_forwarded_for_past_trusted_proxies(
    peer: str, forwarded_for: list[str] | str | None, client: str
) -> None:
    assert client_address(peer, forwarded_for, PROXIES) == client


@pytest.mark.unit
def test_no_trusted_proxy_keeps_the_peer() -> None:
    assert client_address("127.0.0.1", CLIENT, ()) == "127.0.0.1"
    assert client_address("::ffff:127.0.0.1", CLIENT, ()) == "::ffff:127.0.0.1"  # as given
    only_v4 = proxy_networks("127.0.0.1")
    assert client_address("::1", CLIENT, only_v4) == "::1"
    assert client_address("127.0.0.1", "2001:db8::1", only_v4) == "2001:db8::1"


UNTRUSTED = st.one_of(
    st.ip_addresses(v=4).filter(lambda a: not any(a in n for n in PROXIES)),
    st.ip_addresses(v=6).filter(lambda a: not any(a in n for n in PROXIES) and not a.ipv4_mapped),
)
TRUSTED_HOPS = st.lists(
    st.one_of(
        st.ip_addresses(network="10.0.0.0/8"),
        st.ip_addresses(network="fd00::/8"),
        st.just(ipaddress.ip_address("127.0.0.1")),
    ),
    max_size=4,
)


@pytest.mark.unit
@given(
    made_up=st.lists(st.text(max_size=40), max_size=4),
    client=UNTRUSTED,
    hops=TRUSTED_HOPS,
    lines=st.integers(min_value=1, max_value=3),
)
def test_whatever_the_client_writes_the_first_untrusted_hop_is_the_client(
    made_up: list[str], client: IPAddress, hops: list[IPAddress], lines: int
) -> None:
    """The client's own entries (anything, commas included) sit left of the address the first
    trusted proxy appended: however the list is split into header lines, they are never read."""
    entries = [*made_up, str(client), *map(str, hops)]
    size = -(-len(entries) // lines)  # consecutive entries per header line
    header = [", ".join(entries[i : i + size]) for i in range(0, len(entries), size)]
    assert client_address("10.0.0.5", header, PROXIES) == str(client)


@pytest.mark.unit
@given(peer=UNTRUSTED, header=st.lists(st.text(max_size=40), max_size=3))
def test_an_untrusted_peers_header_is_never_read(peer: IPAddress, header: list[str]) -> None:
    assert client_address(str(peer), header, PROXIES) == str(peer)


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


async def test_create_session_behind_a_trusted_proxy_limits_each_forwarded_client(redis) -> None:
    """The test client plays a gRPC proxy (ingress-nginx sets `x-forwarded-for` metadata):
    trusted, each client it names has its own bucket; untrusted (the default), the header is
    ignored and every client shares the peer's. The trusting server listens on
    ``::ffff:127.0.0.1``, seeing its IPv4 peers as a dual-stack socket (the chart's ``[::]``)
    does."""
    try:
        socket.socket(socket.AF_INET6).close()
        host = "::ffff:127.0.0.1"
    except OSError:
        host = "127.0.0.1"
    request = pb.CreateSessionRequest(tickers=["AAPL"])
    limits = {"session_create_rate": 0.1, "session_create_burst": 2}

    def forwarded(*values: str) -> tuple[tuple[str, str], ...]:
        return tuple(("x-forwarded-for", value) for value in values)

    async def refusal(stub: PriceStreamServiceStub, *values: str) -> str:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateSession(request, metadata=forwarded(*values))
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        return refused.value.details()

    trusting = fast_settings(redis.url, grpc_host=host, trusted_proxies="127.0.0.1", **limits)
    async with ready_server(trusting) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = PriceStreamServiceStub(channel)
            sessions = [
                await stub.CreateSession(request, metadata=forwarded("198.51.100.1"))
                for _ in range(2)
            ]
            too_many = "too many sessions created from 198.51.100.1: at most 0.1 per second"
            assert (await refusal(stub, "198.51.100.1")).startswith(too_many)
            # What the client wrote left of its own address is not read; every value counts.
            assert (await refusal(stub, "203.0.113.50, 198.51.100.1")).startswith(too_many)
            assert (await refusal(stub, "203.0.113.50", "198.51.100.1")).startswith(too_many)
            for values in (("198.51.100.2",), ("198.51.100.3, 127.0.0.1",), ()):
                sessions.append(await stub.CreateSession(request, metadata=forwarded(*values)))
            for session in sessions:
                await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
        await wait_invariant(server)
    async with ready_server(fast_settings(redis.url, **limits)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = PriceStreamServiceStub(channel)
            sessions = [
                await stub.CreateSession(request, metadata=forwarded(client))
                for client in ("198.51.100.1", "198.51.100.2")
            ]
            assert (await refusal(stub, "198.51.100.3")).startswith(
                "too many sessions created from 127.0.0.1:"
            )
            for session in sessions:
                await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
        await wait_invariant(server)
