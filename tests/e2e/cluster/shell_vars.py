"""The variables of tests/e2e/cluster/versions.sh as the shell scripts see them, for the Python
parts (prometheus-config-sync.py here, tests/support/e2e_kube.py in the tests)."""

from __future__ import annotations

import subprocess
from pathlib import Path

VERSIONS = Path(__file__).resolve().parent / "versions.sh"


def shell_vars() -> dict[str, str]:
    out = subprocess.run(
        ["bash", "-c", f"source {VERSIONS} && set -o posix && set"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    values = {}
    for line in out.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.isidentifier():
            values[name] = value.strip("'")
    return values
