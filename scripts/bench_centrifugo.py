"""Centrifugo v6 side by side: its config for the bench, and how to start it.

The binary is built by `make centrifugo` (go install github.com/centrifugal/centrifugo/v6,
into the git-ignored .tools/bin); nothing of Centrifugo is in this repository. The config is
written fresh for each run: the Redis engine on the bench's own redis-server, the
uni-directional gRPC transport on a free loopback port and the unidirectional WebSocket
(`uni_websocket`, JSON pushes, on the HTTP port at /connection/uni_websocket; its
`join_push_messages` on request), anonymous connections, one namespace
whose channels clients may subscribe to, no history and no recovery (so the Redis broker's wire
is a plain PUBLISH, the format scripts/bench_feed.py writes), everything bound to 127.0.0.1 and
usage statistics off.
"""

from __future__ import annotations

import json
from pathlib import Path

CENTRIFUGO_BIN = ".tools/bin/centrifugo"
CENTRIFUGO_VERSION = "v6.9.1"
NAMESPACE = "prices"
CHANNEL_PREFIX = NAMESPACE + ":"  # channel of a ticker: prices:AAPL


UNI_WEBSOCKET_PATH = "/connection/uni_websocket"


def centrifugo_config(
    *,
    redis_port: int,
    grpc_port: int,
    http_port: int,
    prefix: str,
    log_level: str = "warn",
    join_push_messages: bool = False,
) -> dict:
    """The config keys of Centrifugo v6 (internal/config, internal/configtypes).
    ``join_push_messages``: uni_websocket joins the pushes queued for a socket into one frame
    (one per line), fewer system calls per delivered update."""
    return {
        "log": {"level": log_level},
        "http_server": {"address": "127.0.0.1", "port": http_port},
        "engine": {
            "type": "redis",
            "redis": {"address": [f"redis://127.0.0.1:{redis_port}"], "prefix": prefix},
        },
        "uni_grpc": {"enabled": True, "address": "127.0.0.1", "port": grpc_port},
        "uni_websocket": {"enabled": True, "join_push_messages": join_push_messages},
        "client": {"allow_anonymous_connect_without_token": True},
        "channel": {
            "namespaces": [
                {
                    "name": NAMESPACE,
                    "allow_subscribe_for_client": True,
                    "allow_subscribe_for_anonymous": True,
                    "history_size": 0,
                    "history_ttl": "0s",
                    "force_recovery": False,
                    "presence": False,
                    "join_leave": False,
                }
            ]
        },
        "health": {"enabled": True},
        "usage_stats": {"disabled": True},
    }


def write_config(path: Path, **settings: int | str | bool) -> Path:
    path.write_text(json.dumps(centrifugo_config(**settings), indent=2))  # type: ignore[arg-type]
    return path


def command(binary: Path, config: Path) -> list[str]:
    return [str(binary), "--config", str(config)]
