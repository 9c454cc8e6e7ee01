"""doctor: the Slack and Discord credentials, checked with the platforms' own clients."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiohttp

from bot.commands.doctor.checks import (
    NETWORK_TIMEOUT_S,
    Check,
    Status,
    fail,
    mask_url,
    ok,
    skip,
)
from bot.config import Settings

if TYPE_CHECKING:
    from slack_sdk.web.async_client import AsyncWebClient


# Discord application flags: the Message Content intent, approved or (unverified bots) enabled.
# https://discord.com/developers/docs/resources/application#application-object-application-flags
_MESSAGE_CONTENT_FLAGS = (1 << 18) | (1 << 19)


async def check_slack(settings: Settings) -> list[Check]:
    from slack_sdk.web.async_client import AsyncWebClient

    from bot.platforms.slack.app import DEFAULT_API_URL

    if settings.slack_bot_token is None:
        present = [
            name
            for name, value in (
                ("SLACK_SIGNING_SECRET", settings.slack_signing_secret),
                ("SLACK_APP_TOKEN", settings.slack_app_token),
            )
            if value is not None
        ]
        if present:
            return fail("slack", f"SLACK_BOT_TOKEN is not set, but {' and '.join(present)} is")
        return skip("slack", "SLACK_BOT_TOKEN not set")
    client = AsyncWebClient(
        token=settings.slack_bot_token.get_secret_value(),
        base_url=settings.slack_api_url or DEFAULT_API_URL,
        timeout=int(NETWORK_TIMEOUT_S),
    )
    auth, mode = await asyncio.gather(_slack_auth(client), _slack_mode(settings, client))
    return [auth, mode]


async def _slack_auth(client: AsyncWebClient) -> Check:
    from slack_sdk.errors import SlackApiError

    try:
        response = await asyncio.wait_for(client.auth_test(), NETWORK_TIMEOUT_S)
    except SlackApiError as exc:
        reason = exc.response.get("error") or f"HTTP {exc.response.status_code}"
        return Check("slack", Status.FAIL, f"Slack rejected SLACK_BOT_TOKEN (auth.test: {reason})")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        where = mask_url(client.base_url)
        return Check("slack", Status.FAIL, f"cannot reach {where} ({type(exc).__name__})")
    who = f"@{response.get('user')} ({response.get('user_id')})"
    team = f"{response.get('team')} ({response.get('team_id')})"
    return Check("slack", Status.OK, f"auth.test: SLACK_BOT_TOKEN is {who} in {team}")


async def _slack_mode(settings: Settings, client: AsyncWebClient) -> Check:
    from bot.platforms.slack.app import EVENTS_PATH, StartError, check_app_token, check_credentials

    if settings.slack_app_token is not None:
        try:
            app_token = settings.slack_app_token.get_secret_value()
            await asyncio.wait_for(check_app_token(client, app_token), NETWORK_TIMEOUT_S)
        except StartError as exc:  # the same line `supportbot slack` stops with
            return Check("slack-mode", Status.FAIL, str(exc))
        except TimeoutError:
            return Check("slack-mode", Status.FAIL, f"no answer from {client.base_url}")
        detail = "Socket Mode: apps.connections.open accepts SLACK_APP_TOKEN"
        return Check("slack-mode", Status.OK, detail)
    problem = check_credentials(settings)
    if problem is not None:
        return Check("slack-mode", Status.FAIL, problem)
    # Only Slack can tell whether the secret is right: its first request is refused otherwise.
    return Check(
        "slack-mode",
        Status.OK,
        f"HTTP mode: SLACK_SIGNING_SECRET is set; Slack must reach POST {EVENTS_PATH} on port "
        f"{settings.port}",
    )


async def check_discord(settings: Settings) -> list[Check]:
    if settings.discord_token is None:
        return skip("discord", "DISCORD_TOKEN not set")
    import discord

    # discord.py's own HTTP login (GET /users/@me), as the bot does before the gateway.
    http = discord.http.HTTPClient(asyncio.get_running_loop())
    try:
        user = await asyncio.wait_for(
            http.static_login(settings.discord_token.get_secret_value()), NETWORK_TIMEOUT_S
        )
        app = await asyncio.wait_for(http.application_info(), NETWORK_TIMEOUT_S)
    except discord.LoginFailure:
        return fail("discord", "Discord rejected DISCORD_TOKEN (HTTP 401): reset the bot token")
    except discord.HTTPException as exc:
        return fail("discord", f"Discord's API answered HTTP {exc.status}")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return fail("discord", f"cannot reach Discord's API ({type(exc).__name__})")
    finally:
        await http.close()
    if not isinstance(user, dict) or not isinstance(app, dict):  # e.g. a proxy's HTML page
        return fail("discord", "Discord's API answered with something other than JSON")
    who = f"{user.get('username')} (id {user.get('id')})"
    if not int(app.get("flags", 0)) & _MESSAGE_CONTENT_FLAGS:
        return fail(
            "discord",
            f"logged in as {who}, but the Message Content intent is off: turn it on in the "
            "Developer Portal (Bot → Privileged Gateway Intents)",
        )
    return ok("discord", f"logged in as {who}; Message Content intent on")
