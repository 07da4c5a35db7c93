"""Small builders for Grafana dashboard JSON (schema 39+): panels, queries and variables.

Plain data structures: the dashboard model is JSON, and these helpers only fill in the parts
every panel repeats (datasource variable, grid position, unit, legend, thresholds).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
FULL_WIDTH = 24
# Threshold steps of a stat panel: (from value, colour), the first from None (the base colour).
Steps = list[tuple[float | None, str]]


def per_second(thing: str) -> str:
    """A Grafana custom unit that reads "1.2 K updates/s" (`cps` would read "c/s")."""
    return f"count:{thing}/s"


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
        """Start a row; the panels added after it, up to the next row, sit under it."""
        if self.x:
            self.y, self.x, self.row_height = self.y + self.row_height, 0, 0
        self.add({"type": "row", "title": title, "collapsed": False, "panels": []}, FULL_WIDTH, 1)
        self.y, self.x, self.row_height = self.y + 1, 0, 0


def _targets(queries: list[Query]) -> list[dict[str, Any]]:
    return [q.target(chr(ord("A") + i)) for i, q in enumerate(queries)]


def timeseries(
    title: str,
    unit: str,
    queries: list[Query],
    description: str,
    *,
    stack: bool = False,
    signed: bool = False,
    max_value: float | None = None,
) -> dict[str, Any]:
    """A time series panel. Its y axis starts at 0 unless `signed` (a series that can go below
    zero, e.g. a difference of counters: `min: 0` would hide exactly the values that matter)."""
    defaults: dict[str, Any] = {
        "unit": unit,
        "custom": {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 0 if signed else 10,
            "showPoints": "never",
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        },
    }
    if not signed:
        defaults["min"] = 0
    if max_value is not None:
        defaults["max"] = max_value
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": _targets(queries),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(title: str, unit: str, query: Query, description: str, steps: Steps) -> dict[str, Any]:
    """A stat panel coloured by `steps`: without them Grafana paints everything red from 80."""
    if not steps or steps[0][0] is not None:
        raise ValueError(f"{title}: threshold steps start with the base colour (None, colour)")
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": _targets([query]),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "decimals": 0,
                "color": {"mode": "thresholds"},
                "thresholds": {
                    "mode": "absolute",
                    "steps": [{"value": value, "color": color} for value, color in steps],
                },
            },
            "overrides": [],
        },
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
