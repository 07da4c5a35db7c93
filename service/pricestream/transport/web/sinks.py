"""The server side of a browser stream: the ``BatchSink`` the flush clock hands batches to.

One socket per stream, so each sink is its own flush group (the clock spreads them over its
phases). A batch is packed by hand (``frames.py``) and written with one ``transport.write``;
``send`` returns False once the socket's unsent output is over the high-water mark (the
transport's ``pause_writing``): the writer then keeps coalescing until ``resume_writing``
says the socket drained, and a socket that stays behind is cut off by the flush clock's stall
check like any stream.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

from pricestream.transport.web.frames import (
    SSE_HEARTBEAT,
    sse_batch,
    sse_close_event,
    sse_retry,
    text_frame_header,
    websocket_batch,
)

# A final text frame's header for each payload length under 126 (the usual batch), made once.
_SHORT_HEADERS = tuple(bytes((0x81, n)) for n in range(126))
_MEDIUM_HEADER = struct.Struct(">BBH").pack
_PRICES_HEAD = b'{"type":"prices","seq":%d,"updates":['


class StreamSink:
    """What the WebSocket and SSE sinks share: seq, back-pressure, close.

    ``write`` is the socket's own write (the transport's bound method, called straight from
    the flush pass: a batch is one call into uvloop, no method of ours in between)."""

    __slots__ = ("_on_writable", "_write", "blocked_since", "closed", "seq")

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self._on_writable: Callable[[], None] | None = None
        self.blocked_since: float | None = None
        self.closed = False
        self.seq = 0  # the last frame's seq: 1 is the snapshot

    @property
    def flush_group(self) -> object:
        return self

    def on_writable(self, callback: Callable[[], None]) -> None:
        self._on_writable = callback

    def send_snapshot(self, payload: bytes) -> None:
        """The first frame even when no ticker has a known price yet (an empty snapshot)."""
        if self.seq == 0:
            self.send(payload)

    def pause(self) -> None:
        if self.blocked_since is None:
            self.blocked_since = time.monotonic()

    def resume(self) -> None:
        if self.blocked_since is None:
            return
        self.blocked_since = None
        if self._on_writable is not None and not self.closed:
            self._on_writable()

    def close(self) -> None:
        self.closed = True
        self._on_writable = None


class WebSocketSink(StreamSink):
    __slots__ = ()

    def send(self, payload: bytes) -> bool:
        """One batch as one text frame, packed inline: the hot path of every browser socket
        (``frames.websocket_batch`` builds the same bytes; the snapshot goes through it)."""
        if self.closed:
            return True
        seq = self.seq + 1
        self.seq = seq
        if seq == 1 or not payload:
            self._write(websocket_batch(seq, payload, snapshot=seq == 1))
            return self.blocked_since is None
        head = _PRICES_HEAD % seq
        size = len(head) + len(payload) + 1  # the last comma out, "]}" in
        header = _SHORT_HEADERS[size] if size < 126 else None
        if header is None:
            header = _MEDIUM_HEADER(0x81, 126, size) if size < 65536 else text_frame_header(size)
        self._write(b"".join((header, head, payload[:-1], b"]}")))
        return self.blocked_since is None


class EventStreamSink(StreamSink):
    __slots__ = ()

    def __init__(self, write: Callable[[bytes], None], retry_ms: int) -> None:
        super().__init__(write)
        self._write(sse_retry(retry_ms))

    def send(self, payload: bytes) -> bool:
        """One batch as one event (comma-terminated JSON fragments); the first is the
        snapshot."""
        if self.closed:
            return True  # nothing waits: the stream is gone
        seq = self.seq + 1
        self.seq = seq
        self._write(sse_batch(seq, payload, snapshot=seq == 1))
        return self.blocked_since is None

    def heartbeat(self) -> None:
        if not self.closed and self.blocked_since is None:
            self._write(SSE_HEARTBEAT)

    def write_close(self, code: int, reason: str) -> None:
        self._write(sse_close_event(code, reason))
