"""`promtool test rules` on a test document: the one way tests run promtool's rule tests."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from support.waiting import require_binary


def run_rules_test(document: dict[str, Any], test_file: Path, timeout: float = 300) -> str:
    """Write ``document`` to ``test_file``, run `promtool test rules` on it, assert it passed
    (with promtool's report of what differed otherwise); its output."""
    test_file.write_text(yaml.safe_dump(document, sort_keys=False, width=10_000))
    result = subprocess.run(
        [require_binary("promtool"), "test", "rules", str(test_file)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
    assert "SUCCESS" in result.stdout
    return result.stdout
