"""The Slack app on slack-bolt's AsyncApp, started by `supportbot slack` (bot.commands.slack).

Socket Mode when SLACK_APP_TOKEN is set (health routes then on their own server on $PORT);
otherwise HTTP mode on $PORT: events, slash commands and interactivity at `POST /slack/events`
beside `/healthz`, `/readyz` and `/metrics` (bot.platforms.slack.http verifies each signature
before anything else). Bolt answers Slack's url_verification and ssl_check, and acknowledges
events before our listeners run. The Web API client talks to SLACK_API_URL.

Socket Mode connects in the background: the websocket may be refused for a long time (an outage,
a proxy), and slack_sdk retries forever, so start() returns at once, `/readyz` says not ready
until the connection is up (and whenever it is down), and stop() ends the attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

import aiohttp
from aiohttp import web
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.adapter.socket_mode.async_internals import run_async_bolt_app, send_async_response
from slack_bolt.async_app import AsyncApp
from slack_bolt.authorization import AuthorizeResult
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState
from slack_sdk.socket_mode.async_client import AsyncBaseSocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.web.async_client import AsyncWebClient

from bot.config import Settings
from bot.ops.health import Readiness, serve, serve_health
from bot.platforms.slack.events import Identity, SlackBot, Tuning
from bot.platforms.slack.http import EVENTS_PATH as EVENTS_PATH  # where callers look for it
from bot.platforms.slack.http import http_app
from bot.service import SupportService

logger = logging.getLogger(__name__)

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
    pass takes precedence. We mean it to (the token comes from Settings), so that line is noise.
    A refused Socket Mode connection is retried every few seconds: one line each, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Failed to connect"):
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return "`token` will be unused" not in message


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


class SocketHandler(AsyncSocketModeHandler):
    """Bolt's Socket Mode handler, but every envelope is acknowledged: one no listener wanted
    (a button's block action, an event type we do not handle) too. Slack re-sends an envelope
    that is not acknowledged, and shows the user an error for an interaction."""

    async def handle(self, client: AsyncBaseSocketModeClient, req: SocketModeRequest) -> None:
        start = time.time()
        response: BoltResponse = await run_async_bolt_app(self.app, req)
        if response.status != 200:
            logger.info("slack %s envelope not handled (status %d); acknowledged",
                        req.type, response.status)  # fmt: skip
            response = BoltResponse(status=200, body="")
        await send_async_response(client, req, response, start)

    async def connected(self) -> bool:
        return bool(await self.client.is_connected())


def socket_readiness(socket: SocketHandler, readiness: Readiness) -> Readiness:
    """Ready when the runtime is and the Socket Mode connection is up: otherwise nothing can
    reach the bot."""

    async def ready() -> tuple[bool, dict[str, str]]:
        ok, checks = await readiness()
        connected = await socket.connected()
        checks["slack"] = "connected (Socket Mode)" if connected else "not connected (Socket Mode)"
        return ok and connected, checks

    return ready


class SlackApp:
    """The running app in either mode; `stop()` ends intake, then lets answers finish."""

    def __init__(
        self,
        bot: SlackBot,
        runner: web.AppRunner,
        socket: SocketHandler | None,
        port: int,
    ) -> None:
        self.bot = bot
        self.port = port
        self._runner = runner
        self._socket = socket
        self._connecting: asyncio.Task[None] | None = None
        if socket is not None:
            self._connecting = asyncio.create_task(self._connect(socket), name="slack socket")

    @staticmethod
    async def _connect(socket: SocketHandler) -> None:
        await socket.connect_async()  # type: ignore[no-untyped-call]  # retries until closed
        if await socket.connected():
            logger.info("slack app connected in Socket Mode")

    async def connected(self) -> bool:
        """Socket Mode: whether the websocket is up (HTTP mode: always)."""
        return self._socket is None or await self._socket.connected()

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
        tuning = tuning or Tuning(drain_timeout_s=settings.shutdown_grace_seconds)
        bot = SlackBot(
            service, client, identity, admins=settings.slack_admin_ids, tuning=tuning,
            handoff_to=settings.slack_handoff_ids,
        )  # fmt: skip
        if settings.slack_app_token is not None:
            app = bolt_app(bot, signing_secret=None)
            socket = SocketHandler(
                app,
                app_token=settings.slack_app_token.get_secret_value(),
                web_client=client,
                ping_interval=tuning.socket_retry_s,
            )
            runner = await serve_health(port, socket_readiness(socket, readiness), host=host)
            logger.info("slack app connecting in Socket Mode; health on port %d", port)
            return cls(bot, runner, socket, port)
        assert settings.slack_signing_secret is not None
        secret = settings.slack_signing_secret.get_secret_value()
        app = bolt_app(bot, secret)
        runner = await serve(http_app(app, secret, readiness), port, host)
        logger.info("slack app listening on port %d (POST %s)", port, EVENTS_PATH)
        return cls(bot, runner, None, port)

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """No more events (the socket closed, connection attempts ended, the HTTP server down),
        then answers in flight get the grace period."""
        if self._socket is not None:
            await self._socket.close_async()  # type: ignore[no-untyped-call]
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connecting
        await self._runner.cleanup()
        await self.bot.drain(drain_timeout_s)
