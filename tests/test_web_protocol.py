"""Socket-free tests of the browser transport (``pricestream.transport.web``), as hypercorn
tests its protocols: a fake transport records the bytes the connection writes, requests and
client frames are fed with ``data_received``, and the answers are read back the way a client
would read them (wsproto as a WebSocket client, protobuf's JSON parser for the updates).

No sockets, no servers, no Redis: each test drives one ``WebConnection`` on the test's loop.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st
from pricestream.codec import json_fragment
from pricestream.transport.web.connection import WebConnection
from pricestream.transport.web.frames import (
    sse_batch,
    text_frame_header,
    websocket_batch,
)
from pricestream.transport.web.http import Request, Response
from pricestream.transport.web.limits import WebLimits
from pricestream.transport.web.sinks import EventStreamSink, StreamSink, WebSocketSink
from pricestream.v1.pricestream_pb2 import PriceUpdate
from support.fake_transport import FakeTransport
from wsproto.connection import Connection as WsClient
from wsproto.connection import ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    TextMessage,
)

pytestmark = pytest.mark.unit

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
SUBPROTOCOL = "pricestream.v1.json"


# --- fakes ----------------------------------------------------------------------------------


Handler = Callable[[Request, WebConnection], Awaitable[None]]


class FakeApp:
    """A ``WebApplication`` whose ``handle`` is the test's coroutine function."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Request] = []

    async def handle(self, request: Request, exchange: WebConnection) -> None:
        self.requests.append(request)
        await self.handler(request, exchange)


class FakeOwner:
    """A ``ConnectionOwner`` recording what the connection tells it."""

    def __init__(self, app: FakeApp, limits: WebLimits) -> None:
        self._app = app
        self._limits = limits
        self.calls: list[tuple[Any, ...]] = []

    @property
    def app(self) -> FakeApp:
        return self._app

    @property
    def limits(self) -> WebLimits:
        return self._limits

    def connection_opened(self, conn: WebConnection) -> None:
        self.calls.append(("connection_opened",))

    def connection_closed(self, conn: WebConnection) -> None:
        self.calls.append(("connection_closed",))

    def stream_opened(self, conn: WebConnection, kind: str) -> None:
        self.calls.append(("stream_opened", kind))

    def stream_closed(self, conn: WebConnection, kind: str, code: int) -> None:
        self.calls.append(("stream_closed", kind, code))

    def closed_streams(self) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] == "stream_closed"]


class Harness:
    """One connection, its fake transport and owner, and a reader of what it wrote."""

    def __init__(self, handler: Handler, limits: WebLimits | None = None) -> None:
        self.app = FakeApp(handler)
        self.owner = FakeOwner(self.app, limits or WebLimits())
        self.conn = WebConnection(self.owner)
        self.transport = FakeTransport(self.conn)
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]
        self._read = 0

    def feed(self, data: bytes) -> None:
        self.conn.data_received(data)

    def new_bytes(self) -> bytes:
        """What the connection wrote since the last call."""
        data = bytes(self.transport.data[self._read :])
        self._read = len(self.transport.data)
        return data

    async def lingers_then_closes(self) -> None:
        """The close after a refusal or a failed WebSocket: our FIN after the answer, the
        client's later input read and dropped (closing with it unread would send a reset
        that can destroy the answer), then the client's FIN closes the connection."""
        assert self.transport.eof_written and not self.transport.closed
        written = len(self.transport.data)
        self.feed(b"the rest of what the client was sending")
        assert len(self.transport.data) == written
        assert self.conn.eof_received() is True
        assert self.transport.closed and not self.transport.aborted
        await settle()
        assert self.transport.lost

    def finish(self) -> None:
        """End the connection if the test left it open (its timers and task with it)."""
        if not self.transport.lost:
            self.transport.lost = True
            self.conn.connection_lost(None)


async def settle(turns: int = 10) -> None:
    """Let the loop run the connection's tasks and call_soon callbacks."""
    for _ in range(turns):
        await asyncio.sleep(0)


async def wait_for(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


@pytest.fixture
async def harnesses() -> AsyncIterator[list[Harness]]:
    made: list[Harness] = []
    yield made
    for harness in made:
        harness.finish()
    await settle()


def parse_responses(data: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """HTTP/1.1 responses with content-length bodies (or none): (status, headers, body)."""
    responses = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {data!r}"
        lines = head.split(b"\r\n")
        version, status, *_ = lines[0].split(b" ", 2)
        assert version == b"HTTP/1.1"
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get(b"content-length", b"0"))
        responses.append((int(status), headers, rest[:length]))
        data = rest[length:]
    return responses


async def stream_request(harnesses: list[Harness], handler: Handler, kind: str | None) -> Harness:
    """A connection whose request is a stream's (an upgrade for "websocket", else a GET of
    an event stream), handed to ``handler`` and run until it waits."""
    h = Harness(handler)
    harnesses.append(h)
    h.feed(upgrade() if kind == "websocket" else get("/v1/sessions/s/events"))
    await settle()
    return h


# --- HTTP/1.1 -------------------------------------------------------------------------------


async def echo_path(request: Request, exchange: WebConnection) -> None:
    await asyncio.sleep(0)  # answer from a later turn, like a real handler
    if request.handshake_error is not None:  # as the application answers a bad handshake
        status, message, headers = request.handshake_error
        exchange.respond(Response.error(status, "bad_handshake", message, headers))
        return
    exchange.respond(Response.json(200, {"path": request.path, "body": request.body.decode()}))


def get(path: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: pricestream\r\n\r\n" % path.encode()


async def test_get_is_answered_and_keep_alive_serves_the_next_request(harnesses):
    h = Harness(echo_path)
    harnesses.append(h)
    h.feed(get("/first"))
    await settle()
    [(status, headers, body)] = parse_responses(h.new_bytes())
    assert status == 200
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(body)
    assert json.loads(body) == {"path": "/first", "body": ""}
    assert not h.transport.is_closing()

    h.feed(get("/second"))
    await settle()
    [(status, _, body)] = parse_responses(h.new_bytes())
    assert status == 200 and json.loads(body)["path"] == "/second"
    assert not h.transport.is_closing()
    assert h.owner.calls == [("connection_opened",)]


async def test_pipelined_requests_are_answered_in_order(harnesses):
    h = Harness(echo_path)
    harnesses.append(h)
    h.feed(get("/one") + get("/two") + get("/three"))
    await settle(30)
    answers = parse_responses(h.new_bytes())
    assert [json.loads(body)["path"] for _, _, body in answers] == ["/one", "/two", "/three"]
    assert [status for status, _, _ in answers] == [200, 200, 200]
    assert h.transport.reading  # paused while the pipelined requests waited, resumed after


async def test_reading_pauses_while_a_handler_runs(harnesses):
    """One request at a time: what a client sends while its request is being answered waits
    in the kernel, not in an unbounded buffer of ours."""
    answer = asyncio.Event()

    async def slow(request: Request, exchange: WebConnection) -> None:
        await answer.wait()
        exchange.respond(Response.empty(204))

    h = Harness(slow)
    harnesses.append(h)
    h.feed(get("/slow"))
    await settle()
    assert h.transport.reading is False
    answer.set()
    await settle()
    [(status, _, _)] = parse_responses(h.new_bytes())
    assert status == 204 and h.transport.reading is True


async def test_a_post_body_reaches_the_application(harnesses):
    h = Harness(echo_path)
    harnesses.append(h)
    h.feed(b'POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\n{"a":1')
    h.feed(b"}")
    await settle()
    [(status, _, body)] = parse_responses(h.new_bytes())
    assert status == 200 and json.loads(body) == {"path": "/sessions", "body": '{"a":1}'}


async def test_malformed_request_line_is_400_and_closes(harnesses):
    h = Harness(echo_path)
    harnesses.append(h)
    h.feed(b"THIS IS NOT HTTP\r\n\r\n")
    await settle()
    data = h.new_bytes()
    assert data.startswith(b"HTTP/1.1 400 ")
    [(status, headers, body)] = parse_responses(data)
    assert status == 400 and headers[b"connection"] == b"close"
    assert json.loads(body)["error"]["code"] == "bad_request"
    await h.lingers_then_closes()
    assert h.app.requests == []


@pytest.mark.parametrize(
    "pieces",
    [False, True],
    ids=["whole", "in-pieces"],
)
async def test_head_over_max_head_bytes_is_431(harnesses, pieces):
    h = Harness(echo_path, WebLimits(max_head_bytes=1024))
    harnesses.append(h)
    request = b"GET / HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * 2000 + b"\r\n\r\n"
    if pieces:
        for start in range(0, len(request), 100):
            if h.transport.is_closing():
                break
            h.feed(request[start : start + 100])
    else:
        h.feed(request)
    await settle()
    [(status, _, body)] = parse_responses(h.new_bytes())
    assert status == 431
    assert json.loads(body)["error"]["message"] == "request head is too large"
    await h.lingers_then_closes()
    assert h.app.requests == []


async def test_body_over_max_body_bytes_is_413(harnesses):
    h = Harness(echo_path, WebLimits(max_body_bytes=100))
    harnesses.append(h)
    h.feed(b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n")
    await settle()
    [(status, _, body)] = parse_responses(h.new_bytes())
    assert status == 413
    assert json.loads(body)["error"]["message"] == "request body is too large"
    await h.lingers_then_closes()
    assert h.app.requests == []


async def test_body_over_max_body_bytes_arriving_with_its_head_is_one_413(harnesses):
    h = Harness(echo_path, WebLimits(max_body_bytes=100))
    harnesses.append(h)
    h.feed(b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n" + b"x" * 101)
    await settle()
    responses = parse_responses(bytes(h.transport.data))
    assert [status for status, _, _ in responses] == [413]
    await h.lingers_then_closes()
    assert h.transport.writes_after_close == 0
    assert h.app.requests == []


async def test_chunked_body_over_max_body_bytes_is_413(harnesses):
    h = Harness(echo_path, WebLimits(max_body_bytes=100))
    harnesses.append(h)
    h.feed(b"POST /sessions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    h.feed(b"80\r\n" + b"x" * 0x80 + b"\r\n")
    await settle()
    [(status, _, _)] = parse_responses(h.new_bytes())
    assert status == 413
    await h.lingers_then_closes()


async def test_an_unanswered_request_is_500(harnesses):
    async def forget(request: Request, exchange: WebConnection) -> None:
        return None

    h = Harness(forget)
    harnesses.append(h)
    h.feed(get("/"))
    await settle()
    [(status, _, body)] = parse_responses(h.new_bytes())
    assert status == 500 and json.loads(body)["error"]["code"] == "internal"


async def test_pipelined_requests_wait_while_the_client_does_not_read_its_answers(harnesses):
    """A client that pipelines requests and reads none of the answers: once its output is
    over the high-water mark, no further request is read or answered (each would buffer one
    more answer, without a bound) until the output drained, a bad handshake included."""
    h = Harness(echo_path)
    harnesses.append(h)
    h.conn.pause_writing()  # the answers sent before filled the socket's buffer
    h.feed(get("/one") + raw_upgrade(key=b"x") + get("/three"))
    await settle(30)
    assert h.new_bytes() == b""
    assert h.transport.reading is False
    h.conn.resume_writing()
    await settle(30)
    answers = parse_responses(h.new_bytes())
    assert [status for status, _, _ in answers] == [200, 400, 200]
    assert [json.loads(body).get("path") for _, _, body in answers] == ["/one", None, "/three"]
    assert h.transport.reading is True


async def test_output_that_drains_before_its_handler_ends_lets_reading_resume(harnesses):
    """The answer crosses the high-water mark and drains again while its handler is still
    finishing (uvloop runs the write callback before the task's end): reading resumes, the
    next request is read."""

    async def answer_then_finish(request: Request, exchange: WebConnection) -> None:
        exchange.respond(Response.json(200, {"path": request.path}))
        exchange.pause_writing()  # as the transport does when this answer filled the buffer
        await asyncio.sleep(0)
        exchange.resume_writing()  # drained, the handler not ended yet
        await asyncio.sleep(0)

    h = Harness(answer_then_finish)
    harnesses.append(h)
    h.feed(get("/one"))
    await settle(30)
    assert [s for s, _, _ in parse_responses(h.new_bytes())] == [200]
    assert h.transport.reading is True
    h.feed(get("/two"))
    await settle(30)
    assert [json.loads(b)["path"] for _, _, b in parse_responses(h.new_bytes())] == ["/two"]


@pytest.mark.parametrize("kind", ["websocket", "sse"])
async def test_a_stream_that_starts_over_the_high_water_mark_starts_paused(harnesses, kind):
    """The transport says "paused" once per crossing of the mark: if it came before the sink
    existed, the sink starts blocked, so its batches wait and its writer counts as behind."""

    async def start_paused(request: Request, exchange: WebConnection) -> None:
        exchange.pause_writing()  # the 101 (or the SSE head) crossed the mark
        await StreamApp(kind)(request, exchange)

    h = await stream_request(harnesses, start_paused, kind)
    sink = h.conn.sink
    assert sink is not None and sink.blocked_since is not None
    assert sink.send(b'{"a":1},') is False
    h.conn.resume_writing()
    assert sink.blocked_since is None


async def test_a_connection_the_client_half_closed_is_closed_within_close_timeout(harnesses):
    """The client sends a request and its FIN, then stops reading: the close that follows
    the answer is ours and bounded (the transport's own close on EOF would wait for the
    output to leave for good)."""

    async def answer_later(request: Request, exchange: WebConnection) -> None:
        await asyncio.sleep(0.01)
        exchange.respond(Response.json(200, {"path": request.path}))

    h = Harness(answer_later, WebLimits(close_timeout=0.05))
    harnesses.append(h)
    h.transport.drains = False
    h.feed(get("/"))
    assert h.conn.eof_received() is True  # we close it, not the transport
    await wait_for(lambda: h.transport.aborted)
    await settle()
    assert h.transport.lost


async def test_a_head_sent_a_byte_at_a_time_must_still_arrive_within_head_timeout(harnesses):
    """The head timer starts with the connection (or a request's first byte) and is not
    restarted by each later byte of the same head (which let a client keep a socket for a
    day, one byte every few seconds)."""
    h = Harness(echo_path, WebLimits(head_timeout=0.1))
    harnesses.append(h)
    for byte in b"GET / HTTP/1.1\r\nHost: x\r\n":
        if h.transport.closed:
            break
        h.feed(bytes([byte]))
        await asyncio.sleep(0.03)
    assert h.transport.closed and h.app.requests == []


async def test_a_pipelined_head_must_arrive_within_head_timeout_of_the_last_answer(harnesses):
    """Part of the next request arrived while the last one was being answered: its head
    timer starts when the connection moves on to it, not only with its next chunk (the
    keep-alive idle timeout, 60 s, was all that bounded it)."""

    async def answer_later(request: Request, exchange: WebConnection) -> None:
        await asyncio.sleep(0.01)
        exchange.respond(Response.json(200, {"path": request.path}))

    h = Harness(answer_later, WebLimits(head_timeout=0.1, idle_timeout=10.0))
    harnesses.append(h)
    h.feed(get("/one") + b"GET /two HT")
    await wait_for(lambda: h.transport.closed, timeout=1.0)
    assert [r.path for r in h.app.requests] == ["/one"]


async def test_a_refusal_whose_client_never_sends_its_fin_is_aborted(harnesses):
    h = Harness(echo_path, WebLimits(close_timeout=0.05))
    harnesses.append(h)
    h.feed(b"THIS IS NOT HTTP\r\n\r\n")
    assert h.transport.eof_written
    await wait_for(lambda: h.transport.aborted)


async def test_a_request_followed_by_the_clients_fin_is_still_answered(harnesses):
    """Clients like ``nc`` half-close after their request: it is answered, then closed."""

    async def answer_later(request: Request, exchange: WebConnection) -> None:
        await asyncio.sleep(0.01)
        exchange.respond(Response.json(200, {"path": request.path}))

    h = Harness(answer_later)
    harnesses.append(h)
    h.feed(get("/half-closed"))
    assert h.conn.eof_received() is True
    await wait_for(lambda: h.transport.closed)
    [(status, _, body)] = parse_responses(h.new_bytes())
    assert status == 200 and json.loads(body) == {"path": "/half-closed"}


async def test_a_refusal_after_the_clients_fin_closes_without_waiting_for_another(harnesses):
    """The client half-closed after a request and part of another: the second is refused
    (400, cut short) once the first is answered, and the connection closes at once: its FIN
    was read already, and none would come to end a wait for it."""

    async def answer_later(request: Request, exchange: WebConnection) -> None:
        await asyncio.sleep(0.01)
        exchange.respond(Response.json(200, {"path": request.path}))

    h = Harness(answer_later, WebLimits(close_timeout=5.0))
    harnesses.append(h)
    h.feed(get("/one") + b"GET /two HT")
    assert h.conn.eof_received() is True
    await wait_for(lambda: h.transport.closed)
    assert [status for status, _, _ in parse_responses(h.new_bytes())] == [200, 400]
    assert not h.transport.eof_written and not h.transport.aborted


@pytest.mark.parametrize("kind", ["websocket", "sse"])
async def test_a_stream_whose_client_sends_its_fin_ends_1006_at_once(harnesses, kind):
    stream = StreamApp(kind)
    h = await stream_request(harnesses, stream, kind)
    assert h.conn.eof_received() is True
    assert h.owner.closed_streams() == [("stream_closed", kind, 1006)]
    assert h.transport.closed
    await settle()
    assert stream.cancelled and h.transport.lost


@pytest.mark.parametrize("end", ["client-fin", "server-close"])
async def test_a_stream_that_ends_cancels_its_task_once(harnesses, end):
    """The stream's end cancels its handler's task; the connection's loss that follows must
    not cancel it again: the second cancel would interrupt what the first set going (the
    lifecycle giving back a lease its claim took in Redis, tests/test_exit_paths.py)."""
    cancels = 0
    finished = asyncio.Event()

    async def handler(request: Request, exchange: WebConnection) -> None:
        nonlocal cancels
        exchange.accept_websocket(request, SUBPROTOCOL, [])
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancels += 1
            try:
                await asyncio.sleep(0.05)  # e.g. waiting for Redis to answer the claim
            except asyncio.CancelledError:
                cancels += 1
            finished.set()
            raise

    h = Harness(handler)
    harnesses.append(h)
    h.feed(upgrade())
    await settle()
    if end == "client-fin":
        h.conn.eof_received()
    else:
        h.conn.close_stream(1000, "session closed")
        h.feed(WsClient(ConnectionType.CLIENT).send(CloseConnection(code=1000)))
    await asyncio.wait_for(finished.wait(), 2)
    assert h.transport.lost
    assert cancels == 1


async def test_a_body_that_does_not_follow_its_head_in_time_is_408(harnesses):
    h = Harness(echo_path, WebLimits(head_timeout=0.05))
    harnesses.append(h)
    h.feed(b'POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{"a"')
    await wait_for(lambda: h.transport.eof_written)
    [(status, headers, body)] = parse_responses(h.new_bytes())
    assert status == 408 and headers[b"connection"] == b"close"
    assert json.loads(body)["error"]["message"] == "request body did not arrive in time"
    assert h.app.requests == []


@pytest.mark.parametrize("kind", ["idle-keep-alive", "sse-close", "websocket-peer-close"])
async def test_a_close_whose_output_never_leaves_is_aborted(harnesses, kind):
    """A client that stopped reading (its output never leaves: ``drains`` False) would hold a
    gracefully closed socket and its buffer for good, TCP's zero-window probes keeping it
    alive: every close is an abort after ``close_timeout``."""
    limits = WebLimits(idle_timeout=0.02, close_timeout=0.05)
    if kind == "websocket-peer-close":
        h: Harness = WsHarness(limits)
        harnesses.append(h)
        assert isinstance(h, WsHarness)
        await h.upgrade()
        h.transport.drains = False
        h.send(CloseConnection(code=1000, reason="bye"))
    else:
        stream = StreamApp("sse")
        h = Harness(stream if kind == "sse-close" else echo_path, limits)
        harnesses.append(h)
        h.feed(get("/v1/events" if kind == "sse-close" else "/"))
        await settle()
        h.transport.drains = False
        if kind == "sse-close":
            h.conn.close_stream(1000, "session closed")
    await wait_for(lambda: h.transport.closed)
    assert not h.transport.aborted  # first the graceful close ...
    await wait_for(lambda: h.transport.aborted)  # ... then, its output stuck, the abort
    await settle()
    assert h.transport.lost and h.owner.calls[-1] == ("connection_closed",)


# --- WebSocket: the handshake ---------------------------------------------------------------


def upgrade(key: bytes | None = WS_KEY, version: bytes = b"13") -> bytes:
    lines = [
        b"GET /v1/stream HTTP/1.1",
        b"Host: pricestream",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Version: " + version,
        b"Sec-WebSocket-Protocol: " + SUBPROTOCOL.encode(),
    ]
    if key is not None:
        lines.append(b"Sec-WebSocket-Key: " + key)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def expected_accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


class StreamApp:
    """Accepts a WebSocket (or starts an event stream) and holds it until cancelled."""

    def __init__(self, kind: str = "websocket") -> None:
        self.kind = kind
        self.sink: StreamSink | None = None
        self.release = asyncio.Event()
        self.cancelled = False

    async def __call__(self, request: Request, exchange: WebConnection) -> None:
        if self.kind == "websocket":
            self.sink = exchange.accept_websocket(request, SUBPROTOCOL, [])
        else:
            self.sink = exchange.start_event_stream([])
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


class WsHarness(Harness):
    """A connection upgraded to a WebSocket, with a wsproto client reading the server."""

    def __init__(self, limits: WebLimits | None = None) -> None:
        self.stream = StreamApp()
        super().__init__(self.stream, limits)
        self.client = WsClient(ConnectionType.CLIENT)

    async def upgrade(self) -> bytes:
        self.feed(upgrade())
        await settle()
        head, sep, rest = self.new_bytes().partition(b"\r\n\r\n")
        assert sep and rest == b""
        return head

    def send(self, event: Event) -> None:
        """A client frame (masked, as wsproto's client writes it)."""
        self.feed(self.client.send(event))

    def events(self) -> list[Event]:
        """The server's frames since the last call, as the client reads them."""
        self.client.receive_data(self.new_bytes())
        return list(self.client.events())

    @property
    def sink(self) -> WebSocketSink:
        assert isinstance(self.stream.sink, WebSocketSink)
        return self.stream.sink


async def test_upgrade_is_101_with_accept_and_subprotocol(harnesses):
    h = WsHarness()
    harnesses.append(h)
    head = await h.upgrade()
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 101 ")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(b":") for line in lines[1:])
    }
    assert headers[b"sec-websocket-accept"] == expected_accept(WS_KEY)
    assert headers[b"sec-websocket-accept"] == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 1.3
    assert headers[b"sec-websocket-protocol"] == SUBPROTOCOL.encode()
    assert headers[b"upgrade"].lower() == b"websocket"
    assert h.owner.calls == [("connection_opened",), ("stream_opened", "websocket")]
    assert h.conn.mode == "websocket"
    assert h.app.requests[0].websocket


async def test_upgrade_with_version_8_is_handed_over_as_a_426(harnesses):
    """The transport says why a handshake is invalid; the application answers (and counts)
    it. An unknown version is a 426 naming the one we speak, with Upgrade (RFC 9110 15.5.22,
    RFC 6455 4.4)."""
    h = Harness(echo_path)
    harnesses.append(h)
    h.feed(upgrade(version=b"8"))
    await settle()
    [request] = h.app.requests
    assert request.websocket is False
    assert request.handshake_error is not None
    status, message, extra = request.handshake_error
    assert (status, message) == (
        426,
        "invalid WebSocket handshake: Sec-WebSocket-Version must be 13",
    )
    assert dict(extra) == {
        b"sec-websocket-version": b"13",
        b"upgrade": b"websocket",
        b"connection": b"Upgrade",
    }
    [(status, headers, _)] = parse_responses(h.new_bytes())
    assert status == 426 and headers[b"upgrade"] == b"websocket"
    assert h.conn.mode == "http"


async def test_upgrade_without_key_is_handed_over_as_a_400(harnesses):
    h = Harness(echo_path)
    harnesses.append(h)
    h.feed(upgrade(key=None))
    await settle()
    [request] = h.app.requests
    assert request.websocket is False
    assert request.handshake_error is not None and request.handshake_error[0] == 400
    [(status, _, body)] = parse_responses(h.new_bytes())
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_handshake"


def raw_upgrade(version: bytes = b"1.1", host: bytes | None = b"pricestream", key: bytes = WS_KEY):
    lines = [b"GET /v1/stream HTTP/" + version]
    if host is not None:
        lines.append(b"Host: " + host)
    lines += [
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Version: 13",
        b"Sec-WebSocket-Key: " + key,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


MALFORMED_UPGRADES = {
    "http-1.0-without-host": (
        raw_upgrade(version=b"1.0", host=None),
        "a WebSocket handshake is an HTTP/1.1 request",
    ),
    "host-not-a-name": (
        raw_upgrade(host=b"xn--zz"),
        "invalid WebSocket handshake: the Host header is not a valid host name",
    ),
    "key-not-16-bytes": (
        raw_upgrade(key=b"x"),
        "invalid WebSocket handshake: Sec-WebSocket-Key is not 16 bytes in base64",
    ),
    "two-keys": (
        raw_upgrade().replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Key: " + WS_KEY + b"\r\n\r\n"),
        "invalid WebSocket handshake: more than one Sec-WebSocket-Key",
    ),
}


@pytest.mark.parametrize("pipelined", [False, True], ids=["alone", "after-a-get"])
@pytest.mark.parametrize("case", MALFORMED_UPGRADES)
async def test_a_malformed_upgrade_is_400_with_a_sentence(harnesses, case, pipelined):
    """Handshakes wsproto's own checks let through or fail on with an error of another library
    (h11's, the IDNA codec's): each is handed to the application as a 400 saying why, alone
    or pipelined behind a request, never an exception out of the protocol (which left a
    pipelined connection with nothing reading it: a socket held until the pod stopped)."""
    request, message = MALFORMED_UPGRADES[case]
    h = Harness(echo_path)
    harnesses.append(h)
    h.feed((get("/first") if pipelined else b"") + request)
    await settle(30)
    answers = parse_responses(h.new_bytes())
    assert [status for status, _, _ in answers] == [200, 400] if pipelined else [400]
    error = json.loads(answers[-1][2])["error"]
    assert error == {"code": "bad_handshake", "message": message}
    assert [r.handshake_error for r in h.app.requests] == [None] * pipelined + [(400, message, [])]


# --- WebSocket: client frames ----------------------------------------------------------------


async def test_client_ping_is_answered_with_the_same_payload(harnesses):
    h = WsHarness()
    harnesses.append(h)
    await h.upgrade()
    h.send(Ping(payload=b"are you there"))
    await settle()
    assert h.events() == [Pong(payload=b"are you there")]


async def test_client_close_is_answered_and_ends_the_stream(harnesses):
    h = WsHarness()
    harnesses.append(h)
    await h.upgrade()
    h.send(CloseConnection(code=1000, reason="bye"))
    await settle()
    [event] = h.events()
    assert isinstance(event, CloseConnection) and event.code == 1000
    assert h.owner.closed_streams() == [("stream_closed", "websocket", 1000)]
    assert h.stream.cancelled
    assert h.transport.closed and not h.transport.aborted
    assert h.owner.calls[-1] == ("connection_closed",)
    assert h.sink.closed and h.sink.send(b'{"a":1},')  # a closed sink takes and drops


async def test_client_message_over_the_limit_is_closed_1009(harnesses):
    h = WsHarness()
    harnesses.append(h)
    await h.upgrade()
    h.send(TextMessage(data="x" * 5000))
    await settle()
    [event] = h.events()
    assert isinstance(event, CloseConnection) and event.code == 1009
    assert h.owner.closed_streams() == [("stream_closed", "websocket", 1009)]
    assert h.stream.cancelled
    await h.lingers_then_closes()  # at once: what the client sends after is not read


async def test_small_client_messages_are_ignored(harnesses):
    h = WsHarness()
    harnesses.append(h)
    await h.upgrade()
    for _ in range(3):  # 3 x 3000 bytes: over the limit together, not one by one
        h.send(TextMessage(data="y" * 3000))
    await settle()
    assert h.events() == []
    assert h.owner.closed_streams() == []


async def test_unmasked_client_frame_is_closed_1002(harnesses):
    h = WsHarness()
    harnesses.append(h)
    await h.upgrade()
    h.feed(b"\x81\x05hello")  # FIN + text, no mask bit
    await settle()
    assert h.owner.closed_streams() == [("stream_closed", "websocket", 1002)]
    [event] = h.events()
    assert isinstance(event, CloseConnection) and event.code == 1002
    # Failed (RFC 6455 section 7.1.7): closed at once, no closing handshake awaited.
    await h.lingers_then_closes()


async def test_the_message_limit_counts_bytes_not_characters(harnesses):
    h = WsHarness()
    harnesses.append(h)
    await h.upgrade()
    h.send(TextMessage(data="\u00e9" * 2100))  # 2,100 characters, 4,200 bytes: over 4 KiB
    await settle()
    [event] = h.events()
    assert isinstance(event, CloseConnection) and event.code == 1009
    await h.lingers_then_closes()


async def test_pings_of_a_client_that_does_not_read_are_not_answered(harnesses):
    """Each pong would add to the output of a client that does not read; its stream is cut
    off for not keeping up instead (test_flush_clock)."""
    h = WsHarness()
    harnesses.append(h)
    await h.upgrade()
    h.conn.pause_writing()
    h.send(Ping(payload=b"p"))
    await settle()
    assert h.events() == []
    h.conn.resume_writing()
    h.send(Ping(payload=b"q"))
    await settle()
    assert h.events() == [Pong(payload=b"q")]


# --- WebSocket: the server's frames ------------------------------------------------------------


async def test_sink_sends_a_snapshot_then_prices(harnesses):
    h = WsHarness()
    harnesses.append(h)
    await h.upgrade()
    assert h.sink.send(b'{"a":1},') is True
    first = h.new_bytes()
    assert first == websocket_batch(1, b'{"a":1},', snapshot=True)
    assert h.sink.send(b'{"a":2},{"b":3},') is True
    h.client.receive_data(first)
    events = [*h.client.events(), *h.events()]
    assert all(isinstance(event, TextMessage) and event.message_finished for event in events)
    assert [json.loads(event.data) for event in events] == [
        {"type": "snapshot", "seq": 1, "updates": [{"a": 1}]},
        {"type": "prices", "seq": 2, "updates": [{"a": 2}, {"b": 3}]},
    ]


async def test_an_empty_snapshot(harnesses):
    h = WsHarness()
    harnesses.append(h)
    await h.upgrade()
    h.sink.send_snapshot(b"")
    h.sink.send_snapshot(b'{"a":1},')  # only the first frame is the snapshot
    [event] = h.events()
    assert isinstance(event, TextMessage)
    assert json.loads(event.data) == {"type": "snapshot", "seq": 1, "updates": []}


async def test_back_pressure_pauses_and_resumes_the_sink(harnesses):
    h = WsHarness()
    harnesses.append(h)
    await h.upgrade()
    woken: list[int] = []
    h.sink.on_writable(lambda: woken.append(1))
    assert h.transport.buffer_limits == (64 * 1024, 16 * 1024)
    h.conn.pause_writing()
    assert h.sink.blocked_since is not None
    assert h.sink.send(b'{"a":1},') is False
    h.conn.pause_writing()  # twice: still one pause
    h.conn.resume_writing()
    assert h.sink.blocked_since is None
    assert woken == [1]
    h.conn.resume_writing()  # not paused: nothing to wake
    assert woken == [1]
    assert h.sink.send(b'{"a":2},') is True


async def test_close_of_a_stalled_stream_aborts_at_once(harnesses):
    h = WsHarness()
    harnesses.append(h)
    await h.upgrade()
    h.conn.pause_writing()
    h.conn.close_stream(4008, "too slow")
    assert h.transport.aborted
    assert h.new_bytes() == b""  # nothing more is queued behind a client that does not read
    assert h.owner.closed_streams() == [("stream_closed", "websocket", 4008)]
    await settle()
    assert h.stream.cancelled and h.transport.lost


async def test_close_writes_a_close_frame_and_waits_for_the_answer(harnesses):
    h = WsHarness()
    harnesses.append(h)
    await h.upgrade()
    h.conn.close_stream(1000, "session closed")
    [event] = h.events()
    assert isinstance(event, CloseConnection)
    assert (event.code, event.reason) == (1000, "session closed")
    assert not h.transport.is_closing()  # the peer answers first
    assert h.owner.closed_streams() == [("stream_closed", "websocket", 1000)]
    h.feed(h.client.send(event.response()))
    await settle()
    assert h.transport.closed and not h.transport.aborted
    assert h.stream.cancelled
    assert h.owner.closed_streams() == [("stream_closed", "websocket", 1000)]  # once


async def test_close_without_an_answer_is_aborted_after_close_timeout(harnesses):
    h = WsHarness(WebLimits(close_timeout=0.05))
    harnesses.append(h)
    await h.upgrade()
    h.conn.close_stream(1001, "going away")
    await asyncio.sleep(0.02)
    assert not h.transport.is_closing()
    await wait_for(lambda: h.transport.aborted)


async def test_a_stream_that_the_application_ends_is_closed_1011(harnesses):
    h = WsHarness()
    harnesses.append(h)
    await h.upgrade()
    h.stream.release.set()
    await settle()
    [event] = h.events()
    assert isinstance(event, CloseConnection) and event.code == 1011
    assert h.owner.closed_streams() == [("stream_closed", "websocket", 1011)]


async def test_server_pings_and_closes_4001_without_a_pong(harnesses):
    h = WsHarness(WebLimits(ping_interval=0.05, pong_timeout=0.05))
    harnesses.append(h)
    await h.upgrade()
    await asyncio.sleep(0.03)
    assert h.events() == []
    received: list[Event] = []
    await wait_for(lambda: bool(received.extend(h.events()) or received))
    assert received == [Ping(payload=b"pricestream")]
    await wait_for(lambda: bool(received.extend(h.events()) or len(received) > 1))
    close = received[1]
    assert isinstance(close, CloseConnection) and close.code == 4001
    assert h.owner.closed_streams() == [("stream_closed", "websocket", 4001)]


async def test_a_pong_keeps_the_stream_open(harnesses):
    h = WsHarness(WebLimits(ping_interval=0.05, pong_timeout=0.05))
    harnesses.append(h)
    await h.upgrade()
    pings = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 0.35
    while loop.time() < deadline:
        for event in h.events():
            assert isinstance(event, Ping), event
            pings += 1
            h.send(event.response())
        await asyncio.sleep(0.005)
    assert pings >= 3
    assert h.owner.closed_streams() == []
    assert not h.transport.is_closing()


async def test_client_ping_flood_is_closed_1008(harnesses):
    h = WsHarness(WebLimits(client_ping_burst=3, client_pings_per_second=0.001))
    harnesses.append(h)
    await h.upgrade()
    for _ in range(4):
        h.send(Ping(payload=b"p"))
    events = h.events()
    assert events[:3] == [Pong(payload=b"p")] * 3
    assert isinstance(events[3], CloseConnection) and events[3].code == 1008


# --- Server-Sent Events ----------------------------------------------------------------------


async def test_event_stream_head_events_heartbeat_and_close(harnesses):
    stream = StreamApp("sse")
    h = Harness(stream, WebLimits(sse_heartbeat=0.05))
    harnesses.append(h)
    h.feed(b"GET /v1/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
    await settle()
    head, sep, rest = h.new_bytes().partition(b"\r\n\r\n")
    assert sep
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert b"content-type: text/event-stream; charset=utf-8" in lines
    assert b"x-accel-buffering: no" in lines
    assert b"cache-control: no-cache, no-store" in lines
    assert rest == b"retry: 2000\n\n"
    assert h.owner.calls == [("connection_opened",), ("stream_opened", "sse")]

    sink = stream.sink
    assert isinstance(sink, EventStreamSink)
    assert sink.send(b'{"ticker":"A","price":1.5},') is True
    data = h.new_bytes()
    assert (
        data
        == b'id: 1\ndata: {"type":"snapshot","seq":1,"updates":[{"ticker":"A","price":1.5}]}\n\n'
    )
    assert data == sse_batch(1, b'{"ticker":"A","price":1.5},', snapshot=True)
    payload = data.split(b"\n")[1].removeprefix(b"data: ")
    assert json.loads(payload)["updates"] == [{"ticker": "A", "price": 1.5}]
    sink.send(b'{"ticker":"B"},')
    assert h.new_bytes().startswith(b'id: 2\ndata: {"type":"prices","seq":2,')

    await wait_for(lambda: bytes(h.transport.data).endswith(b": heartbeat\n\n"))
    assert h.new_bytes() == b": heartbeat\n\n"

    h.conn.close_stream(1000, "session closed")
    data = h.new_bytes()
    event, _, payload = data.partition(b"\ndata: ")
    assert event == b"event: close"
    assert payload.endswith(b"\n\n")
    assert json.loads(payload) == {"type": "close", "code": 1000, "reason": "session closed"}
    assert h.transport.closed
    assert h.owner.closed_streams() == [("stream_closed", "sse", 1000)]
    await settle()
    assert stream.cancelled and h.transport.lost


async def test_stalled_event_stream_is_aborted_without_a_close_event(harnesses):
    stream = StreamApp("sse")
    h = Harness(stream)
    harnesses.append(h)
    h.feed(get("/v1/events"))
    await settle()
    h.new_bytes()
    h.conn.pause_writing()
    assert stream.sink is not None and stream.sink.send(b'{"a":1},') is False
    h.new_bytes()
    h.conn.close_stream(4008, "too slow")
    assert h.transport.aborted and h.new_bytes() == b""
    assert h.owner.closed_streams() == [("stream_closed", "sse", 4008)]


async def test_lost_event_stream_is_closed_1006(harnesses):
    stream = StreamApp("sse")
    h = Harness(stream)
    harnesses.append(h)
    h.feed(get("/v1/events"))
    await settle()
    h.finish()  # the peer went away
    await settle()
    assert h.owner.closed_streams() == [("stream_closed", "sse", 1006)]
    assert stream.cancelled


class LosesItsCancel:
    """A stream's handler that asks to be told when its stream is over, then loses the cancel
    of its task (as a library's ``wait_for`` can on Python 3.11) and waits on: only the
    ``on_stream_end`` callback can tell it that its client is gone. ``kind`` None: the request
    is still being worked on (its session claimed) when the connection goes (in a server, only
    by its own abort: reading is paused meanwhile, so a client's leaving is not seen)."""

    def __init__(self, kind: str | None) -> None:
        self.kind = kind
        self.told = 0
        self.lost_cancels = 0
        self.release = asyncio.Event()

    async def __call__(self, request: Request, exchange: WebConnection) -> None:
        exchange.on_stream_end(self.over)
        if self.kind == "websocket":
            exchange.accept_websocket(request, SUBPROTOCOL, [])
        elif self.kind == "sse":
            exchange.start_event_stream([])
        while not self.release.is_set():
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.lost_cancels += 1

    def over(self) -> None:
        self.told += 1


@pytest.mark.parametrize("kind", [None, "websocket", "sse"])
async def test_a_handler_whose_cancel_is_lost_is_still_told_its_stream_is_over(harnesses, kind):
    app = LosesItsCancel(kind)
    h = await stream_request(harnesses, app, kind)
    assert h.conn.mode == (kind or "http") and app.told == 0
    h.finish()  # the client went away
    await settle()
    assert (app.told, app.lost_cancels) == (1, 1)
    late: list[str] = []
    h.conn.on_stream_end(lambda: late.append("told"))  # asked after the end: told at once
    assert late == ["told"]
    app.release.set()
    await settle()
    assert app.told == 1


async def test_the_end_callback_of_an_answered_request_is_dropped(harnesses):
    told: list[str] = []

    async def answered(request: Request, exchange: WebConnection) -> None:
        exchange.on_stream_end(lambda: told.append(request.path))
        exchange.respond(Response.json(200, {}))

    h = Harness(answered)
    harnesses.append(h)
    h.feed(get("/first"))
    await settle()
    assert parse_responses(h.new_bytes())[0][0] == 200
    h.finish()  # keep-alive, then the connection goes: nothing of /first is left to end
    await settle()
    assert told == []


# --- frames.py and the JSON of an update -------------------------------------------------------


@pytest.mark.parametrize("length", [0, 125, 126, 65535, 65536, 70000])
def test_text_frame_header_lengths_read_by_a_client(length):
    payload = b"x" * length
    client = WsClient(ConnectionType.CLIENT)
    client.receive_data(text_frame_header(length) + payload)
    events = list(client.events())
    assert all(isinstance(event, TextMessage) for event in events)
    assert "".join(event.data for event in events) == payload.decode()  # type: ignore[attr-defined]
    assert events[-1].message_finished  # type: ignore[attr-defined]
    header = text_frame_header(length)
    assert len(header) == (2 if length < 126 else 4 if length < 65536 else 10)


@given(st.lists(st.binary(max_size=200).map(lambda b: b.hex().encode()), max_size=5))
@settings(max_examples=50, deadline=None)
def test_websocket_batch_is_one_text_frame_of_batch_json(parts):
    fragments = b"".join(b'"%s",' % part for part in parts)
    client = WsClient(ConnectionType.CLIENT)
    client.receive_data(websocket_batch(7, fragments))
    events = list(client.events())
    assert not any(isinstance(event, BytesMessage) for event in events)
    text = "".join(event.data for event in events)  # type: ignore[attr-defined]
    assert json.loads(text) == {
        "type": "prices",
        "seq": 7,
        "updates": [part.decode() for part in parts],
    }


def parse_fragment(fragment: bytes) -> PriceUpdate:
    assert fragment.endswith(b",")
    return json_format.Parse(fragment[:-1], PriceUpdate())


@pytest.mark.parametrize(
    "price",
    [0.0, -0.0, 1.5, 123.456, 5e-324, 1.7976931348623157e308, math.inf, -math.inf],
)
def test_json_fragment_special_prices(price):
    update = PriceUpdate(
        ticker="BTC-USD",
        price=price,
        published_at_unix_nanos=2**63 - 1,
        sequence=2**64 - 1,
    )
    assert parse_fragment(json_fragment(update)) == update
    assert json.loads(json_fragment(update)[:-1])["sequence"] == str(2**64 - 1)


def test_json_fragment_nan():
    update = PriceUpdate(ticker="X", price=math.nan, published_at_unix_nanos=1, sequence=1)
    parsed = parse_fragment(json_fragment(update))
    assert math.isnan(parsed.price)
    assert (parsed.ticker, parsed.published_at_unix_nanos, parsed.sequence) == ("X", 1, 1)


@given(
    ticker=st.from_regex(r"[A-Z0-9._-]{1,16}", fullmatch=True),
    price=st.floats(allow_nan=False, allow_infinity=False),
    published=st.integers(-(2**63), 2**63 - 1),
    sequence=st.integers(0, 2**64 - 1),
)
@settings(max_examples=300, deadline=None)
def test_json_fragment_round_trips_through_protobuf_json(ticker, price, published, sequence):
    update = PriceUpdate(
        ticker=ticker, price=price, published_at_unix_nanos=published, sequence=sequence
    )
    parsed = parse_fragment(json_fragment(update))
    assert parsed == update
    assert math.copysign(1.0, parsed.price) == math.copysign(1.0, price)


@given(
    seq=st.integers(min_value=2, max_value=10**9),
    sizes=st.lists(st.integers(min_value=1, max_value=70_000), min_size=1, max_size=3),
)
@settings(max_examples=200, deadline=None)
def test_inline_packing_is_websocket_batch(seq: int, sizes: list[int]) -> None:
    """The sink's hot path packs each frame itself: byte for byte what frames.py builds, on
    every side of the 126 and 65536 length boundaries."""
    payload = b"".join(b"x" * (size - 1) + b"," for size in sizes)
    written: list[bytes] = []
    sink = WebSocketSink(written.append)
    sink.seq = seq - 1
    assert sink.send(payload) is True
    assert written == [websocket_batch(seq, payload)]


# --- the request as the application sees it -------------------------------------------------


def test_request_targets_origin_and_absolute_form_segments_and_shown_path():
    """The path is kept as sent; each segment is decoded on its own, so an encoded '/' does
    not split a segment; the absolute form is routed by its path (RFC 9112 3.2.2); a path in
    a message shows only printable ASCII."""
    plain = Request.from_target(b"GET", b"/v1/sessions/ab%2Fws?x=1", [], b"", "127.0.0.1")
    assert (plain.path, plain.query) == ("/v1/sessions/ab%2Fws", "x=1")
    assert plain.segments == ["", "v1", "sessions", "ab/ws"]
    absolute = Request.from_target(b"GET", b"http://h:8080/v1/sessions?y=2", [], b"", "::1")
    assert (absolute.path, absolute.query, absolute.segments) == (
        "/v1/sessions",
        "y=2",
        ["", "v1", "sessions"],
    )
    assert Request.from_target(b"GET", b"http://h", [], b"", "::1").path == "/"
    # The target's authority is the host (RFC 9112 3.2.2); other schemes are no URL of ours.
    hosted = Request.from_target(b"GET", b"HTTP://u@a.example/x", [(b"host", b"b")], b"", "::1")
    assert hosted.header(b"host") == b"a.example" and hosted.header_list(b"host") == b"a.example"
    other = Request.from_target(b"GET", b"ftp://a.example/x", [], b"", "::1")
    assert other.path == "ftp://a.example/x"  # no route: 404
    control = Request.from_target(b"GET", b"/%0Ax\x01", [], b"", "::1")
    assert control.segments == ["", "\nx\x01"] and control.shown_path == "/%0Ax?"


async def test_100_continue_only_while_the_body_is_awaited(harnesses):
    """A client that sent ``Expect: 100-continue`` is told to go on once the head is taken
    and its body has not come; a body that came with the head gets no 100 (RFC 9110
    10.1.1)."""
    head = (
        b"POST /echo HTTP/1.1\r\nHost: pricestream\r\nExpect: 100-continue\r\n"
        b"Content-Length: 5\r\n\r\n"
    )
    h = Harness(echo_path)
    harnesses.append(h)
    h.feed(head)
    await settle()
    assert h.new_bytes() == b"HTTP/1.1 100 Continue\r\n\r\n"
    h.feed(b"hello")
    await settle()
    [(status, _, body)] = parse_responses(h.new_bytes())
    assert status == 200 and json.loads(body)["body"] == "hello"
    together = Harness(echo_path)
    harnesses.append(together)
    together.feed(head + b"hello")
    await settle()
    assert [status for status, _, _ in parse_responses(together.new_bytes())] == [200]
