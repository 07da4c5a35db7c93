"""What one client connection may cost the server, and the budgets that bound HTTP/2 abuse.

Every limit here answers a known attack or a resource a peer could otherwise grow without
bound: rapid reset (CVE-2023-44487), SETTINGS and PING floods, oversized header lists (HPACK
bombs; CONTINUATION floods are bounded by h2 itself to 64 frames of at most
``max_frame_size``), more concurrent streams than advertised, connections that never finish
their handshake, and peers that stop reading (flow control plus the write-buffer limit).
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    # Advertised as SETTINGS_MAX_CONCURRENT_STREAMS and enforced as advertised: a stream the
    # client reset no longer counts (RFC 9113 §5.1.2), even while its handler still ends.
    max_concurrent_streams: int = 20_000
    # Handlers of client-reset streams still ending, on top of max_concurrent_streams (None:
    # as many again): past it a new stream is refused (REFUSED_STREAM) until some have ended,
    # so resets never run more than max_concurrent_streams + this many handlers at once.
    max_ending_calls: int | None = None
    max_request_bytes: int = 64 * 1024  # one request message
    max_send_message_bytes: int = 4 * 1024 * 1024  # one response message
    max_header_list_size: int = 16 * 1024  # decoded request headers (HPACK bombs)
    initial_window_size: int = 1024 * 1024  # what a client may send us ahead, per stream
    handshake_timeout: float = 10.0  # seconds from accept to the client's SETTINGS
    keepalive_time: float = 30.0  # idle seconds before the server pings
    keepalive_timeout: float = 10.0  # seconds the ping may take before the connection is closed
    min_ping_interval: float = 10.0  # client pings closer than this are strikes ...
    max_ping_strikes: int = 2  # ... and past this many, without data in between, GOAWAY
    early_reset_age: float = 1.0  # a reset within this many seconds of the stream, unanswered,
    early_resets_burst: int = 200  # is early; a client may reset this many streams early ...
    early_resets_per_second: float = 20.0  # ... and the rate it may keep up
    settings_burst: int = 100  # SETTINGS frames a client may send at once ...
    settings_per_second: float = 10.0  # ... and the rate it may keep up
    write_buffer_high: int = 2 * 1024 * 1024  # unsent bytes at which a connection stops taking
    write_buffer_low: int = 512 * 1024  # batches (and reading) until it drained to this
    max_connection_age: float = 900.0  # seconds before GOAWAY, so clients spread to new pods
    max_connection_age_grace: float = 10.0  # seconds streams get after that

    @property
    def max_calls(self) -> int:
        """Handlers one connection may run at once: its streams and those still ending."""
        ending = (
            self.max_concurrent_streams if self.max_ending_calls is None else self.max_ending_calls
        )
        return self.max_concurrent_streams + ending


class PingPolicy:
    """gRPC's ping-abuse rule: a client ping that comes less than ``min_interval`` after the
    previous one is a strike unless the server sent data in between; too many strikes and the
    connection is closed with GOAWAY ENHANCE_YOUR_CALM ``too_many_pings``."""

    __slots__ = ("_last", "_max_strikes", "_min_interval", "strikes")

    def __init__(self, min_interval: float, max_strikes: int) -> None:
        self._min_interval = min_interval
        self._max_strikes = max_strikes
        self._last = float("-inf")
        self.strikes = 0

    def data_sent(self) -> None:
        self.strikes = 0
        self._last = float("-inf")

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self._last < self._min_interval:
            self.strikes += 1
        self._last = now
        return self.strikes <= self._max_strikes
