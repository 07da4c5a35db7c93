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
        "_due_since",
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
        self._due_since = 0.0
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

    def behind(self, now: float, grace: float) -> bool:
        """Busy with an earlier flush for longer than ``grace`` seconds: its write still in
        flight, or woken and not yet taken (monotonic clock)."""
        started = self.write_started
        if started is not None:
            return now - started > grace
        return self._due and now - self._due_since > grace

    def wake(self, now: float) -> None:
        self._queued = False
        if not self._due:
            self._due = True
            self._due_since = now
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

BACKLOG_MIN_STREAMS = 50  # fewer writers behind than this never count as a backlog
BACKLOG_GRACE = 0.25  # seconds (at least one flush interval) a writer may be busy and not behind
SMOOTHING = 0.2  # weight of the newest flush in the moving averages of lateness and backlog


class FlushClock:
    """Wakes the writers with news once per interval and judges whether the pod is overloaded.

    Two signs of overload, each a moving average over the flushes: the clock itself running late
    (`lag`: the event loop has more work than its CPU), and the share of writers with news that
    have been busy with an earlier flush for over an interval, at least 250 ms (`backlog`: the
    pod writes fewer batches per second than its streams need, which happens with a punctual
    clock when gRPC's writes are the bottleneck). Past either limit the pod is overloaded until
    both fall below half of theirs.
    """

    def __init__(
        self,
        interval: float,
        stall_timeout: float,
        metrics: Metrics,
        on_stall: Callable[[StreamWriter], None],
        overload_lag: float = 0.0,
        overload_backlog: float = 0.0,
    ) -> None:
        self._interval = interval
        self._overload_lag = overload_lag
        self._overload_backlog = overload_backlog
        self._stall_timeout = stall_timeout
        self._metrics = metrics
        self._on_stall = on_stall
        self._queued: list[StreamWriter] = []
        self._writers: set[StreamWriter] = set()
        self._coalesced = 0
        self.lag = 0.0  # seconds the flushes run late (moving average)
        self.backlog = 0.0  # share of writers with news still busy with the last flush (average)
        self.overloaded = False

    def observe(self, late: float, backlog: float) -> None:
        """Fold one flush's lateness and backlog into the averages and update `overloaded`.
        A limit of 0 turns that sign off."""
        self.lag += SMOOTHING * (max(late, 0.0) - self.lag)
        self.backlog += SMOOTHING * (backlog - self.backlog)
        lag_limit, backlog_limit = self._overload_lag, self._overload_backlog
        over = (lag_limit > 0 and self.lag > lag_limit) or (
            backlog_limit > 0 and self.backlog > backlog_limit
        )
        calm = (lag_limit <= 0 or self.lag <= lag_limit / 2) and (
            backlog_limit <= 0 or self.backlog <= backlog_limit / 2
        )
        if self.overloaded and calm:
            self.overloaded = False
            log.info("no longer overloaded", extra={"event": "overloaded", "overloaded": False})
        elif not self.overloaded and over:
            self.overloaded = True
            log.warning(
                "overloaded: %s; refusing new sessions",
                self.overload_reason(),
                extra={
                    "event": "overloaded",
                    "overloaded": True,
                    "lag_seconds": round(self.lag, 3),
                    "backlog_ratio": round(self.backlog, 3),
                },
            )

    def overload_reason(self) -> str:
        """Why the pod is overloaded, as a phrase for logs and for refused clients."""
        if self._overload_lag > 0 and self.lag > self._overload_lag / 2:
            return f"its flushes run {self.lag * 1000:.0f} ms late"
        return f"{self.backlog:.0%} of its streams with news are still writing their previous batch"

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
            if late > self._interval:
                next_flush = loop.time()  # we fell behind: do not try to catch up in a burst
            queued, self._queued = self._queued, []
            now = time.monotonic()
            grace = max(self._interval, BACKLOG_GRACE)
            behind = 0
            for writer in queued:
                behind += writer.behind(now, grace)
                writer.wake(now)
            # A few stalled clients are the stall timeout's business, not overload.
            self.observe(late, behind / len(queued) if behind >= BACKLOG_MIN_STREAMS else 0.0)
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
