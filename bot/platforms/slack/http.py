"""Slack's HTTP endpoint, `POST /slack/events`: the signature first, then anything else.

Anyone on the internet can reach this route, so nothing of a request is decoded or parsed before
its signature is verified over the raw bytes (Slack's v0 HMAC-SHA256 of `v0:<timestamp>:<body>`)
and its timestamp is a plain integer within five minutes. Anything unverifiable is 401 and one
log line at most, never a traceback; a signed body that cannot be decoded or parsed (a charset we
do not know, bytes that are not in it, malformed or absurdly nested JSON) is 400. The body must
arrive within BODY_TIMEOUT_S (a half-sent body is 408, and cannot hold a connection or shutdown
up). Verified requests then go to bolt, which verifies again and dispatches.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.async_app import AsyncApp
from slack_bolt.request.async_request import AsyncBoltRequest

from bot.ops.health import Readiness, add_health_routes

logger = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"
BODY_TIMEOUT_S = 10.0  # Slack sends small bodies at once; a slower one is not Slack
MAX_SKEW_S = 5 * 60  # Slack's replay window for request timestamps
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"v0=[0-9a-f]{64}")


def verified(raw: bytes, timestamp: str | None, signature: str | None, secret: bytes) -> bool:
    """Whether Slack signed exactly these bytes recently. Never raises, whatever the input."""
    if timestamp is None or signature is None:
        return False
    if not _TIMESTAMP.fullmatch(timestamp) or not _SIGNATURE.fullmatch(signature):
        return False
    if abs(time.time() - int(timestamp)) > MAX_SKEW_S:
        return False
    expected = hmac.new(secret, b"v0:" + timestamp.encode() + b":" + raw, hashlib.sha256)
    return hmac.compare_digest("v0=" + expected.hexdigest(), signature)


def _reject(status: int, reason: str) -> web.Response:
    return web.json_response({"ok": False, "error": reason}, status=status)


def events_handler(
    app: AsyncApp, signing_secret: str
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    secret = signing_secret.encode()

    async def slack_events(request: web.Request) -> web.StreamResponse:
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                raw = await request.read()
        except TimeoutError:
            logger.info("slack request from %s: body not received within %.0fs",
                        request.remote, BODY_TIMEOUT_S)  # fmt: skip
            return _reject(408, "request_timeout")
        headers = request.headers
        timestamp = headers.get("X-Slack-Request-Timestamp")
        if not verified(raw, timestamp, headers.get("X-Slack-Signature"), secret):
            logger.info("slack request from %s rejected: bad or missing signature",
                        request.remote)  # fmt: skip
            return _reject(401, "invalid_signature")
        try:
            body = raw.decode(request.charset or "utf-8")
            bolt_request = AsyncBoltRequest(
                body=body,
                query=request.query_string,
                headers={k.lower(): v for k, v in headers.items()},
            )
        except (LookupError, ValueError, RecursionError, TypeError, AttributeError) as exc:
            # an unknown charset, undecodable bytes, malformed or too deep JSON, not an object
            logger.warning("signed slack request could not be read: %s", type(exc).__name__)
            return _reject(400, "invalid_body")
        response = await app.async_dispatch(bolt_request)
        return await to_aiohttp_response(response)

    return slack_events


def http_app(app: AsyncApp, signing_secret: str, readiness: Readiness) -> web.Application:
    """Slack's endpoint and the health routes on one aiohttp application."""
    web_app = web.Application()
    web_app.router.add_post(EVENTS_PATH, events_handler(app, signing_secret))
    add_health_routes(web_app, readiness)
    return web_app
