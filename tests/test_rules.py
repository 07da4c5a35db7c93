"""The chart's rules file: valid for promtool, and right on healthy, leaking, restarting and
missing pods (promtool test rules with the production windows the chart ships)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from support.chart import rules_file
from support.promtool import run_rules_test
from support.rule_scenarios import JOB, NAMESPACE, Expected, Pod, Scenario, hold, ramp
from support.waiting import require_binary

RUNBOOKS = "https://github.com/pricestream/pricestream/blob/main/docs/runbooks"
ROOT = Path(__file__).resolve().parents[1]


def alert_names(rules_text: str) -> list[str]:
    groups = yaml.safe_load(rules_text)["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule]


@pytest.fixture(scope="module")
def shipped_rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rules") / "pricestream.rules.yaml"
    path.write_text(rules_file())
    return path


def test_promtool_accepts_the_rules(shipped_rules: Path) -> None:
    result = subprocess.run(
        [require_binary("promtool"), "check", "rules", str(shipped_rules)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # 23 of pricestream.rules.yaml, 39 generated for the SLOs (tests/test_slo.py)
    assert "SUCCESS: 62 rules found" in result.stdout


def test_every_alert_has_severity_annotations_and_a_runbook(shipped_rules: Path) -> None:
    groups = yaml.safe_load(shipped_rules.read_text())["groups"]
    alerts = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    assert len(alerts) >= 12
    for rule in alerts:
        assert rule["alert"].startswith("PriceStream")
        assert rule["labels"]["severity"] in {"critical", "warning", "info", "page", "ticket"}
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}
        runbook = ROOT / "docs/runbooks" / f"{rule['alert']}.md"
        assert rule["annotations"]["runbook_url"] == f"{RUNBOOKS}/{runbook.name}"
        assert runbook.exists(), f"no runbook for {rule['alert']}"
    for group in groups:
        for rule in group["rules"]:
            if "record" in rule:
                level, metric, operations = rule["record"].split(":")
                assert level and metric.startswith(("pricestream_", "grpc_")) and operations


def test_windows_and_thresholds_come_from_values() -> None:
    text = rules_file(params={"orphanFor": "7s", "rateWindow": "42s"}, selector='job="x"')
    rules = {
        rule.get("alert") or rule["record"]: rule
        for group in yaml.safe_load(text)["groups"]
        for rule in group["rules"]
    }
    assert rules["PriceStreamPubSubSubscriptionsOrphaned"]["for"] == "7s"
    assert "[42s]" in rules["namespace_job_pod:pricestream_price_updates_received:rate"]["expr"]
    assert 'pricestream_streams_active{job="x"}' in text
    assert "${" not in text


def labels(pod: str, severity: str) -> dict[str, str]:
    return {"job": JOB, "namespace": NAMESPACE, "pod": pod, "severity": severity}


def orphaned(pod: str, value: int) -> Expected:
    return Expected(
        "PriceStreamPubSubSubscriptionsOrphaned",
        labels(pod, "critical"),
        {
            "summary": "A pod holds Redis Pub/Sub subscriptions while it has no streams.",
            "description": f"Pod {pod} in namespace {NAMESPACE} holds {value} Redis Pub/Sub "
            "subscriptions although no stream is active: subscriptions leaked.",
            "runbook_url": f"{RUNBOOKS}/PriceStreamPubSubSubscriptionsOrphaned.md",
        },
    )


def zombies(pod: str, value: int) -> Expected:
    return Expected(
        "PriceStreamZombieSessions",
        labels(pod, "warning"),
        {
            "summary": "A pod holds sessions that have no stream.",
            "description": f"Pod {pod} in namespace {NAMESPACE} holds {value} more sessions "
            "than active streams (threshold 50).",
            "runbook_url": f"{RUNBOOKS}/PriceStreamZombieSessions.md",
        },
    )


def websocket_leak(pod: str, value: int) -> Expected:
    return Expected(
        "PriceStreamWebSocketSessionLeak",
        labels(pod, "warning"),
        {
            "summary": "A pod holds sessions whose WebSockets have closed.",
            "description": f"Pod {pod} in namespace {NAMESPACE} holds {value} sessions with no "
            "stream and no open socket (threshold 50) while it closed at least as many "
            "WebSockets in 1h: WebSocket closes are not reaching the session cleanup.",
            "runbook_url": f"{RUNBOOKS}/PriceStreamWebSocketSessionLeak.md",
        },
    )


def drift(pod: str, resource: str, value: int) -> Expected:
    return Expected(
        "PriceStreamBookkeepingDrift",
        {**labels(pod, "warning"), "resource": resource},
        {
            "summary": "Opened minus closed counters disagree with the active gauge.",
            "description": f"Pod {pod} in namespace {NAMESPACE}: opened minus closed {resource} "
            f"differs from the live gauge by {value}.",
            "runbook_url": f"{RUNBOOKS}/PriceStreamBookkeepingDrift.md",
        },
    )


SPIKE = hold(100, 20) + ramp(100, 1000, 10) + hold(1000, 10) + ramp(1000, 0, 10) + hold(0, 100)
SEED_SHAPE = [0.0, *ramp(0, 1000, 10), *hold(1000, 10), *ramp(1000, 0, 10), *hold(0, 60)]
SEED_LEAK = [min(93, 93 * minute // 29) for minute in range(len(SEED_SHAPE))]
LEAKY = "pricestream-7d9f-leaky"


def seed_leak() -> Scenario:
    """The seed's bug: 1,897 subscriptions opened, 1,804 closed, streams back to zero."""
    leaky = Pod(
        LEAKY,
        list(SEED_SHAPE),
        universe=499,
        subscription_churn=46,
        leaked_sessions=SEED_LEAK,
        leaked_subscriptions=SEED_LEAK,
    )
    return Scenario(
        "seed leak: 93 orphaned subscriptions and sessions after streams return to zero",
        [leaky, Pod("pricestream-7d9f-healthy", hold(300, len(SEED_SHAPE)))],
        check_minutes=[15, 25, 40, 50, 80],
        firing={
            40: [zombies(LEAKY, 93)],  # 51+ zombies since minute 16, for 15m
            50: [orphaned(LEAKY, 93), zombies(LEAKY, 93)],  # no stream since 30, for 15m
            80: [orphaned(LEAKY, 93), zombies(LEAKY, 93)],
        },
    )


BROWSER_SHAPE = [0.0, *ramp(0, 1000, 10), *hold(1000, 10), *ramp(1000, 0, 10), *hold(0, 100)]
BROWSER_LEAK = [min(93, 93 * minute // 29) for minute in range(len(BROWSER_SHAPE))]
WS_LEAKY = "pricestream-7d9f-wsleak"


def browser_churn() -> Scenario:
    """Browsers come and go: WebSocket and SSE sockets (with gRPC streams beside them) rise
    tenfold and fall to zero, thousands of WebSockets close, and up to 40 sessions at a time
    are created but not yet streaming. Below every threshold, counters agree: nothing fires."""
    waiting = [40.0] * len(SPIKE)
    return Scenario(
        "healthy browser churn: WebSockets and SSE up tenfold and back to zero, nothing fires",
        [
            Pod("pricestream-a", list(SPIKE), ws_share=0.7, sse_share=0.2, leaked_sessions=waiting),
            Pod("pricestream-b", list(SPIKE), churn=60, ws_share=1, leaked_sessions=waiting),
        ],
        check_minutes=[15, 25, 35, 45, 60, 90, 120, 150],
    )


def websocket_session_leak() -> Scenario:
    """The original system's leak on the browser path (PRICESTREAM_FAULTS=
    skip_cleanup_on_ws_close): each closing WebSocket leaves its session held, 93 in all, while
    the stream and socket gauges go back to zero. A gRPC pod beside it stays quiet."""
    leaky = Pod(WS_LEAKY, list(BROWSER_SHAPE), ws_share=1, leaked_sessions=BROWSER_LEAK)
    grpc_only = Pod("pricestream-7d9f-grpc", hold(300, len(BROWSER_SHAPE)))
    return Scenario(
        "WebSocket session leak: fires 15m after 51+ sessions outlive their sockets, resolves "
        "an hour after the last WebSocket closed while PriceStreamZombieSessions stays",
        [leaky, grpc_only],
        check_minutes=[15, 25, 30, 32, 40, 80, 100],
        firing={
            # from minute 16: 51+ sessions without stream or socket, 300+ WebSockets closed
            32: [zombies(WS_LEAKY, 93), websocket_leak(WS_LEAKY, 93)],
            40: [zombies(WS_LEAKY, 93), websocket_leak(WS_LEAKY, 93)],
            80: [zombies(WS_LEAKY, 93), websocket_leak(WS_LEAKY, 93)],
            100: [zombies(WS_LEAKY, 93)],  # no WebSocket closed since minute 30
        },
    )


def websocket_gauge_drift() -> Scenario:
    """From minute 5, 10 WebSockets are closed and counted but the gauge still holds them."""
    stuck = [0.0] * 5 + [10.0] * 25
    pod = Pod("pricestream-drift", hold(300, 30), ws_share=0.5, stuck_ws=stuck)
    return Scenario(
        "WebSocket gauge above opened - closed: drift of ws_connections fires after its 10m",
        [pod],
        check_minutes=[10, 16, 25],
        firing={
            16: [drift(pod.name, "ws_connections", 10)],
            25: [drift(pod.name, "ws_connections", 10)],
        },
    )


def restart_series() -> list[Pod]:
    restarted: list[float | None] = [*hold(300, 40), None, *hold(300, 80)]
    replaced_old: list[float | None] = [*hold(300, 60), *[None] * 61]
    replaced_new: list[float | None] = [*[None] * 60, *hold(300, 61)]
    return [
        Pod("pricestream-a", restarted, restarts_at=[41]),
        Pod("pricestream-b", replaced_old),
        Pod("pricestream-c", replaced_new),
    ]


def target_absent() -> Scenario:
    other = {"series": f'up{{job="other",namespace="{NAMESPACE}"}}', "values": "1x40"}
    expected = Expected(
        "PriceStreamTargetAbsent",
        {"job": JOB, "namespace": NAMESPACE, "severity": "critical"},
        {
            "summary": "Prometheus has no pricestream target at all.",
            "description": f"No scrape target matches {JOB} in namespace {NAMESPACE}: the service "
            "is gone or no longer discovered.",
            "runbook_url": f"{RUNBOOKS}/PriceStreamTargetAbsent.md",
        },
    )
    return Scenario(
        "target absent: fires after 15m, keeping the namespace label for routing",
        [],
        check_minutes=[10, 20],
        firing={20: [expected]},
        extra_series=[other],
    )


def overloaded(metric: str, value: str, what: str) -> Callable[[], Scenario]:
    def scenario() -> Scenario:
        pod = Pod("pricestream-hot", hold(3000, 30))
        series = {"series": f"{metric}{{{pod.labels()}}}", "values": f"0x4 {value}x25"}
        expected = Expected(
            "PriceStreamOverloaded",
            labels(pod.name, "warning"),
            {
                "summary": "A pod's CPU is saturated; it refuses new sessions.",
                "description": f"Pod {pod.name} in namespace {NAMESPACE} is past its overload "
                "limit (flush lag in seconds, or share of streams still writing their previous "
                f"batch: {float(value):.2f}): it refuses new sessions and reports not ready.",
                "runbook_url": f"{RUNBOOKS}/PriceStreamOverloaded.md",
            },
        )
        return Scenario(
            f"{what} from minute 5: overload fires after its 10m, not before",
            [pod],
            check_minutes=[10, 16, 25],
            firing={16: [expected], 25: [expected]},
            extra_series=[series],
        )

    return scenario


SCENARIOS = {
    "healthy_spike": lambda: Scenario(
        "healthy 10x spike up and back to zero on two pods: nothing fires",
        [Pod("pricestream-a", list(SPIKE)), Pod("pricestream-b", list(SPIKE), churn=5)],
        check_minutes=[15, 25, 35, 45, 60, 90, 120, 150],
    ),
    "seed_leak": seed_leak,
    "browser_churn": browser_churn,
    "websocket_session_leak": websocket_session_leak,
    "websocket_gauge_drift": websocket_gauge_drift,
    "pod_restart": lambda: Scenario(
        "a pod restarts in place (counters reset) and another is replaced: nothing fires",
        restart_series(),
        check_minutes=[30, 41, 45, 61, 70, 100, 120],
    ),
    "target_absent": target_absent,
    "overloaded_by_lag": overloaded("pricestream_flush_lag_seconds", "0.8", "flushes 800 ms late"),
    "overloaded_by_backlog": overloaded(
        "pricestream_flush_backlog_ratio", "0.9", "90% of streams behind their flush"
    ),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_promtool_scenario(name: str, shipped_rules: Path, tmp_path: Path) -> None:
    scenario = SCENARIOS[name]()
    document = scenario.promtool_test(str(shipped_rules), alert_names(shipped_rules.read_text()))
    run_rules_test(document, tmp_path / f"{name}.test.yaml")


def test_two_releases_rules_each_see_only_their_own_series(
    shipped_rules: Path, tmp_path: Path
) -> None:
    """Two releases in one namespace, each with its rule groups (as two PrometheusRules load):
    the other release leaks as the seed did. Its alerts fire once, from its own rules, and this
    release's rules neither alert on its pods nor record its series (two groups writing one
    recorded series is what made the cluster's Prometheus log out-of-order samples)."""
    other_rules = tmp_path / "other.rules.yaml"
    other_rules.write_text(rules_file(selector='job="other",namespace="prod"'))
    leaky = "other-7d9f-leaky"
    other = Pod(
        leaky,
        list(SEED_SHAPE),
        universe=499,
        subscription_churn=46,
        leaked_sessions=SEED_LEAK,
        leaked_subscriptions=SEED_LEAK,
        job="other",
    )

    def theirs(expected: Expected) -> Expected:
        return Expected(expected.alert, {**expected.labels, "job": "other"}, expected.annotations)

    scenario = Scenario(
        "another release's seed leak in the same namespace: each alert once, from its rules",
        [other, Pod("pricestream-7d9f-healthy", hold(300, len(SEED_SHAPE)))],
        check_minutes=[15, 25, 40, 50, 80],
        firing={
            40: [theirs(zombies(leaky, 93))],
            50: [theirs(orphaned(leaky, 93)), theirs(zombies(leaky, 93))],
            80: [theirs(orphaned(leaky, 93)), theirs(zombies(leaky, 93))],
        },
    )
    document = scenario.promtool_test(str(shipped_rules), alert_names(shipped_rules.read_text()))
    document["rule_files"].append(str(other_rules))
    p99 = "namespace_job_pod:pricestream_delivery_latency_seconds:p99"
    document["tests"][0]["promql_expr_test"] = [
        {
            # one p99 series per pod, each recorded by its own release's rules alone
            "expr": f"count by (job) (count by (job, pod) ({p99}))",
            "eval_time": "20m",
            "exp_samples": [
                {"labels": '{job="other"}', "value": 1},
                {"labels": f'{{job="{JOB}"}}', "value": 1},
            ],
        }
    ]
    run_rules_test(document, tmp_path / "two_releases.test.yaml")


def test_seed_leak_counts_match_the_seed() -> None:
    series = {s["series"].split("{")[0]: s["values"].split() for s in seed_leak().pods[0].series()}
    assert series["pricestream_pubsub_subscriptions_opened_total"][-1] == "1897"
    assert series["pricestream_pubsub_subscriptions_closed_total"][-1] == "1804"
    assert series["pricestream_streams_active"][-1] == "0"
