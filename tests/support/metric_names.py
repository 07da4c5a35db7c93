"""Names of the series a pod exports, and the metric names a PromQL text refers to."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
# Series Prometheus itself adds: scrape health and the alert state of the rules.
PROMETHEUS_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE"}
METRIC = re.compile(
    r"(?<![:\w])(pricestream_[a-z_]+|grpc_server_[a-z_]+|process_[a-z_]+|up|ALERTS)(?![:\w])"
)


def exported_names(exposition: str) -> set[str]:
    """Every series name the exposition declares, including families with no samples yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def referenced_names(promql: str) -> set[str]:
    """Metric names in a PromQL expression (recording-rule names, with colons, are not)."""
    without_strings = re.sub(r'"[^"]*"', '""', promql)
    return set(METRIC.findall(without_strings))
