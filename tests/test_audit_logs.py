"""`pricestream audit-logs` pairs lifecycle lines per pod and exits 1 on a leak."""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

from support.processes import pricestream_command


def line(pod: str, msg: str, **fields: object) -> str:
    return json.dumps({"level": "INFO", "pod": pod, "msg": msg, **fields}) + "\n"


def created(pod: str, ticker: str) -> str:
    return line(pod, f"Created Redis PubSub subscription for {ticker}")


def closed(pod: str, ticker: str) -> str:
    return line(pod, f"Closed Redis PubSub subscription for {ticker} (no more subscribers)")


def run_audit(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        pricestream_command("audit-logs", *args),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_seed_leak_is_reported_per_pod_with_rotated_files_and_garbage(tmp_path: Path) -> None:
    # The seed's numbers: 1,897 created, 1,804 closed for BKR on one pod; another pod balanced.
    rotated = tmp_path / "pricestream.log.1.gz"
    current = tmp_path / "pricestream.log"
    with gzip.open(rotated, "wt") as handle:
        handle.writelines(created("pod-a", "BKR") for _ in range(1000))
        handle.write("garbage that is not json\n")
        handle.writelines(closed("pod-a", "BKR") for _ in range(900))
    with open(current, "w") as handle:
        handle.writelines(created("pod-a", "BKR") for _ in range(897))
        handle.writelines(closed("pod-a", "BKR") for _ in range(904))
        handle.write("{truncated\n")
        for i in range(5):
            handle.write(created("pod-b", f"T{i}"))
            handle.write(
                line("pod-b", "session opened", event="session_opened", session_id=f"s{i}")
            )
        handle.write(line("pod-b", "session opened", event="session_opened", session_id="zombie"))
        for i in range(5):
            handle.write(closed("pod-b", f"T{i}"))
            handle.write(line("pod-b", "closed", event="session_closed", session_id=f"s{i}"))
    result = run_audit(str(rotated), str(current))
    assert result.returncode == 1, result.stderr
    out = result.stdout
    assert "(2 not JSON, skipped)" in out
    assert "created 1,902, closed 1,809, still open 93" in out
    assert "pod-a: 93 open: BKR (93)" in out
    assert "sessions: opened 6, closed 5, still open 1" in out
    assert "pod-b: 1 open: zombie" in out
    assert "verdict: LEAK" in out


def test_balanced_logs_from_stdin_exit_zero() -> None:
    text = created("pod-a", "AAPL") + closed("pod-a", "AAPL")
    result = run_audit(stdin=text)
    assert result.returncode == 0
    assert "verdict: balanced" in result.stdout


def test_unreadable_file_is_one_clear_line(tmp_path: Path) -> None:
    result = run_audit(str(tmp_path / "missing.log"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "missing.log" in result.stderr
