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
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import Event, RequestReceived, WindowUpdated
from h2.settings import SettingCodes, Settings
from h2.stream import H2Stream, StreamClosedBy
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
