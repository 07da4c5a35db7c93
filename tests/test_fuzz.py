"""Hypothesis-driven hostile input: every RPC field, raw bytes through a generic call, and
Pub/Sub payloads. The server answers with a documented code and stays healthy and leak-free.

Hypothesis cannot drive an async test on the suite's shared event loop, so for the RPC fuzz it
generates the examples first and the test sends them all afterwards (no shrinking there; a
failure names the offending example in its assertion message).
"""

from __future__ import annotations

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pricestream.api.server import Server
from pricestream.codec import batch_frame
from pricestream.engine.hub import Dropped, entry_from_payload
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from support.invariants import wait_invariant

DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
FUZZ = settings(
    max_examples=80,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def generate(strategy: st.SearchStrategy) -> list:
    """The examples hypothesis draws from ``strategy`` (its edge cases included)."""
    drawn: list = []

    @FUZZ
    @given(strategy)
    def collect(example) -> None:
        drawn.append(example)

    collect()
    return drawn


tickers = st.lists(st.text(max_size=40), max_size=150)
session_ids = st.one_of(st.text(max_size=60), st.from_regex(r"[A-Za-z0-9_-]{22}", fullmatch=True))


async def _code(awaitable) -> grpc.StatusCode:
    try:
        await awaitable
    except grpc.aio.AioRpcError as exc:
        assert exc.details() and "\n" not in exc.details()
        assert exc.code() != grpc.StatusCode.UNKNOWN, exc.details()
        return exc.code()
    return grpc.StatusCode.OK


async def test_fuzz_every_rpc(server: Server, stub: PriceStreamServiceStub) -> None:
    for requested, session_id in generate(st.tuples(tickers, session_ids)):
        code = await _code(stub.CreateSession(pb.CreateSessionRequest(tickers=requested)))
        assert code in DOCUMENTED, requested
        call = stub.StreamPriceUpdates(pb.StreamPriceUpdatesRequest(session_id=session_id))
        assert await _code(call.read()) in DOCUMENTED, session_id
        call.cancel()
        code = await _code(stub.CloseSession(pb.CloseSessionRequest(session_id=session_id)))
        assert code in DOCUMENTED, session_id
    await wait_invariant(server, timeout=10)  # sessions created above are pending, so:
    assert server.engine.streams_active == 0


async def test_raw_bytes_through_a_generic_call(server: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        for payload in generate(st.binary(max_size=2048)):
            for method in ("CreateSession", "CloseSession"):
                call = channel.unary_unary(f"/pricestream.v1.PriceStreamService/{method}")
                assert await _code(call(payload)) in DOCUMENTED, payload
    assert server.engine.ready


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=512), ticker=st.sampled_from(["AAPL", "BRK.B", "T0001"]))
def test_fuzz_pubsub_payloads_never_raise(payload: bytes, ticker: str) -> None:
    entry = entry_from_payload(ticker, payload, max_bytes=256)
    if isinstance(entry, Dropped):
        assert entry.reason in ("malformed", "wrong_ticker", "oversized")
        assert (entry.reason == "oversized") == (len(payload) > 256)
    else:
        assert entry[0] == batch_frame(payload)
        parsed = pb.PriceUpdateBatch.FromString(entry[0])  # the frame is a valid batch alone
        assert parsed.updates[0].ticker == ticker
