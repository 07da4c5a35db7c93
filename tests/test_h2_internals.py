"""The h2 internals ``pricestream.transport.http2.h2_internals`` relies on, checked on the
installed h2: each test names the internal it checks, so an h2 upgrade that changes one fails
here, saying which, before anything subtler fails elsewhere.

Checked by name and signature (``inspect``) and by behaviour, on an in-memory pair of h2
connections (a plain client, our ``ServerH2``) exchanging bytes directly: no sockets.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version
from pathlib import Path

import pytest
from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    Event,
    PingReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from h2.stream import H2Stream, StreamClosedBy
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
)
from pricestream.transport.http2.h2_internals import (
    H2_VERSION_CHECKED,
    OwnWindowStream,
    ServerH2,
)

pytestmark = pytest.mark.unit

INSTALLED = version("h2")
CHANGED = (
    f"h2 {INSTALLED} is installed; h2_internals was checked against h2 {H2_VERSION_CHECKED}. "
    "Changed internal:"
)
HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/test.Echo/Echo"),
    (":authority", "localhost"),
    ("content-type", "application/grpc"),
]


def parameters(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


class Pair:
    """A client H2Connection and our ServerH2, handing each other their bytes."""

    def __init__(self, max_streams: int = 100) -> None:
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.server = ServerH2(H2Configuration(client_side=False, header_encoding=None))
        self.server.local_settings = Settings(
            client=False, initial_values={SettingCodes.MAX_CONCURRENT_STREAMS: max_streams}
        )
        self.client.initiate_connection()
        self.server.initiate_connection()
        self.exchange()

    def to_server(self) -> list[Event]:
        return self.server.receive_data(self.client.data_to_send())

    def to_client(self) -> list[Event]:
        return self.client.receive_data(self.server.data_to_send())

    def exchange(self) -> None:
        for _ in range(3):
            self.to_server()
            self.to_client()

    def open(self, end_stream: bool = False) -> int:
        stream_id = self.client.get_next_available_stream_id()
        self.client.send_headers(stream_id, HEADERS, end_stream=end_stream)
        events = self.to_server()
        assert any(isinstance(e, RequestReceived) for e in events)
        return stream_id


def test_the_checked_version_is_the_pinned_one() -> None:
    pinned = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert f'"h2=={H2_VERSION_CHECKED}"' in pinned, (
        f"pyproject.toml pins another h2 than h2_internals.H2_VERSION_CHECKED "
        f"({H2_VERSION_CHECKED}): check every internal below and update it"
    )


# --- names and signatures -------------------------------------------------------------------


def test_begin_new_stream_signature() -> None:
    method = getattr(H2Connection, "_begin_new_stream", None)
    assert method is not None, f"{CHANGED} H2Connection._begin_new_stream is gone"
    assert parameters(method) == ["self", "stream_id", "allowed_ids"], (
        f"{CHANGED} H2Connection._begin_new_stream{inspect.signature(method)}"
    )
    source = inspect.getsource(H2Connection._get_or_create_stream)
    assert "_begin_new_stream" in source, (
        f"{CHANGED} h2 no longer opens inbound streams through _begin_new_stream"
    )


def test_stream_window_is_a_plain_instance_attribute() -> None:
    stream = H2Stream(1, H2Configuration(), 65535, 65535)
    assert stream.__dict__.get("outbound_flow_control_window") == 65535, (
        f"{CHANGED} H2Stream.outbound_flow_control_window is no plain instance attribute"
    )
    assert not isinstance(inspect.getattr_static(H2Stream, "__slots__", None), tuple), (
        f"{CHANGED} H2Stream has __slots__: OwnWindowStream's __class__ swap is unsafe"
    )


def test_closed_streams_map() -> None:
    conn = H2Connection()
    closed = getattr(conn, "_closed_streams", None)
    assert closed is not None, f"{CHANGED} H2Connection._closed_streams is gone"
    assert hasattr(closed, "__setitem__") and hasattr(closed, "__contains__"), (
        f"{CHANGED} H2Connection._closed_streams is no mapping ({type(closed).__name__})"
    )
    source = inspect.getsource(H2Connection._stream_closed_by)
    assert "_closed_streams" in source, (
        f"{CHANGED} H2Connection._stream_closed_by no longer reads _closed_streams"
    )


def test_open_inbound_streams_enforces_the_stream_limit() -> None:
    source = inspect.getsource(H2Connection._receive_headers_frame)
    assert "open_inbound_streams" in source, (
        f"{CHANGED} h2 no longer checks MAX_CONCURRENT_STREAMS with open_inbound_streams"
    )


def test_incoming_buffer_data() -> None:
    conn = H2Connection()
    buffer = getattr(conn.incoming_buffer, "_data", None)
    assert isinstance(buffer, (bytearray, bytes)), (
        f"{CHANGED} H2Connection.incoming_buffer._data is gone or no bytes "
        f"({type(buffer).__name__})"
    )


# --- behaviour on an in-memory pair ------------------------------------------------------------


def test_new_streams_get_our_class_and_their_window_follows_the_owner() -> None:
    pair = Pair()
    stream_id = pair.open()
    stream = pair.server.streams[stream_id]
    assert type(stream) is OwnWindowStream, (
        f"{CHANGED} a stream h2 opened is a {type(stream).__name__}, not OwnWindowStream"
    )

    class Owner:
        window = 0

    owner = Owner()
    stream.adopt(owner)
    before = owner.window
    pair.client.increment_flow_control_window(1000, stream_id)
    events = pair.to_server()
    assert any(isinstance(e, WindowUpdated) and e.stream_id == stream_id for e in events)
    assert owner.window == before + 1000, (
        f"{CHANGED} h2's WINDOW_UPDATE no longer reaches the stream's "
        "outbound_flow_control_window attribute"
    )
    stream.release()
    assert stream.outbound_flow_control_window == before + 1000


def test_forget_keeps_how_a_stream_was_closed() -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.server.reset_stream(stream_id, ErrorCodes.CANCEL)
    pair.server.forget(stream_id)
    assert stream_id not in pair.server.streams
    assert pair.server._stream_closed_by(stream_id) == StreamClosedBy.SEND_RST_STREAM, (
        f"{CHANGED} a stream moved to _closed_streams no longer tells how it was closed"
    )


def test_open_inbound_streams_is_ours_and_counts_open_streams() -> None:
    pair = Pair(max_streams=2)
    first = pair.open()
    pair.open()
    assert pair.server.open_inbound_streams == 2
    pair.client.reset_stream(first, ErrorCodes.CANCEL)
    pair.to_server()  # closed, not forgotten: counted out at the limit
    assert pair.server.open_inbound_streams == 1
    pair.open()  # fits: h2 asked our count


def test_pending_frame_length_reads_the_next_frame_header() -> None:
    pair = Pair()
    announced = (1 << 24) - 1  # the largest a frame header can announce
    header = announced.to_bytes(3, "big") + bytes([0, 0]) + (1).to_bytes(4, "big")
    pair.server.receive_data(header)
    assert pair.server.pending_frame_length() == announced, (
        f"{CHANGED} h2's incoming_buffer._data does not start at the next frame's header"
    )


def test_frame_hooks_signatures() -> None:
    for name, wanted in (
        ("_stream_closed_by", ["self", "stream_id"]),
        ("_receive_frame", ["self", "frame"]),
        ("_prepare_for_sending", ["self", "frames"]),
    ):
        method = getattr(H2Connection, name, None)
        assert method is not None, f"{CHANGED} H2Connection.{name} is gone"
        assert parameters(method) == wanted, (
            f"{CHANGED} H2Connection.{name}{inspect.signature(method)}"
        )
    assert "_receive_frame" in inspect.getsource(H2Connection.receive_data), (
        f"{CHANGED} H2Connection.receive_data no longer hands frames to _receive_frame"
    )


def sent_frames(data: bytes) -> list[Frame]:
    frames = []
    offset = 0
    while offset < len(data):
        frame, length = Frame.parse_frame_header(memoryview(data[offset : offset + 9]))
        frame.parse_body(memoryview(data[offset + 9 : offset + 9 + length]))
        frames.append(frame)
        offset += 9 + length
    return frames


def test_frames_on_a_stream_we_reset_are_ignored_and_still_charged() -> None:
    """RFC 9113 §5.1: DATA and HEADERS the client sent before it saw our RST_STREAM get no
    RST_STREAM(STREAM_CLOSED) each; DATA still costs connection window, and h2 gives it back."""
    pair = Pair(max_streams=1)
    refused = pair.open()
    pair.server.reset_stream(refused, ErrorCodes.REFUSED_STREAM)
    pair.server.forget(refused)  # as the connection does once a stream is closed
    ours = sent_frames(pair.server.data_to_send())
    assert [type(f) for f in ours] == [RstStreamFrame]
    # The client has not read our reset yet: it sends 60 KiB (most of the stream's window)
    # and trailers on the stream.
    window = pair.client.outbound_flow_control_window
    for _ in range(15):
        pair.client.send_data(refused, b"x" * 4096)
        events = pair.to_server()
        assert not any(isinstance(e, StreamReset) for e in events)
        answer = sent_frames(pair.server.data_to_send())
        assert not [f for f in answer if isinstance(f, RstStreamFrame)], (
            f"{CHANGED} h2 answers DATA on a stream we reset in a way ServerH2 does not drop"
        )
        pair.client.receive_data(b"".join(f.serialize() for f in answer))
    assert pair.client.outbound_flow_control_window > window - 15 * 4096, (
        f"{CHANGED} DATA on a stream we reset is no longer given back to the connection window"
    )
    pair.client.send_headers(refused, [("grpc-status", "0")], end_stream=True)
    pair.to_server()  # at the stream limit of 1: still no stream opened, no connection error
    assert not [f for f in sent_frames(pair.server.data_to_send()) if isinstance(f, RstStreamFrame)]
    pair.client.receive_data(b"".join(f.serialize() for f in ours))  # now it sees the reset
    pair.open(end_stream=True)  # the connection serves on


def test_data_on_a_stream_closed_by_end_stream_still_gets_stream_closed() -> None:
    """Unchanged h2 behaviour where the stream was not reset by us: RST_STREAM(STREAM_CLOSED)."""
    pair = Pair()
    stream_id = pair.open(end_stream=True)
    pair.server.send_headers(stream_id, [(b":status", b"200")], end_stream=True)
    pair.server.forget(stream_id)
    pair.server.data_to_send()
    pair.server.receive_data(DataFrame(stream_id, b"late").serialize())
    resets = [f for f in sent_frames(pair.server.data_to_send()) if isinstance(f, RstStreamFrame)]
    assert [(f.stream_id, f.error_code) for f in resets] == [(stream_id, ErrorCodes.STREAM_CLOSED)]


# --- the graceful GOAWAY ---------------------------------------------------------------------


def test_goaway_internals_signatures() -> None:
    for name, wanted in (
        ("close_connection", ["self", "error_code", "additional_data", "last_stream_id"]),
        ("_terminate_connection", ["self", "error_code"]),
    ):
        method = getattr(H2Connection, name, None)
        assert method is not None, f"{CHANGED} H2Connection.{name} is gone"
        assert parameters(method) == wanted, (
            f"{CHANGED} H2Connection.{name}{inspect.signature(method)}"
        )
    source = inspect.getsource(H2Connection.receive_data)
    assert "_terminate_connection" in source, (
        f"{CHANGED} h2 no longer sends its connection-error GOAWAY through _terminate_connection"
    )
    conn = H2Connection()
    assert conn.state_machine.state == ConnectionState.IDLE, (
        f"{CHANGED} H2Connection.state_machine.state (ConnectionState) is gone"
    )
    # What ServerH2.graceful_goaway works around: h2 closes its connection as it sends GOAWAY.
    # If this fails, h2 no longer does: graceful_goaway may then go through close_connection.
    conn.initiate_connection()
    conn.close_connection()
    assert conn.state_machine.state == ConnectionState.CLOSED, (
        f"{CHANGED} h2 no longer closes its connection state when it sends GOAWAY"
    )


def test_graceful_goaway_leaves_h2_open_for_the_streams_below_it() -> None:
    """RFC 9113 §6.8: after our GOAWAY the client's PING, WINDOW_UPDATE and DATA on a stream up
    to its last-stream-id are processed, and we still send on that stream (HPACK in step)."""
    pair = Pair()
    stream_id = pair.open()
    pair.server.data_to_send()
    assert pair.server.graceful_goaway(b"max_age") == stream_id
    frames = sent_frames(pair.server.data_to_send())
    assert [type(f) for f in frames] == [GoAwayFrame]
    assert (frames[0].last_stream_id, frames[0].error_code, frames[0].additional_data) == (
        stream_id,
        ErrorCodes.NO_ERROR,
        b"max_age",
    )
    assert pair.server.state_machine.state != ConnectionState.CLOSED
    assert pair.server.graceful_goaway() == stream_id  # once recorded, the same id
    pair.server.data_to_send()
    # Frames the client sent before it read the GOAWAY (h2 closes on receiving one too).
    pair.client.ping(b"pingpong")
    pair.client.increment_flow_control_window(1024)
    pair.client.send_data(stream_id, b"x" * 100, end_stream=True)
    try:
        events = pair.to_server()
    except ProtocolError as exc:
        raise AssertionError(f"{CHANGED} a frame after graceful_goaway is an error") from exc
    kinds = {type(e) for e in events}
    assert {PingReceived, WindowUpdated, DataReceived, StreamEnded} <= kinds, kinds
    pair.server.acknowledge_received_data(100, stream_id)
    pair.server.send_headers(stream_id, [(b":status", b"200")])
    pair.server.send_headers(stream_id, [(b"grpc-status", b"14")], end_stream=True)
    answer = sent_frames(pair.server.data_to_send())
    assert [f for f in answer if isinstance(f, PingFrame) and "ACK" in f.flags]
    assert len([f for f in answer if isinstance(f, HeadersFrame)]) == 2
    pair.client.receive_data(b"".join(f.serialize() for f in answer))  # HPACK in step
    # A stream opened above the last-stream-id reaches us as a request: refusing it is ours.
    assert pair.open() > stream_id


def test_a_later_goaway_keeps_the_graceful_last_stream_id() -> None:
    """RFC 9113 §6.8: a later GOAWAY (ours, or h2's on a connection error) never raises the
    last-stream-id, though streams were opened (and refused) above it since."""
    for how in ("close_connection", "connection error"):
        pair = Pair()
        stream_id = pair.open()
        pair.server.graceful_goaway()
        pair.open()
        pair.server.data_to_send()
        if how == "close_connection":
            pair.server.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        else:
            with pytest.raises(ProtocolError):  # a PING of 1 byte: a connection error
                pair.server.receive_data(b"\x00\x00\x01\x06\x00\x00\x00\x00\x00\x00")
        goaways = [f for f in sent_frames(pair.server.data_to_send()) if isinstance(f, GoAwayFrame)]
        assert [f.last_stream_id for f in goaways] == [stream_id], (
            f"{CHANGED} a later GOAWAY ({how}) no longer takes ServerH2's last-stream-id"
        )
        assert goaways[0].error_code != ErrorCodes.NO_ERROR
        assert pair.server.state_machine.state == ConnectionState.CLOSED
        assert pair.server.graceful_goaway() is None  # closed: nothing more to send
