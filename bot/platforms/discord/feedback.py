"""👍/👎 and "Ask a human" on a Discord answer: buttons (message components) on its final message,
and "Resolved" on a hand-off. The buttons carry what they act on in their custom id (the stored
answer's id; the channel for Resolved), so a press is understood after a restart too (handled in
`on_interaction`, not by a live View); the presser alone is answered (ephemeral replies)."""

from __future__ import annotations

import discord

from bot.conversation import Vote

PREFIX = "sb:vote:"
HANDOFF_PREFIX = "sb:handoff:"
RESOLVED_PREFIX = "sb:resolved:"
_VOTES: dict[str, Vote] = {"up": "up", "down": "down"}


def controls(answer_id: str) -> discord.ui.View:
    """The buttons under an answer. Stop the view once sent: nothing in memory waits on it."""
    view = discord.ui.View(timeout=None)
    for custom_id, label in (
        (f"{PREFIX}up:{answer_id}", "👍"), (f"{PREFIX}down:{answer_id}", "👎"),
        (f"{HANDOFF_PREFIX}{answer_id}", "Ask a human"),
    ):  # fmt: skip
        view.add_item(
            discord.ui.Button(label=label, style=discord.ButtonStyle.secondary, custom_id=custom_id)
        )
    return view


def resolved_control(channel_id: int) -> discord.ui.View:
    """The "Resolved" button on a hand-off message."""
    view = discord.ui.View(timeout=None)
    view.add_item(
        discord.ui.Button(
            label="Resolved", style=discord.ButtonStyle.success,
            custom_id=f"{RESOLVED_PREFIX}{channel_id}",
        )
    )  # fmt: skip
    return view


def handoff_text(role: str | None, asker: str, question: str, summary: str | None) -> str:
    """The hand-off message: the role's mention (DISCORD_HANDOFF_ROLE, an id), the asker (a
    mention), the question and the summary."""
    who = f"<@&{role}> " if role else ""
    return "\n".join([
        f"{who}{asker} asked for a human here.",
        f"**Question:** {question}",
        f"**Summary:** {summary}" if summary else "*(No summary: no model could write one.)*",
        "I'll stay out of this conversation until someone presses Resolved.",
    ])  # fmt: skip


def parse(custom_id: str) -> tuple[Vote, str] | None:
    """(vote, answer id) from a vote button's custom id; None for any other component."""
    if not custom_id.startswith(PREFIX):
        return None
    vote, _, answer_id = custom_id.removeprefix(PREFIX).partition(":")
    if vote not in _VOTES or not answer_id:
        return None
    return _VOTES[vote], answer_id
