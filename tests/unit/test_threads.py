"""bot/ops/threads.py: torch work runs on a thread that ends with it (its OpenMP team with it),
with the caller's context, and its errors reach the caller."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from bot.ops.threads import on_own_thread

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def ended(thread: threading.Thread) -> bool:
    thread.join(timeout=5)
    return not thread.is_alive()


async def test_the_work_runs_off_the_loop_on_a_thread_that_then_ends():
    seen: list[threading.Thread] = []

    def work(a: int, *, b: int) -> int:
        seen.append(threading.current_thread())
        return a + b

    assert await on_own_thread(work, 2, b=3) == 5
    assert await on_own_thread(work, 4, b=5) == 9
    assert seen[0] is not threading.main_thread() and seen[0] is not seen[1]
    assert all(ended(t) for t in seen)


async def test_the_callers_context_goes_along_and_errors_come_back():
    request_id.set("abc123")
    assert await on_own_thread(request_id.get) == "abc123"

    def broken() -> None:
        raise ValueError("no such passage")

    with pytest.raises(ValueError, match="no such passage"):
        await on_own_thread(broken)


async def test_a_cancelled_caller_stops_waiting_and_the_thread_still_ends():
    release = threading.Event()
    seen: list[threading.Thread] = []

    def slow() -> str:
        seen.append(threading.current_thread())
        release.wait(5)
        return "done"

    task = asyncio.create_task(on_own_thread(slow))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    assert ended(seen[0])
