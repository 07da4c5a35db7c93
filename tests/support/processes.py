"""Run `pricestream` commands as real processes and read their JSON logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def pricestream_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pricestream", *args]


class ServeProcess:
    """`pricestream serve` with its JSON log in a file; ports learned from the start line."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            pricestream_command("serve"), env=env, stderr=self._log, stdout=subprocess.DEVNULL
        )
        self.grpc_port = 0
        self.http_port = 0
        self.web_port = 0
        try:
            started = self.wait_for_event("server_started", timeout=20)
        except BaseException:
            self.stop()  # nobody else holds this process yet: do not leave it running
            raise
        self.grpc_port = started["grpc_port"]
        self.http_port = started["http_port"]
        self.web_port = started["web_port"]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"unparsed": line})
        return out

    def wait_for_event(self, event: str, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.records():
                if record.get("event") == event:
                    return record
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited early: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {event!r} event within {timeout}s")

    def terminate(self, timeout: float = 20) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def env_without_pricestream() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PRICESTREAM_")}


def start_feed(redis_url: str, tickers: int, rate: float) -> subprocess.Popen[bytes]:
    """`pricestream feed` publishing to `redis_url` until stopped."""
    env = {**env_without_pricestream(), "PRICESTREAM_REDIS_URL": redis_url}
    return subprocess.Popen(
        pricestream_command("feed", "--tickers", str(tickers), "--rate", str(rate)),
        env=env,
        stderr=subprocess.DEVNULL,
    )
