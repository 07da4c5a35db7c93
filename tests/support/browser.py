"""Helpers of tests/test_browser.py: the live page in a real headless Chromium, and prices
published to Redis the way `pricestream feed` publishes them, at prices a test chooses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pricestream.redis.broker import RedisPricePublisher
from pricestream.v1.pricestream_pb2 import PriceUpdate
from redis.asyncio import Redis

from support.waiting import IN_CI, require_binary

try:
    from playwright.async_api import Page, async_playwright
except ImportError:  # the dev extra is not installed
    async_playwright = None

# Debian's chromium, as Playwright drives it here: no sandbox (containers, root), no GPU, and
# nothing a fresh profile would otherwise fetch from the network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

State = dict[str, Any]


def require_playwright() -> None:
    if async_playwright is None:
        message = "playwright is not installed (pip install -e '.[dev]')"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


class LivePage:
    """The page at GET / in one browser tab, read through its ``window.pricestream`` state and
    its DOM. Every wait polls and fails with the last state it saw."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []  # uncaught exceptions in the page
        self.console: list[str] = []  # everything the page logged, for a failure's report
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", lambda msg: self.console.append(f"{msg.type}: {msg.text}"))
        page.on("request", lambda r: self.console.append(f"request: {r.method} {r.url}"))
        page.on("requestfailed", lambda r: self.console.append(f"failed: {r.url} {r.failure}"))

    async def open(self, web_port: int, query: str = "") -> None:
        await self.page.goto(f"http://127.0.0.1:{web_port}/{query}")

    async def state(self) -> State:
        return await self.page.evaluate("window.pricestream")

    async def wait_for(
        self, predicate: Callable[[State], bool], what: str, timeout: float = 10.0
    ) -> State:
        """The first state for which ``predicate`` holds; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            state = await self.state()
            if predicate(state):
                return state
            if time.monotonic() > deadline:
                status = await self.text("#status")
                raise AssertionError(
                    f"not within {timeout}s: {what}; status {status!r}; last state: {state}"
                )
            await asyncio.sleep(0.05)

    async def holds_for(
        self, predicate: Callable[[State], bool], what: str, seconds: float
    ) -> None:
        """``predicate`` holds on every poll for ``seconds`` (to show something does NOT happen)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            state = await self.state()
            assert predicate(state), f"{what} stopped holding; state: {state}"
            await asyncio.sleep(0.1)

    async def text(self, selector: str) -> str:
        return (await self.page.text_content(selector) or "").strip()

    async def wait_for_text(self, selector: str, expected: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while (shown := await self.text(selector)) != expected:
            if time.monotonic() > deadline:
                raise AssertionError(f"{selector} shows {shown!r}, not {expected!r}")
            await asyncio.sleep(0.05)

    async def row(self, ticker: str) -> dict[str, str]:
        """The row's cells as shown: price, change (and its up/down class), age."""
        row = f'#prices tr[data-ticker="{ticker}"]'
        return {
            "price": await self.text(f"{row} .price"),
            "change": await self.text(f"{row} .change"),
            "direction": await self.page.get_attribute(f"{row} .change", "class") or "",
            "age": await self.text(f"{row} .age"),
        }

    async def wait_for_row(
        self, ticker: str, predicate: Callable[[dict[str, str]], bool], what: str, timeout: float
    ) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            row = await self.row(ticker)
            if predicate(row):
                return row
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout}s: {what}; row {ticker}: {row}")
            await asyncio.sleep(0.05)

    async def screenshot(self, name: str, tmp_path: Path) -> list[Path]:
        """Saved under ``tmp_path`` and, if set, ``$SCREENSHOT_DIR``; the paths."""
        image = await self.page.screenshot(full_page=True)
        folders = [tmp_path]
        if os.environ.get("SCREENSHOT_DIR"):
            folders.append(Path(os.environ["SCREENSHOT_DIR"]))
        return await asyncio.to_thread(_save, image, name, folders)


def _save(image: bytes, name: str, folders: list[Path]) -> list[Path]:
    paths = []
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.write_bytes(image)
        print(f"screenshot: {path}")
        paths.append(path)
    return paths


@contextlib.asynccontextmanager
async def live_browser(profile: Path) -> AsyncIterator[LivePage]:
    """Debian's chromium, headless, with a fresh profile; one tab. Missing chromium or
    Playwright fails in CI and skips elsewhere."""
    chromium = require_binary("chromium")
    require_playwright()
    assert async_playwright is not None
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(profile), executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            live = LivePage(page)
            try:
                yield live
            finally:
                print("browser console:", *live.console[-40:], sep="\n  ")
        finally:
            await context.close()


class PriceDesk:
    """Publishes chosen prices to Redis as `pricestream feed` does (the last price at
    ``price:last:{T}``, the update on ``price:{T}``), each ticker's sequence rising by one."""

    def __init__(self, redis_url: str) -> None:
        self.client = Redis.from_url(redis_url, socket_timeout=2)
        self.publisher = RedisPricePublisher(self.client)
        self.sequences: dict[str, int] = {}

    async def publish(self, prices: dict[str, float]) -> float:
        """Publish ``prices`` at once; the publish time in Unix milliseconds."""
        now_ns = time.time_ns()
        batch = []
        for ticker, price in prices.items():
            self.sequences[ticker] = self.sequences.get(ticker, 0) + 1
            update = PriceUpdate(
                ticker=ticker,
                price=price,
                published_at_unix_nanos=now_ns,
                sequence=self.sequences[ticker],
            )
            batch.append((ticker, update.SerializeToString()))
        await self.publisher.publish_prices(batch)
        return now_ns / 1e6

    async def aclose(self) -> None:
        await self.client.aclose()
