"""Waiting, ports, tools and process ends: the small helpers every kind of test uses."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require_binary(name: str, search: Path | None = None) -> str:
    """Path of a tool the test needs (on PATH, or in the folder ``search``): missing fails in
    CI, skips elsewhere."""
    path = shutil.which(name, path=None if search is None else str(search))
    if path is None:
        message = f"{name} is not installed (make setup installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_until(predicate, timeout: float, what: str, poll: float = 0.02) -> float:
    """Seconds it took for ``predicate()`` to hold; AssertionError after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(poll)
    return time.monotonic() - started


def end_process(proc: subprocess.Popen | None, *, kill: bool = False, timeout: float = 10) -> None:
    """End a server process a test started: SIGKILL at once (``kill``, a crash), or SIGTERM and
    SIGKILL if it has not exited within ``timeout``; reaped either way."""
    if proc is None:
        return
    if not kill:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait()


class OwnedProcess:
    """A server process a test starts into ``proc`` and ends with ``kill`` (a crash) or
    ``stop``; either leaves ``proc`` None, so the owner can start it again."""

    proc: subprocess.Popen[bytes] | None = None

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        end_process(self.proc, kill=True)
        self.proc = None

    def stop(self) -> None:
        end_process(self.proc)
        self.proc = None
