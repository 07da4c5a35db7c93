"""The live page at GET / in a real headless browser (Debian's chromium driven by Playwright)
against a real `pricestream serve` process: it creates a session over REST, streams prices over
WebSocket (or SSE), shows them, ends its session with 1000, survives a server restart, makes a
new session when its own is lost (4004), and sends a bearer token from the URL fragment. How
it answers close codes a real server cannot be made to send on cue (a stream ended right after
its snapshot, 4009, 1002) is checked with the server's socket end scripted in the browser
(Playwright's WebSocket routing), REST still going to the real server.

Each test reads the page's ``window.pricestream`` state and its table; every wait is bounded
and fails with the last state seen (support/browser.py)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from support.browser import LivePage, PriceDesk, live_browser
from support.processes import ServeProcess
from support.settings import fast_env

# The seed's 500 ms flush window: "within two flush intervals" (1 s) is then a bound the test
# can assert on a busy two-core machine. Sessions stay resumable long enough for a restart.
FLUSH_INTERVAL = 0.5
BROWSER_SETTINGS = {"flush_interval": FLUSH_INTERVAL, "session_ttl": 60.0, "resume_grace": 30.0}
DEFAULT_TICKERS = ["AAPL", "MSFT", "GOOG", "AMZN", "TSLA"]
OPENING = {"AAPL": 400.0, "MSFT": 200.0, "GOOG": 150.0, "AMZN": 180.0, "TSLA": 250.0}


@pytest.fixture
def serve(redis, tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Starts `pricestream serve` processes on this test's Redis; stops them all at the end
    (their log tails are printed: pytest shows them when the test fails)."""
    started: list[ServeProcess] = []

    def start(**overrides: object) -> ServeProcess:
        settings = {**BROWSER_SETTINGS, **overrides}
        log = tmp_path / f"serve{len(started)}.log"
        proc = ServeProcess(fast_env(redis.url, **settings), log)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
        print(f"--- {proc.log_path.name}:", *proc.log_path.read_text().splitlines()[-30:], sep="\n")


@pytest.fixture
async def desk(redis) -> AsyncIterator[PriceDesk]:
    desk = PriceDesk(redis.url)
    yield desk
    await desk.aclose()


@pytest.fixture
async def page(tmp_path: Path) -> AsyncIterator[LivePage]:
    async with live_browser(tmp_path / "chromium-profile") as live:
        yield live


def forget_session(redis, session_id: str) -> None:
    """Delete every Redis key of the session (its hash, lease, tombstone)."""
    client = redis.client()
    keys = client.keys(f"*{session_id}*")
    assert keys, "the session has no key in Redis"
    client.delete(*keys)
    client.close()


def streaming(transport: str, snapshots: int = 1) -> Callable[[dict], bool]:
    return lambda s: s["connected"] and s["transport"] == transport and s["snapshots"] == snapshots


async def test_page_shows_a_snapshot_then_each_new_price(serve, desk, page, tmp_path) -> None:
    server = serve()
    await desk.publish(OPENING)  # every ticker has a last price before the page opens

    await page.open(server.web_port)
    state = await page.wait_for(streaming("websocket"), "the snapshot over a WebSocket")
    assert state["sessionId"] and await page.text("#session") == state["sessionId"]
    assert await page.text("#transport") == "websocket"
    assert await page.text("#status") == "streaming (websocket)"
    # Nothing was published since: the snapshot (seq 1) is the only frame.
    assert (state["frames"], state["lastSeq"], state["seqGaps"]) == (1, 1, 0)
    assert sorted(state["prices"]) == sorted(DEFAULT_TICKERS)
    assert (await page.row("AAPL"))["price"] == "400.00"

    published_ms = await desk.publish({"AAPL": 410.0, "MSFT": 190.0})
    aapl = await page.wait_for_row(
        "AAPL", lambda r: r["price"] == "410.00", "AAPL's new price shown", timeout=5
    )
    state = await page.state()
    latency_ms = state["prices"]["AAPL"]["receivedAt"] - published_ms
    print(f"publish -> page: {latency_ms:.0f} ms (flush interval {FLUSH_INTERVAL * 1000:.0f} ms)")
    assert latency_ms <= 2 * FLUSH_INTERVAL * 1000, "not within two flush intervals"
    assert (aapl["change"], aapl["direction"]) == ("+10.00 (+2.50%)", "change up")
    msft = await page.row("MSFT")
    assert (msft["price"], msft["change"], msft["direction"]) == (
        "190.00",
        "-10.00 (-5.00%)",
        "change down",
    )
    assert state["prices"]["AAPL"]["sequence"] == "2"  # a 64-bit integer arrives as a string
    assert state["snapshots"] == 1 and state["lastSeq"] >= 2 and state["seqGaps"] == 0

    # The age column counts on (every 500 ms) with no new price.
    goog_age = (await page.row("GOOG"))["age"]
    assert goog_age.endswith(" s"), goog_age
    await page.wait_for_row("GOOG", lambda r: r["age"] != goog_age, "GOOG's age ticking", timeout=3)
    await page.screenshot("browser-live.png", tmp_path)
    assert page.errors == []


async def test_end_session_closes_with_1000_and_stays_closed(serve, desk, page) -> None:
    server = serve()
    await desk.publish(OPENING)
    await page.open(server.web_port)
    state = await page.wait_for(streaming("websocket"), "the snapshot over a WebSocket")

    await page.page.click("#end")  # DELETE /v1/sessions/{id} -> 204; the server closes 1000
    state = await page.wait_for(lambda s: s["closes"] == [1000], "the close code 1000")
    assert not state["connected"]
    assert await page.text("#status") == "session closed"
    await page.holds_for(
        lambda s: s["reconnects"] == 0 and s["closes"] == [1000] and not s["connected"],
        "no reconnect after a 1000",
        seconds=2.0,
    )
    status = await page.page.evaluate(
        "id => fetch(`/v1/sessions/${id}`).then(r => r.status)", state["sessionId"]
    )
    assert status == 404  # the session is gone on the server too
    assert page.errors == []


async def test_server_restart_is_followed_by_a_reconnect_and_a_fresh_snapshot(
    serve, desk, page
) -> None:
    first = serve()
    await desk.publish(OPENING)
    await page.open(first.web_port)
    before = await page.wait_for(streaming("websocket"), "the snapshot over a WebSocket")

    # SIGTERM: the drain closes the socket with 1001, then the process exits.
    assert await asyncio.to_thread(first.terminate) == 0
    await desk.publish({"TSLA": 260.0})  # while no server runs: the next snapshot brings it
    second = await asyncio.to_thread(serve, web_port=first.web_port)  # same port, same Redis

    state = await page.wait_for(
        streaming("websocket", snapshots=2), "a reconnect and a fresh snapshot", timeout=30
    )
    print("close codes seen:", state["closes"])
    assert {1001, 1006} & set(state["closes"]), state["closes"]
    assert state["reconnects"] >= 1
    assert state["sessionId"] == before["sessionId"]  # resumed from Redis, not a new session
    assert state["seqGaps"] == 0  # the new stream's snapshot is seq 1 again
    assert (await page.row("TSLA"))["price"] == "260.00"

    await desk.publish({"AAPL": 420.0})
    await page.wait_for_row(
        "AAPL", lambda r: r["price"] == "420.00", "a new price after the restart", timeout=5
    )
    assert second.web_port == first.web_port
    assert page.errors == []


async def test_a_session_lost_with_its_server_is_replaced_by_a_new_one(
    serve, desk, redis, page
) -> None:
    first = serve()
    await desk.publish(OPENING)
    await page.open(first.web_port)
    before = await page.wait_for(streaming("websocket"), "the snapshot over a WebSocket")

    assert await asyncio.to_thread(first.terminate) == 0
    await asyncio.to_thread(forget_session, redis, before["sessionId"])  # as Redis lost it
    second = await asyncio.to_thread(serve, web_port=first.web_port)

    # The stream is refused with 4004 (session unknown): the page creates a new session.
    state = await page.wait_for(
        lambda s: 4004 in s["closes"] and s["connected"] and s["snapshots"] == 2,
        "a new session after 4004",
        timeout=30,
    )
    assert state["sessionId"] != before["sessionId"]
    assert await page.text("#session") == state["sessionId"]
    await desk.publish({"MSFT": 205.0})
    await page.wait_for_row(
        "MSFT", lambda r: r["price"] == "205.00", "a price on the new session", timeout=5
    )
    assert second.web_port == first.web_port
    assert page.errors == []


async def test_sse_fallback_streams_the_same_prices(serve, desk, page) -> None:
    server = serve()
    await desk.publish({"NVDA": 120.0, "AMD": 160.0})
    await page.open(server.web_port, "?transport=sse&tickers=NVDA,AMD")
    state = await page.wait_for(streaming("sse"), "the snapshot over EventSource")
    assert await page.text("#transport") == "sse"
    assert sorted(state["prices"]) == ["AMD", "NVDA"]
    assert (state["frames"], state["lastSeq"], state["seqGaps"]) == (1, 1, 0)

    await desk.publish({"NVDA": 132.0})
    nvda = await page.wait_for_row(
        "NVDA", lambda r: r["price"] == "132.00", "NVDA's new price over SSE", timeout=5
    )
    assert nvda["change"] == "+12.00 (+10.00%)"

    await page.page.click("#end")  # the event stream ends with `event: close`, code 1000
    await page.wait_for(lambda s: s["closes"] == [1000], "the close event 1000")
    await page.holds_for(lambda s: s["reconnects"] == 0, "no reconnect after 1000", seconds=1.0)
    state = await page.state()
    assert state["seqGaps"] == 0
    assert page.errors == []


async def test_bearer_token_from_the_url_fragment_goes_on_rest_calls(serve, desk, page) -> None:
    server = serve(auth_tokens="browser-secret")
    await desk.publish(OPENING)

    await page.open(server.web_port)  # no token: the REST call is refused with 401
    await page.wait_for_text("#status", "error: missing or invalid bearer token")
    assert (await page.state())["sessionId"] is None

    await page.open(server.web_port, "?tickers=AAPL#token=browser-secret")
    state = await page.wait_for(streaming("websocket"), "a session with the token")
    assert sorted(state["prices"]) == ["AAPL"]
    assert page.errors == []


async def test_a_price_that_is_not_a_number_is_shown_as_sent_and_breaks_nothing(
    serve, desk, page
) -> None:
    """proto3's JSON sends a NaN or infinite price as the string "NaN" / "Infinity": the
    page shows it as it came, keeps the ticker's change waiting for a real price, and the
    rest of the frame (MSFT here) is still shown."""
    server = serve()
    await desk.publish(OPENING)
    await page.open(server.web_port)
    await page.wait_for(streaming("websocket"), "the snapshot over a WebSocket")

    await desk.publish({"AAPL": float("nan"), "MSFT": 210.0})
    await page.wait_for_row("MSFT", lambda r: r["price"] == "210.00", "MSFT's price", timeout=5)
    aapl = await page.row("AAPL")
    assert (aapl["price"], aapl["change"], aapl["direction"]) == ("NaN", "\u2013", "change")
    await desk.publish({"AAPL": 404.0})
    aapl = await page.wait_for_row(
        "AAPL", lambda r: r["price"] == "404.00", "AAPL's next real price", timeout=5
    )
    assert aapl["change"] == "+4.00 (+1.00%)"  # against the first real price, 400
    assert page.errors == []


class ScriptedSocket:
    """Stands in for the server's WebSocket end in the page's browser (Playwright's
    WebSocket routing; REST still goes to the real server): every socket the page opens is
    answered by ``answer`` and the moment of each is kept."""

    def __init__(self, answer: Callable[[Any], Any]) -> None:
        self.answer = answer
        self.opened: list[float] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    def __call__(self, ws: Any) -> None:
        # The page's socket opens once this returns: the answer runs after, on its own.
        self.opened.append(time.monotonic())
        task = asyncio.get_running_loop().create_task(self.answer(ws))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def snapshot_then_1013(ws: Any) -> None:
    ws.send('{"type":"snapshot","seq":1,"updates":[]}')
    await ws.close(code=1013, reason="prices are unavailable; try again later")


async def test_a_stream_ended_after_its_snapshot_is_retried_with_a_growing_backoff(
    serve, page
) -> None:
    """A pod that ends every stream right after its snapshot (Redis Pub/Sub lost: 1013):
    the snapshot is no sign of health, so the backoff keeps growing, and 1013 waits at least
    a second. (When a frame reset the backoff, the page reconnected 3-4 times a second.)"""
    server = serve()
    sockets = ScriptedSocket(snapshot_then_1013)
    await page.page.route_web_socket("**/ws", sockets)
    await page.open(server.web_port)
    await page.wait_for(lambda s: len(s["closes"]) >= 1, "the first 1013")
    await asyncio.sleep(6.0)
    state = await page.state()
    opened = list(sockets.opened)
    # Each retry waits 1 s plus a jitter that doubles (0.25, 0.5, 1, 2 s...): the k-th socket
    # comes at least k s after the first, so at most 5 come within 5 s (when a frame reset
    # the backoff: about 20). Moments are taken here, so allow 0.1 s of skew per gap.
    assert len([t for t in opened if t - opened[0] < 5.0]) <= 5, opened
    gaps = [b - a for a, b in pairwise(opened)]
    assert len(gaps) >= 1 and min(gaps) >= 0.9, gaps
    assert set(state["closes"]) == {1013} and state["snapshots"] >= 2
    assert page.errors == []


async def test_a_session_streamed_elsewhere_for_30_s_is_left_for_a_new_one(serve, page) -> None:
    """4009 (another client holds the session): retried with a backoff, and after 30 s of
    it (longer than a crashed pod's lease lives) the page creates a new session instead of
    waiting forever."""
    server = serve()

    async def busy(ws: Any) -> None:
        await asyncio.sleep(0.05)  # open first, as the server's 101 comes before its close
        await ws.close(code=4009, reason="the session is already streaming")

    await page.page.route_web_socket("**/ws", ScriptedSocket(busy))
    await page.open(server.web_port)
    first = await page.wait_for(lambda s: 4009 in s["closes"], "the first 4009")
    state = await page.wait_for(
        # 30 s of 4009s, then the close that finds them 30 s old (a backoff of up to 10 s)
        lambda s: s["sessionId"] != first["sessionId"],
        "a new session after 30 s",
        timeout=60,
    )
    assert set(state["closes"]) == {4009} and len(state["closes"]) >= 2
    assert state["transport"] == "websocket"  # the sockets opened: no fallback to SSE
    assert page.errors == []


async def test_a_close_code_for_a_client_bug_stops_the_page(serve, page) -> None:
    """1002 (the client broke the protocol) and codes the page does not know stop it: a
    retry would only repeat the bug."""
    server = serve()

    async def protocol_error(ws: Any) -> None:
        await asyncio.sleep(0.05)
        await ws.close(code=1002, reason="protocol error")

    sockets = ScriptedSocket(protocol_error)
    await page.page.route_web_socket("**/ws", sockets)
    await page.open(server.web_port)
    await page.wait_for_text("#status", "stopped (1002: protocol error)")
    await page.holds_for(lambda s: s["closes"] == [1002], "no retry after 1002", seconds=2.0)
    assert len(sockets.opened) == 1


async def test_end_session_stays_ended_whatever_its_socket_says_next(serve, page) -> None:
    """End while the socket is not closed by the server's 1000 yet (here: a socket that then
    says 4004, as one still in its handshake does once its session is deleted): the page
    stays ended; the 4004 does not make it create a new session."""
    server = serve()
    ended = asyncio.Event()

    async def unknown_after_end(ws: Any) -> None:
        await ended.wait()
        await ws.close(code=4004, reason="session unknown")

    await page.page.route_web_socket("**/ws", ScriptedSocket(unknown_after_end))
    await page.open(server.web_port)
    before = await page.wait_for(lambda s: s["connected"], "the socket open")
    await page.page.click("#end")  # DELETE /v1/sessions/{id}: 204
    await asyncio.sleep(0.3)  # the DELETE done (whether it is or not, the page is ending)
    ended.set()
    await page.wait_for(lambda s: s["closes"] == [4004], "the socket's 4004")
    await page.holds_for(
        lambda s: s["sessionId"] == before["sessionId"] and s["reconnects"] == 0,
        "no new session after End",
        seconds=2.0,
    )
    assert await page.text("#status") == "session closed"
    assert page.errors == []


async def test_a_dropped_event_stream_reconnects_with_the_pages_backoff(serve, desk, page) -> None:
    """An EventSource reconnects by itself every `retry` ms, every client of a crashed pod in
    step: the page closes it instead, and reconnects the same session with its own jittered
    backoff (the close shows as 1006), to a fresh snapshot."""
    first = serve()
    await desk.publish(OPENING)
    await page.open(first.web_port, "?transport=sse")
    before = await page.wait_for(streaming("sse"), "the snapshot over EventSource")

    assert await asyncio.to_thread(first.terminate) == 0
    await page.wait_for(lambda s: 1006 in s["closes"], "the drop seen as 1006")
    assert (await page.text("#status")).startswith("disconnected (1006")
    await asyncio.to_thread(serve, web_port=first.web_port)
    state = await page.wait_for(
        streaming("sse", snapshots=2), "a reconnect and a fresh snapshot", timeout=30
    )
    assert state["sessionId"] == before["sessionId"] and state["reconnects"] >= 1
    assert page.errors == []


async def test_a_busy_event_stream_is_a_4009_to_the_page(serve, page) -> None:
    """An EventSource refused (409: another client streams the session) reports only an
    error: the page asks the session (streaming: true) and counts it as a 4009, with its
    backoff, as over a WebSocket. (The stream and the session's answer are scripted.)"""
    server = serve()

    async def busy(route: Any) -> None:
        await route.fulfill(
            status=409, content_type="application/json", body='{"error": {"code": "conflict"}}'
        )

    async def streaming_elsewhere(route: Any) -> None:
        if route.request.method != "GET":
            await route.continue_()
            return
        await route.fulfill(status=200, content_type="application/json", body='{"streaming": true}')

    await page.page.route("**/events", busy)
    await page.page.route("**/v1/sessions/*", streaming_elsewhere)
    await page.open(server.web_port, "?transport=sse")
    state = await page.wait_for(lambda s: len(s["closes"]) >= 2, "two refusals", timeout=15)
    assert set(state["closes"]) == {4009}
    # Between reconnects (each after a backoff of its own) the status says why.
    await wait_for_status(page, "disconnected (4009")
    assert page.errors == []


async def test_an_event_stream_refused_for_now_is_a_1013_to_the_page(serve, page) -> None:
    """An EventSource refused with 503 (the pod's admission rate, its limit, a drain) on a
    session that exists and is not streamed counts as 1013: the page waits a second more,
    as for the WebSocket's 1013, instead of retrying it as a drop."""
    server = serve()

    async def refused(route: Any) -> None:
        await route.fulfill(
            status=503, content_type="application/json", body='{"error": {"code": "rate"}}'
        )

    await page.page.route("**/events", refused)
    await page.open(server.web_port, "?transport=sse")
    state = await page.wait_for(lambda s: len(s["closes"]) >= 2, "two refusals", timeout=15)
    assert set(state["closes"]) == {1013}
    assert page.errors == []


async def wait_for_status(page: LivePage, prefix: str, timeout: float = 10.0) -> None:
    """Poll the status line until it starts with ``prefix``."""
    deadline = time.monotonic() + timeout
    while not (shown := await page.text("#status")).startswith(prefix):
        assert time.monotonic() < deadline, f"status {shown!r}, never {prefix!r}..."
        await asyncio.sleep(0.02)


async def test_end_while_a_new_session_is_being_created_deletes_it(serve, desk, page) -> None:
    """Restart, then End before the new session's POST is answered: the page ends, and the
    session that POST created is deleted instead of streaming after End."""
    server = serve()
    await desk.publish(OPENING)
    await page.open(server.web_port)
    await page.wait_for(streaming("websocket"), "the first session streaming")
    release = asyncio.Event()
    created: list[str] = []

    async def held_create(route: Any) -> None:
        if route.request.method != "POST":
            await route.continue_()
            return
        await release.wait()
        response = await route.fetch()
        created.append(json.loads(await response.text())["session_id"])
        await route.fulfill(response=response)

    await page.page.route("**/v1/sessions", held_create)
    await page.page.click("#start")  # Restart: a new session is being created
    await page.wait_for_text("#status", "creating a session…")
    await page.page.click("#end")
    release.set()
    await page.wait_for_text("#status", "session closed")
    await wait_for_created(created)
    await page.holds_for(lambda s: not s["connected"], "nothing streams after End", seconds=1.0)
    status = await page.page.evaluate(
        "id => fetch(`/v1/sessions/${id}`).then(r => r.status)", created[0]
    )
    assert status == 404  # deleted, not left pending until its TTL
    assert page.errors == []


async def wait_for_created(created: list[str]) -> None:
    for _ in range(100):
        if created:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the held POST was never answered")


class HeldCreates:
    """Holds every POST /v1/sessions of the page until ``release``; the ids they created."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.created: list[str] = []

    async def __call__(self, route: Any) -> None:
        if route.request.method != "POST":
            await route.continue_()
            return
        await self.release.wait()
        response = await route.fetch()
        self.created.append(json.loads(await response.text())["session_id"])
        await route.fulfill(response=response)

    async def answered(self, count: int) -> list[str]:
        for _ in range(200):
            if len(self.created) >= count:
                return self.created
            await asyncio.sleep(0.05)
        raise AssertionError(f"{len(self.created)} of {count} held POSTs answered")


async def session_status(page: LivePage, session_id: str) -> int:
    return await page.page.evaluate(
        "id => fetch(`/v1/sessions/${id}`).then(r => r.status)", session_id
    )


async def test_end_before_the_first_session_exists_ends_the_page(serve, page) -> None:
    """End while the page's first session is still being created: the page stays ended, and
    that session is deleted when its POST is answered."""
    server = serve()
    held = HeldCreates()
    await page.page.route("**/v1/sessions", held)
    await page.open(server.web_port)
    await page.wait_for_text("#status", "creating a session…")
    await page.page.click("#end")
    await page.wait_for_text("#status", "session closed")
    held.release.set()
    [created] = await held.answered(1)
    await page.holds_for(lambda s: not s["connected"], "nothing streams after End", seconds=1.0)
    assert await page.text("#status") == "session closed"
    assert await session_status(page, created) == 404
    assert page.errors == []


async def test_a_session_created_for_a_superseded_start_is_deleted(serve, page) -> None:
    """Restart twice before the first POST is answered: the page streams the second
    session, and the first, never used, is deleted instead of holding a slot until its
    TTL."""
    server = serve()
    await page.open(server.web_port)
    await page.wait_for(streaming("websocket"), "the first session streaming")
    held = HeldCreates()
    await page.page.route("**/v1/sessions", held)
    await page.page.click("#start")
    await page.wait_for_text("#status", "creating a session…")
    await page.page.click("#start")
    held.release.set()
    first, second = await held.answered(2)
    state = await page.wait_for(
        lambda s: s["connected"] and s["sessionId"] in (first, second), "the last Restart's"
    )
    kept = state["sessionId"]
    dropped = first if kept == second else second
    deadline = time.monotonic() + 5
    while await session_status(page, dropped) != 404:
        assert time.monotonic() < deadline, "the superseded session was not deleted"
        await asyncio.sleep(0.1)
    assert await session_status(page, kept) == 200
    assert page.errors == []
