"""Clients of the browser port for tests: REST over aiohttp, a raw WebSocket over a plain
socket (for what a stock client hides: not answering pings, not reading), and SSE reading."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
from typing import Any

import aiohttp


async def rest(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
    *,
    host: str = "127.0.0.1",
) -> tuple[int, dict[str, str], Any]:
    """One REST call to ``host:port``; (status, headers, parsed JSON body or None)."""
    send_headers = dict(headers or {})
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        send_headers.setdefault("Content-Type", "application/json")
    async with aiohttp.ClientSession() as http:
        async with http.request(
            method, f"http://{host}:{port}{path}", data=data, headers=send_headers
        ) as response:
            text = await response.read()
            parsed = json.loads(text) if text else None
            return response.status, dict(response.headers), parsed


async def create_session(port: int, tickers: list[str]) -> dict[str, Any]:
    status, _, body = await rest(port, "POST", "/v1/sessions", {"tickers": tickers})
    assert status == 201, body
    return body


class RawWebSocket:
    """A WebSocket client on a plain socket: the handshake, masked client frames, and the
    server's frames read one by one, with nothing answered unless the test says so."""

    def __init__(
        self,
        port: int,
        path: str,
        *,
        rcvbuf: int | None = None,
        protocols: tuple[str, ...] = ("pricestream.v1.json",),
    ) -> None:
        """``protocols``: the subprotocols offered, one ``Sec-WebSocket-Protocol`` line each."""
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n"
                + "".join(f"Sec-WebSocket-Protocol: {name}\r\n" for name in protocols)
                + "\r\n"
            ).encode()
        )
        self._buffer = b""
        head = self._read_until(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        self.headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
        }

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            self._buffer += chunk
        head, _, self._buffer = self._buffer.partition(marker)
        return head

    def _read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self._buffer += chunk
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    def read_frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the server's next frame."""
        first, second = self._read_exactly(2)
        assert second & 0x80 == 0, "a server's frames are never masked"
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack(">H", self._read_exactly(2))
        elif length == 127:
            (length,) = struct.unpack(">Q", self._read_exactly(8))
        return first & 0x0F, self._read_exactly(length)

    def read_until_close(self) -> tuple[int, str]:
        """Skip frames until the close frame; its (code, reason)."""
        while True:
            opcode, payload = self.read_frame()
            if opcode == 0x8:
                code = struct.unpack(">H", payload[:2])[0] if payload else 1005
                return code, payload[2:].decode()

    def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        length = len(payload)
        if length < 126:
            header = struct.pack(">BB", (0x80 if fin else 0) | opcode, 0x80 | length)
        elif length < 65536:
            header = struct.pack(">BBH", (0x80 if fin else 0) | opcode, 0x80 | 126, length)
        else:
            header = struct.pack(">BBQ", (0x80 if fin else 0) | opcode, 0x80 | 127, length)
        self.sock.sendall(header + mask + masked)

    def close(self) -> None:
        self.sock.close()


async def in_thread(function: Any, *args: Any) -> Any:
    return await asyncio.to_thread(function, *args)


class SseReader:
    """Reads an SSE response event by event (aiohttp), for tests."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def event(self, timeout: float = 5.0) -> dict[str, str]:
        """The next event's fields (comment lines skipped)."""
        fields: dict[str, str] = {}
        while True:
            line = await asyncio.wait_for(self.response.content.readline(), timeout)
            if not line:
                raise ConnectionError("the event stream ended")
            text = line.decode().rstrip("\n")
            if not text:
                if fields:
                    return fields
                continue
            if text.startswith(":"):
                continue
            name, _, value = text.partition(":")
            fields[name] = value.removeprefix(" ")
