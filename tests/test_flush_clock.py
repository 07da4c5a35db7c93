"""The flush clock's phases: the streams of one connection flush on one tick, connections are
spread over the interval, every update waits at most one interval, nothing is kept after the
last writer of a connection goes. A real clock and writers over a recording sink."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import pytest
from pricestream.engine.flush import TALLY_FOLD, FlushClock, StreamWriter
from pricestream.observability.metrics import Metrics
from support.invariants import samples

pytestmark = pytest.mark.unit


class LoopPasses:
    """Counts the event loop's passes: a task that adds one and yields, again and again. Two
    sends that read the same count came from one synchronous pass of the clock, with no other
    task run between them; the tests judge "at once" and "within an interval" by passes, not by
    wall-clock bounds that a busy machine breaks."""

    def __init__(self) -> None:
        self.count = 0
        self._task: asyncio.Task[None] | None = None

    async def _spin(self) -> None:
        while True:
            self.count += 1
            await asyncio.sleep(0)

    async def __aenter__(self) -> LoopPasses:
        self._task = asyncio.create_task(self._spin())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


PASSES = LoopPasses()


class RecordingSink:
    """A BatchSink that takes everything at once and remembers in which loop pass (PASSES)
    each batch came."""

    def __init__(self, group: object) -> None:
        self.flush_group = group
        self.blocked_since: float | None = None
        self.sent: list[tuple[int, bytes]] = []

    def send(self, payload: bytes) -> bool:
        self.sent.append((PASSES.count, payload))
        return True

    def on_writable(self, callback: Callable[[], None]) -> None:
        pass


def new_clock(interval: float = 0.1) -> FlushClock:
    return FlushClock(interval, 10.0, Metrics(), on_stall=lambda writer: None)


def writer_on(clock: FlushClock, group: object) -> tuple[StreamWriter, RecordingSink]:
    sink = RecordingSink(group)
    writer = StreamWriter(clock, sink, 1 << 20)
    writer.started = True
    clock.register(writer)
    return writer, sink


def entry(price: int) -> tuple[bytes, int, int]:
    return (b"\x0a\x02" + price.to_bytes(2, "big"), time.time_ns(), price)


@pytest.mark.parametrize(("interval", "phases"), [(0.01, 1), (0.05, 2), (0.1, 3), (1.0, 16)])
def test_phases_follow_the_interval(interval: float, phases: int) -> None:
    assert new_clock(interval).phases == phases


async def test_a_connection_has_one_phase_and_connections_are_spread() -> None:
    clock = new_clock(0.1)
    groups = [object() for _ in range(6)]
    writers = {id(g): [writer_on(clock, g)[0] for _ in range(4)] for g in groups}
    for group_writers in writers.values():
        assert len({w.phase for w in group_writers}) == 1
    per_phase = [sum(1 for ws in writers.values() if ws[0].phase == p) for p in range(3)]
    assert per_phase == [2, 2, 2]
    assert clock.flush_groups == 6
    for group_writers in writers.values():
        for writer in group_writers:
            clock.unregister(writer)
            clock.unregister(writer)  # a second time changes nothing
    assert clock.flush_groups == 0
    assert clock.phase_writers == [0, 0, 0]


async def test_every_update_is_flushed_within_an_interval_and_a_connection_at_once() -> None:
    clock = new_clock(0.1)
    groups = [object() for _ in range(6)]
    pairs = [writer_on(clock, g) for g in groups for _ in range(5)]
    task = asyncio.create_task(clock.run())
    try:
        async with PASSES:
            await asyncio.sleep(0.15)
            for index, (writer, _) in enumerate(pairs):
                writer.pending["AAPL"] = entry(index)
            offered_in = PASSES.count
            # The clock's passes from here on: one per tick (its sleeps), the spinner's between.
            await asyncio.sleep(0.25)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert all(len(sink.sent) == 1 for _, sink in pairs)
    for group in groups:
        passes = {sink.sent[0][0] for _, sink in pairs if sink.flush_group is group}
        assert len(passes) == 1  # one pass for the whole connection
    flushed_in = sorted({sink.sent[0][0] for _, sink in pairs})
    assert min(flushed_in) > offered_in
    # Within an interval: each phase on its next tick (3 ticks of ~33 ms, one pass each, two
    # of them at once if the loop ran late), so the connections were not all flushed at once.
    assert 2 <= len(flushed_in) <= clock.phases == 3


async def test_a_late_tick_flushes_every_phase_that_is_due() -> None:
    clock = new_clock(0.1)
    pairs = [writer_on(clock, object()) for _ in range(3)]
    assert sorted(w.phase for w, _ in pairs) == [0, 1, 2]
    task = asyncio.create_task(clock.run())
    try:
        async with PASSES:
            await asyncio.sleep(0.05)
            for index, (writer, _) in enumerate(pairs):
                writer.pending["AAPL"] = entry(index)
            time.sleep(0.3)  # noqa: ASYNC251 - blocking on purpose: the loop runs late
            blocked_in = PASSES.count
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert all(len(sink.sent) == 1 for _, sink in pairs)
    # All three phases were due: one pass of the clock flushed them together, among the loop's
    # first passes after the block (waiting for their own ticks would take ~66 ms of passes).
    (flushed_in,) = {sink.sent[0][0] for _, sink in pairs}
    assert blocked_in < flushed_in <= blocked_in + 3


async def test_every_stored_entry_is_sent_discarded_pending_or_coalesced() -> None:
    stored = 0

    def store(writer: StreamWriter, ticker: str, times: int) -> None:
        nonlocal stored
        for index in range(times):
            writer.pending[ticker] = entry(index)  # as the hub does, one count per store
            stored += 1

    metrics = Metrics()
    clock = FlushClock(0.1, 10.0, metrics, on_stall=lambda writer: None, offered=lambda: stored)

    def coalesced() -> float:
        clock.fold_counts()
        clock.count_coalesced()
        return samples(metrics.exposition().decode())["pricestream_price_updates_coalesced_total"]

    (a, sink_a), (b, sink_b), (c, _) = (writer_on(clock, object()) for _ in range(3))
    store(a, "AAPL", 3)  # 2 replaced before the flush
    store(a, "MSFT", 1)
    store(b, "AAPL", 2)  # 1 replaced
    store(c, "AAPL", 1)
    clock.flush_now(a)
    clock.flush_now(b)
    assert [len(sink_a.sent), len(sink_b.sent)] == [1, 1]
    c.stop("closed", grpc.StatusCode.OK, "")  # its one entry is discarded, not coalesced
    store(b, "MSFT", 2)  # 1 replaced, 1 still pending
    assert coalesced() == 4
    clock.unregister(b)  # its pending entry is discarded
    clock.unregister(c)
    store(a, "AAPL", 1)
    assert coalesced() == 4
    clock.flush_now(a)
    assert coalesced() == 4
    assert samples(metrics.exposition().decode())["pricestream_price_updates_sent_total"] == 4


async def test_a_writers_counts_stay_exact_past_the_tally_fold() -> None:
    """The per-stream counts (kept small on the hot path, folded past TALLY_FOLD) add up to
    every batch and update the sink was given, batches of 1 to 60 tickers, over and at the
    send limit too."""
    clock = new_clock()
    writer, sink = writer_on(clock, object())
    updates = 0
    for batch in range(1, 400):
        count = 1 + batch % 60
        for n in range(count):
            writer.pending[f"T{n}"] = entry(batch)
        StreamWriter.flush_all([writer], time.monotonic(), clock.grace, [])
        updates += count
        assert writer.batches_sent == batch == len(sink.sent)
        assert writer.updates_sent == updates
    assert writer.batches_sent > TALLY_FOLD and writer.updates_sent > 10 * TALLY_FOLD
    # A batch over the send limit ends the stream and is not counted.
    small = StreamWriter(clock, RecordingSink(object()), 5 + 2 * len(entry(0)[0]))
    small.started = True
    small.pending.update({"A": entry(1), "B": entry(2)})
    StreamWriter.flush_all([small], time.monotonic(), clock.grace, [])
    assert (small.batches_sent, small.updates_sent, small.end_reason) == (1, 2, None)
    small.pending.update({"A": entry(3), "B": entry(4), "C": entry(5)})
    StreamWriter.flush_all([small], time.monotonic(), clock.grace, [])
    assert (small.batches_sent, small.updates_sent) == (1, 2)
    assert small.end_reason == "send_error" and small.end_code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_news_held_up_by_output_the_sink_took_before_counts_as_behind() -> None:
    """A browser socket's output can pass its high mark by a write that is no batch (a pong,
    an SSE heartbeat): the sink is blocked before any batch of the writer waited. The writer's
    news then waits too, and the writer counts as behind since the sink was blocked, so the
    stall check cuts off a client that stopped reading whatever filled its buffer first."""
    stalled: list[StreamWriter] = []
    clock = FlushClock(0.1, 0.5, Metrics(), on_stall=stalled.append)
    writer, sink = writer_on(clock, object())
    blocked_at = time.monotonic() - 1.0  # blocked by a heartbeat a second ago
    sink.blocked_since = blocked_at
    StreamWriter.flush_all([writer], time.monotonic(), clock.grace, [])
    assert writer.behind_since is None  # nothing waits: not behind
    writer.pending["AAPL"] = entry(1)
    sent, behind = StreamWriter.flush_all([writer], time.monotonic(), clock.grace, [])
    assert (sent, behind, sink.sent) == (0, 0, [])
    assert writer.behind_since == blocked_at
    _, behind = StreamWriter.flush_all([writer], time.monotonic(), clock.grace, [])
    assert behind == 1  # blocked for longer than the grace
    clock._cut_off_stalled()
    assert stalled == [writer]
    # Once the socket drained, the next batch out in time clears it.
    sink.blocked_since = None
    StreamWriter.flush_all([writer], time.monotonic(), clock.grace, [])
    assert writer.behind_since is None and len(sink.sent) == 1
