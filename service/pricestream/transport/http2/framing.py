"""gRPC's wire format over HTTP/2, by hand where it is hot.

A gRPC message is a 5-byte prefix (compressed flag, 4-byte big-endian length) and its bytes,
carried in DATA frames (9-byte header: 24-bit length, type 0, flags, stream id). Everything
else HTTP/2 (HEADERS and HPACK, SETTINGS, WINDOW_UPDATE, PING, RST_STREAM, GOAWAY) goes through
``h2``; only DATA frames are written here, so that the batches of all due streams of a
connection can be encoded in one pass and written at once.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterable, Sequence
from urllib.parse import quote

import grpc

PREFIX_BYTES = 5
MESSAGE_PREFIX = struct.Struct(">BI")  # compressed flag, message length
_DATA_HEADER = struct.Struct(">BHBBI")  # length (24 bits as 8 + 16), type, flags, stream id
# A DATA frame header followed by the message prefix, for a message sent whole in one frame:
# pack (frame length << 8, stream id, message length): the frame's 24-bit length and type 0
# (DATA) in one word, flags 0 (a pad byte), the stream id, the compressed flag 0 (a pad byte),
# the message length.
SINGLE_FRAME_HEADER = struct.Struct(">IxIxI")

Metadata = tuple[tuple[str, str | bytes], ...]


def data_frame_header(length: int, stream_id: int) -> bytes:
    return _DATA_HEADER.pack(length >> 16, length & 0xFFFF, 0, 0, stream_id)


def data_frames(data: memoryview, stream_id: int, max_frame: int) -> list[bytes | memoryview]:
    """``data`` as DATA frames of at most ``max_frame`` bytes each (no END_STREAM)."""
    out: list[bytes | memoryview] = []
    for start in range(0, len(data), max_frame):
        chunk = data[start : start + max_frame]
        out.append(data_frame_header(len(chunk), stream_id))
        out.append(chunk)
    return out


class MessageTooLarge(Exception):
    """A request message is larger than the server accepts."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"request message of {size} bytes is over the limit of {limit} bytes")


class CompressedMessage(Exception):
    """A request message is compressed; this server accepts identity encoding only."""


class MessageReader:
    """Splits the request bytes of one stream into messages, bounded by ``limit`` bytes each."""

    __slots__ = ("_buffer", "_limit")

    def __init__(self, limit: int) -> None:
        self._buffer = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; the messages now complete (MessageTooLarge, CompressedMessage)."""
        buffer = self._buffer
        buffer += data
        messages = []
        while len(buffer) >= PREFIX_BYTES:
            compressed, length = MESSAGE_PREFIX.unpack_from(buffer)
            if compressed:
                raise CompressedMessage
            if length > self._limit:
                raise MessageTooLarge(length, self._limit)
            end = PREFIX_BYTES + length
            if len(buffer) < end:
                break
            messages.append(bytes(buffer[PREFIX_BYTES:end]))
            del buffer[:end]
        return messages

    @property
    def partial(self) -> bool:
        """Bytes of an incomplete message are waiting."""
        return bool(self._buffer)


_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_timeout(value: bytes) -> float | None:
    """``grpc-timeout`` (1 to 8 digits and a unit) in seconds, or None when malformed."""
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in _TIMEOUT_UNITS:
        return None
    return int(digits) * _TIMEOUT_UNITS[unit]


# Headers of the transport itself: never handed to a handler as call metadata.
_RESERVED = frozenset(
    {b"te", b"content-type", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding"}
)


def call_metadata(headers: Iterable[tuple[bytes, bytes]]) -> Metadata:
    """Request headers as grpc.aio hands them to servicers: lower-case str keys, str values,
    ``-bin`` values base64-decoded to bytes; pseudo-headers and transport headers left out."""
    out: list[tuple[str, str | bytes]] = []
    for key, value in headers:
        if key.startswith(b":") or key in _RESERVED:
            continue
        name = key.decode("ascii", "replace")
        if name.endswith("-bin"):
            try:
                out.append((name, base64.b64decode(value + b"=" * (-len(value) % 4))))
            except ValueError:
                continue  # an undecodable binary header is dropped, as gRPC does
        else:
            out.append((name, value.decode("latin-1")))
    return tuple(out)


def encode_metadata(metadata: Sequence[tuple[str, str | bytes]]) -> list[tuple[bytes, bytes]]:
    """Servicer metadata as HTTP/2 headers (``-bin`` values base64 without padding)."""
    out = []
    for key, value in metadata:
        name = key.lower().encode("ascii")
        if name.endswith(b"-bin"):
            raw = value if isinstance(value, bytes) else value.encode()
            out.append((name, base64.b64encode(raw).rstrip(b"=")))
        else:
            out.append((name, value.encode("latin-1") if isinstance(value, str) else value))
    return out


RESPONSE_HEADERS = ((b":status", b"200"), (b"content-type", b"application/grpc"))


def status_headers(code: grpc.StatusCode, message: str) -> list[tuple[bytes, bytes]]:
    """``grpc-status`` and, when there is one, the percent-encoded ``grpc-message``."""
    out = [(b"grpc-status", str(code.value[0]).encode())]
    if message:
        encoded = quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")
        out.append((b"grpc-message", encoded.encode("ascii")))
    return out
