"""Slack's HTTP endpoint against what anyone on the internet can send, through the real aiohttp
server and raw sockets: the signature is checked over the raw bytes before anything is decoded or
parsed (unverifiable → 401, signed but unreadable → 400, never a traceback), a half-sent body
times out, idle and partial connections are closed, and none of them holds shutdown up."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from bot.ops import health
from bot.platforms.slack import http
from tests.fixtures.fake_openai import FakeOpenAI
from tests.fixtures.fake_slack import (
    SIGNING_SECRET,
    FakeSlack,
    RunningApp,
    event_body,
    mention,
    running_slack_app,
    sign,
    slack_settings,
)

pytestmark = pytest.mark.usefixtures("redis")


@pytest.fixture
async def app(
    fake_slack: FakeSlack, fake_openai: FakeOpenAI, redis_server, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[RunningApp]:
    monkeypatch.setattr(http, "BODY_TIMEOUT_S", 0.5)
    monkeypatch.setattr(health, "IDLE_TIMEOUT_S", 0.5)
    settings = slack_settings(
        fake_slack, redis_url=redis_server.url, openai_url=fake_openai.base_url
    )
    async with running_slack_app(settings) as running:
        yield running


async def raw(
    app: RunningApp, request: bytes, *, read_timeout_s: float = 5.0, status_only: bool = False
) -> bytes:
    """Send bytes on a fresh connection; what the server answers before it closes (or only
    its status line)."""
    url = urlsplit(app.url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(request)
        await writer.drain()
        reading = reader.readline() if status_only else reader.read()
        return await asyncio.wait_for(reading, read_timeout_s)
    finally:
        writer.close()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def request(
    body: bytes, headers: dict[str, str], *, content_type: str = "application/json"
) -> bytes:
    lines = [
        "POST /slack/events HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def signed(body: bytes) -> dict[str, str]:
    """Slack's headers for exactly these bytes (sign() takes text, and these may not be)."""
    stamp = str(int(time.time()))
    digest = hmac.new(
        SIGNING_SECRET.encode(), b"v0:" + stamp.encode() + b":" + body, hashlib.sha256
    ).hexdigest()
    return {"X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": f"v0={digest}"}


DEEP = b"[" * 100_000 + b"]" * 100_000
GARBAGE: dict[str, tuple[bytes, str]] = {
    "malformed JSON": (b'{"type": "event_callback", ', "application/json"),
    "non-UTF-8": (b'{"text": "\xff\xfe\xfa"}', "application/json"),
    "100,000-deep JSON": (DEEP, "application/json"),
    "unknown charset": (b'{"a": 1}', "application/json; charset=x-no-such-charset"),
    "a JSON list": (b"[1, 2]", "application/json"),
    "deep form payload": (b"payload=" + DEEP, "application/x-www-form-urlencoded"),
}


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    traced = [r for r in caplog.records if r.exc_info is not None or r.levelno >= logging.ERROR]
    assert not traced, [r.getMessage() for r in traced]


@pytest.mark.parametrize("name", list(GARBAGE))
async def test_unsigned_garbage_is_401_and_signed_garbage_400_never_a_traceback(
    app: RunningApp, fake_slack: FakeSlack, caplog: pytest.LogCaptureFixture, name: str
):
    caplog.set_level(logging.INFO)
    body, content_type = GARBAGE[name]
    forged = {
        "X-Slack-Request-Timestamp": str(int(time.time())),
        "X-Slack-Signature": "v0=" + "0" * 64,
    }
    response = await raw(app, request(body, forged, content_type=content_type))
    assert status_of(response) == 401
    response = await raw(app, request(body, signed(body), content_type=content_type))
    assert status_of(response) == 400, response[:200]
    assert_no_traceback(caplog)
    assert app.bot.received == 0 and not fake_slack.calls_to("chat.postMessage")


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Slack-Request-Timestamp": "not-a-number", "X-Slack-Signature": "v0=" + "0" * 64},
        {"X-Slack-Request-Timestamp": "1e9", "X-Slack-Signature": "v0=" + "0" * 64},
        {"X-Slack-Request-Timestamp": "١٢٣٤٥", "X-Slack-Signature": "v0=" + "0" * 64},
        {"X-Slack-Request-Timestamp": str(int(time.time()))},
        {"X-Slack-Signature": "v0=" + "0" * 64},
        {"X-Slack-Request-Timestamp": "", "X-Slack-Signature": ""},
        {"X-Slack-Request-Timestamp": "9" * 40, "X-Slack-Signature": "garbage"},
    ],
    ids=["word", "float", "arabic-digits", "no-signature", "no-timestamp", "empty", "huge"],
)
async def test_unverifiable_headers_are_401_without_a_traceback(
    app: RunningApp, caplog: pytest.LogCaptureFixture, headers: dict[str, str]
):
    caplog.set_level(logging.INFO)
    body = json.dumps(event_body(mention("<@U0BOT> hi"))).encode()
    safe = {k: v.encode("utf-8").decode("latin-1") for k, v in headers.items()}
    assert status_of(await raw(app, request(body, safe))) == 401
    assert_no_traceback(caplog)
    assert app.bot.received == 0


async def test_a_stale_signature_is_401_and_a_valid_one_still_answered(
    app: RunningApp, fake_slack: FakeSlack
):
    body = json.dumps(event_body(mention("<@U0BOT> hello", ts="1700.000900")))
    stale = sign(body, timestamp=int(time.time()) - 6 * 60)
    assert status_of(await raw(app, request(body.encode(), stale))) == 401
    assert status_of(await raw(app, request(body.encode(), sign(body)))) == 200
    await fake_slack.wait_until(lambda: fake_slack.texts("C0GENERAL", "1700.000900"))


async def test_a_half_sent_body_times_out_and_does_not_hold_shutdown_up(
    app: RunningApp, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    body = json.dumps(event_body(mention("<@U0BOT> hi"))).encode()
    half = request(body, sign(body.decode()))[: -len(body) // 2]
    started = time.monotonic()
    response = await raw(app, half, status_only=True)
    assert status_of(response) == 408  # after BODY_TIMEOUT_S (0.5 s here), not aiohttp's never
    assert time.monotonic() - started < 3
    assert_no_traceback(caplog)


async def test_idle_and_partial_connections_are_closed(app: RunningApp):
    url = urlsplit(app.url)
    idle = await asyncio.open_connection(url.hostname, url.port)
    partial = await asyncio.open_connection(url.hostname, url.port)
    partial[1].write(b"POST /slack/events HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # slowloris
    await partial[1].drain()
    started = time.monotonic()
    for reader, writer in (idle, partial):
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        writer.close()
    assert time.monotonic() - started < 3  # IDLE_TIMEOUT_S is 0.5 s here


async def test_shutdown_is_not_held_up_by_half_sent_requests(
    fake_slack: FakeSlack, fake_openai: FakeOpenAI, redis_server
):
    """With the production timeouts: 20 connections each stuck mid-body, then stop()."""
    settings = slack_settings(
        fake_slack, redis_url=redis_server.url, openai_url=fake_openai.base_url
    )
    body = json.dumps(event_body(mention("<@U0BOT> hi"))).encode()
    half = request(body, sign(body.decode()))[: -len(body) // 2]
    async with running_slack_app(settings) as running:
        url = urlsplit(running.url)
        writers = []
        for _ in range(20):
            _, writer = await asyncio.open_connection(url.hostname, url.port)
            writer.write(half)
            await writer.drain()
            writers.append(writer)
        await asyncio.sleep(0.2)  # the handlers are now waiting for the rest of the bodies
        started = time.monotonic()
        await running.door.stop()
        took = time.monotonic() - started
    for writer in writers:
        writer.close()
    assert took < health.SERVER_SHUTDOWN_S + 2, f"shutdown took {took:.1f}s"
