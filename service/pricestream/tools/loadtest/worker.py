"""One load-generator process: runs its share of the virtual users and prints one JSON line of
counters per second on stdout (the coordinator in runner.py adds the workers up). Over gRPC
(``VirtualUser`` here) or the browser path (``WebVirtualUser``, webuser.py: REST, then a
WebSocket or SSE over aiohttp).

    python -m pricestream.tools.loadtest.worker '<json WorkerConfig>'
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import grpc
import uvloop

from pricestream.tools.loadtest.histogram import RESOLUTION, Histogram
from pricestream.tools.loadtest.stages import Schedule, Stage
from pricestream.tools.loadtest.webuser import (
    WEB_LEAVE_WAYS,
    WebVirtualUser,
    close_quietly,
    web_session,
)
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub

LEAVE_WAYS = ("cancel", "close_session", "channel_drop")
TRANSPORTS = ("grpc", "ws", "sse")
# The ways a user may leave, per transport (the browser ones: webuser.py).
TRANSPORT_LEAVE_WAYS = {"grpc": LEAVE_WAYS, **WEB_LEAVE_WAYS}
DEFAULT_LEAVE_MIX = {
    t: ",".join(f"{w}=1" for w in ways) for t, ways in TRANSPORT_LEAVE_WAYS.items()
}
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per channel
NANOS_PER_BUCKET = int(RESOLUTION * 1e9)


@dataclass
class WorkerConfig:
    targets: list[str]
    worker: int
    workers: int
    start_at: float  # wall clock (time.time()) of t = 0
    stages: list[tuple[float, int]]
    tickers: list[str]
    tickers_per_session: int = 5
    leave_mix: dict[str, float] = field(default_factory=lambda: {"cancel": 1.0})
    slow_fraction: float = 0.0
    slow_read_delay: float = 2.0
    channels: int = 4
    seed: int = 0
    token: str = ""
    keep_users: bool = False  # users stay across stages (leave only when the target drops)
    transport: str = "grpc"  # or "ws" / "sse": REST + WebSocket / SSE on web_targets
    web_targets: list[str] = field(default_factory=lambda: ["127.0.0.1:8080"])


@dataclass
class Stats:
    sessions_attempted: int = 0
    sessions_created: int = 0
    streams_started: int = 0
    updates: int = 0
    batches: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    slow_cut_off: int = 0
    leaves: Counter[str] = field(default_factory=Counter)
    create_latency: Histogram = field(default_factory=Histogram)
    start_latency: Histogram = field(default_factory=Histogram)
    delivery: Counter[int] = field(default_factory=Counter)  # buckets of RESOLUTION seconds
    tearing_down: bool = False  # past the end: calls we cancel ourselves are not errors

    def error(self, kind: str) -> None:
        if not self.tearing_down:
            self.errors[kind] += 1

    def take(self) -> dict[str, Any]:
        """Counters since the last call, as JSON-ready data; resets them in place (running
        users hold references to the delivery counter)."""
        out = {
            "sessions_attempted": self.sessions_attempted,
            "sessions_created": self.sessions_created,
            "streams_started": self.streams_started,
            "updates": self.updates,
            "batches": self.batches,
            "errors": dict(self.errors),
            "slow_cut_off": self.slow_cut_off,
            "leaves": dict(self.leaves),
            "create_latency": self.create_latency.take().to_json(),
            "start_latency": self.start_latency.take().to_json(),
            "delivery": {str(k): v for k, v in self.delivery.items()},
        }
        self.sessions_attempted = self.sessions_created = self.streams_started = 0
        self.updates = self.batches = self.slow_cut_off = 0
        self.errors.clear()
        self.leaves.clear()
        self.delivery.clear()
        return out


class VirtualUser:
    """CreateSession → StreamPriceUpdates → read until told to leave, then leave its way."""

    def __init__(
        self, stub: PriceStreamServiceStub, own_channel: grpc.aio.Channel | None, way: str,
        slow: bool, stage: int, tickers: list[str], config: WorkerConfig, stats: Stats,
    ) -> None:  # fmt: skip
        self.stub, self.own_channel, self.way, self.slow = stub, own_channel, way, slow
        self.stage, self.tickers, self.config, self.stats = stage, tickers, config, stats
        self.leaving = False
        self.started = False  # first batch received: the server holds the stream
        self.call: Any = None
        self.session_id = ""
        self.task: asyncio.Task[None] | None = None
        self.side_tasks: set[asyncio.Task[None]] = set()  # strong refs: a collected task's
        # grpc call would be cancelled by its finaliser
        self._metadata = (("authorization", f"Bearer {config.token}"),) if config.token else None

    async def release(self) -> None:
        if self.own_channel is not None:
            await self.own_channel.close()

    async def run(self) -> None:
        stats = self.stats
        stats.sessions_attempted += 1
        started = time.perf_counter()
        try:
            session = await self.stub.CreateSession(
                pb.CreateSessionRequest(tickers=self.tickers), timeout=10, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            if not self.leaving:
                stats.error(f"create:{exc.code().name}")
                # back off before this user's slot is filled again: no retry storm
                await asyncio.sleep(random.uniform(0.5, 1.5))
            return
        stats.sessions_created += 1
        stats.create_latency.add(time.perf_counter() - started)
        self.session_id = session.session_id
        if self.leaving:  # told to leave while creating it: a polite client closes the session
            await self._close_session()
            return
        started = time.perf_counter()
        self.call = call = self.stub.StreamPriceUpdates(
            pb.StreamPriceUpdatesRequest(session_id=session.session_id), metadata=self._metadata
        )
        first = True
        # slow readers' latency is their own doing: only the others' is the service's
        delivery = stats.delivery if not self.slow else Counter()
        try:
            while True:
                batch = await call.read()
                if batch is grpc.aio.EOF:
                    if not self.leaving:
                        stats.error("stream:ended")
                    break
                now = time.time_ns()
                if first:
                    first = False
                    self.started = True
                    stats.streams_started += 1
                    stats.start_latency.add(time.perf_counter() - started)
                updates = batch.updates
                stats.batches += 1
                stats.updates += len(updates)
                for update in updates:
                    delivery[(now - update.published_at_unix_nanos) // NANOS_PER_BUCKET] += 1
                if self.slow:
                    await asyncio.sleep(self.config.slow_read_delay)
        except grpc.aio.AioRpcError as exc:
            if not self.leaving:
                if self.slow and exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    stats.slow_cut_off += 1
                else:
                    stats.error(f"stream:{exc.code().name}")
        except asyncio.CancelledError:
            if not self.leaving:
                raise
        if not self.leaving:
            # Refused or failed, not told to leave: a session that never streamed is closed
            # (left, it would stay pending for its TTL, and the leak verdict would blame the
            # server), and the slot waits before it is filled again (no retry storm).
            if not self.started:
                await self._close_session()
            await asyncio.sleep(random.uniform(0.5, 1.5))

    def leave(self) -> None:
        if self.leaving:
            return
        self.leaving = True
        self.stats.leaves[self.way] += 1
        if self.call is not None:
            self._leave_now()

    def _leave_now(self) -> None:
        if not self.started:  # the server may not have the stream yet: close the session too
            self._side(self._close_session(cancel_after=True))
        elif self.way == "cancel":
            self.call.cancel()
        elif self.way == "close_session":
            self._side(self._close_session())
        else:
            assert self.own_channel is not None
            self._side(self.own_channel.close())

    def _side(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.side_tasks.add(task)
        task.add_done_callback(self.side_tasks.discard)

    async def _close_session(self, cancel_after: bool = False) -> None:
        try:
            await self.stub.CloseSession(
                pb.CloseSessionRequest(session_id=self.session_id), timeout=10,
                metadata=self._metadata,
            )  # fmt: skip
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.NOT_FOUND:  # gone already: what we wanted
                self.stats.error(f"close:{exc.code().name}")
            if self.call is not None:
                self.call.cancel()
        if cancel_after and self.call is not None:
            self.call.cancel()


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.schedule = Schedule(tuple(Stage(s, t) for s, t in config.stages))
        self.rng = random.Random(config.seed * 7919 + config.worker)
        self.stats = Stats()
        self.users: list[VirtualUser | WebVirtualUser] = []
        self.channels: list[grpc.aio.Channel] = []
        self.own_channels: set[grpc.aio.Channel] = set()
        self.http: aiohttp.ClientSession | None = None  # the browser path's shared session
        self.own_sessions: set[aiohttp.ClientSession] = set()
        ways, weights = zip(*config.leave_mix.items(), strict=True)
        self.ways, self.weights = list(ways), list(weights)

    def spawn(self, stage: int) -> None:
        config = self.config
        way = self.rng.choices(self.ways, self.weights)[0]
        if config.transport != "grpc":
            self._spawn_web(stage, way)
            return
        target = config.targets[len(self.users) % len(config.targets)]
        own = None
        if way == "channel_drop":
            own = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
            self.own_channels.add(own)
            stub = PriceStreamServiceStub(own)
        else:
            stub = PriceStreamServiceStub(self.rng.choice(self.channels))
        tickers = self.rng.sample(config.tickers, config.tickers_per_session)
        slow = self.rng.random() < config.slow_fraction
        user = VirtualUser(stub, own, way, slow, stage, tickers, config, self.stats)
        user.task = asyncio.get_running_loop().create_task(self._run(user))
        self.users.append(user)

    def _spawn_web(self, stage: int, way: str) -> None:
        config = self.config
        assert self.http is not None
        target = config.web_targets[len(self.users) % len(config.web_targets)]
        own = None
        if way == "drop":  # its own connection pool, closed to drop the stream
            own = web_session()
            self.own_sessions.add(own)
        tickers = self.rng.sample(config.tickers, config.tickers_per_session)
        slow = self.rng.random() < config.slow_fraction
        user = WebVirtualUser(
            self.http, own, target, way, slow, stage, tickers, config, self.stats, NANOS_PER_BUCKET
        )
        user.task = asyncio.get_running_loop().create_task(self._run(user))
        self.users.append(user)

    async def _run(self, user: VirtualUser | WebVirtualUser) -> None:
        try:
            await user.run()
        except Exception as exc:  # a bug of the tool or a reply it did not foresee: counted
            self.stats.error(f"client:{type(exc).__name__}")
        finally:
            if isinstance(user, VirtualUser) and user.own_channel is not None:
                self.own_channels.discard(user.own_channel)
            elif isinstance(user, WebVirtualUser) and user.own is not None:
                self.own_sessions.discard(user.own)
            await user.release()

    def report(self, elapsed: float, final: bool = False) -> None:
        line = {
            "worker": self.config.worker,
            "t": round(elapsed, 3),
            "users": sum(1 for u in self.users if not u.leaving),
            "cpu_seconds": time.process_time(),
            **self.stats.take(),
        }
        if final:
            line["final"] = True
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    async def run(self) -> None:
        config = self.config
        targets = config.targets
        if config.transport == "grpc":
            self.channels = [
                grpc.aio.insecure_channel(targets[i % len(targets)], options=CHANNEL_OPTIONS)
                for i in range(config.channels)
            ]
        else:
            self.http = web_session()
        try:
            await asyncio.sleep(max(0.0, config.start_at - time.time()))
            next_report = 1.0
            while (elapsed := time.time() - config.start_at) < self.schedule.seconds:
                self.steer(elapsed)
                if elapsed >= next_report:
                    self.report(elapsed)
                    next_report += 1.0
                await asyncio.sleep(0.05)
            await self.finish()
            self.report(time.time() - config.start_at, final=True)
        finally:
            for user in self.users:
                if user.task is not None:
                    user.task.cancel()
            await asyncio.gather(*(u.task for u in self.users if u.task), return_exceptions=True)
            for channel in [*self.channels, *self.own_channels]:
                await channel.close()
            for session in [*self.own_sessions, *([self.http] if self.http else [])]:
                await close_quietly(session)

    def steer(self, elapsed: float) -> None:
        """Bring the running users to this worker's share; users of a past stage leave."""
        self.users = [
            u for u in self.users if (u.task is not None and not u.task.done()) or u.side_tasks
        ]
        stage = self.schedule.stage_at(elapsed)
        staying = []
        for user in self.users:
            if not user.leaving and user.stage < stage and not self.config.keep_users:
                user.leave()
            if not user.leaving:
                staying.append(user)
        want = self.schedule.share(elapsed, self.config.worker, self.config.workers)
        for user in staying[want:]:
            user.leave()
        for _ in range(want - len(staying)):
            self.spawn(stage)

    async def finish(self, timeout: float = 15.0) -> None:
        self.stats.tearing_down = True
        for user in self.users:
            user.leave()
        tasks = [u.task for u in self.users if u.task is not None]
        tasks += [t for u in self.users for t in u.side_tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)


def main(argv: list[str]) -> int:
    config = WorkerConfig(**json.loads(argv[0]))
    uvloop.run(Worker(config).run())
    return 0


def config_json(config: WorkerConfig) -> str:
    """The argument `main` reads back: the coordinator's one way to hand a worker its config."""
    return json.dumps(asdict(config))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
