"""The browser port against a real redis-server: the REST contract, WebSocket streams through
a stock client (`websockets`), SSE, close codes, origins, limits and the drain (issue 26)."""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
from dataclasses import replace

import aiohttp
import grpc
import pytest
import websockets
from google.protobuf import json_format
from pricestream.api.server import Server
from pricestream.errors import DRAINING_MESSAGE
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from support.invariants import read_metrics, samples, wait_invariant
from support.market import Market
from support.servers import ready_server
from support.settings import fast_settings
from support.streams import next_batch
from support.waiting import wait_until
from support.web_clients import RawWebSocket, SseReader, create_session, in_thread, rest

SUBPROTOCOL = "pricestream.v1.json"


def ws_url(server: Server, session_id: str) -> str:
    return f"ws://127.0.0.1:{server.web_port}/v1/sessions/{session_id}/ws"


async def recv_json(ws: websockets.ClientConnection, timeout: float = 5.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def closed_with(ws: websockets.ClientConnection, timeout: float = 5.0) -> int:
    """Read until the server closes; its close code."""
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    assert ws.close_code is not None
    return ws.close_code


def metric(server: Server, name: str) -> float:
    return samples(read_metrics(server)).get(name, 0.0)


# --- REST -------------------------------------------------------------------------------


async def test_rest_create_get_delete(server: Server) -> None:
    port = server.web_port
    status, headers, body = await rest(port, "POST", "/v1/sessions", {"tickers": ["aapl", "MSFT"]})
    assert status == 201
    assert set(body) == {
        "session_id", "tickers", "expires_at", "streaming", "stream_url", "events_url"
    }  # fmt: skip
    session_id = body["session_id"]
    assert len(session_id) == 22 and body["tickers"] == ["AAPL", "MSFT"]
    assert headers["Location"] == f"/v1/sessions/{session_id}"
    expires = datetime.datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
    assert expires > datetime.datetime.now(datetime.UTC)
    assert body["stream_url"] == f"ws://127.0.0.1:{port}/v1/sessions/{session_id}/ws"
    assert body["events_url"] == f"http://127.0.0.1:{port}/v1/sessions/{session_id}/events"

    status, got_headers, got = await rest(port, "GET", f"/v1/sessions/{session_id}")
    assert status == 200 and got["tickers"] == ["AAPL", "MSFT"] and got["streaming"] is False
    assert got_headers["Cache-Control"] == "no-store"

    status, _, nothing = await rest(port, "DELETE", f"/v1/sessions/{session_id}")
    assert (status, nothing) == (204, None)
    for method in ("GET", "DELETE"):
        status, _, error = await rest(port, method, f"/v1/sessions/{session_id}")
        assert status == 404 and error["error"]["code"] == "not_found"
    await wait_invariant(server, timeout=5)


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "word"),
    [
        ("POST", "/v1/sessions", {"raw": b"{}", "headers": {"Content-Type": "text/plain"}}, 415,
         "unsupported_media_type"),
        ("POST", "/v1/sessions", {"raw": b"{", "headers": {"Content-Type": "application/json"}},
         400, "invalid_json"),
        ("POST", "/v1/sessions", {"body": {"tickers": []}}, 400, "invalid_argument"),
        ("POST", "/v1/sessions", {"body": {"tickers": ["A$"]}}, 400, "invalid_argument"),
        ("POST", "/v1/sessions", {"body": {"tickers": ["A"], "x": 1}}, 400, "invalid_argument"),
        ("POST", "/v1/sessions", {"body": {"tickers": "AAPL"}}, 400, "invalid_argument"),
        ("POST", "/v1/sessions", {"body": [1]}, 400, "invalid_argument"),
        ("POST", "/v1/sessions", {"raw": b"x" * 70_000,
                                  "headers": {"Content-Type": "application/json"}}, 413,
         "bad_request"),
        ("PUT", "/v1/sessions", {}, 405, "method_not_allowed"),
        ("GET", "/v1/sessions/short", {}, 404, "not_found"),
        ("GET", "/v2/anything", {}, 404, "not_found"),
        ("GET", "/v1/sessions/AAAAAAAAAAAAAAAAAAAAAA/ws", {}, 426, "upgrade_required"),
        ("POST", "/v1/sessions/AAAAAAAAAAAAAAAAAAAAAA/ws", {}, 405, "method_not_allowed"),
        # JSON that json.loads fails on with other errors than JSONDecodeError.
        ("POST", "/v1/sessions", {"raw": b"[" * 30_000 + b"]" * 30_000,
                                  "headers": {"Content-Type": "application/json"}}, 400,
         "invalid_json"),
        ("POST", "/v1/sessions", {"raw": b'{"tickers": ' + b"1" * 5_000 + b"}",
                                  "headers": {"Content-Type": "application/json"}}, 400,
         "invalid_json"),
        # Letters that upper-case to ASCII ones ("SS", "FI", "IBM") are not tickers.
        ("POST", "/v1/sessions", {"body": {"tickers": ["ß"]}}, 400, "invalid_argument"),
        ("POST", "/v1/sessions", {"body": {"tickers": ["\ufb01x", "\u0131bm"]}}, 400,
         "invalid_argument"),
        ("GET", "/%0Ax", {}, 404, "not_found"),  # a control character is not echoed
    ],
)  # fmt: skip
async def test_rest_bad_input_gets_its_status_and_one_sentence(
    server: Server, method: str, path: str, kwargs: dict, status: int, word: str
) -> None:
    got, _, body = await rest(server.web_port, method, path, **kwargs)
    assert got == status
    assert body["error"]["code"] == word
    assert body["error"]["message"] and "\n" not in body["error"]["message"]
    await wait_invariant(server, timeout=5)  # nothing held by a refused request


async def raw_exchange(port: int, data: bytes, until: bytes = b"") -> bytes:
    """Send ``data`` on a new connection; what comes back until ``until`` is in it (or the
    server closes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    answer = b""
    try:
        while not (until and until in answer):
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            if not chunk:
                break
            answer += chunk
    finally:
        writer.close()
    return answer


async def test_head_is_get_without_content_and_204_has_no_length(server: Server) -> None:
    """HEAD is answered as GET is, with its Content-Length and no content (RFC 9110 9.3.2),
    on the page and a session; a 204 carries no Content-Length (RFC 9110 8.6); the requests
    pipelined behind them are answered on the same connection."""
    session = await create_session(server.web_port, ["AAPL"])
    path = f"/v1/sessions/{session['session_id']}".encode()
    answer = await raw_exchange(
        server.web_port,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        + b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"
        + b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        + b"HEAD " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        + b"DELETE " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        + b"GET /v2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )  # fmt: skip
    answers = []
    while answer:
        head, _, answer = answer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = dict(line.split(b": ", 1) for line in lines[1:])
        length = int(headers.get(b"content-length", b"0"))
        method_got_content = not answers or len(answers) in (2, 5)  # the GETs
        content, answer = (
            (answer[:length], answer[length:]) if method_got_content else (b"", answer)
        )
        answers.append((int(lines[0].split()[1]), headers.get(b"content-length"), content))
    statuses = [status for status, _, _ in answers]
    assert statuses == [200, 200, 200, 200, 204, 404]
    (_, page_length, page), (_, head_length, nothing) = answers[0], answers[1]
    assert head_length == page_length == b"%d" % len(page) and nothing == b""
    (_, get_length, got), (_, head_length, _) = answers[2], answers[3]
    assert head_length == get_length == b"%d" % len(got)
    assert answers[4][1] is None  # the 204: no Content-Length
    await wait_invariant(server, timeout=5)


async def test_expect_100_continue_and_absolute_form_targets(server: Server) -> None:
    """A client that waits for 100 Continue before its body is told to go on (RFC 9110
    10.1.1) and gets its session; a request target in absolute form is routed by its path
    (RFC 9112 3.2.2)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.web_port)
    try:
        body = json.dumps({"tickers": ["AAPL"]}).encode()
        writer.write(
            b"POST http://pricestream/v1/sessions HTTP/1.1\r\nHost: pricestream\r\n"
            b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(body)
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert final.startswith(b"HTTP/1.1 201 ")
        length = int(final.split(b"content-length: ")[1].split(b"\r\n")[0])
        created = json.loads(await asyncio.wait_for(reader.readexactly(length), 5))
    finally:
        writer.close()
    await rest(server.web_port, "DELETE", f"/v1/sessions/{created['session_id']}")
    await wait_invariant(server, timeout=5)


async def test_oversized_head_gets_431_and_malformed_http_400(server: Server) -> None:
    async def exchange(data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.web_port)
        writer.write(data)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return answer

    big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
    assert (await exchange(big)).startswith(b"HTTP/1.1 431 ")
    assert (await exchange(b"NONSENSE\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    assert (await exchange(b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 400 ")  # no Host
    # The server is unharmed.
    assert (await rest(server.web_port, "GET", "/v1/sessions/AAAAAAAAAAAAAAAAAAAAAA"))[0] == 404


async def test_slow_request_head_is_cut_off(redis) -> None:
    """A client that never finishes its request head is dropped (slowloris)."""
    async with ready_server(fast_settings(redis.url)) as server:
        server._web.limits = type(server._web.limits)(head_timeout=0.3)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.web_port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        writer.close()


# --- WebSocket --------------------------------------------------------------------------


async def test_websocket_snapshot_then_prices_in_proto3_json(server: Server, redis) -> None:
    market = Market(redis.url, ["AAPL", "MSFT"])
    await market.tick("AAPL", "MSFT")
    session = await create_session(server.web_port, ["AAPL", "MSFT"])
    async with websockets.connect(session["stream_url"], subprotocols=[SUBPROTOCOL]) as ws:
        assert ws.subprotocol == SUBPROTOCOL
        snapshot = await recv_json(ws)
        assert snapshot["type"] == "snapshot" and snapshot["seq"] == 1
        assert sorted(u["ticker"] for u in snapshot["updates"]) == ["AAPL", "MSFT"]
        for update in snapshot["updates"]:
            assert isinstance(update["publishedAtUnixNanos"], str)  # 64-bit: a string
            assert isinstance(update["sequence"], str)
            parsed = json_format.ParseDict(update, pb.PriceUpdate())
            assert parsed.sequence == 1 and parsed.price > 0
        await market.tick("MSFT")
        prices = await recv_json(ws)
        assert prices["type"] == "prices" and prices["seq"] == 2
        assert [(u["ticker"], u["sequence"]) for u in prices["updates"]] == [("MSFT", "2")]
        _, _, got = await rest(server.web_port, "GET", f"/v1/sessions/{session['session_id']}")
        assert got["streaming"] is True
        # The client's own data frames are ignored; the stream goes on.
        await ws.send("hello")
        await market.tick("AAPL")
        assert (await recv_json(ws))["seq"] == 3
    await market.aclose()
    values = await wait_invariant(server, timeout=5)
    assert values["pricestream_ws_connections_opened_total"] == 1


async def test_subprotocols_offered_on_several_header_lines(server: Server) -> None:
    """A list header may come on several lines (RFC 9110 section 5.3): the subprotocol is
    found on any of them."""
    session = await create_session(server.web_port, ["AAPL"])
    path = f"/v1/sessions/{session['session_id']}/ws"
    ws = await in_thread(
        lambda: RawWebSocket(server.web_port, path, protocols=("chat", SUBPROTOCOL))
    )
    try:
        assert ws.status == 101
        assert ws.headers[b"sec-websocket-protocol"] == SUBPROTOCOL.encode()
        opcode, payload = await in_thread(ws.read_frame)
        assert opcode == 0x1 and json.loads(payload)["type"] == "snapshot"
    finally:
        ws.close()
    await wait_invariant(server, timeout=5)


async def test_invalid_handshakes_are_answered_with_why_and_counted(server: Server) -> None:
    """An upgrade the transport finds invalid is answered by the application, so it is counted
    like every refused handshake (``bad_request``) and as a request of the ``ws`` route."""
    path = b"/v1/sessions/AAAAAAAAAAAAAAAAAAAAAA/ws"
    head = (
        b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    )
    version_8 = await raw_exchange(
        server.web_port, head + b"Sec-WebSocket-Version: 8\r\n\r\n", b"}}"
    )
    assert version_8.startswith(b"HTTP/1.1 426 ")
    assert b"\r\nupgrade: websocket\r\n" in version_8.lower()
    assert b"Sec-WebSocket-Version must be 13" in version_8
    bad_key = await raw_exchange(
        server.web_port,
        head.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"abc") + b"Sec-WebSocket-Version: 13\r\n\r\n",
        b"}}",
    )
    assert bad_key.startswith(b"HTTP/1.1 400 ") and b'"bad_handshake"' in bad_key
    exposition = read_metrics(server)
    assert (
        'pricestream_web_handshakes_refused_total{reason="bad_request",transport="ws"} 2.0'
        in exposition
    )
    assert 'pricestream_http_requests_total{route="ws",status="426"} 1.0' in exposition
    assert 'pricestream_http_requests_total{route="ws",status="400"} 1.0' in exposition


def upload_too_much(port: int, size: int = 1 << 20) -> tuple[bytes, str]:
    """POST a body far over the limit and send all of it, as a client that does not look
    for an early answer does; then read. What was received, and the error that ended the
    exchange (empty if none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % size
        )
        received = b""
        try:
            for _ in range(size // 65536):
                sock.sendall(b"x" * 65536)
            while chunk := sock.recv(65536):
                received += chunk
        except OSError as exc:
            return received, repr(exc)
        return received, ""


async def test_a_refused_upload_gets_its_413_not_a_reset(server: Server) -> None:
    """The server answers 413 at the head and closes while the client is still sending its
    body. Closing with input unread makes the kernel answer with a reset, which destroys the
    413 before the client reads it; the server sends its FIN and drops the rest instead."""
    received, error = await in_thread(upload_too_much, server.web_port)
    assert error == ""
    assert received.startswith(b"HTTP/1.1 413 "), received[:100]
    assert b'"request body is too large"' in received


async def test_a_websocket_failed_by_frames_sent_with_its_upgrade_claims_nothing(
    server: Server,
) -> None:
    """An unmasked frame in the same packet as the upgrade request: the socket is failed
    (1002) as it is accepted, and its handler stops there instead of claiming the session
    for a socket that is gone."""
    session = await create_session(server.web_port, ["AAPL"])
    path = f"/v1/sessions/{session['session_id']}/ws"
    key = "dGhlIHNhbXBsZSBub25jZQ=="

    def upgrade_with_a_bad_frame() -> tuple[bytes, str]:
        with socket.create_connection(("127.0.0.1", server.web_port), timeout=5) as sock:
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: pricestream.v1.json\r\n"
                "\r\n".encode()
                + b"\x81\x05hello"  # FIN + text, not masked
            )
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            return received, ""

    received, _ = await in_thread(upgrade_with_a_bad_frame)
    assert received.startswith(b"HTTP/1.1 101 ")
    assert received.endswith(b"\x88\x10\x03\xeaprotocol error")  # close frame: 1002
    status, _, _ = await rest(server.web_port, "DELETE", f"/v1/sessions/{session['session_id']}")
    assert status == 204  # still there, never claimed
    values = await wait_invariant(server, timeout=5)
    assert values.get("pricestream_streams_opened_total", 0) == 0
    assert values.get("pricestream_streams_closed_total", 0) == 0  # not even "rejected"
    exposition = read_metrics(server)
    assert 'pricestream_ws_connections_closed_total{code="1002"} 1.0' in exposition


async def test_a_close_code_of_the_clients_own_is_counted_as_other(server: Server) -> None:
    """A client may close with any code of 3000-4999; each would be a series of its own in
    ``closed_total{code}``, so the ones the server does not give are counted as "other"."""
    # Exported at 0 from the start, so the first such close is an increase in Prometheus.
    assert 'pricestream_ws_connections_closed_total{code="other"} 0.0' in read_metrics(server)
    session = await create_session(server.web_port, ["AAPL"])
    async with websockets.connect(session["stream_url"], subprotocols=[SUBPROTOCOL]) as ws:
        await recv_json(ws)
        await ws.close(code=4321, reason="mine")
    await wait_invariant(server, timeout=5)
    exposition = read_metrics(server)
    assert 'pricestream_ws_connections_closed_total{code="other"} 1.0' in exposition
    assert 'code="4321"' not in exposition


async def test_empty_snapshot_when_no_price_is_known(server: Server) -> None:
    session = await create_session(server.web_port, ["NOPRICE"])
    async with websockets.connect(session["stream_url"], subprotocols=[SUBPROTOCOL]) as ws:
        assert await recv_json(ws) == {"type": "snapshot", "seq": 1, "updates": []}


async def test_a_session_streams_over_either_transport(
    server: Server, stub: PriceStreamServiceStub, redis
) -> None:
    market = Market(redis.url, ["AAPL"])
    await market.tick("AAPL")
    # Created over gRPC, streamed over WebSocket.
    created = await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL"]))
    async with websockets.connect(
        ws_url(server, created.session_id), subprotocols=[SUBPROTOCOL]
    ) as ws:
        assert (await recv_json(ws))["updates"][0]["ticker"] == "AAPL"
    # Created over REST, streamed over gRPC.
    session = await create_session(server.web_port, ["AAPL"])
    call = stub.StreamPriceUpdates(pb.StreamPriceUpdatesRequest(session_id=session["session_id"]))
    assert [u.ticker for u in (await next_batch(call)).updates] == ["AAPL"]
    # One stream per session, whichever the transport: the socket is refused with 4009.
    async with websockets.connect(
        ws_url(server, session["session_id"]), subprotocols=[SUBPROTOCOL]
    ) as ws:
        assert await closed_with(ws) == 4009
    call.cancel()
    await market.aclose()
    await wait_invariant(server, timeout=5)


async def test_delete_closes_the_socket_with_1000(
    server: Server, stub: PriceStreamServiceStub
) -> None:
    for close in ("rest", "grpc"):
        session = await create_session(server.web_port, ["AAPL"])
        async with websockets.connect(session["stream_url"], subprotocols=[SUBPROTOCOL]) as ws:
            await recv_json(ws)
            if close == "rest":
                status, _, _ = await rest(
                    server.web_port, "DELETE", f"/v1/sessions/{session['session_id']}"
                )
                assert status == 204
            else:
                await stub.CloseSession(pb.CloseSessionRequest(session_id=session["session_id"]))
            assert await closed_with(ws) == 1000
            assert ws.close_reason == "session closed"
    values = await wait_invariant(server, timeout=5)
    assert values["pricestream_ws_connections_closed_total"] == 2


async def test_unknown_session_closes_4004(server: Server) -> None:
    for session_id in ("AAAAAAAAAAAAAAAAAAAAAA", "not-a-session-id"):
        async with websockets.connect(ws_url(server, session_id), subprotocols=[SUBPROTOCOL]) as ws:
            assert await closed_with(ws) == 4004
    assert metric(server, "pricestream_web_handshakes_refused_total") == 2
    await wait_invariant(server, timeout=5)


async def test_pod_at_its_limit_closes_1013(redis) -> None:
    async with ready_server(fast_settings(redis.url)) as other:
        async with ready_server(fast_settings(redis.url, max_sessions=1)) as full:
            held = await create_session(full.web_port, ["AAPL"])  # the pod's one slot
            status, headers, body = await rest(
                full.web_port, "POST", "/v1/sessions", {"tickers": ["AAPL"]}
            )
            assert status == 503 and headers["Retry-After"] == "1"
            assert body["error"]["code"] == "pod_full"
            elsewhere = await create_session(other.web_port, ["MSFT"])
            async with websockets.connect(
                ws_url(full, elsewhere["session_id"]), subprotocols=[SUBPROTOCOL]
            ) as ws:
                assert await closed_with(ws) == 1013
            async with websockets.connect(held["stream_url"], subprotocols=[SUBPROTOCOL]) as ws:
                assert (await recv_json(ws))["type"] == "snapshot"


async def test_new_streams_are_admitted_at_a_bounded_rate(redis) -> None:
    settings = fast_settings(redis.url, web_accept_rate=0.1, web_accept_burst=2)
    async with ready_server(settings) as server:
        codes = []
        for _ in range(3):
            session = await create_session(server.web_port, ["AAPL"])
            async with websockets.connect(session["stream_url"], subprotocols=[SUBPROTOCOL]) as ws:
                try:
                    await recv_json(ws, timeout=2)
                    codes.append("streamed")
                except websockets.ConnectionClosed:
                    codes.append(ws.close_code)
        assert codes == ["streamed", "streamed", 1013]
        status, headers, body = await rest(server.web_port, "GET", "/v1/sessions/x/events")
        assert (status, headers.get("Retry-After"), body["error"]["code"]) == (
            503,
            "1",
            "rate_limited",
        )


async def create_from(port: int, *forwarded_for: str) -> tuple[int, bytes, dict]:
    """POST /v1/sessions as a proxy sends it: one X-Forwarded-For line per value; (status,
    lower-cased head, body)."""
    body = b'{"tickers": ["AAPL"]}'
    lines = b"".join(b"X-Forwarded-For: %s\r\n" % value.encode() for value in forwarded_for)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
        % (lines, len(body), body)
    )
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head.lower(), json.loads(payload)


def refused_for(client: str, rate: float) -> str:
    return f"too many sessions created from {client}: at most {rate:g} per second; retry later"


async def spend_burst(port: int, client: str, burst: int) -> list[str]:
    """Create ``burst`` sessions as ``client`` (named in X-Forwarded-For), each answered 201;
    their ids."""
    made = []
    for _ in range(burst):
        status, _, body = await create_from(port, client)
        assert status == 201, body
        made.append(body["session_id"])
    return made


async def delete_all(server: Server, made: list[str]) -> None:
    """DELETE each session (204), then the invariant holds."""
    for session_id in made:
        assert (await rest(server.web_port, "DELETE", f"/v1/sessions/{session_id}"))[0] == 204
    await wait_invariant(server, timeout=5)


CLIENT_A, CLIENT_B = "198.51.100.1", "2001:db8::b"


@pytest.mark.parametrize("host", ["127.0.0.1", "::ffff:127.0.0.1"])
async def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_create_bucket(
    redis, host: str
) -> None:
    """The test client plays the proxy (127.0.0.1, trusted): the clients it names in
    X-Forwarded-For are limited one by one, not all together as the proxy's own IP. On
    ``::ffff:127.0.0.1`` the port sees its IPv4 peers as a dual-stack socket does (the
    chart's ``[::]``): still 127.0.0.1 to ``trusted_proxies``."""
    if ":" in host:
        try:
            socket.socket(socket.AF_INET6).close()
        except OSError:
            pytest.skip("no IPv6 sockets here")
    settings = fast_settings(
        redis.url,
        web_host=host,
        session_create_rate=0.1,
        session_create_burst=2,
        trusted_proxies="127.0.0.1",
    )
    async with ready_server(settings) as server:
        port = server.web_port
        made = await spend_burst(port, CLIENT_A, 2)
        status, head, body = await create_from(port, CLIENT_A)
        assert (status, body["error"]["code"]) == (429, "rate_limited")
        assert b"\r\nretry-after: 1" in head
        assert body["error"]["message"] == refused_for(CLIENT_A, 0.1)
        # Whatever client A writes left of its own address (the proxy appends the one it
        # saw) is not read: on the same line, or on lines of their own (all lines count).
        for forwarded in ([f"203.0.113.50, {CLIENT_A}"], ["203.0.113.50", CLIENT_A]):
            status, _, body = await create_from(port, *forwarded)
            assert status == 429 and body["error"]["message"] == refused_for(CLIENT_A, 0.1)
        # Client B behind the same proxy has a bucket of its own, through a chain of proxies
        # too; so has the proxy itself, calling without the header.
        for forwarded in ([CLIENT_B], [f"[{CLIENT_B}]:4711, 127.0.0.1"], []):
            status, _, body = await create_from(port, *forwarded)
            assert status == 201, body
            made.append(body["session_id"])
        status, _, body = await create_from(port, f"{CLIENT_B.upper()}, 127.0.0.1")
        assert status == 429 and body["error"]["message"] == refused_for(CLIENT_B, 0.1)
        await delete_all(server, made)


async def test_without_trusted_proxies_x_forwarded_for_is_ignored(redis) -> None:
    """The default: the limit applies to the TCP peer, whatever the request says."""
    settings = fast_settings(redis.url, session_create_rate=0.1, session_create_burst=2)
    async with ready_server(settings) as server:
        port = server.web_port
        made = await spend_burst(port, CLIENT_A, 2)
        status, _, body = await create_from(port, CLIENT_B)
        assert status == 429 and body["error"]["message"] == refused_for("127.0.0.1", 0.1)
        await delete_all(server, made)


async def test_client_frames_over_4k_close_1009_and_ping_floods_1008(server: Server) -> None:
    session = await create_session(server.web_port, ["AAPL"])
    ws = await in_thread(RawWebSocket, server.web_port, f"/v1/sessions/{session['session_id']}/ws")
    assert ws.status == 101
    assert (await in_thread(ws.read_frame))[0] == 0x1  # the snapshot: the stream is up
    ws.send_frame(0x1, b"x" * 3000, fin=False)  # one message in two frames: 6,000 bytes
    ws.send_frame(0x0, b"y" * 3000)
    assert (await in_thread(ws.read_until_close))[0] == 1009
    ws.close()

    session = await create_session(server.web_port, ["AAPL"])
    ws = await in_thread(RawWebSocket, server.web_port, f"/v1/sessions/{session['session_id']}/ws")
    assert (await in_thread(ws.read_frame))[0] == 0x1
    for _ in range(50):
        ws.send_frame(0x9, b"p")
    pongs = 0
    while True:
        opcode, payload = await in_thread(ws.read_frame)
        pongs += opcode == 0xA
        if opcode == 0x8:
            assert int.from_bytes(payload[:2]) == 1008
            break
    assert 1 <= pongs <= 11  # the burst answered, the flood cut off
    ws.close()
    await wait_invariant(server, timeout=5)


async def test_no_pong_closes_4001(redis) -> None:
    settings = fast_settings(redis.url, web_ping_interval=0.2, web_pong_timeout=0.3)
    async with ready_server(settings) as server:
        session = await create_session(server.web_port, ["AAPL"])
        path = f"/v1/sessions/{session['session_id']}/ws"
        ws = await in_thread(RawWebSocket, server.web_port, path)
        pings = 0
        while True:  # never answers a ping
            opcode, payload = await in_thread(ws.read_frame)
            pings += opcode == 0x9
            if opcode == 0x8:
                assert int.from_bytes(payload[:2]) == 4001
                break
        assert pings == 1
        ws.close()
        # A stock client answers the pings and keeps streaming past several of them.
        session = await create_session(server.web_port, ["AAPL"])
        async with websockets.connect(session["stream_url"], subprotocols=[SUBPROTOCOL]) as ok:
            await recv_json(ok)
            await asyncio.sleep(1.5)
            assert ok.close_code is None
        await wait_invariant(server, timeout=5)
        assert metric(server, "pricestream_ws_connections_closed_total") == 2


async def test_slow_consumer_is_cut_off_4008_and_others_keep_streaming(redis) -> None:
    tickers = [f"T{i}" for i in range(100)]
    settings = fast_settings(redis.url, stall_timeout=1.0)
    async with ready_server(settings) as server:
        # The kernel's send buffer of these sockets kept small, so the stall shows in seconds.
        server._web.limits = replace(server._web.limits, send_buffer_bytes=16384)
        market = Market(redis.url, tickers)
        slow = await create_session(server.web_port, tickers)
        fast = await create_session(server.web_port, tickers)
        # A client that reads nothing, on a small receive buffer.
        stalled = await in_thread(
            lambda: RawWebSocket(
                server.web_port, f"/v1/sessions/{slow['session_id']}/ws", rcvbuf=4096
            )
        )
        async with websockets.connect(fast["stream_url"], subprotocols=[SUBPROTOCOL]) as ws:
            frames = 0
            for _ in range(150):  # up to 7.5 s of ticks at 20 per second
                await market.tick(*tickers)
                while True:
                    try:
                        await asyncio.wait_for(ws.recv(), 0.01)
                        frames += 1
                    except TimeoutError:
                        break
                if metric(server, "pricestream_slow_consumer_disconnects_total"):
                    break
                await asyncio.sleep(0.04)
            assert metric(server, "pricestream_slow_consumer_disconnects_total") == 1
            assert frames >= 20  # the reader kept getting its batches meanwhile
            assert ws.close_code is None
        stalled.close()
        await market.aclose()
        values = await wait_invariant(server, timeout=5)
        exposition = read_metrics(server)
        assert 'pricestream_ws_connections_closed_total{code="4008"} 1.0' in exposition
        assert values["pricestream_streams_closed_total"] == 2


async def test_foreign_origins_are_refused_before_the_upgrade(redis) -> None:
    async with ready_server(fast_settings(redis.url)) as server:
        session = await create_session(server.web_port, ["AAPL"])
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(
                session["stream_url"], subprotocols=[SUBPROTOCOL], origin="http://evil.example"
            )
        assert refused.value.response.status_code == 403
        # The page's own host is allowed by default.
        own = f"http://127.0.0.1:{server.web_port}"
        async with websockets.connect(
            session["stream_url"], subprotocols=[SUBPROTOCOL], origin=own
        ) as ws:
            assert (await recv_json(ws))["type"] == "snapshot"
        status, _, body = await rest(
            server.web_port, "POST", "/v1/sessions", {"tickers": ["A"]},
            headers={"Origin": "http://evil.example"},
        )  # fmt: skip
        assert status == 403 and body["error"]["code"] == "forbidden_origin"
        assert metric(server, "pricestream_web_handshakes_refused_total") == 1

    settings = fast_settings(redis.url, web_allowed_origins="https://app.example.com")
    async with ready_server(settings) as server:
        status, headers, _ = await rest(
            server.web_port, "OPTIONS", "/v1/sessions",
            headers={"Origin": "https://app.example.com",
                     "Access-Control-Request-Method": "POST"},
        )  # fmt: skip
        assert status == 204
        assert headers["Access-Control-Allow-Origin"] == "https://app.example.com"
        assert "POST" in headers["Access-Control-Allow-Methods"]
        status, headers, _ = await rest(
            server.web_port, "POST", "/v1/sessions", {"tickers": ["A"]},
            headers={"Origin": "https://app.example.com"},
        )  # fmt: skip
        assert status == 201 and headers["Access-Control-Allow-Origin"] == "https://app.example.com"
        # Where the session is, and when to retry, are readable by the other origin's page.
        assert headers["Access-Control-Expose-Headers"] == "Location, Retry-After"


async def test_bearer_tokens_guard_rest_not_the_capability_urls(redis) -> None:
    async with ready_server(fast_settings(redis.url, auth_tokens="s3cret")) as server:
        status, headers, _ = await rest(server.web_port, "POST", "/v1/sessions", {"tickers": ["A"]})
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        status, _, session = await rest(
            server.web_port, "POST", "/v1/sessions", {"tickers": ["A"]},
            headers={"Authorization": "Bearer s3cret"},
        )  # fmt: skip
        assert status == 201
        async with websockets.connect(session["stream_url"], subprotocols=[SUBPROTOCOL]) as ws:
            assert (await recv_json(ws))["type"] == "snapshot"


# --- SSE --------------------------------------------------------------------------------


async def test_event_stream_snapshot_prices_close_and_fresh_snapshot_on_reconnect(
    server: Server, redis
) -> None:
    market = Market(redis.url, ["AAPL"])
    await market.tick("AAPL")
    session = await create_session(server.web_port, ["AAPL"])
    async with aiohttp.ClientSession() as http:
        async with http.get(session["events_url"]) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            events = SseReader(response)
            assert (await events.event()) == {"retry": "2000"}
            first = await events.event()
            assert first["id"] == "1" and json.loads(first["data"])["type"] == "snapshot"
            await market.tick("AAPL")
            second = await events.event()
            assert (
                second["id"] == "2" and json.loads(second["data"])["updates"][0]["sequence"] == "2"
            )
        # A reconnect, with Last-Event-ID, gets a fresh snapshot: prices are state.
        await wait_until(
            lambda: metric(server, "pricestream_sse_connections_active") == 0, 5, "first closed"
        )
        async with http.get(session["events_url"], headers={"Last-Event-ID": "2"}) as response:
            events = SseReader(response)
            await events.event()
            again = await events.event()
            assert again["id"] == "1" and json.loads(again["data"])["type"] == "snapshot"
            await rest(server.web_port, "DELETE", f"/v1/sessions/{session['session_id']}")
            closing = await events.event()
            assert closing["event"] == "close"
            assert json.loads(closing["data"])["code"] == 1000
            assert await asyncio.wait_for(response.content.read(), 5) == b""  # ended
        async with http.get(session["events_url"]) as response:
            assert response.status == 404
    await market.aclose()
    values = await wait_invariant(server, timeout=5)
    assert values["pricestream_sse_connections_opened_total"] == 2


async def test_the_session_limit_holds_when_streams_of_other_pods_sessions_claim_at_once(
    redis,
) -> None:
    """A reconnect storm brings sessions created on other pods to this one, all claiming at
    once: each holds a slot of ``max_sessions`` from before its claim, so exactly the limit
    get their snapshot and the rest are told 1013 (try later), instead of every claim
    passing the check that came before it. Claims are held in Redis for 300 ms here, so all
    five wait at once."""
    async with (
        ready_server(fast_settings(redis.url, pod_name="pod-a")) as pod_a,
        ready_server(fast_settings(redis.url, pod_name="pod-b", max_sessions=2)) as pod_b,
    ):
        sessions = [await create_session(pod_a.web_port, ["AAPL"]) for _ in range(5)]
        store = pod_b.engine.store
        real_claim = store.claim
        entered: list[str] = []

        async def slow_claim(session_id: str, owner: str) -> tuple[str, ...]:
            entered.append(session_id)
            await asyncio.sleep(0.3)
            return await real_claim(session_id, owner)

        store.claim = slow_claim

        async def stream(session_id: str) -> str:
            async with websockets.connect(
                ws_url(pod_b, session_id), subprotocols=[SUBPROTOCOL]
            ) as ws:
                try:
                    return (await recv_json(ws))["type"]
                except websockets.ConnectionClosed:
                    return str(ws.close_code)

        outcomes = await asyncio.gather(*(stream(s["session_id"]) for s in sessions))
        assert sorted(outcomes) == ["1013", "1013", "1013", "snapshot", "snapshot"]
        assert len(entered) == 2  # the refused ones never claimed
        await wait_invariant(pod_b, timeout=5)


async def test_a_session_deleted_while_its_stream_claims_it_on_another_pod_ends_at_once(
    redis,
) -> None:
    """The DELETE lands on pod A after pod B's claim took the lease, and its close notice
    reaches B before the claim's answer: B has no stream registered for it yet. B must still
    end the stream (1000) once it starts, not stream a closed session until its next lease
    refresh (20 s apart here, so only the notice can end it within the test)."""
    async with (
        ready_server(fast_settings(redis.url, pod_name="pod-a")) as pod_a,
        ready_server(fast_settings(redis.url, pod_name="pod-b", lease_ttl=60.0)) as pod_b,
    ):
        session = await create_session(pod_a.web_port, ["AAPL"])
        session_id = session["session_id"]
        store, engine = pod_b.engine.store, pod_b.engine
        real_claim, real_on_closed = store.claim, engine.on_closed
        noticed = asyncio.Event()

        def on_closed(closed_id: str) -> None:
            real_on_closed(closed_id)
            if closed_id == session_id:
                noticed.set()

        async def claim_then_delete(claimed_id: str, owner: str) -> tuple[str, ...]:
            tickers = await real_claim(claimed_id, owner)
            await rest(pod_a.web_port, "DELETE", f"/v1/sessions/{claimed_id}")
            await asyncio.wait_for(noticed.wait(), 5)
            return tickers

        engine.on_closed = on_closed
        store.claim = claim_then_delete
        async with websockets.connect(ws_url(pod_b, session_id), subprotocols=[SUBPROTOCOL]) as ws:
            assert await closed_with(ws) == 1000
            assert ws.close_reason == "session closed"
        values = await wait_invariant(pod_b, timeout=5)
        assert values["pricestream_sessions_active"] == 0
        assert 'pricestream_streams_closed_total{reason="closed"} 1.0' in read_metrics(pod_b)


async def test_a_pending_session_whose_stream_is_claiming_it_keeps_its_slot(redis) -> None:
    """A session created here is pending until its stream claims it, and a pending session
    whose TTL passes is ended. One whose stream's claim is still waiting for Redis must not
    be: the stream holds no slot of its own (it takes the session's), so the slot would go to
    another session and the stream would then take the pod past ``max_sessions``."""
    settings = fast_settings(redis.url, max_sessions=1, session_ttl=1.0)
    async with ready_server(settings) as server:
        session = await create_session(server.web_port, ["AAPL"])
        store = server.engine.store
        real_claim = store.claim
        claimed = asyncio.Event()

        async def slow_claim(session_id: str, owner: str) -> tuple[str, ...]:
            tickers = await real_claim(session_id, owner)
            claimed.set()
            await asyncio.sleep(2.0)  # past the pending TTL and a maintenance pass or more
            return tickers

        store.claim = slow_claim
        async with websockets.connect(
            ws_url(server, session["session_id"]), subprotocols=[SUBPROTOCOL]
        ) as ws:
            await asyncio.wait_for(claimed.wait(), 5)
            await asyncio.sleep(1.5)
            status, _, body = await rest(
                server.web_port, "POST", "/v1/sessions", {"tickers": ["MSFT"]}
            )
            assert (status, body["error"]["code"]) == (503, "pod_full")
            assert (await recv_json(ws))["type"] == "snapshot"
            assert metric(server, "pricestream_sessions_active") == 1
        values = await wait_invariant(server, timeout=5)
        assert values["pricestream_sessions_opened_total"] == 1


async def test_a_pending_session_deleted_while_its_stream_claims_it_keeps_its_slot(
    redis,
) -> None:
    """The same race on the pod that created the session: it is pending here, its stream
    takes its slot, and a DELETE during the claim must neither free that slot for another
    session (the stream would then take the pod past ``max_sessions``) nor open the session
    a second time; the stream ends 1000 once its claim returns."""
    settings = fast_settings(redis.url, max_sessions=1)
    async with ready_server(settings) as server:
        session = await create_session(server.web_port, ["AAPL"])
        store = server.engine.store
        real_claim = store.claim
        during: list[tuple[int, int]] = []

        async def claim_then_delete(claimed_id: str, owner: str) -> tuple[str, ...]:
            tickers = await real_claim(claimed_id, owner)
            deleted, _, _ = await rest(server.web_port, "DELETE", f"/v1/sessions/{claimed_id}")
            created, _, _ = await rest(server.web_port, "POST", "/v1/sessions", {"tickers": ["A"]})
            during.append((deleted, created))
            return tickers

        store.claim = claim_then_delete
        async with websockets.connect(
            ws_url(server, session["session_id"]), subprotocols=[SUBPROTOCOL]
        ) as ws:
            assert await closed_with(ws) == 1000
        assert during == [(204, 503)]  # the slot was still the claiming stream's
        values = await wait_invariant(server, timeout=5)
        assert values["pricestream_sessions_opened_total"] == 1
        assert 'pricestream_sessions_closed_total{reason="closed"} 1.0' in read_metrics(server)
        store.claim = real_claim
        assert (await rest(server.web_port, "POST", "/v1/sessions", {"tickers": ["A"]}))[0] == 201


# --- drain and the fault switch ---------------------------------------------------------


async def test_drain_closes_sockets_1001_spread_over_the_window(redis) -> None:
    settings = fast_settings(redis.url, web_drain_window=1.0)
    async with ready_server(settings) as server:
        sockets = []
        for _ in range(6):
            session = await create_session(server.web_port, ["AAPL"])
            ws = await websockets.connect(session["stream_url"], subprotocols=[SUBPROTOCOL])
            await recv_json(ws)
            sockets.append(ws)
        loop = asyncio.get_running_loop()
        started = loop.time()
        drain = asyncio.create_task(server.drain())

        async def close_time(ws: websockets.ClientConnection) -> float:
            assert await closed_with(ws) == 1001
            return loop.time() - started

        closed_at = await asyncio.gather(*(close_time(ws) for ws in sockets))
        await drain
        assert max(closed_at) <= 2.0
        assert len({round(t, 2) for t in closed_at}) > 1  # not all at one instant
        # New sockets are refused while draining: 1001, reconnect elsewhere.
        async with websockets.connect(
            ws_url(server, "AAAAAAAAAAAAAAAAAAAAAA"), subprotocols=[SUBPROTOCOL]
        ) as ws:
            assert await closed_with(ws) == 1001
            assert ws.close_reason == DRAINING_MESSAGE  # refused, as after its claim
        assert server.engine.ready is False


async def test_fault_skip_cleanup_on_ws_close_leaks_the_session(redis) -> None:
    """The original system's bug, on purpose: the socket's close skips the session cleanup;
    the counters at the socket boundary stay right, so the drift shows."""
    settings = fast_settings(redis.url, faults="skip_cleanup_on_ws_close")
    async with ready_server(settings) as server:
        session = await create_session(server.web_port, ["AAPL"])
        async with websockets.connect(session["stream_url"], subprotocols=[SUBPROTOCOL]) as ws:
            await recv_json(ws)
        await wait_until(
            lambda: metric(server, "pricestream_ws_connections_active") == 0, 5, "socket closed"
        )
        await asyncio.sleep(0.5)
        values = samples(read_metrics(server))
        assert values["pricestream_ws_connections_active"] == 0
        assert values["pricestream_streams_active"] == 0
        assert values["pricestream_sessions_active"] == 1  # leaked
        assert values["pricestream_pubsub_subscriptions_active"] == 1  # leaked


async def test_grpc_streams_unchanged_beside_browsers(
    server: Server, stub: PriceStreamServiceStub, redis
) -> None:
    """A browser and a gRPC client on the same ticker each get every update in their form."""
    market = Market(redis.url, ["AAPL"])
    grpc_session = await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL"]))
    call = stub.StreamPriceUpdates(pb.StreamPriceUpdatesRequest(session_id=grpc_session.session_id))
    web_session = await create_session(server.web_port, ["AAPL"])
    async with websockets.connect(web_session["stream_url"], subprotocols=[SUBPROTOCOL]) as ws:
        await recv_json(ws)
        for expected in (1, 2, 3):
            await market.tick("AAPL")
            batch = await next_batch(call)
            frame = await recv_json(ws)
            while frame["updates"] == []:
                frame = await recv_json(ws)
            assert batch.updates[-1].sequence == expected
            assert frame["updates"][-1]["sequence"] == str(expected)
    call.cancel()
    assert await call.code() == grpc.StatusCode.CANCELLED
    await market.aclose()
    await wait_invariant(server, timeout=5)
