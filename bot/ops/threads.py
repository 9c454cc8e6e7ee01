"""Blocking torch work off the event loop, on a thread that ends with it.

torch runs CPU operators on an OpenMP team per calling thread, and the team lives as long as the
thread. While a process holds more OpenMP threads than the host has cores, GNU OpenMP stops its
teams spinning between parallel regions, so each of the hundreds of small operators in a decode
step waits for a sleeping thread to wake. `asyncio.to_thread` runs work on pooled threads that
never end: one knowledge question embedded there left a team behind that slowed every later token
of the local model on a 2-core host from 37 to 53 ms (tests/benchmarks/threads_bench.py). So
torch work that is not the engine's own (loading a model, starting the engine, embedding a
question or a document) runs through `on_own_thread`.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


async def on_own_thread(work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`work(*args, **kwargs)` on a new thread, which ends (and frees its OpenMP team) after it.

    Like `asyncio.to_thread`: the caller's context variables (the log correlation id) go along,
    and a cancelled caller stops waiting while the work runs to its end.
    """
    context = contextvars.copy_context()
    call = functools.partial(context.run, work, *args, **kwargs)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-work")
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, call)
    finally:
        executor.shutdown(wait=False)  # the thread exits once the work returns
