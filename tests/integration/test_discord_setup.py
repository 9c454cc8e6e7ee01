"""Wiring `supportbot discord` as an operator configures it: the Runtime from
bot.commands.runtime.build over real Redis and the fake OpenAI server, command sync (global or
DISCORD_GUILD_ID), sharding, and bot.commands.discord.run()'s lifecycle (health server, SIGTERM).

Only the Discord gateway login of run() is replaced (it needs the network); everything on our
side of it runs for real.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import discord
import pytest
import simcord

from bot.commands import discord as discord_command
from bot.commands.runtime import Runtime, build
from bot.config import ConfigError, Settings, load_settings
from bot.ops.redis_server import RedisServer, free_port
from bot.platforms.discord.client import ShardedSupportBot, SupportBot, build_client, shard_config
from tests.fixtures.fake_openai import FakeOpenAI

OPENAI_KEY = "sk-test-discord-0123456789abcdef"
TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.discord-test-token"


@pytest.fixture
def settings_for(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, redis_server: RedisServer, fake_openai: Any
) -> Any:
    """Settings as `supportbot discord` reads them: the environment, no local model, GPT through
    the fake OpenAI server, the test redis-server."""
    for name in list(os.environ):
        if name.startswith(("LLM_", "OPENAI_", "SLACK_", "DISCORD_", "HISTORY_", "REDIS_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env

    def make(**env: str) -> Settings:
        values = {
            "REDIS_URL": redis_server.url,
            "LLM_MODEL": "none",
            "OPENAI_API_KEY": OPENAI_KEY,
            "OPENAI_BASE_URL": fake_openai.base_url,
            "OPENAI_MODEL": "gpt-test",
            **env,
        }
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        return load_settings()

    return make


@pytest.fixture
async def runtime(settings_for: Any, redis: Any) -> AsyncIterator[Runtime]:
    built = await build(settings_for())
    yield built
    await built.aclose()


async def test_an_admin_setting_temperature_changes_the_next_openai_request(
    runtime: Runtime, settings_for: Any, fake_openai: FakeOpenAI
) -> None:
    bot = build_client(runtime.service, settings_for(), edit_interval=0.05)
    async with simcord.run(bot) as env:
        guild = env.create_guild()
        channel = guild.create_text_channel("support")
        managers = guild.create_role("Managers", permissions=discord.Permissions(manage_guild=True))
        admin = guild.add_member(env.create_user("admin"), roles=[managers])
        alice = guild.add_member(env.create_user("alice"))
        assert bot.user is not None
        mention = f"<@{bot.user.id}>"

        await alice.send(channel, f"{mention} before")
        result = await admin.slash(channel, "llm-settings", args="temperature 0.8")
        await alice.send(channel, f"{mention} after")

        assert result.ephemeral and result.response is not None
        assert result.response.content.startswith("Updated: temperature=0.8.")
        before, after = (r.body for r in fake_openai.chat_requests)
        assert before["temperature"] == 0.7 and after["temperature"] == 0.8
        assert after["messages"][-3:] == [
            {"role": "user", "content": "before"},
            {"role": "assistant", "content": "echo: before"},
            {"role": "user", "content": "after"},
        ]
        answers = [m.content for m in channel.history() if m.author.id == bot.user.id]
        assert answers == ["echo: before", "echo: after"]


async def test_discord_guild_id_syncs_the_command_to_that_guild_only(
    runtime: Runtime, settings_for: Any
) -> None:
    guild_id = 1456074443980809999
    bot = build_client(runtime.service, settings_for(DISCORD_GUILD_ID=str(guild_id)))
    env = simcord.Env(bot)
    guild = env.create_guild(id=guild_id)  # exists before the bot starts, as in production
    channel = guild.create_text_channel("dev")
    await env.start()
    try:
        synced = [(r.method, r.path) for r in env.http_requests if r.path.endswith("/commands")]
        app = env.backend.application_id
        assert synced == [("PUT", f"/applications/{app}/guilds/{guild_id}/commands")]
        member = guild.add_member(env.create_user("dev"))
        result = await member.slash(channel, "llm-settings", args="show")
        assert result.response is not None and "temperature = 0.7" in result.response.content
    finally:
        await env.shutdown()


async def test_sharding_runs_this_processes_shards_and_only_shard_0_syncs(
    runtime: Runtime, settings_for: Any, fake_openai: FakeOpenAI
) -> None:
    bot = build_client(
        runtime.service, settings_for(DISCORD_SHARD_COUNT="2", DISCORD_SHARD_IDS="1")
    )
    assert isinstance(bot, ShardedSupportBot) and isinstance(bot, discord.AutoShardedClient)
    assert bot.shard_count == 2 and bot.shard_ids == [1]
    async with simcord.run(bot) as env:
        guild = env.create_guild(shard_id=1)
        channel = guild.create_text_channel("support")
        alice = guild.add_member(env.create_user("alice"))
        assert bot.user is not None
        await alice.send(channel, f"<@{bot.user.id}> sharded hello")

        assert [r for r in env.http_requests if r.path.endswith("/commands")] == []
        assert channel.last_message is not None
        assert channel.last_message.content == "echo: sharded hello"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"DISCORD_SHARD_IDS": "0,1"}, "DISCORD_SHARD_IDS needs DISCORD_SHARD_COUNT"),
        ({"DISCORD_SHARD_COUNT": "2", "DISCORD_SHARD_IDS": "1,2"}, "shard 2 is not below"),
    ],
)
def test_inconsistent_sharding_is_one_line_naming_the_variable(
    settings_for: Any, env: dict[str, str], needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        shard_config(settings_for(**env))
    assert "\n" not in str(info.value)


def test_without_sharding_the_bot_is_a_plain_client(settings_for: Any, runtime: Runtime) -> None:
    bot = build_client(runtime.service, settings_for(DISCORD_SETTINGS_ROLE="Support"))
    assert type(bot) is SupportBot and not isinstance(bot, discord.AutoShardedClient)
    assert bot.settings_role == "Support"
    wanted = bot.intents
    assert wanted.message_content and wanted.guilds and wanted.guild_messages
    assert wanted.dm_messages and not wanted.members and not wanted.presences


async def test_run_serves_health_and_stops_cleanly_on_sigterm(
    settings_for: Any, monkeypatch: pytest.MonkeyPatch, redis: Any
) -> None:
    port = free_port()
    settings = settings_for(DISCORD_TOKEN=TOKEN, PORT=str(port))
    started = asyncio.Event()
    tokens: list[str] = []

    async def connect(self: SupportBot, token: str, *, reconnect: bool = True) -> None:
        # Stands in for the gateway session: "connected" until close() is called.
        tokens.append(token)
        started.set()
        while not self.is_closed():
            await asyncio.sleep(0.01)

    closed: list[Runtime] = []
    real_aclose = Runtime.aclose

    async def aclose(self: Runtime) -> None:
        closed.append(self)
        await real_aclose(self)

    monkeypatch.setattr(SupportBot, "start", connect)
    monkeypatch.setattr(Runtime, "aclose", aclose)
    running = asyncio.create_task(discord_command.run(settings))
    await asyncio.wait_for(started.wait(), 30)

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/healthz") as alive:
            assert alive.status == 200
        async with http.get(f"http://127.0.0.1:{port}/readyz") as ready:
            body = await ready.json()
            # Redis and GPT are fine; the stand-in never completes the gateway handshake.
            assert ready.status == 503 and body["checks"]["discord"] == "not connected"
            assert body["checks"]["redis"] == "ok"

    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(running, 30) == 0
    assert tokens == [TOKEN] and len(closed) == 1
    with pytest.raises(aiohttp.ClientError):
        async with aiohttp.ClientSession() as http:
            await http.get(f"http://127.0.0.1:{port}/healthz")


async def test_run_refuses_to_start_without_a_token(
    settings_for: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await discord_command.run(settings_for()) == 2
    err = capsys.readouterr().err
    assert "DISCORD_TOKEN" in err and len(err.strip().splitlines()) == 1
