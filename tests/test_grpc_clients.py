"""Stock clients nobody here wrote, on the gRPC port: grpc-go (the checks of tests/grpcgo,
built by `make grpcgo`), grpcurl through reflection (`make grpcurl`), and grpcio on both
reflection versions; plaintext, TLS and mutual TLS. Every run ends with invariant 1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shlex
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pricestream.api.server import Server
from support.invariants import wait_invariant
from support.market import Market
from support.servers import ready_server
from support.settings import fast_settings
from support.waiting import require_binary

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".tools" / "bin"
SERVICE = "pricestream.v1.PriceStreamService"
TICKERS = ["AAPL", "MSFT"]
DRAIN_READY = "grpcgo: drain check streaming; drain the server now"
# Every check of tests/grpcgo that runs by default ("all"); the program lists them with -list.
DEFAULT_CHECKS = [
    "create_session",
    "stream_batch",
    "deadline",
    "cancel",
    "invalid_argument",
    "invalid_argument_message",
    "not_found",
    "unimplemented",
    "large_request_under_limit",
    "large_request_over_limit",
    "health_check",
    "health_check_unknown",
    "health_watch",
    "reflection_v1",
    "reflection_v1alpha",
]


def grpcgo() -> str:
    return require_binary("grpcgo", TOOLS)


def grpcurl() -> str:
    return require_binary("grpcurl", TOOLS)


@pytest.fixture
async def prices(redis) -> AsyncIterator[None]:
    """The tickers of the checks get a price every 20 ms (and have a last price at once)."""
    market = Market(redis.url, TICKERS)
    await market.tick(*TICKERS)

    stop = asyncio.Event()

    async def run() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.02)
            await market.tick(*TICKERS)

    # Stopped by the event, not cancelled: a redis-py command cancelled midway can hang.
    task = asyncio.create_task(run())
    yield
    stop.set()
    await asyncio.wait_for(task, 10)
    await market.aclose()


async def run(*command: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run a program without blocking the in-process server's event loop."""
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def outcomes(stdout: str) -> dict[str, dict[str, object]]:
    results = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    for result in results:
        assert set(result) == {"name", "ok", "detail"}, result
    return {result["name"]: result for result in results}


async def go_checks(target: str, *flags: str, checks: str = "all") -> dict[str, dict[str, object]]:
    """Run the grpc-go checks; each one's {name, ok, detail} by name."""
    code, out, err = await run(
        grpcgo(), "-target", target, "-tickers", ",".join(TICKERS), "-checks", checks, *flags
    )
    assert code in (0, 1), f"grpcgo exited {code}: {err}"
    results = outcomes(out)
    assert (code == 0) == all(r["ok"] for r in results.values()), (code, results)
    return results


def assert_all_ok(results: dict[str, dict[str, object]], names: list[str]) -> None:
    assert list(results) == names
    failed = {name: r["detail"] for name, r in results.items() if not r["ok"]}
    assert not failed, json.dumps(failed, indent=2, ensure_ascii=False)


# --- grpc-go -------------------------------------------------------------------------------


def test_grpcgo_lists_its_checks() -> None:
    import subprocess

    listed = subprocess.run([grpcgo(), "-list"], capture_output=True, text=True, timeout=30)
    assert listed.stdout.split("\n")[: len(DEFAULT_CHECKS)] == DEFAULT_CHECKS
    assert "drain_trailer (opt-in)" in listed.stdout


async def test_grpc_go_plaintext(server: Server, prices: None) -> None:
    results = await go_checks(f"127.0.0.1:{server.grpc_port}")
    assert_all_ok(results, DEFAULT_CHECKS)
    await wait_invariant(server)


async def test_grpc_go_drain_ends_streams_with_the_reconnect_trailer(redis, prices: None) -> None:
    async with ready_server(fast_settings(redis.url)) as server:
        proc = await asyncio.create_subprocess_exec(
            grpcgo(), "-target", f"127.0.0.1:{server.grpc_port}", "-checks", "drain_trailer",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert proc.stderr is not None and proc.stdout is not None
            line = await asyncio.wait_for(proc.stderr.readline(), 15)
            assert line.decode().strip() == DRAIN_READY, line
            await server.drain()
            out = await asyncio.wait_for(proc.stdout.read(), 15)
            assert await proc.wait() == 0, out
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert_all_ok(outcomes(out.decode()), ["drain_trailer"])
        await wait_invariant(server)


async def test_grpc_go_tls_and_mutual_tls(redis, prices: None, pki: Path) -> None:
    tls = {"tls_cert_file": str(pki / "server.crt"), "tls_key_file": str(pki / "server.key")}
    ca = str(pki / "ca.crt")
    async with ready_server(fast_settings(redis.url, **tls)) as server:
        target = f"127.0.0.1:{server.grpc_port}"
        assert_all_ok(await go_checks(target, "-ca", ca), DEFAULT_CHECKS)
        named = await go_checks(
            target, "-ca", ca, "-server-name", "localhost", checks="create_session,health_check"
        )
        assert_all_ok(named, ["create_session", "health_check"])
        wrong_name = await go_checks(
            target, "-ca", ca, "-server-name", "elsewhere.example", checks="create_session"
        )
        assert not wrong_name["create_session"]["ok"]
        assert "Unavailable" in str(wrong_name["create_session"]["detail"])
        plain = await go_checks(target, checks="create_session")
        assert not plain["create_session"]["ok"]  # plaintext to a TLS port
        await wait_invariant(server)

    mutual = fast_settings(redis.url, **tls, tls_client_ca_file=ca)
    client = ("-cert", str(pki / "client.crt"), "-key", str(pki / "client.key"))
    async with ready_server(mutual) as server:
        target = f"127.0.0.1:{server.grpc_port}"
        assert_all_ok(await go_checks(target, "-ca", ca, *client), DEFAULT_CHECKS)
        anonymous = await go_checks(target, "-ca", ca, checks="create_session")
        assert not anonymous["create_session"]["ok"]  # no client certificate
        assert "Unavailable" in str(anonymous["create_session"]["detail"])
        await wait_invariant(server)


# --- grpcurl through reflection --------------------------------------------------------------


async def test_grpcurl_lists_describes_and_calls_through_reflection(server: Server) -> None:
    target = f"127.0.0.1:{server.grpc_port}"
    code, out, err = await run(grpcurl(), "-plaintext", target, "list")
    assert code == 0, err
    assert set(out.split()) == {
        SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }

    code, out, err = await run(grpcurl(), "-plaintext", target, "describe", SERVICE)
    assert code == 0, err
    assert f"{SERVICE} is a service:" in out
    for rpc in (
        "rpc CreateSession ( .pricestream.v1.CreateSessionRequest )"
        " returns ( .pricestream.v1.Session );",
        "rpc StreamPriceUpdates ( .pricestream.v1.StreamPriceUpdatesRequest )"
        " returns ( stream .pricestream.v1.PriceUpdateBatch );",
        "rpc CloseSession ( .pricestream.v1.CloseSessionRequest )"
        " returns ( .google.protobuf.Empty );",
    ):
        assert rpc in out, out

    code, out, err = await run(
        grpcurl(), "-plaintext", "-d", '{"tickers":["AAPL"]}', target, f"{SERVICE}/CreateSession"
    )
    assert code == 0, err
    session = json.loads(out)
    assert len(session["sessionId"]) == 22 and session["tickers"] == ["AAPL"]

    code, out, err = await run(
        grpcurl(), "-plaintext", "-d", "{}", target, f"{SERVICE}/CreateSession"
    )
    assert code == 64 + 3, (code, out, err)  # grpcurl exits 64 + the status code
    assert "Code: InvalidArgument" in err and "at least one ticker is required" in err

    for _ in range(20):  # readiness reaches the health service within 250 ms
        code, out, err = await run(
            grpcurl(), "-plaintext", "-d", '{"service": "pricestream.v1.PriceStreamService"}',
            target, "grpc.health.v1.Health/Check",
        )  # fmt: skip
        assert code == 0, err
        if json.loads(out) == {"status": "SERVING"}:
            break
        await asyncio.sleep(0.1)
    assert json.loads(out) == {"status": "SERVING"}

    code, _, err = await run(
        grpcurl(), "-plaintext", "-d", json.dumps({"session_id": session["sessionId"]}),
        target, f"{SERVICE}/CloseSession",
    )  # fmt: skip
    assert code == 0, err
    await wait_invariant(server)


async def test_grpcurl_over_tls_and_mutual_tls(redis, pki: Path) -> None:
    tls = {"tls_cert_file": str(pki / "server.crt"), "tls_key_file": str(pki / "server.key")}
    ca = str(pki / "ca.crt")
    mutual = fast_settings(redis.url, **tls, tls_client_ca_file=ca)
    async with ready_server(mutual) as server:
        target = f"127.0.0.1:{server.grpc_port}"
        client = ("-cert", str(pki / "client.crt"), "-key", str(pki / "client.key"))
        code, out, err = await run(grpcurl(), "-cacert", ca, *client, target, "list")
        assert code == 0, err
        assert SERVICE in out.split()
        code, _, err = await run(grpcurl(), "-cacert", ca, target, "list")
        assert code != 0  # no client certificate
        await wait_invariant(server)


def readme_commands() -> list[list[str]]:
    """The shell commands of README.md's "Stream from your own client", as argument lists."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Stream from your own client", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None
    lines = block.group(1).replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.startswith("#")]


async def test_readme_grpcurl_example_works_verbatim(server: Server, prices: None) -> None:
    """The README's three commands, only the port (50051) and the session id ("q3v…") put in."""
    create, stream, close = readme_commands()
    assert [c[-1] for c in (create, stream, close)] == [
        f"{SERVICE}/CreateSession",
        f"{SERVICE}/StreamPriceUpdates",
        f"{SERVICE}/CloseSession",
    ]
    target = f"127.0.0.1:{server.grpc_port}"

    def concrete(command: list[str], session_id: str = "") -> list[str]:
        assert command[0] == "grpcurl" and "127.0.0.1:50051" in command
        args = [
            target if a == "127.0.0.1:50051" else a.replace("q3v…", session_id) for a in command
        ]
        return [grpcurl(), *args[1:]]

    code, out, err = await run(*concrete(create))
    assert code == 0, err
    session = json.loads(out)
    assert set(session) == {"sessionId", "tickers", "expiresAt"}
    assert session["tickers"] == ["AAPL", "MSFT"]

    proc = await asyncio.create_subprocess_exec(
        *concrete(stream, session["sessionId"]),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readuntil(b"\n}\n"), 15)
        batch = json.loads(first)
        assert {u["ticker"] for u in batch["updates"]} <= {"AAPL", "MSFT"}
        assert all(float(u["price"]) > 0 for u in batch["updates"])
        code, out, err = await run(*concrete(close, session["sessionId"]))
        assert code == 0, err
        assert json.loads(out) == {}
        # CloseSession ends the stream with OK: grpcurl exits 0.
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    await wait_invariant(server)


# --- grpcio on both reflection versions -----------------------------------------------------


async def test_reflection_answers_on_v1_and_v1alpha(server: Server) -> None:
    """grpcurl asks v1 first and falls back to v1alpha: both names answer, with the same bytes."""
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        alpha = reflection_pb2_grpc.ServerReflectionStub(channel)
        v1alpha = [r async for r in alpha.ServerReflectionInfo(iter(requests))]
        v1_call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        v1 = [r async for r in v1_call(iter(requests))]
    assert [r.SerializeToString() for r in v1] == [r.SerializeToString() for r in v1alpha]
    names = {s.name for s in v1alpha[0].list_services_response.service}
    assert {SERVICE, "grpc.reflection.v1.ServerReflection"} <= names
    assert v1alpha[1].file_descriptor_response.file_descriptor_proto
    await wait_invariant(server)
