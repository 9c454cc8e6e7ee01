"""`supportbot chat`: a conversation in the terminal through the same service as the platforms.

SIGTERM and SIGHUP (a closed terminal) end the conversation like EOF does, so the runtime closes:
the embedded redis-server is stopped and its socket directory removed. Ctrl-C does the same
through asyncio.run's own SIGINT handling.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

from bot.commands.runtime import build
from bot.config import Settings
from bot.platforms.console import run_console

_ENDING = (signal.SIGTERM, signal.SIGHUP)


async def run(settings: Settings, channel: str) -> int:
    loop = asyncio.get_running_loop()
    this = asyncio.current_task()
    received: list[int] = []

    def end(signum: int) -> None:
        received.append(signum)
        if this is not None:
            this.cancel()

    for signum in _ENDING:
        loop.add_signal_handler(signum, end, signum)
    try:
        runtime = await build(settings)
        try:
            return await run_console(runtime.service, channel)
        finally:
            # Shielded: a second signal must not cut the clean-up short.
            await asyncio.shield(runtime.aclose())
    except asyncio.CancelledError:
        if not received:
            raise
        return 128 + received[0]  # the shell's convention for "ended by signal N"
    finally:
        for signum in _ENDING:
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(signum)
