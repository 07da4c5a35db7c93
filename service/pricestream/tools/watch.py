"""`pricestream watch AAPL MSFT ...`: a live, refreshed terminal table of prices."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

import grpc

from pricestream.tasks import cancel_and_wait
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub

_CLEAR = "\x1b[H\x1b[2J"


@dataclass
class Row:
    price: float
    first_price: float
    published_ns: int
    sequence: int


def render(rows: dict[str, Row], tickers: Sequence[str], target: str, now_ns: int) -> str:
    lines = [
        f"pricestream watch  {target}  (Ctrl-C to quit)",
        "",
        f"{'TICKER':<10}{'PRICE':>12}{'CHANGE':>10}{'AGE':>10}",
    ]
    for ticker in tickers:
        row = rows.get(ticker)
        if row is None:
            lines.append(f"{ticker:<10}{'-':>12}{'-':>10}{'-':>10}")
            continue
        change = (row.price / row.first_price - 1) * 100 if row.first_price else 0.0
        age_ms = max(0, now_ns - row.published_ns) / 1e6
        lines.append(f"{ticker:<10}{row.price:>12.2f}{change:>+9.2f}%{age_ms:>8.0f}ms")
    return "\n".join(lines) + "\n"


async def watch(
    target: str,
    tickers: Sequence[str],
    *,
    out: TextIO = sys.stdout,
    duration: float | None = None,
    refresh: float = 0.25,
    clear: bool = True,
) -> int:
    """Create a session, stream it and redraw the table until Ctrl-C or ``duration``."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = PriceStreamServiceStub(channel)
        try:
            session = await stub.CreateSession(pb.CreateSessionRequest(tickers=tickers), timeout=5)
        except grpc.aio.AioRpcError as exc:
            print(f"pricestream watch: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        rows: dict[str, Row] = {}
        call = stub.StreamPriceUpdates(pb.StreamPriceUpdatesRequest(session_id=session.session_id))

        async def read() -> None:
            async for batch in call:
                for update in batch.updates:
                    row = rows.get(update.ticker)
                    first = row.first_price if row else update.price
                    rows[update.ticker] = Row(
                        update.price, first, update.published_at_unix_nanos, update.sequence
                    )

        reader = asyncio.create_task(read())
        deadline = None if duration is None else time.monotonic() + duration
        status = 0
        interrupted = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, interrupted.set)
        try:
            while not reader.done() and not interrupted.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                screen = render(rows, session.tickers, target, time.time_ns())
                out.write((_CLEAR if clear else "") + screen)
                out.flush()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(interrupted.wait(), refresh)
            if reader.done() and reader.exception() is not None:
                exc = reader.exception()
                if isinstance(exc, grpc.aio.AioRpcError):
                    print(f"pricestream watch: {exc.code().name}: {exc.details()}", file=sys.stderr)
                status = 1
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            call.cancel()
            await cancel_and_wait([reader])
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.CloseSession(
                    pb.CloseSessionRequest(session_id=session.session_id), timeout=2
                )
        return status
