"""Optional bearer-token authentication of the PriceStream API.

Tokens come from ``PRICESTREAM_AUTH_TOKENS`` (comma-separated) and/or a file with one token per
line (``PRICESTREAM_AUTH_TOKENS_FILE``, e.g. a mounted Kubernetes Secret). When any token is
configured, every call of `pricestream.v1.PriceStreamService` needs
``authorization: Bearer <token>`` metadata, compared in constant time; without it the call
ends with UNAUTHENTICATED. Health and reflection stay open so probes keep working.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from pricestream.settings import Settings, SettingsError
from pricestream.transport.http2.calls import ServerCall

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


def _presented_token(metadata: Sequence[tuple[str, Any]] | None) -> bytes:
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


class BearerAuth:
    """A call gate of the transport: PriceStream calls need one of the configured tokens."""

    def __init__(self, tokens: list[bytes]) -> None:
        self._tokens = tokens

    def __call__(self, call: ServerCall) -> tuple[grpc.StatusCode, str] | None:
        if not call.path.startswith(PROTECTED_PREFIX):
            return None
        if _matches(_presented_token(call.invocation_metadata()), self._tokens):
            return None
        return grpc.StatusCode.UNAUTHENTICATED, MESSAGE
