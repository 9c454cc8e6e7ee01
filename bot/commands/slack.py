"""`supportbot slack`: check the credentials, identify the bot, build the runtime once, serve the
Slack app until SIGTERM/SIGINT, then let answers in flight finish before closing the runtime.

Every start-up step races the stop signal: SIGTERM while Slack or Redis is slow to answer, or
while the model loads, stops at once (exit 0), closing what was opened."""

from __future__ import annotations

import logging
import sys

import aiohttp

from bot.commands.runtime import build
from bot.config import Settings
from bot.platforms.frontdoor import stop_on_signals, unless_stopped
from bot.platforms.slack.app import (
    SlackApp,
    StartError,
    check_app_token,
    check_credentials,
    identify,
    web_client,
)
from bot.platforms.slack.events import Identity, Tuning

logger = logging.getLogger(__name__)


async def run(settings: Settings, *, tuning: Tuning | None = None) -> int:
    """Serve until SIGTERM/SIGINT; the exit status of the command."""
    problem = check_credentials(settings)
    if problem is not None:
        print(f"supportbot: {problem}", file=sys.stderr)
        return 2
    with stop_on_signals() as stop:
        async with aiohttp.ClientSession() as session:
            client = web_client(settings, session, tuning)

            async def check() -> Identity:
                identity = await identify(client)
                if settings.slack_app_token is not None:
                    await check_app_token(client, settings.slack_app_token.get_secret_value())
                return identity

            try:
                identity = await unless_stopped(stop, check())
            except StartError as exc:
                print(f"supportbot: {exc}", file=sys.stderr)
                return 1
            if identity is None:
                logger.info("stopped during start-up")
                return 0
            logger.info("slack bot user %s in workspace %s", identity.user_id, identity.team_id)
            runtime = await unless_stopped(stop, build(settings, require_backend=True))
            if runtime is None:
                logger.info("stopped during start-up")
                return 0
            try:
                app = await SlackApp.start(
                    settings, runtime.service, runtime.readiness, client, identity, tuning=tuning
                )
                try:
                    await stop.wait()
                    logger.info("stopping: finishing answers in flight")
                finally:
                    await app.stop()
            finally:
                await runtime.aclose()
    return 0
