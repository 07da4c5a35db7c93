"""End to end: two `pricestream serve` replicas, the feed, a real Prometheus loading the chart's
rules (short windows) and a real Alertmanager notifying a webhook run by this test.

Scenario 1: healthy churn with both replicas restarted once → no notification at all.
Scenario 2: replica A restarted with the seed's bug (`skip_cleanup_on_send_error`) and clients
that vanish mid-stream → the leak alert reaches the webhook, naming replica A.
Then every dashboard query runs against that Prometheus and returns data.

Fast burn (its own stack): the Alertmanager configuration the chart documents
(deploy/alertmanager/alertmanager.yml, its receivers' URLs pointed at two webhooks) and the SLO
rules with short windows; a full replica refuses every CreateSession (gRPC RESOURCE_EXHAUSTED,
REST 503 `pod_full`) → the availability page reaches the page receiver, the ticket is inhibited
and nothing reaches the ticket receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import websockets
from pricestream.tools.feed import ticker_universe
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from support.burn import BURN_ALERT, burning, shipped_alertmanager_config
from support.chart import rules_file
from support.monitoring import Alertmanager, Prometheus, WebhookReceiver
from support.processes import ServeProcess, start_feed
from support.redis_server import RedisProcess
from support.settings import fast_env
from support.waiting import free_port
from support.web_clients import create_session, rest

from dashboards import generate
from dashboards.grafana import promql_queries

NAMESPACE = "e2e"
TICKERS = 20
UNIVERSE = ticker_universe(TICKERS)
# The chart's rules with windows short enough for a test; thresholds as in production unless
# the scale of the test needs otherwise (a handful of leaked sessions, not fifty).
SHORT_WINDOWS = {
    "rateWindow": "10s",
    "orphanFor": "8s",
    "leakWindow": "30s",
    "leakMinGrowth": "45",
    "leakFor": "20s",
    "zombieSessionsMin": "5",
    "zombieFor": "8s",
    "wsLeakSessionsMin": "5",
    "wsLeakWindow": "30s",
    "wsLeakFor": "8s",
    "driftFor": "15s",
    "redisDownFor": "10s",
    "reconnectWindow": "30s",
    "reconnectsMax": "3",
    "reconnectsFor": "10s",
    "notReadyFor": "15s",
    "noUpdatesFor": "15s",
    "latencyObjectiveSeconds": "1",
    "latencyFor": "15s",
    "overloadLagSeconds": "0.5",
    "overloadBacklogRatio": "0.5",
    "overloadFor": "15s",
    "slowConsumerRatio": "0.05",
    "slowConsumerFor": "15s",
    "grpcErrorRatio": "0.05",
    "grpcErrorFor": "15s",
    "targetDownFor": "10s",
    "absentFor": "20s",
    # The SLO rules keep their production windows (a 5m window holds the whole test): the
    # healthy churn with restarts must leave every SLO error ratio at 0 (the clients' UNAVAILABLE
    # while a replica restarts are refused connections, never answered by a server).
}
LONGEST_FOR = 20  # seconds: after this much quiet, anything pending would have fired


@dataclass
class Replica:
    """One `pricestream serve` process on fixed ports, so Prometheus finds it after a restart."""

    name: str
    redis_url: str
    workdir: Path
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: ServeProcess | None = None
    starts: int = 0
    settings: dict[str, object] = field(default_factory=dict)  # over fast_env's

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, faults: str = "") -> None:
        env = fast_env(
            self.redis_url,
            grpc_port=self.grpc_port,
            http_port=self.http_port,
            pod_name=self.name,
            stall_timeout=5.0,
            faults=faults,
            **self.settings,
        )
        self.starts += 1
        self.proc = ServeProcess(env, self.workdir / f"{self.name}-{self.starts}.log")

    def restart(self, faults: str = "") -> None:
        assert self.proc is not None
        assert self.proc.terminate(timeout=20) == 0
        self.start(faults)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


@dataclass
class ClientStats:
    sessions: int = 0
    batches: int = 0
    exits: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)


async def one_session(target: str, rng: random.Random, stats: ClientStats) -> None:
    """Create a session, stream it for a while, leave in one of the ways real clients do."""
    tickers = rng.sample(UNIVERSE, 3)
    way = rng.choice(["cancel", "close_session", "channel_drop"])
    async with grpc.aio.insecure_channel(target) as channel:
        stub = PriceStreamServiceStub(channel)
        session = await stub.CreateSession(pb.CreateSessionRequest(tickers=tickers), timeout=5)
        stats.sessions += 1
        call = stub.StreamPriceUpdates(pb.StreamPriceUpdatesRequest(session_id=session.session_id))
        leave_at = time.monotonic() + rng.uniform(0.5, 3.0)
        while time.monotonic() < leave_at:
            batch = await asyncio.wait_for(call.read(), 5)
            if batch is grpc.aio.EOF:
                stats.exits["server_ended"] += 1
                return
            stats.batches += 1
        stats.exits[way] += 1
        if way == "cancel":
            call.cancel()
        elif way == "close_session":
            await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
            with contextlib.suppress(grpc.aio.AioRpcError):
                while await asyncio.wait_for(call.read(), 5) is not grpc.aio.EOF:
                    pass
        # channel_drop: leaving the `async with` closes the channel under the open stream


async def churn(replicas: list[Replica], until: float, stats: ClientStats, seed: int) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        target = rng.choice(replicas).target
        try:
            await one_session(target, rng, stats)
        except grpc.aio.AioRpcError as exc:  # a draining or restarting replica: go elsewhere
            stats.errors[exc.code().name] += 1
            await asyncio.sleep(0.2)
        except TimeoutError:
            stats.errors["read_timeout"] += 1


@contextlib.asynccontextmanager
async def clients(
    replicas: list[Replica], count: int, seconds: float
) -> AsyncIterator[ClientStats]:
    stats = ClientStats()
    until = time.monotonic() + seconds
    tasks = [asyncio.create_task(churn(replicas, until, stats, seed)) for seed in range(count)]
    try:
        yield stats
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def parse_time(value: str) -> float:
    # Alertmanager writes RFC 3339 with nanoseconds; Python parses microseconds.
    value = re.sub(r"(\.\d{6})\d+", r"\1", value).replace("Z", "+00:00")
    return dt.datetime.fromisoformat(value).timestamp()


def substitute(expr: str) -> str:
    return (
        expr.replace("$namespace", NAMESPACE)
        .replace("$pod", ".*")
        .replace("$job", ".*")
        .replace("$__rate_interval", "15s")
    )


@pytest.fixture
async def stack(own_redis: RedisProcess, tmp_path: Path):
    replicas = [Replica(name, own_redis.url, tmp_path) for name in ("replica-a", "replica-b")]
    feed = start_feed(own_redis.url, tickers=TICKERS, rate=400)
    daemons: list[Prometheus | Alertmanager] = []
    try:
        async with WebhookReceiver() as receiver:
            (tmp_path / "am").mkdir()
            alertmanager = await asyncio.to_thread(Alertmanager, tmp_path / "am", receiver.url)
            daemons.append(alertmanager)
            for replica in replicas:
                await asyncio.to_thread(replica.start)
            (tmp_path / "prom").mkdir()
            rules = rules_file(SHORT_WINDOWS, selector=f'job="pricestream",namespace="{NAMESPACE}"')
            prometheus = await asyncio.to_thread(
                Prometheus,
                tmp_path / "prom",
                {r.name: f"127.0.0.1:{r.http_port}" for r in replicas},
                {"namespace": NAMESPACE},
                rules,
                f"127.0.0.1:{alertmanager.port}",
            )
            daemons.append(prometheus)
            yield replicas, prometheus, receiver
    finally:
        for daemon in daemons:
            daemon.stop()
        for replica in replicas:
            replica.stop()
        feed.kill()
        feed.wait()


async def wait_until_scraped(prometheus: Prometheus, timeout: float = 20, count: int = 2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        up = await asyncio.to_thread(prometheus.query, f'up{{namespace="{NAMESPACE}"}} == 1')
        if len(up) == count:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"Prometheus did not scrape {count} replicas")


@pytest.mark.timeout(420)
async def test_leak_alert_reaches_alertmanager_and_healthy_churn_stays_silent(stack) -> None:
    replicas, prometheus, receiver = stack
    replica_a, replica_b = replicas
    await wait_until_scraped(prometheus)

    # Scenario 1: clients come and go on both replicas; each replica is restarted once.
    async with clients(replicas, count=12, seconds=36) as healthy:
        await asyncio.sleep(10)
        await asyncio.to_thread(replica_a.restart)
        await asyncio.sleep(10)
        await asyncio.to_thread(replica_b.restart)
    assert healthy.sessions > 100 and healthy.batches > 1000, healthy
    assert sum(healthy.exits.values()) > 100, healthy
    await asyncio.sleep(LONGEST_FOR + 5)
    assert await asyncio.to_thread(prometheus.rule_health) == []
    false_alarms = [a for n in receiver.notifications for a in n.alerts]
    assert false_alarms == [], false_alarms
    assert await asyncio.to_thread(prometheus.firing) == []
    slo = {
        r["metric"]["slo"]: float(r["value"][1])
        for r in await asyncio.to_thread(
            prometheus.query, "namespace_job:pricestream_slo_errors:ratio_rate1h"
        )
    }
    assert slo == {"availability": 0.0, "continuity": 0.0, "freshness": slo.get("freshness")}
    print(
        f"\nscenario 1: {healthy.sessions} sessions, exits {dict(healthy.exits)}, "
        f"errors {dict(healthy.errors)}, false alarms {len(false_alarms)}, SLO error ratios {slo}"
    )

    # Scenario 2: replica A runs the seed's bug; its clients vanish mid-stream.
    await asyncio.to_thread(replica_a.restart, "skip_cleanup_on_send_error")
    rng = random.Random(7)
    vanished = ClientStats()
    async with grpc.aio.insecure_channel(replica_a.target) as channel:
        stub = PriceStreamServiceStub(channel)
        calls = []
        for _ in range(8):
            tickers = rng.sample(UNIVERSE, 3)
            session = await stub.CreateSession(pb.CreateSessionRequest(tickers=tickers))
            call = stub.StreamPriceUpdates(
                pb.StreamPriceUpdatesRequest(session_id=session.session_id)
            )
            assert await asyncio.wait_for(call.read(), 5) is not grpc.aio.EOF
            calls.append(call)
        for call in calls:
            call.cancel()
            vanished.exits["cancel"] += 1
    fault_at = time.time()

    notification, alert = await receiver.wait_for(
        "PriceStreamPubSubSubscriptionsOrphaned", timeout=60
    )
    fired_after = parse_time(alert["startsAt"]) - fault_at
    delivered_after = notification.received_at - fault_at
    assert notification.payload["version"] == "4"
    assert notification.payload["status"] == "firing"
    assert alert["labels"]["pod"] == "replica-a"
    assert alert["labels"]["namespace"] == NAMESPACE
    assert alert["labels"]["severity"] == "critical"
    assert "replica-a" in alert["annotations"]["description"]
    assert alert["annotations"]["runbook_url"].endswith("PriceStreamPubSubSubscriptionsOrphaned.md")
    await receiver.wait_for("PriceStreamZombieSessions", timeout=30)
    for received in receiver.notifications:
        for each in received.alerts:
            assert each["labels"]["pod"] == "replica-a", each["labels"]
            assert each["labels"]["alertname"] in {
                "PriceStreamPubSubSubscriptionsOrphaned",
                "PriceStreamZombieSessions",
            }, each["labels"]
    print(
        f"scenario 2: orphaned-subscriptions alert fired {fired_after:.1f}s and was delivered "
        f"{delivered_after:.1f}s after the clients vanished (for: {SHORT_WINDOWS['orphanFor']})"
    )

    # Scenario 3: replica B runs the original bug on the browser path: a WebSocket's close
    # skips the session cleanup (the missed exit of the system pricestream follows).
    await asyncio.to_thread(replica_b.restart, "skip_cleanup_on_ws_close")
    assert replica_b.proc is not None
    web_port = replica_b.proc.web_port
    unknown = f"ws://127.0.0.1:{web_port}/v1/sessions/AAAAAAAAAAAAAAAAAAAAAA/ws"
    async with websockets.connect(unknown, subprotocols=["pricestream.v1.json"]) as refused:
        with contextlib.suppress(websockets.ConnectionClosed):
            await asyncio.wait_for(refused.recv(), 5)
        assert refused.close_code == 4004
    for _ in range(8):
        session = await create_session(web_port, rng.sample(UNIVERSE, 3))
        async with websockets.connect(
            session["stream_url"], subprotocols=["pricestream.v1.json"]
        ) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "snapshot"
    ws_fault_at = time.time()
    # A session closed over REST is cleaned up even here (only a socket's close skips it): the
    # restarted replica has closed sessions again, which the dashboard's drift panel reads.
    closed = await create_session(web_port, ["AAPL"])
    status, _, _ = await rest(web_port, "DELETE", f"/v1/sessions/{closed['session_id']}")
    assert status == 204
    notification, alert = await receiver.wait_for("PriceStreamWebSocketSessionLeak", timeout=90)
    assert alert["labels"]["pod"] == "replica-b"
    assert alert["labels"]["severity"] == "warning"
    assert alert["annotations"]["runbook_url"].endswith("PriceStreamWebSocketSessionLeak.md")
    print(
        f"scenario 3: WebSocket session-leak alert delivered "
        f"{notification.received_at - ws_fault_at:.1f}s after 8 sockets closed "
        f"(for: {SHORT_WINDOWS['wsLeakFor']})"
    )

    # Every dashboard query, variables substituted, runs and returns data.
    empty = []
    for name, build in generate.DASHBOARDS.items():
        for expr in promql_queries(build()):
            if name == "pricestream-slo.json" and expr.startswith("ALERTS{"):
                continue  # no SLO burns here: its annotation of firing burn alerts is empty
            if not await asyncio.to_thread(prometheus.query, substitute(expr)):
                empty.append(f"{name}: {expr}")
    assert empty == []


# --- fast burn: the page reaches the pager, the ticket is inhibited --------------------------

# The SLO rules' windows and `for:` durations shrunk to seconds (the rules are named after the
# production window they stand for); objectives and burn rates as shipped. Every other rule
# keeps its production parameters: none can fire within this test.
SLO_SHORT_WINDOWS = {
    "sloWindow5m": "10s",
    "sloWindow30m": "15s",
    "sloWindow1h": "30s",
    "sloWindow2h": "20s",
    "sloWindow6h": "40s",
    "sloWindow1d": "45s",
    "sloWindow3d": "60s",
    "sloPageFastFor": "5s",
    "sloPageSlowFor": "10s",
    "sloTicketFastFor": "5s",
    "sloTicketSlowFor": "10s",
}


@pytest.mark.timeout(150)
async def test_fast_burn_pages_the_pager_and_inhibits_the_ticket(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    started = time.monotonic()
    replica = Replica("replica-full", own_redis.url, tmp_path, settings={"max_sessions": 1})
    daemons: list[Prometheus | Alertmanager] = []
    try:
        async with WebhookReceiver() as pager, WebhookReceiver() as tickets:
            (tmp_path / "am").mkdir()
            config = shipped_alertmanager_config(pager.url, tickets.url)
            alertmanager = await asyncio.to_thread(Alertmanager, tmp_path / "am", config=config)
            daemons.append(alertmanager)
            await asyncio.to_thread(replica.start)
            assert replica.proc is not None
            (tmp_path / "prom").mkdir()
            rules = rules_file(
                SLO_SHORT_WINDOWS, selector=f'job="pricestream",namespace="{NAMESPACE}"'
            )
            prometheus = await asyncio.to_thread(
                Prometheus,
                tmp_path / "prom",
                {replica.name: f"127.0.0.1:{replica.http_port}"},
                {"namespace": NAMESPACE},
                rules,
                f"127.0.0.1:{alertmanager.port}",
            )
            daemons.append(prometheus)
            await wait_until_scraped(prometheus, count=1)

            # A few good session starts (created and closed) so every series exists.
            async with grpc.aio.insecure_channel(replica.target) as channel:
                stub = PriceStreamServiceStub(channel)
                for _ in range(20):
                    session = await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL"]))
                    await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
                    await asyncio.sleep(0.25)

                # The burn: one client takes the pod's only slot and streams; every other
                # session start is refused as the pod is full (the server's fault).
                async with burning(stub, replica.target, replica.proc.web_port, 95) as burn:
                    notification, alert = await pager.wait_for(BURN_ALERT, timeout=90)
                    # The ticket rules fire too (3x and 1x are crossed as well): Alertmanager
                    # holds them back while the page for the same SLO fires.
                    deadline = time.monotonic() + 20
                    suppressed: list[dict] = []
                    while time.monotonic() < deadline and not suppressed:
                        ticket_alerts = await asyncio.to_thread(
                            alertmanager.alerts,
                            f'alertname="{BURN_ALERT}"',
                            'severity="ticket"',
                        )
                        suppressed = [
                            a for a in ticket_alerts if a["status"]["state"] == "suppressed"
                        ]
                        await asyncio.sleep(0.5)
            ticket_states = [(a["labels"]["long_window"], a["status"]) for a in ticket_alerts]
            firing = await asyncio.to_thread(prometheus.firing)
    finally:
        for daemon in daemons:
            daemon.stop()
        replica.stop()

    refusals = burn.refusals
    detected_after = notification.received_at - burn.started_at
    fired_after = parse_time(alert["startsAt"]) - burn.started_at
    assert refusals.grpc["RESOURCE_EXHAUSTED"] > 100 and refusals.rest[503] > 100, refusals
    assert alert["labels"]["severity"] == "page"
    assert alert["labels"]["slo"] == "availability"
    assert alert["labels"]["namespace"] == NAMESPACE and alert["labels"]["job"] == "pricestream"
    assert alert["annotations"]["runbook_url"].endswith(f"{BURN_ALERT}.md")
    paged = [a["labels"] for n in pager.notifications for a in n.alerts]
    assert all(
        (p["alertname"], p["severity"], p["slo"]) == (BURN_ALERT, "page", "availability")
        for p in paged
    ), paged
    # Prometheus fires the tickets, Alertmanager marks them inhibited by the page.
    assert {a["severity"] for a in firing if a["alertname"] == BURN_ALERT} == {"page", "ticket"}
    assert suppressed, ticket_states
    assert all(a["status"]["inhibitedBy"] for a in suppressed), ticket_states
    assert tickets.notifications == [], [n.payload for n in tickets.notifications]
    print(
        f"\nfast burn: {sum(refusals.grpc.values())} gRPC CreateSession "
        f"{dict(refusals.grpc)}, {sum(refusals.rest.values())} REST {dict(refusals.rest)}; "
        f"page fired {fired_after:.1f}s and reached the pager {detected_after:.1f}s after the "
        f"burn began (windows {SLO_SHORT_WINDOWS['sloWindow1h']}/"
        f"{SLO_SHORT_WINDOWS['sloWindow5m']}, for {SLO_SHORT_WINDOWS['sloPageFastFor']}, "
        f"the shipped group_wait 30s); {len(suppressed)} ticket alert(s) inhibited, "
        f"{len(tickets.notifications)} ticket notifications; test took "
        f"{time.monotonic() - started:.0f}s"
    )
