"""Task helpers that make sure a cancelled task really ends."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any

_RECANCEL_SECONDS = 0.5


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel tasks and wait until every one has ended, even if the caller is cancelled meanwhile.

    Cancels again while any is still running: on Python 3.11 ``asyncio.wait_for`` (used inside
    redis-py) can swallow a cancellation that races with its inner operation finishing. A
    cancellation of the caller is re-raised only once every task has ended, so no task is
    ever orphaned half-cancelled.
    """
    pending = {task for task in tasks if not task.done()}
    caller_cancelled = False
    while pending:
        for task in pending:
            task.cancel()
        try:
            _, pending = await asyncio.wait(pending, timeout=_RECANCEL_SECONDS)
        except asyncio.CancelledError:
            caller_cancelled = True
            pending = {task for task in pending if not task.done()}
    if caller_cancelled:
        raise asyncio.CancelledError


def cancel_until_ended(task: asyncio.Task[Any]) -> None:
    """Cancel a task without waiting for it, and cancel it again every ``_RECANCEL_SECONDS``
    until it has ended (a cancellation can be lost: see ``cancel_and_wait``). For a task
    whose owner lets go of it and does not wait: each repeat is a timer of the event loop,
    and none is left once the task has ended."""
    if task.done():
        return
    task.cancel()
    asyncio.get_running_loop().call_later(_RECANCEL_SECONDS, cancel_until_ended, task)


async def run_until_first_failure(*coroutines: Coroutine[Any, Any, None]) -> None:
    """Run coroutines together; when one ends or fails, cancel the rest and re-raise."""
    tasks = [asyncio.ensure_future(coro) for coro in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        await cancel_and_wait(tasks)
