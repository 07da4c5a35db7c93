"""The gRPC service `pricestream.v1.PriceStreamService` over an ``Engine``."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2
from google.protobuf.message import DecodeError, Message
from opentelemetry import trace
from redis.exceptions import RedisError

from pricestream.api.rate_limit import client_address, peer_address
from pricestream.api.sessions import SessionOps
from pricestream.engine.engine import Engine
from pricestream.engine.stream import StreamLifecycle, finish_status
from pricestream.errors import (
    RequestError,
    backend_unavailable,
    call_status,
    invalid_argument,
)
from pricestream.observability.tracing import caller_context
from pricestream.settings import proxy_networks
from pricestream.transport.http2.calls import ServerCall
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.validation import check_session_id

SERVICE_NAME = "pricestream.v1.PriceStreamService"

R = TypeVar("R")
M = TypeVar("M", bound=Message)


def _answers_errors(method: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Turn RequestError and backend failures into one status code and one sentence.

    The decorated method takes the call's ``ServerCall`` as its last argument.
    """

    @functools.wraps(method)
    async def wrapper(*args: Any) -> R:
        context: ServerCall = args[-1]
        try:
            return await method(*args)
        except RequestError as exc:
            await context.abort(exc.code, exc.message)
        except (RedisError, OSError, TimeoutError) as exc:
            error = backend_unavailable(exc)
            await context.abort(error.code, error.message)
        raise AssertionError("unreachable: abort raises")

    return wrapper


def _lenient(message_class: type[M]) -> Callable[[bytes], M | None]:
    """A request deserializer that yields None for bytes that are not the message."""

    def parse(data: bytes) -> M | None:
        try:
            return message_class.FromString(data)
        except DecodeError:
            return None

    return parse


def _require(request: M | None, message_class: type[M]) -> M:
    if request is None:
        raise invalid_argument(
            f"request is not a valid {message_class.DESCRIPTOR.full_name} message"
        )
    return request


def _traced(method: str) -> Callable[[Callable[..., Awaitable[R]]], Callable[..., Awaitable[R]]]:
    """Run a unary handler inside the server span of ``method``."""

    def decorate(handler: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
        @functools.wraps(handler)
        async def wrapper(self: PriceStreamService, request: Any, context: ServerCall) -> R:
            with self._span(method, context):
                return await handler(self, request, context)

        return wrapper

    return decorate


class PriceStreamService:
    def __init__(self, engine: Engine, sessions: SessionOps) -> None:
        self._engine = engine
        self._sessions = sessions
        self._trusted_proxies = proxy_networks(engine.settings.trusted_proxies)

    def _client(self, context: ServerCall) -> str:
        """The client's IP address: the peer's, or the one trusted proxies forwarded for
        (``x-forwarded-for`` metadata, read only when some proxy is trusted)."""
        peer = peer_address(context.peer() or "")
        if not self._trusted_proxies:
            return peer
        forwarded = [
            value
            for key, value in context.invocation_metadata()
            if key == "x-forwarded-for" and isinstance(value, str)
        ]
        return client_address(peer, forwarded, self._trusted_proxies)

    @contextlib.contextmanager
    def _span(self, method: str, context: ServerCall) -> Iterator[trace.Span]:
        """A server span for one call, continuing the caller's trace from its metadata.

        With tracing off it is the invalid span, and neither metadata nor context is touched:
        that work was a sixth of a CreateSession's cost."""
        if not self._engine.tracing.enabled:
            yield trace.INVALID_SPAN
            return
        with self._engine.tracing.tracer.start_as_current_span(
            f"{SERVICE_NAME}/{method}",
            context=caller_context(context.invocation_metadata()),
            kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": SERVICE_NAME, "rpc.method": method},
        ) as span:
            yield span
            code = call_status(context)
            if code is not None:
                span.set_attribute("rpc.grpc.status_code", code.value[0])

    @_traced("CreateSession")
    @_answers_errors
    async def create_session(
        self, request: pb.CreateSessionRequest, context: ServerCall
    ) -> pb.Session:
        request = _require(request, pb.CreateSessionRequest)
        info = await self._sessions.create(list(request.tickers), self._client(context))
        expires_at = timestamp_pb2.Timestamp()
        expires_at.FromNanoseconds(int(info.expires_at * 1e9))
        return pb.Session(session_id=info.session_id, tickers=info.tickers, expires_at=expires_at)

    @_traced("CloseSession")
    @_answers_errors
    async def close_session(
        self, request: pb.CloseSessionRequest, context: ServerCall
    ) -> empty_pb2.Empty:
        await self._sessions.close(_require(request, pb.CloseSessionRequest).session_id)
        return empty_pb2.Empty()

    async def stream_price_updates(
        self, request: pb.StreamPriceUpdatesRequest, context: ServerCall
    ) -> None:
        engine = self._engine
        lifecycle = StreamLifecycle(engine, context)
        engine.stream_started()
        with self._span("StreamPriceUpdates", context) as span:
            if request is not None:
                span.set_attribute("pricestream.session_id", request.session_id[:64])
            try:
                await self._stream(lifecycle, request, context)
            finally:
                engine.stream_finished(lifecycle.reason)
                span.set_attributes(
                    {
                        "pricestream.close_reason": lifecycle.reason,
                        "pricestream.batches_sent": lifecycle.batches_sent,
                        "pricestream.updates_sent": lifecycle.updates_sent,
                    }
                )

    @_answers_errors
    async def _stream(
        self,
        lifecycle: StreamLifecycle,
        request: pb.StreamPriceUpdatesRequest,
        context: ServerCall,
    ) -> None:
        self._sessions.refuse_if_draining()
        request = _require(request, pb.StreamPriceUpdatesRequest)
        lifecycle.session_id = check_session_id(request.session_id)
        async with lifecycle:
            await lifecycle.pump()
        finish_status(lifecycle, context)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "CreateSession": grpc.unary_unary_rpc_method_handler(
                    self.create_session,
                    request_deserializer=_lenient(pb.CreateSessionRequest),
                    response_serializer=pb.Session.SerializeToString,
                ),
                # Batches are already encoded by the flush path: bytes go out as they are.
                "StreamPriceUpdates": grpc.unary_stream_rpc_method_handler(
                    self.stream_price_updates,
                    request_deserializer=_lenient(pb.StreamPriceUpdatesRequest),
                    response_serializer=None,
                ),
                "CloseSession": grpc.unary_unary_rpc_method_handler(
                    self.close_session,
                    request_deserializer=_lenient(pb.CloseSessionRequest),
                    response_serializer=empty_pb2.Empty.SerializeToString,
                ),
            },
        )
