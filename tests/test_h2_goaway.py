"""A graceful GOAWAY (NO_ERROR) lets the calls already on the connection finish.

The server sends GOAWAY(NO_ERROR) when a connection reaches ``max_connection_age`` (then the
calls get ``max_connection_age_grace`` seconds) and when it stops (``GrpcServer.stop``: then
``grace`` seconds). RFC 9113 section 6.8: after GOAWAY the sender still processes the streams up
to its last-stream-id, so the client's WINDOW_UPDATE, PING and DATA on those streams are
ordinary frames, and the stream keeps its batches until the grace ends; then it ends with
UNAVAILABLE and the ``pricestream-reconnect: resume-session`` trailer, and the connection
closes.

h2 4.4.1 moves its connection to CLOSED as soon as it sends a GOAWAY, after which any frame from
the client is a ProtocolError: the connection used to end at the client's next frame. The
server now writes the graceful GOAWAY past h2's state machine (see h2_internals).

A stream the client opens after the GOAWAY (an id above the last-stream-id) is refused with
RST_STREAM REFUSED_STREAM, not ignored: the client learns at once that the request was not
processed and may retry it elsewhere (grpcio retries REFUSED_STREAM by itself), instead of
waiting for the connection to close; the connection goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
from h2.errors import ErrorCodes
from pricestream.api.server import Server
from pricestream.errors import SHUTDOWN_MESSAGE
from pricestream.tasks import cancel_and_wait
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from support.h2client import H2Client, StreamResult
from support.market import Market
from support.servers import ready_server
from support.settings import fast_settings
from support.streams import next_batch
from support.waiting import wait_until

SERVICE = "/pricestream.v1.PriceStreamService"
CREATE = f"{SERVICE}/CreateSession"
STREAM = f"{SERVICE}/StreamPriceUpdates"
HOST = "127.0.0.1"
AGE = 1.0  # max_connection_age (the server draws it in 0.9-1.1 times this)
GRACE = 2.0
UNAVAILABLE = 14
RECONNECT = ("pricestream-reconnect", "resume-session")


@contextlib.asynccontextmanager
async def ticking(redis_url: str, ticker: str) -> AsyncIterator[None]:
    """A price for ``ticker`` every 50 ms, so every flush has a batch to send."""
    market = Market(redis_url, [ticker])
    await market.tick(ticker)

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.05)
            await market.tick(ticker)

    task = asyncio.create_task(tick())
    try:
        yield
    finally:
        # Repeated until it ends: redis-py's asyncio.wait_for can swallow a cancel on 3.11.
        await cancel_and_wait([task])
        with contextlib.suppress(asyncio.CancelledError):
            await task  # what it raised before the cancel, if anything
        await market.aclose()


async def open_price_stream(client: H2Client, ticker: str) -> int:
    """CreateSession, then StreamPriceUpdates on it until its first batch; the stream id."""
    created = await client.send_grpc_request(CREATE, pb.CreateSessionRequest(tickers=[ticker]))
    result = await client.response(created)
    assert result.grpc_status == 0, result.grpc_message
    session = pb.Session.FromString(result.messages()[0])
    request = pb.StreamPriceUpdatesRequest(session_id=session.session_id)
    stream_id = await client.send_grpc_request(STREAM, request)
    await client.until(lambda: bool(client.streams[stream_id].data), 3)
    return stream_id


async def stream_goes_on_after_goaway(client: H2Client, stream_id: int, reason: str) -> None:
    """From a GOAWAY(NO_ERROR) just received: the client PINGs and WINDOW_UPDATEs, opens a new
    stream (refused), and the stream keeps its batches until the grace is over, then ends with
    UNAVAILABLE and the reconnect trailer; the connection then closes, without another GOAWAY."""
    goaway = client.goaway
    assert goaway is not None
    assert goaway.error_code == ErrorCodes.NO_ERROR
    assert goaway.last_stream_id == stream_id
    goaway_at = time.monotonic()
    stream = client.streams[stream_id]
    at_goaway = len(stream.messages())

    # A new stream above the last-stream-id is refused, the connection goes on.
    refused = await client.send_grpc_request(CREATE, pb.CreateSessionRequest(tickers=["AAPL"]))
    assert refused > goaway.last_stream_id
    await client.until(lambda: client.streams[refused].finished, 2)
    assert client.streams[refused].reset == ErrorCodes.REFUSED_STREAM
    assert client.streams[refused].headers is None  # never processed

    # PING and WINDOW_UPDATE (besides those acknowledging DATA) all through the grace.
    pings = []
    while not stream.finished:
        assert not client.closed, f"{reason}: the server closed the connection under the stream"
        ping = b"grace%03d" % len(pings)
        pings.append(ping)
        await client.ping(ping)
        await client.window_update(1024)
        await client.window_update(1024, stream_id)
        with contextlib.suppress(TimeoutError):
            await client.until(lambda: stream.finished, 0.3)
    ended_after = time.monotonic() - goaway_at

    acked = [ping for ping in pings if ping in client.ping_acks]
    print(
        f"{reason}: stream ended {ended_after:.2f} s after GOAWAY, "
        f"{len(stream.messages()) - at_goaway} batches meanwhile, {len(acked)}/{len(pings)} "
        "PINGs acknowledged"
    )
    assert len(acked) >= len(pings) - 1  # the last one may cross the close
    assert len(pings) >= 4
    assert ended_after >= GRACE - 0.3, f"{reason}: stream ended {ended_after:.2f} s after GOAWAY"
    assert len(stream.messages()) - at_goaway >= 10, "no batches during the grace"
    assert stream.ended and stream.reset is None
    assert stream.grpc_status == UNAVAILABLE, stream.grpc_message
    assert stream.header(RECONNECT[0]) == RECONNECT[1]

    # No call left: the connection closes, cleanly.
    await client.until(lambda: client.closed, 3)
    assert client.goaway.error_code == ErrorCodes.NO_ERROR  # no second GOAWAY with an error
    assert client.goaway.last_stream_id == stream_id


async def transport_is_empty(server: Server, timeout: float = 3.0) -> None:
    grpc_server = server._grpc
    await wait_until(
        lambda: not grpc_server._connections and not grpc_server._live_calls,
        timeout,
        "the transport to let go of every connection and call",
    )


async def test_stream_goes_on_through_the_max_connection_age_grace(redis) -> None:
    settings = fast_settings(redis.url, max_connection_age=AGE, max_connection_age_grace=GRACE)
    async with ready_server(settings) as server, ticking(redis.url, "AAPL"):
        port = server.grpc_port
        async with await H2Client.connect(HOST, port, stay_open_after_goaway=True) as client:
            stream_id = await open_price_stream(client, "AAPL")
            await client.until(lambda: client.goaway is not None, AGE * 1.1 + 1)
            await stream_goes_on_after_goaway(client, stream_id, "max_connection_age")
        await transport_is_empty(server)


async def test_stream_goes_on_through_the_shutdown_grace(redis) -> None:
    # An age the test never reaches: the GOAWAY is the server's stop.
    settings = fast_settings(redis.url, max_connection_age=600.0)
    async with ready_server(settings) as server, ticking(redis.url, "AAPL"):
        port = server.grpc_port
        async with await H2Client.connect(HOST, port, stay_open_after_goaway=True) as client:
            stream_id = await open_price_stream(client, "AAPL")
            stop = asyncio.create_task(server._grpc.stop(GRACE, SHUTDOWN_MESSAGE))
            await client.until(lambda: client.goaway is not None, 1)
            await stream_goes_on_after_goaway(client, stream_id, "shutdown")
            await asyncio.wait_for(stop, 3)
        await transport_is_empty(server)


async def test_data_on_an_open_stream_after_goaway_is_processed(redis) -> None:
    """DATA on a stream at or below the last-stream-id is still read after the GOAWAY: a
    CreateSession whose request body comes after it is answered."""
    settings = fast_settings(redis.url, max_connection_age=600.0)
    async with ready_server(settings) as server:
        port = server.grpc_port
        async with await H2Client.connect(HOST, port, stay_open_after_goaway=True) as client:
            stream_id = await client.send_grpc_request(CREATE, end_stream=False)
            await client.ping(b"sync0000")  # the server has read the HEADERS
            await client.until(lambda: b"sync0000" in client.ping_acks, 2)
            stop = asyncio.create_task(server._grpc.stop(GRACE, SHUTDOWN_MESSAGE))
            await client.until(lambda: client.goaway is not None, 1)
            assert client.goaway.last_stream_id == stream_id
            request = pb.CreateSessionRequest(tickers=["AAPL"]).SerializeToString()
            await client.send_data(stream_id, b"\0" + len(request).to_bytes(4) + request)
            await client.send_data(stream_id, b"", end_stream=True)
            result: StreamResult = await client.response(stream_id, 2)
            assert result.grpc_status == 0, result.grpc_message
            assert pb.Session.FromString(result.messages()[0]).session_id
            # Its only call done, the connection closes well before the grace is over.
            started = time.monotonic()
            await client.until(lambda: client.closed, 2)
            assert time.monotonic() - started < 1.0
            await asyncio.wait_for(stop, GRACE + 2)
        await transport_is_empty(server)


async def test_grpcio_stream_goes_on_through_the_max_connection_age_grace(redis) -> None:
    """A stock grpc.aio client: batches during the grace, then UNAVAILABLE with the reconnect
    trailer; the channel reconnects by itself for the next call."""
    settings = fast_settings(redis.url, max_connection_age=AGE, max_connection_age_grace=GRACE)
    async with ready_server(settings) as server, ticking(redis.url, "MSFT"):
        async with grpc.aio.insecure_channel(f"{HOST}:{server.grpc_port}") as channel:
            stub = PriceStreamServiceStub(channel)
            session = await stub.CreateSession(pb.CreateSessionRequest(tickers=["MSFT"]))
            request = pb.StreamPriceUpdatesRequest(session_id=session.session_id)
            call = stub.StreamPriceUpdates(request)
            await next_batch(call)
            (conn,) = server._grpc._connections
            await wait_until(lambda: conn.goaway_sent, AGE * 1.1 + 1, "the GOAWAY")
            goaway_at = time.monotonic()
            batches = 0
            with contextlib.suppress(grpc.aio.AioRpcError):
                while await asyncio.wait_for(call.read(), GRACE + 3) is not grpc.aio.EOF:
                    batches += 1
            ended_after = time.monotonic() - goaway_at
            trailers = tuple(await call.trailing_metadata() or ())
            print(f"grpcio: {batches} batches in {ended_after:.2f} s after GOAWAY, {trailers}")
            assert await call.code() == grpc.StatusCode.UNAVAILABLE, await call.details()
            assert RECONNECT in trailers
            assert ended_after >= GRACE - 0.3
            assert batches >= 10
            resumed = stub.StreamPriceUpdates(request)  # on a new connection
            assert (await next_batch(resumed)).updates[0].ticker == "MSFT"
            resumed.cancel()
        await transport_is_empty(server)
