"""The tools `make setup` installs are really there (in CI a missing one fails)."""

from __future__ import annotations

import subprocess

import pytest
from chart import helm
from conftest import require_binary


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
    result = subprocess.run([helm(), "version", "--short"], capture_output=True, text=True)
    assert result.stdout.startswith("v3.22")  # go install leaves out the patch digit
