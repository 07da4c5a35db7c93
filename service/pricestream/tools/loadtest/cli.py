"""Flags of `pricestream loadtest` and their translation into LoadTestOptions."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from pricestream.settings import SettingsError
from pricestream.tools.feed import ticker_universe
from pricestream.tools.loadtest.runner import LoadTestOptions
from pricestream.tools.loadtest.stages import PROFILES, StageError, parse_stages, profile_stages
from pricestream.tools.loadtest.worker import DEFAULT_LEAVE_MIX, TRANSPORT_LEAVE_WAYS, TRANSPORTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument(
        "--stages", help="ramps like 30s:100,1m:100,10s:0 (duration:users, comma-separated)"
    )
    shape.add_argument("--profile", choices=sorted(PROFILES), help="named shape (default smoke)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply a profile's users")
    parser.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="grpc",
        help="grpc (CreateSession + StreamPriceUpdates), ws (POST /v1/sessions + WebSocket) or "
        "sse (POST /v1/sessions + Server-Sent Events)",
    )
    parser.add_argument(
        "--target", action="append", help="server host:port (repeat for several; default :50051)"
    )
    parser.add_argument(
        "--web-target",
        action="append",
        help="ws/sse: the server's web host:port (repeat for several; default 127.0.0.1:8080)",
    )
    parser.add_argument(
        "--metrics-url",
        default="http://127.0.0.1:9464/metrics",
        help="the server's /metrics, sampled during the run and for the leak verdict",
    )
    parser.add_argument("--tickers-per-session", type=int, default=5, help="K tickers per session")
    parser.add_argument(
        "--universe", type=int, default=50, help="tickers drawn from (the feed's --tickers)"
    )
    parser.add_argument("--workers", type=int, default=2, help="load generator processes")
    parser.add_argument(
        "--channels", type=int, default=4,
        help="gRPC channels per worker (gRPC only: a browser user has its own connection)",
    )  # fmt: skip
    parser.add_argument(
        "--leave-mix",
        default=None,
        help="how users leave, relative weights of: "
        + "; ".join(f"{t} {', '.join(ways)}" for t, ways in TRANSPORT_LEAVE_WAYS.items())
        + " (default: each way of the transport once)",
    )
    parser.add_argument("--slow-fraction", type=float, default=0.0, help="share of slow readers")
    parser.add_argument(
        "--slow-read-delay", type=float, default=2.0, help="seconds a slow reader waits per batch"
    )
    parser.add_argument(
        "--max-error-rate", type=float, default=0.01, help="fail above this share of errors"
    )
    parser.add_argument(
        "--leak-timeout", type=float, default=30.0, help="seconds to wait for gauges to reach 0"
    )
    parser.add_argument("--out", default="loadtest-report", help="folder for the report")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--quiet", action="store_true", help="no live progress line")
    parser.add_argument("--token", default="", help="bearer token, when the server wants one")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the users")
    parser.add_argument(
        "--keep-users",
        action="store_true",
        help="users stay across stages (default: each leaves when its stage ends)",
    )


def parse_leave_mix(text: str, transport: str = "grpc") -> dict[str, float]:
    ways = TRANSPORT_LEAVE_WAYS[transport]
    mix: dict[str, float] = {}
    for part in text.split(","):
        way, sep, weight = part.strip().partition("=")
        if not sep or way not in ways:
            raise SettingsError(
                f"--leave-mix part {part.strip()!r} is not WAY=WEIGHT with WAY one of "
                + ", ".join(ways)
                + ("" if transport == "grpc" else f" (--transport {transport})")
            )
        try:
            mix[way] = float(weight)
        except ValueError:
            raise SettingsError(f"--leave-mix weight {weight!r} is not a number") from None
    if not any(w > 0 for w in mix.values()) or any(w < 0 for w in mix.values()):
        raise SettingsError("--leave-mix needs non-negative weights, at least one positive")
    return {k: v for k, v in mix.items() if v > 0}


def options_from(args: argparse.Namespace, argv: list[str] | None = None) -> LoadTestOptions:
    try:
        if args.stages:
            stages = parse_stages(args.stages)
        else:
            stages = profile_stages(args.profile or "smoke", args.scale)
    except StageError as exc:
        raise SettingsError(str(exc)) from None
    if args.workers < 1 or args.channels < 1:
        raise SettingsError("--workers and --channels must be at least 1")
    if not 1 <= args.tickers_per_session <= args.universe:
        raise SettingsError("--tickers-per-session must be between 1 and --universe")
    if not 0 <= args.slow_fraction <= 1 or not 0 <= args.max_error_rate <= 1:
        raise SettingsError("--slow-fraction and --max-error-rate must be between 0 and 1")
    command = "pricestream loadtest " + shlex.join(argv if argv is not None else sys.argv[2:])
    return LoadTestOptions(
        targets=args.target or ["127.0.0.1:50051"],
        metrics_url=args.metrics_url,
        stages=stages,
        tickers=ticker_universe(args.universe),
        tickers_per_session=args.tickers_per_session,
        workers=args.workers,
        channels_per_worker=args.channels,
        leave_mix=parse_leave_mix(
            args.leave_mix or DEFAULT_LEAVE_MIX[args.transport], args.transport
        ),
        slow_fraction=args.slow_fraction,
        slow_read_delay=args.slow_read_delay,
        max_error_rate=args.max_error_rate,
        leak_timeout=args.leak_timeout,
        out=Path(args.out),
        plots=not args.no_plots,
        progress=not args.quiet,
        token=args.token,
        seed=args.seed,
        keep_users=args.keep_users,
        command=command.strip(),
        transport=args.transport,
        web_targets=args.web_target or ["127.0.0.1:8080"],
    )


GENERATOR_BUSY = 0.8  # share of its usable cores past which the generator may be the limit


def main(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from pricestream.tools.loadtest.runner import run_load_test

    options = options_from(args, argv)
    report, files = run_load_test(options)
    total, verdict = report["total"], report["leak_verdict"]
    d = total["delivery_latency_ms"]
    verdict_text = "PASS" if verdict["passed"] else "FAIL: " + "; ".join(verdict["problems"])
    print(
        f"{total['sessions_created']:,}/{total['sessions_attempted']:,} sessions, "
        f"{total['updates_per_second']:,.0f} updates/s, delivery p50 {d['p50']} ms p99 {d['p99']} "
        f"ms, error rate {report['error_rate']:.3%}, client CPU {report['client_cpu_cores']:.2f} "
        f"cores; leak verdict {verdict_text}"
    )
    for error in report["worker_errors"]:
        print(error, file=sys.stderr)
    if report["client_cpu_cores"] >= GENERATOR_BUSY * report["client_cores_available"]:
        print(
            f"warning: the load generator averaged {report['client_cpu_cores']:.2f} of the "
            f"{report['client_cores_available']} cores it could use, so the figures may show its "
            "limits rather than the server's; give it more cores or --workers, or use the Go "
            "receiver of `make bench` (bench/loadclient)",
            file=sys.stderr,
        )
    print(f"report: {options.out}/ ({', '.join(files)})")
    return 0 if report["passed"] else 1
