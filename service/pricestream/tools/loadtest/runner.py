"""The coordinator: starts the worker processes, shows live progress, samples the server's
/metrics, waits for the leak verdict and writes the report."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pricestream.tools.loadtest import report as report_files
from pricestream.tools.loadtest.aggregate import Aggregate
from pricestream.tools.loadtest.server_metrics import ServerMetrics
from pricestream.tools.loadtest.stages import Schedule, Stage
from pricestream.tools.loadtest.worker import WorkerConfig, config_json


@dataclass
class LoadTestOptions:
    targets: list[str]
    metrics_url: str
    stages: list[Stage]
    tickers: list[str]
    tickers_per_session: int = 5
    workers: int = 2
    channels_per_worker: int = 4
    leave_mix: dict[str, float] = field(default_factory=lambda: {"cancel": 1.0})
    slow_fraction: float = 0.0
    slow_read_delay: float = 2.0
    max_error_rate: float = 0.01
    leak_timeout: float = 30.0
    out: Path = Path("loadtest-report")
    plots: bool = True
    progress: bool = True
    token: str = ""
    seed: int = 0
    keep_users: bool = False
    command: str = ""
    transport: str = "grpc"  # or "ws" / "sse": REST + WebSocket / SSE on web_targets
    web_targets: list[str] = field(default_factory=lambda: ["127.0.0.1:8080"])


class LoadTest:
    def __init__(self, options: LoadTestOptions) -> None:
        self.options = options
        self.schedule = Schedule(tuple(options.stages))
        self.aggregate = Aggregate(self.schedule, options.workers)
        self.worker_errors: list[str] = []

    def worker_config(self, index: int, start_at: float) -> WorkerConfig:
        o = self.options
        return WorkerConfig(
            targets=o.targets,
            worker=index,
            workers=o.workers,
            start_at=start_at,
            stages=[(s.seconds, s.target) for s in o.stages],
            tickers=o.tickers,
            tickers_per_session=o.tickers_per_session,
            leave_mix=o.leave_mix,
            slow_fraction=o.slow_fraction,
            slow_read_delay=o.slow_read_delay,
            channels=o.channels_per_worker,
            seed=o.seed,
            token=o.token,
            keep_users=o.keep_users,
            transport=o.transport,
            web_targets=o.web_targets,
        )

    async def _worker(self, index: int, start_at: float) -> None:
        config = config_json(self.worker_config(index, start_at))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pricestream.tools.loadtest.worker", config,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            limit=64 * 2**20,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        try:
            async for raw in proc.stdout:
                self.aggregate.add(json.loads(raw))
            stderr = (await proc.stderr.read()).decode(errors="replace").strip()
            if await proc.wait() != 0:
                self.worker_errors.append(
                    f"worker {index} exited {proc.returncode}: {stderr[-500:]}"
                )
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    async def _progress(self, start_at: float, metrics: ServerMetrics) -> None:
        last_second = 0
        while True:
            await asyncio.sleep(1.0)
            elapsed = time.time() - start_at
            if elapsed < 0:
                continue
            seconds = [s for s in sorted(self.aggregate.per_second) if s > last_second]
            if not seconds:
                continue
            second = seconds[-1]
            last_second = second
            bucket = self.aggregate.per_second[second]
            p99 = bucket.delivery.quantile(0.99)
            server = metrics.points[-1] if metrics.points else {}
            stage = self.schedule.stage_at(elapsed) + 1
            users, wanted = self.aggregate.users_at(second), round(self.schedule.users_at(elapsed))
            sessions, subscriptions = server.get("sessions", 0), server.get("subscriptions", 0)
            line = (
                f"t={elapsed:5.0f}s stage {stage}/{len(self.schedule.stages)} "
                f"users {users:,}/{wanted:,} "
                f"updates/s {bucket.counters['updates']:,} "
                f"p99 {'-' if p99 is None else f'{p99 * 1000:.0f}ms'} "
                f"errors {self.aggregate.total.error_count:,} | server sessions "
                f"{sessions:,.0f} subscriptions {subscriptions:,.0f}"
            )
            print(line, file=sys.stderr, flush=True)

    async def run(self) -> dict[str, Any]:
        o = self.options
        started = dt.datetime.now(dt.UTC)
        start_at = time.time() + 2.0  # time for the workers to start their interpreters
        async with ServerMetrics(o.metrics_url) as metrics:
            sampler = asyncio.create_task(metrics.sample_every(1.0, start_at))
            progress = (
                asyncio.create_task(self._progress(start_at, metrics)) if o.progress else None
            )
            try:
                await asyncio.gather(*(self._worker(i, start_at) for i in range(o.workers)))
            finally:
                for task in (sampler, progress):
                    if task is not None:
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
            verdict = await metrics.verdict(o.leak_timeout)
        return self._report(started, verdict.to_json(), metrics)

    def _report(
        self, started: dt.datetime, verdict: dict[str, Any], metrics: ServerMetrics
    ) -> dict[str, Any]:
        o, agg = self.options, self.aggregate
        total = agg.total.summary()
        attempted = agg.total.counters["sessions_attempted"]
        error_rate = agg.total.error_count / attempted if attempted else 0.0
        stages = []
        for index, (stage, bucket) in enumerate(zip(o.stages, agg.stages, strict=True)):
            stages.append({"stage": index + 1, "users": stage.target, **bucket.summary()})
        cpu = sum(agg.cpu_seconds.values())
        report = {
            "run": {
                "started": started.isoformat(timespec="seconds"),
                "command": o.command,
                "transport": o.transport,
                "targets": o.targets if o.transport == "grpc" else o.web_targets,
                "workers": o.workers,
                # gRPC only: a browser user has a connection of its own (None in web runs)
                "channels_per_worker": o.channels_per_worker if o.transport == "grpc" else None,
                "tickers_per_session": o.tickers_per_session,
                "universe": len(o.tickers),
                "peak_users": self.schedule.peak,
                "seconds": self.schedule.seconds,
                "stages": [[s.seconds, s.target] for s in o.stages],
                "leave_mix": o.leave_mix,
                "slow_fraction": o.slow_fraction,
            },
            "stages": stages,
            "total": total,
            "error_rate": error_rate,
            "max_error_rate": o.max_error_rate,
            "client_cpu_seconds": round(cpu, 2),
            "client_cpu_cores": cpu / self.schedule.seconds if self.schedule.seconds else 0.0,
            "client_cores_available": min(o.workers, len(os.sched_getaffinity(0))),
            "worker_errors": self.worker_errors,
            "leak_verdict": verdict,
            "server_series": metrics.points,
            "server_scrape_failures": metrics.failures,
            "series": agg.series(),
        }
        report["passed"] = (
            verdict["passed"] and error_rate <= o.max_error_rate and not self.worker_errors
        )
        return report


def run_load_test(options: LoadTestOptions) -> tuple[dict[str, Any], list[str]]:
    """Run, write report files into options.out; (report, files written)."""
    import uvloop

    report = uvloop.run(LoadTest(options).run())
    files = report_files.write(report, options.out, with_plots=options.plots)
    return report, files
