"""Errors that carry the gRPC status a client should see, with one clear sentence."""

from __future__ import annotations

import logging
from typing import Literal, Protocol

import grpc

log = logging.getLogger("pricestream.errors")


def describe(exc: BaseException) -> str:
    """An exception for a log line or a status message: its text, or its type when the text
    is empty (a timeout's is)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# Why a request was refused, beyond its status code: the REST API answers 429 for a client's
# own rate and 503 for the pod's state, where gRPC has RESOURCE_EXHAUSTED for both.
Refusal = Literal["", "rate_limited", "pod_full", "overloaded", "draining", "backend"]
# New work a draining pod refuses (a session create, a stream before or after its claim) ...
DRAINING_MESSAGE = "server is draining; retry on another server"
# ... and the streams it ends (gRPC UNAVAILABLE, browser 1001, with the resume hint).
SHUTDOWN_MESSAGE = "server is shutting down; resume the session on another server"
# A request whose Redis call failed: the cause (an internal address) is logged, not shown.
BACKEND_MESSAGE = "Redis is unreachable from this server; try again later"


class RequestError(Exception):
    """A request cannot be served; ``code`` and ``message`` go to the client as they are."""

    def __init__(self, code: grpc.StatusCode, message: str, refusal: Refusal = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.refusal: Refusal = refusal


def invalid_argument(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.NOT_FOUND, message)


def failed_precondition(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.FAILED_PRECONDITION, message)


def resource_exhausted(message: str, refusal: Refusal = "") -> RequestError:
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, refusal)


def unavailable(message: str, refusal: Refusal = "") -> RequestError:
    return RequestError(grpc.StatusCode.UNAVAILABLE, message, refusal)


def backend_unavailable(exc: BaseException) -> RequestError:
    """UNAVAILABLE for a request whose Redis call failed; its cause goes to the debug log
    (an outage is logged and exported once by the pod, not per request)."""
    log.debug("a request's Redis call failed: %s", describe(exc))
    return unavailable(BACKEND_MESSAGE, "backend")


_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


class _HasCode(Protocol):
    def code(self) -> grpc.StatusCode | int | None: ...


def call_status(context: _HasCode) -> grpc.StatusCode | None:
    """The status code set on a call so far (an enum, or its int), or None."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return _CODES_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
    return None
