"""`supportbot discord`: check the token and sharding, build the runtime once, run the Discord
client until SIGTERM/SIGINT (or until the gateway fails), then drain the answers in progress
(every one of them, those still claiming their message included) before closing the runtime."""

from __future__ import annotations

import asyncio
import logging
import sys

import discord

from bot.commands.runtime import build
from bot.config import ConfigError, Settings
from bot.ops.health import serve_health
from bot.platforms.discord.client import SupportBot, build_client, shard_config
from bot.platforms.frontdoor import stop_on_signals, unless_stopped

logger = logging.getLogger(__name__)

GATEWAY_CLOSE_S = 10.0  # how long the gateway session may take to close after the drain


async def run(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; the exit status of the command."""
    if settings.discord_token is None:
        print(
            "supportbot: DISCORD_TOKEN is not set; put the bot token from the Discord Developer "
            "Portal (Bot → Reset Token) in DISCORD_TOKEN",
            file=sys.stderr,
        )
        return 2
    try:
        shard_config(settings)
    except ConfigError as exc:
        print(f"supportbot: {exc}", file=sys.stderr)
        return 2
    with stop_on_signals() as stop:
        runtime = await unless_stopped(stop, build(settings, require_backend=True))
        if runtime is None:
            logger.info("stopped during start-up")
            return 0
        try:
            client = build_client(runtime.service, settings)
            health = await serve_health(settings.port, client.readiness(runtime.readiness))
            try:
                return await _serve(client, settings.discord_token.get_secret_value(), stop)
            finally:
                await health.cleanup()
        finally:
            await runtime.aclose()


async def _serve(client: SupportBot, token: str, stop: asyncio.Event) -> int:
    connection = asyncio.create_task(client.start(token))
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({connection, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if stop.is_set():
            logger.info("stopping: finishing answers in progress")
        # Also when the gateway failed: answers in progress must end before the runtime closes.
        await client.drain()
        await client.close()  # makes client.start() return
        await asyncio.wait({connection}, timeout=GATEWAY_CLOSE_S)
        connection.cancel()
        await asyncio.gather(connection, return_exceptions=True)
    if connection.cancelled():
        return 0
    return _exit_status(connection.exception())


def _exit_status(exc: BaseException | None) -> int:
    if exc is None:
        return 0
    if isinstance(exc, discord.LoginFailure):
        print("supportbot: Discord rejected DISCORD_TOKEN; reset the bot token", file=sys.stderr)
        return 2
    if isinstance(exc, discord.PrivilegedIntentsRequired):
        print(
            "supportbot: enable the Message Content intent for this bot in the Discord Developer "
            "Portal (Bot → Privileged Gateway Intents)",
            file=sys.stderr,
        )
        return 2
    logger.error("the Discord connection failed", exc_info=exc)
    return 1
