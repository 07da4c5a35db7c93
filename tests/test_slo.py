"""The SLOs: generated rules are fresh, which events count as the server's fault (written in
deploy/slo/slos.yaml and docs/slo.md) is what the rules compute, and the burn stories of
issue 28 with the production windows the chart ships (promtool test rules):

- fast burn: 2% of the 30-day budget per hour (15x) pages within the workbook's detection time
  (1h x 14.4 / 15 = 57.6 min, plus `for: 2m`), and resolves after the burn stops;
- total outage: 100% errors page within 0.9 min (1h x 14.4 x 0.1%) plus `for: 2m`;
- slow burn (4x): tickets, never a page;
- a 10-minute blip at 10x: nothing;
- a healthy day with a restart and a rolling update (draining refusals): nothing.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc as grpc_codes
import pytest
import yaml
from support.chart import render, rules_file
from support.promtool import run_rules_test
from support.rule_scenarios import JOB, NAMESPACE, SERVICE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import slo_rules  # noqa: E402

RUNBOOKS = "https://github.com/pricestream/pricestream/blob/main/docs/runbooks"
SPEC = yaml.safe_load(slo_rules.SPEC.read_text())
ALERTS = {slo["name"]: slo["alert"] for slo in SPEC["slos"]}
BASELINE = 0.0002  # 0.2x the budget of a 99.9% objective: a good day
DAY = 1440  # minutes


@pytest.fixture(scope="module")
def shipped_rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slo") / "rules.yaml"
    path.write_text(rules_file())
    return path


def promtool_test(rules: Path, tmp_path: Path, tests: list[dict[str, Any]]) -> str:
    interval = tests[0].get("interval", "1m")
    document = {"rule_files": [str(rules)], "evaluation_interval": interval, "tests": tests}
    return run_rules_test(document, tmp_path / "slo.test.yaml")


# --- generation -------------------------------------------------------------------------------


def test_committed_slo_rules_are_generated_from_the_spec() -> None:
    assert slo_rules.main(["--check"]) == 0, "run `make slo` and commit the rules file"


def test_generated_alerts_follow_the_workbook() -> None:
    rules = yaml.safe_load(slo_rules.render())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    pairs = {(a["labels"]["long_window"], a["labels"]["short_window"], a["labels"]["severity"],
              a["labels"]["burn_rate"]) for a in alerts}  # fmt: skip
    assert pairs == {
        ("${sloWindow1h}", "${sloWindow5m}", "page", "14.4"),
        ("${sloWindow6h}", "${sloWindow30m}", "page", "6"),
        ("${sloWindow1d}", "${sloWindow2h}", "ticket", "3"),
        ("${sloWindow3d}", "${sloWindow6h}", "ticket", "1"),
    }
    assert len(alerts) == 4 * len(SPEC["slos"])
    records = [r for g in rules["groups"] for r in g["rules"] if "record" in r]
    for record in [r for r in records if "ratio_rate" in r["record"]]:
        expr = " ".join(record["expr"].split())
        # aggregate, then divide: every rate is summed over the pods before any division
        _, denominator = expr.rsplit(" / ", 1)
        assert denominator.startswith("sum by (namespace, job) (")
        assert expr.count("rate(") == expr.count("sum by (namespace, job) (rate(") + expr.count(
            "label_replace(rate("
        )


def exprs(rule: dict[str, Any]) -> str:
    """Every expression and `for:` of a rendered PrometheusRule, as one text."""
    rules = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    return "\n".join(f"{r['expr']} {r.get('for', '')}" for r in rules)


def test_objectives_margin_and_windows_come_from_values() -> None:
    (rule,) = render(
        "--show-only",
        "templates/prometheusrule.yaml",
        "--set-json",
        "slo.availability.objective=99.5",
        "--set-json",
        "config.flushInterval=0.25",
        "--set",
        "monitoring.rules.params.sloWindow1h=90s",
    )
    text = exprs(rule)
    assert "(100 - 99.5) / 100" in text
    assert 'le=~"0.35(\\\\.0)?"' in text
    assert "[90s]" in text and "${" not in text
    (off,) = render("--show-only", "templates/prometheusrule.yaml", "--set", "slo.enabled=false")
    assert not any(g["name"].startswith("pricestream-slo") for g in off["spec"]["groups"])


def test_the_freshness_bound_is_a_bucket_of_the_server() -> None:
    from pricestream.observability.metrics import Metrics

    for flush, le in [(0.1, "0.2"), (0.05, "0.15"), (0.25, "0.35"), (0.9, "1"), (1.25, "1.35")]:
        exposition = Metrics(flush).exposition().decode()
        (rule,) = render(
            "--show-only",
            "templates/prometheusrule.yaml",
            "--set-json",
            f"config.flushInterval={flush}",
        )
        assert f'le=~"{le}(\\\\.0)?"' in exprs(rule), flush
        bounds = {
            line.split('le="')[1].split('"')[0]
            for line in exposition.splitlines()
            if line.startswith("pricestream_delivery_latency_seconds_bucket")
        }
        assert le in bounds or f"{le}.0" in bounds, (flush, sorted(bounds))


def freshness_le(rule: dict[str, Any]) -> str:
    """The bucket bound the rendered SLO rules count as fresh."""
    (le,) = set(re.findall(r'le=~"([0-9.]+)\(', exprs(rule)))
    return le


@pytest.mark.parametrize(
    ("flush", "margin"), [(None, None), (0.1, 0.25), (0.05, 0.05), (0.9, 0.1), (0.2, 1.5)]
)
def test_the_chart_passes_the_margin_the_rules_use_to_the_server(
    flush: float | None, margin: float | None
) -> None:
    """The configmap's PRICESTREAM_FRESHNESS_MARGIN is slo.freshness.marginSeconds, and a server
    started with the configmap's settings has a latency bucket at exactly the `le` the rules
    count as fresh: the threshold and the bucket cannot drift apart."""
    from pricestream.observability.metrics import Metrics
    from pricestream.settings import load_settings

    args = [
        "--show-only",
        "templates/configmap.yaml",
        "--show-only",
        "templates/prometheusrule.yaml",
    ]
    if flush is not None:
        args += ["--set-json", f"config.flushInterval={flush}"]
    if margin is not None:
        args += ["--set-json", f"slo.freshness.marginSeconds={margin}"]
    objects = render(*args)
    (config,) = [o for o in objects if o["kind"] == "ConfigMap"]
    (rule,) = [o for o in objects if o["kind"] == "PrometheusRule"]
    env = config["data"]
    assert float(env["PRICESTREAM_FRESHNESS_MARGIN"]) == (0.1 if margin is None else margin)
    settings = load_settings(
        flush_interval=env["PRICESTREAM_FLUSH_INTERVAL"],
        freshness_margin=env["PRICESTREAM_FRESHNESS_MARGIN"],
    )
    le = freshness_le(rule)
    expected = (0.1 if flush is None else flush) + (0.1 if margin is None else margin)
    assert float(le) == pytest.approx(expected)
    exposition = Metrics(
        settings.flush_interval, freshness_margin=settings.freshness_margin
    ).exposition()
    bounds = {
        line.split('le="')[1].split('"')[0]
        for line in exposition.decode().splitlines()
        if line.startswith("pricestream_delivery_latency_seconds_bucket")
    }
    # The rule's regex `le=~"<le>(\.0)?"` matches the server's label exactly.
    assert any(re.fullmatch(rf"{re.escape(le)}(\.0)?", bound) for bound in bounds), (le, bounds)


@pytest.mark.parametrize("value", ["0", "-0.1", "10.5"])
def test_settings_refuse_a_freshness_margin_out_of_range_and_name_the_variable(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pricestream.settings import SettingsError, load_settings

    monkeypatch.setenv("PRICESTREAM_FRESHNESS_MARGIN", value)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    message = str(raised.value)
    assert message.startswith(
        "invalid setting freshness_margin (env PRICESTREAM_FRESHNESS_MARGIN): "
    ), message
    assert ("greater than 0" if value != "10.5" else "less than or equal to 10") in message
    monkeypatch.delenv("PRICESTREAM_FRESHNESS_MARGIN")
    assert load_settings().freshness_margin == 0.1
    assert load_settings(freshness_margin="0.25").freshness_margin == 0.25


# --- which events are bad ---------------------------------------------------------------------


def counter(name: str, labels: str, per_minute: float, minutes: int = 20) -> dict[str, str]:
    base = f'job="{JOB}",namespace="{NAMESPACE}",pod="pricestream-a"'
    full = f"{name}{{{base},{labels}}}" if labels else f"{name}{{{base}}}"
    return {"series": full, "values": f"0+{per_minute:g}x{minutes}"}


def grpc(method: str, code: str, per_minute: float) -> dict[str, str]:
    assert code in grpc_codes.StatusCode.__members__  # the server exports the code's name
    labels = f'grpc_service="{SERVICE}",grpc_method="{method}",grpc_type="x",grpc_code="{code}"'
    return counter("grpc_server_handled_total", labels, per_minute)


def refused(transport: str, reason: str, per_minute: float) -> dict[str, str]:
    labels = f'transport="{transport}",reason="{reason}"'
    return counter("pricestream_web_handshakes_refused_total", labels, per_minute)


# (series, events per minute, bad?) — the classification of docs/slo.md
AVAILABILITY_EVENTS = [
    (grpc("CreateSession", "OK", 1000), False),
    (grpc("CreateSession", "UNAVAILABLE", 4), True),  # Redis down, draining
    (grpc("CreateSession", "RESOURCE_EXHAUSTED", 3), True),  # pod full, overloaded
    (grpc("CreateSession", "INTERNAL", 1), True),
    (grpc("CreateSession", "DEADLINE_EXCEEDED", 1), True),
    (grpc("CreateSession", "INVALID_ARGUMENT", 7), False),
    (grpc("CreateSession", "UNAUTHENTICATED", 2), False),
    (grpc("CreateSession", "CANCELLED", 2), False),
    (grpc("StreamPriceUpdates", "OK", 500), False),
    (grpc("StreamPriceUpdates", "UNAVAILABLE", 50), False),  # drain, connection age: resume
    (grpc("StreamPriceUpdates", "RESOURCE_EXHAUSTED", 5), False),  # slow consumer cut off
    (grpc("StreamPriceUpdates", "NOT_FOUND", 9), False),
    (grpc("StreamPriceUpdates", "FAILED_PRECONDITION", 3), False),
    (grpc("StreamPriceUpdates", "UNKNOWN", 2), True),
    (grpc("CloseSession", "UNAVAILABLE", 100), None),  # not an event of this SLI
    (counter("pricestream_http_requests_total", 'route="sessions",status="201"', 200), False),
    (counter("pricestream_http_requests_total", 'route="sessions",status="503"', 2), True),
    (counter("pricestream_http_requests_total", 'route="sessions",status="500"', 1), True),
    (counter("pricestream_http_requests_total", 'route="sessions",status="429"', 6), False),
    (counter("pricestream_http_requests_total", 'route="sessions",status="400"', 3), False),
    (counter("pricestream_http_requests_total", 'route="events",status="503"', 9), None),
    (counter("pricestream_ws_connections_opened_total", "", 150), False),
    (counter("pricestream_sse_connections_opened_total", "", 40), False),
    (refused("ws", "limit", 1), True),
    (refused("ws", "overloaded", 1), True),
    (refused("sse", "backend", 1), True),
    (refused("ws", "draining", 1), True),
    (refused("ws", "rate", 8), False),
    (refused("ws", "origin", 4), False),
    (refused("ws", "unknown_session", 6), False),
    (refused("sse", "busy", 2), False),
]
CONTINUITY_EVENTS = [
    (counter("pricestream_streams_closed_total", f'reason="{reason}"', n), bad)
    for reason, n, bad in [
        ("closed", 300, False),
        ("client_gone", 200, False),
        ("deadline", 10, False),
        ("slow_consumer", 5, False),
        ("shutdown", 80, False),
        ("max_connection_age", 40, False),
        ("redis_unavailable", 6, True),
        ("session_lost", 2, True),
        ("send_error", 1, True),
        ("rejected", 50, None),
    ]
]


def expected_ratio(events: list[tuple[dict[str, str], bool | None]]) -> float:
    def per_minute(s: dict[str, str]) -> float:
        return float(s["values"].split("+")[1].split("x")[0])

    bad = sum(per_minute(s) for s, is_bad in events if is_bad)
    total = sum(per_minute(s) for s, is_bad in events if is_bad is not None)
    return bad / total


def close_to(expr: str, labels: list[str], value: float) -> dict[str, Any]:
    """`expr` equals `value` up to rounding, for each series named by `labels` (promtool 2.42
    compares exactly and has no fuzzy_compare)."""
    return {
        "expr": f"abs({expr} - {value!r}) < bool 1e-12",
        "eval_time": "15m",
        "exp_samples": [{"labels": each, "value": 1} for each in labels],
    }


def ratio_test(slo: str, value: float) -> dict[str, Any]:
    labels = f'{{job="{JOB}",namespace="{NAMESPACE}",slo="{slo}"}}'
    expr = f'namespace_job:pricestream_slo_errors:ratio_rate5m{{slo="{slo}"}}'
    return close_to(expr, [labels], value)


def test_server_side_failures_are_what_the_slis_count(shipped_rules: Path, tmp_path: Path):
    """Every code, status and reason of docs/slo.md's table, at known rates: the 5m error
    ratios are exactly bad / total, gRPC and browser events in the same SLI."""
    availability = expected_ratio(AVAILABILITY_EVENTS)
    continuity = expected_ratio(CONTINUITY_EVENTS)
    bucket = "pricestream_delivery_latency_seconds_bucket"
    latency = [
        counter("pricestream_delivery_latency_seconds_count", "", 10_000),
        counter(bucket, 'le="0.1"', 9_000),
        counter(bucket, 'le="0.2"', 9_990),  # the bound at 0.1 s flush + 0.1 s margin
        counter(bucket, 'le="1.0"', 10_000),
    ]
    series = [s for s, _ in AVAILABILITY_EVENTS + CONTINUITY_EVENTS] + latency
    series.append({"series": f'up{{job="{JOB}",namespace="{NAMESPACE}",pod="pricestream-a"}}',
                   "values": "1x20"})  # fmt: skip
    objective = close_to(
        "namespace_job:pricestream_slo_objective:ratio",
        [f'{{job="{JOB}",namespace="{NAMESPACE}",slo="{name}"}}' for name in ALERTS],
        0.999,
    )
    promtool_test(
        shipped_rules,
        tmp_path,
        [
            {
                "name": "which events are the server's fault",
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    ratio_test("availability", availability),
                    ratio_test("continuity", continuity),
                    ratio_test("freshness", 0.001),
                    objective,
                ],
            }
        ],
    )
    assert 0.005 < availability < 0.01 and 0.01 < continuity < 0.02


# --- burn stories ------------------------------------------------------------------------------


@dataclass
class Pod:
    """A pod's CreateSession calls per minute; `alive` minutes it exists (else stale)."""

    name: str
    start: int = 0
    end: int | None = None
    restarts_at: list[int] = field(default_factory=list)


@dataclass
class Story:
    name: str
    minutes: int
    bad_fraction: dict[int, float]  # from minute -> fraction of calls that fail (Unavailable)
    checks: dict[int, list[str]]  # minute -> "page:1h" / "ticket:3d"... firing then
    pods: list[Pod] = field(default_factory=lambda: [Pod("pricestream-a"), Pod("pricestream-b")])
    calls: float = 1000  # per pod per minute
    refusals: dict[int, float] = field(default_factory=dict)  # minute -> extra bad calls/pod
    step: int = 1  # minutes between samples and between rule evaluations

    def fraction(self, minute: int) -> float:
        return [f for start, f in sorted(self.bad_fraction.items()) if start <= minute][-1]

    def series(self) -> list[dict[str, str]]:
        out = []
        for pod in self.pods:
            points: dict[str, list[str]] = {"OK": [], "UNAVAILABLE": []}
            totals = {"OK": 0.0, "UNAVAILABLE": 0.0}
            for minute in range(0, self.minutes + 1, self.step):
                alive = pod.start <= minute and (pod.end is None or minute < pod.end)
                if not alive:
                    before = minute - self.step
                    was = pod.start <= before and 0 <= before < (pod.end or 0)
                    for code in points:
                        points[code].append("stale" if was else "_")
                    continue
                if minute in pod.restarts_at or minute == pod.start:
                    totals = {"OK": 0.0, "UNAVAILABLE": 0.0}
                if minute > pod.start and minute not in pod.restarts_at:
                    calls = self.calls * self.step
                    bad = calls * self.fraction(minute) + self.refusals.get(minute, 0)
                    totals["UNAVAILABLE"] += bad
                    totals["OK"] += calls - bad
                for code in points:
                    points[code].append(f"{totals[code]:g}")
            for code, values in points.items():
                labels = (
                    f'job="{JOB}",namespace="{NAMESPACE}",pod="{pod.name}",grpc_service="{SERVICE}",'
                    f'grpc_method="CreateSession",grpc_type="unary",grpc_code="{code}"'
                )
                out.append({"series": f"grpc_server_handled_total{{{labels}}}",
                            "values": " ".join(values)})  # fmt: skip
        return out

    def promtool(self) -> dict[str, Any]:
        windows = {"page:1h": ("page", "1h", "5m", "14.4"), "page:6h": ("page", "6h", "30m", "6"),
                   "ticket:1d": ("ticket", "1d", "2h", "3"),
                   "ticket:3d": ("ticket", "3d", "6h", "1")}  # fmt: skip
        tests = []
        for minute, firing in sorted(self.checks.items()):
            expected = []
            for key in firing:
                severity, long, short, burn = windows[key]
                expected.append(
                    {
                        "exp_annotations": annotations(severity, long, short, burn),
                        "exp_labels": {
                            "job": JOB,
                            "namespace": NAMESPACE,
                            "slo": "availability",
                            "severity": severity,
                            "long_window": long,
                            "short_window": short,
                            "burn_rate": burn,
                        },
                    }
                )
            for alert in ALERTS.values():
                tests.append(
                    {
                        "eval_time": f"{minute}m",
                        "alertname": alert,
                        "exp_alerts": expected if alert == ALERTS["availability"] else [],
                    }
                )
        return {
            "name": self.name,
            "interval": f"{self.step}m",
            "input_series": self.series(),
            "alert_rule_test": tests,
        }


def annotations(severity: str, long: str, short: str, burn: str) -> dict[str, str]:
    del severity
    spec = next(slo for slo in SPEC["slos"] if slo["name"] == "availability")
    return {
        "summary": spec["summary"],
        "description": f"The availability SLO of {JOB} in namespace {NAMESPACE} has burnt its "
        f"error budget at over {burn}x the sustainable rate for the last {long} and {short} "
        "(objective 99.9% over 30d).",
        "runbook_url": f"{RUNBOOKS}/{ALERTS['availability']}.md",
    }


# Stories start with hours of good traffic (a day for the slow ones), so the windows have history.
T0 = 6 * 60
PAGE_FAST = ["page:1h"]


def fast_burn() -> Story:
    """15x (1.5% of calls fail; 2.08% of the 30-day budget per hour) from T0 until T0+70m.
    Workbook detection time: 60 min x 14.4 / 15 = 57.6 min; `for: 2m`."""
    return Story(
        "fast burn: 2% of the budget in an hour pages within 57.6m + for: 2m, then resolves",
        T0 + 100,
        {0: BASELINE, T0: 0.015, T0 + 70: BASELINE},
        {
            T0 + 30: [],
            T0 + 50: [],  # the 1h window still holds 10 good minutes
            T0 + 55: [],
            T0 + 60: PAGE_FAST,  # condition true since ~T0+57m (rate extrapolates), for 2m
            T0 + 69: PAGE_FAST,
            T0 + 80: [],  # the 5m window is clean again: resolved
            T0 + 100: [],
        },
    )


def outage() -> Story:
    """Every CreateSession fails from T0: 0.9 min of it crosses 14.4x over 1h, `for: 2m`."""
    return Story(
        "total outage: pages within 0.9m + for: 2m",
        T0 + 8,
        {0: BASELINE, T0: 1.0},
        {T0 + 1: [], T0 + 4: PAGE_FAST, T0 + 8: PAGE_FAST},
    )


def slow_burn() -> Story:
    """4x (0.4% of calls fail) for 21 hours after a good day, sampled every 5 minutes: the 1x
    ticket (3d and 6h windows) from ~6.4h + for: 3h, the 3x ticket (1d and 2h) from ~17.7h +
    for: 1h; 4x never reaches a page's 6x."""
    hour = 60
    return Story(
        "slow burn: tickets, never a page",
        DAY + 21 * hour,
        {0: BASELINE, DAY: 0.004},
        {
            DAY + 3 * hour: [],
            DAY + 9 * hour: [],
            DAY + 10 * hour: ["ticket:3d"],
            DAY + 18 * hour: ["ticket:3d"],
            DAY + 20 * hour: ["ticket:3d", "ticket:1d"],
            DAY + 21 * hour: ["ticket:3d", "ticket:1d"],
        },
        step=5,
    )


def blip() -> Story:
    """10 minutes at 10x (1% of calls fail): under 14.4x on the 5m window, 1/6 of the 1h."""
    return Story(
        "short blip at 10x for 10 minutes: nothing fires",
        T0 + 90,
        {0: BASELINE, T0: 0.01, T0 + 10: BASELINE},
        {T0 + m: [] for m in (5, 10, 12, 15, 20, 30, 45, 60, 90)},
    )


def healthy_day() -> Story:
    """Two days at 0.2x, sampled every 5 minutes: pod a restarts (counters reset) at 6h, and a
    rolling update at 36h replaces a and b by c and d one at a time, each drain refusing 20
    calls at once."""
    hour = 60
    update = 36 * hour
    pods = [
        Pod("pricestream-a", restarts_at=[6 * hour], end=update + 5),
        Pod("pricestream-b", end=update + 15),
        Pod("pricestream-c", start=update),
        Pod("pricestream-d", start=update + 10),
    ]
    return Story(
        "healthy day with a restart and a rolling update: nothing fires",
        2 * DAY,
        {0: BASELINE},
        {m: [] for m in range(DAY, 2 * DAY + 1, 30)} | {update + m: [] for m in range(0, 60, 5)},
        pods=pods,
        refusals={update + 5: 20, update + 15: 20, 6 * hour + 5: 20},
        step=5,
    )


STORIES = {
    "fast_burn": fast_burn,
    "outage": outage,
    "slow_burn": slow_burn,
    "blip": blip,
    "healthy_day": healthy_day,
}


@pytest.mark.parametrize("name", sorted(STORIES))
def test_burn_story(name: str, shipped_rules: Path, tmp_path: Path) -> None:
    assert "SUCCESS" in promtool_test(shipped_rules, tmp_path, [STORIES[name]().promtool()])


def test_every_slo_alert_has_a_runbook_and_routes(shipped_rules: Path) -> None:
    groups = yaml.safe_load(shipped_rules.read_text())["groups"]
    alerts = [r for g in groups for r in g["rules"] if r.get("alert") in ALERTS.values()]
    assert len(alerts) == 12
    for rule in alerts:
        assert rule["labels"]["severity"] in {"page", "ticket"}
        assert rule["annotations"]["runbook_url"] == f"{RUNBOOKS}/{rule['alert']}.md"
        assert (ROOT / "docs/runbooks" / f"{rule['alert']}.md").exists()
