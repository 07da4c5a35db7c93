"""Small builders for Grafana dashboard JSON (schema 39+): panels, queries and variables.

Plain data structures: the dashboard model is JSON, and these helpers only fill in the parts
every panel repeats (datasource variable, grid position, unit, legend).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
FULL_WIDTH = 24


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False

    def target(self, ref_id: str) -> dict[str, Any]:
        return {
            "datasource": DATASOURCE,
            "expr": self.expr,
            "legendFormat": self.legend or "__auto",
            "range": not self.instant,
            "instant": self.instant,
            "refId": ref_id,
        }


@dataclass
class Layout:
    """Places panels left to right, wrapping at the dashboard width; rows start a new line."""

    y: int = 0
    x: int = 0
    row_height: int = 0
    next_id: int = 1
    panels: list[dict[str, Any]] = field(default_factory=list)

    def add(self, panel: dict[str, Any], width: int, height: int) -> None:
        if self.x + width > FULL_WIDTH:
            self.y, self.x, self.row_height = self.y + self.row_height, 0, 0
        panel["id"] = self.next_id
        panel["gridPos"] = {"h": height, "w": width, "x": self.x, "y": self.y}
        self.next_id += 1
        self.x += width
        self.row_height = max(self.row_height, height)
        self.panels.append(panel)

    def row(self, title: str) -> None:
        if self.x:
            self.y, self.x, self.row_height = self.y + self.row_height, 0, 0
        self.add({"type": "row", "title": title, "collapsed": False, "panels": []}, FULL_WIDTH, 1)
        self.y, self.x, self.row_height = self.y + 1, 0, 0


def _targets(queries: list[Query]) -> list[dict[str, Any]]:
    return [q.target(chr(ord("A") + i)) for i, q in enumerate(queries)]


def timeseries(
    title: str, unit: str, queries: list[Query], description: str, *, stack: bool = False
) -> dict[str, Any]:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": _targets(queries),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "min": 0,
                "custom": {
                    "drawStyle": "line",
                    "lineWidth": 1,
                    "fillOpacity": 10,
                    "showPoints": "never",
                    "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                },
            },
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(title: str, unit: str, query: Query, description: str) -> dict[str, Any]:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": _targets([query]),
        "fieldConfig": {"defaults": {"unit": unit, "decimals": 0}, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
        },
    }


def datasource_variable() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
    }


def query_variable(
    name: str, label: str, query: str, *, multi: bool, all_value: str | None = None
) -> dict[str, Any]:
    variable: dict[str, Any] = {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-variable"},
        "definition": query,
        "refresh": 2,
        "sort": 1,
        "multi": multi,
        "includeAll": all_value is not None,
        "current": {},
        "hide": 0,
    }
    if all_value is not None:
        variable["allValue"] = all_value
    return variable


def alerts_annotation(expr: str) -> dict[str, Any]:
    """Firing alerts drawn on every time series panel."""
    return {
        "name": "Firing alerts",
        "datasource": DATASOURCE,
        "enable": True,
        "iconColor": "red",
        "expr": expr,
        "step": "30s",
        "titleFormat": "{{alertname}}",
        "textFormat": "{{pod}} ({{severity}})",
        "tagKeys": "severity,pod",
        "useValueForTime": False,
    }


def promql_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression the dashboard makes Prometheus run: panel targets, annotations,
    and the series selector inside each `label_values(selector, label)` variable."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    for variable in dashboard["templating"]["list"]:
        match = re.fullmatch(r"label_values\((.+), *\w+\)", variable.get("definition", ""))
        if match:
            exprs.append(match.group(1))
    return exprs
