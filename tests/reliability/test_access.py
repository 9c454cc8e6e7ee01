"""Access and privacy, on Slack (bolt on signed requests) and Discord (SimCord):

- with admins configured (SLACK_SETTINGS_ADMINS; Discord: Manage Server or DISCORD_SETTINGS_ROLE),
  only they may change settings, reset them or forget the history: anyone else is refused and
  nothing changes (settings, audit log and history as they were);
- every change is in the channel's audit log (who, old → new, when), which anyone may read with
  `/llm-settings log`; the log is the channel's own;
- `/llm-settings forget` deletes the channel's history (and no other channel's), is logged, and
  the next answer starts afresh.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

from redis.asyncio import Redis

from bot.conversation import ConversationKey, Message
from bot.llm.chain import LLMChain
from bot.ops.redis_server import RedisServer
from bot.service import SupportService
from bot.store import settings_key
from tests.fixtures.discord_sim import (  # noqa: F401 - fixtures, found by pytest by name
    World,
    admin,
    simcord_bot_fixture,
    world_fixture,
)
from tests.fixtures.fake_slack import (
    TEAM,
    FakeSlack,
    RunningApp,
    mention,
    running_slack_app,
    slack_settings,
)
from tests.support.backends import ScriptedLLM

REFUSED = "Only settings admins can change this channel's settings or forget its history"
LOG_LINE = re.compile(r"^• (\d{4}-\d\d-\d\d \d\d:\d\d) UTC — (\S+): (.+)$", re.MULTILINE)


def log_lines(text: str, since: float) -> list[tuple[str, str]]:
    """(who, what) of each line of `/llm-settings log`, newest first; each dated since `since`."""
    lines = LOG_LINE.findall(text)
    earliest = datetime.fromtimestamp(since, tz=UTC).replace(second=0, microsecond=0)
    for when, _, _ in lines:
        stamp = datetime.strptime(when, "%Y-%m-%d %H:%M").replace(tzinfo=UTC)
        assert earliest <= stamp <= datetime.now(tz=UTC), when
    return [(who, what) for _, who, what in lines]


async def untouched(redis: Redis, service: SupportService, key: ConversationKey) -> None:
    """No overrides, no audit entries, and the history that was there."""
    assert not await redis.exists(settings_key(key))
    assert await service.store.settings_log(key) == []
    assert [m.content for m in await service.store.history(key)] == ["hello", "echo: hello"]


# -- Slack -------------------------------------------------------------------------------------


async def run_command(
    app: RunningApp, fake_slack: FakeSlack, text: str, user: str, channel: str = "C0ACCESS"
) -> str:
    seen = len(fake_slack.responses)
    status, body = await app.command(text, fake_slack.response_url(), user=user, channel=channel)
    assert (status, body) == (200, "")
    await fake_slack.wait_until(lambda: len(fake_slack.responses) > seen)
    reply = fake_slack.responses[seen]
    assert reply["response_type"] == "ephemeral"
    return str(reply["text"])


async def test_slack_settings_admins_audit_log_and_forget(
    fake_slack: FakeSlack, redis_server: RedisServer, redis: Redis
) -> None:
    settings = slack_settings(
        fake_slack,
        redis_url=redis_server.url,
        openai_url="http://127.0.0.1:9/v1",
        slack_settings_admins="U0BOSS",
    )
    backend = ScriptedLLM()
    since = time.time()
    async with running_slack_app(settings, llm=LLMChain(backend, None)) as app:
        service = app.runtime.service
        here, there = (ConversationKey("slack", TEAM, c) for c in ("C0ACCESS", "C0ELSE"))
        for n, key in enumerate((here, there)):
            await app.send_event(mention("<@U0BOT> hello", channel=key.channel, ts=f"1700.{n}"))
        await app.settle(2)

        async def command(text: str, user: str, channel: str = "C0ACCESS") -> str:
            return await run_command(app, fake_slack, text, user, channel)

        # Someone else: refused, whatever the change; reading is open to all.
        for attempt in ("temperature 0.5", "top_k=5 top_p=0.5", "reset", "forget"):
            reply = await command(attempt, "U0ALICE")
            assert REFUSED in reply and "Nothing was changed" in reply, attempt
        await untouched(redis, service, here)
        assert "temperature = 0.7 (default)" in await command("show", "U0ALICE")
        assert "No settings changes recorded" in await command("log", "U0ALICE")

        # The admin: each change is logged with who, old → new and when, newest first.
        assert (await command("temperature 0.5 top_k 40", "U0BOSS")).startswith("Updated")
        assert (await command("temperature=0.9", "U0BOSS")).startswith("Updated")
        assert (await command("reset", "U0BOSS")).startswith("Back to the defaults")
        assert log_lines(await command("log", "U0ALICE"), since) == [
            ("U0BOSS", "reset (temperature: 0.9 → default, top_k: 40 → default)"),
            ("U0BOSS", "temperature: 0.5 → 0.9"),
            ("U0BOSS", "temperature: default → 0.5, top_k: default → 40"),
        ]
        # The log is the channel's: another channel has none.
        assert "No settings changes recorded" in await command("log", "U0ALICE", "C0ELSE")

        # Forget: this channel's history goes, the other channel's stays; logged.
        assert await command("forget", "U0BOSS") == "Forgot this channel's conversation history."
        assert await service.store.history(here) == []
        assert await service.store.history(there) == [
            Message("user", "hello"),
            Message("assistant", "echo: hello"),
        ]
        assert log_lines(await command("log", "U0ALICE"), since)[0] == (
            "U0BOSS",
            "forgot the conversation history",
        )
        await app.send_event(mention("<@U0BOT> anew", channel="C0ACCESS", ts="1700.3"))
        await app.settle(3)
        assert backend.calls[-1].messages[1:] == [{"role": "user", "content": "anew"}]


# -- Discord -----------------------------------------------------------------------------------


async def test_discord_manage_server_and_settings_role_audit_log_and_forget(
    world: World, service: SupportService, scripted: ScriptedLLM, redis: Redis
) -> None:
    since = time.time()
    other = world.guild.create_text_channel("random")
    for channel in (world.channel, other):
        await world.alice.send(channel, world.mention("hello"))
    here = world.key()

    async def settings(member: object, args: str) -> str:
        result = await member.slash(world.channel, "llm-settings", args=args)  # type: ignore[attr-defined]
        assert result.ephemeral and result.response is not None
        return str(result.response.content)

    # A plain member, and one with a role that is not the settings role: refused.
    world.bot.settings_role = "Support Leads"
    helpers = world.guild.create_role("Helpers")
    carol = world.guild.add_member(world.env.create_user("carol"), roles=[helpers])
    for member in (world.alice, carol):
        for attempt in ("temperature 0.2", "reset", "forget"):
            reply = await settings(member, attempt)
            assert REFUSED in reply and "Nothing was changed" in reply, attempt
    await untouched(redis, service, here)
    assert "No settings changes recorded" in await settings(world.alice, "log")

    # Manage Server, and the settings role: allowed, each change logged.
    boss = admin(world, "boss")
    leads = world.guild.create_role("Support Leads")
    bob = world.guild.add_member(world.env.create_user("bob"), roles=[leads])
    assert (await settings(boss, "temperature 0.2")).startswith("Updated")
    assert (await settings(bob, "top_p=0.5")).startswith("Updated")
    assert log_lines(await settings(world.alice, "log"), since) == [
        (bob.mention, "top_p: default → 0.5"),
        (boss.mention, "temperature: default → 0.2"),
    ]
    await world.alice.send(world.channel, world.mention("sampled?"))
    assert scripted.calls[-1].sampling.temperature == 0.2
    assert scripted.calls[-1].sampling.top_p == 0.5

    # Forget: this channel's history goes, the other channel's stays; logged.
    assert await settings(boss, "forget") == "Forgot this channel's conversation history."
    assert await service.store.history(here) == []
    assert [m.content for m in await service.store.history(world.key(other))] == [
        "hello",
        "echo: hello",
    ]
    assert log_lines(await settings(world.alice, "log"), since)[0] == (
        boss.mention,
        "forgot the conversation history",
    )
    await world.alice.send(world.channel, world.mention("anew"))
    assert scripted.calls[-1].messages[1:] == [{"role": "user", "content": "anew"}]
