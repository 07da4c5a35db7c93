"""h2spec, the HTTP/2 conformance suite, against the gRPC port, plaintext and over TLS.

Every h2spec case must pass, except the ones named in EXPECTED_FAILURES with a reason. The test
fails on a case that fails and is not named there (a regression), and on a named case that now
passes (a stale exception: take it out). Case ids are h2spec's own, so one case reruns by hand:

    .tools/bin/h2spec -h 127.0.0.1 -p PORT -o 5 -v http2/6.5.3/2

The run is `h2spec -h 127.0.0.1 -p PORT -o 5 -j report.xml` split by section: one h2spec per
group of cases (`--dryrun` lists them), a few at a time, so that the 5-second timeouts of failing
cases overlap instead of adding up. Results come from each run's JUnit report. `make h2spec`
(part of `make setup`) builds the binary into .tools/bin.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.servers import ready_server
from support.settings import fast_settings
from support.waiting import require_binary

# The h2spec cases our gRPC port is allowed to fail, {case id: one-line reason}. Empty on purpose:
# the h2 transport (service/pricestream/transport/http2/) is to pass them all; name a case here only
# with the reason it cannot or should not pass. One list for plaintext and TLS.
EXPECTED_FAILURES: dict[str, str] = {}


class ConformanceFailure(AssertionError):
    """h2spec ran to the end and its results differ from EXPECTED_FAILURES."""


ROOT = Path(__file__).resolve().parents[1]
PROJECT_H2SPEC = ROOT / ".tools/bin/h2spec"
CASE_TIMEOUT_S = 10  # h2spec -o: how long a case waits for the server's answer (5 s ran out once
# at a load average of 14)
PARALLEL_RUNS = 6  # h2spec processes at once; they mostly wait
SPEC_KEYS = {  # h2spec's top-level spec titles (as --dryrun prints them) and their ids
    "Generic tests for HTTP/2 server": "generic",
    "Hypertext Transfer Protocol Version 2 (HTTP/2)": "http2",
    "HPACK: Header Compression for HTTP/2": "hpack",
}


def h2spec_binary() -> str:
    """The project-local h2spec (`make h2spec`), else one on PATH: missing fails in CI, skips
    elsewhere."""
    if PROJECT_H2SPEC.exists():
        return str(PROJECT_H2SPEC)
    return require_binary("h2spec")


@dataclass(frozen=True)
class CaseResult:
    case_id: str  # "http2/6.5.3/2"
    description: str
    outcome: str  # "passed" | "failed" | "skipped"
    detail: str = ""  # h2spec's expected/actual, for a failure


def list_cases(dryrun_output: str) -> dict[str, dict[int, str]]:
    """`h2spec --dryrun` → {group id: {case number: description}}, in h2spec's order."""
    groups: dict[str, dict[int, str]] = {}
    key = None
    group = None
    for line in dryrun_output.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            if line not in SPEC_KEYS:
                raise AssertionError(f"h2spec --dryrun: unknown spec {line!r} (update SPEC_KEYS)")
            key, group = SPEC_KEYS[line], None
        elif match := re.fullmatch(r" +(\d+(?:\.\d+)*)\. .*", line):
            group = f"{key}/{match[1]}"
        elif match := re.fullmatch(r" +(\d+): (.*)", line):
            if group is None:
                raise AssertionError(f"h2spec --dryrun: a case outside a group: {line!r}")
            cases = groups.setdefault(group, {})
            number = int(match[1])
            if number != len(cases) + 1:
                raise AssertionError(f"h2spec --dryrun: {group} case {number} out of order")
            cases[number] = match[2]
        else:
            raise AssertionError(f"h2spec --dryrun: cannot read {line!r}")
    return groups


def failure_detail(text: str) -> str:
    """h2spec's failure text (expected frames, one a line, then what came) → one line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    lines = [line for line in lines if line not in ("Expect:", "Actual:")]
    if len(lines) < 2:
        return " ".join(lines)
    return f"expected {' or '.join(lines[:-1])}; got {lines[-1]}"


def read_report(report: Path, group: str, cases: dict[int, str]) -> list[CaseResult]:
    """The JUnit report of one group's run → one result per case. The report names a case by
    its group and description only; h2spec writes them in order, which gives the number."""
    suites = [s for s in ET.parse(report).getroot().iter("testsuite") if s.get("package") == group]
    testcases = [case for suite in suites for case in suite.iter("testcase")]
    descriptions = [case.get("classname", "") for case in testcases]
    if descriptions != list(cases.values()):
        raise AssertionError(f"{report.name}: cases {descriptions} where --dryrun listed {cases}")
    results = []
    for number, testcase in enumerate(testcases, start=1):
        problem = testcase.find("failure")
        if problem is None:
            problem = testcase.find("error")
        if problem is not None:
            outcome, detail = "failed", failure_detail(problem.text or "")
        elif testcase.find("skipped") is not None:
            outcome, detail = "skipped", ""
        else:
            outcome, detail = "passed", ""
        results.append(CaseResult(f"{group}/{number}", cases[number], outcome, detail))
    return results


async def run_h2spec(binary: str, port: int, workdir: Path, *, tls: bool) -> list[CaseResult]:
    """Every h2spec case against 127.0.0.1:port, one h2spec process per group."""
    dryrun = await asyncio.to_thread(
        subprocess.run, [binary, "--dryrun"], capture_output=True, text=True, timeout=30, check=True
    )
    groups = list_cases(dryrun.stdout)
    assert sum(map(len, groups.values())) > 100, dryrun.stdout  # h2spec 2.x has 145
    gate = asyncio.Semaphore(PARALLEL_RUNS)

    async def run_group(group: str, cases: dict[int, str]) -> list[CaseResult]:
        name = group.replace("/", "_")
        report, log = workdir / f"{name}.xml", workdir / f"{name}.log"
        command = [binary, "-h", "127.0.0.1", "-p", str(port), "-o", str(CASE_TIMEOUT_S),
                   "-j", str(report), *(["-t", "-k"] if tls else []),
                   *(f"{group}/{number}" for number in cases)]  # fmt: skip
        async with gate:
            with log.open("wb") as out:
                process = await asyncio.create_subprocess_exec(
                    *command, stdout=out, stderr=subprocess.STDOUT
                )
                await process.wait()
        if not report.exists():  # h2spec stops without a report when it cannot connect
            tail = log.read_text(errors="replace")[-2000:]
            raise AssertionError(f"h2spec wrote no report for {group} (exit "
                                 f"{process.returncode}):\n{tail}")  # fmt: skip
        return read_report(report, group, cases)

    runs = await asyncio.gather(*(run_group(g, cases) for g, cases in groups.items()))
    return [result for run in runs for result in run]


# No case is run again: every case must pass in the parallel run. The one intermittent failure
# there was (http2/6.9.2/1 over TLS, "Changes SETTINGS_INITIAL_WINDOW_SIZE after sending HEADERS
# frame", a timeout waiting for its 1-byte DATA frame in 2-6 of 240 runs) was the server's frame
# order: when HEADERS and SETTINGS(INITIAL_WINDOW_SIZE=1) arrived in two reads, the server wrote
# the DATA the new window let out before h2's SETTINGS ACK, and h2spec 2.2.1 waits for that ACK
# skipping every other frame (upstream fixed the case itself in 2.6.0), so the DATA was lost to
# it. Fixed in Connection.data_received (h2's answers go first); test_h2_protocol.py drives that
# order without sockets.


def verdict(results: list[CaseResult], expected: dict[str, str]) -> list[str]:
    """What differs from `expected`: new failures, stale exceptions, unknown case ids."""
    problems = []
    by_id = {result.case_id: result for result in results}
    for result in results:
        if result.outcome == "failed" and result.case_id not in expected:
            problems.append(f"new failure {result.case_id} ({result.description}): {result.detail}")
    for case_id, reason in expected.items():
        result = by_id.get(case_id)
        if result is None:
            problems.append(f"EXPECTED_FAILURES names {case_id}, which h2spec does not have")
        elif result.outcome == "passed":
            problems.append(f"stale exception {case_id} ({result.description}) passes now; "
                            f"remove it from EXPECTED_FAILURES (it said: {reason})")  # fmt: skip
    return problems


def summary(results: list[CaseResult]) -> str:
    counts = {outcome: 0 for outcome in ("passed", "failed", "skipped")}
    for result in results:
        counts[result.outcome] += 1
    return ", ".join(f"{count} {outcome}" for outcome, count in counts.items())


@pytest.fixture
def server_certificate(pki: Path) -> dict[str, str]:
    return {"tls_cert_file": str(pki / "server.crt"), "tls_key_file": str(pki / "server.key")}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("transport", ["plaintext", "tls"])
async def test_h2spec_conformance(
    transport: str, redis, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    binary = h2spec_binary()
    tls = request.getfixturevalue("server_certificate") if transport == "tls" else {}
    async with ready_server(fast_settings(redis.url, **tls)) as server:
        results = await run_h2spec(binary, server.grpc_port, tmp_path, tls=bool(tls))
    print(f"h2spec over {transport}: {summary(results)}")
    for result in results:
        if result.outcome != "passed":
            print(f"  {result.outcome} {result.case_id}: {result.description}")
    problems = verdict(results, EXPECTED_FAILURES)
    if problems:
        raise ConformanceFailure(
            f"h2spec over {transport} ({summary(results)}), {len(problems)} differences from "
            "EXPECTED_FAILURES:\n" + "\n".join(problems)
        )


# --- the harness itself, on made-up h2spec output (no server, no binary) ---

DRYRUN = """\
Generic tests for HTTP/2 server
  1. Starting HTTP/2
    1: Sends a client connection preface

Hypertext Transfer Protocol Version 2 (HTTP/2)
  6. Frame Definitions
    6.5. SETTINGS
      1: Sends a SETTINGS frame with ACK flag and payload
      2: Sends a SETTINGS frame with a stream identifier other than 0x0
      6.5.3. Settings Synchronization
        1: Sends multiple values of SETTINGS_INITIAL_WINDOW_SIZE
"""

REPORT = """\
<?xml version="1.0" encoding="UTF-8"?>
<testsuites>
  <testsuite name="6.5. SETTINGS" package="http2/6.5" id="6.5" tests="2">
    <testcase package="http2/6.5" classname="Sends a SETTINGS frame with ACK flag and payload"
      time="0.01"></testcase>
    <testcase package="http2/6.5"
      classname="Sends a SETTINGS frame with a stream identifier other than 0x0" time="5.0">
      <error>GOAWAY Frame (Error Code: PROTOCOL_ERROR)
Timeout</error>
    </testcase>
  </testsuite>
</testsuites>
"""


def test_dryrun_listing_gives_h2spec_case_ids() -> None:
    assert list_cases(DRYRUN) == {
        "generic/1": {1: "Sends a client connection preface"},
        "http2/6.5": {
            1: "Sends a SETTINGS frame with ACK flag and payload",
            2: "Sends a SETTINGS frame with a stream identifier other than 0x0",
        },
        "http2/6.5.3": {1: "Sends multiple values of SETTINGS_INITIAL_WINDOW_SIZE"},
    }
    with pytest.raises(AssertionError, match="unknown spec"):
        list_cases("Some new spec\n  1. X\n    1: y\n")


def test_report_and_verdict_catch_new_failures_and_stale_exceptions(tmp_path: Path) -> None:
    report = tmp_path / "report.xml"
    report.write_text(REPORT)
    results = read_report(report, "http2/6.5", list_cases(DRYRUN)["http2/6.5"])
    assert [(r.case_id, r.outcome) for r in results] == [
        ("http2/6.5/1", "passed"),
        ("http2/6.5/2", "failed"),
    ]
    assert results[1].detail == "expected GOAWAY Frame (Error Code: PROTOCOL_ERROR); got Timeout"

    [new] = verdict(results, {})
    assert new.startswith("new failure http2/6.5/2 (Sends a SETTINGS frame with a stream")
    assert verdict(results, {"http2/6.5/2": "a reason"}) == []
    [stale] = verdict(results, {"http2/6.5/2": "a reason", "http2/6.5/1": "old reason"})
    assert stale.startswith("stale exception http2/6.5/1")
    [unknown] = verdict(results, {"http2/6.5/2": "a reason", "http2/9.9/1": "typo"})
    assert "http2/9.9/1, which h2spec does not have" in unknown

    with pytest.raises(AssertionError, match="where --dryrun listed"):
        read_report(report, "http2/6.5", {1: "Sends a SETTINGS frame with ACK flag and payload"})
