"""👍/👎 on a Discord answer: buttons (message components) on its final message, and the
component interactions they send. The buttons carry the stored answer's id in their custom id,
so a press is understood after a restart too (handled in `on_interaction`, not by a live View);
the voter alone is thanked (an ephemeral reply: the channel sees nothing)."""

from __future__ import annotations

import discord

from bot.conversation import Vote

PREFIX = "sb:vote:"
_VOTES: dict[str, Vote] = {"up": "up", "down": "down"}


def controls(answer_id: str) -> discord.ui.View:
    """The buttons under an answer. Stop the view once sent: nothing in memory waits on it."""
    view = discord.ui.View(timeout=None)
    for vote, label in (("up", "👍"), ("down", "👎")):
        view.add_item(
            discord.ui.Button(
                label=label, style=discord.ButtonStyle.secondary,
                custom_id=f"{PREFIX}{vote}:{answer_id}",
            )
        )  # fmt: skip
    return view


def parse(custom_id: str) -> tuple[Vote, str] | None:
    """(vote, answer id) from a vote button's custom id; None for any other component."""
    if not custom_id.startswith(PREFIX):
        return None
    vote, _, answer_id = custom_id.removeprefix(PREFIX).partition(":")
    if vote not in _VOTES or not answer_id:
        return None
    return _VOTES[vote], answer_id
