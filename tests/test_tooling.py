"""The tools `make setup` installs are really there (in CI a missing one fails)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import IN_CI, require_binary

ROOT = Path(__file__).resolve().parents[1]
HELM = ROOT / ".tools/bin/helm"


@pytest.mark.parametrize(
    ("tool", "args", "expected"),
    [
        ("redis-server", ["--version"], "Redis server"),
        ("promtool", ["--version"], "promtool"),
        ("amtool", ["--version"], "amtool"),
    ],
)
def test_system_tool_present(tool: str, args: list[str], expected: str) -> None:
    path = require_binary(tool)
    result = subprocess.run([path, *args], capture_output=True, text=True, timeout=30)
    assert expected in result.stdout + result.stderr


def test_project_local_helm_built() -> None:
    if not HELM.exists():
        message = "helm is not built: run `make helm`"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run([str(HELM), "version", "--short"], capture_output=True, text=True)
    assert result.stdout.startswith("v3.22")  # go install leaves out the patch digit
