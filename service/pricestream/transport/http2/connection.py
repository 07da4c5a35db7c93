"""One client connection: h2's protocol state, the calls on it, and one write per turn.

Every byte this connection sends goes through ``write`` into one list, h2's own output
(headers, SETTINGS and PING acknowledgements, WINDOW_UPDATE, RST_STREAM, GOAWAY) in the order
h2 produced it, and the DATA frames of ``ResponseStream`` beside it. The list is handed to the
socket once per event-loop turn, so the batches of every stream of a connection that a flush
makes due leave in a single write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import TYPE_CHECKING, Any

import grpc
from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    PingAckReceived,
    PingReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings

from pricestream.transport.budget import Budget
from pricestream.transport.http2.calls import ServerCall, TerminateReason
from pricestream.transport.http2.flow import ResponseStream
from pricestream.transport.http2.framing import parse_timeout
from pricestream.transport.http2.h2_internals import ServerH2
from pricestream.transport.http2.limits import Limits, PingPolicy

if TYPE_CHECKING:
    from pricestream.transport.http2.server import GrpcServer

log = logging.getLogger("pricestream.transport")

_CONFIG = H2Configuration(
    client_side=False,
    header_encoding=None,  # headers stay bytes: no decoding of every header of every call
    validate_outbound_headers=False,  # ours are built well-formed
    normalize_outbound_headers=False,
)
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HTTP1_METHODS = (b"GET ", b"POST ", b"HEAD ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ")
_HTTP1_BODY = b"this port serves gRPC over HTTP/2 (h2 or h2c) only\n"
_HTTP1_ANSWER = (
    b"HTTP/1.1 505 HTTP Version Not Supported\r\nContent-Type: text/plain\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(_HTTP1_BODY) + _HTTP1_BODY
)
_KEEPALIVE_PING = b"keepaliv"
_AFTER_GRACE = 1.0  # seconds calls get to end once told to, before the connection is closed


class _ServerH2(ServerH2):
    """h2's connection (with the uses of its internals, see h2_internals) and a note of the
    HEADERS it sends (for the ping-abuse rule)."""

    headers_sent = False  # HEADERS queued since the connection last flushed

    def send_headers(self, *args: Any, **kwargs: Any) -> None:
        super().send_headers(*args, **kwargs)
        self.headers_sent = True


class Connection(asyncio.Protocol):
    def __init__(self, server: GrpcServer) -> None:
        self._server = server
        self._limits: Limits = server.limits
        self.h2 = _ServerH2(_CONFIG)
        self.h2.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: self._limits.max_concurrent_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: self._limits.max_header_list_size,
                SettingCodes.INITIAL_WINDOW_SIZE: self._limits.initial_window_size,
                SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.h2.decoder.max_header_list_size = self._limits.max_header_list_size
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        # What goes to the socket at the end of this turn; a flush is scheduled whenever it
        # gets its first chunk (so: scheduled exactly while it is not empty).
        self.out: list[bytes | memoryview] = []
        self.data_queued = False  # DATA frames in out (for the ping-abuse rule)
        self.paused = False  # the socket's buffer is over its high-water mark
        # The largest DATA frame a stream may write now: the peer's SETTINGS_MAX_FRAME_SIZE,
        # 0 while paused or closed (one comparison on the hot path instead of three).
        self.frame_room = 0
        self._waiting: dict[int, ResponseStream] = {}  # blocked streams by id, in arrival order
        self.calls: dict[int, ServerCall] = {}
        # Streams the client reset whose call's handler has not ended yet: still in ``calls``
        # (its work bounded by Limits.max_calls), no longer a stream the client counts.
        self._ending: set[int] = set()
        self.peer = ""
        self._started = False  # first bytes seen
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._age_timer: asyncio.TimerHandle | None = None
        self._last_received = time.monotonic()
        self._ping_sent_at: float | None = None
        self._pings = PingPolicy(self._limits.min_ping_interval, self._limits.max_ping_strikes)
        self._early_resets = Budget(
            self._limits.early_resets_burst, self._limits.early_resets_per_second
        )
        self._settings_frames = Budget(
            self._limits.settings_burst, self._limits.settings_per_second
        )
        self.goaway_sent = False
        self.closed = False

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.set_write_buffer_limits(
            high=self._limits.write_buffer_high, low=self._limits.write_buffer_low
        )
        peername = transport.get_extra_info("peername")
        self.peer = _peer_string(peername)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
            log.debug("TLS client %s did not negotiate h2 (ALPN); closing", self.peer)
            transport.abort()
            return
        self._server.connection_opened(self)
        self.h2.initiate_connection()
        self.h2_output()
        self._update_frame_room()
        loop = self._loop
        self._handshake_timer = loop.call_later(
            self._limits.handshake_timeout, self._handshake_timed_out
        )
        self._keepalive_timer = loop.call_later(self._limits.keepalive_time, self._keepalive)
        age = self._limits.max_connection_age * random.uniform(0.9, 1.1)  # no thundering herd
        self._age_timer = loop.call_later(age, self._max_age_reached)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self._last_received = time.monotonic()
        if not self._started:
            self._started = True
            if data.startswith(_HTTP1_METHODS):
                self._answer_http1()
                return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            # h2 has queued a GOAWAY with the error code; send it and hang up.
            log.debug("HTTP/2 protocol error from %s: %s", self.peer, exc)
            self.h2_output()
            self.close()
            return
        # h2 has applied every frame of this read (SETTINGS included) before any event is
        # handled, so its answers to them (the SETTINGS ACK first) go out ahead of what the
        # handlers write. Otherwise DATA a raised SETTINGS_INITIAL_WINDOW_SIZE lets out would
        # precede the ACK: a client that applies its raised window on the ACK (python-h2) takes
        # it as a FLOW_CONTROL_ERROR, and h2spec 2.2.1's http2/6.9.2/1 skips it waiting for the
        # ACK, then times out (when HEADERS and that SETTINGS came in two reads).
        self.h2_output()
        for event in events:
            try:
                self._handle(event)
            except ProtocolError as exc:
                # h2 has already applied every frame of this read: a stream an event names may
                # be closed (reset, or a stream error) by a later frame. That stream is done.
                log.debug("event %s on a stream closed meanwhile: %s", type(event).__name__, exc)
            if self.closed:
                return
        if self._frame_too_long():
            self.go_away(ErrorCodes.FRAME_SIZE_ERROR, b"frame larger than SETTINGS_MAX_FRAME_SIZE")
            return
        self.h2_output()

    def _frame_too_long(self) -> bool:
        """Whether the frame h2 waits to complete announces more than our MAX_FRAME_SIZE.

        h2 checks a frame's length only once the whole frame is in, so a header announcing
        16 MiB would have it buffer 16 MiB of the peer's bytes first.
        """
        length = self.h2.pending_frame_length()
        return length is not None and length > self.h2.max_inbound_frame_size

    def _update_frame_room(self) -> None:
        self.frame_room = 0 if self.paused or self.closed else self.h2.max_outbound_frame_size

    def pause_writing(self) -> None:
        self.paused = True
        self._update_frame_room()
        if self._transport is not None:
            self._transport.pause_reading()  # floods of PINGs or SETTINGS wait with the rest

    def resume_writing(self) -> None:
        self.paused = False
        self._update_frame_room()
        if self._transport is not None and not self.closed:
            self._transport.resume_reading()
        self._drain_waiting()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._update_frame_room()
        for timer in (self._handshake_timer, self._keepalive_timer, self._age_timer):
            if timer is not None:
                timer.cancel()
        self.out.clear()
        self._waiting.clear()
        calls, self.calls = list(self.calls.values()), {}
        self._ending.clear()
        for call in calls:
            call.peer_gone()
        self._server.connection_closed(self)

    # --- output -------------------------------------------------------------------------

    def write(self, *chunks: bytes | memoryview) -> None:
        """Queue DATA frames (``ResponseStream``'s)."""
        self.data_queued = True
        self._queue(chunks)

    def schedule_flush(self) -> None:
        self._loop.call_soon(self._flush)

    def h2_output(self, stream_id: int = 0) -> None:
        """Take what h2 has queued to send; forget ``stream_id`` if it is now closed."""
        data = self.h2.data_to_send()
        if data:
            self._queue((data,))
        if stream_id:
            self.forget(stream_id)

    def _queue(self, chunks: tuple[bytes | memoryview, ...]) -> None:
        if not self.out:
            self.schedule_flush()
        self.out.extend(chunks)

    def _flush(self) -> None:
        out, self.out = self.out, []
        if out and self._transport is not None and not self.closed:
            # Only DATA or HEADERS excuse the client's next ping, as in gRPC: counting our own
            # PING ACKs would let a client that pings in lockstep ping forever.
            if self.data_queued or self.h2.headers_sent:
                self._pings.data_sent()
            self.data_queued = False
            self.h2.headers_sent = False
            self._transport.write(b"".join(out))

    def forget(self, stream_id: int) -> None:
        """Drop h2's state of a stream once it is closed both ways (see ``ServerH2``)."""
        self.h2.forget(stream_id)

    # --- flow control -------------------------------------------------------------------

    def wait_for_window(self, stream: ResponseStream) -> None:
        self._waiting[stream.stream_id] = stream

    def stop_waiting(self, stream: ResponseStream) -> None:
        self._waiting.pop(stream.stream_id, None)

    def _drain_waiting(self) -> None:
        for stream_id, stream in list(self._waiting.items()):
            if self.paused or self.h2.outbound_flow_control_window <= 0:
                return
            if stream.blocked_since is not None:
                stream.drain()
            if stream.blocked_since is None:
                self._waiting.pop(stream_id, None)

    # --- events -------------------------------------------------------------------------

    def _handle(self, event: Event) -> None:
        if isinstance(event, DataReceived):
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            call = self.calls.get(event.stream_id)
            if call is not None:
                call.receive(event.data)
        elif isinstance(event, WindowUpdated):
            if event.stream_id == 0:
                self._drain_waiting()
            else:
                stream = self._waiting.get(event.stream_id)
                if stream is not None:
                    stream.drain()
                    if stream.blocked_since is None:
                        self._waiting.pop(event.stream_id, None)
        elif isinstance(event, RequestReceived):
            self._on_request(event)
        elif isinstance(event, StreamEnded):
            call = self.calls.get(event.stream_id)
            if call is not None:
                call.end_of_requests()
            self.forget(event.stream_id)
        elif isinstance(event, StreamReset):
            self._on_reset(event)
        elif isinstance(event, PingReceived):
            if not self._pings.allow():
                self.go_away(ErrorCodes.ENHANCE_YOUR_CALM, b"too_many_pings")
        elif isinstance(event, PingAckReceived):
            if event.ping_data == _KEEPALIVE_PING:
                self._ping_sent_at = None
        elif isinstance(event, RemoteSettingsChanged):
            self._on_settings(event)
        elif isinstance(event, ConnectionTerminated):
            self.goaway_sent = True  # the client is leaving: no new calls, close when idle
            if not self.calls:
                self.close()

    def _on_settings(self, event: RemoteSettingsChanged) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if not self._settings_frames.take():
            self.go_away(ErrorCodes.ENHANCE_YOUR_CALM, b"too many SETTINGS frames")
            return
        self._update_frame_room()  # SETTINGS_MAX_FRAME_SIZE may have changed
        if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            self._drain_waiting()

    def _on_reset(self, event: StreamReset) -> None:
        # The stream is closed: it frees its slot of max_concurrent_streams at once, as the
        # client counts it. Its call stays in ``calls`` until the handler has ended
        # (``call_finished``), counted among the ending ones (bounded by Limits.max_calls).
        call = self.calls.get(event.stream_id)
        self.forget(event.stream_id)
        if call is None:
            return
        early = not call.stream.headers_sent and call.age() < self._limits.early_reset_age
        call.peer_gone()
        if not call.finished:
            self._ending.add(event.stream_id)
        if early and not self._early_resets.take():
            # Rapid reset (CVE-2023-44487): streams opened and cancelled at once, unanswered.
            # A client cancelling calls the server was slow to answer (its deadlines under
            # overload) is not one: those resets come late.
            self.go_away(ErrorCodes.ENHANCE_YOUR_CALM, b"too many streams reset early")

    def _on_request(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        h2_stream = self.h2.streams.get(stream_id)
        if h2_stream is None:
            return
        if h2_stream.closed:
            self.forget(stream_id)
            # Reset by the client in the read that opened it (HEADERS and RST_STREAM in one
            # packet): nothing to answer (h2 would refuse to send on it), no handler to start,
            # but an early reset all the same.
            if not self._early_resets.take():
                self.go_away(ErrorCodes.ENHANCE_YOUR_CALM, b"too many streams reset early")
            return
        stream = ResponseStream(self, h2_stream)  # type: ignore[arg-type]  # see ServerH2
        if self.goaway_sent:
            # Opened after our GOAWAY (its id is above the GOAWAY's last-stream-id) or the
            # client's: refused, not ignored, so the client knows at once that it was not
            # processed and may retry it elsewhere (RFC 9113 section 8.7).
            stream.reset(ErrorCodes.REFUSED_STREAM)
            return
        calls = len(self.calls)
        if (
            calls - len(self._ending) >= self._limits.max_concurrent_streams
            or calls >= self._limits.max_calls
        ):
            # The first cannot happen (h2 enforces the advertised limit on open streams); the
            # second only when the client has reset more streams than the limit whose handlers
            # are still ending: resetting and reopening cannot pile up handlers.
            stream.reset(ErrorCodes.REFUSED_STREAM)
            return
        pseudo: dict[bytes, bytes] = {}
        for key, value in event.headers:
            if key.startswith(b":") or key in (b"content-type", b"grpc-timeout"):
                pseudo[key] = value
        method = pseudo.get(b":method", b"")
        content_type = pseudo.get(b"content-type", b"")
        if method != b"POST" or not content_type.startswith(b"application/grpc"):
            self._answer_plain(stream, method)
            return
        path = pseudo.get(b":path", b"").decode("ascii", "replace")
        timeout: float | None = None
        raw_timeout = pseudo.get(b"grpc-timeout")
        if raw_timeout is not None:
            timeout = parse_timeout(raw_timeout)
            if timeout is None:
                stream.finish(grpc.StatusCode.INTERNAL, "malformed grpc-timeout header")
                return
        call = ServerCall(self._server, self, stream, path, event.headers, timeout)
        self.calls[stream_id] = call
        self._server.call_started()
        call.start()

    def call_finished(self, call: ServerCall) -> None:
        """Every call that ``_on_request`` counted ends here exactly once."""
        self._server.call_ended()
        stream_id = call.stream.stream_id
        if self.calls.get(stream_id) is call:
            del self.calls[stream_id]
            self._ending.discard(stream_id)
        if self.goaway_sent and not self.calls:
            self.close()

    # --- answers to what is not gRPC ------------------------------------------------------

    def _answer_plain(self, stream: ResponseStream, method: bytes) -> None:
        if method == b"POST":
            status = b"415"
            text = b"this server speaks gRPC: content-type must be application/grpc\n"
        else:
            status = b"405"
            text = b"this server speaks gRPC: use POST with application/grpc\n"
        stream.answer_plain(status, text)

    def _answer_http1(self) -> None:
        assert self._transport is not None
        self._transport.write(_HTTP1_ANSWER)
        self.close()

    # --- ending -------------------------------------------------------------------------

    def go_away(self, error_code: ErrorCodes, reason: bytes = b"") -> None:
        """Stop taking new calls; an error code also ends the connection at once.

        GOAWAY(NO_ERROR) is graceful: the calls already on the connection go on, the client's
        frames on them (DATA, WINDOW_UPDATE, PING) are processed as before, streams it opens
        from now on are refused, and the connection closes once no call is left. h2 would
        close its connection state as it sends a GOAWAY (then every later frame of the
        client's is a ProtocolError), so this one is written past its state machine.
        """
        if self.closed:
            return
        if error_code == ErrorCodes.NO_ERROR:
            if not self.goaway_sent:
                self.goaway_sent = True
                self.h2.graceful_goaway(reason)
                self.h2_output()
        else:
            self.goaway_sent = True
            with contextlib.suppress(ProtocolError):
                self.h2.close_connection(error_code=error_code, additional_data=reason or None)
            self.h2_output()
        if error_code != ErrorCodes.NO_ERROR:
            log.info(
                "closing connection from %s: %s",
                self.peer,
                reason.decode(errors="replace") or error_code.name,
                extra={"event": "connection_refused", "reason": error_code.name},
            )
            self.close()
        elif not self.calls:
            self.close()

    def terminate_calls(self, code: grpc.StatusCode, message: str, reason: TerminateReason) -> None:
        """End every call on this connection now with ``code`` (age grace over, shutdown)."""
        for call in list(self.calls.values()):
            call.terminate(code, message, reason)

    def close(self) -> None:
        """Send what is queued, then close the socket."""
        if self.closed:
            return
        self.closed = True
        self._update_frame_room()
        transport = self._transport
        if transport is None:
            return
        out, self.out = self.out, []
        if out:
            transport.write(b"".join(out))
        transport.close()

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        log.debug("client %s did not complete the HTTP/2 handshake; closing", self.peer)
        self.close()

    def _keepalive(self) -> None:
        limits = self._limits
        now = time.monotonic()
        if self._ping_sent_at is not None and now - self._ping_sent_at > limits.keepalive_timeout:
            log.info(
                "client %s did not answer a keepalive ping within %gs; closing",
                self.peer,
                limits.keepalive_timeout,
                extra={"event": "connection_dead"},
            )
            self.close()
            return
        if self._ping_sent_at is None and now - self._last_received >= limits.keepalive_time:
            self._ping_sent_at = now
            self.h2.ping(_KEEPALIVE_PING)
            self.h2_output()
        self._keepalive_timer = self._loop.call_later(
            min(limits.keepalive_time, limits.keepalive_timeout), self._keepalive
        )

    def _max_age_reached(self) -> None:
        self._age_timer = None
        if self.closed:
            return
        grace = self._limits.max_connection_age_grace
        self.go_away(ErrorCodes.NO_ERROR)
        self._age_timer = self._loop.call_later(grace, self._age_grace_over)

    def _age_grace_over(self) -> None:
        self._age_timer = None
        self.terminate_calls(
            grpc.StatusCode.UNAVAILABLE,
            "connection reached its maximum age; resume the session on another server",
            "max_connection_age",
        )
        if not self.closed:
            # Calls end in a later turn (their handlers see the cancellation); the connection
            # closes as the last one does (call_finished). One that does not end in time (its
            # trailers behind DATA a client never makes room for) is cut off with the socket.
            self._age_timer = self._loop.call_later(_AFTER_GRACE, self.close)


def _peer_string(peername: object) -> str:
    """gRPC's spelling of a peer address: ``ipv4:1.2.3.4:5`` or ``ipv6:[::1]:5``."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        if ":" in str(host):
            return f"ipv6:[{host}]:{port}"
        return f"ipv4:{host}:{port}"
    return "unknown"
