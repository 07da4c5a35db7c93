"""Server-to-client bytes of the browser streams, packed by hand on the flush path.

A server's WebSocket frame is unmasked: FIN + opcode, a 7-bit length (or 126 and 16 bits, or
127 and 64 bits), then the payload (RFC 6455 section 5.2). A batch is one text frame holding
``{"type": ..., "seq": n, "updates": [...]}`` whose updates are the JSON fragments the hub
built once per tick (``codec.json_fragment``: each ends in a comma, the last one is cut).
An SSE event is ``id: n``, ``data: <the same JSON>`` and a blank line.
"""

from __future__ import annotations

import struct

_TEXT = 0x81  # FIN, opcode 1 (text)
_SHORT = struct.Struct(">BB")
_MEDIUM = struct.Struct(">BBH")
_LONG = struct.Struct(">BBQ")
_CLOSE_PAYLOAD = struct.Struct(">H")

SNAPSHOT = b'{"type":"snapshot","seq":%d,"updates":['
PRICES = b'{"type":"prices","seq":%d,"updates":['
TAIL = b"]}"
MAX_CLOSE_REASON = 123  # a control frame's payload is at most 125 bytes, 2 of them the code


def text_frame_header(length: int) -> bytes:
    """The header of one unmasked, final text frame of ``length`` payload bytes."""
    if length < 126:
        return _SHORT.pack(_TEXT, length)
    if length < 65536:
        return _MEDIUM.pack(_TEXT, 126, length)
    return _LONG.pack(_TEXT, 127, length)


def batch_json(seq: int, fragments: bytes, *, snapshot: bool = False) -> bytes:
    """The JSON text of one batch: ``fragments`` is the concatenation of comma-terminated
    update fragments (empty for an empty snapshot)."""
    head = (SNAPSHOT if snapshot else PRICES) % seq
    return b"".join((head, fragments[:-1], TAIL))


def websocket_batch(seq: int, fragments: bytes, *, snapshot: bool = False) -> bytes:
    """One batch as a whole WebSocket text frame, ready for the socket."""
    head = (SNAPSHOT if snapshot else PRICES) % seq
    body_length = len(head) + len(fragments) - 1 + len(TAIL) if fragments else len(head) + 2
    return b"".join((text_frame_header(body_length), head, fragments[:-1], TAIL))


def sse_batch(seq: int, fragments: bytes, *, snapshot: bool = False) -> bytes:
    """One batch as an SSE event: its ``id`` is the frame's seq, its data the same JSON."""
    return b"".join(
        (b"id: %d\ndata: " % seq, batch_json(seq, fragments, snapshot=snapshot), b"\n\n")
    )


def sse_retry(milliseconds: int) -> bytes:
    """The event that sets the client's reconnection delay."""
    return b"retry: %d\n\n" % milliseconds


SSE_HEARTBEAT = b": heartbeat\n\n"


def sse_close_event(code: int, reason: str) -> bytes:
    """The last event of a stream the server ends: ``event: close`` with the close code a
    WebSocket would have carried, so a client acts on it the same way."""
    reason = reason.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
    return b'event: close\ndata: {"type":"close","code":%d,"reason":"%s"}\n\n' % (
        code,
        reason.encode("utf-8"),
    )


def close_reason(reason: str) -> str:
    """A close frame's reason, cut to what fits (whole UTF-8 characters)."""
    data = reason.encode("utf-8")[:MAX_CLOSE_REASON]
    return data.decode("utf-8", "ignore")
