"""The web port's listener: its connections, their streams, and shutdown.

It counts each stream where it starts and ends (``StreamObserver``, the metrics) and keeps the
live ones, so the gauges read state, not counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Literal, Protocol

from pricestream.transport.sockets import listening_socket
from pricestream.transport.web.connection import WebApplication, WebConnection
from pricestream.transport.web.limits import WebLimits

log = logging.getLogger("pricestream.web")

StreamKind = Literal["websocket", "sse"]


class StreamObserver(Protocol):
    """Counts browser streams at the socket boundary (``observability.web_metrics``)."""

    def opened(self, kind: StreamKind) -> None: ...

    def closed(self, kind: StreamKind, code: int) -> None: ...


class WebServer:
    def __init__(self, app: WebApplication, limits: WebLimits, observer: StreamObserver) -> None:
        self.app = app
        self.limits = limits
        self._observer = observer
        self._connections: set[WebConnection] = set()
        self.websockets: set[WebConnection] = set()
        self.event_streams: set[WebConnection] = set()
        self._listener: asyncio.Server | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self, host: str, port: int) -> int:
        """Listen; the bound port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        sock = listening_socket(host, port)
        try:
            self._listener = await loop.create_server(
                lambda: WebConnection(self), sock=sock, backlog=4096
            )
        except BaseException:
            sock.close()
            raise
        return int(sock.getsockname()[1])

    # --- ConnectionOwner ----------------------------------------------------------------------

    def connection_opened(self, conn: WebConnection) -> None:
        self._connections.add(conn)
        self._idle.clear()

    def connection_closed(self, conn: WebConnection) -> None:
        self._connections.discard(conn)
        if not self._connections:
            self._idle.set()

    def stream_opened(self, conn: WebConnection, kind: StreamKind) -> None:
        (self.websockets if kind == "websocket" else self.event_streams).add(conn)
        self._observer.opened(kind)

    def stream_closed(self, conn: WebConnection, kind: StreamKind, code: int) -> None:
        (self.websockets if kind == "websocket" else self.event_streams).discard(conn)
        self._observer.closed(kind, code)

    # --- shutdown -----------------------------------------------------------------------------

    def stop_listening(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def close_idle(self) -> None:
        """Close keep-alive connections that wait for their next request."""
        for conn in list(self._connections):
            if conn.idle:
                conn.abort()

    async def stop(self, grace: float) -> None:
        """Stop listening, give open connections ``grace`` seconds to finish, drop the rest."""
        self.stop_listening()
        self.close_idle()
        if self._connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        for conn in list(self._connections):
            conn.abort()
        if self._connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 1.0)
        if self._connections:
            log.warning("%d web connections did not close in time", len(self._connections))
