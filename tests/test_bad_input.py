"""Bad input gets its status code and one clear sentence, and leaves invariant 1 intact."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from pricestream.api.server import Server
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from support.invariants import samples, wait_invariant
from support.market import Market
from support.servers import ready_server
from support.settings import fast_settings
from support.streams import next_batch

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("tickers", "code", "phrase"),
    [
        ([], INVALID, "at least one ticker"),
        ([f"T{i}" for i in range(101)], INVALID, "at most 100"),
        ([""], INVALID, "must not be empty"),
        (["A" * 1000], INVALID, "longer than 16"),
        (["AA\x00PL"], INVALID, "invalid"),
        (["AAPL\n"], INVALID, "invalid"),
        (["ÄPFEL"], INVALID, "invalid"),
        (["€"], INVALID, "invalid"),
        (["-AAPL"], INVALID, "invalid"),
    ],
    ids=["empty", "too-many", "empty-string", "1000-chars", "nul", "newline", "umlaut", "euro",
         "leading-dash"],
)  # fmt: skip
async def test_create_session_rejects(
    stub: PriceStreamServiceStub, server: Server, tickers: list[str], code, phrase: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.CreateSession(pb.CreateSessionRequest(tickers=tickers))
    assert raised.value.code() == code
    details = raised.value.details()
    assert phrase in details
    assert details.count("\n") == 0 and len(details) < 200
    await wait_invariant(server, timeout=2)
    assert len(server.engine.registry) == 0


async def test_lowercase_normalised_and_duplicates_deduplicated(
    stub: PriceStreamServiceStub,
) -> None:
    tickers = ["brk.b", "BRK.B", "msft", "MSFT", "bf-b"] + ["KO"] * 500
    session = await stub.CreateSession(pb.CreateSessionRequest(tickers=tickers))
    assert list(session.tickers) == ["BRK.B", "MSFT", "BF-B", "KO"]


@pytest.mark.parametrize(
    ("session_id", "code", "phrase"),
    [
        ("", INVALID, "required"),
        ("not-a-session", INVALID, "malformed"),
        ("x" * 5000, INVALID, "malformed"),
        ("ääääääääääääääääääääää", INVALID, "malformed"),
        ("A" * 22, grpc.StatusCode.NOT_FOUND, "does not exist"),
    ],
    ids=["empty", "short", "huge", "non-ascii", "unknown"],
)
async def test_stream_and_close_reject_bad_session_ids(
    stub: PriceStreamServiceStub, server: Server, session_id: str, code, phrase: str
) -> None:
    call = stub.StreamPriceUpdates(pb.StreamPriceUpdatesRequest(session_id=session_id))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await next_batch(call)
    assert raised.value.code() == code
    assert phrase in raised.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))
    assert raised.value.code() == code
    values = await wait_invariant(server, timeout=2)
    assert values["pricestream_streams_closed_total"] == 1  # counted as rejected


async def test_second_stream_from_another_channel_is_refused(
    stub: PriceStreamServiceStub, server: Server
) -> None:
    session = await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL"]))
    request = pb.StreamPriceUpdatesRequest(session_id=session.session_id)
    first = stub.StreamPriceUpdates(request)
    await asyncio.sleep(0.3)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as other:
        second = PriceStreamServiceStub(other).StreamPriceUpdates(request)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await next_batch(second)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert not first.done()
    first.cancel()
    await wait_invariant(server, timeout=5)


async def test_closed_session_is_not_found(stub: PriceStreamServiceStub, server: Server) -> None:
    session = await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL"]))
    await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    call = stub.StreamPriceUpdates(pb.StreamPriceUpdatesRequest(session_id=session.session_id))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await next_batch(call)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    await wait_invariant(server, timeout=2)


async def test_session_limit_gives_resource_exhausted(redis) -> None:
    async with ready_server(fast_settings(redis.url, max_sessions=2)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = PriceStreamServiceStub(channel)
            for _ in range(2):
                await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL"]))
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL"]))
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "maximum of 2 sessions" in raised.value.details()


async def test_session_limit_holds_under_concurrent_creates(redis) -> None:
    """500 CreateSession calls at once against a limit of 10: exactly 10 get a session.

    Redis holds writes for 300 ms (CLIENT PAUSE, as a busy Redis would), so the calls are all
    waiting for their write at once: the window in which the limit used to be overrun. The
    server allows max_sessions concurrent streams per connection (more are refused at the
    HTTP/2 level), so the calls go over 100 connections, 5 each, all open before the first.
    """
    async with ready_server(fast_settings(redis.url, max_sessions=10)) as server:
        target = f"127.0.0.1:{server.grpc_port}"
        own_connection = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.insecure_channel(target, own_connection) for _ in range(100)]
        try:
            await asyncio.gather(*(channel.channel_ready() for channel in channels))
            stubs = [PriceStreamServiceStub(channel) for channel in channels]
            request = pb.CreateSessionRequest(tickers=["AAPL"])
            admin = redis.client()
            admin.execute_command("CLIENT", "PAUSE", 300, "WRITE")
            admin.close()
            results = await asyncio.gather(
                *(stub.CreateSession(request) for stub in stubs for _ in range(5)),
                return_exceptions=True,
            )
            accepted = [r for r in results if isinstance(r, pb.Session)]
            refused = {
                (r.code(), r.details()) for r in results if isinstance(r, grpc.aio.AioRpcError)
            }
            assert len(accepted) == 10, f"{len(accepted)} sessions accepted"
            assert refused == {
                (grpc.StatusCode.RESOURCE_EXHAUSTED, "this server holds its maximum of 10 sessions")
            }
            assert len(results) - len(accepted) == 490
            values = samples(server.engine.metrics.exposition().decode())
            assert values["pricestream_sessions_active"] == 10
            for session in accepted:
                await stubs[0].CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
        finally:
            await asyncio.gather(*(channel.close() for channel in channels))
        await wait_invariant(server, timeout=5)


async def test_failed_create_gives_its_slot_back(own_redis) -> None:
    """A CreateSession that fails on Redis does not keep a slot of the session limit."""
    async with ready_server(fast_settings(own_redis.url, max_sessions=2)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = PriceStreamServiceStub(channel)
            request = pb.CreateSessionRequest(tickers=["AAPL"])
            own_redis.kill()
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await stub.CreateSession(request)
                assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            own_redis.start()
            sessions = [await stub.CreateSession(request) for _ in range(2)]
            for session in sessions:
                await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
        await wait_invariant(server, timeout=10)


async def test_oversized_request_is_refused(stub: PriceStreamServiceStub, server: Server) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.CreateSession(pb.CreateSessionRequest(tickers=["A" * 100_000]))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await wait_invariant(server, timeout=2)


async def test_bad_pubsub_payloads_are_dropped_and_counted(
    stub: PriceStreamServiceStub, server: Server, redis
) -> None:
    market = Market(redis.url, ["AAPL", "MSFT"])
    session = await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL"]))
    call = stub.StreamPriceUpdates(pb.StreamPriceUpdatesRequest(session_id=session.session_id))
    await asyncio.sleep(0.3)  # subscribed
    client = redis.client()
    client.publish("price:AAPL", b"\xff\xfe not protobuf at all")
    wrong = pb.PriceUpdate(ticker="MSFT", price=1.0, sequence=1).SerializeToString()
    client.publish("price:AAPL", wrong)
    client.close()
    await market.tick("AAPL")  # the reader survived: a good update still arrives
    batch = await next_batch(call)
    assert [u.ticker for u in batch.updates] == ["AAPL"]
    values = samples(server.engine.metrics.exposition().decode())
    assert values["pricestream_price_updates_dropped_total"] == 2
    text = server.engine.metrics.exposition().decode()
    assert 'reason="malformed"' in text and 'reason="wrong_ticker"' in text
    call.cancel()
    await market.aclose()
    await wait_invariant(server, timeout=5)


def padded_update(ticker: str, size: int) -> bytes:
    """A valid PriceUpdate of ``size`` bytes or more: a real update plus an unknown field 15,
    which protobuf parsers keep (a newer producer's field would look the same)."""
    update = pb.PriceUpdate(ticker=ticker, price=1.0, published_at_unix_nanos=time.time_ns())
    head = update.SerializeToString()
    filler = b"x" * size
    length = len(filler)
    varint = bytearray()
    while length > 0x7F:
        varint.append((length & 0x7F) | 0x80)
        length >>= 7
    varint.append(length)
    payload = head + b"\x7a" + bytes(varint) + filler
    assert pb.PriceUpdate.FromString(payload).ticker == ticker
    return payload


async def test_oversized_pubsub_payload_is_dropped_and_counted(
    stub: PriceStreamServiceStub, server: Server, redis
) -> None:
    """A 1 MB (valid) update is neither delivered nor used as the first price; a normal one is."""
    market = Market(redis.url, ["AAPL"])
    huge = padded_update("AAPL", 1024 * 1024)
    client = redis.client()
    client.set("price:last:AAPL", huge)
    session = await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL"]))
    call = stub.StreamPriceUpdates(pb.StreamPriceUpdatesRequest(session_id=session.session_id))
    await asyncio.sleep(0.3)  # subscribed
    assert client.publish("price:AAPL", huge) == 1
    client.close()
    await asyncio.sleep(0.3)  # several flush intervals: it would have gone out on its own
    await market.tick("AAPL")
    batch = await next_batch(call)
    assert [u.ticker for u in batch.updates] == ["AAPL"]
    assert batch.ByteSize() < 100, "the 1 MB update was delivered"
    text = server.engine.metrics.exposition().decode()
    assert 'pricestream_price_updates_dropped_total{reason="oversized"} 1.0' in text
    assert samples(text)["pricestream_price_updates_received_total"] == 1
    call.cancel()
    await market.aclose()
    await wait_invariant(server, timeout=5)


async def test_raw_non_protobuf_request_is_invalid_argument(server: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        for method, message in (
            ("CreateSession", "pricestream.v1.CreateSessionRequest"),
            ("CloseSession", "pricestream.v1.CloseSessionRequest"),
        ):
            call = channel.unary_unary(f"/pricestream.v1.PriceStreamService/{method}")
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call(b"\xff\xff\xff not protobuf")
            assert raised.value.code() == INVALID
            assert raised.value.details() == f"request is not a valid {message} message"
        stream = channel.unary_stream("/pricestream.v1.PriceStreamService/StreamPriceUpdates")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stream(b"\xff\xff\xff").read()
        assert raised.value.code() == INVALID
    await wait_invariant(server, timeout=2)
