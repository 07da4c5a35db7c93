"""A request as the application sees it, and the plain responses it answers with."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import unquote, urlsplit

Headers = list[tuple[bytes, bytes]]
# Why an upgrade request is not a valid WebSocket handshake: (status, sentence, headers).
HandshakeError = tuple[int, str, Headers]


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # as sent (percent-encoded), without the query; an absolute URL's (http, https)
    query: str
    headers: Headers  # names lower-case, as h11 gives them
    body: bytes
    peer: str  # the client's IP address
    websocket: bool = False  # a valid WebSocket upgrade request (checked by the transport)
    # An upgrade request that is not a valid handshake: the application answers it.
    handshake_error: HandshakeError | None = None

    @property
    def segments(self) -> list[str]:
        """The path's segments, each percent-decoded on its own (an encoded '/' stays part
        of its segment); the first is the empty one before the leading '/'."""
        return [unquote(segment) for segment in self.path.split("/")]

    @property
    def shown_path(self) -> str:
        """The path for a message: at most 200 characters, anything but printable ASCII as
        '?'."""
        return "".join(c if " " < c < "\x7f" else "?" for c in self.path[:200])

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (lower-case name), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_list(self, name: bytes) -> bytes | None:
        """A list-valued header's values from every line of it, comma-joined (RFC 9110
        section 5.3), or None without one."""
        values = [value for key, value in self.headers if key == name]
        return b", ".join(values) if values else None

    @classmethod
    def from_target(
        cls,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: bytes,
        peer: str,
        *,
        websocket: bool = False,
        handshake_error: HandshakeError | None = None,
    ) -> Request:
        text = target.decode("ascii", "replace")
        if text.lower().startswith(("http://", "https://")):
            # The absolute form (RFC 9112 section 3.2.2), which a server must accept: its
            # authority is the request's host, whatever a Host header says.
            parts = urlsplit(text)
            text = (parts.path or "/") + ("?" + parts.query if parts.query else "")
            authority = parts.netloc.rpartition("@")[2].encode("ascii", "replace")
            headers = [(b"host", authority), *((k, v) for k, v in headers if k != b"host")]
        raw_path, _, query = text.partition("?")
        return cls(
            method.decode("ascii", "replace"),
            raw_path,
            query,
            headers,
            body,
            peer,
            websocket,
            handshake_error,
        )


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: bytes = b"application/json"
    headers: Headers = field(default_factory=list)

    @classmethod
    def json(cls, status: int, value: object, headers: Headers | None = None) -> Response:
        body = json.dumps(value, separators=(",", ":")).encode()
        return cls(status, body, b"application/json", headers or [])

    @classmethod
    def error(
        cls, status: int, code: str, message: str, headers: Headers | None = None
    ) -> Response:
        """``{"error": {"code", "message"}}``: ``code`` a stable word, ``message`` one sentence."""
        return cls.json(status, {"error": {"code": code, "message": message}}, headers)

    @classmethod
    def empty(cls, status: int, headers: Headers | None = None) -> Response:
        return cls(status, b"", b"", headers or [])


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""
