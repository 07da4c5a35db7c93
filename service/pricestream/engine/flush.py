"""Coalescing per stream and one shared clock that flushes every stream with news.

A ``StreamWriter`` keeps only the latest entry per ticker (its ``pending`` dict, which the hub
stores into), so its memory is bounded by its ticker count whatever the tick rate. The
``FlushClock`` is the only timer: once per flush interval it hands the batch of every writer
with something pending to that writer's ``BatchSink`` (the transport's side of the stream);
once per second it cuts off writers that have not kept up with their client's window for
longer than the stall timeout. A writer whose previous batch is still waiting sends nothing
and keeps coalescing until its sink says the window opened again.

The interval is divided into phases of about 33 ms (3 at the default 100 ms), and every sink's
``flush_group`` (for our transport: its connection) is given one phase, the least loaded when
the group's first writer registers. Each tick flushes one phase's writers in one synchronous
pass, so the batches of all streams of a connection still leave in one socket write per
interval, while the pod's output (and its clients' work) comes in smaller bursts: in one pass
per interval, every connection's write waited for the end of a pass over all streams, and the
clients received every stream's batch at once. Each update still waits at most one interval
for its writer's tick; a tick that comes late flushes every phase that is due.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from itertools import compress
from operator import itemgetter
from typing import Protocol

import grpc

from pricestream.engine.hub import Entry
from pricestream.observability.metrics import Metrics

MESSAGE_PREFIX_BYTES = 5  # gRPC's length prefix, counted against the send limit
# A stream's counts of what it sent are kept below this on the hot path, then folded into its
# totals: CPython keeps one shared object for each int up to 256, so a count that stays small
# is never an int object of the stream's own, read (a cache miss, at 10,000 streams) by every
# batch. 200 leaves room for a batch of 56 tickers before a count passes 256.
TALLY_FOLD = 200
_FRAME = itemgetter(0)  # of an Entry: its encoded batch frame
_PUBLISHED = itemgetter(1)  # of an Entry: its publisher's timestamp


class BatchSink(Protocol):
    """Where a stream's encoded ``PriceUpdateBatch`` messages go (one stream of the
    transport). ``send`` never blocks: a batch the client's window cannot take now waits in
    the sink, ``blocked_since`` tells since when (monotonic, None while nothing waits), and
    the ``on_writable`` callback runs once the waiting batch is out. Sinks with the same
    ``flush_group`` (any hashable, e.g. their connection) are flushed on the same tick."""

    @property
    def blocked_since(self) -> float | None: ...

    @property
    def flush_group(self) -> object: ...

    def send(self, payload: bytes) -> bool:
        """Queue one batch; True if it is out now, False if it waits for the window."""
        ...

    def on_writable(self, callback: Callable[[], None]) -> None: ...


class StreamWriter:
    """The per-stream state between the hub (which stores into ``pending``) and the stream's
    sink (``flush_all``)."""

    __slots__ = (
        "_batch_tally",
        "_batches_folded",
        "_clock",
        "_ended",
        "_max_bytes",
        "_sent_at",
        "_sink",
        "_update_tally",
        "_updates_folded",
        "behind_since",
        "end_code",
        "end_message",
        "end_reason",
        "pending",
        "phase",
        "started",
    )

    def __init__(self, clock: FlushClock, sink: BatchSink, max_bytes: int) -> None:
        self._clock = clock
        self._sink = sink
        # The send limit, prefix included: the settings' int, one object shared by every
        # writer (a per-writer int computed from it would be one more cache miss per batch).
        self._max_bytes = max_bytes
        # The latest entry per ticker not sent yet. The hub stores into it directly (see
        # Hub.on_message) and the clock finds the writers with news by it. The same dict for
        # the writer's life (the hub and the clock hold it): emptied, never replaced.
        self.pending: dict[str, Entry] = {}
        self._ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.end_reason: str | None = None
        self.end_code = grpc.StatusCode.OK
        self.end_message = ""
        # Batches and updates sent: the totals folded so far plus the tallies (see TALLY_FOLD).
        self._batch_tally = self._update_tally = 0
        self._batches_folded = self._updates_folded = 0
        self._sent_at = 0.0
        # Since when (monotonic) this stream has not kept up: its batches wait for the client's
        # window for longer than the clock's grace. Cleared only once one goes out in time, so
        # a client that lets a trickle through while not reading is still cut off.
        self.behind_since: float | None = None
        # False until the stream's first batch (every last known price) is complete: until
        # then Pub/Sub news only coalesces, so the first batch carries all tickers at once.
        self.started = False
        self.phase = 0  # the clock's tick that flushes this writer, set by FlushClock.register
        sink.on_writable(self._writable)

    @property
    def flush_group(self) -> object:
        return self._sink.flush_group

    @property
    def batches_sent(self) -> int:
        return self._batches_folded + self._batch_tally

    @property
    def updates_sent(self) -> int:
        return self._updates_folded + self._update_tally

    def _fold(self, update_tally: int) -> None:
        """Move the tallies (the updates' given, past TALLY_FOLD) into the totals."""
        self._updates_folded += update_tally
        self._batches_folded += self._batch_tally
        self._update_tally = self._batch_tally = 0

    @staticmethod
    def flush_all(
        writers: list[StreamWriter], now: float, grace: float, published: list[int]
    ) -> tuple[int, int]:
        """Hand each writer's pending entries to its sink as one batch, unless the sink is
        still busy with the previous one (then they keep coalescing until it is writable).

        Appends the batches' publish times to ``published``; returns the batches sent and
        how many writers were behind (busy for longer than ``grace``). The hot path: one
        loop turn per stream with news per flush, written for the fewest bytecodes (a call
        per stream cost as much as a tenth of a batch's trip through the pod).
        """
        batches = behind = 0
        for writer in writers:
            since = writer.behind_since
            if since is not None and now - since > grace:
                behind += 1
            pending = writer.pending
            if not pending or not writer.started or writer.end_reason is not None:
                continue
            sink = writer._sink
            blocked = sink.blocked_since
            if blocked is not None:
                if since is None:
                    # News waits behind output the sink took before it (a browser socket's
                    # pong or heartbeat filled it): behind since then, like a batch of its own.
                    writer.behind_since = writer._sent_at = blocked
                continue
            count = len(pending)
            if count == 1:  # the common case at a short flush interval
                ((payload, published_at, _),) = pending.values()
                published.append(published_at)
            else:
                entries = pending.values()
                payload = b"".join(map(_FRAME, entries))
                published += map(_PUBLISHED, entries)
            if len(payload) + MESSAGE_PREFIX_BYTES > writer._max_bytes:
                del published[-count:]
                writer.stop(
                    "send_error",
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"a batch of {len(payload)} bytes is over the send limit of "
                    f"{writer._max_bytes} bytes",
                )
                continue
            batches += 1
            writer._batch_tally += 1
            tally = writer._update_tally + count
            if tally > TALLY_FOLD:
                writer._fold(tally)
            else:
                writer._update_tally = tally
            # The same dict for the stream's life: a new one per batch, alive until the next
            # flush, outlived young collections and filled the old generation, whose full
            # collections then paused the loop for up to half a second at 10,000 streams.
            pending.clear()
            if sink.send(payload):
                writer.behind_since = None
            else:
                writer._sent_at = now  # when the waiting batch was handed over (_writable)
                if since is None:
                    writer.behind_since = now
        return batches, behind

    def _writable(self) -> None:
        """The sink let its waiting batch out: caught up if that took no longer than the
        clock's grace. What coalesced meanwhile goes at the writer's next tick."""
        if time.monotonic() - self._sent_at <= self._clock.grace:
            self.behind_since = None

    async def ended(self) -> None:
        """Return once the stream has been stopped (``stop``)."""
        await self._ended

    def stop(self, reason: str, code: grpc.StatusCode, message: str) -> None:
        """End the stream from outside (close, shutdown, stall, lost lease); first reason wins."""
        if self.end_reason is not None:
            return
        self.end_reason = reason
        self.end_code = code
        self.end_message = message
        self._clock.discard(self.pending)
        if not self._ended.done():
            self._ended.set_result(None)


log = logging.getLogger("pricestream.flush")

# The clock ticks about this often, flushing one phase per tick. Measured (make bench, 5,000
# streams at 100 ms): 3 phases cut the client's p99 from 138-173 to 115 ms for about 5% more
# CPU per update; 10 ms phases (10 per interval) reached 105 ms but cost 10-30% more CPU (each
# tick's work and the clients' replies no longer share the event loop's wake-ups).
PHASE_SECONDS = 1 / 30
MAX_PHASES = 16
BACKLOG_MIN_STREAMS = 50  # fewer writers behind than this never count as a backlog
BACKLOG_GRACE = 0.25  # seconds (at least one flush interval) a writer may be busy and not behind
SMOOTHING = 0.2  # weight of the newest flush in the moving averages of lateness and backlog


class FlushClock:
    """Flushes the writers with news once per interval and judges whether the pod is
    overloaded.

    Two signs of overload, each a moving average over the flushes: the clock itself running late
    (`lag`: the event loop has more work than its CPU), and the share of writers with news that
    have not kept up with their clients for over an interval, at least 250 ms (`backlog`: the
    pod's batches cannot leave as fast as its streams need, with a punctual clock: clients or
    the network slower than the flow, or the pod's socket buffers full). Past either limit the
    pod is overloaded until both fall below half of theirs.
    """

    def __init__(
        self,
        interval: float,
        stall_timeout: float,
        metrics: Metrics,
        on_stall: Callable[[StreamWriter], None],
        overload_lag: float = 0.0,
        overload_backlog: float = 0.0,
        offered: Callable[[], int] = lambda: 0,
    ) -> None:
        """``offered`` tells how many entries have been stored into writers' ``pending`` so
        far (the hub's count): what was neither sent, nor discarded, nor pending was coalesced.
        """
        self._interval = interval
        self._overload_lag = overload_lag
        self._overload_backlog = overload_backlog
        self._stall_timeout = stall_timeout
        self._metrics = metrics
        self._on_stall = on_stall
        self.phases = max(1, min(MAX_PHASES, round(interval / PHASE_SECONDS)))
        # Per phase, its registered writers and their pending dicts: a tick flushes the writers
        # whose dict is not empty, found in C (itertools.compress), so the hub's stores need no
        # per-writer bookkeeping.
        self._phase_pending: list[dict[StreamWriter, dict[str, Entry]]] = [
            {} for _ in range(self.phases)
        ]
        # flush group -> [its phase, its registered writers]; a group leaves with its last writer.
        self._groups: dict[object, list[int]] = {}
        self._offered = offered
        self._discarded = 0  # entries dropped unsent: a stopped or unregistered writer's
        self._sent_total = 0  # entries sent, since the start
        self._coalesced_counted = 0  # what the coalesced counter has been given so far
        self._updates_sent = 0
        self._batches_sent = 0
        self._observe_latency = metrics.delivery_latency.observe_batch
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
        """Take a writer into the flushes, on its flush group's phase (a new group gets the
        phase with the fewest writers). Every registered writer is unregistered once."""
        if writer in self._phase_pending[writer.phase]:
            return
        group = writer.flush_group
        membership = self._groups.get(group)
        if membership is None:
            counts = self.phase_writers
            membership = self._groups[group] = [counts.index(min(counts)), 0]
        membership[1] += 1
        writer.phase = membership[0]
        self._phase_pending[writer.phase][writer] = writer.pending

    def unregister(self, writer: StreamWriter) -> None:
        """Take a writer out of the flushes; what it still had pending is discarded."""
        if self._phase_pending[writer.phase].pop(writer, None) is None:
            return
        self.discard(writer.pending)
        group = writer.flush_group
        membership = self._groups[group]
        membership[1] -= 1
        if not membership[1]:
            del self._groups[group]

    def discard(self, pending: dict[str, Entry]) -> None:
        """Empty a writer's pending entries unsent (counted apart from the coalesced ones)."""
        self._discarded += len(pending)
        pending.clear()

    @property
    def phase_writers(self) -> list[int]:
        """Writers registered per phase."""
        return [len(members) for members in self._phase_pending]

    @property
    def flush_groups(self) -> int:
        """Flush groups (connections) with a registered writer."""
        return len(self._groups)

    def flush_now(self, writer: StreamWriter) -> None:
        """Start a writer: send its pending batch at once (a stream's first batch), counted
        as the flushes count theirs."""
        writer.started = True
        published: list[int] = []
        batches, _ = StreamWriter.flush_all([writer], time.monotonic(), self.grace, published)
        self._batches_sent += batches
        self._account(published, time.time_ns())

    def _account(self, published: list[int], now_ns: int) -> None:
        if not published:
            return
        self._updates_sent += len(published)
        self._observe_latency(now_ns, published)

    @property
    def grace(self) -> float:
        """Seconds a batch may wait for its client before the stream counts as behind."""
        return max(self._interval, BACKLOG_GRACE)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        phases = self.phases
        tick = self._interval / phases
        next_tick = loop.time()
        next_stall_check = next_tick + 1.0
        phase = 0
        # A full round of phases is one interval: lateness and backlog are judged per round.
        round_late = 0.0
        round_behind = round_queued = 0
        while True:
            next_tick += tick
            delay = next_tick - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            late = loop.time() - next_tick
            if late > self._interval:
                due = phases  # every phase is overdue: flush them all now, no burst after
                next_tick = loop.time()
            else:
                due = min(phases, 1 + int(max(late, 0.0) / tick))  # the ticks that have come
                next_tick += (due - 1) * tick
            round_late = max(round_late, late)
            now = time.monotonic()
            grace = self.grace
            batches = 0
            published: list[int] = []
            wrapped = False
            for _ in range(due):
                members = self._phase_pending[phase]
                queued = list(compress(members, members.values()))  # the writers with news
                sent, behind = StreamWriter.flush_all(queued, now, grace, published)
                batches += sent
                round_behind += behind
                round_queued += len(queued)
                phase += 1
                if phase == phases:
                    phase = 0
                    # A few stalled clients are the stall timeout's business, not overload.
                    backlog = 0.0
                    if round_behind >= BACKLOG_MIN_STREAMS:
                        backlog = round_behind / round_queued
                    self.observe(round_late, backlog)
                    wrapped = True
                    round_late = 0.0
                    round_behind = round_queued = 0
            self._batches_sent += batches
            self._account(published, time.time_ns())
            if wrapped:
                self.fold_counts()
            if next_tick >= next_stall_check:
                next_stall_check = next_tick + 1.0
                self._cut_off_stalled()
                self.count_coalesced()

    def fold_counts(self) -> None:
        """Add what was sent since the last call to the Prometheus counters."""
        metrics = self._metrics
        if self._batches_sent:
            metrics.batches_sent.inc(self._batches_sent)
            metrics.updates_sent.inc(self._updates_sent)
            self._sent_total += self._updates_sent
            self._batches_sent = self._updates_sent = 0

    def count_coalesced(self) -> None:
        """Add the entries coalesced since the last call to their counter (once a second:
        it reads the length of every writer's pending dict)."""
        # Every stored entry is sent, discarded, still pending, or was replaced by a newer one
        # for its ticker before a flush (coalesced): so the last is counted from the others.
        in_flight = sum(sum(map(len, members.values())) for members in self._phase_pending)
        sent = self._sent_total + self._updates_sent
        coalesced = self._offered() - sent - self._discarded - in_flight
        if coalesced > self._coalesced_counted:
            self._metrics.updates_coalesced.inc(coalesced - self._coalesced_counted)
            self._coalesced_counted = coalesced

    def _cut_off_stalled(self) -> None:
        deadline = time.monotonic() - self._stall_timeout
        # Picked first, then cut off: on_stall ends streams, which may take their writers out
        # of the dicts walked here.
        behind = [
            writer
            for members in self._phase_pending
            for writer in members
            if writer.behind_since is not None and writer.behind_since < deadline
        ]
        for writer in behind:
            if writer.end_reason is None:
                self._on_stall(writer)
