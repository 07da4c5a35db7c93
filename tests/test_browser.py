"""The live page at GET / in a real headless browser (Debian's chromium driven by Playwright)
against a real `pricestream serve` process: it creates a session over REST, streams prices over
WebSocket (or SSE), shows them, ends its session with 1000, survives a server restart, makes a
new session when its own is lost (4004), and sends a bearer token from the URL fragment.

Each test reads the page's ``window.pricestream`` state and its table; every wait is bounded
and fails with the last state seen (support/browser.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

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
