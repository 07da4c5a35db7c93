"""The browser API on the web port: REST sessions, WebSocket and SSE price streams, the page.

Routes (docs/browser.md has the contract and what a client does on each close code):

- ``GET /``: the live page (one static file, nothing fetched from elsewhere);
- ``POST /v1/sessions`` ``{"tickers": [...]}`` -> 201 with the session and its stream URLs;
- ``GET`` / ``DELETE /v1/sessions/{id}`` -> 200 / 204, or 404;
- ``GET /v1/sessions/{id}/ws``: a WebSocket (subprotocol ``pricestream.v1.json``);
- ``GET /v1/sessions/{id}/events``: the same stream as Server-Sent Events.

Sessions, leases, limits and metrics are the gRPC API's own (``SessionOps``,
``StreamLifecycle``): a session created here streams over gRPC and the other way round.
The session id (128 random bits) is the stream URLs' capability; with bearer tokens
configured the REST calls need one. Browsers' origins are checked against an allow-list
(default: the page's own host) before an upgrade and on REST (CORS).
"""

from __future__ import annotations

import asyncio
import datetime
import hmac
import json
import logging
import random
from collections.abc import Callable, Sequence
from importlib import resources

import grpc
from redis.exceptions import RedisError

from pricestream.api.rate_limit import client_address
from pricestream.api.sessions import SessionOps
from pricestream.engine.engine import Engine
from pricestream.engine.flush import BatchSink, StreamWriter
from pricestream.engine.sessions import SessionInfo
from pricestream.engine.stream import StreamLifecycle
from pricestream.errors import (
    DRAINING_MESSAGE,
    SHUTDOWN_MESSAGE,
    RequestError,
    backend_unavailable,
)
from pricestream.observability.web_metrics import StreamKind, WebMetrics
from pricestream.settings import Settings, allowed_origins, proxy_networks
from pricestream.transport.budget import Budget
from pricestream.transport.web.connection import WebConnection
from pricestream.transport.web.http import Headers, Request, Response
from pricestream.transport.web.sinks import StreamSink
from pricestream.validation import check_session_id

log = logging.getLogger("pricestream.web")

SUBPROTOCOL = "pricestream.v1.json"
_PAGE_CSP = (
    b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    b"connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"
)

# Why a stream the server ended ended -> (close code, reason). SSE streams end with an
# ``event: close`` carrying the same code.
END_CODES: dict[str, tuple[int, str]] = {
    "closed": (1000, "session closed"),
    "shutdown": (1001, "server is going away; reconnect"),
    "max_connection_age": (1001, "server is going away; reconnect"),
    "redis_unavailable": (1013, "prices are unavailable; try again later"),
    "slow_consumer": (4008, "slow consumer: the client did not read its prices"),
    "session_lost": (4009, "the session is streaming elsewhere"),
    "send_error": (1011, "internal error: a batch was over the send limit"),
}

# A refused stream: (WebSocket close code, HTTP status for SSE, metric reason).
_REFUSALS: dict[str, tuple[int, int, str]] = {
    "not_found": (4004, 404, "unknown_session"),
    "invalid_argument": (4004, 404, "unknown_session"),
    "failed_precondition": (4009, 409, "busy"),
    "pod_full": (1013, 503, "limit"),
    "overloaded": (1013, 503, "overloaded"),
    "rate_limited": (1013, 503, "rate"),
    "draining": (1001, 503, "draining"),
    "backend": (1013, 503, "backend"),
}


def _rfc3339(unix_seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(unix_seconds, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def error_response(exc: RequestError) -> Response:
    """A RequestError as its HTTP status, ``{"error": {"code", "message"}}`` and, where a
    retry helps, ``Retry-After``."""
    code = exc.code
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return Response.error(400, "invalid_argument", exc.message)
    if code == grpc.StatusCode.NOT_FOUND:
        return Response.error(404, "not_found", exc.message)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return Response.error(409, "conflict", exc.message)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Response.error(
            401, "unauthenticated", exc.message, [(b"www-authenticate", b"Bearer")]
        )
    if exc.refusal == "rate_limited":
        return Response.error(429, "rate_limited", exc.message, [(b"retry-after", b"1")])
    if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
        word = exc.refusal or "unavailable"
        retry = b"2" if word == "backend" else b"1"
        return Response.error(503, word, exc.message, [(b"retry-after", retry)])
    return Response.error(500, "internal", exc.message)


def _refusal_key(exc: RequestError) -> str:
    if exc.refusal:
        return exc.refusal
    return {
        grpc.StatusCode.NOT_FOUND: "not_found",
        grpc.StatusCode.INVALID_ARGUMENT: "invalid_argument",
        grpc.StatusCode.FAILED_PRECONDITION: "failed_precondition",
    }.get(exc.code, "backend")


class _WebStreamContext:
    """A browser stream's side of ``StreamLifecycle`` (its ``StreamContext``): the sink is made
    only once the session is claimed, so an SSE response's head is written after the claim
    and a refusal can still be an HTTP status.

    The connection tells it when the stream is over (``client_gone``): the lifecycle's
    ``on_terminate`` then stops the stream, at once if that came first. Its task is cancelled
    too, but a cancel lost in a Redis call before its first batch (Python 3.11's ``wait_for``)
    left the stream registered on a closed socket, its session held for good."""

    def __init__(self, make_sink: Callable[[], StreamSink]) -> None:
        self._make_sink = make_sink
        self.sink: StreamSink | None = None
        self._gone = False
        self._on_terminate: Callable[[grpc.StatusCode, str, str], None] | None = None

    def time_remaining(self) -> float | None:
        return None

    def batch_sink(self) -> BatchSink:
        self.sink = self._make_sink()
        return self.sink

    def connection_gone(self) -> None:
        """The client's side of the stream is over (``WebConnection.on_stream_end``)."""
        self._gone = True
        if self._on_terminate is not None:
            self._on_terminate(grpc.StatusCode.CANCELLED, "the client went away", "client_gone")

    def on_terminate(self, callback: Callable[[grpc.StatusCode, str, str], None]) -> None:
        """How the stream is stopped once its client is gone (the server stops browser
        streams through their writers: ``WebApi.drain``)."""
        self._on_terminate = callback
        if self._gone:
            self.connection_gone()

    def set_code(self, code: grpc.StatusCode) -> None:
        """A browser stream's end is its close code, set by ``WebApi``."""

    def set_details(self, details: str) -> None:
        """See ``set_code``."""

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        """See ``set_code``."""


class WebApi:
    """The ``WebApplication`` of the web port."""

    def __init__(
        self,
        engine: Engine,
        sessions: SessionOps,
        metrics: WebMetrics,
        settings: Settings,
        tokens: Sequence[bytes] = (),
    ) -> None:
        self._engine = engine
        self._sessions = sessions
        self._metrics = metrics
        self._tokens = list(tokens)
        self._origins = allowed_origins(settings.web_allowed_origins)
        self._trusted_proxies = proxy_networks(settings.trusted_proxies)
        rate = settings.web_accept_rate
        self._admission = Budget(settings.web_accept_burst, rate) if rate > 0 else None
        self._streams: dict[StreamWriter, WebConnection] = {}  # live browser streams
        self._page = resources.files("pricestream.api").joinpath("static/index.html").read_bytes()

    # --- routing ------------------------------------------------------------------------------

    async def handle(self, request: Request, exchange: WebConnection) -> None:
        parts = request.segments
        route, response = "other", None
        if request.path == "/":
            route = "page"
            response = self._page_response(request)
        elif len(parts) >= 3 and parts[1] == "v1" and parts[2] == "sessions":
            if len(parts) == 3:
                route = "sessions"
                response = await self._sessions_collection(request)
            elif len(parts) == 4:
                route = "session"
                response = await self._session(request, parts[3])
            if response is not None:
                # A session's state changes by the second, and its answers differ by Origin:
                # no cache keeps them (so none serves one origin's answer to another).
                response.headers.append((b"cache-control", b"no-store"))
            elif len(parts) == 5 and parts[4] == "ws":
                await self._websocket(request, exchange, parts[3])
                return
            elif len(parts) == 5 and parts[4] == "events":
                await self._event_stream(request, exchange, parts[3])
                return
        if response is None:
            response = Response.error(404, "not_found", f"no such resource: {request.shown_path}")
        self._metrics.request(route, response.status)
        exchange.respond(response)

    def _page_response(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return _not_allowed("GET, HEAD")
        return Response(
            200,
            self._page,  # not sent for a HEAD, but its length is
            b"text/html; charset=utf-8",
            [
                (b"cache-control", b"no-cache"),
                (b"content-security-policy", _PAGE_CSP),
                (b"x-content-type-options", b"nosniff"),
            ],
        )

    # --- REST ---------------------------------------------------------------------------------

    async def _sessions_collection(self, request: Request) -> Response:
        allowed, cors = self._cors(request)
        if not allowed:
            return self._foreign_origin()
        if request.method == "OPTIONS":
            return _preflight(cors, "POST, OPTIONS")
        if request.method != "POST":
            return _not_allowed("POST, OPTIONS", cors)
        response = self._authenticate(request)
        if response is None:
            response = await self._create(request)
        response.headers += cors
        return response

    async def _session(self, request: Request, session_id: str) -> Response:
        allowed, cors = self._cors(request)
        if not allowed:
            return self._foreign_origin()
        if request.method == "OPTIONS":
            return _preflight(cors, "GET, HEAD, DELETE, OPTIONS")
        if request.method not in ("GET", "HEAD", "DELETE"):
            return _not_allowed("GET, HEAD, DELETE, OPTIONS", cors)
        response = self._authenticate(request)
        if response is None:
            try:
                if request.method != "DELETE":  # GET, or HEAD: the same answer without content
                    info = await self._sessions.get(session_id)
                    response = Response.json(200, self._describe(request, info))
                else:
                    await self._sessions.close(session_id)
                    response = Response.empty(204)
            except RequestError as exc:
                if exc.code == grpc.StatusCode.INVALID_ARGUMENT:  # a malformed id: none such
                    response = Response.error(404, "not_found", exc.message)
                else:
                    response = error_response(exc)
            except (RedisError, OSError, TimeoutError) as exc:
                response = _redis_down(exc)
        response.headers += cors
        return response

    async def _create(self, request: Request) -> Response:
        content_type = (request.header(b"content-type") or b"").split(b";")[0].strip().lower()
        if content_type != b"application/json":
            return Response.error(
                415, "unsupported_media_type", "send the session as Content-Type: application/json"
            )
        tickers = _tickers_of(request.body)
        if isinstance(tickers, Response):
            return tickers
        try:
            info = await self._sessions.create(tickers, self._client(request))
        except RequestError as exc:
            return error_response(exc)
        except (RedisError, OSError, TimeoutError) as exc:
            return _redis_down(exc)
        body = self._describe(request, info)
        location = f"/v1/sessions/{info.session_id}".encode()
        return Response.json(201, body, [(b"location", location)])

    def _client(self, request: Request) -> str:
        """The client's IP address: the peer's, or the one trusted proxies forwarded for
        (every ``X-Forwarded-For`` line of the request)."""
        if not self._trusted_proxies:
            return request.peer
        forwarded = [
            value.decode("latin-1") for key, value in request.headers if key == b"x-forwarded-for"
        ]
        return client_address(request.peer, forwarded, self._trusted_proxies)

    def _describe(self, request: Request, info: SessionInfo) -> dict[str, object]:
        http_base, ws_base = _bases(request)
        path = f"/v1/sessions/{info.session_id}"
        return {
            "session_id": info.session_id,
            "tickers": list(info.tickers),
            "expires_at": _rfc3339(info.expires_at),
            "streaming": info.streaming,
            "stream_url": f"{ws_base}{path}/ws",
            "events_url": f"{http_base}{path}/events",
        }

    def _authenticate(self, request: Request) -> Response | None:
        """None when the request may go on; the 401 otherwise (tokens configured only)."""
        if not self._tokens:
            return None
        scheme, _, token = (request.header(b"authorization") or b"").partition(b" ")
        presented = token.strip() if scheme.lower() == b"bearer" else b""
        found = False
        for known in self._tokens:  # every token compared, in constant time each
            found |= hmac.compare_digest(presented, known)
        if found and presented:
            return None
        return Response.error(
            401,
            "unauthenticated",
            "missing or invalid bearer token",
            [(b"www-authenticate", b"Bearer")],
        )

    # --- origins ------------------------------------------------------------------------------

    def origin_allowed(self, origin: bytes | None, host: bytes | None) -> bool:
        """No Origin (not a browser) passes; a browser's must be listed, or with no list be
        the page's own host."""
        if origin is None:
            return True
        text = origin.decode("latin-1").strip().lower().rstrip("/")
        if "*" in self._origins or text in self._origins:
            return True
        if self._origins or host is None:
            return False
        _, sep, netloc = text.partition("://")
        return bool(sep) and netloc == host.decode("latin-1").strip().lower()

    def _cors(self, request: Request) -> tuple[bool, Headers]:
        origin = request.header(b"origin")
        if not self.origin_allowed(origin, request.header(b"host")):
            return False, []
        if origin is None:
            return True, []
        return True, [
            (b"access-control-allow-origin", origin),
            # Headers a page of another origin may read: where the session is, when to retry.
            (b"access-control-expose-headers", b"Location, Retry-After"),
            (b"vary", b"Origin"),
        ]

    def _foreign_origin(self) -> Response:
        return Response.error(403, "forbidden_origin", "this origin may not use this server")

    # --- streams ------------------------------------------------------------------------------

    async def _websocket(self, request: Request, exchange: WebConnection, session_id: str) -> None:
        kind: StreamKind = "websocket"
        if request.method != "GET":
            self._metrics.request("ws", 405)
            exchange.respond(_not_allowed("GET", message="a WebSocket handshake is a GET request"))
            return
        if not request.websocket:
            self._metrics.refused(kind, "bad_request")
            if request.handshake_error is not None:
                status, message, headers = request.handshake_error
                response = Response.error(status, "bad_handshake", message, headers)
            else:
                response = Response.error(
                    426,
                    "upgrade_required",
                    "this URL is a WebSocket: send an Upgrade request",
                    [(b"upgrade", b"websocket"), (b"connection", b"Upgrade")],
                )
            self._metrics.request("ws", response.status)
            exchange.respond(response)
            return
        if not self.origin_allowed(request.header(b"origin"), request.header(b"host")):
            self._metrics.refused(kind, "origin")
            self._metrics.request("ws", 403)
            exchange.respond(self._foreign_origin())
            return
        offered = _subprotocols(request.header_list(b"sec-websocket-protocol"))
        if offered and SUBPROTOCOL not in offered:
            self._metrics.refused(kind, "bad_request")
            self._metrics.request("ws", 400)
            exchange.respond(
                Response.error(400, "bad_subprotocol", f"the only subprotocol is {SUBPROTOCOL}")
            )
            return
        sink = exchange.accept_websocket(request, SUBPROTOCOL if offered else None, [])
        if exchange.close_code is not None:
            return  # frames sent with the upgrade failed it already (1002, 1008, 1009)
        refusal = self._admit()
        if refusal is not None:
            close_code, _, reason = _REFUSALS[refusal.refusal]
            self._metrics.refused(kind, reason)
            exchange.close_stream(close_code, refusal.message)
            return
        await self._stream(kind, exchange, session_id, lambda: sink)

    async def _event_stream(
        self, request: Request, exchange: WebConnection, session_id: str
    ) -> None:
        kind: StreamKind = "sse"
        allowed, cors = self._cors(request)
        if not allowed:
            self._metrics.refused(kind, "origin")
            self._metrics.request("events", 403)
            exchange.respond(self._foreign_origin())
            return
        if request.method != "GET":
            self._metrics.request("events", 405)
            exchange.respond(_not_allowed("GET", cors))
            return
        refusal = self._admit()
        if refusal is not None:
            self._refuse_event_stream(exchange, refusal, cors)
            return
        await self._stream(
            kind, exchange, session_id, lambda: exchange.start_event_stream(cors), cors
        )

    def _admit(self) -> RequestError | None:
        """Whether this pod takes a new browser stream now: not while draining, and no faster
        than its admission rate (the reconnect storm after an ingress reload)."""
        if self._engine.draining:
            return RequestError(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE, "draining")
        if self._admission is not None and not self._admission.take():
            return RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "too many new streams on this server; try again later",
                "rate_limited",
            )
        return None

    def _refuse_event_stream(
        self, exchange: WebConnection, exc: RequestError, cors: Headers
    ) -> None:
        _, status, reason = _REFUSALS[_refusal_key(exc)]
        self._metrics.refused("sse", reason)
        if exc.code == grpc.StatusCode.INVALID_ARGUMENT:  # a malformed id: none such, as REST
            response = Response.error(404, "not_found", exc.message)
        else:
            # REST's body and Retry-After for the same refusal (one vocabulary of codes); the
            # status is this table's: 503 for the pod's admission rate, not this client's 429.
            response = error_response(exc)
            response.status = status
        self._metrics.request("events", response.status)
        response.headers += cors
        exchange.respond(response)

    async def _stream(
        self,
        kind: StreamKind,
        exchange: WebConnection,
        session_id: str,
        make_sink: Callable[[], StreamSink],
        cors: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        """Serve one browser stream from claim to close; every way out passes the lifecycle's
        ``__aexit__``. A closed socket cancels this task and, since that cancel can be lost
        in a Redis call, also stops the stream (``on_stream_end``, ``_WebStreamContext``)."""
        engine = self._engine
        context = _WebStreamContext(make_sink)
        exchange.on_stream_end(context.connection_gone)
        lifecycle = StreamLifecycle(engine, context, json=True)
        engine.stream_started()
        try:
            try:
                lifecycle.session_id = check_session_id(session_id)
                async with lifecycle:
                    writer = lifecycle.writer
                    assert writer is not None and context.sink is not None
                    self._streams[writer] = exchange
                    try:
                        await lifecycle.start()
                        context.sink.send_snapshot(b"")  # an empty one if no price is known
                        await writer.ended()
                        code, reason = END_CODES.get(writer.end_reason or "", (1011, "ended"))
                        exchange.close_stream(code, reason)
                    finally:
                        del self._streams[writer]
            except RequestError as exc:
                if kind == "sse":
                    self._refuse_event_stream(exchange, exc, list(cors))
                else:
                    close_code, _, reason = _REFUSALS[_refusal_key(exc)]
                    self._metrics.refused(kind, reason)
                    exchange.close_stream(close_code, exc.message)
        finally:
            engine.stream_finished(lifecycle.reason)

    # --- drain --------------------------------------------------------------------------------

    def owns(self, writer: StreamWriter) -> bool:
        return writer in self._streams

    def drain(self, window: float) -> None:
        """Close every browser stream with 1001 at a random moment within ``window`` seconds,
        so their clients reconnect to other pods spread out instead of all at once."""
        loop = asyncio.get_running_loop()
        for writer in list(self._streams):
            loop.call_later(
                random.uniform(0.0, window),
                writer.stop,
                "shutdown",
                grpc.StatusCode.UNAVAILABLE,
                SHUTDOWN_MESSAGE,
            )

    @property
    def streams(self) -> int:
        return len(self._streams)


def _subprotocols(header: bytes | None) -> list[str]:
    if not header:
        return []
    return [item.strip() for item in header.decode("latin-1").split(",") if item.strip()]


def _bases(request: Request) -> tuple[str, str]:
    """The http(s) and ws(s) bases of the URLs given to a client: the Host it asked, and the
    scheme the proxy in front says it used (``X-Forwarded-Proto``); relative without a Host."""
    host = request.header(b"host")
    if not host:
        return "", ""
    forwarded = (request.header(b"x-forwarded-proto") or b"").split(b",")[0].strip().lower()
    secure = forwarded == b"https"
    name = host.decode("latin-1")
    return f"{'https' if secure else 'http'}://{name}", f"{'wss' if secure else 'ws'}://{name}"


def _tickers_of(body: bytes) -> list[str] | Response:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # not UTF-8 or JSON, an integer too long, too deep
        return Response.error(400, "invalid_json", "the body is not valid JSON")
    if not isinstance(document, dict):
        return Response.error(400, "invalid_argument", 'the body must be {"tickers": [...]}')
    unknown = sorted(set(document) - {"tickers"})
    if unknown:
        return Response.error(400, "invalid_argument", f"unknown field {unknown[0]!r}")
    tickers = document.get("tickers")
    if not isinstance(tickers, list) or not all(isinstance(t, str) for t in tickers):
        return Response.error(400, "invalid_argument", '"tickers" must be a list of strings')
    return tickers


def _not_allowed(
    allow: str, cors: Sequence[tuple[bytes, bytes]] = (), *, message: str = ""
) -> Response:
    return Response.error(
        405,
        "method_not_allowed",
        message or f"allowed methods: {allow}",
        [(b"allow", allow.encode()), *cors],
    )


def _preflight(cors: Headers, methods: str) -> Response:
    return Response.empty(
        204,
        [
            *cors,
            (b"allow", methods.encode()),
            (b"access-control-allow-methods", methods.encode()),
            (b"access-control-allow-headers", b"authorization, content-type"),
            (b"access-control-max-age", b"600"),
        ],
    )


def _redis_down(exc: BaseException) -> Response:
    """A 503 for a failed Redis call (its cause logged, never shown to the client)."""
    return error_response(backend_unavailable(exc))
