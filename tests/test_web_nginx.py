"""The browser port behind a real reverse proxy (issue 26, line 11): Debian's nginx, configured
as ingress-nginx configures an Ingress location (Upgrade/Connection from the `$connection_upgrade`
map, Host and X-Forwarded-* from the client's request, upstream keep-alive, and the chart's
Ingress annotations: an hour of read/send timeout, response buffering off), in front of an
in-process server. REST, a WebSocket stream through the stock `websockets` client and an SSE
stream through aiohttp all go through nginx, with the close codes passing as real frames/events.

Run for both of ingress-nginx's upstream modes: keep-alive to the pods (its default,
`upstream-keepalive-connections: 320`, map `'' ''`) and none (map `'' close`).

With nginx trusted (`trusted_proxies`), the session create limit applies to each client nginx
forwards for, not to nginx: clients on other loopback addresses (127.0.0.2, 127.0.0.3) stand
in for browsers behind one ingress controller pod."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import websockets
from pricestream.api.server import Server
from support.invariants import read_metrics, wait_invariant
from support.market import Market
from support.nginx_proxy import Nginx, chart_annotations, location_directives, running_nginx
from support.servers import ready_server
from support.settings import fast_settings
from support.waiting import free_port, require_binary
from support.web_clients import SseReader, create_session, rest

SUBPROTOCOL = "pricestream.v1.json"


# (upstream-keepalive-connections, response headers nginx disregards)
KEEPALIVE = pytest.param((320, ()), id="upstream-keepalive")
NO_KEEPALIVE = pytest.param((0, ()), id="no-upstream-keepalive")
# The server's SSE response says `X-Accel-Buffering: no`, which alone turns nginx's buffering
# off; disregarding it leaves the chart's `proxy-buffering: "off"` annotation to do it.
ANNOTATION_ONLY = pytest.param((320, ("X-Accel-Buffering",)), id="annotation-only")


@pytest.fixture(params=[KEEPALIVE, NO_KEEPALIVE])
def nginx(server: Server, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Nginx]:
    binary = require_binary("nginx", Path("/usr/sbin"))
    keepalive, ignore_headers = request.param
    with running_nginx(
        binary,
        tmp_path / "nginx",
        free_port(),
        server.web_port,
        keepalive=keepalive,
        ignore_headers=ignore_headers,
    ) as proxy:
        yield proxy
    assert "[alert]" not in proxy.error_log and "[emerg]" not in proxy.error_log, proxy.error_log


def logged(proxy: Nginx, server: Server, request_line: str, status: int) -> bool:
    """The access log has this request, answered with ``status`` by the backend's port."""
    needle = f'"{request_line} HTTP/1.1" {status} '
    upstream = f"[127.0.0.1:{server.web_port}]"
    return any(needle in line and upstream in line for line in proxy.access_log.splitlines())


async def recv_json(ws: websockets.ClientConnection, timeout: float = 5.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


def test_the_proxy_config_carries_the_charts_ingress_annotations() -> None:
    """What the config below is built from: the chart's annotations, as ingress-nginx renders
    them (a change there that would break streaming through an Ingress shows up here)."""
    assert location_directives(chart_annotations()) == {
        "proxy_read_timeout": "3600s",
        "proxy_send_timeout": "3600s",
        "proxy_buffering": "off",
    }


async def test_rest_through_nginx_names_the_proxys_host(nginx: Nginx, server: Server) -> None:
    status, headers, body = await rest(nginx.port, "POST", "/v1/sessions", {"tickers": ["aapl"]})
    assert status == 201 and body["tickers"] == ["AAPL"]
    session_id = body["session_id"]
    assert headers["Location"] == f"/v1/sessions/{session_id}"
    # The Host the client asked for reaches the server: the URLs name nginx, not the backend.
    assert body["stream_url"] == f"ws://127.0.0.1:{nginx.port}/v1/sessions/{session_id}/ws"
    assert body["events_url"] == f"http://127.0.0.1:{nginx.port}/v1/sessions/{session_id}/events"
    assert str(server.web_port) not in body["stream_url"] + body["events_url"]
    # Whatever Host a browser used (an Ingress host), and nginx's own X-Forwarded-Proto
    # (its $scheme, http here) in place of the one a client made up.
    status, _, named = await rest(
        nginx.port,
        "POST",
        "/v1/sessions",
        {"tickers": ["MSFT"]},
        headers={"Host": "prices.example.com", "X-Forwarded-Proto": "https"},
    )
    assert status == 201
    assert named["stream_url"] == f"ws://prices.example.com/v1/sessions/{named['session_id']}/ws"
    # Errors pass through as the server wrote them.
    status, _, error = await rest(nginx.port, "GET", "/v1/sessions/AAAAAAAAAAAAAAAAAAAAAA")
    assert status == 404 and error["error"]["code"] == "not_found"
    for made in (session_id, named["session_id"]):
        assert (await rest(nginx.port, "DELETE", f"/v1/sessions/{made}"))[0] == 204
    assert logged(nginx, server, "POST /v1/sessions", 201)
    assert logged(nginx, server, f"DELETE /v1/sessions/{session_id}", 204)
    await wait_invariant(server, timeout=5)


async def test_websocket_streams_through_nginx_and_closes_1000(
    nginx: Nginx, server: Server, redis
) -> None:
    market = Market(redis.url, ["AAPL", "MSFT"])
    await market.tick("AAPL", "MSFT")
    session = await create_session(nginx.port, ["AAPL", "MSFT"])
    page_origin = f"http://127.0.0.1:{nginx.port}"  # what a browser on the proxied page sends
    async with websockets.connect(
        session["stream_url"], subprotocols=[SUBPROTOCOL], origin=page_origin
    ) as ws:
        assert ws.subprotocol == SUBPROTOCOL  # echoed through nginx
        assert ws.response.status_code == 101
        snapshot = await recv_json(ws)
        assert snapshot["type"] == "snapshot" and snapshot["seq"] == 1
        assert sorted(u["ticker"] for u in snapshot["updates"]) == ["AAPL", "MSFT"]
        ticked = time.monotonic()
        await market.tick("MSFT")
        prices = await recv_json(ws, timeout=2.0)
        print(f"price through nginx over WebSocket {time.monotonic() - ticked:.3f}s after the tick")
        assert prices["type"] == "prices" and prices["seq"] == 2
        assert [(u["ticker"], u["sequence"]) for u in prices["updates"]] == [("MSFT", "2")]
        # DELETE through nginx: the server's close frame crosses nginx (a dropped TCP
        # connection would read as 1006 here).
        status, _, _ = await rest(nginx.port, "DELETE", f"/v1/sessions/{session['session_id']}")
        assert status == 204
        with pytest.raises(websockets.ConnectionClosedOK):
            while True:
                await asyncio.wait_for(ws.recv(), 5)
        assert (ws.close_code, ws.close_reason) == (1000, "session closed")
    # A foreign page is still refused behind the proxy (the origin check sees nginx's Host).
    other = await create_session(nginx.port, ["AAPL"])
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(
            other["stream_url"], subprotocols=[SUBPROTOCOL], origin="http://evil.example"
        ):
            pass
    assert refused.value.response.status_code == 403
    await rest(nginx.port, "DELETE", f"/v1/sessions/{other['session_id']}")
    await market.aclose()
    values = await wait_invariant(server, timeout=5)
    assert values["pricestream_ws_connections_opened_total"] == 1
    exposition = read_metrics(server)
    assert 'pricestream_ws_connections_closed_total{code="1000"} 1.0' in exposition
    assert logged(nginx, server, f"GET /v1/sessions/{session['session_id']}/ws", 101)


@pytest.mark.parametrize("nginx", [KEEPALIVE, NO_KEEPALIVE, ANNOTATION_ONLY], indirect=True)
async def test_sse_streams_through_nginx_unbuffered_and_ends_on_delete(
    nginx: Nginx, server: Server, redis
) -> None:
    market = Market(redis.url, ["AAPL"])
    await market.tick("AAPL")
    session = await create_session(nginx.port, ["AAPL"])
    assert session["events_url"].startswith(f"http://127.0.0.1:{nginx.port}/")
    # A buffering proxy would hold even the response head: fail in seconds, not at the
    # suite's timeout.
    timeout = aiohttp.ClientTimeout(sock_connect=5, sock_read=5)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(session["events_url"]) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            events = SseReader(response)
            assert await events.event() == {"retry": "2000"}
            first = await events.event()
            assert first["id"] == "1" and json.loads(first["data"])["type"] == "snapshot"
            assert json.loads(first["data"])["updates"][0]["ticker"] == "AAPL"
            ticked = time.monotonic()
            await market.tick("AAPL")
            # One small event: with response buffering on it would sit in nginx's buffer.
            second = await events.event(timeout=2.0)
            print(f"price through nginx over SSE {time.monotonic() - ticked:.3f}s after the tick")
            assert second["id"] == "2"
            assert json.loads(second["data"])["updates"][0]["sequence"] == "2"
            status, _, _ = await rest(nginx.port, "DELETE", f"/v1/sessions/{session['session_id']}")
            assert status == 204
            closing = await events.event()
            assert closing["event"] == "close"
            assert json.loads(closing["data"])["code"] == 1000
            assert await asyncio.wait_for(response.content.read(), 5) == b""  # the end
    await market.aclose()
    values = await wait_invariant(server, timeout=5)
    assert values["pricestream_sse_connections_opened_total"] == 1
    assert logged(nginx, server, f"GET /v1/sessions/{session['session_id']}/events", 200)


async def create_from(
    source: str, port: int, headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    """POST /v1/sessions to 127.0.0.1:port from the loopback address ``source``."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.post(
            f"http://127.0.0.1:{port}/v1/sessions", json={"tickers": ["AAPL"]}, headers=headers
        ) as response:
            return response.status, await response.json()


async def test_each_client_behind_trusted_nginx_has_its_own_create_limit(
    redis, tmp_path: Path
) -> None:
    """nginx sets X-Forwarded-For to the address it saw (ingress-nginx's default): trusted, the
    server limits each client by it; what a client sends in its own header is overwritten."""
    binary = require_binary("nginx", Path("/usr/sbin"))
    settings = fast_settings(
        redis.url, session_create_rate=0.1, session_create_burst=2, trusted_proxies="127.0.0.1"
    )
    async with ready_server(settings) as server:
        with running_nginx(binary, tmp_path / "nginx", free_port(), server.web_port) as proxy:
            made = []
            for _ in range(2):
                status, body = await create_from("127.0.0.2", proxy.port)
                assert status == 201, body
                made.append(body["session_id"])
            refused = (
                "too many sessions created from 127.0.0.2: at most 0.1 per second; retry later"
            )
            for headers in (None, {"X-Forwarded-For": "127.0.0.3"}):
                status, body = await create_from("127.0.0.2", proxy.port, headers)
                assert (status, body["error"]["message"]) == (429, refused)
            status, body = await create_from("127.0.0.3", proxy.port)
            assert status == 201, body
            made.append(body["session_id"])
            for session_id in made:
                assert (await rest(proxy.port, "DELETE", f"/v1/sessions/{session_id}"))[0] == 204
        await wait_invariant(server, timeout=5)
    assert "[alert]" not in proxy.error_log and "[emerg]" not in proxy.error_log, proxy.error_log
