"""One gRPC call on our transport: the context its servicer sees, and the task that runs it.

``ServerCall`` offers the part of ``grpc.aio.ServicerContext`` that pricestream's servicer and
grpcio's own health and reflection servicers use (abort, codes and details, metadata, peer,
deadline, write), so those run unchanged on this transport. It runs the handler of any of the
four RPC kinds from grpc's ``RpcMethodHandler``, counts the call under the go-grpc-prometheus
names, and always ends the stream with a status, whichever way the call ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import grpc

from pricestream.transport.http2.flow import ResponseStream
from pricestream.transport.http2.framing import (
    CompressedMessage,
    MessageReader,
    MessageTooLarge,
    Metadata,
    call_metadata,
)

if TYPE_CHECKING:
    from pricestream.transport.http2.connection import Connection
    from pricestream.transport.http2.server import GrpcServer, Method

log = logging.getLogger("pricestream.transport")

_END = object()  # end of a request stream

# Why the transport cancelled a call's handler: the client went away (RST_STREAM or a lost
# connection), its deadline passed, or the server ended it (a transport failure, its age).
EndedBy = Literal["peer", "deadline", "server"]
# Why the server ended a call from its side, as the servicer is told (``on_terminate``).
TerminateReason = Literal["client_gone", "deadline", "max_connection_age", "shutdown"]


class AbortError(Exception):
    """Raised by ``ServerCall.abort``: the call ends with the status set on it."""


class ServerCall:
    def __init__(
        self,
        server: GrpcServer,
        conn: Connection,
        stream: ResponseStream,
        path: str,
        headers: Sequence[tuple[bytes, bytes]],
        timeout: float | None,
    ) -> None:
        self._server = server
        self._conn = conn
        self.stream = stream
        self.path = path
        self._headers = headers
        self._metadata: Metadata | None = None
        self._loop = asyncio.get_running_loop()
        self._deadline = None if timeout is None else self._loop.time() + timeout
        self._deadline_timer: asyncio.TimerHandle | None = None
        self.method: Method | None = server.method(path)
        self._reader = MessageReader(server.limits.max_request_bytes)
        self._unary_request: list[bytes] = []
        self._requests: asyncio.Queue[object] | None = None
        self._task: asyncio.Task[None] | None = None
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: Sequence[tuple[str, str | bytes]] = ()
        self._ended_by: EndedBy | None = None  # why the transport cancelled the handler
        self._on_terminate: Callable[[grpc.StatusCode, str, TerminateReason], None] | None = None
        self._terminated: tuple[grpc.StatusCode, str, TerminateReason] | None = None
        self._discard_unsent = False
        self._writable: asyncio.Future[None] | None = None
        self._started_at = 0.0
        self._opened_at = time.monotonic()
        self.messages_received = 0
        self.finished = False

    # --- driven by the connection -------------------------------------------------------

    def start(self) -> None:
        method = self.method
        if method is None:
            self._end_now(grpc.StatusCode.UNIMPLEMENTED, f"method {self.path} is not implemented")
            return
        self._started_at = time.perf_counter()
        method.stats.started.inc()
        self.stream.counts = method.stats
        refusal = self._server.refusal(self)
        if refusal is not None:
            self._code, self._details = refusal
            self._finish()
            return
        if self._deadline is not None:
            self._deadline_timer = self._loop.call_at(self._deadline, self._deadline_passed)
        if method.handler.request_streaming:
            self._requests = asyncio.Queue()
            self._run(None)

    def receive(self, data: bytes) -> None:
        if self.finished:
            return
        try:
            messages = self._reader.feed(data)
        except MessageTooLarge as exc:
            self._fail(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            return
        except CompressedMessage:
            self._fail(
                grpc.StatusCode.UNIMPLEMENTED,
                "compressed requests are not supported; send them uncompressed",
            )
            return
        self.messages_received += len(messages)
        if self._requests is not None:
            for message in messages:
                self._requests.put_nowait(message)
        else:
            self._unary_request.extend(messages)

    def end_of_requests(self) -> None:
        if self.finished:
            return
        if self._requests is not None:
            self._requests.put_nowait(_END)
            return
        if self._task is not None or self.method is None:
            return
        if len(self._unary_request) != 1 or self._reader.partial:
            self._fail(
                grpc.StatusCode.INTERNAL,
                f"expected one request message, got {len(self._unary_request)}",
            )
            return
        self._run(self._unary_request.pop())

    def peer_gone(self) -> None:
        """The client reset the stream or the connection is gone."""
        self.stream.peer_closed()
        if self.finished:
            return
        if self._task is not None and not self._task.done():
            self._ended_by = self._ended_by or "peer"
            # Told twice on purpose: a cancellation can be lost inside a library's wait_for
            # (Python 3.11), and a servicer waiting for its stream to be stopped would then
            # wait forever for a client that is gone.
            self._notify_terminate(grpc.StatusCode.CANCELLED, "the client went away", "client_gone")
            self._task.cancel()
        else:
            self._code = grpc.StatusCode.CANCELLED
            self._finish()

    def age(self) -> float:
        """Seconds since the request arrived."""
        return time.monotonic() - self._opened_at

    def terminate(self, code: grpc.StatusCode, message: str, reason: TerminateReason) -> None:
        """End the call from the server's side (connection age, shutdown)."""
        if self.finished:
            return
        if self._on_terminate is not None:
            self._notify_terminate(code, message, reason)
        elif self._task is not None and not self._task.done():
            self._code, self._details = code, message
            self._ended_by = "server"
            self._task.cancel()
        else:
            self._end_now(code, message)

    def _notify_terminate(
        self, code: grpc.StatusCode, message: str, reason: TerminateReason
    ) -> None:
        if self._terminated is None:
            self._terminated = (code, message, reason)
        if self._on_terminate is not None:
            self._on_terminate(*self._terminated)

    # --- grpc.aio.ServicerContext, as far as servicers here use it ----------------------

    def invocation_metadata(self) -> Metadata:
        if self._metadata is None:
            self._metadata = call_metadata(self._headers)
        return self._metadata

    def peer(self) -> str:
        return self._conn.peer

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - self._loop.time())

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, str | bytes]] = (),
    ) -> NoReturn:
        self._code, self._details = code, details
        if trailing_metadata:
            self._trailing = trailing_metadata
        raise AbortError(details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._trailing = metadata

    async def send_initial_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self.stream.set_initial_metadata(metadata)
        self.stream.send_headers()

    def cancelled(self) -> bool:
        return self._ended_by == "peer"

    def done(self) -> bool:
        return self.finished

    async def write(self, message: Any) -> None:
        """Send one response message; waits while the client's window is shut."""
        assert self.method is not None
        self._send(message)
        while self.stream.blocked_since is not None and not self.stream.closed:
            self._writable = self._loop.create_future()
            self.stream.on_writable(self._wake_writer)
            try:
                await self._writable
            finally:
                self._writable = None

    # --- for pricestream's own streams ------------------------------------------------

    def batch_sink(self) -> ResponseStream:
        """The stream as a sink of already-encoded batches (pricestream.engine.flush.BatchSink).

        The call is accepted from here on (response headers go out now); when it ends,
        batches still waiting for the client's window are dropped: they are latest-value
        prices, and the status must not wait behind a client that does not read.
        """
        self._discard_unsent = True
        self.stream.send_headers()
        return self.stream

    def on_terminate(
        self, callback: Callable[[grpc.StatusCode, str, TerminateReason], None]
    ) -> None:
        """How the servicer ends this call when the server must, or the client has gone
        (callback(code, message, reason)); called at once if that already happened."""
        self._on_terminate = callback
        if self._terminated is not None:
            callback(*self._terminated)

    # --- internals ----------------------------------------------------------------------

    def _wake_writer(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def _send(self, message: Any) -> None:
        assert self.method is not None
        serializer = self.method.handler.response_serializer
        data = serializer(message) if serializer is not None else message
        limit = self._server.limits.max_send_message_bytes
        if len(data) > limit:
            self._code = grpc.StatusCode.RESOURCE_EXHAUSTED
            self._details = f"response message of {len(data)} bytes is over the limit of {limit}"
            raise AbortError(self._details)
        self.stream.send(data)

    def _run(self, request: bytes | None) -> None:
        self._task = self._loop.create_task(self._serve(request), name=f"call {self.path}")
        self._task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """A task cancelled before its first step never enters ``_serve`` (nor its
        ``finally``): a rapid reset brings HEADERS, the request and RST_STREAM in one read.
        Such a call ends here, counted like one cancelled inside its handler."""
        if self.finished:
            return
        if self._ended_by == "deadline":
            self._code, self._details = grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
        elif self._ended_by == "peer":
            self._code = grpc.StatusCode.CANCELLED
        elif self._ended_by is None:
            self._code, self._details = grpc.StatusCode.UNAVAILABLE, "the server stopped"
        self._finish()

    async def _serve(self, request: bytes | None) -> None:
        assert self.method is not None
        handler = self.method.handler
        try:
            if handler.request_streaming:
                requests = self._request_iterator(handler.request_deserializer)
                if handler.response_streaming:
                    async for response in handler.stream_stream(requests, self):
                        await self.write(response)
                else:
                    self._send(await handler.stream_unary(requests, self))
            else:
                message = self._deserialize(handler.request_deserializer, request)
                if handler.response_streaming:
                    result = handler.unary_stream(message, self)
                    if hasattr(result, "__aiter__"):
                        async for response in result:
                            await self.write(response)
                    else:
                        await result
                else:
                    self._send(await handler.unary_unary(message, self))
        except AbortError:
            pass
        except asyncio.CancelledError:
            if self._ended_by == "deadline":
                self._code, self._details = grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
            elif self._ended_by == "peer":
                self._code = grpc.StatusCode.CANCELLED  # as go-grpc-prometheus counts it
            elif self._ended_by is None:
                # Cancelled from outside (the server stopping): end the stream, then go on.
                self._code, self._details = grpc.StatusCode.UNAVAILABLE, "the server stopped"
                raise
        except Exception as exc:
            log.exception("call %s failed", self.path)
            self._code = grpc.StatusCode.UNKNOWN
            self._details = f"unexpected {type(exc).__name__} in the server"
        finally:
            self._finish()

    async def _request_iterator(
        self, deserializer: Callable[[bytes], Any] | None
    ) -> AsyncIterator[Any]:
        assert self._requests is not None
        while True:
            item = await self._requests.get()
            if item is _END:
                return
            assert isinstance(item, bytes)
            yield self._deserialize(deserializer, item)

    def _deserialize(self, deserializer: Callable[[bytes], Any] | None, data: bytes | None) -> Any:
        if deserializer is None:
            return data
        try:
            return deserializer(data)
        except Exception:
            self._code = grpc.StatusCode.INTERNAL
            self._details = "could not parse the request message"
            raise AbortError(self._details) from None

    def _deadline_passed(self) -> None:
        self._deadline_timer = None
        if self.finished:
            return
        if self._task is not None and not self._task.done():
            self._ended_by = "deadline"
            # Told as well as cancelled (see peer_gone): a stream whose cancel was lost would
            # otherwise run past its deadline until its client resets it.
            self._notify_terminate(
                grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", "deadline"
            )
            self._task.cancel()
        else:
            self._end_now(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")

    def _fail(self, code: grpc.StatusCode, message: str) -> None:
        """A transport-level failure of the request: end the call at once."""
        if self._task is not None and not self._task.done():
            self._code, self._details = code, message
            self._ended_by = "server"
            self._task.cancel()
        else:
            self._end_now(code, message)

    def _end_now(self, code: grpc.StatusCode, message: str) -> None:
        self._code, self._details = code, message
        self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        code = self._code or grpc.StatusCode.OK
        with contextlib.suppress(Exception):  # a half-dead connection must not stop the count
            self.stream.finish(
                code, self._details, self._trailing, discard_unsent=self._discard_unsent
            )
        if self.method is not None and self._started_at:
            self.method.stats.finished(
                self.messages_received,
                code,
                time.perf_counter() - self._started_at,
            )
        self._conn.call_finished(self)
