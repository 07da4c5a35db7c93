"""gRPC server metrics under the go-grpc-prometheus names, for unary and server-streaming calls.

Counters `grpc_server_started_total`, `grpc_server_handled_total{grpc_code}`,
`grpc_server_msg_received_total`, `grpc_server_msg_sent_total` and the histogram
`grpc_server_handling_seconds`, each labelled `grpc_type`, `grpc_service`, `grpc_method`.
The Python interceptor package for these names covers unary calls only, so this one also
wraps server streams (the ``context.write`` style and the async-generator style).
Client- and bidi-streaming methods (only reflection here) pass through uncounted.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from pricestream.errors import call_status

LABELS = ("grpc_type", "grpc_service", "grpc_method")
HANDLING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


class GrpcMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server.", LABELS, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            (*LABELS, "grpc_code"),
            registry=registry,
        )
        self.msg_received = Counter(
            "grpc_server_msg_received",
            "Request messages received by the server.",
            LABELS,
            registry=registry,
        )
        self.msg_sent = Counter(
            "grpc_server_msg_sent",
            "Response messages sent by the server.",
            LABELS,
            registry=registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Seconds from the start of an RPC to its end on the server.",
            LABELS,
            buckets=HANDLING_BUCKETS,
            registry=registry,
        )


class _CountingContext:
    """Delegates to the real context; counts every ``write``."""

    def __init__(self, context: grpc.aio.ServicerContext, count: Callable[[], None]) -> None:
        self._context = context
        self._count = count

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._count()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _code_name(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    """The status the call ended with, as go-grpc-prometheus spells it."""
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    code = call_status(context)
    if code is not None:
        return code.name
    return "UNKNOWN" if error is not None else "OK"


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: GrpcMetrics) -> None:
        self._m = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_streaming:
            return handler
        service, _, method = details.method.lstrip("/").rpartition("/")
        if handler.response_streaming:
            labels = ("server_stream", service, method)
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, labels))
        labels = ("unary", service, method)
        return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, labels))

    @contextlib.contextmanager
    def _observed(
        self, labels: tuple[str, str, str], context: grpc.aio.ServicerContext
    ) -> Iterator[None]:
        """Count the call as started, then as handled with its code and duration."""
        self._m.started.labels(*labels).inc()
        self._m.msg_received.labels(*labels).inc()
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._m.handled.labels(*labels, _code_name(context, error)).inc()
            self._m.handling.labels(*labels).observe(time.perf_counter() - started)

    def _wrap_unary(self, behavior: Any, labels: tuple[str, str, str]) -> Any:
        sent = self._m.msg_sent.labels(*labels)

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with self._observed(labels, context):
                response = await behavior(request, context)
                sent.inc()
                return response

        return unary

    def _wrap_stream(self, behavior: Any, labels: tuple[str, str, str]) -> Any:
        sent = self._m.msg_sent.labels(*labels)
        if inspect.isasyncgenfunction(behavior):

            async def generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
                with self._observed(labels, context):
                    async for response in behavior(request, context):
                        yield response
                        sent.inc()

            return generator

        async def writer(request: Any, context: grpc.aio.ServicerContext) -> None:
            with self._observed(labels, context):
                await behavior(request, _CountingContext(context, sent.inc))

        return writer
