"""Fixtures: real redis-server processes on free loopback ports, servers, gRPC clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from pricestream.api.server import Server
from pricestream.settings import Settings, load_settings
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from redis import Redis

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


class RedisProcess:
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

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        end_process(self.proc, kill=True)
        self.proc = None

    def stop(self) -> None:
        end_process(self.proc)
        self.proc = None


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    redis = RedisProcess(tmp_path_factory.mktemp("redis"))
    redis.start()
    yield redis
    redis.stop()


@pytest.fixture
def redis(shared_redis: RedisProcess) -> RedisProcess:
    """The session-wide redis-server, emptied for this test."""
    client = shared_redis.client()
    client.flushall()
    client.close()
    return shared_redis


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server for this test alone (tests that kill or restart it)."""
    redis = RedisProcess(tmp_path)
    redis.start()
    yield redis
    redis.kill()


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
    ``PRICESTREAM_*`` variable of ours (test knobs such as PRICESTREAM_CHURN_SCALE would stop
    the start as unknown settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRICESTREAM_")}
    for key, value in {**FAST, "redis_url": redis_url, **overrides}.items():
        env[f"PRICESTREAM_{key.upper()}"] = str(value)
    return env


@pytest.fixture
async def server(redis: RedisProcess) -> AsyncIterator[Server]:
    async with ready_server(fast_settings(redis.url, pod_name="pod-a")) as srv:
        yield srv


@contextlib.asynccontextmanager
async def ready_server(settings: Settings) -> AsyncIterator[Server]:
    """An in-process server, entered and ready (Redis reachable, Pub/Sub live)."""
    async with Server(settings) as srv:
        await wait_ready(srv)
        yield srv


async def wait_ready(srv: Server, timeout: float = 10.0) -> None:
    import asyncio

    deadline = time.monotonic() + timeout
    while not srv.engine.ready:
        if time.monotonic() > deadline:
            raise AssertionError("server did not become ready")
        await asyncio.sleep(0.02)


@pytest.fixture
async def stub(server: Server) -> AsyncIterator[PriceStreamServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield PriceStreamServiceStub(channel)


@pytest.fixture(autouse=True)
async def dump_tasks_if_stuck(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """If a test hangs, print every asyncio task's stack once, to show what it waits for:
    after 60 s, or 80% of a longer `@pytest.mark.timeout`."""
    import asyncio
    import sys

    marker = request.node.get_closest_marker("timeout")
    dump_after = max(60.0, 0.8 * float(marker.args[0])) if marker else 60.0

    async def watchdog() -> None:
        await asyncio.sleep(float(os.environ.get("PRICESTREAM_TEST_DUMP_AFTER", dump_after)))
        out = sys.__stderr__  # past pytest's capture
        for task in asyncio.all_tasks():
            print(f"--- task {task.get_name()}: {task!r}", file=out)
            with contextlib.suppress(Exception):
                task.print_stack(limit=8, file=out)

    task = asyncio.create_task(watchdog())
    yield
    task.cancel()


# --- TLS material made by openssl for the tests ---


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_binary("openssl"), *args], cwd=cwd, check=True, capture_output=True)


def issue(name: str, ca: Path, cwd: Path, extension: str) -> None:
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)  # fmt: skip
    (cwd / f"{name}.ext").write_text(extension)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca / "ca.crt"), "-CAkey",
            str(ca / "ca.key"), "-CAcreateserial", "-out", f"{name}.crt", "-days", "1",
            "-extfile", f"{name}.ext", cwd=cwd)  # fmt: skip


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    path = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.crt", "-days", "1", "-subj", "/CN=pricestream-test-ca", cwd=path)  # fmt: skip
    issue("server", path, path, "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    issue("client", path, path, "extendedKeyUsage=clientAuth\n")
    return path


# The helpers moved to tests/support/ under their old top-level names, for the test modules still
# being edited elsewhere (issue 25); this goes once they import from support/ themselves.
def _alias_moved_helpers() -> None:
    import importlib
    import sys

    for name in ("chart", "fake_apiserver", "invariants", "metric_names", "processes",
                 "rule_scenarios", "web_clients"):  # fmt: skip
        sys.modules.setdefault(name, importlib.import_module(f"support.{name}"))


_alias_moved_helpers()
