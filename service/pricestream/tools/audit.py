"""`pricestream audit-logs`: pair the lifecycle lines of JSON logs and report what never closed.

Like the seed's investigation (1,897 "Created Redis PubSub connection for BKR" against 1,804
"Closed ..."), but per pod and per ticker/session: subscriptions pair
"Created Redis PubSub subscription for X" with "Closed Redis PubSub subscription for X
(no more subscribers)"; sessions pair the `session_opened` and `session_closed` events.
Files are read in the order given (oldest rotated file first); `.gz` files are read as gzip.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

CREATED = re.compile(r"Created Redis PubSub subscription for (\S+)")
CLOSED = re.compile(r"Closed Redis PubSub subscription for (\S+) \(no more subscribers\)")
MAX_LISTED = 20


@dataclass
class Audit:
    lines: int = 0
    garbage: int = 0
    created: int = 0
    closed: int = 0
    sessions_opened: int = 0
    sessions_closed: int = 0
    open_subscriptions: dict[str, Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter)
    )
    open_sessions: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    def feed(self, line: str) -> None:
        self.lines += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            self.garbage += 1
            return
        if not isinstance(record, dict):
            self.garbage += 1
            return
        pod = str(record.get("pod", "?"))
        message = str(record.get("msg", ""))
        if match := CREATED.fullmatch(message):
            self.created += 1
            self.open_subscriptions[pod][match[1]] += 1
        elif match := CLOSED.fullmatch(message):
            self.closed += 1
            self.open_subscriptions[pod][match[1]] -= 1
        elif record.get("event") == "session_opened":
            self.sessions_opened += 1
            self.open_sessions[pod].add(str(record.get("session_id")))
        elif record.get("event") == "session_closed":
            self.sessions_closed += 1
            self.open_sessions[pod].discard(str(record.get("session_id")))

    def leaked_subscriptions(self) -> dict[str, dict[str, int]]:
        return {
            pod: {ticker: n for ticker, n in sorted(counts.items()) if n != 0}
            for pod, counts in sorted(self.open_subscriptions.items())
            if any(counts.values())
        }

    def leaked_sessions(self) -> dict[str, list[str]]:
        return {pod: sorted(ids) for pod, ids in sorted(self.open_sessions.items()) if ids}

    @property
    def balanced(self) -> bool:
        return not self.leaked_subscriptions() and not self.leaked_sessions()

    def report(self, out: TextIO) -> None:
        w = out.write
        w(f"lines read: {self.lines:,} ({self.garbage:,} not JSON, skipped)\n")
        w(
            f"Redis PubSub subscriptions: created {self.created:,}, closed {self.closed:,}, "
            f"still open {self.created - self.closed:,}\n"
        )
        for pod, tickers in self.leaked_subscriptions().items():
            items = [f"{t} ({n})" for t, n in tickers.items()]
            w(f"  {pod}: {sum(tickers.values())} open: {_listing(items)}\n")
        w(
            f"sessions: opened {self.sessions_opened:,}, closed {self.sessions_closed:,}, "
            f"still open {self.sessions_opened - self.sessions_closed:,}\n"
        )
        for pod, ids in self.leaked_sessions().items():
            w(f"  {pod}: {len(ids)} open: {_listing(ids)}\n")
        w("verdict: balanced\n" if self.balanced else "verdict: LEAK: opened but never closed\n")


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown if len(items) <= MAX_LISTED else f"{shown}, +{len(items) - MAX_LISTED} more"


def _lines(paths: Iterable[str], stdin: TextIO) -> Iterator[str]:
    paths = list(paths)
    if not paths:
        yield from stdin
        return
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
            yield from handle


def audit_logs(paths: Iterable[str], stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    """Exit status: 0 balanced, 1 leak, 2 unreadable input."""
    audit = Audit()
    try:
        for line in _lines(paths, stdin):
            if line.strip():
                audit.feed(line)
    except OSError as exc:
        print(f"pricestream audit-logs: {exc}", file=sys.stderr)
        return 2
    audit.report(out)
    return 0 if audit.balanced else 1
