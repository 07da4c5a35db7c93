"""Optional bearer-token authentication of the PriceStream API.

Tokens come from ``PRICESTREAM_AUTH_TOKENS`` (comma-separated) and/or a file with one token per
line (``PRICESTREAM_AUTH_TOKENS_FILE``, e.g. a mounted Kubernetes Secret). When any token is
configured, every call of `pricestream.v1.PriceStreamService` needs
``authorization: Bearer <token>`` metadata, compared in constant time; without it the call
ends with UNAUTHENTICATED. Health and reflection stay open so probes keep working.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from pricestream.settings import Settings, SettingsError

PROTECTED_PREFIX = "/pricestream.v1.PriceStreamService/"
MESSAGE = "missing or invalid bearer token"


def load_tokens(settings: Settings) -> list[bytes]:
    tokens = [t.strip() for t in settings.auth_tokens.split(",") if t.strip()]
    if settings.auth_tokens_file:
        try:
            text = Path(settings.auth_tokens_file).read_text()
        except OSError as exc:
            raise SettingsError(f"cannot read auth_tokens_file: {exc.strerror}") from None
        tokens += [line.strip() for line in text.splitlines() if line.strip()]
    return [token.encode() for token in tokens]


def _presented_token(metadata: tuple[tuple[str, Any], ...] | None) -> bytes:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip().encode()
    return b""


def _matches(presented: bytes, tokens: list[bytes]) -> bool:
    # Compare against every token, without stopping at the first match.
    found = False
    for token in tokens:
        found |= hmac.compare_digest(presented, token)
    return found and bool(presented)


async def _reject(request: Any, context: grpc.aio.ServicerContext) -> None:
    """Behaviour of a refused call, unary or server-streaming alike."""
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, MESSAGE)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: list[bytes]) -> None:
        self._tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(PROTECTED_PREFIX):
            return handler
        if _matches(_presented_token(details.invocation_metadata), self._tokens):
            return handler
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                _reject, request_deserializer=handler.request_deserializer
            )
        return grpc.unary_unary_rpc_method_handler(
            _reject, request_deserializer=handler.request_deserializer
        )
