"""report.json, a Markdown summary and PNG plots of one load test run."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    run = report["run"]
    lines = [
        f"# Load test {run['started']}",
        "",
        f"`{run['command']}`",
        "",
        f"Target {', '.join(run['targets'])}; {run['workers']} worker processes x "
        + (
            f"{run['channels_per_worker']} channels"
            if run.get("channels_per_worker")
            else "one connection per user"
        )
        + f"; {run['tickers_per_session']} tickers per session "
        f"from {run['universe']}; peak {run['peak_users']:,} users over {run['seconds']:.0f} s.",
        f"Load generator CPU: {report['client_cpu_cores']:.2f} cores on average of the "
        f"{report['client_cores_available']} it could use (if near them, the generator was the "
        "bottleneck).",
        "",
        "| stage | users | s | sessions ok/attempted | create p50/p99 ms | start p99 ms "
        "| updates/s | batches/s | delivery p50/p95/p99/max ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [*report["stages"], {**report["total"], "stage": "total", "users": ""}]
    for row in rows:
        d, c = row["delivery_latency_ms"], row["create_latency_ms"]
        start_p99 = row["stream_start_latency_ms"]["p99"]
        delivery = "/".join(_cell(d[q]) for q in ("p50", "p95", "p99", "max"))
        errors = ", ".join(f"{k} {v}" for k, v in sorted(row["errors"].items())) or "0"
        lines.append(
            f"| {row['stage']} | {_cell(row['users'])} | {_cell(row['seconds'])} "
            f"| {_cell(row['sessions_created'])}/{_cell(row['sessions_attempted'])} "
            f"| {_cell(c['p50'])}/{_cell(c['p99'])} | {_cell(start_p99)} "
            f"| {_cell(row['updates_per_second'])} | {_cell(row['batches_per_second'])} "
            f"| {delivery} | {errors} |"
        )
    verdict = report["leak_verdict"]
    lines += [
        "",
        f"**Leak verdict: {'PASS' if verdict['passed'] else 'FAIL'}** "
        f"(after {verdict['waited_seconds']} s): "
        + (
            "every gauge back to zero, opened == closed."
            if verdict["passed"]
            else "; ".join(verdict["problems"])
        ),
        "",
        "| after the run | value |",
        "|---|---|",
        *[f"| `{k}` | {_cell(v)} |" for k, v in verdict["final"].items()],
        "",
        f"Error rate {report['error_rate']:.4%} (limit {report['max_error_rate']:.4%}): "
        f"{'ok' if report['error_rate'] <= report['max_error_rate'] else 'TOO HIGH'}.",
    ]
    return "\n".join(lines) + "\n"


def plots(report: dict[str, Any], out: Path) -> list[str]:
    """PNG plots; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = report["series"]
    server = report["server_series"]
    t = [p["t"] for p in series]
    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(t, [p["users_target"] for p in series], label="target", linestyle="--")
    ax.plot(t, [p["users"] for p in series], label="running")
    ax.set(title="Virtual users", xlabel="seconds", ylabel="users")
    ax.legend()
    save(fig, "users.png")

    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(t, [p["updates"] for p in series], label="updates/s")
    ax.plot(t, [p["batches"] for p in series], label="batches/s")
    ax.set(title="Received by the clients", xlabel="seconds", ylabel="per second")
    ax.legend()
    save(fig, "throughput.png")

    fig, ax = plt.subplots(figsize=(9, 4))
    for q in ("p50", "p95", "p99"):
        ax.plot(t, [None if p[q] is None else p[q] * 1000 for p in series], label=q)
    ax.set(title="Delivery latency (publish → client)", xlabel="seconds", ylabel="ms")
    ax.legend()
    save(fig, "latency.png")

    if server:
        st = [p["t"] for p in server]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
        for name in ("sessions", "streams", "subscriptions"):
            top.plot(st, [p[name] for p in server], label=name)
        top.set(title="Server gauges", ylabel="active")
        top.legend()
        cpu = [0.0] + [
            (b["cpu_seconds"] - a["cpu_seconds"]) / max(b["t"] - a["t"], 1e-9)
            for a, b in itertools.pairwise(server)
        ]
        bottom.plot(st, cpu, label="CPU cores")
        bottom.set(xlabel="seconds", ylabel="cores")
        rss = bottom.twinx()
        rss.plot(st, [p["rss_bytes"] / 2**20 for p in server], color="tab:red", label="RSS MiB")
        rss.set_ylabel("RSS MiB")
        bottom.legend(loc="upper left")
        rss.legend(loc="upper right")
        save(fig, "server.png")
    return written


def write(report: dict[str, Any], out: Path, with_plots: bool = True) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(report))
    files = ["report.json", "summary.md"]
    if with_plots:
        files += plots(report, out)
    return files
