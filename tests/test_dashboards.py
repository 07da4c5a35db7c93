"""Dashboards as code: committed JSON is fresh, every panel has a unit and queries, and every
query of the dashboards and the rules names only metrics a real pod exports."""

from __future__ import annotations

import json

import yaml
from chart import rules_file
from metric_names import PROMETHEUS_SERIES, exported_names, referenced_names
from pricestream.server import Server

from dashboards import generate, overview
from dashboards.grafana import promql_queries


def panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_committed_json_is_fresh() -> None:
    assert generate.main(["--check"]) == 0, "run `make dashboards` and commit the JSON"
    for name, build in generate.DASHBOARDS.items():
        committed = json.loads((generate.OUT / name).read_text())
        assert committed == build()


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
            if "rate(" in target["expr"] or "increase(" in target["expr"]:
                assert "[$__rate_interval]" in target["expr"], panel["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"datasource", "namespace", "pod"}
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
