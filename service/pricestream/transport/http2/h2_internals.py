"""Every use this transport makes of ``h2``'s private state, in one place.

Checked against ``h2==4.4.1`` (the version pyproject.toml pins). ``tests/test_h2_internals.py``
checks each item below on the installed h2 (names, signatures, behaviour on an in-memory pair
of connections) and names the one that changed; run it first after any h2 upgrade.

What is touched, and why:

``H2Connection._begin_new_stream(stream_id, allowed_ids)``
    h2 creates every stream here. ``ServerH2`` overrides it to give each new stream the class
    ``OwnWindowStream`` (an ``H2Stream`` subclass adding methods and one class default only,
    so swapping ``__class__`` is safe): the stream's send window then lives on our
    ``ResponseStream`` while one serves it (see flow.py for the measured reason).

``H2Stream.__dict__["outbound_flow_control_window"]``
    h2 keeps a stream's send window as a plain instance attribute, read and written by its
    own WINDOW_UPDATE and SETTINGS handling. ``OwnWindowStream`` turns the name into a
    property and keeps h2's value in the instance dict while no ``ResponseStream`` owns it.

``H2Connection._closed_streams`` (a ``SizeLimitDict`` of ``stream id -> StreamClosedBy``)
    h2 moves a closed stream out of ``streams`` into it only while counting open streams
    (``_open_streams``, a walk of every stream at every new stream: quadratic with thousands
    of streams). ``ServerH2.forget`` moves a stream as soon as it is closed, as h2 would, so
    h2 still tells a frame on a closed stream apart by how the stream was closed.

``H2Connection.open_inbound_streams`` (public, but what h2 calls it from is not)
    h2's ``_receive_headers_frame`` enforces our SETTINGS_MAX_CONCURRENT_STREAMS with it.
    ``ServerH2`` answers in O(1) from ``len(streams)`` (closed streams are forgotten as they
    close) and walks the streams only at the limit, when a client's RST_STREAM in the same
    read may have closed a stream not forgotten yet.

``H2Connection._stream_closed_by(stream_id)``, ``_receive_frame(frame)`` and
``_prepare_for_sending(frames)``
    h2 answers a DATA or HEADERS frame on a stream it has *sent* RST_STREAM on with one more
    RST_STREAM(STREAM_CLOSED) each. RFC 9113 section 5.1 says such frames (the peer may have
    sent them before it saw our reset) are to be ignored. ``ServerH2._receive_frame`` lets h2
    process the frame as ever (HPACK decoding, the connection's flow-control window and its
    WINDOW_UPDATE, state checks) and only drops the RST_STREAM it would queue for that stream.
    While it does, the frame opens no stream, so it is not counted against the stream limit.

``H2Connection.incoming_buffer._data`` (the ``FrameBuffer``'s unparsed bytes)
    h2 checks a frame's length only once the whole frame is in, so a header announcing 16 MiB
    would have it buffer 16 MiB first. ``pending_frame_length`` reads the next frame's length
    from the buffer so the connection can refuse it at its header.

``H2Connection.state_machine`` left out of a graceful GOAWAY: ``_prepare_for_sending(frames)``
    h2's ``close_connection`` moves its connection state machine to CLOSED as it queues the
    GOAWAY; from then on every frame the client sends (WINDOW_UPDATE, PING, DATA on the streams
    the GOAWAY lets finish) and every frame we send (trailers) is a ProtocolError, though
    RFC 9113 section 6.8 has the sender go on processing streams up to the last-stream-id.
    ``ServerH2.graceful_goaway`` queues GOAWAY(NO_ERROR) through ``_prepare_for_sending``, the
    one place h2 queues its own frames (so it goes out in order with h2's output, HPACK state
    untouched), without the state machine (read only to send nothing once h2 has closed),
    and records its last-stream-id; new streams above it are refused by the connection, not
    by h2.

``H2Connection._terminate_connection(error_code)`` and ``close_connection``'s default
``last_stream_id``
    Both send GOAWAY with ``highest_inbound_stream_id``, which after a graceful GOAWAY may be
    the id of a stream we refused since. RFC 9113 section 6.8: the last-stream-id of a later
    GOAWAY must not increase. ``ServerH2`` overrides both to send the recorded one then.

Public attributes used in a way h2 does not document, kept here for the record:
``H2Connection.outbound_flow_control_window`` is decremented by flow.py for the DATA frames it
writes itself (h2 checks WINDOW_UPDATE overflow against it).
"""

from __future__ import annotations

from typing import Any, Protocol

from h2.connection import ConnectionInputs, ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import Event
from h2.stream import H2Stream, StreamClosedBy
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame

H2_VERSION_CHECKED = "4.4.1"


class WindowOwner(Protocol):
    """What keeps a stream's send window while it serves the stream (a ResponseStream)."""

    window: int


class OwnWindowStream(H2Stream):
    """h2's stream whose send window, while a ``WindowOwner`` serves it, is that owner's
    ``window`` (``ServerH2`` gives h2 this class for every stream)."""

    owner: WindowOwner | None = None

    @property  # type: ignore[override]  # h2's plain attribute, kept elsewhere while owned
    def outbound_flow_control_window(self) -> int:
        owner = self.owner
        if owner is None:
            return self.__dict__["outbound_flow_control_window"]  # type: ignore[no-any-return]
        return owner.window

    @outbound_flow_control_window.setter
    def outbound_flow_control_window(self, value: int) -> None:
        owner = self.owner
        if owner is None:
            self.__dict__["outbound_flow_control_window"] = value
        else:
            owner.window = value

    def adopt(self, owner: WindowOwner) -> None:
        """From now on the window is ``owner.window`` (given the current value)."""
        owner.window = self.__dict__["outbound_flow_control_window"]
        self.owner = owner

    def release(self) -> None:
        """The window is h2's own again (with the owner's value): no reference back."""
        owner = self.owner
        if owner is not None:
            self.__dict__["outbound_flow_control_window"] = owner.window
            self.owner = None


# Frames h2 answers with RST_STREAM(STREAM_CLOSED) on a stream it reset, which RFC 9113 §5.1
# has the endpoint ignore (WINDOW_UPDATE, RST_STREAM and PRIORITY h2 already ignores there).
_IGNORED_AFTER_OUR_RESET = (DataFrame, HeadersFrame)


def _resets(frame: Frame, stream_id: int) -> bool:
    return isinstance(frame, RstStreamFrame) and frame.stream_id == stream_id


class ServerH2(H2Connection):
    """h2's server connection with the uses of its internals listed in the module docstring."""

    _ignoring = 0  # the stream id of a frame being ignored (see _receive_frame), or 0
    # The last-stream-id of the graceful GOAWAY sent (see graceful_goaway), or None.
    goaway_last_stream_id: int | None = None

    def _begin_new_stream(self, stream_id: int, allowed_ids: Any) -> OwnWindowStream:
        # Every stream h2 opens becomes an OwnWindowStream (the same layout: a subclass that
        # adds only methods and a class default), whose send window its ResponseStream keeps.
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream.__class__ = OwnWindowStream
        return stream  # type: ignore[return-value]  # its class was just set

    @property
    def open_inbound_streams(self) -> int:
        if self._ignoring:
            return 0  # a frame on a stream we reset opens none
        count = len(self.streams)
        if count >= self.local_settings.max_concurrent_streams:
            count = sum(1 for stream in self.streams.values() if not stream.closed)
        return count

    def forget(self, stream_id: int) -> None:
        """Drop h2's state of a stream once it is closed both ways, as h2 itself would when
        next counting streams: it keeps how the stream was closed."""
        stream = self.streams.get(stream_id)
        if stream is not None and stream.closed:
            del self.streams[stream_id]
            self._closed_streams[stream_id] = stream.closed_by

    def reset_by_us(self, stream_id: int) -> bool:
        """Whether we closed the stream with RST_STREAM (and h2 still remembers it)."""
        return self._stream_closed_by(stream_id) == StreamClosedBy.SEND_RST_STREAM

    def _receive_frame(self, frame: Frame) -> list[Event]:
        stream_id = frame.stream_id
        if (
            stream_id
            and isinstance(frame, _IGNORED_AFTER_OUR_RESET)
            and stream_id <= self.highest_inbound_stream_id
            and self.reset_by_us(stream_id)
        ):
            self._ignoring = stream_id
            try:
                return super()._receive_frame(frame)
            finally:
                self._ignoring = 0
        return super()._receive_frame(frame)

    def _prepare_for_sending(self, frames: list[Frame]) -> None:
        ignoring = self._ignoring
        if ignoring:
            frames = [f for f in frames if not _resets(f, ignoring)]
        super()._prepare_for_sending(frames)

    def pending_frame_length(self) -> int | None:
        """The length the next, incomplete frame announces; None before its 9-byte header.

        After ``receive_data`` h2's buffer starts at a frame boundary: its first 3 bytes are
        the next frame's length.
        """
        pending = self.incoming_buffer._data
        if len(pending) < 9:
            return None
        return int.from_bytes(pending[:3])

    def graceful_goaway(self, additional_data: bytes = b"") -> int | None:
        """Queue GOAWAY(NO_ERROR) and leave h2's connection open, so the streams up to the
        GOAWAY's last-stream-id go on (RFC 9113 section 6.8); that id, the same on every call.
        Nothing (None) once h2's connection is closed (a GOAWAY sent or received through it).

        h2 knows nothing of it: refusing the streams the client opens above that id is the
        caller's part (``goaway_last_stream_id``).
        """
        if self.state_machine.state == ConnectionState.CLOSED:
            return None
        last = self.goaway_last_stream_id
        if last is None:
            last = self.goaway_last_stream_id = self.highest_inbound_stream_id
        frame = GoAwayFrame(
            stream_id=0,
            last_stream_id=last,
            error_code=ErrorCodes.NO_ERROR,
            additional_data=additional_data,
        )
        self._prepare_for_sending([frame])
        return last

    def close_connection(
        self,
        error_code: ErrorCodes | int = 0,
        additional_data: bytes | None = None,
        last_stream_id: int | None = None,
    ) -> None:
        if last_stream_id is None:
            last_stream_id = self.goaway_last_stream_id  # None: h2's own default
        super().close_connection(error_code, additional_data, last_stream_id)

    def _terminate_connection(self, error_code: ErrorCodes) -> None:
        # h2's GOAWAY on a connection error (its code, as h2 writes it), with our graceful
        # GOAWAY's last-stream-id if one was sent: a later GOAWAY must not raise it.
        last = self.goaway_last_stream_id
        if last is None:
            super()._terminate_connection(error_code)
            return
        frame = GoAwayFrame(0)
        frame.last_stream_id = last
        frame.error_code = error_code
        self.state_machine.process_input(ConnectionInputs.SEND_GOAWAY)
        self._prepare_for_sending([frame])
