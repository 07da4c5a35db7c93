"""What a dashboard needs beyond its panels, on Grafana's own types (grafana-foundation-sdk,
Grafana 11.6 schema): variables, annotations, panel ids, the JSON Grafana loads, and the PromQL a
dashboard makes Prometheus run. The panels' look is `dashboards.style`."""

from __future__ import annotations

import json
import re
from typing import Any

from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as model

from dashboards.style import DATASOURCE


def datasource_variable() -> builders.DatasourceVariable:
    return (
        builders.DatasourceVariable("datasource")
        .label("Data source")
        .type("prometheus")
        .hide(model.VariableHide.DONT_HIDE)
    )


def query_variable(
    name: str, label: str, query: str, *, multi: bool, all_value: str | None = None
) -> builders.QueryVariable:
    """A variable of `label_values(...)`, refreshed with the time range, sorted."""
    variable = (
        builders.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query({"query": query, "refId": f"{name}-variable"})
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(multi)
        .include_all(all_value is not None)
        .hide(model.VariableHide.DONT_HIDE)
    )
    if all_value is not None:
        variable = variable.all_value(all_value)
    return variable


def builtin_annotation() -> builders.AnnotationQuery:
    """Grafana's own annotations and alerts, as every dashboard has them."""
    return (
        builders.AnnotationQuery()
        .name("Annotations & Alerts")
        .datasource(model.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
        .enable(True)
        .hide(True)
        .icon_color("rgba(0, 211, 255, 1)")
        .type("dashboard")
        .built_in(1)
    )


class PrometheusAnnotationQuery(model.AnnotationQuery):
    """An annotation of a Prometheus query. The SDK's model holds the fields every datasource
    shares; the Prometheus datasource also reads its own (step, title and text templates, the
    labels that become tags) from the annotation, so they are added to its JSON here."""

    def __init__(self, name: str, expr: str, title: str, text: str, tag_keys: list[str]) -> None:
        super().__init__(name=name, datasource=DATASOURCE, enable=True, expr=expr)
        self.title_format, self.text_format, self.tag_keys = title, text, tag_keys

    def to_json(self) -> dict[str, object]:
        return super().to_json() | {
            "step": "30s",
            "titleFormat": self.title_format,
            "textFormat": self.text_format,
            "tagKeys": ",".join(self.tag_keys),
            "useValueForTime": False,
        }


class AlertsAnnotation(cogbuilder.Builder[model.AnnotationQuery]):
    """Firing alerts drawn on every time series panel."""

    def __init__(self, expr: str) -> None:
        self._internal = PrometheusAnnotationQuery(
            "Firing alerts", expr, "{{alertname}}", "{{pod}} ({{severity}})", ["severity", "pod"]
        )
        self._internal.icon_color = "red"

    def build(self) -> model.AnnotationQuery:
        return self._internal


def build_model(board: builders.Dashboard) -> model.Dashboard:
    """The SDK's dashboard with its panels numbered in order (the builder places them on the
    grid, left to right and row by row, but leaves every id unset)."""
    dashboard = board.build()
    for number, panel in enumerate(dashboard.panels or [], start=1):
        panel.id_val = number
    return dashboard


def to_json(dashboard: model.Dashboard) -> dict[str, Any]:
    """The dashboard as Grafana loads it, by the SDK's own encoder."""
    return json.loads(json.dumps(dashboard, cls=JSONEncoder))


def promql_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression a dashboard's JSON makes Prometheus run: panel targets,
    annotations, and the series selector inside each `label_values(selector, label)` variable."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query", "")
        query = query.get("query", "") if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.+), *\w+\)", query)
        if match:
            exprs.append(match.group(1))
    return exprs
