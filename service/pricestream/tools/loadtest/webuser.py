"""The browser path's virtual user (`pricestream loadtest --transport ws|sse`), the original
system's flow: ``POST /v1/sessions`` with K tickers, then a WebSocket (subprotocol
``pricestream.v1.json``) or an SSE stream of the session, read until told to leave, then leave
one of its ways (docs/browser.md):

- ``close``: the client's close frame (1000), WebSocket only;
- ``drop``: the TCP connection closed without a close frame (the server sees 1006): the user's
  own aiohttp session is closed, as ``channel_drop`` closes a gRPC user's own channel;
- ``delete``: ``DELETE /v1/sessions/{id}``, after which the server closes the stream with 1000.

Frames are ``{"type": "snapshot"|"prices", "seq": n, "updates": [...]}``; each update's
``publishedAtUnixNanos`` (an int64 as a string) gives the delivery latency as
``published_at_unix_nanos`` does over gRPC. The snapshot (the first frame: the last known
prices, old) starts the stream but is not a delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    from pricestream.tools.loadtest.worker import Stats, WorkerConfig

SUBPROTOCOL = "pricestream.v1.json"
WEB_LEAVE_WAYS = {"ws": ("close", "drop", "delete"), "sse": ("drop", "delete")}
SLOW_CONSUMER = 4008  # the server's close code for a reader that did not keep up
NANOS_PER_BUCKET_DEFAULT = 1_000_000


def web_session(limit: int = 0) -> aiohttp.ClientSession:
    """An aiohttp session for many users: no connection limit, no total timeout (streams last
    as long as their stage), no cookies."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=False),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


class WebVirtualUser:
    """POST /v1/sessions → WebSocket or SSE → read until told to leave, then leave its way."""

    def __init__(
        self, http: aiohttp.ClientSession, own: aiohttp.ClientSession | None, target: str,
        way: str, slow: bool, stage: int, tickers: list[str], config: WorkerConfig,
        stats: Stats, nanos_per_bucket: int = NANOS_PER_BUCKET_DEFAULT,
    ) -> None:  # fmt: skip
        self.http, self.own, self.way, self.slow = http, own, way, slow
        self.stage, self.tickers, self.config, self.stats = stage, tickers, config, stats
        self.base = f"http://{target}"
        self.nanos_per_bucket = nanos_per_bucket
        self.leaving = False
        self.started = False  # the snapshot arrived: the server holds the stream
        self.last_seq = 0  # the seq of the stream's last frame
        self.session_id = ""
        self.task: asyncio.Task[None] | None = None
        self.side_tasks: set[asyncio.Task[None]] = set()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._response: aiohttp.ClientResponse | None = None
        self._streaming = False  # a stream request is out (or open)
        self._headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}

    @property
    def stream_session(self) -> aiohttp.ClientSession:
        """The stream's own session for a user who leaves by dropping it, the shared one
        otherwise (REST calls always use the shared one)."""
        return self.own if self.own is not None else self.http

    async def run(self) -> None:
        stats = self.stats
        stats.sessions_attempted += 1
        started = time.perf_counter()
        try:
            async with self.http.post(
                f"{self.base}/v1/sessions", json={"tickers": self.tickers},
                headers=self._headers, timeout=aiohttp.ClientTimeout(total=10),
            ) as response:  # fmt: skip
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError):
            status, body = 0, b""
        if status != 201:
            if not self.leaving:
                stats.error(f"create:HTTP{status}" if status else "create:transport")
                await asyncio.sleep(random.uniform(0.5, 1.5))  # no retry storm
            return
        stats.sessions_created += 1
        stats.create_latency.add(time.perf_counter() - started)
        self.session_id = json.loads(body)["session_id"]
        if self.leaving:  # told to leave while creating it: a polite client deletes it
            await self._delete()
            return
        self._streaming = True
        try:
            if self.config.transport == "ws":
                await self._websocket()
            else:
                await self._event_stream()
        except asyncio.CancelledError:
            if not self.leaving:
                raise
        finally:
            self._streaming = False
        if not self.leaving:
            # Refused or failed, not told to leave: a session that never streamed is deleted
            # (left, it would stay pending for its TTL, and the leak verdict would blame the
            # server), and the slot waits before it is filled again (no retry storm).
            if not self.started:
                await self._delete()
            await asyncio.sleep(random.uniform(0.5, 1.5))

    # --- streams ---------------------------------------------------------------------------

    async def _websocket(self) -> None:
        stats = self.stats
        started = time.perf_counter()
        try:
            ws = await self.stream_session.ws_connect(
                f"{self.base}/v1/sessions/{self.session_id}/ws", protocols=(SUBPROTOCOL,),
                autoping=True, max_msg_size=1 << 20, timeout=aiohttp.ClientWSTimeout(ws_close=5),
            )  # fmt: skip
        except aiohttp.WSServerHandshakeError as exc:
            if not self.leaving:
                stats.error(f"stream:HTTP{exc.status}")
            return
        except (aiohttp.ClientError, TimeoutError):
            if not self.leaving:
                stats.error("stream:transport")
            return
        self._ws = ws
        if self.leaving and not self.started:
            self._side(self._leave_now())
        async with ws:
            async for message in ws:
                if message.type is aiohttp.WSMsgType.TEXT:
                    await self._frame(message.data, started)
                elif message.type is aiohttp.WSMsgType.ERROR:
                    break
        self._ended(ws.close_code)

    async def _event_stream(self) -> None:
        stats = self.stats
        started = time.perf_counter()
        try:
            response = await self.stream_session.get(
                f"{self.base}/v1/sessions/{self.session_id}/events",
                headers={"Accept": "text/event-stream"},
            )
        except (aiohttp.ClientError, TimeoutError):
            if not self.leaving:
                stats.error("stream:transport")
            return
        self._response = response
        if response.status != 200:
            await response.read()
            response.release()
            if not self.leaving:
                stats.error(f"stream:HTTP{response.status}")
            return
        code: int | None = None
        closing = False
        try:
            async for raw in response.content:
                if not raw.endswith(b"\n"):
                    break  # the connection ended inside a line: dropped (1006)
                line = raw.rstrip(b"\r\n")
                if line == b"event: close":
                    closing = True
                elif line.startswith(b"data: "):
                    if closing:
                        with contextlib.suppress(ValueError, AttributeError):
                            code = int(json.loads(line[6:]).get("code", 0))
                        break
                    await self._frame(line[6:], started)
        except (aiohttp.ClientError, asyncio.IncompleteReadError, ConnectionError):
            pass
        except RuntimeError:  # aiohttp's "Connection closed.": the drop way closed it
            if not self.leaving:
                raise
        finally:
            response.close()
        self._ended(code)

    async def _frame(self, data: str | bytes, started: float) -> None:
        stats = self.stats
        now = time.time_ns()
        try:
            frame = json.loads(data)
            kind, seq = frame["type"], frame["seq"]
            updates = frame["updates"]
            published = [int(update["publishedAtUnixNanos"]) for update in updates]
        except (ValueError, KeyError, TypeError):
            stats.error("decode:frame")
            return
        # The snapshot is seq 1 and comes once; each later frame is the one after the last.
        expected = 1 if kind == "snapshot" else self.last_seq + 1
        if seq != expected or (kind == "snapshot") == self.started:
            stats.error("decode:seq")
        self.last_seq = seq
        if kind == "snapshot":
            if not self.started:
                self.started = True
                stats.streams_started += 1
                stats.start_latency.add(time.perf_counter() - started)
                if self.leaving:
                    self._side(self._leave_now())
            return
        stats.batches += 1
        stats.updates += len(updates)
        # slow readers' latency is their own doing: only the others' is the service's
        delivery = stats.delivery if not self.slow else Counter()
        per_bucket = self.nanos_per_bucket
        for published_at in published:
            delivery[(now - published_at) // per_bucket] += 1
        if self.slow:
            await asyncio.sleep(self.config.slow_read_delay)

    def _ended(self, code: int | None) -> None:
        """The stream is over: an error unless the user left (or asked the server to end it)."""
        if self.leaving:
            return
        if self.slow and code in (SLOW_CONSUMER, None, 1006):
            # A reader that stopped is aborted at its cut-off (its close frame cannot pass
            # its full window): to it, the 4008 looks like a drop.
            self.stats.slow_cut_off += 1
        else:
            self.stats.error(f"stream:{code if code is not None else 1006}")

    # --- leaving ---------------------------------------------------------------------------

    def leave(self) -> None:
        if self.leaving:
            return
        self.leaving = True
        self.stats.leaves[self.way] += 1
        if self._streaming and self.started:
            self._side(self._leave_now())
        elif self._streaming and self.task is not None:
            # before the snapshot the server may not hold the stream yet: delete the session,
            # then stop waiting
            self._side(self._delete(cancel=self.task))

    async def _leave_now(self) -> None:
        if self.way == "delete":
            await self._delete()  # the server ends the stream with 1000
        elif self.way == "close" and self._ws is not None:
            await self._ws.close(code=aiohttp.WSCloseCode.OK, message=b"bye")
        else:
            await self.release()  # drop: close the user's own connection

    async def _delete(self, cancel: asyncio.Task[None] | None = None) -> None:
        try:
            async with self.http.delete(
                f"{self.base}/v1/sessions/{self.session_id}", headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=10),
            ) as response:  # fmt: skip
                await response.read()
                if response.status not in (204, 404):
                    self.stats.error(f"close:HTTP{response.status}")
        except (aiohttp.ClientError, TimeoutError):
            self.stats.error("close:transport")
        if cancel is not None:
            cancel.cancel()

    async def release(self) -> None:
        """Close what this user holds of its own (the drop way's session: its TCP connection
        goes without a close frame)."""
        if self.own is not None and not self.own.closed:
            await self.own.close()
        elif self._response is not None:
            self._response.close()

    def _side(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.side_tasks.add(task)
        task.add_done_callback(self.side_tasks.discard)


async def close_quietly(session: aiohttp.ClientSession) -> None:
    with contextlib.suppress(Exception):
        await session.close()
