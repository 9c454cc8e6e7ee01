"""`/llm-settings` through bolt: acknowledged at once, answered ephemerally via response_url,
restricted by SLACK_SETTINGS_ADMINS, and honoured by the next answer."""

from __future__ import annotations

import time

import pytest

from tests.fixtures.fake_openai import FakeOpenAI
from tests.fixtures.fake_slack import (
    FakeSlack,
    mention,
    running_slack_app,
    slack_settings,
)

pytestmark = pytest.mark.usefixtures("redis")


@pytest.fixture
def settings(fake_slack: FakeSlack, fake_openai: FakeOpenAI, redis_server):
    def make(**overrides):
        return slack_settings(
            fake_slack, redis_url=redis_server.url, openai_url=fake_openai.base_url, **overrides
        )

    return make


async def run_command(app, fake_slack: FakeSlack, text: str, user: str = "U0ALICE") -> str:
    """Send the command; check the immediate empty ack; return the ephemeral reply's text."""
    seen = len(fake_slack.responses)
    began = time.monotonic()
    status, body = await app.command(text, fake_slack.response_url(), user=user)
    assert (status, body) == (200, "")
    assert time.monotonic() - began < 3
    await fake_slack.wait_until(lambda: len(fake_slack.responses) > seen)
    reply = fake_slack.responses[seen]
    assert reply["response_type"] == "ephemeral"
    return str(reply["text"])


async def test_temperature_set_by_command_reaches_the_next_generation(
    settings, fake_slack, fake_openai
):
    async with running_slack_app(settings()) as app:
        reply = await run_command(app, fake_slack, "temperature 0.8")
        assert reply.startswith("Updated: temperature=0.8.")
        await app.send_event(mention("<@U0BOT> now", ts="1700.000100"))
        await app.settle(1)
        assert fake_openai.chat_requests[-1].body["temperature"] == 0.8
        assert "temperature = 0.8 (set in this channel)" in await run_command(
            app, fake_slack, "show"
        )


async def test_invalid_input_names_the_key_and_range_and_changes_nothing(
    settings, fake_slack, fake_openai
):
    async with running_slack_app(settings()) as app:
        reply = await run_command(app, fake_slack, "temperature=0.5 top_k 0")
        assert "`top_k` must be a whole number from 1 to 1000 (got `0`)" in reply
        assert "Nothing was changed" in reply
        assert "temperature = 0.7 (default)" in await run_command(app, fake_slack, "show")


async def test_only_settings_admins_may_change_settings(settings, fake_slack):
    async with running_slack_app(settings(slack_settings_admins="U0BOSS, U0OTHER")) as app:
        refused = await run_command(app, fake_slack, "temperature 0.5", user="U0ALICE")
        assert "Only settings admins" in refused and "Nothing was changed" in refused
        assert "temperature = 0.7 (default)" in await run_command(
            app, fake_slack, "show", user="U0ALICE"
        )
        allowed = await run_command(app, fake_slack, "temperature 0.5", user="U0BOSS")
        assert allowed.startswith("Updated: temperature=0.5.")
        assert "U0BOSS" in await run_command(app, fake_slack, "log", user="U0ALICE")


async def test_settings_are_per_channel(settings, fake_slack, fake_openai):
    async with running_slack_app(settings()) as app:
        await run_command(app, fake_slack, "temperature 1.5")
        await app.send_event(mention("<@U0BOT> elsewhere", channel="C0OTHER", ts="1700.2"))
        await app.settle(1)
    assert fake_openai.chat_requests[-1].body["temperature"] == 0.7
