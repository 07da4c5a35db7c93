"""Dashboards as code: committed JSON is fresh, every panel has a unit and queries, and every
query of the dashboards and the rules names only metrics a real pod exports. Each class of defect
seen rendering the overview with live data has its own general check: stat panels without
thresholds, `min: 0` on series that can go negative, legends listing many series per pod,
a 0/1 level and counts on one axis, units that do not say what is counted, panels under a row
of another topic."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from grafana_foundation_sdk.models import dashboard as model
from pricestream.api.server import Server
from support.chart import rules_file
from support.metric_names import PROMETHEUS_SERIES, exported_names, referenced_names

from dashboards import generate, overview, slo, style
from dashboards.grafana import promql_queries, to_json


def panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def of_type(kind: str) -> list[dict]:
    return [p for p in panels(overview.build()) if p["type"] == kind]


def exprs(panel: dict) -> list[str]:
    return [t["expr"] for t in panel["targets"]]


def test_committed_json_is_fresh() -> None:
    assert generate.main(["--check"]) == 0, "run `make dashboards` and commit the JSON"
    for name, build in generate.DASHBOARDS.items():
        committed = json.loads((generate.OUT / name).read_text())
        assert committed == build()


def test_dashboards_are_built_with_grafanas_sdk() -> None:
    """The JSON is the SDK's own model encoded by the SDK, of the pinned Grafana 11.6 schema
    (an unpinned install gives a Grafana 10.1 build, schema 36)."""
    board = overview.dashboard()
    assert isinstance(board, model.Dashboard)
    assert board.schema_version == 41
    assert overview.build() == to_json(board)
    assert overview.build()["schemaVersion"] == 41


def test_every_panel_has_a_unit_a_query_and_the_datasource_variable() -> None:
    dashboard = overview.build()
    assert dashboard["uid"] == "pricestream-overview"
    assert len(panels(dashboard)) >= 15
    for panel in panels(dashboard):
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids) and all(ref_ids)
        for target in panel["targets"]:
            assert target["expr"].strip()
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            if "rate(" in target["expr"] or "increase(" in target["expr"]:
                assert "[$__rate_interval]" in target["expr"], panel["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"datasource", "namespace", "pod"}
    assert variables["datasource"]["query"] == "prometheus"
    for name in ["namespace", "pod"]:
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert variables[name]["query"]["refId"], name
    assert variables["pod"]["includeAll"] and variables["pod"]["allValue"] == ".*"
    alerts = dashboard["annotations"]["list"][-1]
    assert alerts["titleFormat"] == "{{alertname}}" and alerts["tagKeys"] == "severity,pod"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids)


def test_panels_do_not_overlap() -> None:
    cells: set[tuple[int, int]] = set()
    for panel in overview.build()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        area = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not area & cells, panel["title"]
        cells |= area


async def test_dashboards_and_rules_name_only_exported_metrics(server: Server) -> None:
    exported = exported_names(server.engine.metrics.exposition().decode()) | PROMETHEUS_SERIES
    for name, build in generate.DASHBOARDS.items():
        for expr in promql_queries(build()):
            unknown = referenced_names(expr) - exported
            assert not unknown, f"{name}: {expr} uses {unknown}"
    for group in yaml.safe_load(rules_file())["groups"]:
        for rule in group["rules"]:
            unknown = referenced_names(rule["expr"]) - exported
            assert not unknown, f"{rule.get('alert') or rule['record']} uses {unknown}"


def colour_at(panel: dict, value: float) -> str:
    """The colour Grafana gives `value` on a stat panel with absolute thresholds."""
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    return [s["color"] for s in steps if s["value"] is None or value >= s["value"]][-1]


def test_every_stat_has_its_own_thresholds() -> None:
    stats = {p["title"]: p for p in of_type("stat")}
    assert len(stats) >= 6
    for title, panel in stats.items():
        defaults = panel["fieldConfig"]["defaults"]
        # without thresholds Grafana paints a stat red from 80
        assert defaults["color"] == {"mode": "thresholds"}, title
        thresholds = defaults["thresholds"]
        assert thresholds["mode"] == "absolute", title
        steps = thresholds["steps"]
        assert steps[0]["value"] is None, f"{title}: the first step is the base colour"
        values = [s["value"] for s in steps[1:]]
        assert values == sorted(values), title
        assert steps != [{"value": None, "color": "green"}, {"value": 80, "color": "red"}], title
    assert colour_at(stats["Pub/Sub subscriptions"], 96) != "red"
    assert colour_at(stats["Firing alerts"], 0) == "green"
    assert colour_at(stats["Firing alerts"], 1) == "red"
    assert colour_at(stats["Ready pods"], 0) == "red"
    assert colour_at(stats["Ready pods"], 2) == "green"
    assert colour_at(stats["Redis Pub/Sub connections"], 0) == "red"


def can_be_negative(expr: str) -> bool:
    """Whether a PromQL expression can yield negative values: a subtraction or a unary minus
    (outside label matchers, strings and range selectors), or a function that yields
    differences or slopes."""
    code = re.sub(r'"[^"]*"', '""', expr)
    code = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", code)
    return "-" in code or bool(re.search(r"\b(deriv|delta|idelta|predict_linear)\(", code))


def test_negative_series_are_recognised() -> None:
    assert can_be_negative('sum(a_total{pod=~"x"}) - sum(b{pod=~"x"})')
    assert can_be_negative("deriv(a[5m])")
    assert can_be_negative("-a")
    assert not can_be_negative('sum(rate(a_total{pod=~"a-b"}[$__rate_interval]))')
    assert not can_be_negative("histogram_quantile(0.99, sum by (le) (rate(a_bucket[5m])))")


def test_no_min_zero_on_series_that_can_be_negative() -> None:
    signed = []
    for panel in of_type("timeseries"):
        defaults = panel["fieldConfig"]["defaults"]
        if any(can_be_negative(e) for e in exprs(panel)):
            signed.append(panel["title"])
            assert defaults.get("min", -1) < 0, f"{panel['title']}: min hides negative values"
    assert "Net drift (opened - closed - active)" in signed


def split_by_pod(target: dict) -> bool:
    groupings = re.findall(r"\bby \(([^)]*)\)", target["expr"])
    return "{{pod}}" in target["legendFormat"] or any(
        "pod" in [label.strip() for label in g.split(",")] for g in groupings
    )


def test_legends_list_each_pod_at_most_once() -> None:
    """A panel with several per-pod queries lists queries x pods rows in a short panel."""
    for panel in of_type("timeseries"):
        per_pod = [t["refId"] for t in panel["targets"] if split_by_pod(t)]
        assert len(per_pod) <= 1, f"{panel['title']}: per-pod queries {per_pod}"
        assert panel["options"]["legend"]["displayMode"] == "table", panel["title"]


def test_a_panel_does_not_mix_rates_and_levels() -> None:
    """A 0/1 gauge and event counts on one axis flatten one of them: one kind per panel."""
    for panel in of_type("timeseries"):
        kinds = {bool(re.search(r"\b(rate|increase)\(", e)) for e in exprs(panel)}
        assert len(kinds) == 1, panel["title"]


PLAIN_UNITS = {"short", "none", "s", "bytes", "percentunit"}


def test_units_say_what_is_counted() -> None:
    """Built-in units whose rendering is unambiguous, or `count:<things>[/s]` ("1.2 K updates/s");
    `cps` renders "c/s" and `ops` "ops/s", which say nothing about the thing counted."""
    for panel in panels(overview.build()):
        unit = panel["fieldConfig"]["defaults"]["unit"]
        custom = re.fullmatch(r"count:[a-z]+(/s)?", unit)
        assert unit in PLAIN_UNITS or custom, f"{panel['title']}: unit {unit}"
        if custom and all(re.search(r"\brate\(", e) for e in exprs(panel)):
            assert unit.endswith("/s"), f"{panel['title']}: a rate is per second"


def rows_of_panels(dashboard: dict) -> list[tuple[str | None, dict]]:
    """Each panel with the title of the row above it (None before the first row)."""
    row, out = None, []
    for panel in sorted(dashboard["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        if panel["type"] == "row":
            row = panel["title"]
        else:
            out.append((row, panel))
    return out


def test_every_panel_sits_under_the_row_of_its_topic() -> None:
    dashboard = overview.build()
    titles = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert titles == list(overview.ROW_TOPICS), "every row declares its topic, in order"
    placed = rows_of_panels(dashboard)
    for row, panel in placed:
        assert row is not None, f"{panel['title']} sits above every row"
        topic = re.compile(overview.ROW_TOPICS[row])
        for expr in exprs(panel):
            for name in referenced_names(expr):
                assert topic.fullmatch(name), f"{panel['title']} ({name}) sits under {row!r}"
    rows = {panel["title"]: row for row, panel in placed}
    for title in ["Flush lag (overload)", "CPU per pod", "Memory per pod (RSS)"]:
        assert rows[title] != "Errors and Redis"
    assert rows["Stream backlog (overload)"] != "Errors and Redis"


def test_browser_path_has_its_panels() -> None:
    """The browser port's sockets, their closes by code, refused handshakes by reason and REST
    requests by status sit under their own row; WebSocket and SSE drift join the other
    resources' (0 before the first close, whose counter has a `code` label)."""
    placed = {panel["title"]: (row, panel) for row, panel in rows_of_panels(overview.build())}
    expected = {
        "WebSocket connections": {"pricestream_ws_connections_active"},
        "SSE connections": {"pricestream_sse_connections_active"},
        "WebSocket opened vs closed by code": {
            "pricestream_ws_connections_opened_total",
            "pricestream_ws_connections_closed_total",
        },
        "SSE opened vs closed by code": {
            "pricestream_sse_connections_opened_total",
            "pricestream_sse_connections_closed_total",
        },
        "Refused handshakes by reason": {"pricestream_web_handshakes_refused_total"},
        "REST requests by status": {"pricestream_http_requests_total"},
    }
    for title, metrics in expected.items():
        row, panel = placed[title]
        assert row == overview.BROWSER, title
        assert set().union(*map(referenced_names, exprs(panel))) == metrics, title
        assert panel["fieldConfig"]["defaults"]["min"] == 0, title
    legends = {
        title: [t["legendFormat"] for t in placed[title][1]["targets"]]
        for title in ["WebSocket opened vs closed by code", "Refused handshakes by reason"]
    }
    assert legends["WebSocket opened vs closed by code"] == ["opened", "closed {{code}}"]
    assert legends["Refused handshakes by reason"] == ["{{transport}} {{reason}}"]
    assert "by (route, status)" in exprs(placed["REST requests by status"][1])[0]
    drift_legends = [
        t["legendFormat"] for t in placed["Net drift (opened - closed - active)"][1]["targets"]
    ]
    assert {"ws connections", "sse connections"} <= set(drift_legends)
    drift_exprs = exprs(placed["Net drift (opened - closed - active)"][1])
    assert any(
        "pricestream_ws_connections_closed_total" in e and "or vector(0)" in e for e in drift_exprs
    )


@pytest.mark.parametrize("steps", [[], [(1, "red")]])
def test_house_style_refuses_a_stat_or_gauge_without_a_base_colour(steps: style.Steps) -> None:
    q = style.query("sum(up)")
    with pytest.raises(ValueError, match="base colour"):
        style.stat("Up", "short", q, "d", steps)
    with pytest.raises(ValueError, match="base colour"):
        style.gauge("Up", "short", q, "d", steps, max_value=1)


def test_house_style_gauge() -> None:
    """No dashboard has a gauge yet; the first one gets the same unit, refId, thresholds and
    `min: 0` as every other panel."""
    panel = to_json(
        style.gauge(
            "Backlog",
            "percentunit",
            style.query("max(pricestream_flush_backlog_ratio)"),
            "Share of streams behind.",
            [(None, "green"), (0.5, "red")],
            max_value=1,
        ).build()
    )
    defaults = panel["fieldConfig"]["defaults"]
    assert panel["type"] == "gauge"
    assert (defaults["unit"], defaults["min"], defaults["max"]) == ("percentunit", 0, 1)
    assert [t["refId"] for t in panel["targets"]] == ["A"]
    assert colour_at(panel, 0.2) == "green" and colour_at(panel, 0.7) == "red"


def test_slo_dashboard_shows_each_objective_its_budget_and_the_alert_thresholds() -> None:
    """A row per SLO of deploy/slo/slos.yaml: objective, SLI and budget left over the period,
    and the burn rate over every alert window with each alert's burn rate drawn as a line."""
    description = slo.spec()
    board = slo.build()
    assert board["uid"] == "pricestream-slo" and board["schemaVersion"] == 41
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == [f"{s['title']} ({s['name']})" for s in description["slos"]]
    burns = sorted({float(a["burn"]) for a in description["alerts"]})
    for row, panel in rows_of_panels(board):
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        name = row.rsplit("(", 1)[1].rstrip(")")
        assert all(f'slo="{name}"' in e for e in exprs(panel)), panel["title"]
        if panel["type"] == "timeseries":
            defaults = panel["fieldConfig"]["defaults"]
            steps = [s["value"] for s in defaults["thresholds"]["steps"][1:]]
            assert steps == burns
            assert defaults["custom"]["thresholdsStyle"]["mode"] == "dashed"
            windows = {e.split("ratio_rate")[1].split("{")[0] for e in exprs(panel)}
            assert windows == {w for a in description["alerts"] for w in (a["long"], a["short"])}
    assert len(of_type("stat")) >= 1
    budget = [p for _, p in rows_of_panels(board) if p["title"] == "Error budget left"]
    assert len(budget) == len(description["slos"])


def test_latency_panel_shows_exemplars() -> None:
    (panel,) = [p for p in panels(overview.build()) if p["title"].startswith("Delivery latency")]
    assert all(t.get("exemplar") for t in panel["targets"])
