"""Edges a strict HTTP/2 client finds (issue 29), against a real in-process server from the
raw client of tests/support/h2client.py, every frame counted as it came off the wire (``FrameLog``):

- frames on a stream the server has reset (refused, or answered while the client was still
  sending) are ignored, RFC 9113 §5.1: one RST_STREAM per stream, never one per frame, and
  the DATA is still charged to the connection's window, which the server gives back;
- a client that cancels a stream and opens another at once, at the advertised
  SETTINGS_MAX_CONCURRENT_STREAMS, is never refused (a stream it reset no longer counts).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from typing import Any

import grpc
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame
from pricestream.api.server import Server
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from support.h2client import FrameLog, H2Client, grpc_message
from support.invariants import wait_invariant
from support.servers import ready_server
from support.settings import fast_settings

SERVICE = "/pricestream.v1.PriceStreamService"
CREATE = f"{SERVICE}/CreateSession"
STREAM = f"{SERVICE}/StreamPriceUpdates"
CLOSE = f"{SERVICE}/CloseSession"
HOST = "127.0.0.1"
CHUNK = 16 * 1024


async def sync(client: H2Client) -> None:
    """PING and wait for its ACK: the server has read everything sent before it."""
    data = random.randbytes(8)
    await client.ping(data)
    await client.until(lambda: data in client.ping_acks)


class RawSender:
    """DATA frames written past the client's h2 (which would refuse to send on a stream it
    knows is reset), paced by the connection window the server grants: our own count of it,
    from the WINDOW_UPDATE frames on the wire."""

    def __init__(self, client: H2Client, log: FrameLog) -> None:
        self.client = client
        self.log = log
        self.initial = client.conn.outbound_flow_control_window
        self.sent = 0

    def window(self) -> int:
        return self.initial + self.log.connection_credit() - self.sent

    async def send(self, stream_id: int, size: int) -> None:
        if self.window() < size:
            await self.client.until(lambda: self.window() >= size)
        await self.client.send_frame(DataFrame(stream_id, b"\0" * size))
        self.sent += size


async def test_data_on_refused_streams_gets_one_reset_per_stream(redis) -> None:
    """Streams refused (REFUSED_STREAM: here past the bound of handlers still ending, set to 0
    so the refusal is sure): the client, which sent their HEADERS before it could see the
    refusal, sends 2 MiB of DATA on them (32 times the connection's window). Each stream gets
    exactly one RST_STREAM, the window keeps being given back, and the connection serves on."""
    async with ready_server(fast_settings(redis.url, max_sessions=5)) as server:
        server._grpc.limits = dataclasses.replace(server._grpc.limits, max_ending_calls=0)
        async with grpc.aio.insecure_channel(f"{HOST}:{server.grpc_port}") as channel:
            stub = PriceStreamServiceStub(channel)
            request = pb.CreateSessionRequest(tickers=["AAPL"])
            sessions = [(await stub.CreateSession(request)).session_id for _ in range(5)]
        async with await H2Client.connect(HOST, server.grpc_port) as client:
            log = client.frame_log = FrameLog()
            await client.until(lambda: client.conn.remote_settings.max_concurrent_streams == 5)
            streaming = [
                await client.send_grpc_request(STREAM, pb.StreamPriceUpdatesRequest(session_id=s))
                for s in sessions
            ]
            await client.until(lambda: all(client.streams[i].headers for i in streaming))
            for stream_id in streaming:
                client.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
            refused = []
            for _ in range(4):
                stream_id = client.conn.get_next_available_stream_id()
                client.conn.send_headers(stream_id, client.grpc_headers(CREATE))
                refused.append(stream_id)
            await client.flush()  # one write: 5 resets (handlers still ending), 4 new streams
            sender = RawSender(client, log)
            for _ in range(2 * 1024 * 1024 // CHUNK // len(refused)):
                for stream_id in refused:
                    await sender.send(stream_id, CHUNK)
            await sync(client)
            resets = {stream_id: log.resets(stream_id) for stream_id in refused}
            print(
                f"{sender.sent} bytes of DATA on {len(refused)} refused streams: RST_STREAM per "
                f"stream {[len(r) for r in resets.values()]}, connection window given back: "
                f"{log.connection_credit()} bytes"
            )
            assert all(codes == [ErrorCodes.REFUSED_STREAM] for codes in resets.values()), resets
            assert log.connection_credit() >= sender.sent - sender.initial
            # The connection serves on, on a new stream (the window has room: given back).
            stream_id = await client.send_grpc_request(
                CLOSE, pb.CloseSessionRequest(session_id=sessions[0])
            )
            assert (await client.response(stream_id)).grpc_status == 0
            assert client.goaway is None and not client.closed
        async with grpc.aio.insecure_channel(f"{HOST}:{server.grpc_port}") as channel:
            stub = PriceStreamServiceStub(channel)
            for session_id in sessions[1:]:
                await stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))


async def test_data_after_an_early_answer_gets_one_reset_per_stream(server: Server) -> None:
    """A call the server ends before the client has sent all of its request (an unknown
    method: UNIMPLEMENTED at once) gets trailers and one RST_STREAM(NO_ERROR), as gRPC sends;
    the client's DATA already on its way is ignored, not answered with STREAM_CLOSED each."""
    async with await H2Client.connect(HOST, server.grpc_port) as client:
        log = client.frame_log = FrameLog()
        await client.until(lambda: client.settings_acks > 0)
        sender = RawSender(client, log)
        answered = []
        for _ in range(4):
            stream_id = client.conn.get_next_available_stream_id()
            client.conn.send_headers(stream_id, client.grpc_headers("/no.such.Service/Upload"))
            answered.append(stream_id)
        await client.flush()
        for _ in range(32):
            for stream_id in answered:
                await sender.send(stream_id, CHUNK)
        await sync(client)
        resets = {stream_id: log.resets(stream_id) for stream_id in answered}
        print(f"RST_STREAM per early-answered stream: {[len(r) for r in resets.values()]}")
        assert all(codes == [ErrorCodes.NO_ERROR] for codes in resets.values()), resets
        assert all(client.streams[i].grpc_status == 12 for i in answered)
        # The connection serves on: a new call after 2 MiB sent on answered streams.
        stream_id = await client.send_grpc_request(CREATE, pb.CreateSessionRequest(tickers=["KO"]))
        result = await client.response(stream_id)
        assert result.grpc_status == 0, result
        session = pb.Session.FromString(result.messages()[0])
        stream_id = await client.send_grpc_request(
            CLOSE, pb.CloseSessionRequest(session_id=session.session_id)
        )
        assert (await client.response(stream_id)).grpc_status == 0


async def test_a_slot_reused_at_once_is_never_refused(redis) -> None:
    """At the advertised limit (5 streams, all streaming), the client cancels one stream and in
    the same write opens another (resuming that stream's session), 30 times: no stream is ever
    refused, though the cancelled handler is still ending when the new stream arrives."""
    async with ready_server(fast_settings(redis.url, max_sessions=5)) as server:
        async with grpc.aio.insecure_channel(f"{HOST}:{server.grpc_port}") as channel:
            stub = PriceStreamServiceStub(channel)
            request = pb.CreateSessionRequest(tickers=["AAPL"])
            sessions = [(await stub.CreateSession(request)).session_id for _ in range(5)]
        async with await H2Client.connect(HOST, server.grpc_port) as client:
            log = client.frame_log = FrameLog()
            await client.until(lambda: client.conn.remote_settings.max_concurrent_streams == 5)
            streams = {
                s: await client.send_grpc_request(
                    STREAM, pb.StreamPriceUpdatesRequest(session_id=s)
                )
                for s in sessions
            }
            await client.until(lambda: all(client.streams[i].headers for i in streams.values()))
            (conn,) = server._grpc._connections
            on_request = conn._on_request
            ending_at_request: list[int] = []  # handlers of reset streams still ending, each time

            def counting_on_request(event: Any) -> None:
                ending_at_request.append(len(conn._ending))
                on_request(event)

            conn._on_request = counting_on_request  # type: ignore[method-assign]
            statuses: dict[int | None, int] = {}
            cancelled = 0
            for round_ in range(30):
                session_id = sessions[round_ % 5]
                if not client.streams[streams[session_id]].finished:
                    client.conn.reset_stream(streams[session_id], ErrorCodes.CANCEL)
                    cancelled += 1
                stream_id = client.conn.get_next_available_stream_id()
                message = pb.StreamPriceUpdatesRequest(session_id=session_id)
                client.conn.send_headers(stream_id, client.grpc_headers(STREAM))
                client.conn.send_data(stream_id, grpc_message(message), end_stream=True)
                await client.flush()  # one write: RST_STREAM and the new stream
                streams[session_id] = stream_id
                result = client.streams.setdefault(stream_id, type(client.streams[1])(stream_id))
                await client.until(lambda r=result: r.headers is not None or r.finished)
                statuses[result.grpc_status] = statuses.get(result.grpc_status, 0) + 1
            refused = [
                f for f in log.frames if f.type == 3 and f.value == ErrorCodes.REFUSED_STREAM
            ]
            print(
                f"30 slots reused at once ({cancelled} after a cancel): {len(refused)} refused; "
                f"a cancelled handler still ending at {sum(1 for n in ending_at_request if n)} "
                f"of the 30 new streams; statuses {statuses} (9: the session's cancelled "
                "stream had not let go of it yet)"
            )
            assert not refused
            ending_seen = sum(1 for n in ending_at_request if n)
            assert cancelled >= 10 and ending_seen >= 1
            assert client.goaway is None and not client.closed
            for stream_id in streams.values():
                if not client.streams[stream_id].finished:
                    client.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
            await client.flush()
            await sync(client)
        async with grpc.aio.insecure_channel(f"{HOST}:{server.grpc_port}") as channel:
            stub = PriceStreamServiceStub(channel)
            for session_id in sessions:
                await stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))
        await asyncio.sleep(0)
        await wait_invariant(server)
