"""The gRPC server on our own HTTP/2 transport: method registry, listening socket, shutdown.

It takes service registrations the way a ``grpc.Server`` does (``add_generic_rpc_handlers``,
``add_registered_method_handlers``), so grpc's generated ``add_XServicer_to_server`` functions,
grpcio-health-checking and grpcio-reflection register on it unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import grpc
from h2.errors import ErrorCodes

from pricestream.observability.grpc_metrics import GrpcMetrics, MethodStats
from pricestream.transport.http2.calls import ServerCall
from pricestream.transport.http2.connection import Connection
from pricestream.transport.http2.limits import Limits
from pricestream.transport.sockets import listening_socket

log = logging.getLogger("pricestream.transport")

# A check every call passes before its handler runs: None, or the status to refuse it with.
Gate = Callable[[ServerCall], "tuple[grpc.StatusCode, str] | None"]


class _CallDetails(NamedTuple):
    """What grpc's generic handlers look a method up by (grpc.HandlerCallDetails)."""

    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


@dataclass(eq=False)
class Method:
    handler: grpc.RpcMethodHandler
    stats: MethodStats


def _rpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming:
        return "bidi_stream" if handler.response_streaming else "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


class GrpcServer:
    def __init__(self, limits: Limits, metrics: GrpcMetrics, gates: Sequence[Gate] = ()) -> None:
        self.limits = limits
        self._metrics = metrics
        self._gates = tuple(gates)
        self._generic: list[grpc.GenericRpcHandler] = []
        self._methods: dict[str, Method] = {}
        self._connections: set[Connection] = set()
        self._listener: asyncio.Server | None = None
        self._idle = asyncio.Event()  # no connection open
        self._idle.set()
        self._live_calls = 0
        self._no_calls = asyncio.Event()
        self._no_calls.set()
        metrics.count_live_messages(self._live_message_counts)

    # --- registration (the grpc.Server API generated code calls) ------------------------

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        for name, handler in handlers.items():
            self._register(f"/{service}/{name}", handler)

    def method(self, path: str) -> Method | None:
        method = self._methods.get(path)
        if method is None:
            details = _CallDetails(path, ())
            for generic in self._generic:
                handler = generic.service(details)  # type: ignore[arg-type]
                if handler is not None:
                    return self._register(path, handler)
        return method

    def _register(self, path: str, handler: grpc.RpcMethodHandler) -> Method:
        service, _, name = path.lstrip("/").rpartition("/")
        method = Method(handler, self._metrics.method(_rpc_type(handler), service, name))
        self._methods[path] = method
        return method

    def refusal(self, call: ServerCall) -> tuple[grpc.StatusCode, str] | None:
        for gate in self._gates:
            refused = gate(call)
            if refused is not None:
                return refused
        return None

    # --- serving ------------------------------------------------------------------------

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen; the bound port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        sock = listening_socket(host, port)
        try:
            self._listener = await loop.create_server(
                lambda: Connection(self), sock=sock, ssl=ssl_context, backlog=4096
            )
        except BaseException:
            sock.close()
            raise
        return sock.getsockname()[1]

    def connection_opened(self, conn: Connection) -> None:
        self._connections.add(conn)

    def connection_closed(self, conn: Connection) -> None:
        self._connections.discard(conn)
        if not self._connections:
            self._idle.set()

    def call_started(self) -> None:
        self._live_calls += 1
        self._no_calls.clear()

    def call_ended(self) -> None:
        self._live_calls -= 1
        if self._live_calls == 0:
            self._no_calls.set()

    def calls(self) -> Iterator[ServerCall]:
        for conn in list(self._connections):
            yield from list(conn.calls.values())

    def _live_message_counts(self) -> Iterator[tuple[MethodStats, int]]:
        for call in self.calls():
            if call.method is not None:
                yield call.method.stats, call.messages_received

    async def stop(self, grace: float, message: str) -> None:
        """Stop listening, send GOAWAY, give calls ``grace`` seconds, end the rest with
        UNAVAILABLE ``message``, close every connection."""
        if self._listener is not None:
            self._listener.close()
        for conn in list(self._connections):
            conn.go_away(ErrorCodes.NO_ERROR)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_calls.wait(), grace)
        for conn in list(self._connections):
            conn.terminate_calls(grpc.StatusCode.UNAVAILABLE, message, "shutdown")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_calls.wait(), 1.0)
        for conn in list(self._connections):
            conn.close()
        if self._listener is not None:
            self._listener = None
        if self._connections:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), 1.0)
            except TimeoutError:
                log.warning("%d connections did not close in time", len(self._connections))
