"""The house style of pricestream's dashboards, on Grafana's own builders (grafana-foundation-sdk).

Every panel of every dashboard is made here, so what all of them share is decided once: the
datasource variable, a unit, a `refId` on every query, legends as a table of last values,
`min: 0` unless a series can go below zero, and stat colours from explicit thresholds.
"""

from __future__ import annotations

from typing import TypeVar

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import gauge as gauge_builders
from grafana_foundation_sdk.builders import prometheus
from grafana_foundation_sdk.builders import stat as stat_builders
from grafana_foundation_sdk.builders import timeseries as timeseries_builders
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model

# Every panel, query, variable and annotation reads the dashboard's `datasource` variable.
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
# Threshold steps of a stat or gauge: (from value, colour), the first from None (the base colour).
Steps = list[tuple[float | None, str]]
LAST = ["lastNotNull"]
P = TypeVar("P", timeseries_builders.Panel, stat_builders.Panel, gauge_builders.Panel)
PanelBuilder = timeseries_builders.Panel | stat_builders.Panel | gauge_builders.Panel


def per_second(thing: str) -> str:
    """A Grafana custom unit that reads "1.2 K updates/s" (`cps` would read "c/s")."""
    return f"count:{thing}/s"


def query(expr: str, legend: str = "") -> prometheus.Dataquery:
    """A PromQL range query; the panel it joins gives it its `refId`."""
    return (
        prometheus.Dataquery()
        .expr(expr)
        .legend_format(legend or "__auto")
        .range()
        .datasource(DATASOURCE)
    )


def _with_queries(
    panel: P, title: str, unit: str, description: str, queries: list[prometheus.Dataquery]
) -> P:
    if not queries:
        raise ValueError(f"{title}: a panel without a query")
    return (
        panel.title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .targets([q.ref_id(chr(ord("A") + i)) for i, q in enumerate(queries)])
    )


def _thresholds(title: str, steps: Steps) -> dashboard_builders.ThresholdsConfig:
    """Without explicit steps Grafana paints everything red from 80."""
    if not steps or steps[0][0] is not None:
        raise ValueError(f"{title}: threshold steps start with the base colour (None, colour)")
    return (
        dashboard_builders.ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)
        .steps([model.Threshold(value, colour) for value, colour in steps])
    )


def timeseries(
    title: str,
    unit: str,
    queries: list[prometheus.Dataquery],
    description: str,
    *,
    signed: bool = False,
    max_value: float | None = None,
) -> timeseries_builders.Panel:
    """A time series panel. Its y axis starts at 0 unless `signed` (a series that can go below
    zero, e.g. a difference of counters: `min: 0` would hide exactly the values that matter)."""
    panel = (
        _with_queries(timeseries_builders.Panel(), title, unit, description, queries)
        .draw_style(common.GraphDrawStyle.LINE)
        .line_width(1)
        .fill_opacity(0 if signed else 10)
        .show_points(common.VisibilityMode.NEVER)
        .stacking(common_builders.StackingConfig().mode(common.StackingMode.NONE).group("A"))
        .legend(
            common_builders.VizLegendOptions()
            .show_legend(True)
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .calcs(LAST)
        )
        .tooltip(
            common_builders.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
    )
    if not signed:
        panel = panel.min(0)
    if max_value is not None:
        panel = panel.max(max_value)
    return panel


def stat(
    title: str, unit: str, q: prometheus.Dataquery, description: str, steps: Steps
) -> stat_builders.Panel:
    """A stat panel of one query, a whole number coloured by `steps`."""
    return (
        _with_queries(stat_builders.Panel(), title, unit, description, [q])
        .decimals(0)
        .color_scheme(dashboard_builders.FieldColor().mode(model.FieldColorModeId.THRESHOLDS))
        .thresholds(_thresholds(title, steps))
        .reduce_options(common_builders.ReduceDataOptions().calcs(LAST).fields("").values(False))
        .color_mode(common.BigValueColorMode.VALUE)
        .graph_mode(common.BigValueGraphMode.AREA)
        .text_mode(common.BigValueTextMode.AUTO)
    )


def gauge(
    title: str,
    unit: str,
    q: prometheus.Dataquery,
    description: str,
    steps: Steps,
    *,
    max_value: float,
) -> gauge_builders.Panel:
    """A gauge of one query from 0 to `max_value` (a gauge's arc needs both ends), coloured by
    `steps`, which its markers show."""
    return (
        _with_queries(gauge_builders.Panel(), title, unit, description, [q])
        .min(0)
        .max(max_value)
        .color_scheme(dashboard_builders.FieldColor().mode(model.FieldColorModeId.THRESHOLDS))
        .thresholds(_thresholds(title, steps))
        .reduce_options(common_builders.ReduceDataOptions().calcs(LAST).fields("").values(False))
        .show_threshold_markers(True)
    )
