"""Settings with every timer short, for in-process servers and `pricestream serve` subprocesses."""

from __future__ import annotations

import os

from pricestream.settings import Settings, load_settings

FAST = {
    "grpc_host": "127.0.0.1",
    "grpc_port": 0,
    "http_host": "127.0.0.1",
    "http_port": 0,
    "web_host": "127.0.0.1",
    "web_port": 0,
    "web_drain_window": 0.5,
    "flush_interval": 0.05,
    "linger": 0.2,
    "session_ttl": 5.0,
    "resume_grace": 3.0,
    "lease_ttl": 1.0,
    "stall_timeout": 1.0,
    "drain_timeout": 3.0,
    "probe_interval": 1.0,
    "probe_timeout": 0.5,
    "redis_outage_limit": 2.0,
    "reconnect_max_backoff": 0.5,
    "redis_timeout": 1.0,
}


def fast_settings(redis_url: str, **overrides: object) -> Settings:
    return load_settings(**{**FAST, "redis_url": redis_url, **overrides})


def fast_env(redis_url: str, **overrides: object) -> dict[str, str]:
    """Environment for a `pricestream serve` subprocess with the fast settings; no other
    ``PRICESTREAM_*`` variable of ours (test knobs such as CHURN_SCALE would stop
    the start as unknown settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRICESTREAM_")}
    for key, value in {**FAST, "redis_url": redis_url, **overrides}.items():
        env[f"PRICESTREAM_{key.upper()}"] = str(value)
    return env
