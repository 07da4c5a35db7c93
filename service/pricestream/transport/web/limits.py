"""What one browser connection may cost the server, and the timings of its streams."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WebLimits:
    max_head_bytes: int = 16 * 1024  # request line and headers (431 beyond)
    max_body_bytes: int = 64 * 1024  # a REST request's body (413 beyond)
    head_timeout: float = 10.0  # seconds from accept (or a request's first byte) to its head
    idle_timeout: float = 60.0  # seconds a keep-alive connection may wait for its next request
    max_client_message: int = 4 * 1024  # a client's WebSocket message, ignored; 1009 beyond
    client_ping_burst: int = 10  # pings a client may send at once ...
    client_pings_per_second: float = 1.0  # ... and the rate it may keep up (1008 beyond)
    ping_interval: float = 25.0  # seconds between the server's pings (under proxies' 60 s)
    pong_timeout: float = 10.0  # seconds a pong may take (4001 beyond)
    close_timeout: float = 5.0  # seconds the peer has to answer our close frame
    sse_heartbeat: float = 15.0  # seconds between SSE comment lines
    sse_retry_ms: int = 2000  # the reconnection delay an SSE client is given
    # A socket whose unsent output passes the high mark refuses batches (newer prices coalesce
    # in its writer) until it drained to the low mark.
    write_buffer_high: int = 64 * 1024
    write_buffer_low: int = 16 * 1024
    send_buffer_bytes: int | None = None  # the kernel's SO_SNDBUF per socket (None: its own)
