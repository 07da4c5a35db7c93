"""The pricestream SLO dashboard: per SLO, its objective, the SLI and the error budget left over
the period, and the burn rate over every window of the alerts with their thresholds drawn.

It reads the recording rules generated from deploy/slo/slos.yaml (scripts/slo_rules.py), so the
objectives the chart's values set are the ones shown; the SLOs and the alerts' windows and burn
rates come from that same description.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model

from dashboards.grafana import (
    AlertsAnnotation,
    build_model,
    builtin_annotation,
    datasource_variable,
    query_variable,
    to_json,
)
from dashboards.style import PanelBuilder, query, stat, timeseries

UID = "pricestream-slo"
SPEC = Path(__file__).resolve().parents[1] / "deploy/slo/slos.yaml"
RATIO = "namespace_job:pricestream_slo_errors:ratio_rate{window}"
OBJECTIVE = "namespace_job:pricestream_slo_objective:ratio"
FIRING_ALERTS = (
    'ALERTS{alertstate="firing", alertname=~"PriceStream.*ErrorBudgetBurn", namespace="$namespace"}'
)
# Colours of the burn-rate thresholds: tickets amber, pages red.
SEVERITY_COLOUR = {"ticket": "orange", "page": "red"}


def spec() -> dict[str, Any]:
    return yaml.safe_load(SPEC.read_text())


def windows(description: dict[str, Any]) -> list[str]:
    units = {"m": 60, "h": 3600, "d": 86400}
    found = {w for a in description["alerts"] for w in (a["long"], a["short"])}
    return sorted(found, key=lambda w: int(w[:-1]) * units[w[-1]])


def selector(slo: str) -> str:
    return f'namespace="$namespace", job=~"$job", slo="{slo}"'


def budget(slo: str) -> str:
    return f"(1 - {OBJECTIVE}{{{selector(slo)}}})"


def burn_rates(slo: dict[str, Any], description: dict[str, Any]) -> PanelBuilder:
    """The burn rate (error ratio / error budget) per window; 1 spends the budget exactly over
    the period. Each alert's threshold is drawn (its burn rate, tickets amber, pages red)."""
    name = slo["name"]
    queries = [
        query(
            f"{RATIO.format(window=window)}{{{selector(name)}}} / ignoring (slo) {budget(name)}",
            f"{window} {{{{job}}}}",
        )
        for window in windows(description)
    ]
    steps = [model.Threshold(None, "transparent")] + [
        model.Threshold(float(alert["burn"]), SEVERITY_COLOUR[alert["severity"]])
        for alert in sorted(description["alerts"], key=lambda a: a["burn"])
    ]
    pairs = ", ".join(
        f"{a['burn']:g}x over {a['long']} and {a['short']} ({a['severity']})"
        for a in description["alerts"]
    )
    return (
        timeseries(
            f"{slo['title']}: burn rate per window",
            "short",
            queries,
            "Error ratio over each window divided by the error budget (1 - objective): 1 "
            f"spends the budget exactly over the period. Alerts: {pairs}; both windows of a "
            "pair must be above its line.",
        )
        .thresholds(builders.ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE).steps(steps))
        .thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(
                common.GraphThresholdsStyleMode.DASHED
            )
        )
    )


def dashboard() -> model.Dashboard:
    description = spec()
    board = (
        builders.Dashboard("pricestream / SLOs")
        .uid(UID)
        .description(
            "Service level objectives: freshness, availability, stream continuity. Objective, "
            "SLI and error budget left over the period, burn rates against the alerts' thresholds."
        )
        .tags(["pricestream", "slo"])
        .timezone("browser")
        .editable()
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .refresh("1m")
        .version(1)
        .time("now-7d", "now")
        .with_variable(datasource_variable())
        .with_variable(
            query_variable(
                "namespace",
                "Namespace",
                f"label_values({OBJECTIVE}, namespace)",
                multi=False,
            )
        )
        .with_variable(
            query_variable(
                "job",
                "Release (job)",
                f'label_values({OBJECTIVE}{{namespace="$namespace"}}, job)',
                multi=True,
                all_value=".*",
            )
        )
        .annotation(builtin_annotation())
        .annotation(AlertsAnnotation(FIRING_ALERTS))
    )

    def add(panel: PanelBuilder, width: int, height: int) -> None:
        board.with_panel(panel.span(width).height(height))

    for slo in description["slos"]:
        name = slo["name"]
        board.with_row(builders.Row(f"{slo['title']} ({name})"))
        period = RATIO.format(window="period")
        add(
            stat(
                "Objective",
                "percentunit",
                query(f"max({OBJECTIVE}{{{selector(name)}}})", "objective"),
                f"{slo['sli']} Set by the chart value slo.{name}.objective.",
                [(None, "blue")],
            ).decimals(2),
            4,
            6,
        )
        add(
            stat(
                "SLI over the period",
                "percentunit",
                query(f"1 - max({period}{{{selector(name)}}})", "SLI"),
                "Share of good events over the SLO period (slo.period), all pods of the release.",
                [(None, "red"), (0.999, "green")],
            ).decimals(3),
            4,
            6,
        )
        add(
            stat(
                "Error budget left",
                "percentunit",
                query(
                    f"1 - max({period}{{{selector(name)}}} / ignoring (slo) {budget(name)})",
                    "budget left",
                ),
                "Share of the period's error budget not yet spent: 1 - error ratio / "
                "(1 - objective). Below 0 the objective is missed.",
                [(None, "red"), (0.25, "orange"), (0.5, "green")],
            ),
            4,
            6,
        )
        add(burn_rates(slo, description), 12, 6)
    return build_model(board)


def build() -> dict[str, Any]:
    """The SLO dashboard's JSON, as the chart ships it."""
    return to_json(dashboard())
