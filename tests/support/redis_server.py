"""A redis-server of the test's own (the ``redis``/``own_redis`` fixtures hand these out)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from redis import Redis

from support.waiting import OwnedProcess, free_port, require_binary


class RedisProcess(OwnedProcess):
    """A redis-server of our own on a free loopback port; can be killed and restarted."""

    def __init__(self, workdir: Path) -> None:
        self.binary = require_binary("redis-server")
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except Exception:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def client(self) -> Redis:
        return Redis.from_url(self.url, socket_timeout=2)
