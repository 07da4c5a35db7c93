"""The server's side of one HTTP/2 stream: response headers, messages under flow control,
trailers or a reset.

A message goes out at once when both windows (the stream's and the connection's) have room
for it; otherwise it waits whole in the stream's queue, and the stream is *blocked* from that
moment (``blocked_since``) until the peer's WINDOW_UPDATE lets the queue out. A message larger
than a window could ever hold whole is let out piece by piece.

``h2`` keeps the connection's window, and the DATA frames written here by hand are charged to
it. The stream's send window is this object's ``window``: h2's stream object reads and writes
it there (``OwnWindowStream``), so h2's handling of WINDOW_UPDATE and SETTINGS (overflow checks
included) stays exact while a batch's send never touches h2's stream object. Measured (make
bench, 10,000 streams at 100 ms): reaching the window through h2's stream, an instance with a
dict of its own read in every send, cost a fifth of the pod's CPU in cache misses.
``OwnWindowStream`` lives in h2_internals (it reaches into h2's stream).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import grpc
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError

from pricestream.transport.http2.framing import (
    MESSAGE_PREFIX,
    PREFIX_BYTES,
    RESPONSE_HEADERS,
    SINGLE_FRAME_HEADER,
    data_frames,
    encode_metadata,
    status_headers,
)
from pricestream.transport.http2.h2_internals import OwnWindowStream

if TYPE_CHECKING:
    from pricestream.transport.http2.connection import Connection

_PACK_HEADER = SINGLE_FRAME_HEADER.pack
_WHOLE_MESSAGE_CAP = 65535  # the initial connection window: larger messages go in pieces


class SentCount(Protocol):
    """Where a stream counts the messages it sends (its method's total: see ServerCall)."""

    sent: int


class _Uncounted:
    """Where streams that serve no method (refused, or plain HTTP answers) count: read by
    nobody, one for all of them."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = 0


_UNCOUNTED = _Uncounted()


class ResponseStream:
    __slots__ = (
        "_conn",
        "_h2",
        "_h2s",
        "_initial_metadata",
        "_offset",
        "_on_writable",
        "_pending_end",
        "_piecewise",
        "_queue",
        "blocked_since",
        "closed",
        "counts",
        "flush_group",
        "headers_sent",
        "ready",
        "stream_id",
        "window",
    )

    def __init__(self, conn: Connection, h2_stream: OwnWindowStream) -> None:
        self._conn = conn
        self._h2 = conn.h2
        self._h2s = h2_stream
        self.stream_id = h2_stream.stream_id
        h2_stream.adopt(self)  # sets self.window: the stream's send window (bytes), h2's too
        # The streams of one connection flush on the same clock tick: one write for them all.
        self.flush_group: object = conn
        self._queue: deque[memoryview] = deque()
        self._offset = 0  # bytes of the first queued message already sent
        self._pending_end: Callable[[], None] | None = None  # trailers behind queued messages
        self._on_writable: Callable[[], None] | None = None
        self._initial_metadata: list[tuple[bytes, bytes]] = []
        self._piecewise = False  # plain answers go out as the window allows, not whole
        self.blocked_since: float | None = None  # monotonic; None while nothing waits
        self.headers_sent = False
        self.closed = False
        # Headers sent, not closed and nothing queued: a message may take the fast path.
        self.ready = False
        # Each message sent is counted here, in a total shared by every call of the method:
        # a count per stream, an int object of its own read by every send, cost a cache miss
        # per batch.
        self.counts: SentCount = _UNCOUNTED

    # --- the BatchSink side (pricestream.engine.flush) -------------------------------------------

    def on_writable(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time the queue has drained after the stream was blocked."""
        self._on_writable = callback

    def send(self, payload: bytes) -> bool:
        """Queue one message (the serialized bytes); written now if the windows allow.
        True if it is out (in the connection's next write), False if it waits.

        The hot path of every price stream: one call per batch, so it avoids calls and
        lookups it can (a message that fits goes out as one pre-packed DATA frame header).
        """
        if not self.ready:
            if self.closed:
                return True  # nothing waits: the stream is gone
            if not self.headers_sent:
                self._send_headers()
                if self.closed:
                    return True
        size = len(payload) + PREFIX_BYTES
        conn = self._conn
        h2 = self._h2
        if (
            self.ready
            and size <= self.window
            and size <= h2.outbound_flow_control_window
            and size <= conn.frame_room
        ):
            self.window -= size
            h2.outbound_flow_control_window -= size
            out = conn.out
            if not out:
                conn.schedule_flush()
            conn.data_queued = True
            out.append(_PACK_HEADER(size << 8, self.stream_id, len(payload)))
            out.append(payload)
            self.counts.sent += 1
            return True
        self.ready = False
        self._queue.append(memoryview(MESSAGE_PREFIX.pack(0, len(payload)) + payload))
        self.drain()
        return self.blocked_since is None

    # --- the transport side -----------------------------------------------------------------

    def set_initial_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._initial_metadata = encode_metadata(metadata)

    def send_headers(self) -> None:
        """Send the response headers now (otherwise they go with the first message)."""
        if not self.headers_sent and not self.closed:
            self._send_headers()

    def drain(self) -> None:
        """Write as much of the queue as the windows allow; called again on WINDOW_UPDATE."""
        if self.closed:
            return
        conn = self._conn
        h2 = conn.h2
        if not self.headers_sent:
            self._send_headers()
            if self.closed:
                return
        queue = self._queue
        whole_cap = min(h2.remote_settings.initial_window_size, _WHOLE_MESSAGE_CAP)
        while queue and not conn.paused:
            message = queue[0]
            remaining = len(message) - self._offset
            window = min(self.window, h2.outbound_flow_control_window)
            if window <= 0 or (
                self._offset == 0 and window < remaining <= whole_cap and not self._piecewise
            ):
                break  # wait until it fits whole
            n = min(remaining, window)
            chunk = message[self._offset : self._offset + n]
            conn.write(*data_frames(chunk, self.stream_id, h2.max_outbound_frame_size))
            self.window -= n
            h2.outbound_flow_control_window -= n
            self._offset += n
            if self._offset == len(message):
                queue.popleft()
                self._offset = 0
                self.counts.sent += 1
        if queue:
            if self.blocked_since is None:
                self.blocked_since = time.monotonic()
                conn.wait_for_window(self)
            return
        was_blocked = self.blocked_since is not None
        self.blocked_since = None
        self.ready = True
        if self._pending_end is not None:
            self._pending_end()
        elif was_blocked and self._on_writable is not None:
            self._on_writable()

    def finish(
        self,
        code: grpc.StatusCode,
        message: str = "",
        metadata: Sequence[tuple[str, str | bytes]] = (),
        *,
        discard_unsent: bool = False,
    ) -> None:
        """End the call with its status. Trailers wait behind queued messages, unless
        ``discard_unsent``: then queued messages are dropped, and if one is half sent the
        stream is reset instead (a client cannot be given half a message and a status)."""
        if self.closed:
            return
        if self._queue:
            if not discard_unsent:
                self._pending_end = lambda: self._send_trailers(code, message, metadata)
                return
            if self._offset:
                calm = code == grpc.StatusCode.RESOURCE_EXHAUSTED
                self.reset(ErrorCodes.ENHANCE_YOUR_CALM if calm else ErrorCodes.CANCEL)
                return
            self._queue.clear()
        self._send_trailers(code, message, metadata)

    def answer_plain(self, status: bytes, text: bytes) -> None:
        """A plain HTTP answer to a request that is not gRPC, body under flow control."""
        self.headers_sent = True
        headers = [(b":status", status), (b"content-type", b"text/plain; charset=utf-8")]
        try:
            self._conn.h2.send_headers(self.stream_id, headers)
        except ProtocolError:
            self._close()
            return
        self._conn.h2_output()
        self._queue.append(memoryview(text))
        self._piecewise = True
        self._pending_end = self._end_plain
        self.drain()

    def _end_plain(self) -> None:
        self._close()
        # No RST_STREAM NO_ERROR after it (unlike a gRPC call's end): a plain HTTP client
        # may still be sending, and its stream errors must stay its own (h2spec 6.9.1/3).
        with contextlib.suppress(ProtocolError):
            self._conn.h2.end_stream(self.stream_id)
        self._conn.h2_output(self.stream_id)

    def reset(self, error_code: ErrorCodes) -> None:
        if self.closed:
            return
        self._close()
        with contextlib.suppress(ProtocolError):  # already closed by the peer
            self._conn.h2.reset_stream(self.stream_id, error_code)
        self._conn.h2_output(self.stream_id)

    def peer_closed(self) -> None:
        """The peer reset the stream or the connection is gone: nothing more is sent."""
        if not self.closed:
            self._close()

    def _close(self) -> None:
        self.closed = True
        self.ready = False
        self._h2s.release()
        self._queue.clear()
        self._pending_end = None
        self._on_writable = None
        if self.blocked_since is not None:
            self.blocked_since = None
            self._conn.stop_waiting(self)

    def _send_headers(self) -> None:
        self.headers_sent = True
        try:
            self._conn.h2.send_headers(self.stream_id, [*RESPONSE_HEADERS, *self._initial_metadata])
        except ProtocolError:
            self._close()  # the peer reset the stream, or the connection is closing
            return
        self.ready = not self._queue
        self._conn.h2_output()

    def _send_trailers(
        self, code: grpc.StatusCode, message: str, metadata: Sequence[tuple[str, str | bytes]]
    ) -> None:
        headers = [] if self.headers_sent else [*RESPONSE_HEADERS, *self._initial_metadata]
        headers += status_headers(code, message)
        headers += encode_metadata(metadata)
        conn = self._conn
        self._close()
        try:
            conn.h2.send_headers(self.stream_id, headers, end_stream=True)
            if not self._h2s.closed:
                # The client has not finished sending: tell it to stop (gRPC does the same).
                conn.h2.reset_stream(self.stream_id, ErrorCodes.NO_ERROR)
        except ProtocolError:
            pass  # the peer reset it meanwhile
        conn.h2_output(self.stream_id)
