"""The `pricestream` command: serve, feed, watch, demo, audit-logs, health, loadtest."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

import uvloop
from redis.asyncio import Redis

from pricestream.observability.logs import configure_logging
from pricestream.redis.broker import RedisPricePublisher
from pricestream.redis.client import make_pool, redis_target
from pricestream.redis.sentinel import MasterWatch, SentinelPool
from pricestream.settings import Settings, SettingsError, check_environment, load_settings
from pricestream.tasks import cancel_and_wait
from pricestream.tools.feed import WELL_KNOWN, run_feed, ticker_universe, wait_for_redis

log = logging.getLogger("pricestream.cli")

# The feed reaches Redis as the server does: same URL, topology, timeouts and backoff.
FEED_SETTINGS = (
    "redis_url",
    "redis_mode",
    "redis_sentinels",
    "redis_sentinel_master",
    "redis_timeout",
    "reconnect_max_backoff",
    "log_level",
)


def _add_setting_flags(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """One flag per setting (``--flush-interval`` for ``flush_interval``); env vars still apply."""
    for name, field in Settings.model_fields.items():
        if only is not None and name not in only:
            continue
        kind = field.annotation if field.annotation in (int, float) else str
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=kind,
            default=None,
            help=f"{field.description} [env PRICESTREAM_{name.upper()}]",
        )


def _settings_from(args: argparse.Namespace, **fixed: Any) -> Settings:
    check_environment(os.environ)
    overrides = {name: getattr(args, name, None) for name in Settings.model_fields}
    overrides.update({k: v for k, v in fixed.items() if overrides.get(k) is None})
    return load_settings(**overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pricestream", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC streaming server")
    _add_setting_flags(serve)

    feed = commands.add_parser("feed", help="publish simulated random-walk prices to Redis")
    feed.add_argument("--tickers", type=int, default=50, help="how many tickers (default 50)")
    feed.add_argument("--rate", type=float, default=1000.0, help="updates per second in total")
    feed.add_argument("--duration", type=float, default=None, help="seconds; default: forever")
    _add_setting_flags(feed, only=FEED_SETTINGS)

    watch = commands.add_parser("watch", help="stream tickers into a live terminal table")
    watch.add_argument("tickers", nargs="+", help="ticker symbols, e.g. AAPL MSFT")
    watch.add_argument("--target", default="127.0.0.1:50051", help="server host:port")
    watch.add_argument("--duration", type=float, default=None, help="seconds; default: forever")

    demo = commands.add_parser("demo", help="server + feed + watcher in one command")
    demo.add_argument("tickers", nargs="*", default=list(WELL_KNOWN[:8]), help="tickers to watch")
    demo.add_argument("--universe", type=int, default=50, help="tickers the feed simulates")
    demo.add_argument("--rate", type=float, default=500.0, help="feed updates per second")
    demo.add_argument("--duration", type=float, default=None, help="seconds; default: forever")
    demo.add_argument("--no-clear", action="store_true", help="append frames, do not redraw")
    _add_setting_flags(demo)

    audit = commands.add_parser(
        "audit-logs", help="pair Created/Closed lifecycle lines of JSON logs; exit 1 on a leak"
    )
    audit.add_argument("files", nargs="*", help="log files, oldest first (.gz ok); stdin if none")

    health = commands.add_parser(
        "health", help="ask a server's gRPC health service; exit 0 only if SERVING"
    )
    health.add_argument("--target", default="127.0.0.1:50051", help="server host:port")
    health.add_argument(
        "--service",
        default="pricestream.v1.PriceStreamService",
        help='service to check; "" for the process as a whole (liveness)',
    )
    health.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    health.add_argument("--tls-ca", default="", help="CA bundle (PEM): connect with TLS")
    health.add_argument("--tls-server-name", default="", help="name to check in the certificate")
    health.add_argument("--tls-cert", default="", help="client certificate (mutual TLS)")
    health.add_argument("--tls-key", default="", help="client key (mutual TLS)")

    from pricestream.tools.loadtest.cli import add_arguments

    loadtest = commands.add_parser(
        "loadtest", help="virtual users against a server; report, plots and a leak verdict"
    )
    add_arguments(loadtest)
    return parser


async def _health_main(args: argparse.Namespace) -> int:
    from pricestream.tools.health_check import check

    serving, sentence = await check(
        args.target,
        args.service,
        args.timeout,
        ca_file=args.tls_ca,
        server_name=args.tls_server_name,
        cert_file=args.tls_cert,
        key_file=args.tls_key,
    )
    print(sentence, file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


async def _feed_main(args: argparse.Namespace, settings: Settings) -> int:
    client: Any
    watch: MasterWatch | None = None
    if settings.redis_mode == "cluster":  # SET price:last:{T} + SPUBLISH price:{T}
        from pricestream.redis.cluster_client import make_cluster_client
        from pricestream.redis.sharded_broker import ClusterPricePublisher

        client = make_cluster_client(settings)
        publisher: Any = ClusterPricePublisher(client)
    else:
        pool = make_pool(settings)
        client = Redis.from_pool(pool)  # closing the client closes its pool
        publisher = RedisPricePublisher(client)
        # Sentinel mode: follow a switch of master even when the old one still takes writes.
        watch = MasterWatch(pool, settings) if isinstance(pool, SentinelPool) else None
    watching: asyncio.Task[None] | None = None
    tickers = ticker_universe(args.tickers)
    log.info("feed: %d tickers at %g updates/s to %s (%s)", len(tickers), args.rate,
             redis_target(settings), settings.redis_mode)  # fmt: skip
    try:
        if watch is not None:
            watching = asyncio.create_task(watch.run(), name="sentinel-watch")
        await wait_for_redis(client, settings.reconnect_max_backoff)
        published = await run_feed(
            publisher,
            tickers,
            args.rate,
            args.duration,
            max_backoff=settings.reconnect_max_backoff,
        )
    finally:
        if watching is not None:
            await cancel_and_wait([watching])
        await client.aclose()
    log.info("feed: published %d updates", published, extra={"event": "feed_finished"})
    return 0


async def _until_sigterm(coro: Coroutine[Any, Any, int]) -> int:
    """Run ``coro``; SIGTERM cancels it (its ``finally`` blocks run) and the exit status is 0.
    In a container the process is PID 1, which ignores a signal it has no handler for: without
    this, each stop of a feed pod waited out terminationGracePeriodSeconds for the SIGKILL.

    The cancellation is repeated until the task has ended: one can be lost when it meets a
    Redis timeout in the same turn (redis-py turns that into a TimeoutError, which the feed
    survives as an outage), and a feed that ignored SIGTERM would wait for SIGKILL again."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(coro)
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled() and not stopping.is_set():
        return task.result()
    with contextlib.suppress(asyncio.CancelledError):
        task.result()  # an error the feed ended with while stopping is still raised
    log.info("feed: stopped by SIGTERM", extra={"event": "feed_stopped"})
    return 0


def _run(coro: Any) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        return int(uvloop.run(coro) or 0)
    return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            from pricestream.api.server import run_until_signalled

            settings = _settings_from(args)
            configure_logging(settings.log_level, settings.pod_name)
            _run(run_until_signalled(settings))
            return 0
        if args.command == "feed":
            settings = _settings_from(args)
            configure_logging(settings.log_level, settings.pod_name)
            if args.rate <= 0 or args.tickers <= 0:
                raise SettingsError("--rate and --tickers must be positive")
            return _run(_until_sigterm(_feed_main(args, settings)))
        if args.command == "loadtest":
            from pricestream.tools.loadtest.cli import main as loadtest_main

            return loadtest_main(args, list(argv)[1:] if argv is not None else None)
        if args.command == "health":
            return _run(_health_main(args))
        if args.command == "watch":
            from pricestream.tools.watch import watch

            return _run(watch(args.target, args.tickers, duration=args.duration))
        if args.command == "demo":
            from pricestream.tools.demo import run_demo

            settings = _settings_from(
                args, grpc_host="127.0.0.1", http_host="127.0.0.1", log_level="WARNING"
            )
            configure_logging(settings.log_level, settings.pod_name)
            return _run(
                run_demo(
                    settings,
                    tickers=args.tickers,
                    universe_size=args.universe,
                    rate=args.rate,
                    duration=args.duration,
                    clear=not args.no_clear,
                )
            )
        if args.command == "audit-logs":
            from pricestream.tools.audit import audit_logs

            return audit_logs(args.files)
    except SettingsError as exc:
        print(f"pricestream: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command}")
