"""Socket-free tests of the gRPC transport's HTTP/2 connection
(``pricestream.transport.http2``): a fake transport records what the server's ``Connection``
writes, an ``h2`` client connection builds the client's bytes and reads the server's back.

No sockets, no servers, no Redis: one ``GrpcServer`` with a tiny echo service, as
``api/server.py`` builds it, and one ``Connection`` on the test's loop.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    DataReceived,
    Event,
    RemoteSettingsChanged,
    ResponseReceived,
    SettingsAcknowledged,
    StreamEnded,
    TrailersReceived,
)
from h2.settings import SettingCodes
from hyperframe.frame import Frame, SettingsFrame
from pricestream.observability.grpc_metrics import GrpcMetrics
from pricestream.transport.http2.connection import Connection
from pricestream.transport.http2.limits import Limits
from pricestream.transport.http2.server import GrpcServer
from prometheus_client import CollectorRegistry
from support.fake_transport import FakeTransport

pytestmark = pytest.mark.unit

ECHO = "/test.Echo/Echo"


async def echo(request: bytes, context: Any) -> bytes:
    return request


def grpc_message(payload: bytes) -> bytes:
    """One length-prefixed gRPC message, uncompressed."""
    return struct.pack(">BI", 0, len(payload)) + payload


class Harness:
    """A server connection with a fake transport, and an h2 client talking to it."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.server = GrpcServer(limits or Limits(), GrpcMetrics(CollectorRegistry()))
        self.server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
                )
            ]
        )
        self.conn = Connection(self.server)
        self.transport = FakeTransport(self.conn)
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]
        self.client = H2Connection(config=H2Configuration(client_side=True, header_encoding=None))
        self._read = 0

    def start(self) -> None:
        """The client's preface and SETTINGS."""
        self.client.initiate_connection()
        self.flush_client()

    def flush_client(self) -> None:
        data = self.client.data_to_send()
        if data:
            self.conn.data_received(data)

    def request(
        self,
        path: str = ECHO,
        body: bytes | None = b"hello",
        *,
        method: bytes = b"POST",
        content_type: bytes = b"application/grpc",
    ) -> int:
        stream_id = self.client.get_next_available_stream_id()
        headers = [
            (b":method", method),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", b"pricestream"),
            (b"content-type", content_type),
            (b"te", b"trailers"),
        ]
        self.client.send_headers(stream_id, headers, end_stream=body is None)
        if body is not None:
            self.client.send_data(stream_id, grpc_message(body), end_stream=True)
        self.flush_client()
        return stream_id

    async def events(self, turns: int = 10) -> list[Event]:
        """Let the loop run (the handler's task, the once-per-turn flush), then what the
        client makes of the bytes the server wrote since the last call."""
        for _ in range(turns):
            await asyncio.sleep(0)
        data = bytes(self.transport.data[self._read :])
        self._read = len(self.transport.data)
        events = self.client.receive_data(data) if data else []
        self.flush_client()  # the client's SETTINGS ACK and WINDOW_UPDATEs
        return events

    def finish(self) -> None:
        if not self.transport.lost:
            self.transport.lost = True
            self.conn.connection_lost(None)  # cancels its timers


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    made = Harness()
    yield made
    made.finish()
    await asyncio.sleep(0)


def of_stream(events: list[Event], stream_id: int) -> list[Event]:
    return [event for event in events if getattr(event, "stream_id", None) == stream_id]


def response(events: list[Event], stream_id: int) -> tuple[dict, bytes, dict, bool]:
    """(headers, body, trailers, ended) of one stream; a trailers-only answer's status is in
    its headers, so trailers fall back to them."""
    headers: dict[bytes, bytes] = {}
    trailers: dict[bytes, bytes] = {}
    body = b""
    ended = False
    for event in of_stream(events, stream_id):
        if isinstance(event, ResponseReceived):
            headers = dict(event.headers)
        elif isinstance(event, DataReceived):
            body += event.data
        elif isinstance(event, TrailersReceived):
            trailers = dict(event.headers)
        elif isinstance(event, StreamEnded):
            ended = True
    return headers, body, trailers or headers, ended


async def test_server_settings_advertise_the_limits():
    h = Harness(Limits(max_concurrent_streams=7, initial_window_size=100_000))
    try:
        h.start()
        events = await h.events()
        [settings] = [event for event in events if isinstance(event, RemoteSettingsChanged)]
        changed = {code: value.new_value for code, value in settings.changed_settings.items()}
        assert changed[SettingCodes.MAX_CONCURRENT_STREAMS] == 7
        assert changed[SettingCodes.INITIAL_WINDOW_SIZE] == 100_000
        assert changed[SettingCodes.MAX_HEADER_LIST_SIZE] == 16 * 1024
        assert changed[SettingCodes.ENABLE_PUSH] == 0
        assert h.transport.buffer_limits == (2 * 1024 * 1024, 512 * 1024)
        assert not h.transport.is_closing()
    finally:
        h.finish()


async def test_unary_call_is_echoed_with_status_0(harness):
    harness.start()
    await harness.events()
    stream_id = harness.request(body=b"ping pong")
    headers, body, trailers, ended = response(await harness.events(), stream_id)
    assert headers[b":status"] == b"200"
    assert headers[b"content-type"] == b"application/grpc"
    assert body == grpc_message(b"ping pong")
    assert trailers[b"grpc-status"] == b"0"
    assert ended
    assert harness.conn.calls == {}


async def test_several_calls_on_one_connection(harness):
    harness.start()
    ids = [harness.request(body=b"call %d" % n) for n in range(3)]
    events = await harness.events()
    for n, stream_id in enumerate(ids):
        _, body, trailers, ended = response(events, stream_id)
        assert body == grpc_message(b"call %d" % n)
        assert trailers[b"grpc-status"] == b"0" and ended


async def test_unknown_method_is_unimplemented(harness):
    harness.start()
    stream_id = harness.request("/test.Echo/Nope")
    headers, body, trailers, ended = response(await harness.events(), stream_id)
    assert headers[b":status"] == b"200"
    assert body == b""
    assert trailers[b"grpc-status"] == b"12"  # UNIMPLEMENTED
    assert b"/test.Echo/Nope" in trailers[b"grpc-message"]
    assert ended


async def test_request_over_max_request_bytes_is_resource_exhausted():
    h = Harness(Limits(max_request_bytes=10))
    try:
        h.start()
        stream_id = h.request(body=b"x" * 100)
        _, body, trailers, ended = response(await h.events(), stream_id)
        assert body == b""
        assert trailers[b"grpc-status"] == b"8"  # RESOURCE_EXHAUSTED
        assert ended
    finally:
        h.finish()


@pytest.mark.parametrize(
    ("method", "status", "text"),
    [
        (b"POST", b"415", b"this server speaks gRPC: content-type must be application/grpc\n"),
        (b"GET", b"405", b"this server speaks gRPC: use POST with application/grpc\n"),
    ],
)
async def test_non_grpc_request_gets_a_plain_answer(harness, method, status, text):
    harness.start()
    stream_id = harness.request(
        "/", None if method == b"GET" else b"{}", method=method, content_type=b"application/json"
    )
    headers, body, _, ended = response(await harness.events(), stream_id)
    assert headers[b":status"] == status
    assert headers[b"content-type"] == b"text/plain; charset=utf-8"
    assert b"grpc-status" not in headers
    assert body == text
    assert ended
    assert harness.conn.calls == {}
    assert not harness.transport.is_closing()  # the connection serves on


def frame_kinds(data: bytes) -> list[tuple[str, int]]:
    """(type, stream id) of each HTTP/2 frame in ``data``; a SETTINGS ACK is ``"ACK"``."""
    kinds = []
    view = memoryview(data)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        ack = isinstance(frame, SettingsFrame) and "ACK" in frame.flags
        kinds.append(("ACK" if ack else type(frame).__name__, frame.stream_id))
        view = view[9 + length :]
    return kinds


async def test_settings_ack_goes_before_the_data_a_raised_initial_window_lets_out(harness):
    """h2spec http2/6.9.2/1 with its HEADERS and SETTINGS in two reads (the order that lost it
    now and then): SETTINGS_INITIAL_WINDOW_SIZE 0, a request (a plain answer waits for the
    window), then INITIAL_WINDOW_SIZE 1 alone. The 1-byte DATA it lets out goes after the
    SETTINGS ACK: a client applies the window it raised once acknowledged (python-h2 raises
    FlowControlError on DATA ahead of the ACK), and h2spec 2.2.1 waits for the ACK skipping
    every other frame, then for a DATA frame: one before the ACK was lost to it (a timeout)."""
    harness.start()
    await harness.events()
    harness.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 0})
    harness.flush_client()
    assert any(isinstance(e, SettingsAcknowledged) for e in await harness.events())
    stream_id = harness.request("/", None, method=b"GET")
    headers, body, _, _ = response(await harness.events(), stream_id)
    assert (headers[b":status"], body) == (b"405", b"")  # waiting for its window

    start = len(harness.transport.data)
    harness.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1})
    harness.flush_client()  # a read of its own
    for _ in range(5):
        await asyncio.sleep(0)
    written = frame_kinds(bytes(harness.transport.data[start:]))
    assert written == [("ACK", 0), ("DataFrame", stream_id)], written
    events = await harness.events()  # python-h2's own flow control accepts the DATA
    assert [e.data for e in of_stream(events, stream_id) if isinstance(e, DataReceived)] == [b"t"]


async def test_http1_request_on_the_grpc_port_is_505(harness):
    await asyncio.sleep(0)  # the server's SETTINGS leave first, as on a real socket
    preface = len(harness.transport.data)
    assert preface > 0
    harness.conn.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = bytes(harness.transport.data[preface:])
    assert answer.split(b"\r\n")[0] == b"HTTP/1.1 505 HTTP Version Not Supported"
    assert answer.endswith(b"\r\n\r\nthis port serves gRPC over HTTP/2 (h2 or h2c) only\n")
    assert harness.transport.closed


async def test_http1_answer_content_length_is_its_body(harness):
    harness.conn.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = bytes(harness.transport.data)
    head, _, body = answer[answer.index(b"HTTP/1.1 505") :].partition(b"\r\n\r\n")
    assert b"Content-Length: %d" % len(body) in head.split(b"\r\n")
