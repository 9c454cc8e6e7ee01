"""The Discord bot: mentions and DMs → the front door (a streamed reply), plus `/llm-settings`.

A guild channel is one conversation, and a thread is a channel of its own, so it is one too:
ConversationKey("discord", guild id or "dm", channel id). The bot never answers itself, other
bots or webhooks, and each message is answered once even when replicas overlap (a claim in the
store, made under the conversation's lock). `supportbot discord` (bot.commands.discord) builds
the runtime and runs this client.
"""

from __future__ import annotations

import logging
import re
from typing import Any, cast

import discord
from discord import app_commands

from bot.config import ConfigError, Settings
from bot.conversation import ConversationKey, StoreError
from bot.handoff import HANDOFF_GONE
from bot.ops.health import Readiness
from bot.platforms.discord.command import may_configure, settings_command
from bot.platforms.discord.feedback import (
    HANDOFF_PREFIX,
    RESOLVED_PREFIX,
    handoff_text,
    parse,
    resolved_control,
)
from bot.platforms.discord.sink import MESSAGE_LIMIT, ChannelPacer, DiscordSink
from bot.platforms.frontdoor import FrontDoor, error_reply
from bot.platforms.text import split_message
from bot.service import SupportService, User

logger = logging.getLogger(__name__)

PLATFORM = "discord"
DRAIN_TIMEOUT_S = 20.0  # on shutdown, how long answers in progress may finish (the command
# passes SHUTDOWN_GRACE_SECONDS)
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
        settings_role: str | None = None,
        handoff_role: str | None = None,
        sync_guild_id: int | None = None,
        sync_commands: bool = True,
        edit_interval: float = 1.0,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
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
        self.door = FrontDoor(service, PLATFORM, drain_timeout_s=drain_timeout_s)
        self.settings_role = settings_role
        self.handoff_role = handoff_role
        self._sync_guild_id = sync_guild_id
        self._sync_commands = sync_commands
        self._edit_interval = edit_interval
        self._pacer = ChannelPacer(edit_interval)
        self.tree = app_commands.CommandTree(self)
        command = settings_command(
            self.run_settings, max_new_tokens_limit=service.store.max_new_tokens_limit
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

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop taking questions and give the answers in progress `grace_s` seconds to finish
        (every answer counts from its first moment, its claim included)."""
        await self.door.drain(grace_s)

    def readiness(self, runtime: Readiness) -> Readiness:
        """Ready when the runtime is (the store, a backend) and the gateway session is up."""

        async def readiness() -> tuple[bool, dict[str, str]]:
            ready, checks = await runtime()
            checks["discord"] = "connected" if self.is_ready() else "not connected"
            return ready and self.is_ready(), checks

        return readiness

    # -- mentions and DMs --------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        if not self.door.accepting or not self._from_a_person(message):
            return
        if self._wants_answer(message):
            self.door.start(self.answer(message), f"discord message {message.id}")
        elif self._maybe_follow_up(message):
            self.door.start(self.answer(message, follow_up=True), f"discord follow-up {message.id}")

    def _from_a_person(self, message: discord.Message) -> bool:
        me = self.user
        if me is None or message.author.bot or message.author.id == me.id:
            return False
        return message.webhook_id is None and message.type in _ANSWERED_TYPES

    def _wants_answer(self, message: discord.Message) -> bool:
        me = self.user
        assert me is not None
        if message.guild is None:
            return isinstance(message.channel, discord.DMChannel)
        own_role = message.guild.self_role
        return any(user.id == me.id for user in message.mentions) or (
            own_role is not None and own_role in message.role_mentions
        )

    def _maybe_follow_up(self, message: discord.Message) -> bool:
        """A message without a mention in a thread, or a reply to the bot's message: answered
        if the bot last answered its author in that channel (checked under the lock)."""
        if message.guild is None:
            return False
        if isinstance(message.channel, discord.Thread):
            return True
        replied = message.reference.resolved if message.reference else None
        return isinstance(replied, discord.Message) and replied.author == self.user

    def question(self, message: discord.Message) -> str:
        """The message text without the bot's mention (user `<@id>`/`<@!id>`, or its role)."""
        assert self.user is not None
        pattern = rf"<@!?{self.user.id}>"
        own_role = message.guild.self_role if message.guild else None
        if own_role is not None:
            pattern += rf"|<@&{own_role.id}>"
        return re.sub(pattern, " ", message.content).strip()

    async def answer(self, message: discord.Message, *, follow_up: bool = False) -> None:
        """Answer one message (an answer task: the service's lock is its first await)."""
        key = conversation_key(message.channel.id, message.guild.id if message.guild else None)
        user = User(id=message.author.mention, name=message.author.display_name)
        sink = DiscordSink(message, self._pacer, retry_base=self._edit_interval)
        me = self.user

        async def admit() -> bool:
            if follow_up and not await self._follow_up(key, user.id):
                return False
            # Per bot user: two different bots mentioned in one message both answer.
            return me is None or await self.door.claim((f"{me.id}:{message.id}",), "message")

        await self.door.answer(
            key, user, self.question(message), sink, admit=admit, interval_s=self._edit_interval
        )

    async def _follow_up(self, key: ConversationKey, user: str) -> bool:
        """Unknown while the store is down: stay out rather than join a human conversation."""
        try:
            return await self.service.store.may_follow_up(key, user)
        except StoreError as exc:
            logger.warning("not answering a follow-up in %s: the store is unreachable (%s)",
                           key.describe(), exc)  # fmt: skip
            return False

    # -- 👍/👎 ------------------------------------------------------------------------------

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        """A button of ours pressed (on any message, also one sent before a restart)."""
        if interaction.type is not discord.InteractionType.component:
            return
        data = cast("dict[str, Any]", interaction.data or {})
        custom_id = str(data.get("custom_id") or "")
        if interaction.channel_id is None:
            return
        key = conversation_key(interaction.channel_id, interaction.guild_id)
        try:
            if (vote := parse(custom_id)) is not None:
                text = await self.service.feedback(
                    key, vote[1], User(id=interaction.user.mention), vote[0]
                )
            elif custom_id.startswith(HANDOFF_PREFIX):
                await self._hand_off(interaction, key, custom_id.removeprefix(HANDOFF_PREFIX))
                return
            elif custom_id.startswith(RESOLVED_PREFIX):
                await self.service.resolve(key)
                await interaction.response.edit_message(
                    content=f"✅ Resolved by {interaction.user.mention}. I'll answer here again.",
                    view=None,
                )
                return
            else:
                return
        except Exception as exc:
            text = error_reply(
                "Sorry, that didn't work. Please try again.",
                "button %s in %s failed",
                custom_id.split(":")[1],
                key.describe(),
                exc=exc,
            )
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)

    async def _hand_off(
        self, interaction: discord.Interaction, key: ConversationKey, answer_id: str
    ) -> None:
        # The summary takes a model's time: past Discord's 3 s, so acknowledge first.
        await interaction.response.defer(ephemeral=True, thinking=True)
        handoff = await self.service.handoff(key, answer_id)
        if handoff is None:
            await interaction.followup.send(HANDOFF_GONE, ephemeral=True)
            return
        channel = interaction.channel
        assert isinstance(channel, discord.abc.Messageable)
        text = handoff_text(
            self.handoff_role, handoff.asker or interaction.user.mention, handoff.question,
            handoff.summary,
        )  # fmt: skip
        view = resolved_control(interaction.channel_id or 0)
        try:
            await channel.send(
                text,
                view=view,
                allowed_mentions=discord.AllowedMentions(roles=True, users=True),
            )
        finally:
            view.stop()
        await interaction.followup.send(
            "I've asked a human to take over this conversation.", ephemeral=True
        )

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
        # Deferring first keeps within Discord's 3-second limit even when the store is slow.
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            text = await self.service.settings(key, user, args)
        except Exception as exc:
            text = error_reply(
                "Sorry, that failed on my side; nothing was changed.",
                "/llm-settings in %s failed",
                key.describe(),
                exc=exc,
            )
        pages = split_message(text, MESSAGE_LIMIT) or ["(nothing to show)"]
        await interaction.edit_original_response(content=pages[0])
        for page in pages[1:]:
            await interaction.followup.send(page, ephemeral=True)


class ShardedSupportBot(SupportBot, discord.AutoShardedClient):
    """The same bot over several shards of one process (DISCORD_SHARD_COUNT, DISCORD_SHARD_IDS)."""


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


def build_client(service: SupportService, settings: Settings, **options: Any) -> SupportBot:
    """A SupportBot, or a ShardedSupportBot when DISCORD_SHARD_COUNT is set."""
    count, ids = shard_config(settings)
    common: dict[str, Any] = {
        "settings_role": settings.discord_settings_role,
        "handoff_role": settings.discord_handoff_role,
        "sync_guild_id": settings.discord_guild_id,
        # One process syncs the commands: the one holding shard 0 (or the only one).
        "sync_commands": ids is None or 0 in ids,
        "drain_timeout_s": settings.shutdown_grace_seconds,
        **options,
    }
    if count is None:
        return SupportBot(service, **common)
    return ShardedSupportBot(service, shard_count=count, shard_ids=ids, **common)
