"""`supportbot chat`: a conversation in the terminal through the same service as the platforms."""

from __future__ import annotations

from bot.commands.runtime import build
from bot.config import Settings
from bot.platforms.console import run_console


async def run(settings: Settings, channel: str) -> int:
    runtime = await build(settings)
    try:
        return await run_console(runtime.service, channel)
    finally:
        await runtime.aclose()
