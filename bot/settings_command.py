"""`/llm-settings`: parse, check who may change what, store, and word the reply (show and log).

The same text on every platform; each platform only renders its markup. Store failures are left
to the caller (the service words them with an error id).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from bot.conversation import ConversationKey, Store
from bot.ports import Knowledge, Models
from bot.sampling import (
    GREEDY_BELOW_TEMPERATURE,
    SPECS,
    AuditEntry,
    Change,
    ChannelSettings,
    Forget,
    Log,
    Reset,
    SettingsError,
    SettingValue,
    Show,
    format_value,
    parse_command,
)

NOT_AN_ADMIN = (
    "Only settings admins can change this channel's settings or forget its history; anyone "
    "can use `/llm-settings show`. Nothing was changed."
)


class SettingsCommand:
    def __init__(self, store: Store, llm: Models, knowledge: Knowledge | None) -> None:
        self.store = store
        self.llm = llm
        self.knowledge = knowledge

    async def run(self, key: ConversationKey, user: str, can_configure: bool, args: str) -> str:
        """The reply to `/llm-settings args` from `user`; raises StoreError when storage fails."""
        store = self.store
        try:
            command = parse_command(args, max_new_tokens_limit=store.max_new_tokens_limit)
        except SettingsError as exc:
            return str(exc)
        if isinstance(command, Show):
            return self.render_show(await store.channel_settings(key))
        if isinstance(command, Log):
            return render_log(await store.settings_log(key))
        if not can_configure:
            return NOT_AN_ADMIN
        if isinstance(command, Change):
            missing = await self._missing_collection(command.values)
            if missing:
                return missing
            updated = await store.change_settings(key, user, command.values)
            changed = ", ".join(f"{k}={format_value(v)}" for k, v in command.values.items())
            return f"Updated: {changed}.\n\n" + self.render_show(updated)
        if isinstance(command, Reset):
            return "Back to the defaults.\n\n" + self.render_show(
                await store.reset_settings(key, user)
            )
        assert isinstance(command, Forget)
        removed = await store.forget(key, user)
        return (
            "Forgot this channel's conversation history."
            if removed
            else "There was no history to forget."
        )

    async def _missing_collection(self, values: Mapping[str, SettingValue]) -> str | None:
        """The message when `collection` names no collection of the knowledge base."""
        name = values.get("collection")
        if name is None:
            return None
        known = await self.knowledge.collections() if self.knowledge is not None else []
        if name in known:
            return None
        have = ", ".join(f"`{c}`" for c in known) if known else "none yet (`supportbot kb add`)"
        return (
            f"`collection` must be a collection in the knowledge base; `{name}` has no "
            f"documents. Collections: {have}. Nothing was changed."
        )

    def render_show(self, channel: ChannelSettings) -> str:
        statuses = self.llm.status()
        answering = self.llm.answering()
        lines = ["*LLM settings for this channel*"]
        for name in SPECS:
            value = getattr(channel.effective, name)
            source = "set in this channel" if name in channel.overrides else "default"
            notes = [
                f"{s.name} cannot honour it, ignored there"
                for s in statuses
                if name in s.unsupported
            ]
            if not channel.effective.do_sample and name in ("temperature", "top_k", "top_p"):
                notes.append("unused while do_sample is false (greedy)")
            elif name == "temperature" and channel.effective.greedy:
                # Issue 12: the local engines decode a near-zero temperature greedily (its limit).
                notes.append(
                    f"below {GREEDY_BELOW_TEMPERATURE:g}, the local model decodes greedily"
                )
            note = f" — {'; '.join(notes)}" if notes else ""
            lines.append(f"• {name} = {format_value(value)} ({source}){note}")
        choice = channel.knowledge
        for name, value in (("knowledge", choice.mode), ("collection", choice.collection)):
            source = "set in this channel" if name in channel.overrides else "default"
            lines.append(f"• {name} = {value} ({source})")
        if self.knowledge is None and choice.mode != "off":
            lines.append("  (the knowledge base is not available in this process)")
        lines.append("")
        if answering is None:
            lines.append("Answering: no backend is available (see `supportbot doctor`).")
        else:
            lines.append(f"Answering: {answering.name}")
        for s in statuses:
            lines.append(f"• {s.role}: {s.name} — {s.describe()}")
        return "\n".join(lines)


def render_log(entries: list[AuditEntry]) -> str:
    if not entries:
        return "No settings changes recorded for this channel."
    lines = ["*Recent settings changes* (newest first)"]
    for entry in entries:
        when = datetime.fromtimestamp(entry.at, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")
        if entry.action == "forget":
            what = "forgot the conversation history"
        elif not entry.changes:
            what = f"{entry.action} (no change)"
        else:
            what = ", ".join(
                f"{k}: {old or 'default'} → {new or 'default'}"
                for k, (old, new) in entry.changes.items()
            )
            what = f"reset ({what})" if entry.action == "reset" else what
        lines.append(f"• {when} — {entry.user}: {what}")
    return "\n".join(lines)
