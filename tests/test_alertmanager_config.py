"""The shipped example Alertmanager configuration is valid and routes pricestream's alerts."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from support.chart import rules_file
from support.waiting import require_binary

CONFIG = Path(__file__).resolve().parents[1] / "deploy/alertmanager/alertmanager.yml"
RECEIVER_BY_SEVERITY = {
    "critical": "pricestream-pager",
    "warning": "pricestream-tickets",
    "info": "null",
    "page": "pricestream-pager",
    "ticket": "pricestream-tickets",
}


def amtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("amtool"), *args], capture_output=True, text=True, timeout=30
    )


def test_amtool_check_config_passes() -> None:
    result = amtool("check-config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def shipped_alerts() -> list[tuple[str, str]]:
    groups = yaml.safe_load(rules_file())["groups"]
    return sorted(
        {
            (rule["alert"], rule["labels"]["severity"])
            for group in groups
            for rule in group["rules"]
            if "alert" in rule
        }
    )


@pytest.mark.parametrize(("alert", "severity"), shipped_alerts())
def test_every_shipped_alert_reaches_the_receiver_of_its_severity(alert: str, severity: str):
    result = amtool(
        "config",
        "routes",
        "test",
        f"--config.file={CONFIG}",
        f"alertname={alert}",
        f"severity={severity}",
        "namespace=prod",
        "pod=pricestream-0",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == RECEIVER_BY_SEVERITY[severity]


def test_other_teams_alerts_are_not_routed_to_pricestream() -> None:
    result = amtool(
        "config", "routes", "test", f"--config.file={CONFIG}", "alertname=X", "severity=critical"
    )
    assert result.stdout.strip() == "null"


def test_slo_severities_reach_different_receivers() -> None:
    slo_alerts = [(a, s) for a, s in shipped_alerts() if a.endswith("ErrorBudgetBurn")]
    assert {s for _, s in slo_alerts} == {"page", "ticket"}
    assert RECEIVER_BY_SEVERITY["page"] != RECEIVER_BY_SEVERITY["ticket"]


def test_a_page_inhibits_the_ticket_of_the_same_slo_only() -> None:
    """The shipped inhibit rule, read as Alertmanager applies it: a firing page of an SLO
    mutes that SLO's ticket in the same release, not another SLO's or another release's."""
    config = yaml.safe_load(CONFIG.read_text())
    (rule,) = [r for r in config["inhibit_rules"] if 'severity = "page"' in r["source_matchers"]]

    def matches(matchers: list[str], labels: dict[str, str]) -> bool:
        for matcher in matchers:
            name, op, value = re.fullmatch(r'(\w+) (=~|=) "(.*)"', matcher).groups()
            actual = labels.get(name, "")
            if not (re.fullmatch(value, actual) if op == "=~" else actual == value):
                return False
        return True

    def inhibited(source: dict[str, str], target: dict[str, str]) -> bool:
        return (
            matches(rule["source_matchers"], source)
            and matches(rule["target_matchers"], target)
            and all(source.get(k) == target.get(k) for k in rule["equal"])
        )

    base = {"namespace": "prod", "job": "pricestream"}
    page = {**base, "alertname": "PriceStreamAvailabilityErrorBudgetBurn", "slo": "availability",
            "severity": "page"}  # fmt: skip
    ticket = {**page, "severity": "ticket"}
    assert inhibited(page, ticket)
    assert not inhibited(ticket, page)
    other_slo = {**ticket, "alertname": "PriceStreamFreshnessErrorBudgetBurn", "slo": "freshness"}
    assert not inhibited(page, other_slo)
    assert not inhibited(page, {**ticket, "namespace": "staging"})
    assert not inhibited(page, {**page, "alertname": "PriceStreamZombieSessions",
                                "severity": "warning"})  # fmt: skip
