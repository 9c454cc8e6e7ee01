"""`supportbot discord`: answers mentions and DMs with a streamed reply, plus `/llm-settings`.

A guild channel is one conversation, and a thread is a channel of its own, so it is one too:
ConversationKey("discord", guild id or "dm", channel id). The bot never answers itself, other
bots or webhooks, and each message is answered once even when replicas overlap (a Redis claim).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import discord
from discord import app_commands
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot.app import Runtime, build
from bot.config import ConfigError, Settings
from bot.conversation import ConversationKey
from bot.events import EventClaims
from bot.llm.base import Delta
from bot.ops import metrics
from bot.ops.health import Readiness, serve_health
from bot.platforms.discord_command import may_configure, settings_command
from bot.platforms.discord_stream import MESSAGE_LIMIT, ChannelPacer, StreamedReply
from bot.platforms.text import split_message
from bot.service import Failure, SupportService, User, new_error_id

logger = logging.getLogger(__name__)

PLATFORM = "discord"
TYPING_EVERY_S = 8.0  # Discord shows "typing…" for about 10 s per request
DRAIN_TIMEOUT_S = 20.0  # on shutdown, how long answers in progress may finish
_ANSWERED_TYPES = (discord.MessageType.default, discord.MessageType.reply)


def intents() -> discord.Intents:
    """Guild and DM messages, and their text (Message Content is privileged: enable it)."""
    wanted = discord.Intents.none()
    wanted.guilds = True
    wanted.guild_messages = True
    wanted.dm_messages = True
    wanted.message_content = True
    return wanted


def conversation_key(channel_id: int, guild_id: int | None) -> ConversationKey:
    return ConversationKey(PLATFORM, str(guild_id) if guild_id else "dm", str(channel_id))


class SupportBot(discord.Client):
    """The Discord front door of a SupportService.

    `edit_interval` is the least time between two writes in one channel (about once a second
    keeps within Discord's 5 writes / 5 s per channel); tests pass a small one.
    """

    def __init__(
        self,
        service: SupportService,
        *,
        redis: Redis | None = None,
        settings_role: str | None = None,
        sync_guild_id: int | None = None,
        sync_commands: bool = True,
        edit_interval: float = 1.0,
        **options: Any,
    ) -> None:
        options.setdefault("intents", intents())
        # Never ping @everyone, roles or users because a model wrote their mention; the reply
        # itself may notify the person who asked.
        options.setdefault(
            "allowed_mentions",
            discord.AllowedMentions(everyone=False, users=False, roles=False, replied_user=True),
        )
        options.setdefault("max_messages", None)  # the message cache is never read
        super().__init__(**options)
        self.service = service
        self._claims = EventClaims(redis) if redis is not None else None
        self.settings_role = settings_role
        self._sync_guild_id = sync_guild_id
        self._sync_commands = sync_commands
        self._edit_interval = edit_interval
        self._pacer = ChannelPacer(edit_interval)
        self._answering: set[asyncio.Task[Any]] = set()
        self._accepting = True
        self.tree = app_commands.CommandTree(self)
        command = settings_command(
            self.run_settings,
            max_new_tokens_limit=service.channel_settings.max_new_tokens_limit,
        )
        guild = discord.Object(sync_guild_id) if sync_guild_id else None
        self.tree.add_command(command, guild=guild)

    # -- lifecycle -------------------------------------------------------------------------

    async def setup_hook(self) -> None:
        if not self._sync_commands:
            return
        guild = discord.Object(self._sync_guild_id) if self._sync_guild_id else None
        try:
            synced = await self.tree.sync(guild=guild)
        except discord.HTTPException as exc:
            # Mentions still work; the command appears after a later successful start.
            hint = " (was the bot invited with the applications.commands scope?)"
            logger.error(
                "could not sync application commands: HTTP %s %s%s",
                exc.status,
                exc.text,
                hint if exc.status == 403 else "",
            )
            return
        where = f"guild {self._sync_guild_id}" if guild else "all guilds (global)"
        logger.info("synced %d application command(s) to %s", len(synced), where)

    async def on_ready(self) -> None:
        assert self.user is not None
        logger.info(
            "connected as %s (id %s) to %d guild(s)", self.user, self.user.id, len(self.guilds)
        )

    async def drain(self, grace_s: float = DRAIN_TIMEOUT_S) -> None:
        """Stop taking questions and give the answers in progress `grace_s` seconds to finish."""
        self._accepting = False
        pending = {task for task in self._answering if task is not asyncio.current_task()}
        if pending:
            logger.info("waiting for %d answer(s) in progress", len(pending))
            _, late = await asyncio.wait(pending, timeout=grace_s)
            for task in late:
                task.cancel()

    # -- mentions and DMs --------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        if not self._accepting or not self._wants_answer(message):
            return
        if not await self._claim(message):
            metrics.DUPLICATES.labels(PLATFORM).inc()
            logger.info("message %s was already taken; not answering it again", message.id)
            return
        task = asyncio.current_task()
        assert task is not None
        self._answering.add(task)
        try:
            await self.answer(message)
        finally:
            self._answering.discard(task)

    def _wants_answer(self, message: discord.Message) -> bool:
        me = self.user
        if me is None or message.author.bot or message.author.id == me.id:
            return False
        if message.webhook_id is not None or message.type not in _ANSWERED_TYPES:
            return False
        if message.guild is None:
            return isinstance(message.channel, discord.DMChannel)
        own_role = message.guild.self_role
        return any(user.id == me.id for user in message.mentions) or (
            own_role is not None and own_role in message.role_mentions
        )

    async def _claim(self, message: discord.Message) -> bool:
        """True when this process may answer: the first to claim the message id in Redis."""
        if self._claims is None or self.user is None:
            return True
        try:
            # Per bot user: two different bots mentioned in one message both answer.
            return await self._claims.claim(PLATFORM, f"{self.user.id}:{message.id}")
        except RedisError as exc:
            # Answering twice is better than not at all; the service reports a Redis outage.
            logger.warning("could not claim message %s in Redis (%s); answering", message.id, exc)
            return True

    def question(self, message: discord.Message) -> str:
        """The message text without the bot's mention (user `<@id>`/`<@!id>`, or its role)."""
        assert self.user is not None
        pattern = rf"<@!?{self.user.id}>"
        own_role = message.guild.self_role if message.guild else None
        if own_role is not None:
            pattern += rf"|<@&{own_role.id}>"
        return re.sub(pattern, " ", message.content).strip()

    async def answer(self, message: discord.Message) -> None:
        key = conversation_key(message.channel.id, message.guild.id if message.guild else None)
        user = User(id=message.author.mention, name=message.author.display_name)
        reply = StreamedReply(message, self._pacer, retry_base=self._edit_interval)
        notice = ""
        try:
            async with _typing(message.channel):
                async for event in self.service.ask(key, user, self.question(message)):
                    if isinstance(event, Delta):
                        reply.append(event.text)
                    elif isinstance(event, Failure):
                        notice = event.message
        except Exception:
            error_id = new_error_id()
            logger.exception("[error_id=%s] answering in %s failed", error_id, key.describe())
            notice = (
                f"Sorry, something went wrong on my side. Please try again. (error id: {error_id})"
            )
        except BaseException:
            reply.cancel()
            raise
        if not await reply.finish(notice):
            logger.error("the answer in %s could not be shown in Discord", key.describe())

    # -- /llm-settings ---------------------------------------------------------------------

    async def run_settings(self, interaction: discord.Interaction, args: str) -> None:
        """Answer `/llm-settings` ephemerally (only the person who ran it sees the reply)."""
        if interaction.channel_id is None:
            await interaction.response.send_message(
                "This command works in channels and DMs.", ephemeral=True
            )
            return
        key = conversation_key(interaction.channel_id, interaction.guild_id)
        user = User(
            # A mention: the settings log names who changed what, rendered as their name.
            id=interaction.user.mention,
            name=interaction.user.display_name,
            can_configure=may_configure(interaction, self.settings_role),
        )
        # Deferring first keeps within Discord's 3-second limit even when Redis is slow.
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            text = await self.service.settings(key, user, args)
        except Exception:
            error_id = new_error_id()
            logger.exception("[error_id=%s] /llm-settings in %s failed", error_id, key.describe())
            text = f"Sorry, that failed on my side; nothing was changed. (error id: {error_id})"
        pages = split_message(text, MESSAGE_LIMIT) or ["(nothing to show)"]
        await interaction.edit_original_response(content=pages[0])
        for page in pages[1:]:
            await interaction.followup.send(page, ephemeral=True)


class ShardedSupportBot(SupportBot, discord.AutoShardedClient):
    """The same bot over several shards of one process (DISCORD_SHARD_COUNT, DISCORD_SHARD_IDS)."""


@contextlib.asynccontextmanager
async def _typing(channel: discord.abc.Messageable) -> AsyncIterator[None]:
    """Show "typing…" until the block ends; a failed typing request never stops an answer."""

    async def keep_typing() -> None:
        while True:
            try:
                await channel.typing()
            except (discord.HTTPException, OSError, aiohttp.ClientError) as exc:
                logger.debug("typing indicator failed: %s", exc)
            await asyncio.sleep(TYPING_EVERY_S)

    task = asyncio.create_task(keep_typing())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# -- wiring and the command ----------------------------------------------------------------


def shard_config(settings: Settings) -> tuple[int | None, list[int] | None]:
    """(shard count, this process's shard ids); raises ConfigError naming the variable."""
    count = settings.discord_shard_count
    raw = settings.discord_shard_ids
    if raw is None:
        return count, None
    if count is None:
        raise ConfigError("invalid configuration: DISCORD_SHARD_IDS needs DISCORD_SHARD_COUNT")
    ids = sorted({int(part) for part in raw.split(",")})
    if ids[-1] >= count:
        raise ConfigError(
            f"invalid configuration: DISCORD_SHARD_IDS: shard {ids[-1]} is not below "
            f"DISCORD_SHARD_COUNT ({count})"
        )
    return count, ids


def build_client(
    service: SupportService, settings: Settings, *, redis: Redis | None = None, **options: Any
) -> SupportBot:
    """A SupportBot, or a ShardedSupportBot when DISCORD_SHARD_COUNT is set."""
    count, ids = shard_config(settings)
    common: dict[str, Any] = {
        "redis": redis,
        "settings_role": settings.discord_settings_role,
        "sync_guild_id": settings.discord_guild_id,
        # One process syncs the commands: the one holding shard 0 (or the only one).
        "sync_commands": ids is None or 0 in ids,
        **options,
    }
    if count is None:
        return SupportBot(service, **common)
    return ShardedSupportBot(service, shard_count=count, shard_ids=ids, **common)


async def run(settings: Settings) -> int:
    """`supportbot discord`: serve until SIGTERM/SIGINT; the exit status of the command."""
    if settings.discord_token is None:
        print(
            "supportbot: DISCORD_TOKEN is not set; put the bot token from the Discord Developer "
            "Portal (Bot → Reset Token) in DISCORD_TOKEN",
            file=sys.stderr,
        )
        return 2
    try:
        shard_config(settings)
    except ConfigError as exc:
        print(f"supportbot: {exc}", file=sys.stderr)
        return 2
    runtime = await build(settings, require_backend=True)
    try:
        client = build_client(runtime.service, settings, redis=runtime.redis)
        health = await serve_health(settings.port, _readiness(runtime, client))
        try:
            return await _serve(client, settings.discord_token.get_secret_value())
        finally:
            await health.cleanup()
    finally:
        await runtime.aclose()


def _readiness(runtime: Runtime, client: SupportBot) -> Readiness:
    """Ready when the Runtime is (Redis, a backend) and the gateway session is up."""

    async def readiness() -> tuple[bool, dict[str, str]]:
        ready, checks = await runtime.readiness()
        checks["discord"] = "connected" if client.is_ready() else "not connected"
        return ready and client.is_ready(), checks

    return readiness


async def _serve(client: SupportBot, token: str) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    connection = asyncio.create_task(client.start(token))
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({connection, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        stopping.cancel()
        if stop.is_set():
            logger.info("stopping: finishing answers in progress")
            await client.drain()
        await client.close()  # makes client.start() return
        await asyncio.wait({connection}, timeout=10)
        connection.cancel()
        await asyncio.gather(connection, return_exceptions=True)
    if connection.cancelled():
        return 0
    return _exit_status(connection.exception())


def _exit_status(exc: BaseException | None) -> int:
    if exc is None:
        return 0
    if isinstance(exc, discord.LoginFailure):
        print("supportbot: Discord rejected DISCORD_TOKEN; reset the bot token", file=sys.stderr)
        return 2
    if isinstance(exc, discord.PrivilegedIntentsRequired):
        print(
            "supportbot: enable the Message Content intent for this bot in the Discord Developer "
            "Portal (Bot → Privileged Gateway Intents)",
            file=sys.stderr,
        )
        return 2
    logger.error("the Discord connection failed", exc_info=exc)
    return 1
