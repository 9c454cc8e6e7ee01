"""The Slack app on slack-bolt's AsyncApp, started by `supportbot slack` (bot.commands.slack).

Socket Mode when SLACK_APP_TOKEN is set (health routes then on their own server on $PORT);
otherwise HTTP mode on $PORT: events, slash commands and interactivity at `POST /slack/events`
beside `/healthz`, `/readyz` and `/metrics`. Bolt verifies every HTTP request's signature (a bad
one gets 401 before any listener runs), answers Slack's url_verification and ssl_check, and
acknowledges events before our listeners run. The Web API client talks to SLACK_API_URL.
"""

from __future__ import annotations

import asyncio
import logging
import random

import aiohttp
from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_bolt.authorization import AuthorizeResult
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState
from slack_sdk.web.async_client import AsyncWebClient

from bot.config import Settings
from bot.ops.health import Readiness, add_health_routes, serve_health
from bot.platforms.slack.events import Identity, SlackBot, Tuning
from bot.service import SupportService

logger = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"
DEFAULT_API_URL = "https://slack.com/api/"
LISTEN_HOST = "0.0.0.0"  # noqa: S104 - Slack and the probes reach us from outside the container


class StartError(Exception):
    """Why the app cannot start, as one line for the operator (never a secret)."""


class RateLimitRetry(AsyncRateLimitErrorRetryHandler):
    """Retries a 429 after exactly the Retry-After Slack asks for, plus a little jitter so that
    answers limited together do not come back in lockstep. (slack_sdk's own handler always adds
    up to a second and rejects fractional values.)"""

    def __init__(self, max_retry_count: int = 5, jitter_s: float = 1.0) -> None:
        super().__init__(max_retry_count=max_retry_count)
        self.jitter_s = jitter_s

    async def prepare_for_next_attempt_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> None:
        if response is None:
            raise error or RuntimeError("rate-limit retry without a response")
        state.next_attempt_requested = True
        values = next((v for k, v in response.headers.items() if k.lower() == "retry-after"), [])
        try:
            wait = max(0.0, float(values[0])) if values else 1.0
        except ValueError:
            wait = 1.0
        jitter = random.uniform(0, self.jitter_s)  # noqa: S311 - spreading retries, not security
        logger.info("slack rate-limited %s; retrying in %.1fs", request.url, wait + jitter)
        await asyncio.sleep(wait + jitter)
        state.increment_current_attempt()


class _ExpectedBoltWarnings(logging.Filter):
    """Bolt reads SLACK_BOT_TOKEN from the environment by itself, then warns that the client we
    pass takes precedence. We mean it to (the token comes from Settings), so that line is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`token` will be unused" not in record.getMessage()


_BOLT_LOGGER = logging.getLogger("slack_bolt")
_BOLT_LOGGER.addFilter(_ExpectedBoltWarnings())


def check_credentials(settings: Settings) -> str | None:
    """The one-line reason the Slack app cannot start, or None."""
    if settings.slack_bot_token is None:
        return "SLACK_BOT_TOKEN is not set: the Slack app needs its bot token (xoxb-…)"
    if settings.slack_app_token is None and settings.slack_signing_secret is None:
        return (
            "SLACK_SIGNING_SECRET is not set: HTTP mode needs it to verify requests from Slack "
            "(or set SLACK_APP_TOKEN to use Socket Mode)"
        )
    return None


def web_client(
    settings: Settings, session: aiohttp.ClientSession, tuning: Tuning | None = None
) -> AsyncWebClient:
    assert settings.slack_bot_token is not None
    tuning = tuning or Tuning()
    handlers: list[AsyncRetryHandler] = [
        AsyncConnectionErrorRetryHandler(),
        RateLimitRetry(tuning.rate_limit_retries, tuning.rate_limit_jitter_s),
    ]
    return AsyncWebClient(
        token=settings.slack_bot_token.get_secret_value(),
        base_url=settings.slack_api_url or DEFAULT_API_URL,
        session=session,
        retry_handlers=handlers,
        logger=logging.getLogger("slack_sdk.web"),
    )


async def identify(client: AsyncWebClient) -> Identity:
    """auth.test: checks the token and tells us the bot's user id (to strip its mentions)."""
    try:
        response = await client.auth_test()
    except SlackApiError as exc:
        reason = exc.response.get("error") or f"HTTP {exc.response.status_code}"
        raise StartError(f"Slack rejected SLACK_BOT_TOKEN (auth.test: {reason})") from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise StartError(
            f"cannot reach Slack's Web API at SLACK_API_URL ({type(exc).__name__})"
        ) from None
    return Identity(
        user_id=str(response["user_id"]),
        bot_id=response.get("bot_id"),
        team_id=response.get("team_id"),
    )


async def check_app_token(client: AsyncWebClient, app_token: str) -> None:
    """Socket Mode's client retries a refused connection forever; refuse to start instead."""
    try:
        await client.apps_connections_open(app_token=app_token)
    except SlackApiError as exc:
        reason = exc.response.get("error") or f"HTTP {exc.response.status_code}"
        raise StartError(
            f"Slack rejected SLACK_APP_TOKEN (apps.connections.open: {reason}); it must be an "
            "app-level token (xapp-…) with the connections:write scope"
        ) from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise StartError(
            f"cannot reach Slack's Web API at SLACK_API_URL ({type(exc).__name__})"
        ) from None


def bolt_app(bot: SlackBot, signing_secret: str | None) -> AsyncApp:
    """The bolt app; `signing_secret=None` for Socket Mode, where Slack signs nothing."""
    client, identity = bot.client, bot.identity

    async def authorize(enterprise_id: str | None, team_id: str | None) -> AuthorizeResult:
        # What bolt would otherwise learn from its own auth.test on the first request: we ran
        # auth.test at start, so no event waits on (or fails with) another one.
        return AuthorizeResult(
            enterprise_id=enterprise_id,
            team_id=team_id,
            bot_user_id=identity.user_id,
            bot_id=identity.bot_id,
            bot_token=client.token,
        )

    app = AsyncApp(
        name="supportbot",
        # Bolt's per-request clients copy this one; the token comes from `authorize`.
        client=AsyncWebClient(
            base_url=client.base_url,
            session=client.session,
            retry_handlers=client.retry_handlers,
            logger=client.logger,
        ),
        authorize=authorize,
        signing_secret=signing_secret or "",
        request_verification_enabled=signing_secret is not None,
        # Acknowledge first, run listeners after: answers take longer than Slack's 3 s.
        process_before_response=False,
        logger=_BOLT_LOGGER,
    )
    bot.register(app)
    return app


def http_app(app: AsyncApp, readiness: Readiness) -> web.Application:
    """Slack's endpoint and the health routes on one aiohttp application."""

    async def slack_events(request: web.Request) -> web.Response:
        response = await app.async_dispatch(await to_bolt_request(request))
        return await to_aiohttp_response(response)

    web_app = web.Application()
    web_app.router.add_post(EVENTS_PATH, slack_events)
    add_health_routes(web_app, readiness)
    return web_app


class SlackApp:
    """The running app in either mode; `stop()` ends intake, then lets answers finish."""

    def __init__(
        self,
        bot: SlackBot,
        runner: web.AppRunner,
        socket: AsyncSocketModeHandler | None,
        port: int,
    ) -> None:
        self.bot = bot
        self.port = port
        self._runner = runner
        self._socket = socket

    @classmethod
    async def start(
        cls,
        settings: Settings,
        service: SupportService,
        readiness: Readiness,
        client: AsyncWebClient,
        identity: Identity,
        *,
        tuning: Tuning | None = None,
        host: str = LISTEN_HOST,
        port: int | None = None,
    ) -> SlackApp:
        port = settings.port if port is None else port
        bot = SlackBot(service, client, identity, admins=settings.slack_admin_ids, tuning=tuning)
        if settings.slack_app_token is not None:
            app = bolt_app(bot, signing_secret=None)
            runner = await serve_health(port, readiness, host=host)
            socket = AsyncSocketModeHandler(
                app, app_token=settings.slack_app_token.get_secret_value(), web_client=client
            )
            try:
                await socket.connect_async()  # type: ignore[no-untyped-call]
            except BaseException:
                await socket.close_async()  # type: ignore[no-untyped-call]
                await runner.cleanup()
                raise
            logger.info("slack app connected in Socket Mode; health on port %d", port)
            return cls(bot, runner, socket, port)
        assert settings.slack_signing_secret is not None
        app = bolt_app(bot, settings.slack_signing_secret.get_secret_value())
        runner = web.AppRunner(http_app(app, readiness), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        logger.info("slack app listening on port %d (POST %s)", port, EVENTS_PATH)
        return cls(bot, runner, None, port)

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        if self._socket is not None:
            await self._socket.close_async()  # type: ignore[no-untyped-call]
        await self._runner.cleanup()
        await self.bot.drain(drain_timeout_s)
