"""One browser-side TCP connection: HTTP/1.1 requests (h11), then possibly one stream.

A connection starts in HTTP mode: h11 parses each request (head within ``head_timeout``, head
and body bounded), the application answers it in a task of its own, and keep-alive moves on to
the next one. A request may turn the connection into a stream for the rest of its life:

- a WebSocket (``accept_websocket``): wsproto validates the upgrade, writes the 101 and from
  then on parses the client's frames (pings answered within a budget, pongs awaited, data
  frames ignored up to ``max_client_message`` bytes, a close answered); the server's frames are
  written by the stream's sink (``sinks.py``);
- an event stream (``start_event_stream``): the SSE head is written, the body is the sink's
  events until the connection closes.

Every way out of a stream (the peer's close frame, a lost connection, a missed pong, a
protocol error, the server's own close) ends in ``_end_stream`` once, which tells the
application (the callback its handler gave ``on_stream_end``) and cancels the handler's task:
the task's ``finally`` (the stream's lifecycle) is the one place its session is given back,
whatever ended it. The cancel alone is not enough: on Python 3.11 a library's ``wait_for`` can
swallow it (see ``pricestream.tasks``), and a handler that went on would then serve a socket
that is gone, holding its session for good. A connection lost before its stream began tells
the callback too (the server aborting it while the request's handler still claims the
session: a client's own leaving is not seen then, as reading is paused).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any, Literal, Protocol, cast

import h11
from wsproto.connection import Connection as WsConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.events import (
    Request as WsRequest,
)
from wsproto.handshake import H11Handshake
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from pricestream.transport.budget import Budget
from pricestream.transport.web.frames import close_reason
from pricestream.transport.web.http import Request, Response, reason_phrase
from pricestream.transport.web.limits import WebLimits
from pricestream.transport.web.sinks import EventStreamSink, StreamSink, WebSocketSink

log = logging.getLogger("pricestream.web")

Mode = Literal["http", "websocket", "sse", "closed"]
ABNORMAL_CLOSURE = 1006  # no close frame was received (RFC 6455 section 7.1.5)
PROTOCOL_ERROR = 1002
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
NO_PONG = 4001


class WebApplication(Protocol):
    """What answers the requests of the web port (``pricestream.api.web``)."""

    async def handle(self, request: Request, exchange: WebConnection) -> None:
        """Answer ``request``: ``exchange.respond`` once, or turn the connection into a stream
        (``accept_websocket`` / ``start_event_stream``) and serve it until it ends."""
        ...


class ConnectionOwner(Protocol):
    """What a connection needs of its server (``server.WebServer``)."""

    @property
    def app(self) -> WebApplication: ...

    @property
    def limits(self) -> WebLimits: ...

    def connection_opened(self, conn: WebConnection) -> None: ...

    def connection_closed(self, conn: WebConnection) -> None: ...

    def stream_opened(self, conn: WebConnection, kind: Literal["websocket", "sse"]) -> None: ...

    def stream_closed(
        self, conn: WebConnection, kind: Literal["websocket", "sse"], code: int
    ) -> None: ...


def _peer_ip(peername: object) -> str:
    if isinstance(peername, tuple) and peername:
        return str(peername[0])
    return "unknown"


class WebConnection(asyncio.Protocol):
    def __init__(self, owner: ConnectionOwner) -> None:
        self._owner = owner
        self._limits = owner.limits
        self.mode: Mode = "http"
        self.transport: asyncio.Transport | None = None
        self.peer = "unknown"
        self._h11: h11.Connection | None = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self._limits.max_head_bytes
        )
        self._head: h11.Request | None = None
        self._handshake: H11Handshake | None = None  # of a validated upgrade request
        self._head_request = False  # the request being answered is a HEAD
        self._body = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        # Armed by _close: the connection is dropped if its output has not left by then. Its
        # own handle, so no other timer (idle, ping) can replace it.
        self._abort_timer: asyncio.TimerHandle | None = None
        # The head timer runs (from the connection or a request's first byte to its head):
        # later bytes of the same head do not restart it.
        self._head_due = False
        # Our FIN is sent and the client's input is read and dropped until its own: a close
        # after a refusal, so that unread input does not make the kernel answer with a reset
        # that destroys the refusal before the client read it.
        self._lingering = False
        self._peer_eof = False  # the client's FIN has been read
        self._reading_paused = False
        # HTTP mode: the client does not read its answers (the transport's output is over its
        # high-water mark); no further request is read or parsed until it drained.
        self._write_paused = False
        # Stream state (a WebSocket or an event stream).
        self.sink: StreamSink | None = None
        self._ws: WsConnection | None = None
        self._pings: Budget | None = None
        self._pong_timer: asyncio.TimerHandle | None = None
        self._client_message_bytes = 0
        self.close_code: int | None = None  # the stream's close code, once it is ending
        self._stream_ended = False
        # The running handler's callback for the end of its stream (on_stream_end).
        self._on_stream_end: Callable[[], None] | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        self.peer = _peer_ip(transport.get_extra_info("peername"))
        if self._limits.send_buffer_bytes is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._limits.send_buffer_bytes)
        transport.set_write_buffer_limits(
            high=self._limits.write_buffer_high, low=self._limits.write_buffer_low
        )
        self._owner.connection_opened(self)
        self._start_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # dropped: the connection is closing (see _linger)
        if self.mode == "http":
            self._http_data(data)
        elif self.mode == "websocket":
            self._ws_data(data)
        elif self.mode == "sse" and len(data) > self._limits.max_client_message:
            self._abort()  # an event stream's client has nothing to say

    def eof_received(self) -> bool:
        """The client sent its FIN. A request it sent before is still answered (``nc`` and
        other clients half-close after their request); a stream ends (1006: no close frame).
        The close is ours, not the transport's: bounded like every close."""
        self._peer_eof = True
        if self.mode == "http" and self._h11 is not None:
            self._http_data(b"")
            if self._task is not None:
                return True  # the EOF is taken after its answer (_task_done parses on)
        elif self.mode in ("websocket", "sse"):
            self._end_stream(ABNORMAL_CLOSURE if self.close_code is None else self.close_code)
        self._close()
        return True

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.pause()
            return
        # No stream (yet): pipelined requests whose answers the client does not read would
        # each add an answer to the buffer, without a bound: read no more until it drained.
        # A stream that starts meanwhile begins paused (_attach).
        self._write_paused = True
        if self.mode == "http":
            self._pause_reading()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.resume()
            return
        if not self._write_paused:
            return
        self._write_paused = False
        conn = self._h11
        closing = self.transport is None or self.transport.is_closing()
        if self.mode == "http" and conn is not None and conn.our_state is h11.IDLE and not closing:
            # The last answer is out (its handler may still be finishing): read on.
            self._resume_reading()
            if self._task is None:
                asyncio.get_running_loop().call_soon(self._resume_http)

    def connection_lost(self, exc: Exception | None) -> None:
        self.mode_closed()
        self._cancel_timer()
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        if self._pong_timer is not None:
            self._pong_timer.cancel()
            self._pong_timer = None
        self._tell_stream_over()  # also in HTTP mode: a handler may be starting its stream
        if self._task is not None and not self._task.done() and not self._stream_ended:
            # (A stream's end cancelled it already: a second cancel would interrupt what its
            # first set going, e.g. the lease given back after a claim in flight.)
            self._task.cancel()
        self._owner.connection_closed(self)
        self.transport = None

    def mode_closed(self) -> None:
        if self.mode in ("websocket", "sse"):
            self._end_stream(ABNORMAL_CLOSURE if self.close_code is None else self.close_code)
        self.mode = "closed"

    # --- HTTP/1.1 -------------------------------------------------------------------------

    def _http_data(self, data: bytes) -> None:
        conn = self._h11
        assert conn is not None
        starts = conn.their_state is h11.IDLE and self._head is None and self._task is None
        if data and starts and not self._head_due:
            self._start_head_timer()  # the first bytes of a request
        conn.receive_data(data)
        self._parse()

    def _parse(self) -> None:
        """Take the requests received so far, one at a time; a request that cannot be taken
        is answered with its status and the connection closed, whatever failed."""
        try:
            self._next_events()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            if status == 400 and "buffer" in str(exc).lower():
                status = 431
            self._refuse_malformed(status, str(exc))
        except Exception:  # a request nothing above foresaw must not leave the connection stuck
            log.exception("could not take a web request from %s", self.peer)
            self._refuse_malformed(400, "the request could not be parsed")

    def _next_events(self) -> None:
        conn = self._h11
        while conn is not None and self._task is None and self.mode == "http":
            if self._write_paused:
                return  # not even a request answered at once (a bad handshake): resume_writing
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if self._head is not None and conn.they_are_waiting_for_100_continue:
                    # The head is taken and its body has not come: the client sends it only
                    # once told to go on (RFC 9110 section 10.1.1).
                    assert self.transport is not None
                    self.transport.write(
                        conn.send(
                            h11.InformationalResponse(
                                status_code=100, headers=[], reason=b"Continue"
                            )
                        )
                    )
                return
            if event is h11.PAUSED:
                self._pause_reading()  # pipelined requests wait their turn
                return
            if isinstance(event, h11.Request):
                self._on_head(event)
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > self._limits.max_body_bytes:
                    self._refuse_malformed(413, "request body is too large")
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._on_request()
            elif isinstance(event, h11.ConnectionClosed):
                self._close()
                return

    def _on_head(self, head: h11.Request) -> None:
        # The head is complete; its body (bounded in size) must follow within head_timeout.
        self._head_due = False
        self._arm_timer(self._limits.head_timeout, self._body_timed_out)
        # h11 bounds a head still arriving; one that arrived whole in a read is measured here.
        size = len(head.target) + sum(len(n) + len(v) + 4 for n, v in head.headers)
        if size > self._limits.max_head_bytes:
            self._refuse_malformed(431, "request head is too large")
            return
        self._head = head
        self._body = bytearray()
        for name, value in head.headers:
            if name == b"content-length" and int(value) > self._limits.max_body_bytes:
                self._refuse_malformed(413, "request body is too large")
                return

    def _on_request(self) -> None:
        head = self._head
        if head is None or self._h11 is None:
            return  # the request was refused already
        self._head = None
        self._cancel_timer()  # the body is complete
        self._head_request = head.method == b"HEAD"
        self._handshake = None  # a handshake is this request's, never a previous one's
        handshake_error = None
        if _is_websocket_upgrade(head):
            handshake = _validated_handshake(head)
            if isinstance(handshake, tuple):
                handshake_error = handshake  # the application answers it, and counts it
            else:
                self._handshake = handshake
        request = Request.from_target(
            head.method,
            head.target,
            list(head.headers),
            bytes(self._body),
            self.peer,
            websocket=self._handshake is not None,
            handshake_error=handshake_error,
        )
        self._body = bytearray()
        self._run(self._owner.app.handle(request, self))

    def _run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._task = task
        task.add_done_callback(self._task_done)
        # One request at a time: nothing more is read while its handler runs (h11 would
        # buffer whatever the client sends meanwhile, without a bound). Reading resumes
        # with the answer, or when the connection becomes a stream.
        self._pause_reading()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if self._task is task:
            self._task = None
            self._on_stream_end = None  # it was that handler's
        if not task.cancelled() and task.exception() is not None:
            log.error("web request handler failed", exc_info=task.exception())
        if self.mode == "http":
            if self._h11 is not None and self._h11.our_state is h11.SEND_RESPONSE:
                self.respond(Response.error(500, "internal", "the request was not answered"))
            else:
                self._resume_http()  # requests pipelined behind this one
            return
        if self.mode in ("websocket", "sse") and not self._stream_ended:
            # The application's stream ended without closing it: an internal error.
            self.close_stream(1011, "internal error")

    def respond(self, response: Response) -> None:
        """Answer the current request (HTTP mode); keep-alive goes on to the next one."""
        conn = self._h11
        if conn is None or self.transport is None or conn.our_state is not h11.SEND_RESPONSE:
            return
        headers = [*response.headers]
        if response.status not in (204, 304):  # never a Content-Length (RFC 9110 8.6)
            headers.insert(0, (b"content-length", b"%d" % len(response.body)))
        if response.content_type:
            headers.insert(0, (b"content-type", response.content_type))
        try:
            out = conn.send(
                h11.Response(
                    status_code=response.status,
                    headers=headers,
                    reason=reason_phrase(response.status),
                )
            )
            # A HEAD request's answer: the GET's headers, its length included, no content.
            if response.body and not self._head_request:
                out += conn.send(h11.Data(data=response.body))
            out += conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            log.warning("could not answer a web request: %s", exc)
            self._abort()
            return
        self.transport.write(out)
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            self._close()
            return
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            self._head_due = False
            self._arm_timer(self._limits.idle_timeout, self._close)
            if self._write_paused:
                return  # the next request is read once the client has read this answer
            self._resume_reading()
            if self._task is None:  # answered outside a handler's task: parse on now
                asyncio.get_running_loop().call_soon(self._resume_http)
            # Otherwise pipelined bytes already received are parsed once the task has ended
            # (_task_done): one request at a time.

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def _resume_http(self) -> None:
        conn = self._h11
        if self.mode != "http" or self._task is not None or conn is None:
            return
        if self._write_paused:
            return  # resume_writing parses on
        if self.transport is None or self.transport.is_closing():
            return  # closed meanwhile: nothing more is answered
        if conn.their_state is h11.IDLE and not self._head_due and conn.trailing_data[0]:
            self._start_head_timer()  # a request that began arriving during the last answer
        self._parse()

    def _refuse_malformed(self, status: int, detail: str) -> None:
        """Answer a request h11 could not take with its status and one sentence, then close."""
        message = {
            408: "request body did not arrive in time",
            413: "request body is too large",
            431: "request head is too large",
        }.get(status, f"malformed HTTP request: {detail}")
        body = Response.error(status, "bad_request", message)
        self.mode = "closed"  # nothing more is parsed or answered on this connection
        self._h11 = None
        if self.transport is not None:
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n"
                % (status, reason_phrase(status), len(body.body))
                + body.body
            )
        self._linger()

    def _start_head_timer(self) -> None:
        """The request's head must be complete within head_timeout from now."""
        self._arm_timer(self._limits.head_timeout, self._head_timed_out)
        self._head_due = True

    def _head_timed_out(self) -> None:
        self._timer = None
        if self.mode == "http" and self._task is None:
            log.debug("closing a web connection that sent no request in time")
            self._close()

    def _body_timed_out(self) -> None:
        self._timer = None
        if self.mode == "http" and self._task is None and self._head is not None:
            self._refuse_malformed(408, "")

    # --- streams ----------------------------------------------------------------------------

    def accept_websocket(
        self, request: Request, subprotocol: str | None, extra_headers: list[tuple[bytes, bytes]]
    ) -> WebSocketSink:
        """Write the 101 for the current (validated) upgrade request; the connection is a
        WebSocket from now on and ``WebSocketSink`` its server side."""
        handshake = self._handshake
        assert self.mode == "http" and self._h11 is not None and self.transport is not None
        assert request.websocket and handshake is not None
        self._handshake = None
        accept = AcceptConnection(subprotocol=subprotocol, extra_headers=extra_headers)
        self.transport.write(handshake.send(accept))
        ws = handshake.connection
        assert ws is not None
        trailing, _ = self._h11.trailing_data
        self._h11 = None  # HTTP is over on this connection
        self._ws = ws
        self._pings = Budget(self._limits.client_ping_burst, self._limits.client_pings_per_second)
        self.mode = "websocket"
        self._cancel_timer()
        sink = WebSocketSink(self.transport.write)
        self._attach(sink)
        self._owner.stream_opened(self, "websocket")
        self._arm_timer(self._limits.ping_interval, self._ping)
        self._resume_reading()
        if trailing:
            self._ws_data(bytes(trailing))
        return sink

    def start_event_stream(self, extra_headers: list[tuple[bytes, bytes]]) -> EventStreamSink:
        """Write the head of an SSE response (read until close); the connection carries that
        stream from now on and ``EventStreamSink`` writes its events."""
        assert self.mode == "http" and self._h11 is not None and self.transport is not None
        head = [
            b"HTTP/1.1 200 OK",
            b"content-type: text/event-stream; charset=utf-8",
            b"cache-control: no-cache, no-store",
            b"x-accel-buffering: no",  # nginx: do not buffer this response
            b"connection: close",
        ]
        head += [name + b": " + value for name, value in extra_headers]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n")
        self._h11 = None
        self.mode = "sse"
        self._cancel_timer()
        sink = EventStreamSink(self.transport.write, self._limits.sse_retry_ms)
        self._attach(sink)
        self._owner.stream_opened(self, "sse")
        self._arm_timer(self._limits.sse_heartbeat, self._heartbeat)
        self._resume_reading()
        return sink

    def _attach(self, sink: StreamSink) -> None:
        """The stream's sink from now on; paused if the output is over its high-water mark
        already (the transport says so once per crossing: before the sink, or while the
        101, the SSE head or its first event was written)."""
        self.sink = sink
        if self._write_paused:
            self._write_paused = False
            sink.pause()

    def on_stream_end(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the stream the running handler serves is over: closed by
        either side, or its connection lost (even before ``accept_websocket`` or
        ``start_event_stream``); at once if that has happened already. How a handler ends its
        stream for sure: the cancel of its task that comes with it can be lost (module doc)."""
        if self._stream_ended or self.transport is None:  # ended, or the connection lost
            callback()
        else:
            self._on_stream_end = callback

    def _tell_stream_over(self) -> None:
        callback, self._on_stream_end = self._on_stream_end, None
        if callback is not None:
            callback()

    def close_stream(self, code: int, reason: str) -> None:
        """End the stream with ``code`` (WebSocket: a close frame, then the TCP close once the
        peer answered or ``close_timeout`` passed; SSE: a last ``close`` event). A client
        that does not read (its output over the high-water mark) cannot receive either: its
        connection is dropped at once, and its buffered output freed with it."""
        if self._stream_ended or self.transport is None:
            return
        sink = self.sink
        stalled = sink is not None and sink.blocked_since is not None
        if self.mode == "websocket" and self._ws is not None:
            try:
                data = self._ws.send(CloseConnection(code=code, reason=close_reason(reason)))
            except LocalProtocolError:
                data = b""  # closing already
            self._end_stream(code)
            if stalled:
                self._abort()
                return
            if data:
                self.transport.write(data)
            if self._ws.state is ConnectionState.CLOSED:
                self._close()
            else:
                self._arm_timer(self._limits.close_timeout, self._abort)
        elif self.mode == "sse":
            assert isinstance(sink, EventStreamSink)
            self._end_stream(code)
            if stalled:
                self._abort()
                return
            sink.write_close(code, reason)
            self._close()

    def _end_stream(self, code: int) -> None:
        """The one place a stream ends: its code recorded and counted, its sink closed, the
        application told and its stream task cancelled (its lifecycle gives the session
        back)."""
        if self._stream_ended:
            return
        self._stream_ended = True
        self.close_code = code
        kind: Literal["websocket", "sse"] = "websocket" if self.mode == "websocket" else "sse"
        if self.sink is not None:
            self.sink.close()
        if self._pong_timer is not None:
            self._pong_timer.cancel()
            self._pong_timer = None
        self._owner.stream_closed(self, kind, code)
        self._tell_stream_over()
        task = self._task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()

    # --- WebSocket: the client's frames, pings ------------------------------------------------

    def _ws_data(self, data: bytes) -> None:
        ws = self._ws
        if ws is None or ws.state is ConnectionState.CLOSED:
            return
        try:
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, (TextMessage, BytesMessage)):
                    data = event.data
                    size = len(data.encode() if isinstance(data, str) else data)
                    self._client_message_bytes += size
                    if self._client_message_bytes > self._limits.max_client_message:
                        self._fail(MESSAGE_TOO_BIG, "client messages are ignored; too big")
                        return
                    if event.message_finished:
                        self._client_message_bytes = 0
                elif isinstance(event, Ping):
                    assert self._pings is not None
                    if not self._pings.take():
                        self._fail(POLICY_VIOLATION, "too many pings")
                        return
                    sink = self.sink
                    # A client that does not read is sent no pongs either (its buffer would
                    # grow with each): its stream's writer is cut off for not keeping up.
                    reading = sink is None or sink.blocked_since is None
                    open_ = ws.state is ConnectionState.OPEN
                    if self.transport is not None and open_ and reading:
                        self.transport.write(ws.send(event.response()))
                elif isinstance(event, Pong):
                    if self._pong_timer is not None:
                        self._pong_timer.cancel()
                        self._pong_timer = None
                        self._arm_timer(self._limits.ping_interval, self._ping)
                elif isinstance(event, CloseConnection):
                    self._peer_closed(ws, event)
                    return
        except (RemoteProtocolError, LocalProtocolError) as exc:
            log.debug("WebSocket protocol error from %s: %s", self.peer, exc)
            self._fail(PROTOCOL_ERROR, "protocol error")

    def _fail(self, code: int, reason: str) -> None:
        """Fail the WebSocket connection (RFC 6455 section 7.1.7): the close frame, then the
        TCP close at once; nothing the client sends after is read (the parser may be broken,
        and a client that broke the rules gets no closing handshake to wait for)."""
        self.close_stream(code, reason)
        self._linger()

    def _peer_closed(self, ws: WsConnection, event: CloseConnection) -> None:
        if ws.state is ConnectionState.OPEN:
            # wsproto's report of a frame it could not parse (unmasked, bad UTF-8, ...): the
            # close it wants sent, with its code (1002, 1007, ...).
            self._fail(int(event.code), "protocol error")
            return
        if ws.state is ConnectionState.REMOTE_CLOSING:
            # The client closed first: answer with its code, then end the TCP connection.
            if self.transport is not None:
                self.transport.write(ws.send(event.response()))
            self._end_stream(int(event.code))
            self._close()
        else:
            # The answer to our close frame: the closing handshake is complete.
            self._close()

    def _ping(self) -> None:
        self._timer = None
        ws = self._ws
        if ws is None or ws.state is not ConnectionState.OPEN or self.transport is None:
            return
        self.transport.write(ws.send(Ping(payload=b"pricestream")))
        self._pong_timer = asyncio.get_running_loop().call_later(
            self._limits.pong_timeout, self._no_pong
        )

    def _no_pong(self) -> None:
        self._pong_timer = None
        self.close_stream(NO_PONG, "no pong")

    def _heartbeat(self) -> None:
        self._timer = None
        sink = self.sink
        if self.mode != "sse" or sink is None or self._stream_ended:
            return
        assert isinstance(sink, EventStreamSink)
        sink.heartbeat()
        self._arm_timer(self._limits.sse_heartbeat, self._heartbeat)

    # --- timers and closing ---------------------------------------------------------------

    def _arm_timer(self, delay: float, callback: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(delay, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _close(self) -> None:
        """Close after what is buffered has been written, within ``close_timeout``: a client
        that does not read would otherwise keep the socket and its buffered output for good
        (TCP's zero-window probes keep the connection alive)."""
        transport = self.transport
        if transport is None:
            return
        if not transport.is_closing():
            transport.close()
        self._arm_abort()

    def _linger(self) -> None:
        """Close after a refusal (400, 408, 413, 431) or a failed WebSocket (1002-1009): our
        FIN after what is buffered, then the client's input read and dropped until its FIN,
        within ``close_timeout``. Closed with input unread (the rest of an oversized body or
        message), the socket would answer the client with a reset, which can destroy the
        refusal before the client has read it."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._lingering:
            return
        if self._peer_eof or not transport.can_write_eof():
            self._close()  # no input is left to read (or no half-close to wait with)
            return
        self._lingering = True
        transport.write_eof()
        self._resume_reading()
        self._arm_abort()

    def _arm_abort(self) -> None:
        """Drop the connection ``close_timeout`` from the first close, whatever happens."""
        if self._abort_timer is None:
            self._abort_timer = asyncio.get_running_loop().call_later(
                self._limits.close_timeout, self._abort
            )

    def _abort(self) -> None:
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    def abort(self) -> None:
        """Drop the connection now (server shutdown)."""
        self._abort()

    @property
    def idle(self) -> bool:
        """In HTTP mode between requests: nothing is lost by closing it."""
        return self.mode == "http" and self._task is None and self._head is None


def _is_websocket_upgrade(head: h11.Request) -> bool:
    upgrade = connection = False
    for name, value in head.headers:
        if name == b"upgrade" and value.lower() == b"websocket":
            upgrade = True
        elif name == b"connection" and b"upgrade" in value.lower():
            connection = True
    return upgrade and connection


def _valid_key(key: bytes) -> bool:
    """A Sec-WebSocket-Key is a random 16-byte value in base64 (RFC 6455 section 4.1)."""
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except ValueError:
        return False


def _validated_handshake(
    head: h11.Request,
) -> H11Handshake | tuple[int, str, list[tuple[bytes, bytes]]]:
    """wsproto's server handshake for an upgrade request, or why the request is not a valid
    WebSocket handshake (status, sentence, headers). wsproto's own validation decides."""
    if head.method != b"GET":
        return 405, "a WebSocket handshake is a GET request", [(b"allow", b"GET")]
    if head.http_version != b"1.1":
        return 400, "a WebSocket handshake is an HTTP/1.1 request", []
    keys = [value for name, value in head.headers if name == b"sec-websocket-key"]
    if len(keys) > 1:
        return 400, "invalid WebSocket handshake: more than one Sec-WebSocket-Key", []
    if keys and not _valid_key(keys[0]):
        return 400, "invalid WebSocket handshake: Sec-WebSocket-Key is not 16 bytes in base64", []
    handshake = H11Handshake(ConnectionType.SERVER)
    try:
        handshake.initiate_upgrade_connection(list(head.headers), head.target)
        events = list(handshake.events())
    except RemoteProtocolError as exc:
        hint = exc.event_hint
        status = getattr(hint, "status_code", 400) or 400
        if status == 426:  # the version we do not speak (RFC 6455 section 4.4)
            return (
                426,
                "invalid WebSocket handshake: Sec-WebSocket-Version must be 13",
                [
                    (b"sec-websocket-version", b"13"),
                    (b"upgrade", b"websocket"),
                    (b"connection", b"Upgrade"),
                ],
            )
        return status, f"invalid WebSocket handshake: {exc}", []
    except UnicodeError:  # wsproto decodes the Host header as IDNA
        return 400, "invalid WebSocket handshake: the Host header is not a valid host name", []
    except (h11.ProtocolError, ValueError) as exc:  # wsproto re-reading the head
        return 400, f"invalid WebSocket handshake: {exc}", []
    if len(events) != 1 or not isinstance(events[0], WsRequest):
        return 400, "invalid WebSocket handshake", []
    return handshake
