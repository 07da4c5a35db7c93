"""Coalescing per stream and one shared clock that flushes every stream with news.

A ``StreamWriter`` keeps only the latest entry per ticker, so its memory is bounded by its
ticker count whatever the tick rate. The ``FlushClock`` is the only timer: once per flush
interval it wakes exactly the writers that received something, and once per second it cuts
off writers whose client has left a batch unread for longer than the stall timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from pricestream.hub import Entry
from pricestream.metrics import Metrics


class StreamWriter:
    """The per-stream state between the hub (``offer``) and the gRPC call (``next_batch``)."""

    __slots__ = (
        "_clock",
        "_due",
        "_queued",
        "_task",
        "_waiter",
        "end_code",
        "end_message",
        "end_reason",
        "offered",
        "pending",
        "write_started",
    )

    def __init__(self, clock: FlushClock) -> None:
        self._clock = clock
        self.pending: dict[str, Entry] = {}
        self.offered = 0
        self._queued = False
        self._due = False
        self._waiter: asyncio.Future[None] | None = None
        self._task = asyncio.current_task()
        self.write_started: float | None = None
        self.end_reason: str | None = None
        self.end_code = grpc.StatusCode.OK
        self.end_message = ""

    def offer(self, ticker: str, entry: Entry) -> None:
        self.pending[ticker] = entry
        self.offered += 1
        if not self._queued:
            self._queued = True
            self._clock.queue(self)

    def seed(self, ticker: str, entry: Entry) -> None:
        """Offer a last-known price unless a newer one already arrived through Pub/Sub."""
        current = self.pending.get(ticker)
        if current is None or current[2] < entry[2]:
            self.offer(ticker, entry)

    def wake(self) -> None:
        self._queued = False
        self._due = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_due(self) -> None:
        """Return at the next flush that has news for this stream, or when it must stop."""
        while not self._due and self.end_reason is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._due = False

    def take(self) -> tuple[bytes, list[int]]:
        """The pending entries as one encoded ``PriceUpdateBatch`` and their publish times."""
        entries = self.pending.values()
        payload = b"".join([entry[0] for entry in entries])
        published = [entry[1] for entry in entries]
        self._clock.count_coalesced(self.offered - len(published))
        self.offered = 0
        self.pending = {}
        return payload, published

    def stop(self, reason: str, code: grpc.StatusCode, message: str) -> None:
        """End the stream from outside (close, shutdown, stall, lost lease); first reason wins."""
        if self.end_reason is not None:
            return
        self.end_reason = reason
        self.end_code = code
        self.end_message = message
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        elif self.write_started is not None and reason == "slow_consumer" and self._task:
            self._task.cancel()  # the client is not reading: abandon the pending write


log = logging.getLogger("pricestream.flush")

LAG_SMOOTHING = 0.2  # weight of the newest flush in the moving average of lateness


class FlushClock:
    def __init__(
        self,
        interval: float,
        stall_timeout: float,
        metrics: Metrics,
        on_stall: Callable[[StreamWriter], None],
        overload_lag: float = 0.0,
    ) -> None:
        self._interval = interval
        self._overload_lag = overload_lag
        self._stall_timeout = stall_timeout
        self._metrics = metrics
        self._on_stall = on_stall
        self._queued: list[StreamWriter] = []
        self._writers: set[StreamWriter] = set()
        self._coalesced = 0
        self.lag = 0.0  # seconds the flushes run late (moving average): the loop's overload
        self.overloaded = False

    def observe_lag(self, late: float) -> None:
        """Fold one flush's lateness into `lag`; past `overload_lag` the pod is overloaded until
        the lag falls below half of it (hysteresis). 0 turns overload off."""
        self.lag += LAG_SMOOTHING * (max(late, 0.0) - self.lag)
        if self._overload_lag <= 0:
            return
        if self.overloaded and self.lag <= self._overload_lag / 2:
            self.overloaded = False
            log.info("no longer overloaded", extra={"event": "overloaded", "overloaded": False})
        elif not self.overloaded and self.lag > self._overload_lag:
            self.overloaded = True
            log.warning(
                "overloaded: flushes run %.0f ms late; refusing new sessions",
                self.lag * 1000,
                extra={
                    "event": "overloaded",
                    "overloaded": True,
                    "lag_seconds": round(self.lag, 3),
                },
            )

    def register(self, writer: StreamWriter) -> None:
        self._writers.add(writer)

    def unregister(self, writer: StreamWriter) -> None:
        self._writers.discard(writer)

    def queue(self, writer: StreamWriter) -> None:
        self._queued.append(writer)

    def count_coalesced(self, count: int) -> None:
        self._coalesced += count

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_flush = loop.time()
        next_stall_check = next_flush + 1.0
        while True:
            next_flush += self._interval
            delay = next_flush - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            late = loop.time() - next_flush
            self.observe_lag(late)
            if late > self._interval:
                next_flush = loop.time()  # we fell behind: do not try to catch up in a burst
            queued, self._queued = self._queued, []
            for writer in queued:
                writer.wake()
            if self._coalesced:
                self._metrics.updates_coalesced.inc(self._coalesced)
                self._coalesced = 0
            if next_flush >= next_stall_check:
                next_stall_check = next_flush + 1.0
                self._cut_off_stalled()

    def _cut_off_stalled(self) -> None:
        deadline = time.monotonic() - self._stall_timeout
        for writer in list(self._writers):
            started = writer.write_started
            if started is not None and started < deadline and writer.end_reason is None:
                self._on_stall(writer)
