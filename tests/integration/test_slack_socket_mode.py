"""Socket Mode: the app connects to the (fake) Socket Mode websocket, acknowledges envelopes,
answers through the Web API, and serves the health routes on $PORT on their own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from bot.commands.runtime import build
from bot.ops.redis_server import free_port
from bot.platforms.slack.app import SlackApp, identify, web_client
from tests.fixtures.fake_openai import FakeOpenAI
from tests.fixtures.fake_slack import (
    FAST,
    FakeSlack,
    event_body,
    mention,
    slack_settings,
)

pytestmark = pytest.mark.usefixtures("redis")


async def test_socket_mode_answers_events_and_commands(
    fake_slack: FakeSlack, fake_openai: FakeOpenAI, redis_server
):
    settings = slack_settings(
        fake_slack,
        redis_url=redis_server.url,
        openai_url=fake_openai.base_url,
        slack_app_token=fake_slack.app_token,
        slack_signing_secret=None,  # Socket Mode needs none
    )
    runtime = await build(settings)
    port = free_port()
    async with aiohttp.ClientSession() as session:
        client = web_client(settings, session, FAST)
        door = await SlackApp.start(
            settings, runtime.service, runtime.readiness, client, await identify(client),
            tuning=FAST, port=port, host="127.0.0.1",
        )  # fmt: skip
        try:
            await fake_slack.wait_until(lambda: fake_slack.socket_connected)
            body = event_body(mention("<@U0BOT> over the socket", ts="1700.000100"))
            envelope = fake_slack.send_envelope(body)
            await fake_slack.wait_until(
                lambda: fake_slack.texts("C0GENERAL", "1700.000100") == ["echo: over the socket"]
            )
            assert {"envelope_id": envelope} in fake_slack.socket_acks

            command = {
                "team_id": "T0TEST",
                "channel_id": "C0GENERAL",
                "user_id": "U0ALICE",
                "command": "/llm-settings",
                "text": "top_p 0.5",
                "response_url": fake_slack.response_url(),
            }
            fake_slack.send_envelope(command, kind="slash_commands")
            await fake_slack.wait_until(lambda: fake_slack.responses)
            assert fake_slack.responses[0]["text"].startswith("Updated: top_p=0.5.")

            async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200
            async with session.post(f"http://127.0.0.1:{port}/slack/events") as response:
                assert response.status in (404, 405)  # no HTTP endpoint in Socket Mode
        finally:
            await door.stop()
            await runtime.aclose()
    assert fake_slack.calls_to("apps.connections.open")[0].authorized


@contextlib.asynccontextmanager
async def socket_app(
    fake_slack: FakeSlack, fake_openai: FakeOpenAI, redis_url: str
) -> AsyncIterator[tuple[SlackApp, aiohttp.ClientSession, int]]:
    settings = slack_settings(
        fake_slack,
        redis_url=redis_url,
        openai_url=fake_openai.base_url,
        slack_app_token=fake_slack.app_token,
        slack_signing_secret=None,
    )
    runtime = await build(settings)
    port = free_port()
    try:
        async with aiohttp.ClientSession() as session:
            client = web_client(settings, session, FAST)
            door = await SlackApp.start(
                settings, runtime.service, runtime.readiness, client, await identify(client),
                tuning=FAST, port=port, host="127.0.0.1",
            )  # fmt: skip
            try:
                yield door, session, port
            finally:
                await door.stop()
    finally:
        await runtime.aclose()


async def readyz(session: aiohttp.ClientSession, port: int) -> tuple[int, dict[str, Any]]:
    async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
        return response.status, await response.json()


async def test_readyz_is_503_while_the_socket_is_refused_and_200_once_connected(
    fake_slack: FakeSlack, fake_openai: FakeOpenAI, redis_server
):
    fake_slack.refuse_socket = True
    async with socket_app(fake_slack, fake_openai, redis_server.url) as (_, session, port):
        await fake_slack.wait_until(lambda: fake_slack.socket_attempts >= 2)
        status, body = await readyz(session, port)
        assert status == 503
        assert body["checks"]["slack"] == "not connected (Socket Mode)"
        assert body["checks"]["redis"] == "ok"  # the rest of the bot is fine: only Slack is down
        async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
            assert response.status == 200  # alive: restarting it would not help
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200

        fake_slack.refuse_socket = False  # Slack is back: the retries connect
        await fake_slack.wait_until(lambda: fake_slack.socket_connected)
        deadline = time.monotonic() + 10
        while (await readyz(session, port))[0] != 200:
            assert time.monotonic() < deadline, "never ready after connecting"
            await asyncio.sleep(0.05)
        assert (await readyz(session, port))[1]["checks"]["slack"] == "connected (Socket Mode)"


async def test_stop_ends_connection_attempts_promptly(
    fake_slack: FakeSlack, fake_openai: FakeOpenAI, redis_server
):
    fake_slack.refuse_socket = True
    async with socket_app(fake_slack, fake_openai, redis_server.url) as (door, _, _):
        await fake_slack.wait_until(lambda: fake_slack.socket_attempts >= 2)
        started = time.monotonic()
        await door.stop()
        assert time.monotonic() - started < 2
        attempts = fake_slack.socket_attempts
    await asyncio.sleep(1)  # FAST retries every 0.2 s: none may follow the stop
    assert fake_slack.socket_attempts == attempts


async def test_retry_attempt_0_is_a_first_delivery_and_1_a_redelivery(
    fake_slack: FakeSlack, fake_openai: FakeOpenAI, redis_server, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    async with socket_app(fake_slack, fake_openai, redis_server.url) as (door, _, _):
        await fake_slack.wait_until(lambda: fake_slack.socket_connected)
        first = event_body(mention("<@U0BOT> first time", ts="1700.000200"))
        fake_slack.send_envelope(first, retry_attempt=0)
        await fake_slack.wait_until(lambda: fake_slack.texts("C0GENERAL", "1700.000200"))
        await door.bot.idle()
        assert not [r for r in caplog.records if "re-delivery" in r.getMessage()]

        # A re-delivery of an event no replica took (its first copy never arrived) is answered,
        # and logged as a re-delivery; a re-delivery of the first event is a duplicate.
        lost = event_body(mention("<@U0BOT> second try", ts="1700.000300"))
        fake_slack.send_envelope(lost, retry_attempt=1)
        fake_slack.send_envelope(first, retry_attempt=1)
        await fake_slack.wait_until(lambda: fake_slack.texts("C0GENERAL", "1700.000300"))
        await door.bot.idle()
    lines = [r.getMessage() for r in caplog.records]
    assert any("re-delivery" in line and "(retry 1)" in line for line in lines)
    assert any("ignoring a duplicate" in line and "(retry 1)" in line for line in lines)
    assert not any("retry 0" in line for line in lines)
    assert len(fake_slack.thread("C0GENERAL", "1700.000200")) == 1


async def test_block_actions_over_the_socket_are_acknowledged(
    fake_slack: FakeSlack, fake_openai: FakeOpenAI, redis_server
):
    async with socket_app(fake_slack, fake_openai, redis_server.url):
        await fake_slack.wait_until(lambda: fake_slack.socket_connected)
        action = {
            "type": "block_actions",
            "team": {"id": "T0TEST"},
            "user": {"id": "U0ALICE"},
            "channel": {"id": "C0GENERAL"},
            "actions": [{"action_id": "feedback_up", "value": "x", "type": "button"}],
            "trigger_id": "1.2.3",
            "response_url": fake_slack.response_url(),
        }
        envelope = fake_slack.send_envelope(action, kind="interactive")
        await fake_slack.wait_until(
            lambda: any(a.get("envelope_id") == envelope for a in fake_slack.socket_acks)
        )
        unknown = event_body({"type": "reaction_added", "user": "U0ALICE", "reaction": "eyes"})
        envelope = fake_slack.send_envelope(unknown)
        await fake_slack.wait_until(
            lambda: any(a.get("envelope_id") == envelope for a in fake_slack.socket_acks)
        )
