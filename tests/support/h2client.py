"""A small raw HTTP/2 client on `h2` over asyncio streams, for tests that speak to the gRPC port
frame by frame (conformance, flow control, abuse).

`h2` keeps the connection state (streams, flow-control windows, HPACK); the helpers here send
gRPC requests through it and collect what comes back per stream. For frames `h2` would refuse to
send (floods, garbage, a second preface), `send_frame` and `send_raw` write bytes past it: `h2`
then knows nothing of them, so use them last on a connection, or on stream ids `h2` never opened,
and build header blocks with `header_block` (the connection's own HPACK encoder) to keep the
server's HPACK state in step with ours.

    async with await H2Client.connect("127.0.0.1", port) as client:
        stream_id = await client.send_grpc_request(PATH, request)
        result = await client.response(stream_id)
        assert result.grpc_status == 0
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType

import h2.config
import h2.connection
import h2.events
import h2.settings
from google.protobuf.message import Message
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame

Headers = list[tuple[str, str]]

READ_SIZE = 65536


def grpc_message(payload: bytes | Message, *, compressed: bool = False) -> bytes:
    """One gRPC length-prefixed message: compressed flag, 4-byte big-endian length, bytes."""
    body = payload.SerializeToString() if isinstance(payload, Message) else payload
    return struct.pack(">?I", compressed, len(body)) + body


def split_grpc_messages(data: bytes) -> list[bytes]:
    """The messages in a gRPC body (the 5-byte prefixes stripped); a torn tail is an error."""
    messages = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 5:
            raise ValueError(f"torn gRPC message prefix at byte {offset}")
        _flag, length = struct.unpack_from(">?I", data, offset)
        end = offset + 5 + length
        if end > len(data):
            raise ValueError(f"gRPC message at byte {offset} wants {length} bytes, body ends first")
        messages.append(bytes(data[offset + 5 : end]))
        offset = end
    return messages


@dataclass
class StreamResult:
    """What the server sent on one stream."""

    stream_id: int
    headers: Headers | None = None
    data: bytearray = field(default_factory=bytearray)
    trailers: Headers | None = None
    ended: bool = False  # END_STREAM received
    reset: int | None = None  # RST_STREAM error code, from either side

    @property
    def finished(self) -> bool:
        return self.ended or self.reset is not None

    def header(self, name: str) -> str | None:
        """A field from the trailers, else from the headers (a trailers-only response)."""
        for block in (self.trailers, self.headers):
            for key, value in block or ():
                if key == name:
                    return value
        return None

    @property
    def grpc_status(self) -> int | None:
        value = self.header("grpc-status")
        return None if value is None else int(value)

    @property
    def grpc_message(self) -> str | None:
        return self.header("grpc-message")

    def messages(self) -> list[bytes]:
        return split_grpc_messages(bytes(self.data))


@dataclass(frozen=True)
class FrameSeen:
    """One frame as it came off the wire, before `h2` judged it (h2 hides repeats: a second
    RST_STREAM on a stream already reset raises no event)."""

    type: int  # 0x0 DATA, 0x1 HEADERS, 0x3 RST_STREAM, 0x8 WINDOW_UPDATE, ...
    stream_id: int
    value: int | None = None  # RST_STREAM's error code, WINDOW_UPDATE's increment


RST_STREAM = 0x3
WINDOW_UPDATE = 0x8


class FrameLog:
    """Frame headers (and RST_STREAM/WINDOW_UPDATE payloads) parsed from the raw bytes read."""

    def __init__(self) -> None:
        self.frames: list[FrameSeen] = []
        self._pending = bytearray()

    def feed(self, data: bytes) -> None:
        pending = self._pending
        pending += data
        offset = 0
        while len(pending) - offset >= 9:
            length = int.from_bytes(pending[offset : offset + 3])
            if len(pending) - offset < 9 + length:
                break
            kind = pending[offset + 3]
            stream_id = int.from_bytes(pending[offset + 5 : offset + 9]) & 0x7FFFFFFF
            value = None
            if kind in (RST_STREAM, WINDOW_UPDATE) and length == 4:
                value = int.from_bytes(pending[offset + 9 : offset + 13]) & 0x7FFFFFFF
            self.frames.append(FrameSeen(kind, stream_id, value))
            offset += 9 + length
        del pending[:offset]

    def resets(self, stream_id: int) -> list[int]:
        """The error codes of every RST_STREAM received on ``stream_id``."""
        return [
            f.value or 0 for f in self.frames if f.type == RST_STREAM and f.stream_id == stream_id
        ]

    def connection_credit(self) -> int:
        """The sum of the WINDOW_UPDATE increments received for the connection."""
        return sum(f.value or 0 for f in self.frames if f.type == WINDOW_UPDATE and not f.stream_id)


@dataclass
class GoAway:
    error_code: int
    last_stream_id: int
    additional_data: bytes | None


class _ClientH2(h2.connection.H2Connection):
    """h2's client connection; with ``stay_open_after_goaway`` a received GOAWAY leaves its
    state machine open. h2 moves to CLOSED on any GOAWAY, and then refuses to send (PING,
    WINDOW_UPDATE, new streams) and to receive (DATA on streams still open) anything, though
    RFC 9113 section 6.8 has streams up to the last-stream-id go on after a GOAWAY."""

    stay_open_after_goaway = False

    def _receive_goaway_frame(
        self, frame: GoAwayFrame
    ) -> tuple[list[Frame], list[h2.events.Event]]:
        state = self.state_machine.state
        frames, events = super()._receive_goaway_frame(frame)
        if self.stay_open_after_goaway:
            self.state_machine.state = state
        return frames, events


class H2Client:
    """One HTTP/2 client connection. Every `send_*` writes at once; `read_events` and `until`
    read, feed `h2`, record per-stream results and write whatever `h2` owes (ACKs)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        authority: str,
        scheme: str,
        auto_ack_data: bool,
        stay_open_after_goaway: bool = False,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.authority = authority
        self.scheme = scheme
        self.auto_ack_data = auto_ack_data
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = _ClientH2(config=config)
        self.conn.stay_open_after_goaway = stay_open_after_goaway
        self.streams: dict[int, StreamResult] = {}
        self.events: list[h2.events.Event] = []
        self.ping_acks: list[bytes] = []
        self.settings_acks = 0
        self.goaway: GoAway | None = None
        self.closed = False  # the server closed the TCP connection (or it broke)
        self.frame_log: FrameLog | None = None  # set one to see every frame as received

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        settings: dict[h2.settings.SettingCodes | int, int] | None = None,
        tls: ssl.SSLContext | None = None,
        preface: bool = True,
        auto_ack_data: bool = True,
        stay_open_after_goaway: bool = False,
        timeout: float = 5.0,
    ) -> H2Client:
        """Open a connection. `settings` go in a SETTINGS frame right after the preface (e.g.
        {SettingCodes.INITIAL_WINDOW_SIZE: 0}); `tls` must offer ALPN "h2"; `preface=False` sends
        nothing, for `send_raw` of something that is not HTTP/2; `auto_ack_data=False` never
        returns flow-control credit, so the server's windows run dry (a slow reader);
        `stay_open_after_goaway=True` keeps the connection usable after the server's GOAWAY (its
        open streams go on, PING, WINDOW_UPDATE and new streams can still be sent), as RFC 9113
        section 6.8 allows and h2 alone would not (see `_ClientH2`)."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=tls, limit=READ_SIZE), timeout
        )
        client = cls(
            reader,
            writer,
            authority=f"{host}:{port}",
            scheme="https" if tls else "http",
            auto_ack_data=auto_ack_data,
            stay_open_after_goaway=stay_open_after_goaway,
        )
        if preface:
            client.conn.initiate_connection()
            if settings:
                client.conn.update_settings(settings)
            await client.flush()
        return client

    @staticmethod
    def tls_context(ca_file: str | None = None) -> ssl.SSLContext:
        """A client TLS context offering ALPN h2 (verifying against `ca_file`, or not at all)."""
        context = ssl.create_default_context(cafile=ca_file)
        if ca_file is None:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        return context

    async def __aenter__(self) -> H2Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), 2)

    # --- sending -----------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write what `h2` has queued."""
        data = self.conn.data_to_send()
        if data:
            await self.send_raw(data)

    async def send_raw(self, data: bytes) -> None:
        """Bytes straight onto the socket, past `h2`."""
        self.writer.write(data)
        await self.writer.drain()

    async def send_frame(self, *frames: Frame) -> None:
        """Hand-built hyperframe frames, serialized and written past `h2` (in one write)."""
        await self.send_raw(b"".join(frame.serialize() for frame in frames))

    def header_block(self, headers: Iterable[tuple[str, str]]) -> bytes:
        """An HPACK block from the connection's own encoder, for hand-built HEADERS frames."""
        return self.conn.encoder.encode(list(headers))

    def grpc_headers(
        self, path: str, *, timeout: str | None = None, metadata: Iterable[tuple[str, str]] = ()
    ) -> Headers:
        """The request headers of a gRPC call; `timeout` is a grpc-timeout value ("100m", "5S")."""
        headers = [
            (":method", "POST"),
            (":scheme", self.scheme),
            (":path", path),
            (":authority", self.authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        if timeout is not None:
            headers.append(("grpc-timeout", timeout))
        return [*headers, *metadata]

    async def send_grpc_request(
        self,
        path: str,
        message: bytes | Message | None = None,
        *,
        timeout: str | None = None,
        metadata: Iterable[tuple[str, str]] = (),
        end_stream: bool = True,
    ) -> int:
        """HEADERS, then DATA with one length-prefixed message (if any), END_STREAM unless told
        otherwise. Returns the new stream's id."""
        stream_id = self.conn.get_next_available_stream_id()
        self.streams[stream_id] = StreamResult(stream_id)
        headers = self.grpc_headers(path, timeout=timeout, metadata=metadata)
        self.conn.send_headers(stream_id, headers, end_stream=message is None and end_stream)
        await self.flush()
        if message is not None:
            await self.send_data(stream_id, grpc_message(message), end_stream=end_stream)
        return stream_id

    async def send_data(
        self, stream_id: int, data: bytes, *, end_stream: bool = False, timeout: float = 5.0
    ) -> None:
        """DATA frames as the flow-control windows and the frame size allow, waiting for credit."""
        offset = 0
        while True:
            window = self.conn.local_flow_control_window(stream_id)
            room = max(0, min(window, self.conn.max_outbound_frame_size))
            chunk = data[offset : offset + room]
            offset += len(chunk)
            last = offset >= len(data)
            if chunk or last:
                self.conn.send_data(stream_id, chunk, end_stream=end_stream and last)
                await self.flush()
            if last:
                return
            if room == 0:
                await self.until(
                    lambda: self.conn.local_flow_control_window(stream_id) > 0, timeout
                )

    async def reset_stream(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        self.conn.reset_stream(stream_id, error_code)
        self.streams.setdefault(stream_id, StreamResult(stream_id)).reset = error_code
        await self.flush()

    async def ping(self, opaque_data: bytes = b"h2client") -> None:
        self.conn.ping(opaque_data)
        await self.flush()

    async def update_settings(self, settings: dict[h2.settings.SettingCodes | int, int]) -> None:
        self.conn.update_settings(settings)
        await self.flush()

    async def window_update(self, increment: int, stream_id: int | None = None) -> None:
        """WINDOW_UPDATE on the connection (stream_id None) or on one stream."""
        self.conn.increment_flow_control_window(increment, stream_id)
        await self.flush()

    # --- receiving ---------------------------------------------------------------------------

    async def read_raw(self, timeout: float = 5.0) -> bytes:
        """The next bytes from the socket, bypassing `h2` (b"" once the server has closed)."""
        data = await asyncio.wait_for(self.reader.read(READ_SIZE), timeout)
        if not data:
            self.closed = True
        return data

    async def read_events(self, timeout: float = 5.0) -> list[h2.events.Event]:
        """Read once (raises TimeoutError after `timeout`), feed `h2`, record, answer."""
        try:
            data = await self.read_raw(timeout)
        except (ConnectionError, ssl.SSLError):
            self.closed = True
            return []
        if not data:
            return []
        if self.frame_log is not None:
            self.frame_log.feed(data)
        events = self.conn.receive_data(data)
        for event in events:
            self._record(event)
        self.events.extend(events)
        try:
            await self.flush()
        except (ConnectionError, ssl.SSLError):
            self.closed = True
        return events

    async def until(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        """Read until `condition()` holds. TimeoutError if it does not within `timeout`;
        ConnectionError if the connection closes first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.closed:
                raise ConnectionError("the server closed the connection")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"condition not met within {timeout} s")
            await self.read_events(left)

    async def response(self, stream_id: int, timeout: float = 5.0) -> StreamResult:
        """Wait for a stream to end (END_STREAM or RST_STREAM) and return what it got."""
        result = self.streams.setdefault(stream_id, StreamResult(stream_id))
        await self.until(lambda: result.finished, timeout)
        return result

    def _record(self, event: h2.events.Event) -> None:
        stream_id = getattr(event, "stream_id", None)
        stream = None
        if stream_id:
            stream = self.streams.setdefault(stream_id, StreamResult(stream_id))
        if isinstance(event, h2.events.ResponseReceived) and stream:
            stream.headers = list(event.headers or [])
        elif isinstance(event, h2.events.TrailersReceived) and stream:
            stream.trailers = list(event.headers or [])
        elif isinstance(event, h2.events.DataReceived) and stream:
            stream.data += event.data or b""
            if self.auto_ack_data and event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length, stream.stream_id)
        elif isinstance(event, h2.events.StreamEnded) and stream:
            stream.ended = True
        elif isinstance(event, h2.events.StreamReset) and stream:
            stream.reset = int(event.error_code or 0)
        elif isinstance(event, h2.events.PingAckReceived):
            self.ping_acks.append(event.ping_data or b"")
        elif isinstance(event, h2.events.SettingsAcknowledged):
            self.settings_acks += 1
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = GoAway(
                int(event.error_code or 0), event.last_stream_id or 0, event.additional_data
            )
