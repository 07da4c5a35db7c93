"""Churn at scale against a real `pricestream serve`: 10,000 sessions (times
CHURN_SCALE, 0.2 in `make test`) leave by cancel, CloseSession, channel drop, an
expiring deadline, or with their client process SIGKILLed; then every gauge is back to zero,
opened equals closed, and `pricestream audit-logs` finds the log balanced."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from pricestream.tools.feed import ticker_universe
from support.invariants import scrape, wait_invariant
from support.processes import ServeProcess, pricestream_command, start_feed
from support.redis_server import RedisProcess
from support.settings import fast_env

CLIENTS = Path(__file__).parent / "clients"
SCALE = float(os.environ.get("CHURN_SCALE", "0.2"))
TICKERS = ticker_universe(50)


@pytest.mark.timeout(600)
async def test_ten_thousand_sessions_leave_every_way_and_nothing_leaks(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    total = round(10_000 * SCALE)
    killed_count = total // 10
    per_process = (total - killed_count) // 3
    feed = start_feed(own_redis.url, tickers=len(TICKERS), rate=1000)
    server = await asyncio.to_thread(
        ServeProcess,
        fast_env(
            own_redis.url, log_level="INFO", session_ttl=5.0, stall_timeout=10.0, flush_interval=0.5
        ),
        tmp_path / "serve.log",
    )
    clients: list[asyncio.subprocess.Process] = []
    try:
        # The SIGKILLed group streams first, then dies while the others churn around it.
        doomed = await asyncio.create_subprocess_exec(
            sys.executable, str(CLIENTS / "stream_forever.py"), server.target,
            str(killed_count), *TICKERS, stdout=subprocess.PIPE,
        )  # fmt: skip
        clients.append(doomed)
        assert doomed.stdout is not None
        line = await asyncio.wait_for(doomed.stdout.readline(), 120)
        assert line.strip() == f"streaming {killed_count}".encode()
        churners = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                str(CLIENTS / "churn.py"),
                server.target,
                str(per_process),
                "100",
                str(seed),
                *TICKERS,
                stdout=subprocess.PIPE,
            )
            for seed in range(3)
        ]
        clients += churners
        await asyncio.sleep(2)
        doomed.kill()  # SIGKILL mid-churn: its streams vanish without a goodbye
        await doomed.wait()
        ways: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        for churner in churners:
            out, _ = await asyncio.wait_for(churner.communicate(), 400)
            assert churner.returncode == 0
            result = json.loads(out)
            ways.update(result["ways"])
            errors.update(result["errors"])
        assert errors == Counter(), errors
        assert sum(ways.values()) == 3 * per_process
        every_way = ("cancel", "close_session", "channel_drop", "deadline")
        assert all(ways[w] > per_process // 10 for w in every_way), ways
        # A deadline can expire before the stream reaches the server: that session was never
        # claimed and expires after the session TTL (5 s here), closed as "unclaimed".
        values = await wait_invariant(server.http_port, timeout=30)
        opened = values["pricestream_sessions_opened_total"]
        assert opened == 3 * per_process + killed_count
        closes = {
            line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in scrape(server.http_port).splitlines()
            if line.startswith("pricestream_streams_closed_total{")
        }
        print(f"\n{opened:,.0f} sessions: ways {dict(ways)}, SIGKILLed {killed_count}; "
              f"streams closed by reason {closes}")  # fmt: skip
        assert await asyncio.to_thread(server.terminate) == 0
        audit = await asyncio.to_thread(
            subprocess.run,
            pricestream_command("audit-logs", str(server.log_path)),
            capture_output=True,
            text=True,
        )
        assert audit.returncode == 0, audit.stdout[-2000:]
        assert f"sessions: opened {opened:,.0f}, closed {opened:,.0f}, still open 0" in audit.stdout
    finally:
        for client in clients:
            if client.returncode is None:
                client.kill()
                await client.wait()
        server.stop()
        feed.kill()
        feed.wait()
