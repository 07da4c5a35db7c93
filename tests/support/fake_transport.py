"""An asyncio transport without a socket, for socket-free tests of the protocols."""

from __future__ import annotations

import asyncio
from typing import Any


class FakeTransport:
    """What the connection uses of an asyncio transport; ``close``/``abort`` end the
    connection on the next loop turn (``connection_lost``), as asyncio's transports do."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        self._protocol = protocol
        self.data = bytearray()
        self.closed = False  # close() was called
        self.aborted = False
        self.lost = False  # connection_lost was delivered
        self.reading = True
        self.buffer_limits: tuple[int | None, int | None] | None = None
        self.writes_after_close = 0
        # False: a peer that stopped reading; close() then never completes (the buffered
        # output never leaves), only abort() ends the connection.
        self.drains = True
        self.eof_written = False

    def write(self, data: bytes) -> None:
        if self.eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")  # as asyncio's
        if self.lost:
            return  # as asyncio's transports: dropped once the connection is gone
        if self.closed or self.aborted:
            self.writes_after_close += 1  # asyncio's selector transport still sends these
        self.data += data

    def _lose(self) -> None:
        if not self.lost:
            self.lost = True
            self._protocol.connection_lost(None)

    def close(self) -> None:
        if not (self.closed or self.aborted):
            self.closed = True
            if self.drains:
                asyncio.get_running_loop().call_soon(self._lose)

    def abort(self) -> None:
        if not self.aborted:
            self.aborted = True
            asyncio.get_running_loop().call_soon(self._lose)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.buffer_limits = (high, low)

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "socket": None}.get(name, default)
