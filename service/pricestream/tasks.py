"""Task helpers that make sure a cancelled task really ends."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any

_RECANCEL_SECONDS = 0.5


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel tasks and wait until every one has ended.

    Cancels again while any is still running: on Python 3.11 ``asyncio.wait_for`` (used inside
    redis-py) can swallow a cancellation that races with its inner operation finishing.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=_RECANCEL_SECONDS)


async def run_until_first_failure(*coroutines: Coroutine[Any, Any, None]) -> None:
    """Run coroutines together; when one ends or fails, cancel the rest and re-raise."""
    tasks = [asyncio.ensure_future(coro) for coro in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        await cancel_and_wait(tasks)
