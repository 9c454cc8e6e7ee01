"""The `/llm-settings` application command: the contract's grammar typed into one text option.

`/llm-settings args: temperature 0.8` reads exactly like the Slack and terminal command; the
option autocompletes keys and words, and says each key's valid range. Who may change settings is
decided here (Manage Server, or DISCORD_SETTINGS_ROLE, or anyone in their own DM); the service
enforces it.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import discord
from discord import app_commands

from bot.sampling import COMMAND, KEYS, valid_range

COMMAND_NAME = COMMAND.removeprefix("/")
WORDS = {
    "show": "show this channel's settings",
    "reset": "back to the defaults",
    "log": "recent changes",
    "forget": "delete this channel's conversation history",
}
_CHOICE_MAX = 100  # Discord's limit for a choice's name and value
_MAX_CHOICES = 25

SettingsHandler = Callable[[discord.Interaction, str], Awaitable[None]]


def may_configure(interaction: discord.Interaction, settings_role: str | None) -> bool:
    """Manage Server (or Administrator), the settings role, or anyone in their own DM."""
    if interaction.guild_id is None:
        return True
    permissions = interaction.permissions
    if permissions.manage_guild or permissions.administrator:
        return True
    user = interaction.user
    if not settings_role or not isinstance(user, discord.Member):
        return False
    return any(role_matches(role, settings_role) for role in user.roles)


def role_matches(role: discord.Role, spec: str) -> bool:
    """DISCORD_SETTINGS_ROLE names a role by id or by name (case-insensitive, `@` optional)."""
    spec = spec.strip()
    if spec.isdigit():
        return role.id == int(spec)
    return role.name.casefold() == spec.removeprefix("@").casefold()


def suggestions(current: str, max_new_tokens_limit: int) -> list[app_commands.Choice[str]]:
    """Completions for what has been typed so far: words and keys, then a key's valid values."""
    if len(current) > _CHOICE_MAX:
        return []
    text = re.sub(r"\s*=\s*", "=", current.lstrip())
    tokens = text.split()
    partial = tokens.pop() if text and not text[-1].isspace() else ""
    used: set[str] = set()
    awaiting: str | None = None  # a key typed without its value yet
    for token in tokens:
        if awaiting is not None:
            awaiting = None
            continue
        key, equals, _ = token.partition("=")
        if key.lower() in WORDS:
            return []  # show/reset/log/forget take nothing more
        used.add(key.lower())
        awaiting = None if equals else key.lower()
    prefix = " ".join(tokens) + " " if tokens else ""
    if awaiting is None and "=" in partial:
        awaiting, _, partial = partial.partition("=")
        awaiting = awaiting.lower()
        prefix += f"{awaiting}="
    if awaiting is not None:
        return _value_hints(awaiting, prefix, partial, max_new_tokens_limit)
    offered = [*(WORDS if not tokens else ()), *(k for k in KEYS if k not in used)]
    return [
        _choice(
            f"{prefix}{word} — {WORDS.get(word) or valid_range(word, max_new_tokens_limit)}",
            prefix + word,
        )
        for word in offered
        if word.startswith(partial.lower())
    ][:_MAX_CHOICES]


def _value_hints(key: str, prefix: str, partial: str, limit: int) -> list[app_commands.Choice[str]]:
    if key not in KEYS:
        return []
    if key == "do_sample":
        values = [v for v in ("true", "false") if v.startswith(partial.lower())]
        return [_choice(prefix + v, prefix + v) for v in values]
    typed = (prefix + partial).strip()
    return [_choice(f"{typed} — {key} is {valid_range(key, limit)}", typed)]


def _choice(name: str, value: str) -> app_commands.Choice[str]:
    if len(name) > _CHOICE_MAX:
        name = name[: _CHOICE_MAX - 1] + "…"
    return app_commands.Choice(name=name, value=value[:_CHOICE_MAX])


def settings_command(
    handler: SettingsHandler, *, max_new_tokens_limit: int
) -> app_commands.Command[Any, ..., None]:
    """The command, visible to everyone (reading is open to all; `may_configure` guards changes)."""

    @app_commands.command(
        name=COMMAND_NAME, description="Show or change this channel's LLM sampling settings"
    )
    @app_commands.describe(
        args="e.g. `temperature 0.8`, `temperature=0.7 top_p=0.9`, show, reset, log, forget"
    )
    @app_commands.allowed_contexts(guilds=True, dms=True, private_channels=False)
    @app_commands.allowed_installs(guilds=True, users=False)
    async def llm_settings(interaction: discord.Interaction, args: str = "") -> None:
        await handler(interaction, args)

    @llm_settings.autocomplete("args")
    async def complete(
        interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return suggestions(current, max_new_tokens_limit)

    return llm_settings
