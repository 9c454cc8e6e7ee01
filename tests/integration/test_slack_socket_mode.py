"""Socket Mode: the app connects to the (fake) Socket Mode websocket, acknowledges envelopes,
answers through the Web API, and serves the health routes on $PORT on their own."""

from __future__ import annotations

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
