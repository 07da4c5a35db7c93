"""The shipped example Alertmanager configuration is valid and routes pricestream's alerts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from chart import rules_file
from conftest import require_binary

CONFIG = Path(__file__).resolve().parents[1] / "deploy/alertmanager/alertmanager.yml"
RECEIVER_BY_SEVERITY = {
    "critical": "pricestream-pager",
    "warning": "pricestream-tickets",
    "info": "null",
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
    return [
        (rule["alert"], rule["labels"]["severity"])
        for group in groups
        for rule in group["rules"]
        if "alert" in rule
    ]


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
