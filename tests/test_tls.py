"""TLS on the gRPC port (and mutual TLS), and Redis with a password over TLS (rediss://), with
certificates made by openssl for the test; real processes and real channels."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from pricestream.api.tls import channel as tls_channel
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from support.invariants import wait_invariant
from support.processes import ServeProcess, start_feed
from support.servers import ready_server
from support.settings import fast_env, fast_settings
from support.streams import next_batch
from support.waiting import free_port, require_binary


async def stream_one_batch(channel: grpc.aio.Channel) -> None:
    stub = PriceStreamServiceStub(channel)
    session = await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL"]), timeout=5)
    call = stub.StreamPriceUpdates(pb.StreamPriceUpdatesRequest(session_id=session.session_id))
    assert (await next_batch(call, timeout=10)).updates[0].ticker == "AAPL"
    call.cancel()


async def test_tls_and_mutual_tls_on_the_grpc_port(redis, pki: Path) -> None:
    tls = {"tls_cert_file": str(pki / "server.crt"), "tls_key_file": str(pki / "server.key")}
    feed = start_feed(redis.url, tickers=5, rate=200)
    try:
        async with ready_server(fast_settings(redis.url, **tls)) as server:
            target = f"127.0.0.1:{server.grpc_port}"
            async with tls_channel(target, str(pki / "ca.crt")) as channel:
                await stream_one_batch(channel)
            async with grpc.aio.insecure_channel(target) as plain:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await PriceStreamServiceStub(plain).CreateSession(
                        pb.CreateSessionRequest(tickers=["AAPL"]), timeout=3
                    )
                assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            health = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "pricestream", "health", "--target", target,
                 "--tls-ca", str(pki / "ca.crt")],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert health.returncode == 0, health.stderr
            await wait_invariant(server)

        mutual = fast_settings(redis.url, **tls, tls_client_ca_file=str(pki / "ca.crt"))
        async with ready_server(mutual) as server:
            target = f"127.0.0.1:{server.grpc_port}"
            async with tls_channel(target, str(pki / "ca.crt")) as anonymous:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stream_one_batch(anonymous)
                assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            credentials = grpc.ssl_channel_credentials(
                root_certificates=(pki / "ca.crt").read_bytes(),
                private_key=(pki / "client.key").read_bytes(),
                certificate_chain=(pki / "client.crt").read_bytes(),
            )
            async with grpc.aio.secure_channel(target, credentials) as channel:
                await stream_one_batch(channel)
            await wait_invariant(server)
    finally:
        feed.kill()
        feed.wait()


def test_unreadable_certificate_is_one_clear_line(tmp_path: Path) -> None:
    env = fast_env("redis://127.0.0.1:1/0", tls_cert_file=str(tmp_path / "missing.crt"),
                   tls_key_file=str(tmp_path / "missing.key"))  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "pricestream", "serve"], env=env, capture_output=True,
        text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"pricestream: cannot read the TLS certificate {tmp_path / 'missing.crt'}: "
        "No such file or directory"
    )
    half = subprocess.run(
        [sys.executable, "-m", "pricestream", "serve"],
        env=fast_env("redis://127.0.0.1:1/0", tls_cert_file="x.crt"),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert half.returncode == 2
    assert "tls_cert_file and tls_key_file must be set together" in half.stderr


@pytest.mark.timeout(90)
async def test_redis_with_password_over_tls(pki: Path, tmp_path: Path) -> None:
    port = free_port()
    redis = subprocess.Popen(  # noqa: ASYNC220 - returns at once; stopped in finally
        [require_binary("redis-server"), "--port", "0", "--tls-port", str(port),
         "--bind", "127.0.0.1", "--tls-cert-file", str(pki / "server.crt"),
         "--tls-key-file", str(pki / "server.key"), "--tls-ca-cert-file", str(pki / "ca.crt"),
         "--tls-auth-clients", "no", "--requirepass", "s3cret-pw", "--save", "",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"rediss://:s3cret-pw@127.0.0.1:{port}/0?ssl_ca_certs={pki / 'ca.crt'}"
    feed = None
    server = None
    try:
        await asyncio.sleep(0.5)
        feed = start_feed(url, tickers=5, rate=200)
        server = await asyncio.to_thread(ServeProcess, fast_env(url), tmp_path / "serve.log")
        started = server.wait_for_event("server_started")
        assert started["tls"] is False
        async with grpc.aio.insecure_channel(server.target) as channel:
            await stream_one_batch(channel)
        await wait_invariant(server.http_port)
        assert "s3cret-pw" not in server.log_path.read_text()
    finally:
        if server is not None:
            server.stop()
        if feed is not None:
            feed.kill()
            feed.wait()
        redis.terminate()
        redis.wait()
